"""Mode coverage of the ring-of-Gaussians recipes: fit each from its recipe, score 10k samples.

A sample is high quality within 3 std of a mode centre; a mode is covered when it holds at least
10% of its fair share of the high-quality samples (varinf.metrics.mode_coverage). Targets: at
least 7 of 8 modes, at least 80% high-quality samples, and at most 3 minutes per fit.

    python benchmarks/ring_coverage.py [--recipes gan_ring wgan_gp_ring]

Writes benchmarks/results/ring_coverage.{json,md} and one scatter PNG per recipe.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from varinf import RingDataModule, mode_coverage
from varinf.callbacks import save_samples
from varinf.cli import fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run(recipe: str, workdir: Path) -> dict:
    started = time.perf_counter()
    cli = fit([
        "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"), "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir}",
    ])
    seconds = time.perf_counter() - started
    module, data = cli.model.eval(), RingDataModule()
    torch.manual_seed(0)
    samples = module.generate(module.sample_latents(10_000))
    save_samples(samples, RESULTS / f"ring_{recipe}.png", reference=data.load_splits()["val"][0])
    return {"recipe": recipe, **mode_coverage(samples, data.centers(), data.std), "fit_seconds": round(seconds, 1),
            "epochs": cli.trainer.current_epoch, "generator_steps": module.generator_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["gan_ring", "wgan_gp_ring"])
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run(recipe, Path(workdir)) for recipe in args.recipes]
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(), "machine": platform.machine()}
    (RESULTS / "ring_coverage.json").write_text(json.dumps({"rows": rows, "machine": machine}, indent=2) + "\n")
    lines = ["| recipe | modes covered (of 8) | high-quality samples | fit time (s) | generator steps |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['recipe']} | {r['modes_covered']:.0f} | {100 * r['high_quality']:.1f}% | {r['fit_seconds']} | {r['generator_steps']} |" for r in rows]
    table = "\n".join(lines)
    (RESULTS / "ring_coverage.md").write_text(f"# Ring of 8 Gaussians: mode coverage of 10k samples\n\n{table}\n\nMachine: {machine}\n")
    print(table)


if __name__ == "__main__":
    main()
