"""Training-FLOPs accounting: per-layer FLOPs, the ledger, and the plan of a run without training.

Method card
-----------
Per-unit FLOPs (:func:`layer_forward_flops`, measured by :mod:`spfde.accounting.trace`)
    The dense forward FLOPs of one sample per *unit*, measured once on the real model and input
    shape the way training runs (train mode, autograd on, no fused fast path; buffers and RNG
    restored), with ``FlopCounterMode``'s formulas (a multiply-add counts 2). A unit is a
    parameter that counted ops use (named like the sparsity tables: the module name for a
    ``weight``, ``"blocks.0.attn.in_proj_weight"`` otherwise), matched by storage so functional
    calls count, or a module's attention matmuls (``"<module>.[attention]"``: ``QKᵀ``, ``AV``,
    ``scaled_dot_product_attention``), dense and charged like any layer, so freezing its block
    removes their backward. Batch-norm, activations, pooling and additions are not counted, as in
    the paper's accounting. Work the tracer cannot give a unit (a matmul with a buffer) is
    reported by :func:`forward_flops_breakdown` as ``other`` and left out of the ledger
    (``spfde flops`` and ``summary.json`` show it). The dict is in forward order.

The ledger (:class:`FlopsLedger`, paper Section 5 / Table 2 convention)
    For a batch of ``B`` samples, per layer ``l`` with dense forward FLOPs ``F_l`` and density
    ``d_l``:

    * forward ``d_l·F_l`` for every layer (frozen layers still run forward, Section 4.2.1), except
      layers served from the frozen-prefix activation cache (``cached``, :mod:`spfde.freezing.cache`):
      they do not run, so they cost no forward either; filling the cache is charged once per row
      computed (:func:`modules_forward_flops`);
    * backward ``2·d_l·F_l`` for layers that are not frozen: an input-gradient half and a
      weight-gradient half, each ``d_l·F_l``; frozen layers cost no backward;
    * ``backward="exact"``: the first non-frozen layer in forward order has no earlier layer that
      needs its input gradient (everything before it is frozen or is the data), so its
      input-gradient half is dropped;
    * ``dense_grad=True`` (a RigL update step): the weight-gradient half is charged at density 1.
      RigL keeps the gradient of the *last* step of the epoch before an update (step mode: of the
      step the update follows), so that step (whatever its batch size) is the one charged so;
      :meth:`FlopsLedger.dense_grad_surcharge`.
    * A step the optimizer skipped (a GradScaler overflow, ``after_step(..., skipped=True)``) is
      charged like any other: its forward and backward were computed.

    The charge is ``B`` times the per-sample sum. A dense layer (no mask) has density 1.

Dense baseline (:func:`dense_train_flops`)
    ``3 · Σ F_l · n_samples · epochs``: full data, no sparsity, no freezing.

Planning (:func:`planned_flops`)
    Replays the sparsity schedule (:mod:`spfde.sparsity.schedule`, with each layer's final update
    from the same :meth:`~spfde.sparsity.schedule.Schedule.last_update_epochs` the engine is given),
    a freezing plan and the sieving ratio through the same ledger, epoch by epoch, without training. ResNet-32 2x on
    CIFAR-100 (≈ 549 MFLOPs forward) at 90/95/98 % for 160 epochs of 50,000 samples gives
    Table 2's 1.32/0.66/0.26 × 10^15 for SET/static.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from spfde.names import covered_by


# ----------------------------------------------------------------------------- measuring
def forward_flops_breakdown(model: nn.Module, example_input: torch.Tensor) -> tuple[dict[str, int], int]:
    """``({unit: dense forward FLOPs per sample}, other)`` measured on ``example_input``.

    The units are in forward order; the input's batch dimension is divided out. The pass runs the
    way training does (:mod:`spfde.accounting.trace`) and leaves buffers and RNG state as they were.
    """
    from spfde.accounting.trace import trace_forward

    trace = trace_forward(model, example_input)
    return trace.units, trace.other


def layer_forward_flops(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Dense forward FLOPs per sample of every unit (weights and attention matmuls), in forward order."""
    return forward_flops_breakdown(model, example_input)[0]


