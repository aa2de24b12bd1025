"""Per-layer gradient norms and their epoch-to-epoch change (paper Section 4.2.2, Fig. 3b).

Method card
    What: after every ``loss.backward()`` (the controller calls :meth:`GradNormTracker.record` in
        ``before_step``) the L2 norm of each layer's gradient (all its own parameters: weight and
        bias) is added to a per-layer running sum on the device; ``epoch_summary()`` returns the
        mean norm over the epoch's steps and resets. ``grad_norm_change`` gives
        ``|mean_e - mean_{e-1}|`` per layer, the curve of Fig. 3b.
    Paper: Section 4.2.2 ("Freezing Criterion"): the gradient-norm difference drops fast early and
        then keeps fluctuating because of prune-and-grow, so SpFDE does not use a gradient-based
        freezing criterion but ties freezing to the DST interval Δτ.
    Hyper-parameters: ``analysis.grad_norms`` (on/off); ``layer_names`` (default every conv and
        linear module).
    Cost: one ``torch._foreach_norm`` and one ``index_add_`` per step, no host synchronisation;
        the only sync is in ``epoch_summary``. Layers without gradients in a step (frozen blocks)
        are not counted for that step. A step with any non-finite gradient (an fp16 AMP overflow
        step that GradScaler skips) is left out whole; so is a step the loop reports as skipped
        (``record(defer=True)`` then ``commit(skipped)``, which the controller does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from spfde.errors import SpfdeError

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def grad_norm_change(history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]]
                     ) -> dict[str, list[float]]:
    """``{layer: [|g_1 - g_0|, |g_2 - g_1|, ...]}`` from per-epoch mean gradient norms.

    ``history`` is a list of ``epoch_summary()`` dicts (epoch order, e.g. the ``grad_norms``
    column of metrics.jsonl) or ``{layer: [norm per epoch]}``. A layer missing from an epoch
    (``None`` or absent) yields ``nan`` for the differences that involve it.
    """
    if isinstance(history, Mapping):
        series = {k: [float("nan") if v is None else float(v) for v in vals] for k, vals in history.items()}
    else:
        layers: list[str] = []
        for h in history:
            layers += [k for k in (h or {}) if k not in layers]
        series = {k: [float("nan") if (h or {}).get(k) is None else float(h[k]) for h in history] for k in layers}
    return {k: [abs(b - a) for a, b in zip(v[:-1], v[1:], strict=False)] for k, v in series.items()}


class GradNormTracker:
    """Accumulates per-layer gradient L2 norms during an epoch (see the module's method card)."""

    def __init__(self, model: nn.Module, layer_names: Sequence[str] | None = None) -> None:
        modules = dict(model.named_modules())
        if layer_names is None:
            layer_names = [n for n, m in modules.items() if isinstance(m, _LAYER_TYPES)]
        missing = [n for n in layer_names if n not in modules]
        if missing:
            raise SpfdeError(f"GradNormTracker: no module named {missing[0]!r}; use names from model.named_modules()")
        self.layer_names = list(layer_names)
        # (layer index, parameter) for every parameter a tracked layer owns directly
        self._params: list[tuple[int, torch.nn.Parameter]] = [
            (i, p) for i, n in enumerate(self.layer_names) for p in modules[n].parameters(recurse=False)]
        if not self._params:
            raise SpfdeError("GradNormTracker: the selected layers own no parameters")
        device = self._params[0][1].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._sum = torch.zeros(len(self.layer_names), dtype=dtype, device=device)
        self._count = torch.zeros(len(self.layer_names), dtype=dtype, device=device)
        self.history: list[dict[str, float | None]] = []
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def record(self, defer: bool = False) -> None:
        """Add this step's per-layer gradient norms (call after backward, before the optimizer step).

        ``defer``: hold them until :meth:`commit` says whether the optimizer applied the step.
        """
        self._pending = None
        grads, owners = [], []
        for i, p in self._params:
            if p.grad is not None:
                grads.append(p.grad)
                owners.append(i)
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        sq = torch.stack([g.to(self._sum.dtype) for g in norms]).to(self._sum.device) ** 2
        idx, has_grad = self._index(tuple(owners))
        per_layer = torch.zeros_like(self._sum).index_add_(0, idx, sq).sqrt()
        # a step fp16 AMP skips (inf/NaN gradients) must not turn the epoch's mean into inf/NaN
        self._pending = (per_layer, has_grad, torch.isfinite(per_layer).all())
        if not defer:
            self.commit()

    @torch.no_grad()
    def commit(self, skipped: bool | torch.Tensor = False) -> None:
        """Add the norms :meth:`record` held, unless the step was ``skipped`` (bool or 0-dim tensor)."""
        if self._pending is None:
            return
        per_layer, has_grad, ok = self._pending
        self._pending = None
        if skipped is not False:
            ok = ok & ~torch.as_tensor(skipped, device=ok.device)
        self._sum += torch.where(ok, per_layer, torch.zeros_like(per_layer))
        self._count += has_grad * ok

    def _index(self, owners: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # the set of parameters with gradients changes only when blocks freeze; caching the
        # device index avoids a host-to-device copy (and its implicit sync) every step
        hit = self._cache.get(owners)
        if hit is None:
            idx = torch.tensor(owners, device=self._sum.device)
            has = torch.zeros_like(self._count)
            has[idx] = 1.0
            hit = self._cache[owners] = (idx, has)
        return hit

    def epoch_summary(self) -> dict[str, float | None]:
        """``{layer: mean gradient norm over this epoch's steps}`` (``None`` if never recorded); resets."""
        s, c = self._sum.cpu().tolist(), self._count.cpu().tolist()
        out = {n: (s[i] / c[i] if c[i] > 0 else None) for i, n in enumerate(self.layer_names)}
        self._sum.zero_()
        self._count.zero_()
        self.history.append(out)
        return out

    def change(self) -> dict[str, list[float]]:
        """:func:`grad_norm_change` of the epochs summarised so far."""
        return grad_norm_change(self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"layer_names": list(self.layer_names), "sum": self._sum.cpu().clone(),
                "count": self._count.cpu().clone(), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["layer_names"]) != self.layer_names:
            raise SpfdeError("GradNormTracker.load_state_dict: the checkpoint tracks different layers")
        self._sum.copy_(state["sum"].to(self._sum))
        self._count.copy_(state["count"].to(self._count))
        self.history = [dict(h) for h in state.get("history", [])]
