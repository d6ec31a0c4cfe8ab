"""ELBO-based against adversarial objectives on one scale: every model, every metric that applies.

    python benchmarks/elbo_vs_adversarial.py --budget quick   # smoke run, under 10 minutes
    python benchmarks/elbo_vs_adversarial.py --budget full    # the committed table, under 3 hours
    python benchmarks/elbo_vs_adversarial.py --budget paper   # paper protocols, one seed, ~4 hours

Each (model, seed) is one task, run in its own process: fit from the model's recipe by ``varinf
fit``, then evaluated with ``varinf.evaluation`` (likelihood metrics for models that have one,
sample metrics for all, each against grey-level MNIST test images). ``--workers N`` runs N tasks at
once, each with cpus / N threads (two one-thread tasks get through ~1.4x more work than one
two-thread task on this 2-core machine). A task's results are kept in its run folder with the
git commit, so an interrupted benchmark resumes where it stopped when run again (``--fresh``
refits everything). ``--models`` refits a subset and keeps the other models' rows (and divergence
curves) from the table already written for the budget. Two sanity rows use no model: the training
images as "samples" (FID near 0, all classes) and uniform noise.

Writes benchmarks/results/elbo_vs_adversarial.{json,md} (``--budget quick`` writes
``elbo_vs_adversarial_quick.*``): mean +- std over seeds, wall time per epoch, machine and
versions; and PNGs: a sample grid per model, metric bars, and divergence read-out curves.
``--budget paper`` trains the papers' setups long enough to hold them against published numbers
(THEORY.md section 4): the AAE paper's MLP AAE and a GAN for Parzen (340 and 225 nats), the IWAE
paper's 784-200-200-50 VAE for the NLL with k=5000 (86.76 nats after 3280 epochs).
MNIST comes from $VARINF_DATA_DIR (default ../shared/data/mnist); nothing is downloaded.
"""

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from varinf.callbacks import save_samples
from varinf.data import MNISTDataModule
from varinf.evaluation import (
    Evaluation,
    evaluation_from_checkpoint,
    run_metrics,
    supported_metrics,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

MODELS = {  # name: (recipe, training epochs under the full budget); add a row to benchmark a new model
    "vae": ("vae_mnist", 80),
    "iwae": ("iwae_mnist", 80),
    "vae_iaf": ("vae_iaf_mnist", 80),
    "vae_vampprior": ("vae_vampprior_mnist", 80),
    "aae": ("aae_mnist", 4),
    "gan": ("gan_mnist", 8),
    "wgan_gp": ("wgan_gp_mnist", 14),
    "ali": ("ali_mnist", 8),
}
PAPER_PROTOCOLS = {  # name: (recipe, training epochs); one seed
    "aae_paper": ("aae_paper_mnist", 90),  # the AAE paper's deterministic encoder, 2 x 1000 MLPs and N(0, 5^2 I) prior; learning rates x0.1 after 80
    "gan_paper": ("gan_sn_mnist", 260),  # a non-saturating GAN, its discriminator spectrally normalised, the weights kept an EMA
    "vae_iwae_paper": ("vae_iwae_paper_mnist", 121),  # the first 4 of the paper's 7 learning-rate stages
}
PUBLISHED = {  # THEORY.md section 4
    "aae_paper": "parzen 340 +- 2 (Makhzani et al. 2015)",
    "gan_paper": "parzen 225 +- 2 (Goodfellow et al. 2014)",
    "vae_iwae_paper": "nll 86.76 after 3280 epochs (Burda et al. 2016)",
}

BUDGETS = {
    "quick": {
        "fit": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=40", "--trainer.limit_val_batches=2"],
        "evaluation": {"num_samples": 2000, "k": 50},
        "seeds": [0],  # a smoke run: every model and metric once
        "models": MODELS,
    },
    "full": {"fit": [], "evaluation": {"num_samples": 10_000, "k": 200}, "seeds": [0, 1, 2], "models": MODELS},
    "paper": {"fit": [], "evaluation": {"num_samples": 10_000, "k": 5000}, "seeds": [0], "models": PAPER_PROTOCOLS},
}

HEADLINE = {  # metric: (value key, lower is better)
    "nll": ("nll", True),
    "parzen": ("parzen", False),
    "fid": ("fid", True),
    "kid": ("kid", True),
    "precision_recall": ("precision", False),
    "modes": ("classes_covered", False),
    "divergences": ("js", True),
}
COLUMNS = ["nll", "parzen", "fid", "kid", "precision", "recall", "classes_covered", "kl_to_uniform", "kl_data_model", "kl_model_data", "js"]


def fit(model: str, seed: int, budget: dict, runs: Path) -> tuple[Path, float, int]:
    """Fit one model from its recipe, resuming from the run's last checkpoint if a fit was cut
    short; returns its run folder, the wall seconds of this fit and the epochs in all."""
    recipe, epochs = budget["models"][model]
    name = f"{model}_seed{seed}"
    run = runs / name / "version_0"
    resume = (run / "checkpoints" / "last.ckpt").exists()
    if run.exists() and not resume:
        shutil.rmtree(run)  # a fit that never checkpointed: start it again
    command = [
        str(Path(sys.executable).parent / "varinf"), "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"),
        f"--seed_everything={seed}", f"--trainer.max_epochs={epochs}",
        f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0", *budget["fit"], *(["--resume"] if resume else []),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={"VARINF_DATA_DIR": str(ROOT.parent / "shared" / "data" / "mnist"), **os.environ})
    return run, time.perf_counter() - started, len(list((run / "images").glob("samples_epoch_*.png")))


def seconds_per_epoch(run: Path) -> float:
    """Median wall time between consecutive epochs' sample grids: per epoch of training and
    validation, and unaffected by the pause of a fit cut short and resumed later."""
    times = sorted(path.stat().st_mtime for path in (run / "images").glob("samples_epoch_*.png"))
    return statistics.median(later - earlier for earlier, later in zip(times, times[1:])) if len(times) > 1 else math.nan


def checkpoint_of(run: Path) -> Path:
    """The best checkpoint by the module's own validation metric, else the last one."""
    best = run / "checkpoints" / "best.ckpt"
    return best if best.exists() else run / "checkpoints" / "last.ckpt"


def flatten(rows: list[dict]) -> dict[str, float]:
    """The numeric results of metric rows, by value name."""
    return {key: value for row in rows for key, value in row.items() if key in COLUMNS}


def in_order(images: torch.Tensor):
    """A sampler that hands out ``images`` in order, never the same image twice."""
    position = 0

    def sample(n: int) -> torch.Tensor:
        nonlocal position
        position += n
        return images[position - n : position]

    return sample


def sanity_rows(settings: dict, seed: int = 0) -> dict[str, dict]:
    """Training images and uniform noise as 'models': the floor and the ceiling of the scale."""
    data_module = MNISTDataModule(binarize="none", seed=seed)
    splits = {name: images for name, (images, _) in data_module.load_splits().items()}
    train = splits["train"][torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed))]
    sources = {
        "data (train images)": in_order(train),
        "uniform noise": lambda n: torch.rand(n, 1, 28, 28),
    }
    results = {}
    for name, sample in sources.items():
        evaluation = Evaluation(sample, splits, num_samples=settings["num_samples"], seed=seed)
        results[name] = flatten(run_metrics(evaluation, supported_metrics(evaluation)))
        print(f"{name}: {results[name]}", flush=True)
    return results


