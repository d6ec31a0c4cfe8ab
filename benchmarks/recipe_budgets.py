"""Fit recipes from the CLI at their full budget: wall time per fit, and the sample grids to look at.

    python benchmarks/recipe_budgets.py gan_mnist wgan_gp_mnist aae_mnist ali_mnist dcgan_mnist

Each fit runs in its own process, its run kept in runs/recipe_budgets/<name>/version_0, exactly as `varinf fit --config recipes/<name>.yaml` (MNIST from
$VARINF_DATA_DIR, default ../shared/data/mnist). Writes a row per recipe to
benchmarks/results/recipe_budgets.md (replacing that recipe's earlier row) and copies its final samples.png to
benchmarks/results/samples_<name>.png. The classes of 10k samples of the last checkpoint, by varinf's
MNIST classifier, say whether all ten digits are there.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from varinf.evaluation import evaluation_from_checkpoint, run_metrics

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VARINF_DATA_DIR", str(ROOT.parent / "shared" / "data" / "mnist"))
    table = RESULTS / "recipe_budgets.md"
    if not table.exists():
        table.write_text(
            "Fit wall time of each recipe from the CLI on this machine, alone; classes of 10k samples of the last\n"
            "checkpoint by varinf's MNIST classifier (covered: at least 10% of a fair share).\n\n"
            "| recipe | fit wall time (min) | epochs | classes covered | smallest class share | samples |\n| --- | --- | --- | --- | --- | --- |\n"
        )
    for recipe in sys.argv[1:]:
        workdir = ROOT / "runs" / "recipe_budgets"
        shutil.rmtree(workdir / recipe, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(
            [str(Path(sys.executable).parent / "varinf"), "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"), f"--trainer.logger.init_args.save_dir={workdir}"],
            check=True, stdout=subprocess.DEVNULL,
        )
        minutes = (time.perf_counter() - started) / 60
        run = workdir / recipe / "version_0"
        epochs = len(list((run / "images").glob("samples_epoch_*.png")))
        shutil.copy(run / "images" / "samples.png", RESULTS / f"samples_{recipe}.png")
        rows = [row for row in table.read_text().splitlines(keepends=True) if not row.startswith(f"| {recipe} |")]
        (modes,) = run_metrics(evaluation_from_checkpoint(run / "checkpoints" / "last.ckpt"), ["modes"])
        rows.append(f"| {recipe} | {minutes:.1f} | {epochs} | {modes['classes_covered']} | {min(modes['histogram']):.3f} | ![{recipe}](samples_{recipe}.png) |\n")
        table.write_text("".join(rows))
        print(f"{recipe}: {minutes:.1f} min, {epochs} epochs, class shares {modes['histogram']}", flush=True)


if __name__ == "__main__":
    main()
