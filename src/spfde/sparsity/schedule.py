"""The structure-update schedule of every method, as pure functions of the epoch.

Shared by the engines (what to do at an epoch start) and by the FLOPs planner
(:func:`spfde.accounting.flops.planned_flops`, which replays the schedule without training).

* Update epochs (paper Algorithm 1, Table A3): ``e > 0`` on the Δτ grid (``e % interval == 0``)
  and ``e <= search_end``, plus ``search_end`` itself even when it is off the grid, so the final
  prune of MEST always happens. Nothing changes after ``search_end``.
* MEST (Table A3): between updates a layer with target ``s`` trains at
  ``s' = s - grow_early`` before ``grow_switch * search_end`` and ``s - grow_late`` from then
  on (clamped at 0); every update prunes to ``s`` then grows back to ``s'``; the update at
  ``search_end`` prunes to ``s`` and grows nothing.
* SET / RigL: drop fraction ``α/2 · (1 + cos(π e / search_end))`` of the active weights
  (Evci et al. 2020's cosine decay, ``α = sparsity.drop_fraction``); density stays at the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spfde.config import Config


@dataclass(frozen=True)
class Schedule:
    """The schedule knobs of one run (from :class:`~spfde.config.Config`)."""

    method: str = "mest"
    interval: int = 5
    search_end: int = 120
    grow_early: float = 0.05
    grow_late: float = 0.025
    grow_switch: float = 0.75
    drop_fraction: float = 0.3

    @classmethod
    def from_config(cls, cfg: Config) -> Schedule:
        sp = cfg.sparsity
        return cls(method=sp.method, interval=cfg.train.interval, search_end=cfg.search_end,
                   grow_early=sp.grow_early, grow_late=sp.grow_late, grow_switch=sp.grow_switch,
                   drop_fraction=sp.drop_fraction)

    # ------------------------------------------------------------------ when
    def is_update_epoch(self, epoch: int) -> bool:
        """True when the structure changes at the start of ``epoch``."""
        if self.method in ("dense", "static") or epoch <= 0 or epoch > self.search_end:
            return False
        return epoch % self.interval == 0 or epoch == self.search_end

    def records_grad(self, epoch: int) -> bool:
        """True during the epoch whose gradients feed the update at the start of ``epoch + 1``."""
        return self.method in ("mest", "rigl") and self.is_update_epoch(epoch + 1)

    def needs_dense_grad(self, epoch: int) -> bool:
        """RigL: one step of ``epoch`` computes the dense weight gradient for the next update."""
        return (self.method == "rigl" and self.is_update_epoch(epoch + 1)
                and self.drop_fraction_at(epoch + 1) > 0)

    # ------------------------------------------------------------------ how much
    def grow_sparsity(self, target: float, epoch: int) -> float:
        """MEST's ``s'`` for an update at ``epoch`` (the soft memory bound)."""
        if target <= 0:
            return 0.0
        delta = self.grow_early if epoch < self.grow_switch * self.search_end else self.grow_late
        return max(target - delta, 0.0)

    def initial_sparsity(self, target: float) -> float:
        """Sparsity of the initial random mask (MEST starts at ``s'`` so epoch 0 trains like the rest)."""
        if self.method == "dense":
            return 0.0
        if self.method == "mest" and self.search_end > 0:
            return self.grow_sparsity(target, 0)
        return target

    def sparsity_after_update(self, target: float, epoch: int) -> float:
        """Sparsity a layer trains at after the update at ``epoch`` (an update epoch)."""
        if self.method == "dense":
            return 0.0
        if self.method == "mest":
            return target if epoch >= self.search_end else self.grow_sparsity(target, epoch)
        return target

    def drop_fraction_at(self, epoch: int) -> float:
        """SET/RigL: fraction of the active weights swapped at ``epoch`` (cosine decay to 0)."""
        if self.search_end <= 0:
            return 0.0
        return 0.5 * self.drop_fraction * (1.0 + math.cos(math.pi * min(epoch, self.search_end) / self.search_end))

    def sparsity_during(self, target: float, epoch: int) -> float:
        """Sparsity of a never-frozen layer during ``epoch``."""
        s = self.initial_sparsity(target)
        last = [e for e in range(1, epoch + 1) if self.is_update_epoch(e)]
        return self.sparsity_after_update(target, last[-1]) if last else s
