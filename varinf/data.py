"""Data modules: MNIST from the four official IDX files, read offline and verified, and a 2-D ring
of Gaussians for fast checks; both served as slices of tensors on the training device.

Where the files are looked for, in this order (the first location that is set is the one used):

1. the ``data_dir`` argument (in a recipe: ``data.init_args.data_dir``);
2. the ``VARINF_DATA_DIR`` environment variable;
3. the user cache folder, ``$XDG_CACHE_HOME/varinf/mnist`` (default ``~/.cache/varinf/mnist``).

In that folder the files may sit flat or in torchvision's ``MNIST/raw`` layout, gzipped or not.
Nothing is downloaded unless ``download=True``, which asks torchvision to fetch the files into
the chosen folder.
"""

import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from varinf.errors import ConfigError, DataError

FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# MD5 of the uncompressed official files (shared/data/mnist/README.md; torchvision lists the same).
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
}

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
Binarization = Literal["dynamic", "static", "none"]


def default_data_dir() -> Path:
    """The user cache folder searched last: ``$XDG_CACHE_HOME/varinf/mnist``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "varinf" / "mnist"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder to read: ``data_dir`` if given, else ``$VARINF_DATA_DIR``, else the cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("VARINF_DATA_DIR"):
        return Path(os.environ["VARINF_DATA_DIR"]).expanduser()
    return default_data_dir()


def _search_folders(root: Path) -> list[Path]:
    return [root, root / "MNIST" / "raw"]


def _fix_hint(root: Path) -> str:
    return (
        f"Fix: put the four IDX files ({', '.join(FILE_NAMES.values())}, gzipped or not) in {root} "
        f"or {root / 'MNIST' / 'raw'}; or point `data_dir` (or the VARINF_DATA_DIR environment "
        "variable) at the folder that holds them; or pass download=True (needs internet) to let "
        "torchvision download them."
    )


def find_file(root: Path, name: str) -> Path:
    """The path of IDX file ``name`` (raw preferred over ``.gz``) in ``root`` or ``root/MNIST/raw``."""
    candidates = [folder / (name + suffix) for folder in _search_folders(root) for suffix in ("", ".gz")]
    for path in candidates:
        if path.is_file():
            return path
    searched = ", ".join(str(folder) for folder in _search_folders(root))
    raise DataError(f"Data file '{name}' (or '{name}.gz') is missing. Searched: {searched}.\n{_fix_hint(root)}")


def read_idx(path: Path, expected_dims: int, checksum: str | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``0x0000080N``, N dimensions), gzipped or raw.

    Checks the magic number, the number of dimensions, the payload length and, if given, the MD5
    of the uncompressed bytes. Any failure raises a :class:`DataError` naming the file and the fix.
    """
    fix = (
        "Fix: replace it with a fresh copy of the official file"
        + (f" (uncompressed MD5 {checksum})" if checksum else "")
        + ", or delete it and pass download=True (needs internet)."
    )
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as error:
        raise DataError(f"Data file '{path}' is corrupt or truncated: {error}.\n{fix}") from None
    magic = 0x800 + expected_dims
    if len(raw) < 4 + 4 * expected_dims or int.from_bytes(raw[:4], "big") != magic:
        found = hex(int.from_bytes(raw[:4], "big")) if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise DataError(
            f"Data file '{path}' is not an IDX file of unsigned bytes with {expected_dims} "
            f"dimension(s): wrong magic number {found}, expected {magic:#010x}.\n{fix}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_dims))
    offset = 4 + 4 * expected_dims
    if len(raw) - offset != int(np.prod(shape)):
        raise DataError(
            f"Data file '{path}' is truncated or padded: its header promises shape {shape} "
            f"({int(np.prod(shape))} bytes of data) but it holds {len(raw) - offset}.\n{fix}"
        )
    if checksum is not None and (digest := hashlib.md5(raw).hexdigest()) != checksum:
        raise DataError(f"Data file '{path}' fails its checksum: MD5 {digest}, expected {checksum}.\n{fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


@lru_cache(maxsize=4)
def _load_cached(root: Path, dataset: str, stamps: tuple) -> dict[str, Tensor]:
    checksums = CHECKSUMS.get(dataset, {})
    arrays = {}
    for key, name in FILE_NAMES.items():
        dims = 3 if key.endswith("images") else 1
        arrays[key] = read_idx(find_file(root, name), dims, checksums.get(name))
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels):
            raise DataError(
                f"The {split} files in {root} hold {images.shape} images and {len(labels)} labels; "
                f"expected N images of {IMAGE_SHAPE} and N labels.\n{_fix_hint(root)}"
            )
        if labels.max() >= NUM_CLASSES:
            raise DataError(f"The {split} labels in {root} go up to {labels.max()}; expected 0-9.\n{_fix_hint(root)}")
    return {key: torch.from_numpy(array.copy()) for key, array in arrays.items()}


def load_mnist(data_dir: str | os.PathLike | None = None, dataset: str = "mnist", download: bool = False) -> dict[str, Tensor]:
    """The four IDX files as uint8 tensors: ``train_images`` (N, 28, 28), ``train_labels`` (N,), ...

    The files are verified on first use in a process (checksums only when ``dataset`` has them,
    i.e. ``"mnist"``); later calls reuse the verified tensors unless a file changes.
    """
    root = resolve_data_dir(data_dir)
    if download:
        _download(root, dataset)
    stamps = tuple(
        (str(path), path.stat().st_size, path.stat().st_mtime_ns)
        for path in (find_file(root, name) for name in FILE_NAMES.values())
    )
    return _load_cached(root, dataset, stamps)


def _download(root: Path, dataset: str) -> None:
    """Opt-in download through torchvision into ``root/MNIST/raw`` (skipped if the files exist)."""
    try:
        for name in FILE_NAMES.values():
            find_file(root, name)
        return
    except DataError:
        pass
    if dataset != "mnist":
        raise DataError(f"download=True only knows the official MNIST files, not dataset '{dataset}'.")
    from torchvision.datasets import MNIST

    MNIST(root=str(root), train=True, download=True)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class DynamicBinarization:
    """``x ~ Bernoulli(intensity)`` for every pixel of a fixed set of images, redrawn by :meth:`draw`.

    Pixels at 0 or 1 are certain, so only the grey ones (18% of MNIST's) take a uniform draw:
    their positions are found once, and each draw overwrites them in place in one buffer. A draw
    thus costs one uniform per grey pixel and allocates nothing (fresh buffers of this size cost
    page faults every draw), and gives every image fresh independent values, distributed as
    ``torch.bernoulli(intensities)``: ``x = 1[u < p]``, ``u ~ U[0, 1)`` drawn by ``torch.rand``'s
    generator, one per grey pixel in storage order.
    """

    def __init__(self, intensities: Tensor):
        flat = intensities.reshape(-1)
        self.intensities = intensities
        self.grey = ((flat > 0) & (flat < 1)).nonzero().squeeze(1)
        self.grey_intensities = flat[self.grey]
        self.binary = (intensities == 1).to(intensities.dtype)
        self._grey_values = torch.empty_like(self.grey_intensities)

    def draw(self) -> Tensor:
        """All the images, binarised afresh; the next draw overwrites the returned tensor."""
        grey_values = self._grey_values.uniform_().lt_(self.grey_intensities)  # u, then 1[u < p] in place
        self.binary.view(-1).index_copy_(0, self.grey, grey_values)
        return self.binary


class TensorBatches:
    """Mini-batches sliced from tensors that already live on the training device.

    Each epoch applies ``transform`` to the whole split once (a fresh binarisation, say), draws
    one permutation on the device and serves the images it picks for each batch, with slices of
    the labels permuted once, so no per-image Python runs and nothing is copied between host and
    device.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool, transform: Callable[[Tensor], Tensor]):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.transform = batch_size, shuffle, transform

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.images)
        order = torch.randperm(n, device=self.images.device) if self.shuffle else torch.arange(n, device=self.images.device)
        images, labels = self.transform(self.images), self.labels.index_select(0, order)
        for indices, batch_labels in zip(order.split(self.batch_size), labels.split(self.batch_size)):
            yield images.index_select(0, indices), batch_labels


def _identity(x: Tensor) -> Tensor:
    return x


class TensorDataModule(pl.LightningDataModule):
    """A data module whose splits are whole tensors, served as device-resident slices.

    Subclasses fill ``self.splits`` (name -> (data, labels)) in ``load_splits`` and may transform
    training batches as they are served (``train_transform``). Batches are slices of tensors on
    the training device (:class:`TensorBatches`), or come from a ``DataLoader`` for distributed
    training, which needs a ``DistributedSampler``.

    Args:
        batch_size: training batch size; ``eval_batch_size`` for validation and test.
        use_dataloader: serve batches through a ``DataLoader`` instead of device-resident tensors.
            ``None`` picks the DataLoader only when training runs in more than one process.
    """

    data_shape: tuple[int, ...]
    """The shape of one datapoint; a module built for another shape refuses the data (``GenerativeModule.setup``)."""
    value_range: tuple[float, float] | None = None
    """The interval every datapoint lies in (checked by ``setup``), or None."""

    def __init__(self, batch_size: int, eval_batch_size: int, use_dataloader: bool | None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not is_positive_int(value):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        self.batch_size, self.eval_batch_size, self.use_dataloader = batch_size, eval_batch_size, use_dataloader
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def train_transform(self, x: Tensor) -> Tensor:
        """Applied to the training images each time they are served: to the whole split once per
        epoch, or to each batch from a ``DataLoader``. It must act on each image independently."""
        return x

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            splits = self.load_splits()
            for name, (data, _) in splits.items():
                self.check_values(name, data)
            self.splits = {name: (x.to(self.device), y.to(self.device)) for name, (x, y) in splits.items()}

    def check_values(self, split: str, data: Tensor) -> None:
        """Refuse non-finite data, and data outside ``value_range``, naming the split."""
        if not torch.isfinite(data).all():
            raise DataError(f"The {split} split of {type(self).__name__} holds NaN or inf values; clean the data (or its transform) first.")
        if self.value_range is not None:
            low, high = self.value_range
            if data.min() < low or data.max() > high:
                raise DataError(
                    f"The {split} split of {type(self).__name__} has values in [{data.min():.4g}, {data.max():.4g}], outside [{low}, {high}] "
                    "after its transform; rescale the data (images as intensities in [0, 1])."
                )

    @property
    def device(self) -> torch.device:
        """The training device when attached to a Trainer that serves device-resident batches."""
        if self.trainer is None or self._serves_dataloader():
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def _serves_dataloader(self) -> bool:
        if self.use_dataloader is not None:
            return self.use_dataloader
        return self.trainer is not None and self.trainer.world_size > 1

    def _batches(self, split: str, batch_size: int, train: bool):
        data, labels = self.splits[split]
        transform = self.train_transform if train else _identity
        if self._serves_dataloader():
            def collate(items):
                x, y = torch.utils.data.default_collate(items)
                return transform(x), y

            return DataLoader(TensorDataset(data, labels), batch_size=batch_size, shuffle=train, collate_fn=collate)
        return TensorBatches(data, labels, batch_size, shuffle=train, transform=transform)

    def train_dataloader(self):
        return self._batches("train", self.batch_size, train=True)

    def val_dataloader(self):
        return self._batches("val", self.eval_batch_size, train=False)

    def test_dataloader(self):
        return self._batches("test", self.eval_batch_size, train=False)


class MNISTDataModule(TensorDataModule):
    """MNIST (or any dataset with the same four IDX files) as a 55k/5k/10k train/val/test split.

    Args:
        data_dir: folder with the IDX files; ``None`` looks at ``$VARINF_DATA_DIR``, then the cache.
        dataset: ``"mnist"`` enforces the official MD5 checksums; any other name only checks the format.
        binarize: ``dynamic`` draws ``x ~ Bernoulli(intensity)`` afresh every time a training image
            is served, i.e. every epoch (:class:`DynamicBinarization`; the standard for reported
            likelihoods; the validation and test sets get one
            draw, seeded by ``seed``, so that their metrics are comparable across epochs and runs);
            ``static`` makes one seeded draw for every split, fixed for good; ``none`` keeps the
            intensities in [0, 1].
        val_size: images held out of the 60k training files for validation.
        seed: seeds the train/val split and the fixed binarisation draws.
        download: fetch the official files through torchvision if they are missing (needs internet).
        batch_size, eval_batch_size, use_dataloader: see :class:`TensorDataModule`.
    """

    value_range = (0.0, 1.0)

    data_shape = (1, *IMAGE_SHAPE)

    def __init__(
        self,
        data_dir: str | None = None,
        dataset: str = "mnist",
        binarize: Binarization = "dynamic",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        seed: int = 0,
        download: bool = False,
        use_dataloader: bool | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, use_dataloader)
        if binarize not in ("dynamic", "static", "none"):
            raise ConfigError(f"binarize must be 'dynamic', 'static' or 'none', got {binarize!r}.")
        if not is_positive_int(val_size) or not isinstance(seed, int):
            raise ConfigError(f"val_size must be a positive integer and seed an integer, got val_size={val_size!r}, seed={seed!r}.")
        self.save_hyperparameters()
        self.data_dir, self.dataset, self.binarize = data_dir, dataset, binarize
        self.val_size, self.seed, self.download = val_size, seed, download
        self._binarization: DynamicBinarization | None = None

    def prepare_data(self) -> None:
        if self.download:
            load_mnist(self.data_dir, self.dataset, download=True)

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        arrays = load_mnist(self.data_dir, self.dataset)
        generator = torch.Generator().manual_seed(self.seed)
        train_images = arrays["train_images"].unsqueeze(1).float() / 255
        test_images = arrays["test_images"].unsqueeze(1).float() / 255
        if not 0 < self.val_size < len(train_images):
            raise ConfigError(f"val_size must be between 1 and {len(train_images) - 1}, got {self.val_size}.")
        order = torch.randperm(len(train_images), generator=generator)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        splits = {
            "train": (train_images[train_idx], arrays["train_labels"][train_idx]),
            "val": (train_images[val_idx], arrays["train_labels"][val_idx]),
            "test": (test_images, arrays["test_labels"]),
        }
        for name, (images, labels) in splits.items():
            if self.binarize == "static" or (self.binarize == "dynamic" and name != "train"):
                images = torch.bernoulli(images, generator=generator)
            splits[name] = (images, labels.long())
        return splits

    def train_transform(self, x: Tensor) -> Tensor:
        if self.binarize != "dynamic":
            return x
        if self._binarization is None or self._binarization.intensities is not x:
            self._binarization = DynamicBinarization(x)
        return self._binarization.draw()

    def describe_binarization(self) -> str:
        """One line naming the binarisation, for reports."""
        return {
            "dynamic": f"dynamic binarisation (training images redrawn every epoch; val/test drawn once, seed {self.seed})",
            "static": f"static binarisation (one Bernoulli draw, seed {self.seed})",
            "none": "no binarisation (grey levels in [0, 1])",
        }[self.binarize]


class RingDataModule(TensorDataModule):
    """A ring of Gaussians in 2-D: ``num_modes`` means equally spaced on a circle of ``radius``, each
    with covariance ``std^2 I`` (Metz et al. 2017). A fast check of mode coverage; labels are
    the mode indices.

    Args:
        num_modes, radius, std: the mixture.
        sizes: number of points in the train, val and test splits.
        seed: seeds the draws.
        batch_size, eval_batch_size, use_dataloader: see :class:`TensorDataModule`.
    """

    data_shape = (2,)

    def __init__(
        self,
        num_modes: int = 8,
        radius: float = 2.0,
        std: float = 0.02,
        sizes: tuple[int, int, int] = (50_000, 5_000, 5_000),
        seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int = 5000,
        use_dataloader: bool | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, use_dataloader)
        self.save_hyperparameters()
        self.num_modes, self.radius, self.std, self.sizes, self.seed = num_modes, radius, std, tuple(sizes), seed

    def centers(self) -> Tensor:
        """The mode means, shape ``(num_modes, 2)``."""
        angles = 2 * math.pi * torch.arange(self.num_modes) / self.num_modes
        return self.radius * torch.stack([angles.cos(), angles.sin()], 1)

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        splits = {}
        for name, size in zip(("train", "val", "test"), self.sizes):
            modes = torch.randint(self.num_modes, (size,), generator=generator)
            splits[name] = (self.centers()[modes] + self.std * torch.randn(size, 2, generator=generator), modes)
        return splits
