"""The ``varinf`` command line.

* ``varinf fit --config recipes/vae_mnist.yaml [--key value ...] [--resume]``: LightningCLI;
  fits, then tests the best checkpoint. Unknown keys and wrong types are rejected with the key
  named. ``--resume`` continues the recipe's latest run from its ``last.ckpt``.
* ``varinf evaluate --ckpt PATH [--metrics nll parzen fid ...]``: the evaluation suite.
* ``varinf train-classifier``: (re)train the MNIST classifier behind the sample-based metrics.
* ``varinf sample --ckpt PATH [--n 64] [--out grid.png]``: a PNG grid of model samples.
"""

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import ActionYesNo
from pytorch_lightning import Callback, LightningDataModule, LightningModule
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from varinf.callbacks import AtomicCheckpointIO, save_samples
from varinf.classifier import DEFAULT_WEIGHTS, train_classifier
from varinf.errors import ConfigError, DataError, NumericalError
from varinf.evaluation import (
    METRICS,
    append_results,
    evaluation_from_checkpoint,
    run_metrics,
    supported_metrics,
)
from varinf.modules import IMPORT_PATHS_KEY, default_device, import_class, load_module, read_checkpoint

TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "default_root_dir": "runs",
    "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "default"}},
    "enable_progress_bar": sys.stderr.isatty(),
}


class RecordImportPaths(Callback):
    """Stores the recipe folders a fit imported classes from in every checkpoint, for
    :func:`varinf.load_module`."""

    def __init__(self, folders: list[str]):
        self.folders = folders

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[IMPORT_PATHS_KEY] = self.folders


def last_checkpoint(logger) -> tuple[str, int, int]:
    """The ``last.ckpt`` of the newest run version of a recipe's logger, that version, and the
    epoch the checkpoint completed."""
    init_args = getattr(logger, "init_args", None)
    if init_args is None or not init_args.get("save_dir") or not init_args.get("name"):
        raise ConfigError("--resume finds the run by the logger's save_dir and name; give the trainer a logger with both (the recipes' CSVLogger).")
    folder = Path(init_args.save_dir) / init_args.name
    versions = sorted(
        (int(path.parent.parent.name.removeprefix("version_")), path)
        for path in folder.glob("version_*/checkpoints/last.ckpt")
        if path.parent.parent.name.removeprefix("version_").isdigit()
    )
    if not versions:
        raise ConfigError(f"--resume: there is no run to resume in {folder} (no version_*/checkpoints/last.ckpt); fit once without --resume.")
    version, path = versions[-1]
    checkpoint = read_checkpoint(path)  # refuse a damaged checkpoint here, naming it, rather than deep inside Lightning
    return str(path), version, checkpoint["epoch"]


@rank_zero_only
def keep_csv_history(logger, completed_epoch: int) -> None:
    """Lightning's CSVLogger deletes the ``metrics.csv`` of a run folder it opens again. On
    resuming, keep the rows of the epochs the checkpoint completed, so the log goes on from there
    (rows of an epoch that was cut short are dropped: that epoch runs and is logged again)."""
    if not isinstance(logger, CSVLogger):
        return
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.exists():
        return
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        keys = list(reader.fieldnames or [])
        rows = [row for row in reader if row.get("epoch") and float(row["epoch"]) <= completed_epoch]
    writer = logger.experiment  # made on first use, when it deletes the file
    with path.open("w", newline="") as file:
        history = csv.DictWriter(file, fieldnames=keys)
        history.writeheader()
        history.writerows(rows)
    writer.metrics_keys = keys  # later rows with new keys make it rewrite the file with the union header


class VarinfCLI(LightningCLI):
    """LightningCLI that tests the best checkpoint after fitting, and reports a bad setting found
    while building the model or data as the :class:`ConfigError` it is."""

    def __init__(self, *args, import_paths: list[str] = (), **kwargs):
        self.import_paths = list(import_paths)
        self.resumed_epoch: int | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--resume", action=ActionYesNo, default=False,
            help="continue the latest run of this recipe (the newest <save_dir>/<name>/version_N) from its last.ckpt, "
            "with its optimisers, schedulers, epoch and random states; logs go on in the same folder",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("resume"):
            config.ckpt_path, config.trainer.logger.init_args.version, self.resumed_epoch = last_checkpoint(config.trainer.logger)
        if config.trainer.get("strategy") == "ddp" and config.get("model") and config.model.get("class_path"):
            config.trainer.strategy = getattr(import_class(config.model.class_path), "ddp_strategy", "ddp")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # jsonargparse wraps errors raised by constructors
            cause = error
            while cause is not None and not isinstance(cause, (ConfigError, DataError)):
                cause = cause.__cause__ or cause.__context__
            if cause is None:  # a constructor failed on a value the types let through (null, say)
                root = error
                while root.__cause__ or root.__context__:
                    root = root.__cause__ or root.__context__
                raise ConfigError(f"The recipe could not be built: {type(root).__name__}: {root}. Check the values given in the recipe and on the command line (`--print_config` shows them all).") from error
            raise cause from error
        self.trainer.callbacks.append(RecordImportPaths(self.import_paths))
        self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if self.resumed_epoch is not None:
            keep_csv_history(self.trainer.logger, self.resumed_epoch)

    def before_fit(self) -> None:
        """varinf's modules step their optimisers themselves, so Lightning's automatic gradient
        clipping and accumulation do not apply: refuse them, naming what to use instead."""
        if self.model.automatic_optimization:
            return
        if self.trainer.gradient_clip_val:
            raise ConfigError(
                f"trainer.gradient_clip_val={self.trainer.gradient_clip_val} does not apply to {type(self.model).__name__}, which steps its optimisers "
                "itself. Clip with the model's grad_clip instead: `--model.init_args.grad_clip=1.0` for a VAE, "
                "`grad_clip: {discriminator: 1.0}` (per optimiser) for the adversarial modules."
            )
        if self.trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} is not supported by {type(self.model).__name__}, "
                "which steps its optimisers itself; raise the data's batch_size instead."
            )

    def after_fit(self) -> None:
        """Test the best checkpoint. With weight averaging (Lightning's ``WeightAveraging``, e.g.
        ``EMAWeightAveraging``) the checkpoint's ``state_dict`` holds the averaged weights, which
        ``evaluate`` and ``sample`` use; the callback would load the weights that trained instead,
        so it is left out of the test (and Lightning's warning that it is missing is silenced)."""
        if self.trainer.checkpoint_callback is not None and self.trainer.checkpoint_callback.best_model_path:
            self.trainer.callbacks = [callback for callback in self.trainer.callbacks if not isinstance(callback, WeightAveraging)]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
                self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def add_recipe_folders_to_path(args: list[str]) -> list[str]:
    """Put the folder of every ``--config`` recipe on the import path, so that a recipe can name
    classes from Python files beside it (a user's own guide, say) by class path; returns them."""
    folders = []
    for index, arg in enumerate(args):
        if arg.startswith("--config="):
            recipe = arg.partition("=")[2]
        elif arg == "--config" and index + 1 < len(args):
            recipe = args[index + 1]
        else:
            continue
        folders.append(str(Path(recipe).resolve().parent))
        if folders[-1] not in sys.path:
            sys.path.insert(0, folders[-1])
    return folders


