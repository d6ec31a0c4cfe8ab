"""Side work of training, kept out of the modules: image grids and per-epoch progress lines."""

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torchvision.utils import save_image


def run_dir(trainer: pl.Trainer) -> Path:
    """The folder of this run: the logger's version folder, or the trainer's root folder."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class ImageGrids(pl.Callback):
    """Writes PNG grids to ``<run>/images``: prior samples after every validation epoch, from the
    same fixed latents so that epochs are comparable, and at the end of fitting ``samples.png``
    and ``reconstructions.png`` (test images on top, their reconstructions below).

    Works with any module that has ``sample_latents(n)`` and ``generate(z)``; reconstructions
    need ``reconstruct(x)`` too.

    Args:
        num_samples: images per sample grid.
        num_reconstructions: test images to reconstruct.
        seed: seeds the fixed latents.
    """

    def __init__(self, num_samples: int = 64, num_reconstructions: int = 32, seed: int = 0):
        self.num_samples, self.num_reconstructions, self.seed = num_samples, num_reconstructions, seed
        self.fixed_latents: torch.Tensor | None = None

    def _latents(self, pl_module) -> torch.Tensor:
        if self.fixed_latents is None:
            devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                self.fixed_latents = pl_module.sample_latents(self.num_samples)
        return self.fixed_latents.to(pl_module.device)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        images = pl_module.generate(self._latents(pl_module))
        save_image(images.float().clamp(0, 1), self._path(trainer, f"samples_epoch_{trainer.current_epoch:03d}.png"), nrow=8)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        save_image(pl_module.generate(self._latents(pl_module)).float().clamp(0, 1), self._path(trainer, "samples.png"), nrow=8)
        if hasattr(pl_module, "reconstruct") and trainer.datamodule is not None:
            x = next(iter(trainer.datamodule.test_dataloader()))[0][: self.num_reconstructions].to(pl_module.device)
            grid = torch.cat([x, pl_module.reconstruct(x)]).float().clamp(0, 1)
            save_image(grid, self._path(trainer, "reconstructions.png"), nrow=8)

    @staticmethod
    def _path(trainer, name: str) -> Path:
        folder = run_dir(trainer) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name


class EpochSummary(pl.Callback):
    """Prints one line per epoch with the epoch-level metrics, when no progress bar is shown
    (for example when the output is not a terminal)."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    @rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.progress_bar_callback is not None:
            return
        by_stage: dict[str, list[str]] = {}
        for name, value in sorted(trainer.callback_metrics.items()):
            stage, _, metric = name.rpartition("/")
            if stage and not metric.endswith(("_step", "_epoch")) and value.numel() == 1:
                by_stage.setdefault(stage, []).append(f"{metric} {float(value):.2f}")
        shown = " | ".join(f"{stage}: {', '.join(values)}" for stage, values in by_stage.items())
        elapsed = time.perf_counter() - self.started
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} ({elapsed:.1f} s) | {shown}", flush=True)
