"""Datasets held as ``uint8`` tensors: Fashion-MNIST, CIFAR-10/100, ImageFolder, digits, synthetic.

Method card
-----------
What it does
    Reads each dataset from its official on-disk format into one ``uint8`` tensor
    ``(N, C, H, W)`` plus ``int64`` labels (:class:`ArrayDataset`), so the tensor-resident loader
    can gather batches by index on any device. Every item is ``(image, label, index)``: the index
    is the sample's position in the training set, which is what the forgetting statistics of
    data sieving (paper Section 4.3, Algorithm 1) are keyed by.
Datasets
    ``cifar10`` / ``cifar100`` (python-pickle folders; the paper's benchmarks, Section 5 and
    Table A3), ``imagefolder`` (``root/train/<class>/*.png`` and ``root/val/<class>/*.png``, or
    ``root/test/``; class names are the sorted folder names of ``train/``; small datasets are held in memory,
    ImageNet-scale data, the paper's other benchmark, needs the streaming
    :class:`ImageFolderDataset` with ``data.loader=torch``), ``fashion_mnist`` (idx ``.gz``
    files, 60k/10k, the project's CPU-sized demo; optional zero padding 28->32 and grey->RGB so
    the CIFAR ResNets run unchanged), ``digits`` (scikit-learn 8x8 digits, for tests and demos) and
    ``synthetic`` (class-dependent random patterns, deterministic from the seed).
Hyper-parameters
    ``data.subset`` / ``data.test_subset`` keep N samples with the class proportions of the full
    split, drawn from the run's seed (the Fashion-MNIST demo preset uses 20k of the 60k training
    images); ``pad_to_32``, ``channels``, ``image_size``.
Normalization
    Per-channel mean/std are computed exactly from the full training set (a histogram over the
    256 byte values), except ImageFolder data, which uses the ImageNet constants.
"""

from __future__ import annotations

