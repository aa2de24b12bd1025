"""Weight sparsity (paper Sections 2, 4.1, 5; Table A3): masks, distributions and methods.

``build_sparsity(model, cfg, example_input)`` returns a :class:`SparseEngine` for
``cfg.sparsity.method``:

=========  ==================================================================================
``mest``   MEST+EM&S (default, the paper's method): |w| prune (λ|g| optional), random grow, soft bound
``set``    magnitude prune, random grow, cosine-decayed drop fraction (per epoch or per step)
``rigl``   magnitude prune, dense-gradient grow (one dense gradient per update; per epoch or step)
``static`` fixed random or SNIP mask
``dense``  no masks
=========  ==================================================================================

Prunable parameters are conv/linear weights and ``nn.MultiheadAttention``'s projections by default
(``sparsity.include`` / ``exclude`` take parameter or module names; :func:`find_prunable`);
the layer-wise budget comes from :mod:`spfde.sparsity.distribution` (first and last layer in
forward order dense by default); the update schedule from :mod:`spfde.sparsity.schedule`. See each
method module for its card; docs/sparsity.md lists every default and the option that changes it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from spfde.config import Config
from spfde.errors import ConfigError
from spfde.sparsity.distribution import erk_density, layer_sparsity
from spfde.sparsity.engine import DenseEngine, SparseEngine
from spfde.sparsity.masks import PrunableLayer, default_prunable, find_prunable, forward_order, keep_count
from spfde.sparsity.mest import MESTEngine
from spfde.sparsity.rigl import RigLEngine
from spfde.sparsity.schedule import Schedule
from spfde.sparsity.set import SETEngine
from spfde.sparsity.static import StaticEngine

__all__ = [
    "DenseEngine",
    "MESTEngine",
    "PrunableLayer",
    "RigLEngine",
    "SETEngine",
    "Schedule",
    "SparseEngine",
    "StaticEngine",
    "build_sparsity",
    "erk_density",
    "find_prunable",
    "forward_order",
    "keep_count",
    "layer_sparsity",
]


class SparsityWarning(UserWarning):
    """A sparsity setting that does not do what it says (one line, the run goes on)."""


def build_sparsity(model: nn.Module, cfg: Config, example_input: torch.Tensor | None = None,
                   snip_batch: Any = None) -> SparseEngine:
    """The sparse engine for ``cfg.sparsity`` on ``model``.

    ``example_input`` (one batch) finds the first and last prunable layers in forward order for
    ``dense_first_layer`` / ``dense_last_layer``; without it ``named_modules`` order is used. ``snip_batch`` is
    ``(inputs, targets)`` or a callable for ``static_init: snip``. The returned engine's masks
    are chosen but not yet applied: call ``engine.apply_masks()``.
    """
    sp = cfg.sparsity
    if sp.update_unit == "step" and sp.method not in ("set", "rigl"):
        raise ConfigError(f"config field 'sparsity.update_unit' = 'step' is for rigl and set; {sp.method} updates at "
                          "epoch boundaries (Algorithm 1): set sparsity.update_unit: epoch")
    engine = _build_engine(model, cfg, example_input, snip_batch)
    engine.exclude_dropped = sp.grow_exclude_dropped
    return engine


def _refuse_only_fixed(model: nn.Module) -> None:
    """No prunable layer because every conv/linear weight has ``requires_grad=False``: say so.

    Such weights are never pruned (:func:`~spfde.sparsity.masks.find_prunable`); a model whose blocks
    an earlier :class:`~spfde.controller.SpFDE` froze, or a fully frozen backbone, would otherwise get
    "no conv/linear weight matched", which sends the user to ``sparsity.include``.
    """
    modules = dict(model.named_modules())
    fixed = [n for n, p in model.named_parameters() if not p.requires_grad and p.dim() >= 2
             and default_prunable(modules[n.rpartition(".")[0]], n.rpartition(".")[2])]
    if fixed:
        raise ConfigError(
            f"the model has no prunable layer: its {len(fixed)} conv/linear weight(s) (e.g. {fixed[0]!r}) have "
            "requires_grad=False (fixed before SpFDE was built, e.g. by an earlier SpFDE's freezing), and such "
            "weights are never pruned; make them trainable (model.requires_grad_(True)) before building SpFDE, or "
            "use sparsity.method: dense")


def _build_engine(model: nn.Module, cfg: Config, example_input: torch.Tensor | None,
                  snip_batch: Any) -> SparseEngine:
    sp = cfg.sparsity
    schedule = Schedule.from_config(cfg)
    layers = find_prunable(model, sp.include, sp.exclude)
    if sp.method == "dense" or (not layers and sp.target == 0 and not sp.layer_overrides):
        return DenseEngine(model, layers, {lay.module: 0.0 for lay in layers},
                           Schedule(method="dense", interval=schedule.interval, search_end=schedule.search_end),
                           cfg.seed)
    if not layers and sp.include is None:
        _refuse_only_fixed(model)
    order = forward_order(model, [lay.module for lay in layers], example_input)
    by_name = {lay.module: lay for lay in layers}
    layers = [by_name[m] for m in order]
    target = layer_sparsity(layers, sp.target, sp.distribution, sp.dense_first_layer,
                            first_layer=order[0] if order else None, overrides=sp.layer_overrides,
                            dense_last_layer=sp.dense_last_layer, last_layer=order[-1] if order else None)
    if sp.target > 0 and layers and not any(target.values()):
        # every prunable layer is an edge layer kept dense: the run would train dense under a sparse name
        warnings.warn_explicit(
            f"sparsity.target = {sp.target} prunes nothing: the model's only prunable layers "
            f"({', '.join(repr(m) for m in order)}) are its first and last, which sparsity.dense_first_layer / "
            "sparsity.dense_last_layer keep dense; set those to false to prune them",
            SparsityWarning, "spfde.sparsity", 0, module="spfde.sparsity")
    if sp.method == "mest":
        return MESTEngine(model, layers, target, schedule, cfg.seed, mest_lambda=sp.mest_lambda)
    if sp.method == "set":
        return SETEngine(model, layers, target, schedule, cfg.seed)
    if sp.method == "rigl":
        return RigLEngine(model, layers, target, schedule, cfg.seed)
    if sp.method == "static":
        return StaticEngine(model, layers, target, schedule, cfg.seed, init=sp.static_init, snip_batch=snip_batch)
    raise ConfigError(f"config field 'sparsity.method' = {sp.method!r}; allowed: mest, set, rigl, static, dense")