def forward_flops_summary(layer_flops: Mapping[str, int], other: int = 0) -> dict[str, int]:
    """Dense forward FLOPs per sample by kind: ``weight_``, ``attention_`` and ``other_forward_flops_per_sample``
    (``other`` is measured but not charged by the ledger)."""
    from spfde.accounting.trace import is_attention_unit

    attention = sum(int(v) for k, v in layer_flops.items() if is_attention_unit(k))
    return {"weight_forward_flops_per_sample": sum(int(v) for v in layer_flops.values()) - attention,
            "attention_forward_flops_per_sample": attention,
            "other_forward_flops_per_sample": int(other)}


# ----------------------------------------------------------------------------- pure helpers
def _frozen_layers(names: Iterable[str], frozen: Iterable[str]) -> set[str]:
    """Layers frozen directly or through an ancestor module (``layer1`` freezes ``layer1.0.conv1``)."""
    fz = set(frozen)
    if not fz:
        return set()
    return {n for n in names if covered_by(n, fz)}


def per_sample_flops(layer_flops: Mapping[str, int], density: Mapping[str, float],
                     frozen: Iterable[str] = (), backward: str = "paper", dense_grad: bool = False,
                     layer_order: list[str] | None = None, cached: Iterable[str] = ()) -> dict[str, float]:
    """Training FLOPs of one sample: ``{"forward", "backward", "total"}`` (see the module card).

    ``cached``: module names served from the activation cache (frozen too): no forward.
    """
    order = list(layer_order) if layer_order is not None else list(layer_flops)
    fz = _frozen_layers(order, frozen)
    cz = _frozen_layers(order, cached)
    first_active = next((n for n in order if n not in fz), None)
    fwd = bwd = 0.0
    for n in order:
        f = float(layer_flops[n])
        d = float(density.get(n, 1.0))
        if n not in cz:
            fwd += d * f
        if n in fz:
            continue
        wgrad = f if dense_grad else d * f
        igrad = 0.0 if backward == "exact" and n == first_active else d * f
        bwd += wgrad + igrad
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def modules_forward_flops(layer_flops: Mapping[str, int], density: Mapping[str, float],
                          modules: Iterable[str]) -> float:
    """Forward FLOPs of one sample through the layers in ``modules`` (or under them): ``Σ d·F``."""
    return sum(float(density.get(n, 1.0)) * float(layer_flops[n]) for n in _frozen_layers(layer_flops, modules))


def bp_flops(layer_flops: Mapping[str, int], density: Mapping[str, float] | None = None,
             modules: Iterable[str] | None = None) -> dict[str, float]:
    """Per-module backward FLOPs per sample at ``density`` (paper Algorithm 1's ``BpFlops``): ``2·d·F``."""
    density = density or {}
    names = list(modules) if modules is not None else list(layer_flops)
    return {n: 2.0 * float(density.get(n, 1.0)) * float(layer_flops[n]) for n in names}


def dense_train_flops(layer_flops: Mapping[str, int], n_samples: int, epochs: int) -> int:
    """The dense baseline: ``3 · Σ F · n_samples · epochs`` (full data, no freezing)."""
    return int(3 * sum(int(v) for v in layer_flops.values()) * int(n_samples) * int(epochs))


