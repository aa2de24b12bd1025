"""Static masks: a fixed random or SNIP mask chosen at initialisation (paper Table 2 baselines).

Method card
-----------
What it does
    The mask is chosen once and never changes; training only updates the surviving weights.

``sparsity.static_init``
    * ``random``: uniformly random positions per layer at the layer's target sparsity
      (from ``make_generator(seed, "sparsity-init", layer)``).
    * ``snip`` (Lee et al., ICLR 2019): keep the weights with the largest connection sensitivity
      ``|w ⊙ ∂L/∂w|`` computed on one batch at initialisation. Our choice: the selection is per
      layer at the distribution's sparsity (uniform/erk), not one global threshold, so every
      method shares the same layer-wise budget and FLOPs. The batch comes from
      ``build_sparsity(..., snip_batch=(x, y) or a callable)`` or from
      ``update(0, batch_grad_fn=...)``; until then the layers are dense. The batch's forward pass
      does not change batch-norm statistics (they are restored).

Expected effect
    The cheapest sparse baseline (training FLOPs exactly ``(1 - s)`` of dense); lower accuracy
    than dynamic methods at high sparsity (paper Table 2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from spfde.errors import SpfdeError
from spfde.sparsity.engine import BatchGradFn, SparseEngine
from spfde.sparsity.masks import PrunableLayer, keep_count, topk_mask
from spfde.sparsity.rigl import run_batch_grad
from spfde.sparsity.schedule import Schedule


def snip_mask(weight: torch.Tensor, grad: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``1 - sparsity`` share of ``weight`` with the largest ``|w · g|``."""
    return topk_mask((weight.detach() * grad.detach()).abs().float(), keep_count(weight.numel(), sparsity))


class StaticEngine(SparseEngine):
    """``sparsity.method: static`` with ``static_init`` random or snip."""

    method = "static"

    def __init__(self, model: nn.Module, layers: list[PrunableLayer], target: dict[str, float],
                 schedule: Schedule, seed: int = 0, init: str = "random",
                 snip_batch: Any = None) -> None:
        self.init = init
        self.snip_pending = init == "snip"
        super().__init__(model, layers, target, schedule, seed)
        if self.snip_pending and snip_batch is not None:
            self.snip(snip_batch)

    def _init_masks(self) -> None:
        if self.init == "snip":
            for lay in self.masked_layers:  # dense until SNIP has seen a batch
                self._set_mask(lay.param, torch.ones(lay.shape, dtype=torch.bool))
        else:
            super()._init_masks()

    @torch.no_grad()
    def snip(self, batch: Any) -> None:
        """Choose the SNIP masks from one batch: ``(inputs, targets)`` or a ``batch_grad_fn``."""
        if callable(batch):
            fn: BatchGradFn = batch
        else:
            try:
                x, y = batch[0], batch[1]
            except (TypeError, IndexError, KeyError):
                raise SpfdeError("snip_batch must be (inputs, targets) or a callable running one "
                                 "forward+backward (or returning the loss)") from None
            fn = lambda: nn.functional.cross_entropy(self.model(x), y)  # noqa: E731
        grads = run_batch_grad(self.model, fn)
        for lay in self.masked_layers:
            if lay.param not in grads:
                raise SpfdeError(f"SNIP: layer {lay.module!r} received no gradient from the batch; "
                                 "check that the batch function runs the whole model")
            self._set_mask(lay.param, snip_mask(self._params[lay.param], grads[lay.param], self.target[lay.module]))
        self.snip_pending = False
        self._state_dirty = True
        self.apply_masks()

    def update(self, epoch: int, frozen_params: Iterable[str] = frozenset(),
               batch_grad_fn: BatchGradFn | None = None) -> dict[str, Any]:
        self.epoch = int(epoch)
        if self.snip_pending:
            if batch_grad_fn is None:
                raise SpfdeError(
                    "sparsity.static_init 'snip' needs one training batch: pass snip_batch=(x, y) to "
                    "build_sparsity or batch_grad_fn to update(0), or set sparsity.static_init: random")
            self.snip(batch_grad_fn)
            return {"updated": True, "pruned": sum(lay.numel - self._counts[lay.module]
                                                   for lay in self.masked_layers), "grown": 0,
                    "density": self.density()}
        return {"updated": False, "pruned": 0, "grown": 0}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "snip_pending": self.snip_pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.snip_pending = bool(state.get("snip_pending", False))