import gzip
import io
import numbers
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spfde.config import channels_fit
from spfde.data.augment import augment_batch, normalize
from spfde.errors import ConfigError, SpfdeError
from spfde.utils import make_generator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_APT = "dataset-fashion-mnist"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DatasetInfo:
    """What a model needs to know about a dataset (after padding/channel options)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None = None


# --------------------------------------------------------------------------------------------
# dataset objects


class _IndexedDataset(torch.utils.data.Dataset):
    """Shared item logic: ``(normalized float32 CHW, int label, index)`` with per-sample
    augmentation seeded by ``(seed, "augment", epoch, index)``. Subclasses provide ``_raw(i)``."""

    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    padding: int
    flip: bool
    seed: int
    epoch: int

    def _raw(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        x = self._raw(i)
        if self.augment:
            g = make_generator(self.seed, "augment", self.epoch, i)
            x = augment_batch(x[None], g, self.padding, self.flip)[0]
        return normalize(x, self.mean, self.std), int(self.labels[i]), i

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class ArrayDataset(_IndexedDataset):
    """Images as a ``uint8`` tensor (N, C, H, W) and labels as ``int64`` (N,).

    ``ds[i]`` is ``(normalized float32 CHW image, int label, i)``. With ``augment=True`` each item
    is randomly cropped/flipped with a generator seeded by ``(seed, "augment", epoch, i)``, so a
    plain ``torch.utils.data.DataLoader`` (any ``num_workers``) is deterministic per epoch; call
    :meth:`set_epoch` each epoch. The fast path is :class:`spfde.data.TensorLoader`, which reads
    ``.images`` / ``.labels`` directly and augments whole batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: bool = False, padding: int = 4, flip: bool = True, seed: int = 0) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise SpfdeError(f"ArrayDataset needs uint8 images of shape (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise SpfdeError(f"ArrayDataset needs one label per image: {images.shape[0]} images, labels of shape "
                             f"{tuple(labels.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise SpfdeError(f"ArrayDataset: mean/std need one value per channel ({images.shape[1]}), "
                             f"got {len(mean)}/{len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.padding = padding
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _raw(self, i: int) -> torch.Tensor:
        return self.images[i]

    def with_options(self, **kw: Any) -> ArrayDataset:
        """A view sharing the tensors with other ``augment``/``padding``/``flip``/``seed``."""
        opts = {"augment": self.augment, "padding": self.padding, "flip": self.flip, "seed": self.seed, **kw}
        return ArrayDataset(self.images, self.labels, self.mean, self.std, **opts)

    def subset(self, n: int | None, seed: int = 0) -> ArrayDataset:
        """``n`` samples, class-stratified and drawn from ``seed`` (:func:`stratified_subset`)."""
        if n is None or n >= len(self):
            return self
        keep = stratified_subset(self.labels, n, seed)
        return ArrayDataset(self.images[keep], self.labels[keep], self.mean, self.std, augment=self.augment,
                            padding=self.padding, flip=self.flip, seed=self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


class ImageFolderDataset(_IndexedDataset):
    """Streaming ImageFolder split: each item is decoded from disk when asked for.

    For datasets too large to hold in memory (ImageNet): use with ``data.loader=torch`` and
    ``data.num_workers > 0``. Items are ``(float32 CHW, int label, index)`` like
    :class:`ArrayDataset`, with the same per-sample augmentation.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int = 32, channels: int = 3,
                 classes: list[str] | None = None, augment: bool = False, padding: int = 4, flip: bool = True,
                 seed: int = 0) -> None:
        self.root = Path(root)
        split_dir = _image_split_dir(self.root, split)
        self.paths, labels, self.classes = scan_image_folder(split_dir, classes)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        check_labels(self.labels, len(self.classes), f"image folder {str(split_dir)!r}")
        self.image_size = image_size
        self.channels = channels
        self.mean, self.std = _imagenet_stats(channels)
        self.augment, self.padding, self.flip, self.seed = augment, padding, flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def _raw(self, i: int) -> torch.Tensor:
        return load_image(self.paths[i], self.image_size, self.channels)

    def with_options(self, **kw: Any) -> ImageFolderDataset:
        import copy

        out = copy.copy(self)
        for k, v in kw.items():
            setattr(out, k, v)
        return out

    def subset(self, n: int | None, seed: int = 0) -> ImageFolderDataset:
        """``n`` samples, class-stratified and drawn from ``seed`` (:func:`stratified_subset`)."""
        if n is None or n >= len(self):
            return self
        keep = stratified_subset(self.labels, n, seed)
        out = self.with_options()
        out.paths, out.labels = [self.paths[i] for i in keep.tolist()], self.labels[keep]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


# --------------------------------------------------------------------------------------------
# subsets, statistics and shape options


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``n`` samples keeping the class proportions of ``labels`` (``data.subset``).

    Each class gets ``n * count / N`` samples rounded by largest remainder (ties broken at random,
    so a subset smaller than the number of classes does not always favour the first classes);
    within a class, samples are drawn uniformly with a generator seeded by ``(seed, "subset")``.
    Taking the first ``n`` instead would give a class-sorted folder (ImageFolder) a single class.
    """
    total = int(labels.numel())
    if n >= total:
        return torch.arange(total)
    g = make_generator(seed, "subset")
    perm = torch.randperm(total, generator=g)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / total
    quota = exact.floor().long()
    tie = torch.rand(len(classes), generator=g, dtype=torch.float64)
    frac = (exact - quota.double()).tolist()
    order = sorted(range(len(classes)), key=lambda i: (-frac[i], float(tie[i])))
    for i in order[: n - int(quota.sum())]:
        quota[i] += 1
    shuffled = labels[perm]
    keep = [perm[shuffled == c][: int(q)] for c, q in zip(classes.tolist(), quota.tolist(), strict=True)]
    return torch.cat(keep).sort().values


def check_subset(subset: int | None, available: int, dataset: str, split: str = "training") -> None:
    """``data.subset`` (``split="training"``) or ``data.test_subset`` (``"test"``) against the split it is
    drawn from. More than the split holds is a config error, not the whole split in silence: the run
    would train (or report test accuracy) on fewer samples than its config says, and a sweep over the
    field would hold the same run twice under two sizes. Checked where the subsets are drawn
    (:func:`load_datasets`); ``spfde plan``/``flops`` check ``data.subset`` against the published size."""
    if subset is None or subset <= available:
        return
    field, verb = ("data.subset", "train") if split == "training" else ("data.test_subset", "test")
    raise ConfigError(f"config field '{field}' = {subset} is larger than the {dataset} {split} split "
                      f"({available} images); set {field} to at most {available}, or to null to {verb} on "
                      "the whole split")


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of ``uint8`` images, in ``[0, 1]`` units.

    A 256-bin histogram per channel, accumulated in chunks: exact, and no float copy of the
    whole dataset.
    """
    c = images.shape[1]
    hist = torch.zeros(c, 256, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start:start + chunk].cpu()
        for ch in range(c):
            hist[ch] += torch.bincount(block[:, ch].reshape(-1).to(torch.int64), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255.0
    total = hist.sum(1).clamp_min(1)
    mean = (hist * v).sum(1) / total
    var = (hist * (v - mean[:, None]) ** 2).sum(1) / total
    std = var.sqrt().clamp_min(1e-3)  # a constant channel (padding only) must not divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())


def _imagenet_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.449,) * channels, (0.226,) * channels


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (N, C, h, w) images to ``size x size``, centred."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise SpfdeError(f"cannot zero-pad {h}x{w} images to {size}x{size}: they are larger")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Repeat grey images to ``channels`` (the CIFAR models expect 3), or RGB to grey for 1."""
    c = images.shape[1]
    if not channels_fit(c, channels):  # a config names a dataset whose channels fit (config.SOURCE_CHANNELS)
        raise SpfdeError(f"data.channels={channels} does not fit {c}-channel images; use 1, 3 or leave it null")
    if channels is None or channels == c:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)  # RGB to grey
    return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes | bytearray, name: str = "<bytes>") -> np.ndarray:
    """Decode an idx file (the MNIST format): 2 zero bytes, a dtype code, the number of
    dimensions, then big-endian uint32 sizes and the big-endian data. The array views ``data``
    (writable when ``data`` is a bytearray, as :func:`read_idx` gives it)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise SpfdeError(f"{name} is not an idx file (bad magic {data[:4].hex() or 'empty'}); "
                         "expected the Fashion-MNIST *-ubyte(.gz) files")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise SpfdeError(f"{name} is truncated: the idx header needs {head} bytes, the file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    count = int(np.prod(dims)) if ndim else 1
    if len(data) - head != count * dtype.itemsize:
        raise SpfdeError(f"{name} is truncated or corrupt: header says {dims} x {dtype.itemsize} bytes, "
                         f"the file holds {len(data) - head} data bytes")
    return np.frombuffer(data, dtype=dtype, count=count, offset=head).reshape(dims)


def _read_into_bytearray(path: Path) -> bytearray:
    """The file's bytes (gunzipped when it is gzip) in a bytearray: writable, so the arrays
    :func:`parse_idx` views on it are too, and ``torch.from_numpy`` shares them as they are (over a
    read-only ``bytes`` it warns "The given NumPy array is not writable": a write to such a tensor
    would change an immutable object). Read straight into the buffer, no extra copy of the data: a
    plain file into one of its size, a gzip one in chunks as they are unpacked (the size its trailer
    states is not trusted: a damaged one could ask for gigabytes)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            f.seek(0)
            buf = bytearray(os.fstat(f.fileno()).st_size)
            del buf[f.readinto(buf):]  # what a file shrunk since fstat did not fill (a no-op otherwise)
            return buf
        f.seek(0)
        buf = bytearray()
        with gzip.GzipFile(fileobj=f) as g:
            while chunk := g.read(1 << 24):
                buf += chunk
        return buf


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file, gzip-compressed or not, into a writable array."""
    path = Path(path)
    try:
        raw = _read_into_bytearray(path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise SpfdeError(f"{str(path)!r} is a broken gzip file ({e}); delete it and fetch it again") from None
    except OSError as e:
        raise SpfdeError(f"cannot read {str(path)!r}: {e.strerror}") from None
    return parse_idx(raw, repr(str(path)))


def fashion_mnist_candidates(root: str | os.PathLike | None = None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order; an explicit ``root`` is the only place looked at."""
    out: list[Path] = []
    if root is not None:
        return [Path(root), Path(root) / "fashion-mnist"]
    if os.environ.get("SPFDE_DATA"):
        out.append(Path(os.environ["SPFDE_DATA"]) / "fashion-mnist")
    out += [Path.home() / ".cache" / "spfde" / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]
    return out


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The first candidate folder holding all four idx files, or None."""
    for d in fashion_mnist_candidates(root):
        if all((d / f).is_file() for f in FASHION_MNIST_FILES.values()):
            return d
    return None


def fashion_mnist_missing_message(root: str | os.PathLike | None = None) -> str:
    tried = ", ".join(str(p) for p in fashion_mnist_candidates(root))
    return (f"Fashion-MNIST not found (looked in: {tried}); run `spfde data fashion_mnist`, or "
            f"`apt-get install {FASHION_MNIST_APT}`, or download the four *-ubyte.gz files from "
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ into $SPFDE_DATA/fashion-mnist "
            "(or set data.root to their folder)")


def load_fashion_mnist(root: str | os.PathLike | None = None, pad_to_32: bool = False,
                       channels: int | None = None) -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
    """Fashion-MNIST train (60k) and test (10k) from the idx files."""
    folder = find_fashion_mnist(root)
    if folder is None:
        raise SpfdeError(fashion_mnist_missing_message(root))
    parts = {k: read_idx(folder / f) for k, f in FASHION_MNIST_FILES.items()}
    sets, stats = [], None
    for split in ("train", "test"):
        imgs, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        if imgs.ndim != 3 or labels.ndim != 1 or imgs.shape[0] != labels.shape[0]:
            raise SpfdeError(f"Fashion-MNIST files in {folder} do not fit together: {split} images "
                             f"{imgs.shape}, labels {labels.shape}")
        if imgs.dtype != np.uint8:  # a cast would wrap floats in [0, 1] (and NaN) to 0 without a word
            raise SpfdeError(f"Fashion-MNIST {split} images in {folder} hold {imgs.dtype} values; the loader "
                             "reads 8-bit pixels (idx type 0x08): write the images as uint8 0..255")
        x = torch.from_numpy(imgs).unsqueeze(1)
        if pad_to_32:
            x = pad_to(x, 32)
        if stats is None:
            stats = _grey_stats(x, channels)
        sets.append((set_channels(x, channels), torch.from_numpy(labels.astype(np.int64))))
    return _finish("fashion_mnist", sets, 10, FASHION_MNIST_CLASSES, stats, where=f" in {str(folder)!r}")


def _grey_stats(x: torch.Tensor, channels: int | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Statistics of grey images, taken before the channel is repeated (the copies are equal)."""
    (m,), (s,) = channel_stats(x)
    c = channels or 1
    return (m,) * c, (s,) * c


