"""Prunable-layer discovery and the pure mask operations every method is built from.

Everything here is a pure function of its inputs (tensors, shapes, a ``torch.Generator``), so
the methods in :mod:`spfde.sparsity.mest`, ``set``, ``rigl`` and ``static`` are short
compositions that can be tested by hand.

Counting rule (used everywhere, also by the FLOPs planner): a layer with ``n`` weights at
sparsity ``s`` keeps ``keep_count(n, s) = n - round(s * n)`` weights, so its density is
``1 - s`` up to one weight (``|density - (1 - s)| <= 0.5 / n``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from spfde.errors import ConfigError
from spfde.utils import probe_forward

#: Module types pruned by default (paper Section 5: "all the convolutional layers"; linear
#: layers are included as in MEST/RigL; ``sparsity.exclude`` removes any of them).
DEFAULT_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable module: its name, the name of its weight parameter and the weight's shape."""

    module: str
    param: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def keep_count(numel: int, sparsity: float) -> int:
    """Number of weights a layer of ``numel`` weights keeps at ``sparsity``."""
    return numel - int(round(sparsity * numel))


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` names the module itself or one of its ancestors (``layer1`` covers ``layer1.0.conv1``)."""
    return name == pattern or name.startswith(pattern + ".")


def find_prunable(
    model: nn.Module, include: list[str] | None = None, exclude: Iterable[str] = ()
) -> list[PrunableLayer]:
    """The prunable modules of ``model`` in ``named_modules`` order.

    Default: every conv/linear module with a ``weight``. ``include`` (module names or ancestor
    names) replaces the default with any module that owns a weight of 2+ dims; ``exclude``
    removes modules (same matching). A name that matches no module is a :class:`ConfigError`.
    """
    modules = dict(model.named_modules())
    exclude = list(exclude)
    for key, names in (("include", include or []), ("exclude", exclude)):
        for pat in names:
            if not any(_matches(n, pat) for n in modules if n):
                raise ConfigError(
                    f"config field 'sparsity.{key}' names {pat!r}, which is not a module of "
                    f"{type(model).__name__}; use names from model.named_modules(), e.g. "
                    f"{', '.join(repr(n) for n in list(modules)[1:4])}")
    out: list[PrunableLayer] = []
    for name, mod in modules.items():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2:
            continue
        if include is not None:
            if not any(_matches(name, p) for p in include):
                continue
        elif not isinstance(mod, DEFAULT_PRUNABLE):
            continue
        if any(_matches(name, p) for p in exclude):
            continue
        out.append(PrunableLayer(name, f"{name}.weight" if name else "weight", tuple(w.shape)))
    return out


def forward_order(model: nn.Module, names: list[str], example_input: torch.Tensor | None) -> list[str]:
    """``names`` sorted by the order their modules first run on ``example_input``.

    Without an input (or for modules the forward never reaches) ``named_modules`` order is kept.
    The pass runs in eval mode under ``no_grad`` so batch-norm statistics are not touched.
    """
    if example_input is None or not names:
        return list(names)
    modules = dict(model.named_modules())
    seen: list[str] = []
    hooks = []
    for n in names:
        def hook(_m: nn.Module, _i: object, _o: object, n: str = n) -> None:
            if n not in seen:
                seen.append(n)
        hooks.append(modules[n].register_forward_hook(hook))
    with probe_forward(model, hooks):
        model(example_input)
    return seen + [n for n in names if n not in seen]


# ----------------------------------------------------------------------------- mask operations


def random_mask(shape: tuple[int, ...], keep: int, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask of ``shape`` with exactly ``keep`` ones at uniformly random positions (CPU)."""
    n = 1
    for d in shape:
        n *= d
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:keep]] = True
    return flat.view(shape)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores`` (same shape)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        flat[torch.topk(scores.reshape(-1), k, sorted=False).indices] = True
    return flat.view(scores.shape)


def prune_lowest(mask: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` active positions of ``mask`` with the highest ``scores``; drop the rest.

    Inactive positions are never selected. ``keep`` larger than the active count keeps ``mask``.
    """
    active = int(mask.sum())
    if keep >= active:
        return mask.clone()
    s = scores.detach().float().masked_fill(~mask, float("-inf"))
    return topk_mask(s, keep)


def grow(
    mask: torch.Tensor, n: int, scores: torch.Tensor | None = None, forbidden: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Activate ``n`` inactive positions of ``mask``: those with the largest ``scores`` or, when
    ``scores`` is None, uniformly random ones (from ``generator``).

    Positions in ``forbidden`` (e.g. the weights pruned in the same update) are used only when
    there are not enough other inactive positions. Returns the new mask.
    """
    if n <= 0:
        return mask.clone()
    if scores is None:
        if generator is None:
            raise ValueError("random growth needs a generator")
        scores = torch.rand(mask.numel(), generator=generator).view(mask.shape).to(mask.device)
    s = scores.detach().float()
    free = ~mask
    cand = free & ~forbidden if forbidden is not None else free
    n_cand = int(cand.sum())
    if n <= n_cand:
        return mask | topk_mask(s.masked_fill(~cand, float("-inf")), n)
    # Not enough fresh positions: take them all, then the best of the forbidden ones.
    rest = free & ~cand
    extra = min(n - n_cand, int(rest.sum()))
    return mask | cand | topk_mask(s.masked_fill(~rest, float("-inf")), extra)