# ----------------------------------------------------------------------------- the ledger
class FlopsLedger:
    """Running training-FLOPs count; the controller charges every optimizer step.

    Args:
        layer_flops: ``{module: dense forward FLOPs per sample}`` in forward order.
        backward: ``"paper"`` (backward = 2 × forward) or ``"exact"`` (module card).
        layer_order: forward order, if it differs from ``layer_flops``'s key order.
    """

    def __init__(self, layer_flops: Mapping[str, int], backward: str = "paper",
                 layer_order: list[str] | None = None) -> None:
        if backward not in ("paper", "exact"):
            raise ValueError(f"backward must be 'paper' or 'exact', got {backward!r}")
        self.layer_flops = dict(layer_flops)
        self.backward = backward
        self.layer_order = list(layer_order) if layer_order is not None else list(self.layer_flops)
        self._epoch = 0.0
        self._total = 0.0
        # per-sample totals by (densities, frozen, cached, dense_grad): they change only at structure
        # updates and freezes; with frozen blocks one costs ~60 us to recompute, three per step (issue 13)
        self._per_sample: dict[tuple, float] = {}

    def cost(self, batch_size: int, density: Mapping[str, float], frozen: Iterable[str] = (),
             dense_grad: bool = False, cached: Iterable[str] = ()) -> float:
        """FLOPs of one step of ``batch_size`` samples (nothing is charged)."""
        frozen, cached = frozenset(frozen), frozenset(cached)
        key = (tuple(density.items()), frozen, cached, bool(dense_grad))
        per = self._per_sample.get(key)
        if per is None:
            per = per_sample_flops(self.layer_flops, density, frozen, self.backward, dense_grad, self.layer_order,
                                   cached)["total"]
            if len(self._per_sample) >= 4096:  # a schedule that never repeats: keep memory bounded
                self._per_sample.clear()
            self._per_sample[key] = per
        return batch_size * per

    def charge(self, batch_size: int, density: Mapping[str, float], frozen: Iterable[str] = frozenset(),
               dense_grad: bool = False, cached: Iterable[str] = frozenset()) -> float:
        """Add one step; ``density`` maps modules to densities (missing: 1), ``frozen`` are module names,
        ``cached`` the modules served from the activation cache in this step (no forward)."""
        c = self.cost(batch_size, density, frozen, dense_grad, cached)
        self._epoch += c
        self._total += c
        return c

    def add(self, flops: float) -> None:
        """Add FLOPs costed elsewhere (the dense-gradient surcharge of a step already charged)."""
        self._epoch += flops
        self._total += flops

    def dense_grad_surcharge(self, batch_size: int, density: Mapping[str, float],
                             frozen: Iterable[str] = frozenset()) -> float:
        """What one step costs more when its weight gradients are computed densely (RigL)."""
        return self.cost(batch_size, density, frozen, dense_grad=True) - self.cost(batch_size, density, frozen)

    @property
    def epoch_flops(self) -> int:
        return int(round(self._epoch))

    @property
    def total_flops(self) -> int:
        return int(round(self._total))

    def end_epoch(self) -> int:
        """This epoch's FLOPs; resets the epoch counter."""
        out = self.epoch_flops
        self._epoch = 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_flops": self._epoch, "total_flops": self._total, "backward": self.backward}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._epoch = float(state["epoch_flops"])
        self._total = float(state["total_flops"])


# ----------------------------------------------------------------------------- planning
def _density(sparsity: float, numel: int | None) -> float:
    if numel:
        from spfde.sparsity.masks import keep_count

        return keep_count(numel, sparsity) / numel
    return 1.0 - sparsity


FrozenSpec = Callable[[int], Iterable[str]] | Mapping[str, int] | None


def _frozen_fn(spec: FrozenSpec) -> Callable[[int], set[str]]:
    if spec is None:
        return lambda e: set()
    if callable(spec):
        return lambda e: set(spec(e))
    plan = dict(spec)
    return lambda e: {m for m, fe in plan.items() if e >= fe}