def fit(argv: list[str] | None) -> VarinfCLI:
    """Run ``varinf fit`` (or another LightningCLI subcommand) and return the CLI, which holds the trained module."""
    folders = add_recipe_folders_to_path(sys.argv[1:] if argv is None else argv)
    return VarinfCLI(
        LightningModule,
        LightningDataModule,
        import_paths=folders,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def _check_checkpoint(parser: argparse.ArgumentParser, path: str) -> None:
    if not Path(path).is_file():
        parser.error(f"no checkpoint at {path}; `varinf fit` writes them to runs/<name>/version_N/checkpoints/")


def evaluate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="varinf evaluate", description=f"Evaluate a checkpoint with registered metrics ({', '.join(METRICS)}); each appends a JSON line to the run folder.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by varinf fit")
    parser.add_argument("--metrics", nargs="+", default=None, help="metrics to compute (default: every metric that applies to the model)")
    parser.add_argument("--k", type=int, default=5000, help="nll: importance samples per test point (default 5000)")
    parser.add_argument("--num_samples", type=int, default=10_000, help="model samples for the sample-based metrics (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model samples (default 0)")
    parser.add_argument("--classifier", default=None, help="MNIST classifier weights (default: the one shipped with varinf)")
    parser.add_argument("--data_dir", default=None, help="folder with the MNIST files (default: the one used for training)")
    parser.add_argument("--max_points", type=int, default=5000, help="nll: (sample, datapoint) pairs decoded at once (default 5000: cache-friendly on a CPU; raise it on a GPU)")
    parser.add_argument("--out", default=None, help="JSON-lines file to append to (default: <run>/evaluation.jsonl)")
    args = parser.parse_args(argv)
    for name in ("k", "num_samples", "max_points"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    _check_checkpoint(parser, args.ckpt)
    evaluation = evaluation_from_checkpoint(
        args.ckpt, args.data_dir, num_samples=args.num_samples, k=args.k, max_points=args.max_points, classifier_path=args.classifier, seed=args.seed
    )
    names = args.metrics or supported_metrics(evaluation)
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / "evaluation.jsonl"
    print(f"Evaluating {args.ckpt}: {', '.join(names)}.", flush=True)
    for name in names:
        (row,) = run_metrics(evaluation, [name])
        row = {"checkpoint": str(args.ckpt), **row, "num_samples": args.num_samples, "seed": args.seed}
        append_results(out, row)
        print(json.dumps(row), flush=True)
    print(f"Appended to {out}")


def train_classifier_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="varinf train-classifier", description="Train the MNIST classifier behind fid, kid, precision_recall and modes, and write its weights and checksum card.")
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS), help=f"weights file to write (default {DEFAULT_WEIGHTS}); its card goes beside it as .json")
    parser.add_argument("--data_dir", default=None, help="folder with the MNIST files (default: $VARINF_DATA_DIR)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    card = train_classifier(Path(args.out), args.data_dir, args.epochs, args.seed)
    print(json.dumps(card, indent=2))


def sample(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="varinf sample", description="Write a PNG grid of samples from a checkpoint's model.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by varinf fit")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    _check_checkpoint(parser, args.ckpt)
    module = load_module(args.ckpt, map_location=default_device()).eval()
    torch.manual_seed(args.seed)
    save_samples(module.generate(module.sample_latents(args.n)), Path(args.out))
    print(f"Wrote {args.n} samples to {args.out}")


COMMANDS = {"evaluate": evaluate, "sample": sample, "train-classifier": train_classifier_command}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(args[0]) if args else None
    try:
        if command is not None:
            command(args[1:])
        else:
            fit(argv)
    except (ConfigError, DataError, NumericalError, MisconfigurationException) as error:  # Lightning's: a bad trainer setting
        sys.exit(f"varinf: error: {error}")
