"""Training across processes: Lightning's DDP with 2 CPU processes and the gloo backend, against
one process with the same global batch on the same data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, last_logged

from varinf import load_module
from varinf.cli import fit
from varinf.evaluation import datamodule_from_checkpoint, negative_elbo

QUIET = ["--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def fit_both(tmp_path: Path, recipe: str, global_batch: int, batches: int) -> tuple[Path, Path]:
    """The same recipe fitted by 2 DDP processes (each half the batch; `varinf fit` re-launched by
    Lightning for rank 1) and by one process; returns both run folders."""
    settings = [f"--config={REPO / 'recipes' / f'{recipe}.yaml'}", *QUIET, f"--trainer.limit_train_batches={batches}"]
    command = [str(Path(sys.executable).parent / "varinf"), "fit", *settings, "--trainer.strategy=ddp", "--trainer.devices=2",
               f"--data.init_args.batch_size={global_batch // 2}", f"--trainer.logger.init_args.save_dir={tmp_path / 'ddp'}"]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, timeout=600)
    fit(["fit", *settings, "--trainer.devices=1", f"--data.init_args.batch_size={global_batch}", f"--trainer.logger.init_args.save_dir={tmp_path / 'single'}"])
    return tmp_path / "ddp" / recipe / "version_0", tmp_path / "single" / recipe / "version_0"


def test_ddp_vae_matches_one_process_with_the_same_global_batch(tmp_path):
    ddp, single = fit_both(tmp_path, "vae_mnist", global_batch=128, batches=20)
    ddp_logged, single_logged = last_logged(ddp), last_logged(single)
    # each process took 20 steps on its own shard: the same 20 x 128 images per step in all
    for name in ("train/negative_elbo", "val/negative_elbo", "test/negative_elbo"):
        assert ddp_logged[name] == pytest.approx(single_logged[name], rel=0.02), name
    checkpoint = ddp / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] == 20
    # the test ELBO reduced across the 2 processes (each saw half the test set) is the one-process
    # ELBO of the checkpoint on the whole test set, up to the Monte-Carlo noise of z
    module = load_module(str(checkpoint)).eval()
    data = datamodule_from_checkpoint(str(checkpoint))
    data.setup("test")
    with torch.no_grad():
        whole = float(negative_elbo(module.objective, data.test_dataloader()))
    assert ddp_logged["test/negative_elbo"] == pytest.approx(whole, abs=0.5)


def test_ddp_gan_matches_one_process_with_the_same_global_batch(tmp_path):
    ddp, single = fit_both(tmp_path, "gan_ring", global_batch=256, batches=30)
    ddp_logged, single_logged = last_logged(ddp), last_logged(single)
    for name in ("train/D/loss", "train/G/loss"):
        assert ddp_logged[name] == pytest.approx(single_logged[name], rel=0.05), name
    stored = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert stored["global_step"] == 2 * 30  # a discriminator and a generator step per batch
