"""SET: Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018).

Method card
-----------
What it does
    At every update epoch each active layer drops the fraction ``f(e)`` of its active weights
    with the smallest magnitude and grows the same number at uniformly random zero positions,
    so its density stays exactly at the target (a paper Table 2 baseline).

Schedule and hyper-parameters
    * Update epochs as MEST (:mod:`spfde.sparsity.schedule`): every Δτ = ``train.interval``
      epochs up to ``search_end``; or, with ``sparsity.update_unit: step``, every
      ``sparsity.update_interval_steps`` optimizer steps during the epochs before ``search_end``.
    * ``f(e) = α/2 · (1 + cos(π e / search_end))`` with ``α = sparsity.drop_fraction`` (0.3),
      the cosine decay RigL (Evci et al. 2020) also used for SET in its comparison.
    * Growth as SET is implemented in RigL's code base (``SparseSETOptimizer``) and in
      sparselearning (``random_growth``): random among every position outside the post-drop mask,
      so a just-dropped weight can be drawn again, and then keeps its value and optimizer state
      (RigL's ``reinit_when_same = False``); other grown weights start at zero with zero optimizer
      state. ``sparsity.grow_exclude_dropped: true`` excludes the just-dropped positions (fallback when
      a layer has no other zero position). The initial mask is random at the target.

Expected effect
    Cheaper than MEST (always at the target density, paper Table 2: 1.32e15 vs 1.54e15 FLOPs at
    90 %) with lower accuracy at high sparsity.
"""

from __future__ import annotations

import torch

from spfde.sparsity.engine import SparseEngine
from spfde.sparsity.masks import PrunableLayer, grow, keep_count, prune_lowest


def magnitude_drop(mask: torch.Tensor, weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Drop ``round(fraction · active)`` active weights with the smallest ``|w|``."""
    active = int(mask.sum())
    return prune_lowest(mask, weight.detach().abs(), active - int(round(fraction * active)))


def set_prune_grow(mask: torch.Tensor, weight: torch.Tensor, fraction: float, sparsity: float,
                   generator: torch.Generator, exclude_dropped: bool = False) -> torch.Tensor:
    """One SET update of one layer: magnitude drop, random growth back to ``sparsity``."""
    kept = magnitude_drop(mask, weight, fraction)
    n_grow = keep_count(mask.numel(), sparsity) - int(kept.sum())
    return grow(kept, n_grow, forbidden=mask & ~kept if exclude_dropped else None, generator=generator)


class SETEngine(SparseEngine):
    """``sparsity.method: set``."""

    method = "set"

    def _update_layer(self, lay: PrunableLayer, mask: torch.Tensor, weight: torch.Tensor,
                      grad_stat: torch.Tensor | None, epoch: float, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        new = set_prune_grow(mask, weight, self.schedule.drop_fraction_at(epoch), self.target[lay.module], gen,
                             self.exclude_dropped)
        return new, mask & new  # a regrown just-dropped weight keeps its value
