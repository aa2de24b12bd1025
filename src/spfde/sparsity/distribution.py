"""Layer-wise sparsity distributions: ``uniform`` and ``erk``, plus per-layer overrides.

Method card
-----------
* ``uniform`` (paper Section 5, "uniform unstructured sparsity across all the convolutional
  layers while only keeping the first layer dense"): every prunable layer at the target ``s``;
  with ``sparsity.dense_first_layer`` the first prunable layer *in forward order* is dense, and
  with ``sparsity.dense_last_layer`` (default, as the paper prunes only convolutions and MEST keeps
  its last FC layer dense) the last one, the classifier. The overall density is then slightly
  above ``1 - s`` (that is the paper's accounting).
* ``erk`` (Erdős–Rényi-Kernel, Evci et al. 2020, RigL): layer ``l`` gets density
  ``ε · Σ shape_l / Π shape_l``; ``ε`` is solved so the overall density over prunable layers is
  exactly ``1 - s``. A layer whose density would exceed 1 is made dense and ``ε`` is re-solved
  over the rest (the dense-layer redistribution). Layers fixed by an override or by
  ``dense_first_layer`` / ``dense_last_layer`` keep their value and the others absorb the rest.
* ``layer_overrides`` ``{module name: sparsity}`` replace the computed value of that layer.

Errors (:class:`ConfigError`): target or override outside ``[0, 1)``; an override naming a
module that is not prunable; an ``erk`` budget the fixed layers already exceed; a layer that
would keep no weight at all.
"""

from __future__ import annotations

from collections.abc import Mapping

from spfde.errors import ConfigError
from spfde.sparsity.masks import PrunableLayer, keep_count


def _check_fraction(key: str, v: float) -> None:
    if not 0.0 <= v < 1.0:
        raise ConfigError(f"config field '{key}' = {v!r} is out of range; a sparsity must lie in [0, 1)")


def erk_density(
    layers: list[PrunableLayer], density: float, fixed: Mapping[str, float] | None = None
) -> dict[str, float]:
    """ERK densities ``{module: density}`` meeting the overall ``density`` over ``layers``.

    ``fixed`` maps modules to densities that are not redistributed (dense first layer, overrides).
    """
    fixed = dict(fixed or {})
    total = sum(lay.numel for lay in layers)
    budget = density * total
    dense: set[str] = set()
    while True:
        held = {**fixed, **{m: 1.0 for m in dense}}
        free = [lay for lay in layers if lay.module not in held]
        remaining = budget - sum(held[lay.module] * lay.numel for lay in layers if lay.module in held)
        if remaining < -1e-9 * total:
            raise ConfigError(
                f"sparsity.distribution 'erk' cannot meet sparsity.target: the dense/overridden layers "
                f"({', '.join(sorted(held))}) already hold more weights than the density budget "
                f"{density:.4f}; lower their density (sparsity.layer_overrides, dense_first_layer: false) "
                "or lower sparsity.target")
        if not free:
            return {lay.module: held[lay.module] for lay in layers}
        raw = {lay.module: sum(lay.shape) / lay.numel for lay in free}
        eps = max(remaining, 0.0) / sum(raw[lay.module] * lay.numel for lay in free)
        over = [m for m, r in raw.items() if eps * r > 1.0]
        if not over:
            out = {m: float(eps * r) for m, r in raw.items()}
            return {lay.module: held.get(lay.module, out.get(lay.module)) for lay in layers}
        dense.update(over)


def dense_edge_layers(order: list[str], target: float, dense_first_layer: bool = True,
                      dense_last_layer: bool = True, fixed: Mapping[str, float] | None = None) -> set[str]:
    """The layers kept dense by ``dense_first_layer`` / ``dense_last_layer``: the first / last of
    ``order`` (forward order), unless an override fixes them or the target is 0."""
    fixed = fixed or {}
    out = set()
    if target > 0 and order:
        if dense_first_layer and order[0] not in fixed:
            out.add(order[0])
        if dense_last_layer and order[-1] not in fixed:
            out.add(order[-1])
    return out


def layer_sparsity(
    layers: list[PrunableLayer],
    target: float,
    distribution: str = "uniform",
    dense_first_layer: bool = True,
    first_layer: str | None = None,
    overrides: Mapping[str, float] | None = None,
    dense_last_layer: bool = True,
    last_layer: str | None = None,
) -> dict[str, float]:
    """Target sparsity ``{module: s}`` of every prunable layer (see the module card).

    ``first_layer`` / ``last_layer`` are the first / last prunable modules in forward order
    (default: ``layers[0]`` / ``layers[-1]``).
    """
    _check_fraction("sparsity.target", target)
    if not layers:
        raise ConfigError("the model has no prunable layer (no conv/linear weight matched); "
                          "check sparsity.include / sparsity.exclude or use sparsity.method: dense")
    overrides = dict(overrides or {})
    names = {lay.module for lay in layers}
    for m, v in overrides.items():
        if m not in names:
            raise ConfigError(
                f"config field 'sparsity.layer_overrides' names {m!r}, which is not a prunable layer; "
                f"prunable layers: {', '.join(sorted(names)[:8])}{' ...' if len(names) > 8 else ''}")
        _check_fraction(f"sparsity.layer_overrides.{m}", v)
    first = first_layer if first_layer is not None else layers[0].module
    last = last_layer if last_layer is not None else layers[-1].module
    fixed = {m: 1.0 - v for m, v in overrides.items()}
    for m in dense_edge_layers([first, last], target, dense_first_layer, dense_last_layer, fixed):
        fixed[m] = 1.0
    if distribution == "uniform":
        out = {lay.module: 1.0 - fixed.get(lay.module, 1.0 - target) for lay in layers}
    elif distribution == "erk":
        out = {m: 1.0 - d for m, d in erk_density(layers, 1.0 - target, fixed).items()}
    else:
        raise ConfigError(f"config field 'sparsity.distribution' = {distribution!r}; allowed: uniform, erk")
    out = {m: min(max(float(v), 0.0), 1.0) for m, v in out.items()}
    for lay in layers:
        if keep_count(lay.numel, out[lay.module]) < 1:
            raise ConfigError(
                f"layer {lay.module!r} has {lay.numel} weights; at sparsity {out[lay.module]:.4f} none would "
                "remain. Lower its sparsity with sparsity.layer_overrides, exclude it (sparsity.exclude) "
                "or lower sparsity.target")
    return out
