"""Training speed: varinf's VAE and GAN steps against plain PyTorch and Pyro's SVI, in one process.

    python benchmarks/throughput.py [--steps 100] [--warmup 20] [--rounds 3]

VAE: a 784-400-50 MLP (encoder 784-400-2x50, decoder 50-400-784), Bernoulli likelihood, analytic
KL, batch 256, Adam 1e-3 (fused, as in varinf's recipes), on dynamically binarised MNIST. GAN: the gan_mnist networks, the
non-saturating loss, batch 64. These implementations, timed on the same machine in the
same run, after warm-up:

* varinf: the module trained by a Lightning ``Trainer`` (what ``varinf fit`` runs), each training
  step timed by a callback; the wall time of an epoch logged as ``varinf fit`` logs (a CSVLogger)
  is split into data (the time inside the batch iterator), steps, logging between steps
  (Lightning's logger connector) and the rest (Lightning's loop and hooks);
* plain PyTorch: the same networks and estimator in a hand-written loop, written as well as
  PyTorch allows (no Python per image, ``zero_grad(set_to_none=True)``, the same Adam);
* the Lightning floor (VAE only): the plain step as the ``training_step`` of a bare
  LightningModule stepping its optimiser itself (as varinf's modules do), which shows what
  Lightning's loop alone costs (and so the best ratio to plain PyTorch or SVI that any module
  trained by Lightning could reach);
* Pyro SVI (VAE only): ``SVI(model, guide, Adam, Trace_ELBO).step`` as in Pyro's VAE example
  (``pyro.optim.Adam``, not fused; a Bernoulli on sigmoid probabilities; a Monte-Carlo KL).

The references run interleaved with the Lightning steps they are compared with: after each
varinf (or floor) step, a callback runs one step of each reference on the same batch, so the
machine's slow drifts (it is shared) hit both sides of a ratio alike. Each measurement is repeated
``--rounds`` times and the medians reported. Prints median milliseconds per step and the ratios, the split of a 60k-image
epoch into data, steps, logging and Lightning's loop, and epoch time against the training-set size
(15k, 30k, 60k) and the batch size; writes benchmarks/results/throughput.{json,md} and
throughput_scaling.png.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from varinf import MLP, GANModule, GaussianEncoderGuide, LatentVariableModel, MNISTDataModule, VAEModule

RESULTS = Path(__file__).resolve().parent / "results"
LATENT, HIDDEN = 50, 400


class TimedMethods:
    """Adds up the wall time spent in some methods of an object, wrapped in place."""

    def __init__(self, target, names):
        self.seconds = 0.0
        for name in names:
            setattr(target, name, self._timed(getattr(target, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class StepTimer(pl.Callback):
    """Times each training step (batch start to batch end), the epoch, and the logging done
    between steps (Lightning's logger connector, which writes step metrics to the logger),
    keeping the last epoch's."""

    def __init__(self):
        self.steps, self.logging = [], None

    def setup(self, trainer, pl_module, stage):
        connector = trainer._logger_connector  # its per-batch work: collecting, reducing and writing logged values
        self.logging = TimedMethods(connector, ["on_batch_start", "on_batch_end", "update_train_step_metrics"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self._start)

    def on_train_epoch_start(self, trainer, pl_module):
        self.steps = []
        self._epoch_start, self._logging_start = time.perf_counter(), self.logging.seconds

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_seconds = time.perf_counter() - self._epoch_start
        self.epoch_logging_seconds = self.logging.seconds - self._logging_start


class InterleavedReferences(pl.Callback):
    """After every training step, one timed step of each reference (``name -> step(x)``) on the
    same batch's images; listed after the :class:`StepTimer`, whose step time excludes them."""

    def __init__(self, references: dict):
        self.references, self.steps = references, {name: [] for name in references}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, step in self.references.items():
            started = time.perf_counter()
            step(batch[0])
            self.steps[name].append(time.perf_counter() - started)


def lightning_run(module, datamodule, warmup: int, steps: int, limit_train_batches=None, epochs: int = 1, log_to=None, references=None) -> dict:
    """Train for ``epochs`` epochs: the timer (``"timer"``, holding the last epoch's times) and the
    median ms per step after ``warmup`` steps of the module (``"module"``) and of each of
    ``references`` (by name), run interleaved. ``log_to``: a folder for a CSVLogger (as ``varinf
    fit`` logs), else no logger."""
    timer, interleaved = StepTimer(), InterleavedReferences(references or {})
    trainer = pl.Trainer(
        accelerator="auto", max_epochs=epochs, limit_train_batches=limit_train_batches or warmup + steps, limit_val_batches=0,
        logger=CSVLogger(log_to) if log_to else False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer, interleaved],
    )
    module.configure_callbacks = lambda: []  # time the step, not image grids and checkpoints
    trainer.fit(module, datamodule=datamodule)
    medians = {name: 1000 * statistics.median(times[warmup:]) for name, times in [("module", timer.steps), *interleaved.steps.items()] if times[warmup:]}
    return {"timer": timer, **medians}


def vae_networks() -> tuple[nn.Module, nn.Module]:
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 784))
    return encoder, decoder


