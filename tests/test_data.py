"""Datasets from their on-disk formats, vectorized augmentation, and the (x, y, idx) loaders."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import spfde.data.datasets as dsmod
import spfde.data.fetch as fetchmod
from spfde.config import DataConfig
from spfde.data import (
    ArrayDataset,
    EpochShuffleSampler,
    ImageFolderDataset,
    TensorLoader,
    TorchLoader,
    ensure_fashion_mnist,
    load_datasets,
    make_eval_loader,
    make_train_loader,
    normalize,
    parse_idx,
    random_crop,
    random_flip,
    read_idx,
    stratified_subset,
)
from spfde.errors import SpfdeError
from spfde.utils import make_generator

# --------------------------------------------------------------------------------------------
# helpers writing the official formats


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_fmnist(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(1, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(1, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, fname in dsmod.FASHION_MNIST_FILES.items():
        (folder / fname).write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return arrays


def write_cifar(root: Path, name: str, sizes: dict[str, int], seed: int = 0) -> dict[str, dict]:
    """A folder in the official python-pickle layout (bytes keys, uint8 N x 3072 R/G/B planes)."""
    rng = np.random.default_rng(seed)
    spec = dsmod._CIFAR[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    out = {}
    for fname, n in sizes.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        if name == "cifar10":
            batch[b"labels"] = [int(v) for v in rng.integers(0, 10, n)]
        else:
            batch[b"fine_labels"] = [int(v) for v in rng.integers(0, 100, n)]
            batch[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
        (folder / fname).write_bytes(pickle.dumps(batch, protocol=2))
        out[fname] = batch
    if name == "cifar10":
        meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 4}
    else:
        meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}
    (folder / spec["meta"]).write_bytes(pickle.dumps(meta, protocol=2))
    return out


def tiny_dataset(n: int = 20, c: int = 3, hw: int = 8, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 5
    return ArrayDataset(images, labels, (0.5,) * c, (0.25,) * c)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST / idx


def test_idx_roundtrip_gz_and_plain(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "a").write_bytes(idx_bytes(a))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "a"), a)
    b = np.array([1, -2, 70000], dtype=">i4")  # big-endian multi-byte values
    assert parse_idx(idx_bytes(b)).tolist() == [1, -2, 70000]


def test_idx_bad_magic_and_truncation(tmp_path):
    good = idx_bytes(np.zeros((3, 2), dtype=np.uint8))
    with pytest.raises(SpfdeError, match="magic"):
        parse_idx(b"\x1f\x00" + good[2:])
    with pytest.raises(SpfdeError, match="truncated"):
        parse_idx(good[:-1])
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    with pytest.raises(SpfdeError, match="not an idx file"):
        read_idx(tmp_path / "bad.gz")


def test_fashion_mnist_tiny_folder_options(tmp_path):
    arrays = write_fmnist(tmp_path / "fm")
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), pad_to_32=True, channels=3, subset=5,
                     test_subset=4)
    train, test, info = load_datasets(cfg)
    assert (len(train), len(test)) == (5, 4)
    assert train.images.shape == (5, 3, 32, 32) and train.images.dtype == torch.uint8
    assert (info.in_channels, info.image_size, info.num_classes) == (3, 32, 10)
    # content sits in the middle, the 2-pixel border is zero, channels are copies
    keep = stratified_subset(torch.from_numpy(arrays["train_labels"].astype(np.int64)), 5, 0)
    assert torch.equal(train.images[:, 0, 2:30, 2:30], torch.from_numpy(arrays["train_images"][keep.numpy()]))
    assert int(train.images[:, :, :2].sum()) == 0 and int(train.images[:, :, :, 30:].sum()) == 0
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    assert train.labels.tolist() == arrays["train_labels"][keep.numpy()].tolist()
    # statistics come from the full (padded) training set
    full = torch.nn.functional.pad(torch.from_numpy(arrays["train_images"]).float() / 255, (2, 2, 2, 2))
    assert info.mean[0] == pytest.approx(float(full.mean()), abs=1e-6)
    assert info.std[0] == pytest.approx(float(full.std(unbiased=False)), abs=1e-6)
    # the folder itself or a parent holding fashion-mnist/ both work as root
    write_fmnist(tmp_path / "parent" / "fashion-mnist")
    assert dsmod.find_fashion_mnist(tmp_path / "fm") == tmp_path / "fm"
    assert dsmod.find_fashion_mnist(tmp_path / "parent") == tmp_path / "parent" / "fashion-mnist"


def _no_fmnist_anywhere(monkeypatch, tmp_path):
    monkeypatch.setenv("SPFDE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dsmod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")


def test_fashion_mnist_files_that_cannot_train_are_refused(tmp_path):
    """An empty split, splits of different image shapes and non-8-bit pixels each get one error
    naming the problem (they used to fail deep inside, report 0% or train on zeros)."""
    def write(folder: Path, **arrays: np.ndarray) -> Path:
        write_fmnist(folder)
        for key, arr in arrays.items():
            data = idx_bytes(arr) if arr.dtype != np.dtype(">f4") else (
                bytes([0, 0, 0x0D, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())
            (folder / dsmod.FASHION_MNIST_FILES[key]).write_bytes(gzip.compress(data))
        return folder

    empty = np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8)
    cases = [
        (dict(train_images=empty[0], train_labels=empty[1]), "train set .* is empty"),
        (dict(test_images=empty[0], test_labels=empty[1]), "test set .* is empty"),
        (dict(test_images=np.ones((6, 20, 20), np.uint8)),
         r"train images are \(1, 28, 28\).*test images \(1, 20, 20\)"),
        (dict(train_images=np.full((12, 28, 28), 0.5, ">f4")), "hold >f4 values; .* uint8"),
    ]
    for i, (arrays, message) in enumerate(cases):
        folder = write(tmp_path / f"case{i}", **arrays)
        with pytest.raises(SpfdeError, match=message):
            dsmod.load_fashion_mnist(folder)


def test_fashion_mnist_missing_says_how_to_get_it(monkeypatch, tmp_path):
    _no_fmnist_anywhere(monkeypatch, tmp_path)
    with pytest.raises(SpfdeError) as e:
        ensure_fashion_mnist(None, allow_apt=False, allow_download=False)
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg and "SPFDE_DATA" in msg and "http" in msg
    with pytest.raises(SpfdeError, match="dataset-fashion-mnist"):
        load_datasets(DataConfig(name="fashion_mnist"))


def test_spfde_data_reads_the_files_it_reports_present(tmp_path):
    """`spfde data fashion_mnist` said "fashion_mnist: DIR" for a folder whose four files exist but
    one is cut short (an interrupted copy); the first `spfde train` then failed on it."""
    from helpers import run_main

    folder = tmp_path / "fm"
    write_fmnist(folder)
    code, out, err = run_main("data", "fashion_mnist", "--root", str(folder))
    assert code == 0 and out.strip() == f"fashion_mnist: {folder}", err
    images = folder / dsmod.FASHION_MNIST_FILES["test_images"]
    images.write_bytes(images.read_bytes()[:-40])
    code, out, err = run_main("data", "fashion_mnist", "--root", str(folder))
    assert code == 1 and not out and "Traceback" not in err, (out, err)
    assert err.startswith(f"error: {str(images)!r} is a broken gzip file") and len(err.splitlines()) == 1, err
    images.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8))))  # 5 images, 6 labels
    with pytest.raises(SpfdeError, match="do not fit together: test images"):
        ensure_fashion_mnist(str(folder), allow_apt=False, allow_download=False)


def test_fashion_mnist_download_falls_back_to_second_mirror(monkeypatch, tmp_path):
    """The download path with a fake urlopen (no network): the first mirror fails, the second
    serves the files; they land in $SPFDE_DATA/fashion-mnist and load."""
    _no_fmnist_anywhere(monkeypatch, tmp_path)
    src = tmp_path / "mirror"
    write_fmnist(src, n_train=7, n_test=3)
    monkeypatch.setattr(fetchmod, "_EXPECTED_N", {"train_images": 7, "train_labels": 7, "test_images": 3,
                                                  "test_labels": 3})
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        if url.startswith(fetchmod.MIRRORS[0]):
            raise OSError("mirror down")
        return io.BytesIO((src / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(fetchmod.urllib.request, "urlopen", fake_urlopen)
    path = ensure_fashion_mnist(None, allow_apt=False)
    assert path == tmp_path / "data" / "fashion-mnist"
    assert len(calls) == 8 and not list(path.glob(".*tmp"))
    train, test, _ = load_datasets(DataConfig(name="fashion_mnist"))
    assert (len(train), len(test)) == (7, 3)


def test_fashion_mnist_download_on_a_full_disk_names_the_flag_that_moves_it(monkeypatch, tmp_path):
    import spfde.utils

    src = tmp_path / "mirror"
    write_fmnist(src, n_train=7, n_test=3)
    monkeypatch.setattr(fetchmod, "_EXPECTED_N", {"train_images": 7, "train_labels": 7, "test_images": 3,
                                                  "test_labels": 3})
    monkeypatch.setattr(fetchmod.urllib.request, "urlopen",
                        lambda url, timeout=None: io.BytesIO((src / url.rsplit("/", 1)[1]).read_bytes()))

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spfde.utils.os, "fsync", full)
    dest = tmp_path / "dest"
    with pytest.raises(SpfdeError) as e:
        ensure_fashion_mnist(str(dest), allow_apt=False)
    first = dest / next(iter(dsmod.FASHION_MNIST_FILES.values()))
    assert str(e.value) == (f"could not write {str(first)!r}: no space left on device (free space or point "
                            "`spfde data --root` or data.root at another disk); no partial file is left in its place")
    assert not list(dest.iterdir())


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist absent")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("SPFDE_DATA", raising=False)
    train, test, info = load_datasets(DataConfig(name="fashion_mnist", root="/usr/share/datasets/fashion-mnist"))
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert 0.2 < info.mean[0] < 0.4 and info.class_names[9] == "Ankle boot"


# --------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_pickles(tmp_path):
    sizes = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    batches = write_cifar(tmp_path, "cifar10", sizes)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train, test, info = load_datasets(DataConfig(name="cifar10", root=str(root)))
        assert (len(train), len(test)) == (15, 4)
        assert train.images.shape == (15, 3, 32, 32) and info.num_classes == 10
    assert info.class_names == [f"c{i}" for i in range(10)]
    # sample 4 is batch 2's second row: red plane first, row-major
    row = batches["data_batch_2"][b"data"][1]
    assert int(train.images[4, 0, 0, 5]) == row[5] and int(train.images[4, 1, 2, 3]) == row[1024 + 2 * 32 + 3]
    assert int(train.images[4, 2, 31, 31]) == row[3071]
    assert train.labels[4].item() == batches["data_batch_2"][b"labels"][1]
    assert test.labels.tolist() == batches["test_batch"][b"labels"]


def test_cifar100_fine_labels(tmp_path):
    batches = write_cifar(tmp_path, "cifar100", {"train": 6, "test": 2})
    train, test, info = load_datasets(DataConfig(name="cifar100", root=str(tmp_path), channels=1))
    assert info.num_classes == 100 and info.class_names[7] == "f7" and info.in_channels == 1
    assert train.labels.tolist() == batches["train"][b"fine_labels"]
    assert train.images.shape == (6, 1, 32, 32)


def test_cifar_errors(tmp_path):
    with pytest.raises(SpfdeError, match="cifar-10-python.tar.gz"):
        load_datasets(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")))
    write_cifar(tmp_path, "cifar10", {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 2})
    folder = tmp_path / "cifar-10-batches-py"
    good = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])
    with pytest.raises(SpfdeError, match="data_batch_3.*not a CIFAR python pickle"):
        load_datasets(DataConfig(name="cifar10", root=str(folder)))
    (folder / "data_batch_3").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(SpfdeError, match="not a CIFAR"):
        load_datasets(DataConfig(name="cifar10", root=str(folder)))
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(SpfdeError, match="refusing"):
        load_datasets(DataConfig(name="cifar10", root=str(folder)))
    assert not marker.exists()
    (folder / "data_batch_3").write_bytes(good)
    (folder / "data_batch_5").unlink()
    with pytest.raises(SpfdeError, match="lacks 'data_batch_5'"):
        load_datasets(DataConfig(name="cifar10", root=str(folder)))


@pytest.mark.parametrize("labels, message", [
    ([1, "x"], "must hold integer class indices, found 'x'"),
    ([1, 2.5], "must hold integer class indices, found 2.5"),  # a cast would make it class 2 in silence
    (np.ones((2, 2), np.int64), r"must be a list of integer class indices, got an array of shape \(2, 2\)"),
    (5, "must be a list of integer class indices, got one value"),
    ([True, False], "must hold integer class indices, found True"),
], ids=["text", "fraction", "table", "scalar", "bools"])
def test_cifar_labels_that_are_not_class_indices_are_one_error(tmp_path, labels, message):
    write_cifar(tmp_path, "cifar10", {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 2})
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes())
    batch[b"labels"] = labels
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(SpfdeError, match=f"data_batch_2' is not a CIFAR batch: 'labels' {message}"):
        load_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    # whole numbers stored as floats are the same classes; numpy scalars (a converted archive) too
    for good in ([3.0, 7.0], [np.int64(3), 7], [np.float32(3.0), np.uint8(7)], np.array([3, 7], np.int32)):
        batch[b"labels"] = good
        path.write_bytes(pickle.dumps(batch, protocol=2))
        train, _, _ = load_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
        assert train.labels[2:4].tolist() == [3, 7] and train.labels.dtype == torch.int64


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------------------------
# ImageFolder, digits, synthetic


def test_image_folder_eager_and_streaming(tmp_path):
    from PIL import Image

    colors = {"cat": (250, 10, 10), "dog": (10, 250, 10)}
    for split, n in (("train", 3), ("val", 1)):
        for cls, color in colors.items():
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12 + i, 9), color).save(d / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8)
    train, test, info = load_datasets(cfg)
    assert info.class_names == ["cat", "dog"] and info.num_classes == 2 and info.image_size == 8
    assert train.images.shape == (6, 3, 8, 8) and test.images.shape == (2, 3, 8, 8)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 1]
    assert train.images[0, :, 4, 4].tolist() == [250, 10, 10]  # solid colour survives resize/crop
    lazy_train, lazy_test, lazy_info = load_datasets(DataConfig(name="imagefolder", root=str(tmp_path),
                                                                image_size=8, loader="torch"))
    assert isinstance(lazy_train, ImageFolderDataset) and lazy_info == info
    for k in range(len(test)):
        assert torch.equal(lazy_test[k][0], test[k][0]) and lazy_test[k][1:] == test[k][1:]
    with pytest.raises(SpfdeError, match="data.loader=torch"):
        TensorLoader(lazy_train, 2)
    with pytest.raises(SpfdeError, match="data.root"):
        load_datasets(DataConfig(name="imagefolder"))


def test_digits_split_and_upsampling():
    train, test, info = load_datasets(DataConfig(name="digits"))
    assert (len(train), len(test)) == (1500, 297) and train.images.shape[1:] == (1, 8, 8)
    big, big_test, big_info = load_datasets(DataConfig(name="digits", pad_to_32=True, channels=3))
    assert big.images.shape[1:] == (3, 32, 32) and big_info.image_size == 32
    # nearest 4x upsampling: every 4x4 block is one original pixel
    assert torch.equal(big.images[:, 0, ::4, ::4], train.images[:, 0]) and torch.equal(big.labels, train.labels)
    assert set(train.labels.tolist()) == set(range(10)) and int(train.images.max()) == 255
    from spfde.data import load_digits

    padded, _, _ = load_digits(pad_to_32=True, resize="pad")
    assert torch.equal(padded.images[:, :, 12:20, 12:20], train.images) and int(padded.images[:, :, :12].sum()) == 0


def test_synthetic_deterministic_and_learnable():
    cfg = DataConfig(name="synthetic", synthetic_size=200, synthetic_classes=4, image_size=12, channels=2)
    a_train, a_test, info = load_datasets(cfg, seed=3)
    b_train, _, _ = load_datasets(cfg, seed=3)
    c_train, _, _ = load_datasets(cfg, seed=4)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert a_train.images.shape == (200, 2, 12, 12) and info.num_classes == 4
    assert torch.bincount(a_train.labels).tolist() == [50] * 4
    # a nearest-class-mean classifier already separates the classes on the test split
    xtr, xte = a_train.images.flatten(1).float(), a_test.images.flatten(1).float()
    means = torch.stack([xtr[a_train.labels == k].mean(0) for k in range(4)])
    pred = torch.cdist(xte, means).argmin(1)
    assert (pred == a_test.labels).float().mean() > 0.9


def test_subset_is_seeded_stratified_and_keeps_training_options():
    cfg = DataConfig(name="synthetic", synthetic_size=64, subset=10, test_subset=5, augment=True, crop_padding=2)
    full, full_test, _ = load_datasets(DataConfig(name="synthetic", synthetic_size=64))
    train, test, _ = load_datasets(cfg)
    assert (len(train), len(test)) == (10, 5)
    assert train.augment and train.padding == 2 and not test.augment
    # every kept sample is a sample of the full set, once, with its label
    keep = stratified_subset(full.labels, 10, 0)
    assert torch.equal(train.images, full.images[keep]) and torch.equal(train.labels, full.labels[keep])
    assert len(set(keep.tolist())) == 10 and keep.tolist() == sorted(keep.tolist())
    assert torch.equal(train.images, load_datasets(cfg)[0].images)  # same seed, same subset
    other, _, _ = load_datasets(cfg, seed=1)
    assert not torch.equal(other.images, train.images)  # the subset is drawn from the run's seed


@pytest.mark.parametrize("n", [1, 2, 3, 7, 30, 57])
def test_stratified_subset_keeps_class_proportions(n):
    labels = torch.arange(58) // 20  # class-sorted, as an ImageFolder: 20, 20, 18 images
    counts = torch.bincount(labels, minlength=3).double()
    keep = stratified_subset(labels, n, seed=5)
    got = torch.bincount(labels[keep], minlength=3).double()
    assert int(got.sum()) == n and len(set(keep.tolist())) == n
    assert ((got - counts * n / 58).abs() < 1.0).all()  # each class within one sample of its share
    # ties in the rounding are broken at random, not always towards the first classes
    firsts = {int(labels[stratified_subset(labels, 1, seed=s)][0]) for s in range(12)}
    assert len(firsts) > 1


def test_image_folder_subset_is_not_one_class(tmp_path):
    """The issue's case: 30 of a class-sorted ImageFolder gave 24 images of one class."""
    from PIL import Image

    for cls, n in (("a", 24), ("b", 20), ("c", 14)):
        for split in ("train", "val"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n if split == "train" else 1):
                Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(d / f"{i}.png")
    for loader in ("tensor", "torch"):
        train, _, _ = load_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, subset=30,
                                               loader=loader))
        assert torch.bincount(train.labels, minlength=3).tolist() == [13, 10, 7], loader  # 12.4, 10.3, 7.2


