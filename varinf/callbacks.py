"""Side work of training, kept out of the modules: image grids, per-epoch progress lines and
atomic checkpoint writing."""

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import save_image

from varinf.metrics import mode_coverage
from varinf.seeding import seeded


def save_samples(samples: torch.Tensor, path: Path, reference: torch.Tensor | None = None) -> None:
    """A PNG of samples: an image grid for image batches, a scatter plot (over ``reference``
    points, if given) for 2-D points."""
    samples = samples.detach().float().cpu()
    if samples.dim() == 2 and samples.shape[1] == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(4, 4))
        if reference is not None:
            reference = reference.detach().float().cpu()
            axes.scatter(reference[:, 0], reference[:, 1], s=3, c="tab:orange", label="data")
        axes.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", alpha=0.5, label="model")
        axes.set_aspect("equal")
        axes.legend(loc="upper right", fontsize="small")
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
    else:
        save_image(samples.clamp(0, 1), path, nrow=round(len(samples) ** 0.5))


def run_dir(trainer: pl.Trainer) -> Path:
    """The folder of this run: the logger's version folder, or the trainer's root folder. Read from
    the logger, not ``trainer.log_dir``, which is a collective call under DDP and would hang code
    that runs on rank 0 only."""
    log_dir = getattr(trainer.logger, "log_dir", None)
    return Path(log_dir or trainer.default_root_dir)


class ImageGrids(pl.Callback):
    """Writes PNGs to ``<run>/images``: model samples after every validation epoch, from the
    same fixed latents so that epochs are comparable, and at the end of fitting ``samples.png``
    and ``reconstructions.png`` (test images on top, their reconstructions below).

    Works with any :class:`~varinf.modules.GenerativeModule`; reconstructions need an encoder
    (``guide``). For 2-D data it draws scatter plots of samples over the validation data instead.

    Args:
        num_samples: images per sample grid.
        num_reconstructions: test images to reconstruct.
        num_points: samples per scatter plot, for 2-D data.
        seed: seeds the fixed latents.
    """

    def __init__(self, num_samples: int = 100, num_reconstructions: int = 32, num_points: int = 2000, seed: int = 0):
        self.num_samples, self.num_reconstructions, self.num_points, self.seed = num_samples, num_reconstructions, num_points, seed
        self.fixed_latents: torch.Tensor | None = None

    def _samples(self, pl_module) -> torch.Tensor:
        if self.fixed_latents is None:
            points = len(pl_module.model.data_shape) == 1
            with seeded(self.seed, pl_module.device):
                self.fixed_latents = pl_module.sample_latents(self.num_points if points else self.num_samples)
        return pl_module.generate(self.fixed_latents.to(pl_module.device))

    def _save(self, trainer, pl_module, name: str) -> None:
        reference = trainer.datamodule.splits["val"][0][: self.num_points] if trainer.datamodule is not None else None
        save_samples(self._samples(pl_module), self._path(trainer, name), reference)

    @rank_zero_only
    def on_validation_epoch_start(self, trainer, pl_module):
        """Drawn as validation starts, in evaluation mode: with weight averaging (Lightning's
        ``WeightAveraging``, listed before this callback) the module then holds the averaged
        weights, which validation and the checkpoint see; it swaps them back at the epoch's end."""
        if not trainer.sanity_checking:
            self._save(trainer, pl_module, f"samples_epoch_{trainer.current_epoch:03d}.png")

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        """The final grids, drawn in evaluation mode (no dropout, batch norm's running statistics),
        as the checkpoint is evaluated; Lightning has put the module back in training mode."""
        pl_module.eval()
        try:
            self._save(trainer, pl_module, "samples.png")
            if hasattr(pl_module, "guide") and len(pl_module.model.data_shape) == 3 and trainer.datamodule is not None:
                x = next(iter(trainer.datamodule.test_dataloader()))[0][: self.num_reconstructions].to(pl_module.device)
                save_samples(torch.cat([x, pl_module.reconstruct(x)]), self._path(trainer, "reconstructions.png"))
        finally:
            pl_module.train()

    @staticmethod
    def _path(trainer, name: str) -> Path:
        folder = run_dir(trainer) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name


class ModeCoverage(pl.Callback):
    """Logs ``val/modes_covered`` and ``val/high_quality`` (:func:`varinf.metrics.mode_coverage`)
    of ``num_samples`` model samples after every validation epoch, for data modules that know
    their mode ``centers()`` and ``std`` (the ring of Gaussians)."""

    def __init__(self, num_samples: int = 10_000, seed: int = 0):
        self.num_samples, self.seed = num_samples, seed

    def on_validation_epoch_end(self, trainer, pl_module):
        data = trainer.datamodule
        if trainer.sanity_checking or not hasattr(data, "centers"):
            return
        with seeded(self.seed, pl_module.device):
            samples = pl_module.generate(pl_module.sample_latents(self.num_samples))
        for name, value in mode_coverage(samples, data.centers(), data.std).items():
            pl_module.log(f"val/{name}", value)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, flushes it to disk, then
    renames it over the target (``os.replace``, atomic on POSIX and Windows): a checkpoint on disk
    is always whole, whenever the process dies. Lightning's own save stages the file in the system
    temporary folder, and a move across filesystems is a copy, which a kill can cut short."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