def summarize(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(table: dict, sanity: dict, meta: dict) -> str:
    lines = [
        f"# ELBO vs adversarial on MNIST ({meta['budget']} budget)",
        "",
        f"Mean +- std over seeds {meta['seeds']}. {meta['protocol']}",
        "",
        "| model | epochs | s/epoch | " + " | ".join(COLUMNS) + " |",
        "| --- " * (len(COLUMNS) + 3) + "|",
    ]
    for model, row in table.items():
        cells = [f"{row[c][0]:.3g} +- {row[c][1]:.2g}" if c in row else "" for c in COLUMNS]
        lines.append(f"| {model} | {row['epochs'][0]:.0f} | {row['seconds_per_epoch'][0]:.1f} | " + " | ".join(cells) + " |")
    for name, row in sanity.items():
        lines.append(f"| {name} | | | " + " | ".join(f"{row[c]:.3g}" if c in row else "" for c in COLUMNS) + " |")
    published = [f"{model}: {PUBLISHED[model]}" for model in table if model in PUBLISHED]
    if published:
        lines += ["", "Published: " + "; ".join(published) + "."]
    lines += ["", (
        f"Machine: {meta['machine']}; {meta['workers']} tasks at a time, {meta['threads_per_task']} threads each (s/epoch is per task). "
        f"Versions: {meta['versions']}; commits: " + "; ".join(f"{model} {', '.join(c[:10] for c in commits)}" for model, commits in meta["commits"].items()) + ". "
        f"Task time {meta['task_minutes']:.0f} min; this command's wall time {meta['minutes']:.0f} min (tasks kept from an earlier run not counted)."
        + (f" Rows of {', '.join(meta['kept'])} kept from the earlier table (not refitted by this run)." if meta.get("kept") else "")
    ), ""]
    lines += [f"![samples of {model}](elbo_vs_adversarial{meta['suffix']}_samples_{model}.png)" for model in table]
    lines += [f"![metrics](elbo_vs_adversarial{meta['suffix']}_metrics.png)", f"![divergence read-outs](elbo_vs_adversarial{meta['suffix']}_divergences.png)", ""]
    return "\n".join(lines)


def plot_metrics(table: dict, sanity: dict, path: Path) -> None:
    keys = [key for key in COLUMNS if any(key in row for row in table.values())]
    columns = 4
    figure, axes = plt.subplots(math.ceil(len(keys) / columns), columns, figsize=(4 * columns, 3 * math.ceil(len(keys) / columns)), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        models = [model for model, row in table.items() if key in row]
        axis.bar(models, [table[m][key][0] for m in models], yerr=[table[m][key][1] for m in models], color="tab:blue", capsize=3)
        if key in sanity.get("data (train images)", {}):
            axis.axhline(sanity["data (train images)"][key], color="tab:green", linestyle="--", label="train images")
        axis.set_title(key)
        axis.tick_params(axis="x", labelrotation=45)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def divergence_curves(run: Path) -> dict[str, list[list[float]]]:
    """Per-epoch divergence read-outs of one fit, from its CSV log: ``{key: [[epoch, value], ...]}``."""
    with (run / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    columns = {key: f"train/divergence/{key}" for key in ("js", "w1", "kl_data_model")}
    curves = {key: [[float(row["epoch"]), float(row[column])] for row in rows if row.get(column)] for key, column in columns.items()}
    return {key: points for key, points in curves.items() if points}


def plot_divergence_curves(curves: dict[str, dict], path: Path) -> None:
    """The divergence read-outs of each adversarial model (seed 0) against the epoch."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for model, model_curves in curves.items():
        for key, points in model_curves.items():
            axis.plot(*zip(*points), marker=".", label=f"{model}: {key}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("read-out (nats; W1 for critics)")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def kept_rows(path: Path, budget: dict, refitted: list[str]) -> dict:
    """The committed table's rows of the budget's models that this run does not refit (same seeds),
    so that refitting some models rewrites their rows and keeps the others."""
    previous = json.loads(path.read_text()) if path.exists() else None
    if previous is None or previous["meta"]["seeds"] != budget["seeds"]:
        return {"per_seed": {}, "curves": {}, "commits": {}}
    kept = [model for model in previous["per_seed"] if model in budget["models"] and model not in refitted]
    return {
        "per_seed": {model: previous["per_seed"][model] for model in kept},
        "curves": {model: curves for model, curves in previous.get("curves", {}).items() if model in kept},
        "commits": {model: previous["meta"]["commits"][model] for model in kept},
    }


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def runs_dir(budget_name: str) -> Path:
    return ROOT / "runs" / "elbo_vs_adversarial" / budget_name


def task_result(model: str, seed: int, budget_name: str) -> Path:
    return runs_dir(budget_name) / f"{model}_seed{seed}" / "version_0" / "result.json"


def run_task(model: str, seed: int, budget_name: str, budget: dict) -> None:
    """Fit and evaluate one (model, seed); write its values, the commit it started from (the code it
    runs) and the timing beside its run."""
    commit = git_commit()
    run, seconds, epochs = fit(model, seed, budget, runs_dir(budget_name))
    started = time.perf_counter()
    evaluation = evaluation_from_checkpoint(checkpoint_of(run), seed=seed, **budget["evaluation"])
    values = flatten(run_metrics(evaluation, supported_metrics(evaluation)))
    values.update(epochs=epochs, seconds_per_epoch=seconds_per_epoch(run))
    if seed == budget["seeds"][0]:
        save_samples(evaluation.samples[:100], run / "samples_100.png")
    result = {"values": values, "commit": commit, "threads": torch.get_num_threads(),
              "fit_minutes": seconds / 60, "evaluation_minutes": (time.perf_counter() - started) / 60}
    task_result(model, seed, budget_name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{model} seed {seed}: {values}", flush=True)


def run_tasks(tasks: list[tuple[str, int]], budget_name: str, seeds: list[int], workers: int) -> None:
    """Run each task in its own process, ``workers`` at a time, with the CPUs shared among them."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def launch(task):
        model, seed = task
        command = [sys.executable, __file__, "--budget", budget_name, "--seeds", *map(str, seeds), "--task", f"{model}:{seed}"]
        subprocess.run(command, check=True, env=environment)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(launch, tasks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    parser.add_argument("--models", nargs="+", choices=sorted({**MODELS, **PAPER_PROTOCOLS}), help="a subset of the budget's models")
    parser.add_argument("--seeds", nargs="+", type=int, help="a subset of the budget's seeds; results then go to files tagged with them")
    parser.add_argument("--workers", type=int, default=2, help="tasks run at once")
    parser.add_argument("--fresh", action="store_true", help="refit tasks whose results are already kept")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # model:seed, run by a worker process
    args = parser.parse_args()
    os.environ.setdefault("VARINF_DATA_DIR", str(ROOT.parent / "shared" / "data" / "mnist"))
    budget = dict(BUDGETS[args.budget])
    args.models = args.models or list(budget["models"])
    if not set(args.models) <= set(budget["models"]):
        parser.error(f"--budget {args.budget} trains {sorted(budget['models'])}; got --models {args.models}")
    suffix = "" if args.budget == "full" else f"_{args.budget}"
    if args.seeds and args.seeds != budget["seeds"]:
        budget["seeds"] = args.seeds
        suffix += "_seeds" + "-".join(map(str, args.seeds))
    if args.task:
        model, seed = args.task.split(":")
        run_task(model, int(seed), args.budget, budget)
        return
    started = time.perf_counter()
    tasks = [(model, seed) for seed in budget["seeds"] for model in args.models]  # every model once before any second seed
    if args.fresh:
        for task in tasks:
            shutil.rmtree(task_result(*task, args.budget).parent, ignore_errors=True)
    todo = [task for task in tasks if not task_result(*task, args.budget).exists()]
    print(f"{len(tasks)} tasks, {len(tasks) - len(todo)} kept from an earlier run, {args.workers} at a time", flush=True)
    run_tasks(todo, args.budget, budget["seeds"], args.workers)
    results = {task: json.loads(task_result(*task, args.budget).read_text()) for task in tasks}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"elbo_vs_adversarial{suffix}"
    kept = kept_rows(stem.with_suffix(".json"), budget, args.models)
    fitted = {model: [results[(model, seed)]["values"] for seed in budget["seeds"]] for model in args.models}
    per_seed = {model: fitted.get(model) or kept["per_seed"][model] for model in budget["models"] if model in fitted or model in kept["per_seed"]}
    table = {model: {key: summarize([values[key] for values in seeds]) for key in seeds[0]} for model, seeds in per_seed.items()}
    first_runs = {model: task_result(model, budget["seeds"][0], args.budget).parent for model in args.models}
    for model, run in first_runs.items():
        shutil.copyfile(run / "samples_100.png", RESULTS / f"elbo_vs_adversarial{suffix}_samples_{model}.png")
    adversarial = [model for model in per_seed if not budget["models"][model][0].startswith(("vae", "iwae"))]  # in the table's order
    curves = {**kept["curves"], **{model: divergence_curves(first_runs[model]) for model in adversarial if model in first_runs}}
    curves = {model: curves[model] for model in adversarial if model in curves}
    sanity = sanity_rows(budget["evaluation"])
    meta = {
        "budget": args.budget,
        "seeds": budget["seeds"],
        "suffix": suffix,
        "fit_overrides": budget["fit"],
        "epochs": {model: budget["models"][model][1] for model in per_seed},
        "refitted": args.models,
        "kept": sorted(set(per_seed) - set(args.models)),
        "evaluation": budget["evaluation"],
        "protocol": (
            f"{budget['evaluation']['num_samples']} samples per model against the 10k grey-level test images; nll is the IWAE bound "
            f"(k={budget['evaluation']['k']}) in nats on the model's own binarisation; parzen in nats; fid/kid/precision/recall/classes "
            "on varinf's MNIST classifier features; divergences from a fresh post-hoc discriminator."
        ),
        "commits": {model: kept["commits"][model] if model in kept["commits"] else sorted({results[(model, seed)]["commit"] for seed in budget["seeds"]}) for model in per_seed},
        "workers": args.workers,
        "threads_per_task": sorted({result["threads"] for result in results.values()}),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {'CUDA' if torch.cuda.is_available() else 'no GPU'}",
        "versions": {package: version(package) for package in ("torch", "pyro-ppl", "pytorch-lightning", "torchmetrics", "varinf")},
        "task_minutes": sum(result["fit_minutes"] + result["evaluation_minutes"] for result in results.values()),
        "minutes": (time.perf_counter() - started) / 60,
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "table": table, "per_seed": per_seed, "curves": curves, "sanity": sanity}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(table, sanity, meta))
    plot_metrics(table, sanity, RESULTS / f"elbo_vs_adversarial{suffix}_metrics.png")
    divergence_figure = RESULTS / f"elbo_vs_adversarial{suffix}_divergences.png"
    without_curves = [model for model in adversarial if model not in curves]
    if without_curves:  # kept rows from a table written before the curves were stored with it
        print(f"Keeping {divergence_figure}: the kept rows of {without_curves} have no stored divergence curves; refit them to redraw it.", flush=True)
    else:
        plot_divergence_curves(curves, divergence_figure)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