# --------------------------------------------------------------------------------------------
# augmentation


def test_random_crop_shapes_and_windows():
    x = torch.randint(0, 256, (16, 3, 6, 7), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop(x, 0, g), x)  # padding 0 keeps the content
    out = random_crop(x, 2, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(16):  # each output is exactly one 6x7 window of the padded image
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])]
        assert hits
        offsets.add(hits[0])
    assert len(offsets) > 3  # offsets differ per sample
    xf = x.float()
    assert random_crop(xf, 1, torch.Generator().manual_seed(1)).dtype == torch.float32


def test_random_flip_per_sample():
    x = torch.randn(64, 2, 4, 5)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54


def test_fused_augment_equals_crop_then_flip():
    from spfde.data import augment_batch

    x = torch.randint(0, 256, (32, 3, 5, 6), dtype=torch.uint8)
    for padding, flip in ((3, True), (0, True), (2, False), (0, False)):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        ref = random_crop(x, padding, g1)
        ref = random_flip(ref, g1) if flip else ref
        assert torch.equal(augment_batch(x, g2, padding, flip), ref)


def test_normalize_matches_formula():
    x = torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8)
    out = normalize(x, (0.5, 0.25), (0.2, 0.4))
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 1], (x[:, 1].float() / 255 - 0.25) / 0.4)


