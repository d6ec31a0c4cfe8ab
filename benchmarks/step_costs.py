"""What two choices of the recipes save per VAE training step: fused Adam, and the matrix-product
mixture density of the VampPrior.

    python benchmarks/step_costs.py [--steps 100] [--warmup 10] [--rounds 9]

Each variant is the recipes' 784-500-500-50 VAE (Gaussian encoder, Bernoulli decoder, analytic KL,
batch 128, Adam 1e-3) on dynamically binarised MNIST, timed as the step a module makes: the loss of
``VAEModule.objective``, backward, the optimiser step (no Lightning loop, which adds the same to
each). The variants:

* ``fused``: Adam with ``fused=True``, as in the recipes; ``unfused``: torch's default Adam;
* ``vampprior``: the ``vae_vampprior_mnist`` prior, 100 pseudo-inputs, whose density
  (``varinf.priors.DiagonalNormalMixture``) is computed with matrix products;
* ``vampprior_mixture_same_family``: the same prior with the density of torch's
  ``MixtureSameFamily``, which forms a ``(batch, K, latent_dim)`` tensor.

The variants run interleaved, one step of each in turn, so that the machine's drifts hit all of
them alike; every ratio is the median over ``--rounds`` rounds of the ratio of median step times.
Writes benchmarks/results/step_costs.{json,md} and a bar chart, step_costs.png.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib
import pyro.distributions as dist
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from varinf import MLP, GaussianEncoderGuide, LatentVariableModel, MNISTDataModule, VampPrior, VAEModule

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, HIDDEN, LATENT, PSEUDO_INPUTS = 128, (500, 500), 50, 100


class MixtureSameFamilyVampPrior(VampPrior):
    """The VampPrior with torch's general mixture density in place of the matrix products."""

    def forward(self) -> dist.TorchDistribution:
        mixture = super().forward()  # a DiagonalNormalMixture: the same components and weights
        components = dist.Normal(mixture.locs, mixture.scales, validate_args=False).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=mixture.logits, validate_args=False), components, validate_args=False)


def vae(prior=None, fused: bool = True) -> tuple[VAEModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model_args = {} if prior is None else {"prior": lambda dim: prior(dim, num_pseudo_inputs=PSEUDO_INPUTS, init="noise")}
    module = VAEModule(
        latent_dim=LATENT,
        guide=lambda shape, dim: GaussianEncoderGuide(shape, dim, encoder=lambda i, o: MLP(i, o, hidden=HIDDEN)),
        model=lambda shape, dim: LatentVariableModel(shape, dim, decoder=lambda i, o: MLP(i, o, hidden=HIDDEN), **model_args),
    )
    return module, torch.optim.Adam(module.parameters(), lr=1e-3, fused=fused)


def timed_step(module: VAEModule, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    module.objective.terms(x).loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def one_round(images: torch.Tensor, warmup: int, steps: int) -> dict[str, float]:
    variants = {"fused": vae(), "unfused": vae(fused=False), "vampprior": vae(VampPrior),
                "vampprior_mixture_same_family": vae(MixtureSameFamilyVampPrior)}
    times = {name: [] for name in variants}
    for step in range(warmup + steps):
        x = torch.bernoulli(images[torch.randint(len(images), (BATCH,))])
        for name, (module, optimizer) in variants.items():
            seconds = timed_step(module, optimizer, x)
            if step >= warmup:
                times[name].append(seconds)
    ms = {f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}
    return {**ms, "unfused_over_fused": ms["unfused_ms"] / ms["fused_ms"], "vampprior_over_vae": ms["vampprior_ms"] / ms["fused_ms"],
            "vampprior_mixture_same_family_over_vae": ms["vampprior_mixture_same_family_ms"] / ms["fused_ms"]}


def plot(rounds: list[dict[str, float]], path: Path) -> None:
    """Median ms per step of each variant, with every round's median as a dot."""
    names = [key for key in rounds[0] if key.endswith("_ms")]
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.barh(range(len(names)), [statistics.median(r[name] for r in rounds) for name in names], color="lightsteelblue")
    for index, name in enumerate(names):
        axes.plot([r[name] for r in rounds], [index] * len(rounds), "k.", markersize=4)
    axes.set(yticks=range(len(names)), yticklabels=[name.removesuffix("_ms") for name in names], xlabel="ms per step (bars: median; dots: rounds)",
             title=f"784-500-500-50 VAE step, batch {BATCH}, {torch.get_num_threads()} thread(s)")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps of each variant per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each variant first")
    parser.add_argument("--rounds", type=int, default=9, help="fresh networks each round; medians over rounds are reported")
    args = parser.parse_args()
    data = MNISTDataModule(binarize="dynamic")
    data.setup("fit")
    images = data.splits["train"][0]
    rounds = []
    for number in range(args.rounds):
        rounds.append(one_round(images, args.warmup, args.steps))
        print(f"round {number + 1}/{args.rounds}: " + ", ".join(f"{key} {value:.3f}" for key, value in rounds[-1].items()), flush=True)
    results = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"torch": torch.__version__, "threads": torch.get_num_threads(), **vars(args), **results, "per_round": rounds}
    (RESULTS / "step_costs.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| quantity | value |", "| --- | --- |", *(f"| {key} | {value:.3f} |" for key, value in results.items())]
    header = (f"# VAE step costs\n\nThe 784-500-500-50 VAE's step (loss, backward, Adam; batch {BATCH}, {torch.get_num_threads()} thread(s)): "
              f"medians over {args.rounds} rounds of {args.steps} interleaved steps after {args.warmup} warm-up steps; ms per step, and "
              "ratios as medians of per-round ratios. `benchmarks/step_costs.py` describes the variants.\n\n")
    plot(rounds, RESULTS / "step_costs.png")
    (RESULTS / "step_costs.md").write_text(header + "\n".join(lines) + "\n\n![step costs](step_costs.png)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