def plain_vae_loss(encoder, decoder):
    """-ELBO with the analytic KL and one reparameterised sample, as varinf computes it."""

    def loss(x):
        loc, raw_scale = encoder(x).view(-1, 2, LATENT).unbind(1)
        scale = softplus(raw_scale) + 1e-3
        z = loc + scale * torch.randn_like(loc)
        reconstruction = binary_cross_entropy_with_logits(decoder(z), x.flatten(1), reduction="none").sum(1)
        kl = 0.5 * (loc.square() + scale.square() - 1).sum(1) - scale.log().sum(1)
        return (reconstruction + kl).mean()

    return loss


def plain_vae_step(encoder, decoder, optimizer):
    """One Adam step on :func:`plain_vae_loss`."""
    elbo = plain_vae_loss(encoder, decoder)

    def step(x):
        loss = elbo(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pyro_svi_vae_step(encoder, decoder):
    """Pyro's VAE example (examples/vae/vae.py) on the same networks: model and guide functions,
    ``pyro.module``, the decoder's output through a sigmoid into ``Bernoulli(probs,
    validate_args=False)``, ``Trace_ELBO``, ``pyro.optim.Adam`` and ``SVI.step``."""
    pyro.clear_param_store()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), x.new_ones(LATENT)).to_event(1))
            image = torch.sigmoid(decoder(z))
            pyro.sample("x", dist.Bernoulli(image, validate_args=False).to_event(1), obs=x.flatten(1))

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw_scale = encoder(x).view(-1, 2, LATENT).unbind(1)
            pyro.sample("z", dist.Normal(loc, softplus(raw_scale) + 1e-3).to_event(1))

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    return svi.step


def plain_gan_step(generator, discriminator, generator_optimizer, discriminator_optimizer, latent_dim):
    def step(x):
        real = x
        fake = torch.sigmoid(generator(torch.randn(x.shape[0], latent_dim, device=x.device)))
        real_logits, fake_logits = discriminator(real).flatten(), discriminator(fake.detach()).flatten()
        d_loss = binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)) + binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        discriminator_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        discriminator_optimizer.step()
        fake_logits = discriminator(fake).flatten()
        g_loss = binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        generator_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        generator_optimizer.step()

    return step