# --------------------------------------------------------------------------------------------
# loaders


def collect(loader):
    return [tuple(t.clone() for t in b) for b in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p, q) for ba, bb in zip(a, b, strict=True)
                                    for p, q in zip(ba, bb, strict=True))


def test_tensor_loader_batches_and_determinism():
    ds = tiny_dataset(23)
    loader = TensorLoader(ds, 5, shuffle=True, augment=True, padding=2, seed=7)
    assert len(loader) == 5 and len(TensorLoader(ds, 5, drop_last=True)) == 4
    loader.set_epoch(3)
    a = collect(loader)
    x, y, idx = a[0]
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == idx.dtype == torch.int64
    seen = torch.cat([b[2] for b in a])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    assert all(torch.equal(b[1], ds.labels[b[2]]) for b in a)
    other = TensorLoader(ds, 5, shuffle=True, augment=True, padding=2, seed=7)
    other.set_epoch(3)
    assert same_batches(a, collect(other))
    loader.set_epoch(4)
    b = collect(loader)
    assert not torch.equal(torch.cat([t[2] for t in a]), torch.cat([t[2] for t in b]))
    # the loader's state is its epoch: a restored loader replays the same batches
    restored = TensorLoader(ds, 5, shuffle=True, augment=True, padding=2, seed=7)
    restored.load_state_dict(loader.state_dict())
    assert same_batches(b, collect(restored))
    # same samples in the same order, different epoch: the augmentation differs too
    fixed = TensorLoader(ds, 23, augment=True, padding=2, seed=7)
    fixed.set_epoch(0)
    x0 = collect(fixed)[0][0]
    fixed.set_epoch(1)
    assert not torch.equal(x0, collect(fixed)[0][0])


