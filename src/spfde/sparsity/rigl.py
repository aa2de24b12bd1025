"""RigL: Rigging the Lottery (Evci et al., ICML 2020).

Method card
-----------
What it does
    Like SET, but new weights are grown where the *dense* gradient magnitude is largest. At every
    update epoch each active layer drops ``f(e)`` of its active weights by smallest ``|w|`` and
    grows the same number at the zero positions with the largest ``|∂L/∂w|``; density stays at
    the target; grown weights start at zero.

Schedule and hyper-parameters
    * Update epochs as MEST (every Δτ epochs up to ``search_end``, SpFDE's default: Algorithm 1
      updates at epoch boundaries), or RigL's own unit, ``sparsity.update_unit: step``: every
      ``sparsity.update_interval_steps`` (ΔT, 100 in the RigL paper) optimizer steps taken during the
      epochs before ``search_end``; frozen layers are skipped.
    * ``f(e) = α/2 · (1 + cos(π e / search_end))``, ``α = sparsity.drop_fraction`` (0.3); ``e`` is the
      fractional epoch of the update in step mode.

The dense gradient, and what it costs
    Autograd computes the weight gradient of a zeroed weight densely anyway, so during the
    epoch before an update (step mode: the step of the update) ``before_step`` copies ``p.grad``
    *before masking* (the last step whose gradients are finite and that the loop did not report as
    skipped is kept). That is one dense weight-gradient per update: the controller charges the step
    it came from at dense weight-gradient cost (:class:`spfde.accounting.flops.FlopsLedger`,
    ``dense_grad=True``), and :func:`~spfde.accounting.flops.planned_flops` plans the same. A
    ``batch_grad_fn`` passed to ``update`` (runs forward+backward on one batch) replaces the recorded
    gradient with a fresh one, as in the original RigL; the caller then owns the cost of that step.

Following RigL's public code (google-research/rigl ``SparseRigLOptimizer``, rigl-torch)
    Growth picks the largest dense ``|g|`` among every position outside the post-drop mask, so a
    just-dropped weight can come straight back, keeping its value and optimizer state
    (``reinit_when_same = False``); ``sparsity.grow_exclude_dropped: true`` excludes just-dropped
    positions instead (fallback when a layer has no other zero position). Other grown weights start
    at zero. The initial mask is random at the target (ERK only with ``sparsity.distribution: erk``).
    One difference: RigL skips the optimizer step of an update step; we apply it.

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
                    sparsity: float, exclude_dropped: bool = False) -> torch.Tensor:
    """One RigL update of one layer: magnitude drop, gradient-magnitude growth back to ``sparsity``."""
    kept = magnitude_drop(mask, weight, fraction)
    n_grow = keep_count(mask.numel(), sparsity) - int(kept.sum())
    return grow(kept, n_grow, scores=dense_grad.detach().abs(), forbidden=mask & ~kept if exclude_dropped else None)


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

    def _gradient_stats(self, batch_grad_fn: BatchGradFn | None, progress: float
                        ) -> dict[str, torch.Tensor] | None:
        if self.schedule.drop_fraction_at(progress) <= 0:
            return {}
        if batch_grad_fn is not None:
            grads = run_batch_grad(self.model, batch_grad_fn)
            return {n: g for n, g in grads.items() if n in self._params}
        if int(self._grad_steps):
            return dict(self._grad_buf)
        if self._grad_calls:
            return None  # every step that could feed it was skipped or not finite: no update
        raise SpfdeError(
            f"rigl needs a dense gradient for the update at epoch {self.epoch}: call "
            "engine.before_step() after every backward of the previous epoch (the controller does), "
            "or pass batch_grad_fn to update()")

    def _update_layer(self, lay: PrunableLayer, mask: torch.Tensor, weight: torch.Tensor,
                      grad_stat: torch.Tensor | None, epoch: float, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        fraction = self.schedule.drop_fraction_at(epoch)
        if fraction <= 0 or grad_stat is None:
            return mask.clone(), mask
        new = rigl_prune_grow(mask, weight, grad_stat, fraction, self.target[lay.module], self.exclude_dropped)
        return new, mask & new  # a regrown just-dropped weight keeps its value
