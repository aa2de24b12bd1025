"""An analytic model of training memory (paper Section 5.2, Fig. 4).

Method card
-----------
What: bytes held during one training step of a (sparse, partly frozen) model: weights,
activations saved for backward, gradients of weights and activations, and optimizer state, all in
32-bit floats. Measured once per frozen set with one forward pass of one sample (forward hooks on
leaf modules), then scaled by the batch size.
Paper: Section 5.2 / Fig. 4 ("weights, activations, and the gradient of weights and activations,
using a 32-bit floating-point representation with a batch size of 64"); "SpFDE Min." is the
memory after all target blocks are frozen and "SpFDE Avg." the average over training
(:func:`memory_timeline`).
Hyper-parameters: ``batch_size``, ``optimizer_slots`` (state tensors per weight: 1 for SGD with
momentum, 2 for Adam; :func:`optimizer_slots` reads them off an optimizer, as the controller does).
Expected effect: a frozen prefix needs no saved activations, no weight or activation gradients
and no optimizer state; sparse weights need about ``density × 2`` of the dense bytes.

Counting rules
--------------
* Weights: a dense tensor costs 4 B per element. A masked (sparse) tensor is stored CSR-like: the
  weight is viewed as a ``(out_features, fan_in)`` matrix; each nonzero costs a 4 B fp32 value and
  a 4 B int32 column index, plus ``(rows + 1)`` int32 row pointers. A masked tensor whose CSR form
  is larger than dense (low sparsity) is stored dense.
* Activations: for every leaf module that back-propagation passes through and that is not in
  ``frozen_modules``, the tensor its backward needs (its input; for ReLU-like layers the output,
  same size) × batch size × 4 B. Back-propagation passes through a module when its input requires
  grad or it owns a trainable parameter, so with a frozen prefix nothing is kept for the prefix,
  and parameter-free layers (ReLU, pooling) right after it keep nothing either. Layers whose
  backward needs no tensor (average pooling, flatten, identity, dropout's 1-byte mask is ignored)
  keep none. Only leaf ``nn.Module`` calls are seen: functional ops inside a ``forward``
  (``F.relu``, residual adds) are not counted, so this is a lower bound for such models.
* Weight gradients: trainable (non-frozen) parameters; a sparse tensor's gradient keeps only its
  nonzeros (4 B each; the indices are shared with the weight).
* Activation gradients (working memory): the backward pass holds the gradient of the current
  layer's output and, unless it is the first layer gradients flow to, of its input; we count the
  largest ``(output + input needing grad)`` over the layers back-propagation passes through,
  × batch size × 4 B.
* Optimizer state: ``optimizer_slots`` × the trainable nonzeros × 4 B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

FP32 = 4
INDEX = 4  # int32 column indices and row pointers

# Leaf layers whose backward needs no saved tensor of activation size.
_NO_SAVE = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
            nn.Dropout3d)


def optimizer_slots(optimizer: torch.optim.Optimizer | None) -> int:
    """State tensors ``optimizer`` keeps per weight element (the memory model's ``optimizer_slots``).

    Measured from its state once it has any: the most tensors shaped like their parameter that one
    parameter's state holds (SGD with momentum 1, without 0; Adam/AdamW 2, 3 with ``amsgrad``; any
    optimizer of your own likewise). Before the first step, from its type and hyper-parameters: SGD
    ``momentum > 0`` in any group 1, else 0; Adam, AdamW, Adamax, NAdam, RAdam 2 (+1 ``amsgrad``);
    Adadelta and Rprop 2; RMSprop 1 (+1 ``centered``, +1 ``momentum > 0``); Adagrad 1; any other 1.
    ``None``: 1 (SGD with momentum, the built-in trainer's optimizer)."""
    if optimizer is None:
        return 1
    params = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    measured = [sum(1 for v in st.values() if torch.is_tensor(v) and v.dim() > 0 and v.shape == params[id(p)].shape)
                for p, st in optimizer.state.items() if id(p) in params]
    if measured:
        return max(measured)
    groups = optimizer.param_groups
    any_of = lambda key: any(g.get(key) for g in groups)  # noqa: E731
    o = torch.optim
    if isinstance(optimizer, o.SGD):
        return int(any(float(g.get("momentum", 0.0)) > 0 for g in groups))
    if isinstance(optimizer, (o.Adam, o.AdamW, o.Adamax, o.NAdam, o.RAdam)):
        return 2 + int(any_of("amsgrad"))
    if isinstance(optimizer, (o.Adadelta, o.Rprop)):
        return 2
    if isinstance(optimizer, o.RMSprop):
        return 1 + int(any_of("centered")) + int(any(float(g.get("momentum", 0.0)) > 0 for g in groups))
    return 1


def weight_bytes(param: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Storage of one weight: dense fp32, or CSR-like (value + int32 index per nonzero, row pointers)."""
    dense = param.numel() * FP32
    if mask is None:
        return dense
    rows = param.shape[0] if param.dim() > 0 else 1
    sparse = int(mask.count_nonzero()) * (FP32 + INDEX) + (rows + 1) * INDEX
    return min(dense, sparse)


def _nonzeros(param: torch.Tensor, mask: torch.Tensor | None) -> int:
    return param.numel() if mask is None else int(mask.count_nonzero())


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        for o in obj.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _probe(model: nn.Module, example_input: torch.Tensor, trainable: set[str]) -> list[dict[str, Any]]:
    """One forward of one sample with only ``trainable`` parameters requiring grad; per leaf call:
    name, input/output elements, whether the input requires grad, whether it owns trainable params."""
    records: list[dict[str, Any]] = []
    handles = []
    params = dict(model.named_parameters())
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    train_flags = {m: m.training for m in model.modules()}

    def make_hook(name: str, owns_trainable: bool):
        def hook(_m: nn.Module, args: Any, out: Any) -> None:
            x, y = _first_tensor(args), _first_tensor(out)
            records.append({
                "name": name,
                "module": _m,
                "in": x.numel() if x is not None else 0,
                "out": y.numel() if y is not None else 0,
                "in_grad": bool(x is not None and x.requires_grad),
                "owns_trainable": owns_trainable,
            })
        return hook

    try:
        for n, p in params.items():
            p.requires_grad_(n in trainable)
        for name, m in model.named_modules():
            if next(m.children(), None) is not None:
                continue
            owns = any((f"{name}.{pn}" if name else pn) in trainable for pn, _ in m.named_parameters(recurse=False))
            handles.append(m.register_forward_hook(make_hook(name, owns)))
        model.eval()  # no running-stat updates; same tensor sizes as train mode
        first = next(model.parameters(), None)
        x = example_input[:1].detach()
        if first is not None and x.is_floating_point():
            x = x.to(first.device)
        with torch.enable_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
        for m, t in train_flags.items():
            m.training = t
    return records


def memory_model(
    model: nn.Module,
    example_input: torch.Tensor,
    batch_size: int,
    masks: dict[str, torch.Tensor] | None = None,
    frozen_params: set[str] | frozenset[str] = frozenset(),
    frozen_modules: set[str] | frozenset[str] = frozenset(),
    optimizer_slots: int = 1,
    probes: dict[frozenset[str], list[dict[str, Any]]] | None = None,
) -> dict[str, int]:
    """Training memory in bytes (see the module docstring for the counting rules).

    Args:
        model: the network (the probe restores its ``requires_grad`` flags and train/eval modes).
        example_input: a sample batch; only its first sample is run.
        batch_size: the training batch size activations scale with.
        masks: ``{parameter name: bool mask}`` of sparse weights (``None``: all dense).
        frozen_params: parameters that get no gradient (every other parameter is trainable).
        frozen_modules: module names of frozen blocks; their layers keep no activations.
        optimizer_slots: optimizer state tensors per trainable weight (SGD momentum: 1).
        probes: a store of this model's probe records by trainable set (filled here), for a caller
            that asks every epoch: a probe depends on the model, the input's shape and which
            parameters train, not on the masks or the weights' values.

    Returns ``{"weights", "activations", "weight_grads", "activation_grads", "gradients",
    "optimizer", "total"}``.
    """
    masks = masks or {}
    frozen_params = set(frozen_params)
    frozen_modules = set(frozen_modules)
    named = dict(model.named_parameters())
    trainable = {n for n in named if n not in frozen_params}

    weights = sum(weight_bytes(p, masks.get(n)) for n, p in named.items())
    weight_grads = sum(_nonzeros(p, masks.get(n)) * FP32 for n, p in named.items() if n in trainable)
    optimizer = optimizer_slots * sum(_nonzeros(p, masks.get(n)) * FP32 for n, p in named.items() if n in trainable)

    acts = 0
    work = 0
    key = frozenset(trainable)
    records = probes.get(key) if probes is not None else None
    if records is None:
        records = _probe(model, example_input, trainable)
        if probes is not None:
            probes[key] = records
    for r in records:
        if r["name"] in frozen_modules:
            continue
        backprop = r["in_grad"] or r["owns_trainable"]
        if not backprop:
            continue
        if not isinstance(r["module"], _NO_SAVE):
            acts += r["in"]
        work = max(work, r["out"] + (r["in"] if r["in_grad"] else 0))
    activations = acts * FP32 * batch_size
    activation_grads = work * FP32 * batch_size
    out = {
        "weights": int(weights),
        "activations": int(activations),
        "weight_grads": int(weight_grads),
        "activation_grads": int(activation_grads),
        "optimizer": int(optimizer),
    }
    out["gradients"] = out["weight_grads"] + out["activation_grads"]
    out["total"] = out["weights"] + out["activations"] + out["gradients"] + out["optimizer"]
    return out


def memory_timeline(
    model: nn.Module,
    example_input: torch.Tensor,
    batch_size: int,
    blocks: Sequence[Any],
    frozen_at: Any,
    epochs: int,
    masks: dict[str, torch.Tensor] | None = None,
    optimizer_slots: int = 1,
) -> dict[str, Any]:
    """Memory per epoch under a freezing plan: ``{"per_epoch": [...], "avg", "min", "max"}`` (bytes).

    ``blocks`` are :class:`~spfde.freezing.Block` objects; ``frozen_at`` is a
    :class:`~spfde.freezing.FreezePlan` (or any ``epoch -> set of block indices`` callable, or
    ``None`` for no freezing). "avg" is the paper's "SpFDE Avg.", "min" its "SpFDE Min.". The
    masks are held fixed over the timeline (their density, not their pattern, sets the bytes).
    """
    fn = getattr(frozen_at, "frozen_at", frozen_at)
    cache: dict[frozenset[int], int] = {}
    per_epoch: list[int] = []
    for e in range(epochs):
        idx = frozenset(fn(e)) if fn is not None else frozenset()
        if idx not in cache:
            fp = {p for i in idx for p in blocks[i].param_names}
            fm = {m for i in idx for m in blocks[i].module_names}
            cache[idx] = memory_model(model, example_input, batch_size, masks, fp, fm, optimizer_slots)["total"]
        per_epoch.append(cache[idx])
    return {"per_epoch": per_epoch, "avg": sum(per_epoch) / len(per_epoch) if per_epoch else 0.0,
            "min": min(per_epoch) if per_epoch else 0, "max": max(per_epoch) if per_epoch else 0}