def test_tensor_loader_follows_sampler_exactly():
    ds = tiny_dataset(30)

    class Partial:  # what the sieve sampler looks like: a subset, in its own order, with set_epoch
        def __init__(self):
            self.epoch = None

        def set_epoch(self, e):
            self.epoch = e

        def __iter__(self):
            return iter([17, 3, 29, 3, 8, 0, 11])

        def __len__(self):
            return 7

    sampler = Partial()
    loader = TensorLoader(ds, 3, sampler=sampler)
    loader.set_epoch(5)
    assert sampler.epoch == 5 and len(loader) == 3
    batches = collect(loader)
    assert torch.cat([b[2] for b in batches]).tolist() == [17, 3, 29, 3, 8, 0, 11]
    x, y, idx = batches[0]
    assert torch.equal(x, normalize(ds.images[idx], ds.mean, ds.std)) and torch.equal(y, ds.labels[idx])
    with pytest.raises(SpfdeError, match="index 30"):
        list(TensorLoader(ds, 3, sampler=[1, 30]))


def test_torch_loader_matches_tensor_loader_without_augmentation():
    ds = tiny_dataset(17)
    cfg_t = DataConfig(loader="tensor", batch_size=4, eval_batch_size=6, augment=False)
    cfg_d = DataConfig(loader="torch", batch_size=4, eval_batch_size=6, augment=False)
    for make in (lambda c: make_train_loader(c, ds, None, "cpu", seed=2), lambda c: make_eval_loader(c, ds, "cpu")):
        lt, ld = make(cfg_t), make(cfg_d)
        assert isinstance(lt, TensorLoader) and isinstance(ld, TorchLoader) and len(lt) == len(ld)
        lt.set_epoch(1)
        ld.set_epoch(1)
        for bt, bd in zip(collect(lt), collect(ld), strict=True):
            assert all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(bt, bd, strict=True))


