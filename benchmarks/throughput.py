"""Training speed: varinf's VAE and GAN steps against plain PyTorch and Pyro's SVI, in one process.

    python benchmarks/throughput.py [--steps 100] [--warmup 20]

VAE: a 784-400-50 MLP (encoder 784-400-2x50, decoder 50-400-784), Bernoulli likelihood, analytic
KL, batch 256, Adam 1e-3, on dynamically binarised MNIST. GAN: the gan_mnist networks, the
non-saturating loss, batch 64. Three implementations of each, timed on the same machine in the
same run, after warm-up:

* varinf: the module trained by a Lightning ``Trainer`` (what ``varinf fit`` runs), each training
  step timed by a callback; the epoch's wall time is split into data (between steps), step and
  the rest (logging, hooks);
* plain PyTorch: the same networks and estimator in a hand-written loop, written as well as
  PyTorch allows (no Python per image, ``zero_grad(set_to_none=True)``, foreach Adam);
* Pyro SVI (VAE only): ``SVI(model, guide, Adam, Trace_ELBO).step`` as in Pyro's VAE example.

Prints median milliseconds per step and the ratios, writes benchmarks/results/throughput.{json,md}
and a scaling figure (epoch time against training-set size and batch size) as a PNG.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from varinf import MLP, GANModule, GaussianEncoderGuide, LatentVariableModel, MNISTDataModule, VAEModule

RESULTS = Path(__file__).resolve().parent / "results"
LATENT, HIDDEN = 50, 400


def median_ms(step, batches, warmup: int, steps: int) -> float:
    """Median wall time of ``step(batch)`` in milliseconds, after ``warmup`` untimed steps."""
    times = []
    for index in range(warmup + steps):
        batch = batches[index % len(batches)]
        started = time.perf_counter()
        step(batch)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


class StepTimer(pl.Callback):
    """Times each training step (batch start to batch end) and the gaps between steps (data)."""

    def __init__(self):
        self.steps, self.gaps, self._last_end = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()
        if self._last_end is not None:
            self.gaps.append(self._start - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last_end = time.perf_counter()
        self.steps.append(self._last_end - self._start)

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start, self._last_end = time.perf_counter(), None

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_seconds = time.perf_counter() - self._epoch_start


def lightning_run(module, datamodule, warmup: int, steps: int, limit_train_batches=None) -> StepTimer:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="auto", max_epochs=1, limit_train_batches=limit_train_batches or warmup + steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    module.configure_callbacks = lambda: []  # time the step, not image grids and checkpoints
    trainer.fit(module, datamodule=datamodule)
    timer.steps, timer.gaps = timer.steps[warmup:], timer.gaps[warmup:]
    return timer


def vae_networks() -> tuple[nn.Module, nn.Module]:
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 784))
    return encoder, decoder


def plain_vae_step(encoder, decoder, optimizer):
    """-ELBO with the analytic KL and one reparameterised sample, as varinf computes it."""

    def step(x):
        loc, raw_scale = encoder(x).view(-1, 2, LATENT).unbind(1)
        scale = softplus(raw_scale) + 1e-3
        z = loc + scale * torch.randn_like(loc)
        reconstruction = binary_cross_entropy_with_logits(decoder(z), x.flatten(1), reduction="none").sum(1)
        kl = 0.5 * (loc.square() + scale.square() - 1).sum(1) - scale.log().sum(1)
        loss = (reconstruction + kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def pyro_svi_vae_step(encoder, decoder):
    """Pyro's VAE example: model and guide functions, ``pyro.module``, ``SVI.step``."""
    pyro.clear_param_store()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), x.new_ones(LATENT)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x.flatten(1))

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


def mlp(hidden):
    return lambda i, o: MLP(i, o, hidden=hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    mnist = MNISTDataModule(binarize="dynamic", batch_size=256)
    images = mnist.load_splits()["train"][0]
    vae_batches = [torch.bernoulli(images[i : i + 256]) for i in range(0, 256 * 40, 256)]
    gan_batches = [images[i : i + 64] for i in range(0, 64 * 40, 64)]
    results = {}

    encoder, decoder = vae_networks()
    plain = plain_vae_step(encoder, decoder, torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3))
    results["vae_plain_ms"] = median_ms(plain, vae_batches, args.warmup, args.steps)
    results["vae_pyro_svi_ms"] = median_ms(pyro_svi_vae_step(*vae_networks()), vae_batches, args.warmup, args.steps)
    vae = VAEModule(
        latent_dim=LATENT,
        guide=lambda shape, dim: GaussianEncoderGuide(shape, dim, encoder=mlp((HIDDEN,))),
        model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=mlp((HIDDEN,))),
    )
    timer = lightning_run(vae, MNISTDataModule(binarize="dynamic", batch_size=256), args.warmup, args.steps)
    results["vae_varinf_ms"] = 1000 * statistics.median(timer.steps)

    latent_dim = 64
    generator, discriminator = MLP((latent_dim,), (1, 28, 28), hidden=(256, 512, 1024), activation="leaky_relu", normalization="batch"), MLP((1, 28, 28), (1,), hidden=(512, 256), activation="leaky_relu", dropout=0.2)
    adam = lambda parameters: torch.optim.Adam(parameters, lr=2e-4, betas=(0.5, 0.999))  # noqa: E731
    results["gan_plain_ms"] = median_ms(plain_gan_step(generator, discriminator, adam(generator.parameters()), adam(discriminator.parameters()), latent_dim), gan_batches, args.warmup, args.steps)
    gan = GANModule(
        latent_dim=latent_dim,
        model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=lambda i, o: MLP(i, o, hidden=(256, 512, 1024), activation="leaky_relu", normalization="batch")),
        discriminator=lambda i, o: MLP(i, o, hidden=(512, 256), activation="leaky_relu", dropout=0.2),
        generator_optimizer=adam, discriminator_optimizer=adam,
    )
    gan_timer = lightning_run(gan, MNISTDataModule(binarize="none", batch_size=64), args.warmup, args.steps)
    results["gan_varinf_ms"] = 1000 * statistics.median(gan_timer.steps)

    # a whole epoch, split into data (gaps between steps), steps and the rest
    epoch = lightning_run(VAEModule(latent_dim=LATENT), MNISTDataModule(binarize="dynamic", batch_size=256), 0, 0, limit_train_batches=1.0)
    results["vae_epoch_seconds"] = epoch.epoch_seconds
    results["vae_epoch_data_share"] = sum(epoch.gaps) / epoch.epoch_seconds
    results["vae_epoch_step_share"] = sum(epoch.steps) / epoch.epoch_seconds
    results["vae_epoch_other_share"] = 1 - results["vae_epoch_data_share"] - results["vae_epoch_step_share"]

    results["vae_varinf_over_plain"] = results["vae_varinf_ms"] / results["vae_plain_ms"]
    results["vae_pyro_svi_over_varinf"] = results["vae_pyro_svi_ms"] / results["vae_varinf_ms"]
    results["gan_varinf_over_plain"] = results["gan_varinf_ms"] / results["gan_plain_ms"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), **results}, indent=2) + "\n")
    lines = ["| quantity | value |", "| --- | --- |", *(f"| {key} | {value:.3f} |" for key, value in results.items())]
    (RESULTS / "throughput.md").write_text("# Training-step throughput (median ms per step)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
