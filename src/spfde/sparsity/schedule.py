"""The structure-update schedule of every method, as pure functions of the epoch (or step).

Shared by the engines (what to do at an epoch start or after a step), by the controller (which
layers take their last update when) and by the FLOPs planner
(:func:`spfde.accounting.flops.planned_flops`, which replays the schedule without training).

* Update epochs (paper Algorithm 1, Table A3): ``e > 0`` on the Δτ grid (``e % interval == 0``)
  and ``e <= search_end``, plus ``search_end`` itself even when it is off the grid, so the final
  prune of MEST always happens. Nothing changes after ``search_end``.
* ``sparsity.update_unit: step`` (RigL and SET only; RigL's paper counts ΔT = 100 in steps):
  instead of epoch starts, an update after every ``update_interval_steps``-th optimizer step
  (counted over the whole run) taken during an epoch ``< search_end``.
* MEST (Table A3): between updates a layer with target ``s`` trains at
  ``s' = s - grow_early`` before ``grow_switch * search_end`` and ``s - grow_late`` from then
  on (clamped at 0); every update prunes to ``s`` then grows back to ``s'``.
* **A layer's final update** (one rule, :meth:`Schedule.last_update_epochs`): the last update
  epoch at which the layer is active (not frozen), ``0`` meaning none (the initial mask is then its
  last structure decision). MEST's final update of a layer prunes it to ``s`` and grows nothing, so
  every layer ends at its target: a never-frozen layer at ``search_end``; with
  ``freezing.prune_on_freeze`` (the default) a layer that freezes during the search at its last
  update before freezing, so it trains Δτ epochs at ``s`` and is never touched while frozen.
* SET / RigL: drop fraction ``α/2 · (1 + cos(π e / search_end))`` of the active weights
  (Evci et al. 2020's cosine decay, ``α = sparsity.drop_fraction``; ``e`` is the fractional epoch
  of the update in step mode); density stays at the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
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
    update_unit: str = "epoch"
    interval_steps: int = 100

    @classmethod
    def from_config(cls, cfg: Config) -> Schedule:
        sp = cfg.sparsity
        return cls(method=sp.method, interval=cfg.train.interval, search_end=cfg.search_end,
                   grow_early=sp.grow_early, grow_late=sp.grow_late, grow_switch=sp.grow_switch,
                   drop_fraction=sp.drop_fraction, update_unit=sp.update_unit,
                   interval_steps=sp.update_interval_steps)

    @property
    def per_step(self) -> bool:
        return self.update_unit == "step" and self.method in ("set", "rigl")

    # ------------------------------------------------------------------ when
    def is_update_epoch(self, epoch: int) -> bool:
        """True when the structure changes at the start of ``epoch`` (never in step mode)."""
        if self.method in ("dense", "static") or self.per_step or epoch <= 0 or epoch > self.search_end:
            return False
        return epoch % self.interval == 0 or epoch == self.search_end

    def is_update_step(self, step: int, epoch: int) -> bool:
        """Step mode: True when the structure changes after the ``step``-th optimizer step (1-based,
        counted over the run), taken during ``epoch``."""
        return (self.per_step and step > 0 and step % self.interval_steps == 0 and epoch < self.search_end
                and self.drop_fraction > 0)

    def records_grad(self, epoch: int) -> bool:
        """True during the epoch whose gradients feed the update at the start of ``epoch + 1``."""
        if self.method == "rigl":
            return self.needs_dense_grad(epoch)
        return self.method == "mest" and self.is_update_epoch(epoch + 1)

    def needs_dense_grad(self, epoch: int) -> bool:
        """RigL, epoch mode: one step of ``epoch`` computes the dense weight gradient for the next update."""
        return (self.method == "rigl" and self.is_update_epoch(epoch + 1)
                and self.drop_fraction_at(epoch + 1) > 0)

    def last_update_epoch(self) -> int:
        """The last epoch-start update of the run (0: none)."""
        return max((e for e in range(1, self.search_end + 1) if self.is_update_epoch(e)), default=0)

    def last_update_epochs(self, layers: Iterable[str], frozen_at: Callable[[int], Iterable[str]] | None = None
                           ) -> dict[str, int]:
        """Each layer's final update: the last update epoch at which it is not in ``frozen_at(epoch)``
        (0: it takes part in none, so the initial mask is its last structure decision)."""
        names = list(layers)
        out = {m: 0 for m in names}
        for e in range(1, self.search_end + 1):
            if self.is_update_epoch(e):
                frozen = set(frozen_at(e)) if frozen_at is not None else set()
                for m in names:
                    if m not in frozen:
                        out[m] = e
        return out

    # ------------------------------------------------------------------ how much
    def grow_sparsity(self, target: float, epoch: int) -> float:
        """MEST's ``s'`` for an update at ``epoch`` (the soft memory bound)."""
        if target <= 0:
            return 0.0
        delta = self.grow_early if epoch < self.grow_switch * self.search_end else self.grow_late
        return max(target - delta, 0.0)

    def initial_sparsity(self, target: float, final_update: int | None = None) -> float:
        """Sparsity of the initial random mask: MEST starts at ``s'`` so epoch 0 trains like the rest,
        unless the layer takes part in no update (``final_update == 0``): then at ``s``."""
        if self.method == "dense":
            return 0.0
        final = self.last_update_epoch() if final_update is None else final_update
        if self.method == "mest" and final > 0:
            return self.grow_sparsity(target, 0)
        return target

    def sparsity_after_update(self, target: float, epoch: int, final_update: int | None = None) -> float:
        """Sparsity a layer trains at after the update at ``epoch``: MEST's final update of a layer
        (``epoch >= final_update``, by default the run's last update) grows nothing."""
        if self.method == "dense":
            return 0.0
        if self.method == "mest":
            final = self.last_update_epoch() if final_update is None else final_update
            return target if epoch >= final else self.grow_sparsity(target, epoch)
        return target

    def drop_fraction_at(self, epoch: float) -> float:
        """SET/RigL: fraction of the active weights swapped at ``epoch`` (cosine decay to 0)."""
        if self.search_end <= 0:
            return 0.0
        return 0.5 * self.drop_fraction * (1.0 + math.cos(math.pi * min(epoch, self.search_end) / self.search_end))

    def sparsity_during(self, target: float, epoch: int) -> float:
        """Sparsity a never-frozen layer with target ``target`` trains at during ``epoch``."""
        return self.replay({"": target}, epoch + 1)[-1][""]

    def replay(self, target: Mapping[str, float], epochs: int,
               frozen_at: Callable[[int], Iterable[str]] | None = None,
               final_update: Mapping[str, int] | None = None) -> list[dict[str, float]]:
        """Per epoch, the sparsity ``{layer: s}`` every layer trains at (frozen layers keep theirs)."""
        finals = dict(final_update) if final_update is not None else {}
        sparsity = {m: self.initial_sparsity(s, finals.get(m)) for m, s in target.items()}
        out = []
        for e in range(epochs):
            if self.is_update_epoch(e):  # Algorithm 1: freeze first, then Prune&Grow the active layers
                frozen = set(frozen_at(e)) if frozen_at is not None else set()
                for m, s in target.items():
                    if m not in frozen:
                        sparsity[m] = self.sparsity_after_update(s, e, finals.get(m))
            out.append(dict(sparsity))
        return out
