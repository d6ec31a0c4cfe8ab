"""Shared test setup: the offline MNIST folder and helpers that write IDX files."""

import csv
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parent.parent


def last_logged(run: Path) -> dict[str, float]:
    """The last logged value of every column of a run's CSV log."""
    logged = {}
    with (run / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            logged.update({name: float(value) for name, value in row.items() if value})
    return logged


class ReseedEachBatch(Callback):
    """Seeds torch with the batch index before each training batch, so a hand-written loop can
    make the same draws."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(batch_idx)
MNIST_DIR = Path(os.environ.get("VARINF_TEST_DATA_DIR", REPO.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The official MNIST files (never downloaded in tests)."""
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"The MNIST files are not in {MNIST_DIR}; set VARINF_TEST_DATA_DIR to the folder that has them.")
    return MNIST_DIR


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path, mnist_dir):
    """Every test reads MNIST from the shared folder and writes runs under its own tmp folder."""
    monkeypatch.setenv("VARINF_DATA_DIR", str(mnist_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding ``array``."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_dataset(folder: Path, num_train: int = 120, num_test: int = 30, seed: int = 0, gz: bool = True) -> Path:
    """A small random dataset with the four MNIST file names and shapes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test),
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder
