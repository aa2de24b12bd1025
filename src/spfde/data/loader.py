"""Loaders yielding ``(x, y, idx)``: a tensor-resident loader and a torch DataLoader wrapper.

Method card
-----------
What it does
    :class:`TensorLoader` keeps the whole dataset as one ``uint8`` tensor on the training device
    and builds each batch by index: gather, augment the whole batch at once (crop + flip, see
    :mod:`spfde.data.augment`), convert to float and normalize. No worker processes, no
    per-sample Python; on small datasets (CIFAR, Fashion-MNIST) the data pipeline stops being the
    bottleneck (the airbench recipe). :class:`TorchLoader` wraps a ``torch.utils.data.DataLoader``
    over a per-sample dataset for data that does not fit in memory.
Why indices flow through
    Data sieving (paper Section 4.3) keys its forgetting statistics by training-set position and
    decides which samples an epoch sees: the controller's sampler yields the partial dataset's
    indices, the loader follows it exactly and hands the indices back with every batch, so
    ``after_step(logits, y, idx)`` can credit each sample.
Determinism
    ``set_epoch(e)`` makes the shuffle (``make_generator(seed, "shuffle", e)``) and the
    augmentation (``make_generator(seed, "augment", e)``) depend only on ``(seed, e)``; a resumed
    run replays the identical batches without saving RNG state mid-epoch. Call it every epoch
    (like ``DistributedSampler``): without it every pass repeats epoch 0.
Hyper-parameters
    ``data.batch_size``, ``data.eval_batch_size``, ``data.augment``, ``data.crop_padding``,
    ``data.flip``, ``data.loader`` (``tensor`` or ``torch``), ``data.num_workers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from spfde.data.augment import augment_batch, normalize
from spfde.errors import SpfdeError
from spfde.utils import make_generator

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def shuffled(indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """``indices`` in the order of epoch ``epoch``'s permutation (depends only on seed, epoch)."""
    return indices[torch.randperm(indices.numel(), generator=make_generator(seed, "shuffle", epoch))]


