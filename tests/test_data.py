"""The MNIST data module: files, layouts, look-up order, checks, splits and binarisation."""

import gzip
import shutil

import pytest
import scipy.stats
import torch
from conftest import idx_bytes, write_dataset

from varinf import DataError, MNISTDataModule, TensorBatches, load_mnist
from varinf.data import FILE_NAMES, DynamicBinarization


def test_official_mnist_loads_with_checksums_and_splits_55k_5k_10k(mnist_dir):
    data = MNISTDataModule(data_dir=str(mnist_dir), binarize="none")
    data.setup()
    sizes = {name: len(images) for name, (images, _) in data.splits.items()}
    assert sizes == {"train": 55_000, "val": 5_000, "test": 10_000}
    images, labels = data.splits["train"]
    assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and set(labels.unique().tolist()) == set(range(10))


def test_split_is_seeded_deterministic_and_disjoint(mnist_dir):
    first, second, other = (MNISTDataModule(binarize="none", seed=seed) for seed in (0, 0, 1))
    for data in (first, second, other):
        data.setup()
    assert torch.equal(first.splits["val"][0], second.splits["val"][0])
    assert not torch.equal(first.splits["val"][0], other.splits["val"][0])
    all_train = load_mnist()["train_images"].reshape(60_000, -1).float() / 255
    train_rows = {row.numpy().tobytes() for row in first.splits["train"][0].reshape(55_000, -1)}
    val_rows = {row.numpy().tobytes() for row in first.splits["val"][0].reshape(5_000, -1)}
    assert len(train_rows & val_rows) < 10  # MNIST holds a few exact duplicate images, nothing more
    assert len(train_rows | val_rows) == len({row.numpy().tobytes() for row in all_train})


def test_dynamic_binarisation_redraws_the_training_images_every_epoch_and_fixes_val_test():
    data = MNISTDataModule(binarize="dynamic", batch_size=256)
    data.setup()
    data.splits["train"] = (torch.full((512, 1, 28, 28), 0.3), torch.zeros(512, dtype=torch.long))
    first, second = (torch.cat([x for x, _ in data.train_dataloader()]) for _ in range(2))
    for served in (first, second):
        assert set(served.unique().tolist()) == {0.0, 1.0}
        assert served.mean().item() == pytest.approx(0.3, abs=0.01)
    assert (first != second).float().mean() > 0.3  # independent draws differ at ~42% of pixels
    val_first, val_second = (torch.cat([x for x, _ in data.val_dataloader()]) for _ in range(2))
    assert torch.equal(val_first, val_second) and set(val_first.unique().tolist()) == {0.0, 1.0}


def test_dynamic_binarisation_draws_each_pixel_from_its_bernoulli_afresh():
    """Every grey level k/255 turns on with probability k/255 (a binomial test per level over
    2,000 draws of 200 pixels each), 0 and 1 stay put, and draws are independent: two pixels of one
    level agree as often as p^2 + (1 - p)^2 says, and successive draws of one pixel likewise."""
    levels = torch.tensor([0, 1, 37, 128, 200, 254, 255])
    intensities = (levels.repeat_interleave(200) / 255).reshape(7, 200)[:, None]  # 7 images of 200 pixels
    binarization = DynamicBinarization(intensities)
    draws = torch.stack([binarization.draw().clone() for _ in range(2000)])  # (2000, 7, 1, 200)
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(draws[:, 0], torch.zeros_like(draws[:, 0])) and torch.equal(draws[:, 6], torch.ones_like(draws[:, 6]))
    for image, level in enumerate(levels.tolist()[1:6], start=1):
        p = level / 255
        successes = int(draws[:, image].sum())
        assert scipy.stats.binomtest(successes, draws[:, image].numel(), p).pvalue > 1e-4, level
        pixel_pairs = (draws[:, image, 0, 0] == draws[:, image, 0, 1]).float().mean()
        successive = (draws[1:, image, 0, 0] == draws[:-1, image, 0, 0]).float().mean()
        for agreement in (pixel_pairs, successive):
            assert agreement.item() == pytest.approx(p**2 + (1 - p) ** 2, abs=5 * 0.5 / 2000**0.5)


def test_dynamic_binarisation_is_one_uniform_per_grey_pixel_from_the_global_generator():
    """The draw is ``1[u < p]`` with ``u = torch.rand(grey pixels)`` in storage order: a seeded fit
    redraws exactly the same images whatever the implementation (the committed tables rest on it)."""
    intensities = torch.tensor([[0.0, 0.2, 1.0], [0.7, 0.0, 0.5]]).repeat(50, 1)
    grey = (intensities > 0) & (intensities < 1)
    binarization = DynamicBinarization(intensities)
    torch.manual_seed(3)
    first, second = binarization.draw().clone(), binarization.draw().clone()
    torch.manual_seed(3)
    for drawn in (first, second):
        expected = (intensities == 1).float()
        expected[grey] = (torch.rand(int(grey.sum())) < intensities[grey]).float()
        assert torch.equal(drawn, expected)


def test_shuffled_batches_keep_every_label_with_its_image():
    images, labels = torch.arange(1000.0).reshape(1000, 1, 1, 1), torch.arange(1000)
    batches = list(TensorBatches(images, labels, batch_size=64, shuffle=True, transform=lambda x: x))
    served_images, served_labels = torch.cat([x for x, _ in batches]).flatten(), torch.cat([y for _, y in batches])
    assert [len(y) for _, y in batches] == [64] * 15 + [40]
    assert torch.equal(served_images.long(), served_labels) and not torch.equal(served_labels, labels)
    assert torch.equal(served_labels.sort().values, labels)


