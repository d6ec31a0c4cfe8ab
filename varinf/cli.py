"""The ``varinf`` command line.

* ``varinf fit --config recipes/vae_mnist.yaml [--key value ...]``: LightningCLI; fits, then tests
  the best checkpoint. Unknown keys and wrong types are rejected with the key named.
* ``varinf evaluate --ckpt PATH [--k 5000]``: test -ELBO and importance-sampled NLL.
* ``varinf sample --ckpt PATH [--n 64] [--out grid.png]``: a PNG grid of model samples.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI

from varinf.callbacks import save_samples
from varinf.errors import ConfigError, DataError
from varinf.evaluation import append_results, evaluate_likelihood
from varinf.modules import import_class, load_module

TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "default_root_dir": "runs",
    "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "default"}},
    "enable_progress_bar": sys.stderr.isatty(),
}


class VarinfCLI(LightningCLI):
    """LightningCLI that tests the best checkpoint after fitting, and reports a bad setting found
    while building the model or data as the :class:`ConfigError` it is."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # jsonargparse wraps errors raised by constructors
            cause = error
            while cause is not None and not isinstance(cause, (ConfigError, DataError)):
                cause = cause.__cause__ or cause.__context__
            raise cause or error

    def after_fit(self) -> None:
        if self.trainer.checkpoint_callback is not None and self.trainer.checkpoint_callback.best_model_path:
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best")


def fit(argv: list[str] | None) -> VarinfCLI:
    """Run ``varinf fit`` (or another LightningCLI subcommand) and return the CLI, which holds the trained module."""
    return VarinfCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=argv,
    )


def _datamodule_from_checkpoint(checkpoint_path: str, data_dir: str | None) -> LightningDataModule:
    hparams = dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    data_class = import_class(hparams.pop("_class_path", "varinf.MNISTDataModule"))
    if data_dir is not None:
        hparams["data_dir"] = data_dir
    return data_class(**hparams)


def _check_checkpoint(parser: argparse.ArgumentParser, path: str) -> None:
    if not Path(path).is_file():
        parser.error(f"no checkpoint at {path}; `varinf fit` writes them to runs/<name>/version_N/checkpoints/")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="varinf evaluate", description="Test -ELBO and importance-sampled NLL (IWAE bound) of a checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by varinf fit")
    parser.add_argument("--k", type=int, default=5000, help="importance samples per test point (default 5000)")
    parser.add_argument("--data_dir", default=None, help="folder with the MNIST files (default: the one used for training)")
    parser.add_argument("--max_points", type=int, default=5000, help="(sample, datapoint) pairs decoded at once (default 5000: cache-friendly on a CPU; raise it on a GPU)")
    parser.add_argument("--out", default=None, help="JSON-lines file to append to (default: <run>/evaluation.jsonl)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    _check_checkpoint(parser, args.ckpt)
    module = load_module(args.ckpt, map_location=_device())
    if not hasattr(module, "objective"):
        parser.error(f"{type(module).__name__} has no explicit likelihood; `varinf evaluate` reports the ELBO and NLL of likelihood models such as VAEModule.")
    datamodule = _datamodule_from_checkpoint(args.ckpt, args.data_dir)
    datamodule.setup("test")
    datamodule.splits = {name: (x.to(module.device), y.to(module.device)) for name, (x, y) in datamodule.splits.items()}
    print(f"Evaluating {args.ckpt} on {len(datamodule.splits['test'][0])} test images, k={args.k}; {datamodule.describe_binarization()}.", flush=True)
    results = {"checkpoint": str(args.ckpt), **evaluate_likelihood(module, datamodule, args.k, args.max_points)}
    out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent.parent / "evaluation.jsonl"
    append_results(out, results)
    print(json.dumps(results, indent=2))
    print(f"Appended to {out}")


def sample(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="varinf sample", description="Write a PNG grid of samples from a checkpoint's model.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by varinf fit")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", default="samples.png", help="PNG file to write (default samples.png)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    _check_checkpoint(parser, args.ckpt)
    module = load_module(args.ckpt, map_location=_device()).eval()
    torch.manual_seed(args.seed)
    save_samples(module.generate(module.sample_latents(args.n)), Path(args.out))
    print(f"Wrote {args.n} samples to {args.out}")


COMMANDS = {"evaluate": evaluate, "sample": sample}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(args[0]) if args else None
    try:
        if command is not None:
            command(args[1:])
        else:
            fit(argv)
    except (ConfigError, DataError) as error:
        sys.exit(f"varinf: error: {error}")