class LightningFloor(pl.LightningModule):
    """The plain step inside a bare LightningModule that steps its optimiser itself, as varinf's
    modules do (manual optimisation): what Lightning's loop alone costs."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = vae_networks()
        self.loss = plain_vae_loss(self.encoder, self.decoder)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.loss(batch[0])
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def configure_optimizers(self):
        return vae_adam(self.parameters())


def mlp(hidden):
    return lambda i, o: MLP(i, o, hidden=hidden)


def varinf_vae() -> VAEModule:
    return VAEModule(
        latent_dim=LATENT,
        guide=lambda shape, dim: GaussianEncoderGuide(shape, dim, encoder=mlp((HIDDEN,))),
        model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=mlp((HIDDEN,))),
        optimizer=vae_adam,
    )


GAN_LATENT = 64


def gan_networks() -> tuple[nn.Module, nn.Module]:
    return (MLP((GAN_LATENT,), (1, 28, 28), hidden=(256, 512, 1024), activation="leaky_relu", normalization="batch"),
            MLP((1, 28, 28), (1,), hidden=(512, 256), activation="leaky_relu", dropout=0.2))


def vae_adam(parameters):
    return torch.optim.Adam(parameters, lr=1e-3, fused=True)


def gan_adam(parameters):
    return torch.optim.Adam(parameters, lr=2e-4, betas=(0.5, 0.999), fused=True)


def varinf_gan() -> GANModule:
    generator, discriminator = gan_networks()
    return GANModule(
        latent_dim=GAN_LATENT,
        model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=lambda i, o: generator),
        discriminator=lambda i, o: discriminator,
        generator_optimizer=gan_adam, discriminator_optimizer=gan_adam,
    )


def plain_vae() -> Callable:
    encoder, decoder = vae_networks()
    return plain_vae_step(encoder, decoder, vae_adam([*encoder.parameters(), *decoder.parameters()]))


def plain_gan() -> Callable:
    generator, discriminator = gan_networks()
    return plain_gan_step(generator, discriminator, gan_adam(generator.parameters()), gan_adam(discriminator.parameters()), GAN_LATENT)


def one_round(warmup: int, steps: int) -> dict[str, float]:
    """Three Lightning runs, fresh networks each, with their references interleaved: median ms per
    step, and the ratios. Each ratio to the plain step, and SVI over varinf, pairs steps of one
    run (the floor's with the plain steps beside it); SVI over the floor pairs two runs."""
    def vae_data():
        return MNISTDataModule(binarize="dynamic", batch_size=256)

    vae = lightning_run(varinf_vae(), vae_data(), warmup, steps, references={"plain": plain_vae(), "pyro_svi": pyro_svi_vae_step(*vae_networks())})
    floor = lightning_run(LightningFloor(), vae_data(), warmup, steps, references={"plain": plain_vae()})
    gan = lightning_run(varinf_gan(), MNISTDataModule(binarize="none", batch_size=64), warmup, steps, references={"plain": plain_gan()})
    return {
        "vae_plain_ms": vae["plain"], "vae_pyro_svi_ms": vae["pyro_svi"], "vae_lightning_floor_ms": floor["module"], "vae_varinf_ms": vae["module"],
        "gan_plain_ms": gan["plain"], "gan_varinf_ms": gan["module"],
        "vae_varinf_over_plain": vae["module"] / vae["plain"],
        "vae_lightning_floor_over_plain": floor["module"] / floor["plain"],
        "vae_pyro_svi_over_varinf": vae["pyro_svi"] / vae["module"],
        "vae_pyro_svi_over_lightning_floor": vae["pyro_svi"] / floor["module"],
        "gan_varinf_over_plain": gan["module"] / gan["plain"],
    }


def mnist_60k(batch_size: int, size: int) -> MNISTDataModule:
    """Dynamically binarised MNIST whose training split is the first ``size`` of all 60k training
    images (varinf's 55k training and 5k validation images)."""
    data = MNISTDataModule(binarize="dynamic", batch_size=batch_size)
    data.setup("fit")
    (train, train_labels), (val, val_labels) = data.splits["train"], data.splits["val"]
    data.splits["train"] = (torch.cat([train, val])[:size], torch.cat([train_labels, val_labels])[:size])
    return data


def epoch_seconds(batch_size: int, size: int) -> float:
    """Wall time of a second epoch (the first also pays one-time costs)."""
    return lightning_run(varinf_vae(), mnist_60k(batch_size, size), 0, 0, limit_train_batches=1.0, epochs=2)["timer"].epoch_seconds


class TimedBatches:
    """Serves a data module's training batches and adds up, per epoch, the time spent making them
    (``iter`` and every ``next``): the data share of the fit itself."""

    def __init__(self, batches):
        self.batches, self.epoch_seconds = batches, []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        started = time.perf_counter()
        iterator = iter(self.batches)
        self.epoch_seconds.append(time.perf_counter() - started)
        while True:
            started = time.perf_counter()
            batch = next(iterator, None)
            self.epoch_seconds[-1] += time.perf_counter() - started
            if batch is None:
                return
            yield batch


def epoch_split(rounds: int) -> dict[str, float]:
    """One 60k epoch of the VAE (the second of a fit, logged to a CSVLogger as ``varinf fit`` logs)
    split into data (the time inside the batch iterator: slicing and binarising), steps, logging
    between steps (Lightning's logger connector) and the rest: Lightning's loop; medians over rounds."""
    splits = []
    for _ in range(rounds):
        data = mnist_60k(256, 60_000)
        batches = TimedBatches(data.train_dataloader())
        data.train_dataloader = lambda: batches
        with tempfile.TemporaryDirectory() as logs:
            timer = lightning_run(varinf_vae(), data, 0, 0, limit_train_batches=1.0, epochs=2, log_to=logs)["timer"]
        steps, data_seconds, logging = sum(timer.steps), batches.epoch_seconds[-1], timer.epoch_logging_seconds
        splits.append({"epoch_seconds": timer.epoch_seconds, "data": data_seconds, "steps": steps, "logging": logging,
                       "lightning_loop": timer.epoch_seconds - data_seconds - steps - logging})
    median = {key: statistics.median(split[key] for split in splits) for key in splits[0]}
    shares = {key: median[key] / median["epoch_seconds"] for key in ("data", "steps", "logging", "lightning_loop")}
    return {"vae_epoch_seconds": median["epoch_seconds"], **{f"vae_epoch_{key}_share": share for key, share in shares.items()},
            "vae_epoch_data_and_logging_share": shares["data"] + shares["logging"]}


def scaling(rounds: int) -> dict:
    """Median epoch seconds against the training-set size (batch 256) and the batch size (60k),
    every setting once per round (interleaved).

    Against the size n: the least-squares line ``t = a + b n`` through the medians, its largest
    relative residual (the deviation from linear growth) and its intercept ``a`` (seconds an epoch
    costs whatever its size); and the deviation from proportional growth ``t = b n``, the median
    over rounds of each round's largest ``|(t_n / n) / (t_60k / 60k) - 1|``."""
    sizes, batch_sizes = (15_000, 30_000, 60_000), (64, 128, 256, 512)
    by_size, by_batch, deviations = {n: [] for n in sizes}, {b: [] for b in batch_sizes}, []
    for _ in range(rounds):
        seconds = {n: epoch_seconds(256, n) for n in sizes}
        deviations.append(max(abs((seconds[n] / n) / (seconds[60_000] / 60_000) - 1) for n in sizes))
        for n in sizes:
            by_size[n].append(seconds[n])
        for b in batch_sizes:
            by_batch[b].append(epoch_seconds(b, 60_000))
    medians = np.array([statistics.median(by_size[n]) for n in sizes])
    slope, intercept = np.polyfit(sizes, medians, 1)
    return {"epoch_seconds_by_size": dict(zip(sizes, medians.tolist())),
            "epoch_seconds_by_batch_size": {b: statistics.median(times) for b, times in by_batch.items()},
            "largest_deviation_from_linear": float(np.max(np.abs(medians - (intercept + slope * np.array(sizes))) / medians)),
            "fixed_seconds_per_epoch": float(intercept),
            "largest_deviation_from_proportional": statistics.median(deviations),
            "per_round_epoch_seconds_by_size": by_size}


def plot_scaling(scales: dict, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    sizes, seconds = zip(*scales["epoch_seconds_by_size"].items())
    left.plot(sizes, seconds, "o-", label="measured")
    left.plot([0, sizes[-1]], [0, seconds[-1]], "--", color="grey", label="proportional to size")
    left.set(xlabel="training images", ylabel="epoch seconds (batch 256)", title="epoch time against data size")
    left.legend(fontsize="small")
    batches, seconds = zip(*scales["epoch_seconds_by_batch_size"].items())
    right.plot(batches, seconds, "o-")
    right.set(xscale="log", xticks=batches, xticklabels=[str(b) for b in batches], xlabel="batch size", ylabel="epoch seconds (60k images)",
              title="epoch time against batch size")
    right.minorticks_off()  # a log axis labels its minor ticks too, over the batch sizes
    figure.suptitle("varinf VAE (784-400-50 MLP), dynamically binarised MNIST, this machine")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="every measurement is repeated this often, interleaved; medians are reported")
    args = parser.parse_args()
    torch.manual_seed(0)
    rounds = [one_round(args.warmup, args.steps) for _ in range(args.rounds)]
    results = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    results.update(epoch_split(args.rounds))
    scales = scaling(args.rounds)
    for key in ("largest_deviation_from_linear", "fixed_seconds_per_epoch", "largest_deviation_from_proportional"):
        results[f"epoch_time_{key}"] = scales[key]

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
              **results, "scaling": scales, "per_round": rounds}
    (RESULTS / "throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_scaling(scales, RESULTS / "throughput_scaling.png")
    lines = ["| quantity | value |", "| --- | --- |", *(f"| {key} | {value:.3f} |" for key, value in results.items())]
    lines += ["", "| training images | epoch s (batch 256) |", "| --- | --- |", *(f"| {n} | {t:.2f} |" for n, t in scales["epoch_seconds_by_size"].items())]
    lines += ["", "| batch size | epoch s (60k) |", "| --- | --- |", *(f"| {b} | {t:.2f} |" for b, t in scales["epoch_seconds_by_batch_size"].items())]
    header = (f"# Training-step throughput\n\nMedians over {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps "
              "(ms per step; the references' steps interleaved with the Lightning steps they are compared with; ratios are medians of "
              "per-round ratios); epoch times and shares are of the second epoch of a fit on 60k images.\n\n")
    (RESULTS / "throughput.md").write_text(header + "\n".join(lines) + "\n\n![scaling](throughput_scaling.png)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