def test_static_binarisation_is_one_seeded_draw_for_good():
    first, second = MNISTDataModule(binarize="static"), MNISTDataModule(binarize="static")
    first.setup(), second.setup()
    images = first.splits["train"][0]
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(images, second.splits["train"][0])
    served = torch.cat([x for x, _ in first.train_dataloader()])
    assert served.sum() == images.sum()  # served batches are slices of the fixed draw


def test_no_binarisation_keeps_grey_levels():
    data = MNISTDataModule(binarize="none")
    data.setup()
    x, _ = next(iter(data.train_dataloader()))
    assert ((x > 0) & (x < 1)).any() and x.min() >= 0 and x.max() <= 1


def test_batches_are_device_slices_and_dataloader_path_serves_the_same_data():
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(10)
    batches = list(TensorBatches(images, labels, batch_size=4, shuffle=False, transform=lambda x: x))
    assert [len(y) for _, y in batches] == [4, 4, 2] and torch.equal(batches[0][0], images[:4])
    data = MNISTDataModule(binarize="none", use_dataloader=True, batch_size=1000)
    data.setup()
    loader = data.train_dataloader()
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert sum(len(y) for _, y in loader) == 55_000


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
def test_reads_flat_or_torchvision_layout_gzipped_or_raw(tmp_path, mnist_dir, layout, gz):
    folder = tmp_path / "data" if layout == "flat" else tmp_path / "data" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for name in FILE_NAMES.values():
        source = mnist_dir / f"{name}.gz"
        if gz:
            shutil.copy(source, folder)
        else:
            (folder / name).write_bytes(gzip.decompress(source.read_bytes()))
    arrays = load_mnist(tmp_path / "data")
    assert arrays["train_images"].shape == (60_000, 28, 28) and arrays["test_labels"].shape == (10_000,)


def test_look_up_order_is_argument_then_environment_then_cache(tmp_path, monkeypatch):
    argument = write_dataset(tmp_path / "argument", num_train=50)
    environment = write_dataset(tmp_path / "environment", num_train=60)
    write_dataset(tmp_path / "cache" / "varinf" / "mnist", num_train=70)
    monkeypatch.setenv("VARINF_DATA_DIR", str(environment))
    assert len(load_mnist(argument, dataset="custom")["train_images"]) == 50
    assert len(load_mnist(dataset="custom")["train_images"]) == 60
    monkeypatch.delenv("VARINF_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert len(load_mnist(dataset="custom")["train_images"]) == 70


def test_other_datasets_with_the_same_files_load_without_checksums(tmp_path):
    folder = write_dataset(tmp_path / "mine", num_train=120, num_test=30)
    data = MNISTDataModule(data_dir=str(folder), dataset="my_digits", val_size=20, binarize="static")
    data.setup()
    assert [len(data.splits[name][0]) for name in ("train", "val", "test")] == [100, 20, 30]
    with pytest.raises(DataError, match="fails its checksum"):
        load_mnist(folder, dataset="mnist")


def test_missing_file_names_the_file_the_folders_and_the_fix(tmp_path):
    folder = write_dataset(tmp_path / "data")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as error:
        load_mnist(folder, dataset="custom")
    message = str(error.value)
    assert "t10k-labels-idx1-ubyte" in message and str(folder) in message and str(folder / "MNIST" / "raw") in message
    assert "VARINF_DATA_DIR" in message and "download" in message and "(needs internet)" in message


def _damaged(tmp_path, mnist_dir, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(mnist_dir, folder, ignore=shutil.ignore_patterns("*.md"))
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    return folder


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda data: data[: len(data) // 2], "corrupt or truncated"),
        (lambda data: data[:100] + bytes([data[100] ^ 0xFF]) + data[101:], "corrupt or truncated"),
        (lambda data: gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(data)[4:]), "wrong magic number"),
        (lambda data: gzip.compress(gzip.decompress(data)[:-7]), "truncated or padded"),
        (lambda data: gzip.compress(gzip.decompress(data)[:-1] + b"\x03"), "fails its checksum"),
    ],
    ids=["truncated-gzip", "flipped-byte", "wrong-magic", "short-payload", "checksum"],
)
def test_damaged_files_give_one_clear_error(tmp_path, mnist_dir, damage, problem):
    folder = _damaged(tmp_path, mnist_dir, damage)
    with pytest.raises(DataError, match=problem) as error:
        load_mnist(folder)
    assert "train-labels-idx1-ubyte" in str(error.value) and "Fix:" in str(error.value)


def test_labels_out_of_range_and_wrong_image_size_are_rejected(tmp_path):
    folder = write_dataset(tmp_path / "data")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(torch.full((120,), 12).numpy())))
    with pytest.raises(DataError, match="expected 0-9"):
        load_mnist(folder, dataset="custom")
    folder = write_dataset(tmp_path / "small", gz=False)
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(torch.zeros(30, 14, 14, dtype=torch.uint8).numpy()))
    with pytest.raises(DataError, match=r"\(28, 28\)"):
        load_mnist(folder, dataset="custom")