def check_labels(labels: torch.Tensor, num_classes: int, what: str, hint: str = "") -> None:
    """Every label in ``0..num_classes-1``, checked when a dataset is loaded: a label out of range
    would otherwise surface as an IndexError deep inside the loss."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        count = int(((labels < 0) | (labels >= num_classes)).sum())
        raise SpfdeError(f"{what}: {count} label(s) out of range (e.g. {bad}; labels range over "
                         f"{int(labels.min())}..{int(labels.max())}, expected 0..{num_classes - 1}){hint}")


def _finish(name: str, sets: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
            class_names: list[str] | None, stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
            where: str = "") -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
    (xtr, ytr), (xte, yte) = sets
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.shape[0] == 0:
            raise SpfdeError(f"the {name} {split} set{where} is empty (0 images); check data.root and its files")
        check_labels(y, num_classes, f"{name} {split} labels{where}", "; is data.name right for this data?")
    if xtr.shape[1:] != xte.shape[1:]:
        raise SpfdeError(f"{name}{where}: train images are {tuple(xtr.shape[1:])} (channels, height, width) but "
                         f"test images {tuple(xte.shape[1:])}; both splits must have one image shape")
    mean, std = stats if stats is not None else channel_stats(xtr)
    info = DatasetInfo(name, num_classes, int(xtr.shape[1]), int(xtr.shape[2]), mean, std, class_names)
    return ArrayDataset(xtr, ytr, mean, std), ArrayDataset(xte, yte, mean, std), info


# --------------------------------------------------------------------------------------------
# CIFAR (python pickles)

_CIFAR = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "labels": "labels", "names": "label_names",
                "classes": 10, "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "labels": "fine_labels", "names": "fine_label_names", "classes": 100,
                 "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"},
}

# The official pickles hold only numpy arrays, lists, ints and bytes; refusing every other global
# keeps a foreign pickle from running code.
_SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                 ("numpy", "ndarray"), ("numpy", "dtype"),
                 ("_codecs", "encode")}  # protocol-2 pickles of arrays written by Python 3 store bytes this way


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpfdeError(f"cannot read CIFAR file {str(path)!r}: {e.strerror}") from None
    try:
        obj = _NumpyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # truncated / foreign pickles fail in many ways
        raise SpfdeError(f"{str(path)!r} is not a CIFAR python pickle ({type(e).__name__}: {e}); "
                         "re-extract the official archive") from None
    if not isinstance(obj, dict):
        raise SpfdeError(f"{str(path)!r} is not a CIFAR python pickle (holds a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def find_cifar_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """The CIFAR folder: ``root`` itself, or ``root/<official folder name>``; without ``root``,
    ``$SPFDE_DATA`` and ``~/.cache/spfde``."""
    spec = _CIFAR[name]
    marker = spec["test"][0]
    bases = [Path(root)] if root is not None else (
        ([Path(os.environ["SPFDE_DATA"])] if os.environ.get("SPFDE_DATA") else []) + [Path.home() / ".cache" / "spfde"])
    tried = []
    for base in bases:
        for d in (base, base / spec["folder"]):
            tried.append(str(d))
            if (d / marker).is_file():
                return d
    raise SpfdeError(f"{name} not found (looked for '{marker}' in: {', '.join(tried)}); download and extract "
                     f"{spec['url']} and set data.root to the extracted '{spec['folder']}' folder or its parent")


def _integer_labels(raw: Any, what: str) -> np.ndarray:
    """A 1-D array of integer class indices as ``int64``; anything else (text, fractions such as 2.5
    that a cast would truncate to 2 without a word, a table, one number) is one error naming ``what``."""
    try:
        labels = np.asarray(raw)
    except ValueError:  # a ragged list
        labels = np.asarray(raw, dtype=object)
    if labels.ndim != 1:
        got = "one value" if labels.ndim == 0 else f"an array of shape {labels.shape}"
        raise SpfdeError(f"{what} must be a list of integer class indices, got {got}; re-extract the official "
                         "archive")

    def whole(v: Any) -> bool:  # Python or numpy numbers (a list of np.int64 from a converted archive)
        if isinstance(v, (bool, np.bool_)):
            return False
        return isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and float(v).is_integer())

    if labels.dtype.kind not in "iu":
        values = list(raw) if isinstance(raw, (list, tuple)) else labels.tolist()  # [1, "x"]: "x", not "1"
        bad = next((v for v in values if not whole(v)), None)
        if bad is not None:  # whole numbers stored as floats (3.0) are the same classes
            raise SpfdeError(f"{what} must hold integer class indices, found {bad!r}; re-extract the official "
                             "archive")
    return labels.astype(np.int64)


def _cifar_part(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise SpfdeError(f"{str(path)!r} is not a CIFAR batch: it lacks the 'data' or '{label_key}' entry "
                         f"(keys: {', '.join(sorted(map(str, d))[:6])})")
    data = np.asarray(d["data"])
    labels = _integer_labels(d[label_key], f"{str(path)!r} is not a CIFAR batch: '{label_key}'")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise SpfdeError(f"{str(path)!r} is not a CIFAR batch: 'data' is {data.dtype} {data.shape}, "
                         f"expected uint8 (N, 3072) with N = {labels.shape[0]} labels")
    # rows are the R, G and B planes of a 32x32 image, row-major
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(name: str, root: str | os.PathLike | None = None,
               channels: int | None = None) -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (fine labels) from the python-pickle folder."""
    spec = _CIFAR[name]
    folder = find_cifar_folder(name, root)
    sets = []
    for split in ("train", "test"):
        parts = []
        for f in spec[split]:
            if not (folder / f).is_file():
                raise SpfdeError(f"{name} folder {str(folder)!r} lacks '{f}'; re-extract {spec['url']}")
            parts.append(_cifar_part(folder / f, spec["labels"]))
        x = torch.cat([p[0] for p in parts])
        sets.append((set_channels(x, channels), torch.cat([p[1] for p in parts])))
    names = None
    if (folder / spec["meta"]).is_file():
        meta = _unpickle(folder / spec["meta"])
        if spec["names"] in meta:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec["names"]]]
    return _finish(name, sets, spec["classes"], names, where=f" in {str(folder)!r}")