def test_torch_loader_with_sampler_and_per_sample_augmentation():
    ds = tiny_dataset(12)
    sampler = EpochShuffleSampler([1, 4, 6, 9, 11], seed=0)
    cfg = DataConfig(loader="torch", batch_size=2, augment=True, crop_padding=2)
    loader = make_train_loader(cfg, ds, sampler, "cpu", seed=0, channels_last=True)
    loader.set_epoch(2)
    assert sampler.epoch == 2 and loader.dataset.epoch == 2
    batches = collect(loader)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == [1, 4, 6, 9, 11]
    x, y, idx = batches[0]
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, ds.labels[idx])
    # per-sample augmentation depends on (seed, epoch, index) only
    aug = ds.with_options(augment=True, padding=2, seed=0)
    aug.set_epoch(2)
    first = aug[4][0]
    assert torch.equal(first, aug[4][0])
    aug.set_epoch(3)
    assert not torch.equal(first, aug[4][0])
    assert aug[4][1:] == (int(ds.labels[4]), 4)


def test_array_dataset_rejects_bad_inputs():
    with pytest.raises(SpfdeError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), (0.5,), (0.5,))
    with pytest.raises(SpfdeError, match="one label per image"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), (0.5,), (0.5,))
    from spfde.data.datasets import set_channels

    with pytest.raises(SpfdeError, match="data.channels=2"):
        set_channels(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 2)


