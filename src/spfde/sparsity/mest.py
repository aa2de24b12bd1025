"""MEST+EM&S: memory-economic dynamic sparse training (Yuan et al., NeurIPS 2021).

Method card
-----------
What it does
    Dynamic sparse training that never needs a dense gradient (paper Sections 2 and 5: "we
    choose MEST+EM&S as our training algorithm for weight sparsity since it does not involve any
    dense computations"). Every Δτ epochs each active (non-frozen) layer removes its least
    important weights and grows new ones at random positions.

Schedule (paper Table A3, ``sparsity.*`` / ``train.interval`` keys)
    * Update epochs: ``e > 0``, ``e % Δτ == 0``, ``e <= search_end`` (default 3/4 of training,
      120 of 160), and ``search_end`` itself; no structure change afterwards.
    * Soft memory bound (&S): between updates a layer with target sparsity ``s`` trains at
      ``s' = s - grow_early`` (0.05) before ``grow_switch`` (75 %) of the search and
      ``s' = s - grow_late`` (0.025) after, i.e. slightly denser than the bound ``s``. Each
      update first prunes down to ``RM(s)`` and then grows back up to ``GR(s')``.
    * Elastic mutation (EM): the number of weights swapped per update is ``(s - s')·n``, so the
      mutation shrinks from 5 % to 2.5 % of the layer at the switch.
    * The update at ``search_end`` prunes to exactly ``s`` and grows nothing: the final model
      meets the bound.

Following MEST's public code (boone891214/MEST, ``prune_utils``), with the option that changes it
    * Importance ``|w|`` (``sparsity.mest_lambda`` = 0, MEST's ``--sp-lmd`` default). With λ > 0 the
      score is ``|w| + λ|g|``, ``g`` the mean ``|g|`` over the steps of the *last epoch before the
      update*, from the masked (sparse) gradients training computes anyway (zero at pruned positions,
      which are never candidates for removal); steps whose gradients are not finite or that the loop
      reports as skipped are left out of the mean. With λ = 0 nothing is recorded.
    * Growth: uniformly random among *all* zero positions after the prune, the weights just pruned
      included (MEST zeroes a weight when it prunes it and grows from the zeros, so a regrown weight
      starts at zero either way). Grown weights start at exactly zero with zeroed optimizer state.
      ``sparsity.grow_exclude_dropped: true`` never regrows a weight pruned in the same update (then
      only if a layer lacks other zero positions).
    * Initial mask: random at ``s'`` (``s - grow_early``), so epoch 0 .. first update trains
      under the same soft bound as every later interval (at ``s`` for a layer that takes part in no
      update, e.g. with ``search_end = 0``).
    * The layer-wise budget ``s`` comes from the distribution (``uniform`` with dense first and last
      layers in the paper, or ``erk``); ``s'`` is clamped at 0.
    * A layer's *final* update prunes it to ``s`` and grows nothing: ``search_end`` for a layer that
      never freezes; with freezing (paper Algorithm 1) and ``freezing.prune_on_freeze`` (default) the
      last update before it freezes, so a frozen layer keeps the mask and values it trained with at
      ``s`` and is never edited while frozen (docs/freezing.md).

Expected effect
    Higher accuracy than SET/static masks at the same final sparsity (paper Table 2: +1.6 to
    +4.9 points over SET at 90-98 % sparsity on CIFAR-100), at slightly more training FLOPs
    because training runs at ``s'`` during the search.
"""

from __future__ import annotations

import torch
from torch import nn

from spfde.sparsity.engine import SparseEngine
from spfde.sparsity.masks import PrunableLayer, grow, keep_count, prune_lowest
from spfde.sparsity.schedule import Schedule


def mest_scores(weight: torch.Tensor, grad_stat: torch.Tensor | None, lam: float) -> torch.Tensor:
    """MEST importance ``|w| + λ|g|`` (float32)."""
    s = weight.detach().abs().float()
    if grad_stat is not None and lam:
        s = s + lam * grad_stat.detach().abs().float()
    return s


def mest_prune_grow(
    mask: torch.Tensor, weight: torch.Tensor, grad_stat: torch.Tensor | None, lam: float,
    prune_to: float, grow_to: float, generator: torch.Generator, exclude_dropped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MEST update of one layer: prune to sparsity ``prune_to``, grow randomly to ``grow_to``.

    Returns ``(new mask, pruned mask)``: only the prune's survivors keep their values (MEST zeroes
    what it prunes, so a regrown just-pruned weight restarts at zero).
    """
    n = mask.numel()
    pruned_mask = prune_lowest(mask, mest_scores(weight, grad_stat, lam), keep_count(n, prune_to))
    n_grow = keep_count(n, grow_to) - int(pruned_mask.sum())
    forbidden = mask & ~pruned_mask if exclude_dropped else None
    return grow(pruned_mask, n_grow, forbidden=forbidden, generator=generator), pruned_mask


class MESTEngine(SparseEngine):
    """``sparsity.method: mest`` (default)."""

    method = "mest"
    grad_stat = "sparse_mean_abs"

    def __init__(self, model: nn.Module, layers: list[PrunableLayer], target: dict[str, float],
                 schedule: Schedule, seed: int = 0, mest_lambda: float = 0.0) -> None:
        self.mest_lambda = float(mest_lambda)
        if self.mest_lambda == 0:
            self.grad_stat = None  # pure magnitude: nothing to record
        super().__init__(model, layers, target, schedule, seed)

    def importance(self, weight: torch.Tensor, grad_stat: torch.Tensor | None) -> torch.Tensor:
        return mest_scores(weight, grad_stat, self.mest_lambda)

    def _update_layer(self, lay: PrunableLayer, mask: torch.Tensor, weight: torch.Tensor,
                      grad_stat: torch.Tensor | None, epoch: float, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.target[lay.module]
        # the layer's final update (its last before freezing, or search_end) grows nothing
        grow_to = self.schedule.sparsity_after_update(s, int(epoch), self.final_update.get(lay.module))
        return mest_prune_grow(mask, weight, grad_stat, self.mest_lambda, s, grow_to, gen, self.exclude_dropped)
