"""The sampler that serves the partial training set (paper Section 4.3).

Removed samples are never yielded, so they are never loaded, augmented or computed on: the
saving of data sieving is real, not a masked loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from spfde.utils import make_generator


class SieveSampler(Sampler[int]):
    """Yields the sieve's current partial set in an order that depends only on ``(seed, epoch)``.

    Call :meth:`set_epoch` each epoch (the controller does). The partial set is read from the
    sieve at every ``__iter__``, so an update at an epoch boundary takes effect on the next pass.
    Works as a ``DataLoader`` sampler for any dataset indexed ``0..n-1`` and as the index source
    of :class:`spfde.data.TensorLoader` (any iterable of ints). With no sieving it yields the same
    order as :class:`spfde.data.loader.EpochShuffleSampler` (same ``"shuffle"`` stream).
    """

    def __init__(self, sieve: Any, seed: int = 0) -> None:
        super().__init__()
        self.sieve = sieve
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This epoch's order as an int64 tensor (the fast path for tensor loaders)."""
        active = self.sieve.active
        return active[torch.randperm(active.numel(), generator=make_generator(self.seed, "shuffle", self.epoch))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return int(self.sieve.active.numel())

    @property
    def num_samples(self) -> int:
        """Samples per epoch, for the FLOPs ledger."""
        return len(self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
