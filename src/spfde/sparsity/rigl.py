"""RigL: Rigging the Lottery (Evci et al., ICML 2020).

Method card
-----------
What it does
    Like SET, but new weights are grown where the *dense* gradient magnitude is largest. At every
    update epoch each active layer drops ``f(e)`` of its active weights by smallest ``|w|`` and
    grows the same number at the zero positions with the largest ``|∂L/∂w|``; density stays at
    the target; grown weights start at zero.

Schedule and hyper-parameters
    * Update epochs as MEST (every Δτ epochs up to ``search_end``).
    * ``f(e) = α/2 · (1 + cos(π e / search_end))``, ``α = sparsity.drop_fraction`` (0.3).

The dense gradient, and what it costs
    Autograd computes the weight gradient of a zeroed weight densely anyway, so during the
    epoch before an update ``before_step`` copies ``p.grad`` *before masking* (the last step's
    copy is kept). That is one dense weight-gradient per update: ``needs_dense_grad(epoch)`` is
    True for that epoch and the controller charges one step at dense weight-gradient cost
    (:class:`spfde.accounting.flops.FlopsLedger`, ``dense_grad=True``). A ``batch_grad_fn``
    passed to ``update`` (runs forward+backward on one batch) replaces the recorded gradient with
    a fresh one, as in the original RigL; the caller then owns the cost of that extra step.

Our choices
    Growth excludes the weights dropped in the same update (fallback when a layer has no other
    zero position); the initial mask is random at the target (not ERK-initialised unless
    ``sparsity.distribution: erk``).

Expected effect
    Better accuracy than SET at the same density, at the price of one dense gradient per update
    (which rules it out for the edge setting the paper targets, Section 2).
"""

from __future__ import annotations

import torch

from spfde.errors import SpfdeError
from spfde.sparsity.engine import BatchGradFn, SparseEngine
from spfde.sparsity.masks import PrunableLayer, grow, keep_count
from spfde.sparsity.set import magnitude_drop


def rigl_prune_grow(mask: torch.Tensor, weight: torch.Tensor, dense_grad: torch.Tensor, fraction: float,
                    sparsity: float) -> torch.Tensor:
    """One RigL update of one layer: magnitude drop, gradient-magnitude growth back to ``sparsity``."""
    kept = magnitude_drop(mask, weight, fraction)
    n_grow = keep_count(mask.numel(), sparsity) - int(kept.sum())
    return grow(kept, n_grow, scores=dense_grad.detach().abs(), forbidden=mask & ~kept)


def run_batch_grad(model: torch.nn.Module, fn: BatchGradFn) -> dict[str, torch.Tensor]:
    """Run ``fn`` (forward+backward on one batch, or returning a loss to backpropagate) and
    return the dense gradients by parameter name; the model's ``.grad`` are cleared afterwards
    and its buffers (batch-norm statistics) restored."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad():
        out = fn()
        if torch.is_tensor(out) and out.requires_grad:
            out.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    for p in model.parameters():
        p.grad = None
    return grads


class RigLEngine(SparseEngine):
    """``sparsity.method: rigl``."""

    method = "rigl"
    grad_stat = "dense_last"

    def needs_dense_grad(self, epoch: int) -> bool:
        return self.schedule.needs_dense_grad(epoch)

    def _gradient_stats(self, batch_grad_fn: BatchGradFn | None) -> dict[str, torch.Tensor]:
        if self.schedule.drop_fraction_at(self.epoch) <= 0:
            return {}
        if batch_grad_fn is not None:
            grads = run_batch_grad(self.model, batch_grad_fn)
            return {n: g for n, g in grads.items() if n in self._params}
        if self._grad_steps:
            return dict(self._grad_buf)
        raise SpfdeError(
            f"rigl needs a dense gradient for the update at epoch {self.epoch}: call "
            "engine.before_step() after every backward of the previous epoch (the controller does), "
            "or pass batch_grad_fn to update()")

    def _update_layer(self, lay: PrunableLayer, mask: torch.Tensor, weight: torch.Tensor,
                      grad_stat: torch.Tensor | None, epoch: int, gen: torch.Generator) -> torch.Tensor:
        fraction = self.schedule.drop_fraction_at(epoch)
        if fraction <= 0 or grad_stat is None:
            return mask.clone()
        return rigl_prune_grow(mask, weight, grad_stat, fraction, self.target[lay.module])