# --------------------------------------------------------------------------------------------
# ImageFolder


def _image_split_dir(root: Path, split: str) -> Path:
    names = ["train"] if split == "train" else ["val", "test"]
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise SpfdeError(f"image folder {str(root)!r} has no '{'/'.join(names)}' subfolder; expected "
                     "root/train/<class>/*.png and root/val/<class>/... (or root/test/...)")


def scan_image_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Image paths and labels of ``split_dir/<class>/*``; classes are sorted folder names (or the
    given list, so a validation split uses the training split's numbering)."""
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SpfdeError(f"{str(split_dir)!r} has class folder '{unknown[0]}' that the training split lacks")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in found:
        for p in sorted((split_dir / c).iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                labels.append(index[c])
    if not paths:
        raise SpfdeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(split_dir)!r}/<class>/")
    return paths, labels, classes


def load_image(path: Path, image_size: int, channels: int = 3) -> torch.Tensor:
    """One image as ``uint8`` (C, S, S): shorter side resized to ``S``, then centre-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            scale = image_size / min(w, h)
            nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, DecompressionBombError, ...
        raise SpfdeError(f"cannot read image {str(path)!r}: {' '.join(str(e).split()) or type(e).__name__}; "
                         "replace or remove the file") from None
    t = torch.from_numpy(arr.copy())
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    return set_channels(t[None], channels)[0]


def load_image_folder(root: str | os.PathLike, image_size: int = 32,
                      channels: int | None = None) -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
    """A small ImageFolder tree decoded into memory (for ImageNet-scale data use
    :class:`ImageFolderDataset` with ``data.loader=torch``)."""
    root = Path(root)
    if not root.is_dir():
        raise SpfdeError(f"image folder {str(root)!r} does not exist; set data.root to a folder with train/ and val/")
    c = channels or 3
    train_paths, train_labels, classes = scan_image_folder(_image_split_dir(root, "train"))
    test_paths, test_labels, _ = scan_image_folder(_image_split_dir(root, "val"), classes)
    sets = []
    for paths, labels in ((train_paths, train_labels), (test_paths, test_labels)):
        x = torch.stack([load_image(p, image_size, c) for p in paths])
        sets.append((x, torch.tensor(labels, dtype=torch.int64)))
    return _finish("imagefolder", sets, len(classes), classes, stats=_imagenet_stats(c))


# --------------------------------------------------------------------------------------------
# scikit-learn digits and synthetic data

DIGITS_TEST = 297  # 1797 images: the last 297 are the test split, 1500 train


def load_digits(pad_to_32: bool = False, channels: int | None = None,
                resize: str = "upsample") -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
    """scikit-learn's 8x8 digits (values 0..16 scaled to 0..255), split train 1500 / test 297.

    ``pad_to_32`` makes them 32x32 by nearest 4x upsampling (``resize="upsample"``, default: a
    digit then fills the frame as CIFAR objects do) or by centred zero padding (``"pad"``).
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise SpfdeError("data.name=digits needs scikit-learn: pip install scikit-learn") from None
    d = sk_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    if pad_to_32:
        if resize == "upsample":
            x = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
        elif resize == "pad":
            x = pad_to(x, 32)
        else:
            raise SpfdeError(f"load_digits: resize must be 'upsample' or 'pad', got {resize!r}")
    n = x.shape[0] - DIGITS_TEST
    stats = _grey_stats(x[:n], channels)
    x = set_channels(x, channels)
    return _finish("digits", [(x[:n], y[:n]), (x[n:], y[n:])], 10, [str(i) for i in range(10)], stats)


def make_synthetic(size: int, num_classes: int = 10, image_size: int = 32, channels: int = 3, seed: int = 0,
                   test_size: int | None = None) -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
    """Random class prototypes (smooth 4x4 patterns upsampled to ``image_size``) plus per-sample
    noise and brightness; a small net learns them in a few epochs. Deterministic from ``seed``."""
    test_size = test_size if test_size is not None else max(size // 4, num_classes)
    g = make_generator(seed, "synthetic", "prototypes")
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g) * 2 - 1
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    sets = []
    for split, n in (("train", size), ("test", test_size)):
        gs = make_generator(seed, "synthetic", split)
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gs)]
        noise = torch.randn(n, channels, image_size, image_size, generator=gs)
        gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gs)
        x = 128 + 70 * gain * protos[labels] + 30 * noise
        sets.append((x.round().clamp(0, 255).to(torch.uint8), labels))
    return _finish("synthetic", sets, num_classes, [f"class_{i}" for i in range(num_classes)])


# --------------------------------------------------------------------------------------------
# the entry point


def load_datasets(cfg: Any, seed: int = 0) -> tuple[Any, Any, DatasetInfo]:
    """``(train, test, info)`` for a :class:`spfde.config.DataConfig`.

    The training set carries ``cfg.augment``/``crop_padding``/``flip`` and ``seed`` for the
    per-sample (torch DataLoader) path; the test set never augments. ``subset``/``test_subset``
    keep a class-stratified random N samples drawn from ``seed`` (:func:`stratified_subset`),
    after the normalization statistics are taken from the full set.
    """
    name = cfg.name
    if name == "fashion_mnist":
        train, test, info = load_fashion_mnist(cfg.root, pad_to_32=cfg.pad_to_32, channels=cfg.channels)
    elif name in ("cifar10", "cifar100"):
        train, test, info = load_cifar(name, cfg.root, channels=cfg.channels)
    elif name == "digits":
        train, test, info = load_digits(pad_to_32=cfg.pad_to_32, channels=cfg.channels)
    elif name == "synthetic":
        train, test, info = make_synthetic(cfg.synthetic_size, cfg.synthetic_classes, cfg.image_size,
                                           cfg.channels or 3, seed=seed)
    elif name == "imagefolder":
        if cfg.root is None:
            raise SpfdeError("data.name=imagefolder needs data.root: a folder with train/<class>/ and val/<class>/")
        if cfg.loader == "torch":  # streaming: nothing decoded up front
            c = cfg.channels or 3
            train = ImageFolderDataset(cfg.root, "train", cfg.image_size, c)
            test = ImageFolderDataset(cfg.root, "val", cfg.image_size, c, classes=train.classes)
            info = DatasetInfo("imagefolder", len(train.classes), c, cfg.image_size, train.mean, train.std,
                               train.classes)
        else:
            train, test, info = load_image_folder(cfg.root, cfg.image_size, cfg.channels)
    else:
        raise SpfdeError(f"unknown dataset data.name={name!r}; allowed: fashion_mnist, cifar10, cifar100, "
                         "imagefolder, digits, synthetic")
    check_subset(cfg.subset, len(train), name)
    check_subset(cfg.test_subset, len(test), name, "test")
    train = train.subset(cfg.subset, seed).with_options(augment=cfg.augment, padding=cfg.crop_padding,
                                                        flip=cfg.flip, seed=seed)
    test = test.subset(cfg.test_subset, seed).with_options(augment=False)
    return train, test, info