def test_epoch_shuffle_sampler():
    s = EpochShuffleSampler(50, seed=1)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and e0 == list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    state = s.state_dict()
    t = EpochShuffleSampler(3, seed=9)
    t.load_state_dict(state)
    assert list(t) == e1 and len(t) == 50
    g = make_generator(1, "shuffle", 1)
    assert e1 == torch.randperm(50, generator=g).tolist()  # the documented stream


def test_plan_reads_the_users_files_not_the_published_sizes(tmp_path):
    """`spfde flops`/`plan` with data.root: the user's own files in a known format set the sizes."""
    from spfde.config import load_config
    from spfde.planning import data_shape

    write_fmnist(tmp_path / "fm", n_train=12, n_test=6)
    mine = data_shape(load_config(None, ["data.name=fashion_mnist", f"data.root={tmp_path / 'fm'}"]))
    assert (mine.train_size, mine.image_size, mine.num_classes) == (12, 28, 10)
    published = data_shape(load_config(None, ["data.name=fashion_mnist"]))
    assert published.train_size == 60_000


def test_idx_files_load_into_writable_arrays_without_a_copy(tmp_path):
    arrays = write_fmnist(tmp_path / "fm")
    raw = tmp_path / "plain-idx"
    raw.write_bytes(idx_bytes(arrays["train_images"]))
    for path in (tmp_path / "fm" / dsmod.FASHION_MNIST_FILES["train_images"], raw):  # gzip and plain
        out = read_idx(path)
        assert out.flags.writeable and np.array_equal(out, arrays["train_images"]), path
        assert out.base is not None  # a view on the buffer read, not a copy of it
    # the images as loaded share that buffer: torch.from_numpy takes it as it is
    train, _, _ = dsmod.load_fashion_mnist(tmp_path / "fm")
    assert train.images.numpy().flags.writeable


def test_loading_fashion_mnist_says_no_numpy_warning(tmp_path):
    """torch warns once per process ("The given NumPy array is not writable"): a fresh process tells."""
    import subprocess
    import sys

    write_fmnist(tmp_path / "fm")
    code = ("import sys, warnings; warnings.simplefilter('error'); from spfde.data import load_fashion_mnist; "
            "load_fashion_mnist(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fm")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0 and "not writable" not in r.stderr, r.stderr