def planned_flops(
    cfg: Any,
    layer_flops: Mapping[str, int],
    n_train: int,
    layer_order: list[str] | None = None,
    *,
    frozen_fn: FrozenSpec = None,
    freeze_plan: Mapping[str, int] | None = None,
    sieve_ratio: float | None = None,
    samples_per_epoch: int | Callable[[int], int] | None = None,
    engine: Any = None,
    layer_sparsity: Mapping[str, float] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    cache: bool = False,
) -> dict[str, Any]:
    """Planned training FLOPs of a run following ``cfg`` (no training).

    Args:
        cfg: the run's :class:`~spfde.config.Config` (method, target, schedule, epochs, batch size).
        layer_flops: :func:`layer_forward_flops` of the model.
        n_train: training-set size (the dense baseline uses all of it every epoch).
        layer_order: forward order of the layers (default: ``layer_flops`` order).
        frozen_fn: ``epoch -> frozen module names`` or ``{module: freeze epoch}``;
            ``freeze_plan`` is an alias for the mapping form.
        sieve_ratio: ``p``; samples per epoch ``n_train - round(p·n_train)`` (default
            ``cfg.sieving.ratio`` unless ``sieving.method`` is none). ``samples_per_epoch``
            overrides it: a number, or ``epoch -> samples`` when it changes over the run
            (``sieving.method: static`` removes its share only after the warm-up).
        engine: a built :class:`~spfde.sparsity.SparseEngine`; its per-layer targets and weight
            counts are used (densities then match the masks to the weight).
            Without it, ``layer_sparsity`` ``{module: s}``; without that, ``uniform`` from ``cfg``
            over the layers of ``layer_flops`` (``erk`` needs an engine).
        cache: assume the built-in trainer's frozen-prefix activation cache serves every frozen
            block (``freezing.cache: on``): each frozen layer's forward is charged once per
            training sample when it joins the cache (all ``n_train`` rows are filled, extended from
            the previous boundary's rows), and then not at all, except in batches of another size
            than the first (the short last batch runs the prefix for real).

    Returns:
        ``{"train_flops", "dense_train_flops", "dense_forward_flops_per_sample", "flops_saving",
        "epochs", "samples_per_epoch", "method", "epoch_flops": [...], "final_density",
        "bp_flops_saved", "cache_assumed"}``; ``bp_flops_saved`` is what freezing takes off the ledger at the densities
        the run has (the backward FLOPs of the frozen blocks, the paper's definition of the saving).
    """
    from spfde.errors import ConfigError
    from spfde.freezing.cache import served_samples
    from spfde.sparsity.schedule import Schedule

    sp = cfg.sparsity
    epochs = int(epochs if epochs is not None else cfg.train.epochs)
    order = list(layer_order) if layer_order is not None else list(layer_flops)
    batch_size = int(batch_size if batch_size is not None else cfg.data.batch_size)
    schedule = Schedule.from_config(cfg)
    if sp.method == "dense":
        target: dict[str, float] = {}
    elif engine is not None:
        target = dict(engine.layer_sparsity_target())
    elif layer_sparsity is not None:
        target = dict(layer_sparsity)
    elif sp.distribution == "uniform":
        from spfde.sparsity.distribution import dense_edge_layers

        unknown = sorted(set(sp.layer_overrides) - set(order))
        if unknown:
            raise ConfigError(f"config field 'sparsity.layer_overrides' names {unknown[0]!r}, which is not a "
                              "layer of the model")
        from spfde.accounting.trace import is_attention_unit

        weighted = [n for n in order if not is_attention_unit(n)]  # attention matmuls have no weight to prune
        target = {n: sp.layer_overrides.get(n, sp.target) for n in weighted}
        for n in dense_edge_layers(weighted, sp.target, sp.dense_first_layer, sp.dense_last_layer,
                                   sp.layer_overrides):
            target[n] = 0.0
    else:
        raise ConfigError("planning an 'erk' distribution needs the model: pass engine=build_sparsity(...)")

    if samples_per_epoch is None and sieve_ratio is None and cfg.sieving.method == "static" and cfg.sieving.ratio:
        from spfde.sieving import build_sieve

        samples_per_epoch = build_sieve(cfg, int(n_train)).planned_samples  # all samples until the removal
    if samples_per_epoch is None:
        p = sieve_ratio if sieve_ratio is not None else (
            cfg.sieving.ratio if cfg.sieving.method != "none" else 0.0)
        samples_per_epoch = int(n_train) - int(round(p * int(n_train)))
    samples_at = samples_per_epoch if callable(samples_per_epoch) else (lambda _e, n=int(samples_per_epoch): n)
    frozen_of = _frozen_fn(freeze_plan if freeze_plan is not None else frozen_fn)

    def frozen_layers_at(e: int) -> set[str]:
        return _frozen_layers(order, frozen_of(e))

    # the same rule the engine is given: with prune_on_freeze a layer's final update is its last before freezing
    final = schedule.last_update_epochs(target, frozen_layers_at if cfg.freezing.prune_on_freeze else None)
    sparsity_per_epoch = schedule.replay(target, epochs, frozen_layers_at, final)
    # with the model's layers known, count weights exactly as the masks do (keep_count rounding)
    numel = {lay.module: lay.numel for lay in getattr(engine, "layers", [])}
    ledger = FlopsLedger(layer_flops, backward=cfg.accounting.backward, layer_order=order)
    per_epoch: list[int] = []
    saved = 0.0
    step = 0
    in_cache: set[str] = set()  # layers whose rows the cache holds (its current boundary)
    ref = 0                     # the batch size the rows were computed at
    for e in range(epochs):
        frozen = frozen_of(e)
        density = {m: _density(v, numel.get(m)) for m, v in sparsity_per_epoch[e].items()}
        n = int(samples_at(e))
        frozen_layers = frozen_layers_at(e)
        if cache and frozen_layers:
            if frozen_layers != in_cache:  # filled at the freeze: extended from the old rows, else from the input
                extend = bool(in_cache) and in_cache <= frozen_layers and ref == min(batch_size, n)
                ref = min(batch_size, n)
                new = frozen_layers - in_cache if extend else frozen_layers
                ledger.add(int(n_train) * modules_forward_flops(layer_flops, density, new))
                in_cache = frozen_layers
            served = served_samples(n, batch_size, ref)
            ledger.charge(served, density, frozen, cached=frozen)
            ledger.charge(n - served, density, frozen)
        else:
            in_cache = set()
            ledger.charge(n, density, frozen)
        if frozen:  # backward only (the paper's definition), with or without the cache
            saved += ledger.cost(n, density) - ledger.cost(n, density, frozen)
        steps = math.ceil(n / batch_size) if n > 0 else 0
        last_batch = n - batch_size * (steps - 1)
        if schedule.needs_dense_grad(e) and n > 0:  # RigL keeps the epoch's last gradient: last batch
            ledger.add(ledger.dense_grad_surcharge(last_batch, density, frozen))
        if schedule.per_step and schedule.method == "rigl":  # step mode: the step each update follows
            k = schedule.interval_steps
            for t in range(-(-(step + 1) // k) * k, step + steps + 1, k):
                if schedule.is_update_step(t, e):
                    b = last_batch if t == step + steps else batch_size
                    ledger.add(ledger.dense_grad_surcharge(b, density, frozen))
        step += steps
        per_epoch.append(ledger.end_epoch())
    dense = dense_train_flops(layer_flops, n_train, epochs)
    total = ledger.total_flops
    fwd_dense = sum(int(v) for v in layer_flops.values())
    last = sparsity_per_epoch[-1] if sparsity_per_epoch else {}
    return {
        "train_flops": total,
        "dense_train_flops": dense,
        "dense_forward_flops_per_sample": fwd_dense,
        "flops_saving": 1.0 - total / dense if dense else 0.0,
        "epochs": epochs,
        "samples_per_epoch": int(samples_at(epochs - 1)) if epochs else 0,
        "method": sp.method,
        "epoch_flops": per_epoch,
        "final_density": {m: _density(v, numel.get(m)) for m, v in last.items()},
        "bp_flops_saved": int(round(saved)),
        "cache_assumed": bool(cache),
    }