class EpochShuffleSampler(Sampler[int]):
    """Yields a permutation of ``range(n)`` (or of given indices) that depends only on
    ``(seed, epoch)``; call :meth:`set_epoch` each epoch."""

    def __init__(self, n_or_indices: int | Iterable[int] | torch.Tensor, seed: int = 0) -> None:
        if isinstance(n_or_indices, int):
            self.indices = torch.arange(n_or_indices, dtype=torch.int64)
        else:
            self.indices = torch.as_tensor(list(n_or_indices) if not torch.is_tensor(n_or_indices) else n_or_indices,
                                           dtype=torch.int64).reshape(-1)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(shuffled(self.indices, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return int(self.indices.numel())

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "indices": self.indices.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seed, self.indices = int(state["epoch"]), int(state["seed"]), state["indices"].clone()


class TensorLoader:
    """Batches ``(x float32 NCHW, y int64, idx int64)``, all on ``device``, from a dataset held as
    one ``uint8`` tensor there.

    ``sampler`` (anything iterable over indices, optionally with ``set_epoch`` and ``__len__``)
    decides which samples and in which order; without one, ``shuffle`` picks between the epoch's
    permutation and the natural order. Augmentation draws whole batches from one generator per
    epoch, salted with ``rank`` (default: the sampler's ``rank``, e.g. the controller's
    distributed sampler; 0 without one), so the ranks of a DDP run draw different crops and flips.
    """

    def __init__(self, dataset: Any, batch_size: int, sampler: Iterable[int] | None = None, shuffle: bool = False,
                 augment: bool = False, padding: int = 4, flip: bool = True, device: str | torch.device = "cpu",
                 seed: int = 0, drop_last: bool = False, channels_last: bool = False, rank: int | None = None) -> None:
        if not hasattr(dataset, "images") or not torch.is_tensor(dataset.images):
            raise SpfdeError(f"the tensor loader needs an in-memory dataset (ArrayDataset), got "
                             f"{type(dataset).__name__}; set data.loader=torch for streaming datasets")
        if batch_size < 1:
            raise SpfdeError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device)
        self.batch_size = batch_size
        self.sampler = sampler
        self.shuffle = shuffle
        self.augment, self.padding, self.flip = augment, padding, flip
        self.seed = seed
        self.rank = int(rank if rank is not None else getattr(sampler, "rank", 0) or 0)
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _num_samples(self) -> int:
        if self.sampler is None:
            return int(self.images.shape[0])
        if isinstance(self.sampler, Sized):
            return len(self.sampler)
        return len(list(self.sampler))

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> torch.Tensor:
        """This epoch's sample indices, in order (CPU int64)."""
        n = int(self.images.shape[0])
        if self.sampler is not None:
            order = torch.as_tensor(list(self.sampler), dtype=torch.int64)
            if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
                bad = int(order.max()) if int(order.max()) >= n else int(order.min())
                raise SpfdeError(f"the sampler yields index {bad} but the dataset has {n} samples; "
                                 "build the sampler for this dataset (train_size=len(train_set))")
            return order
        base = torch.arange(n, dtype=torch.int64)
        return shuffled(base, self.seed, self.epoch) if self.shuffle else base

    def __iter__(self) -> Iterator[Batch]:
        order = self.order().to(self.device)
        # rank 0 (and a single process) keeps the unsalted stream
        salt = ("rank", self.rank) if self.rank else ()
        gen = make_generator(self.seed, "augment", self.epoch, *salt) if self.augment else None
        bs = self.batch_size
        for start in range(0, order.numel(), bs):
            idx = order[start:start + bs]
            if self.drop_last and idx.numel() < bs:
                break
            yield self._inputs(idx, gen), self.labels.index_select(0, idx), idx

    def _inputs(self, idx: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        x = self.images.index_select(0, idx)
        if gen is not None:
            x = augment_batch(x, gen, self.padding, self.flip)
        x = normalize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The un-augmented input batch of the samples ``idx``, exactly as an epoch yields them when
        augmentation is off (the activation cache's input provider)."""
        return self._inputs(torch.as_tensor(idx).to(self.device), None)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))


class TorchLoader:
    """A ``torch.utils.data.DataLoader`` over a per-sample dataset (``(x, y, idx)`` items), with
    ``set_epoch`` forwarded to the sampler and the dataset and batches moved to ``device``.

    Workers are not persistent, so each epoch's workers see the dataset's current epoch.
    """

    def __init__(self, dataset: Any, batch_size: int, sampler: Iterable[int] | None = None, shuffle: bool = False,
                 device: str | torch.device = "cpu", seed: int = 0, num_workers: int = 0, drop_last: bool = False,
                 channels_last: bool = False) -> None:
        if sampler is None and shuffle:
            sampler = EpochShuffleSampler(len(dataset), seed)
        self.dataset = dataset
        self.sampler = sampler
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
            pin_memory=self.device.type == "cuda",
            # a dedicated generator: otherwise each iteration draws the workers' base seed from the
            # global RNG and shifts every later random draw of the run
            generator=make_generator(seed, "dataloader"))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for obj in (self.sampler, self.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """The input batch of the samples ``idx`` as the dataset gives them (the activation cache's
        input provider; the cache checks it against the training batches before using it)."""
        x = torch.stack([self.dataset[int(i)][0] for i in torch.as_tensor(idx).tolist()]).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[Batch]:
        nb = self.device.type == "cuda"
        for x, y, idx in _one_line_worker_errors(self.loader):
            x = x.to(self.device, non_blocking=nb)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=nb), idx.to(self.device, non_blocking=nb)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))


def _one_line_worker_errors(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``loader``; a :class:`SpfdeError` raised in a worker process (a bad image) comes
    back from torch wrapped in the worker's traceback text: re-raise it with its own message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except SpfdeError as e:
            text = str(e)
            if "Original Traceback" not in text:
                raise
            last = [line for line in text.strip().splitlines() if line.strip()][-1]
            raise type(e)(last.split(": ", 1)[1] if ": " in last else last) from None
        yield batch


def make_train_loader(cfg: Any, train_ds: Any, sampler: Iterable[int] | None, device: str | torch.device,
                      seed: int, channels_last: bool = False) -> TensorLoader | TorchLoader:
    """The training loader ``cfg.loader`` asks for; ``sampler`` (e.g. the controller's sieve
    sampler) decides the samples, otherwise every sample is shuffled per epoch."""
    if cfg.loader == "tensor":
        return TensorLoader(train_ds, cfg.batch_size, sampler=sampler, shuffle=sampler is None, augment=cfg.augment,
                            padding=cfg.crop_padding, flip=cfg.flip, device=device, seed=seed,
                            channels_last=channels_last)
    ds = train_ds.with_options(augment=cfg.augment, padding=cfg.crop_padding, flip=cfg.flip, seed=seed)
    return TorchLoader(ds, cfg.batch_size, sampler=sampler, shuffle=sampler is None, device=device, seed=seed,
                       num_workers=cfg.num_workers, channels_last=channels_last)


def make_eval_loader(cfg: Any, test_ds: Any, device: str | torch.device) -> TensorLoader | TorchLoader:
    """Sequential, un-augmented batches of ``cfg.eval_batch_size``."""
    if cfg.loader == "tensor":
        return TensorLoader(test_ds, cfg.eval_batch_size, device=device)
    return TorchLoader(test_ds.with_options(augment=False), cfg.eval_batch_size, device=device,
                       num_workers=cfg.num_workers)
