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

Our choices (documented because the paper leaves them open)
    * Importance ``|w| + λ|g|`` (``sparsity.mest_lambda``, λ = 1). ``g`` is the mean of ``|g|``
      over the steps of the *last epoch before the update*, taken from the masked (sparse)
      gradients training computes anyway, so it is only nonzero at active positions; inactive
      positions are never candidates for removal. Averaging over one epoch is cheaper than
      tracking the whole interval (one ``abs`` + ``add`` per step in 1 of Δτ epochs) and less
      noisy than one minibatch. If no gradient was recorded (``update`` called outside the
      normal loop) the score falls back to ``|w|``.
    * Growth: uniformly random among the zero positions, excluding the weights pruned in the
      same update (otherwise the update could undo itself); only if a layer lacks other zero
      positions are just-pruned ones reused. Grown weights start at exactly zero and their
      optimizer state is zeroed.
    * Initial mask: random at ``s'`` (``s - grow_early``), so epoch 0 .. first update trains
      under the same soft bound as every later interval. With ``search_end = 0`` it starts at ``s``.
    * The layer-wise budget ``s`` comes from the distribution (``uniform`` with a dense first
      layer in the paper, or ``erk``); ``s'`` is clamped at 0.
    * A frozen layer (paper Algorithm 1) keeps its mask and values, even past ``search_end``,
      except that when it freezes during the search, at ``s'``, it is pruned once to exactly ``s``
      by ``|w| + λ|g|`` (``freezing.prune_on_freeze``, default on; docs/freezing.md).

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
    prune_to: float, grow_to: float, generator: torch.Generator,
) -> torch.Tensor:
    """One MEST update of one layer: prune to sparsity ``prune_to``, grow randomly to ``grow_to``."""
    n = mask.numel()
    pruned_mask = prune_lowest(mask, mest_scores(weight, grad_stat, lam), keep_count(n, prune_to))
    n_grow = keep_count(n, grow_to) - int(pruned_mask.sum())
    return grow(pruned_mask, n_grow, forbidden=mask & ~pruned_mask, generator=generator)


class MESTEngine(SparseEngine):
    """``sparsity.method: mest`` (default)."""

    method = "mest"
    grad_stat = "sparse_mean_abs"

    def __init__(self, model: nn.Module, layers: list[PrunableLayer], target: dict[str, float],
                 schedule: Schedule, seed: int = 0, mest_lambda: float = 1.0) -> None:
        self.mest_lambda = float(mest_lambda)
        if self.mest_lambda == 0:
            self.grad_stat = None  # pure magnitude: nothing to record
        super().__init__(model, layers, target, schedule, seed)

    def importance(self, weight: torch.Tensor, grad_stat: torch.Tensor | None) -> torch.Tensor:
        return mest_scores(weight, grad_stat, self.mest_lambda)

    def _update_layer(self, lay: PrunableLayer, mask: torch.Tensor, weight: torch.Tensor,
                      grad_stat: torch.Tensor | None, epoch: int, gen: torch.Generator) -> torch.Tensor:
        s = self.target[lay.module]
        return mest_prune_grow(mask, weight, grad_stat, self.mest_lambda, s,
                               self.schedule.sparsity_after_update(s, epoch), gen)
