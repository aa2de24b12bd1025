"""Which parameter, and which module, every counted FLOP of a forward pass belongs to.

Method card
-----------
What: one forward pass of the real model under a ``TorchDispatchMode`` that sees every aten op
with its arguments. Each op ``torch.utils.flop_counter`` has a formula for (matmuls,
convolutions, attention kernels; a multiply-add counts 2) is charged to a *unit*:

* an op with a parameter among its arguments (matched by tensor storage, so views such as
  ``w.t()``, the q/k/v slices of a fused ``in_proj_weight`` and functional calls like
  ``nn.MultiheadAttention``'s ``F.linear(x, out_proj.weight)`` are all caught) goes to that
  parameter's unit (:func:`spfde.sparsity.masks.unit_name`: the module name for a ``weight``,
  the parameter name otherwise). A weight shared under several names (GPT-2's
  ``lm_head.weight`` is ``transformer.wte.weight``) is charged under the name that belongs to
  the module running the op, so the head's matmul is the head's work;
* an op with no parameter and two operands that require grad (``QKᵀ`` and ``AV``, written by
  hand or inside ``F.scaled_dot_product_attention`` / ``nn.MultiheadAttention``) goes to the
  innermost running module's attention unit ``"<module>.[attention]"``: dense work, no weight
  to prune, but it is back-propagated like a weight's op (both operands need gradients), so
  freezing its block removes its backward;
* anything else (a matmul with a buffer or a constant tensor) is ``other``: reported, never
  charged.

The CPU kernel of ``scaled_dot_product_attention`` has no formula in ``FlopCounterMode``; it is
counted analytically (``2·B·L·S·(E + Ev)``, causal masking counted as full, as the GPU formulas
do). So is ``nn.LSTM``'s CPU kernel ``aten.mkldnn_rnn_layer`` (:func:`_rnn_layer_flops`): its two
matmuls go to ``weight_ih_lN`` and ``weight_hh_lN``; uncounted, an LSTM would cost nothing in the
ledger, its blocks nothing to Algorithm 1, and its weights would be missing from the forward order
``sparsity.dense_first_layer`` / ``dense_last_layer`` read.

Training conditions: the pass runs in train mode with autograd on and the
``nn.MultiheadAttention`` fast path off, so the ops are the ones training runs (eval/no-grad
would take fused kernels that hide work). Buffers (batch-norm statistics) and the RNG state are
restored afterwards, so measuring never changes what training does. A one-sample input is run
twice over (batch 2: train-mode batch norm needs two values) and divided back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from spfde.errors import SpfdeError, first_line
from spfde.names import name_matches

#: suffix of the ledger unit that holds a module's activation-activation matmuls
ATTENTION = "[attention]"


def attention_unit(module: str) -> str:
    """The ledger unit of ``module``'s attention matmuls (``"blocks.0.attn.[attention]"``)."""
    return f"{module}.{ATTENTION}" if module else ATTENTION


def is_attention_unit(unit: str) -> bool:
    return unit == ATTENTION or unit.endswith("." + ATTENTION)


@dataclass
class ForwardTrace:
    """Per-sample forward FLOPs of one traced pass.

    Attributes:
        units: ``{unit: FLOPs per sample}`` in the order the units first did work.
        other: FLOPs per sample no unit could be given (a buffer or constant operand).
        param_order: parameter names in the order ops first used them.
    """

    units: dict[str, int] = field(default_factory=dict)
    other: int = 0
    param_order: list[str] = field(default_factory=list)

    @property
    def attention(self) -> int:
        return sum(v for k, v in self.units.items() if is_attention_unit(k))

    @property
    def weights(self) -> int:
        return sum(v for k, v in self.units.items() if not is_attention_unit(k))


def _sdpa_flops(args: tuple[Any, ...]) -> int:
    """``QKᵀ`` plus ``AV`` of a ``scaled_dot_product_attention`` call: ``2·B·L·S·(E + Ev)``."""
    q, k, v = args[:3]
    batch = 1
    for d in q.shape[:-2]:
        batch *= int(d)
    lq, e = int(q.shape[-2]), int(q.shape[-1])
    s, ev = int(k.shape[-2]), int(v.shape[-1])
    return 2 * batch * lq * s * (e + ev)


def _rnn_layer_flops(args: tuple[Any, ...]) -> tuple[int, int]:
    """``(input-to-hidden, hidden-to-hidden)`` matmul FLOPs of one ``aten.mkldnn_rnn_layer`` call.

    The CPU (oneDNN) kernel ``nn.LSTM`` runs per layer and direction, one op that has no formula in
    ``FlopCounterMode``: counted analytically, ``2·(T·B)·(gates·H)·in`` for ``x W_ihᵀ`` and
    ``2·(T·B)·(gates·H)·H`` for ``h W_hhᵀ`` (every step), as the per-step ``addmm`` of GRU/RNN are
    counted; the gates' element-wise work is not a matmul and is not counted, as elsewhere.
    """
    x, w_ih, w_hh = args[:3]
    rows = x.numel() // max(int(x.shape[-1]), 1)  # T·B whatever the layout
    return 2 * rows * w_ih.numel(), 2 * rows * w_hh.numel()


def _is_rnn_layer(packet: Any) -> bool:
    return str(packet) == "aten.mkldnn_rnn_layer"


def _is_sdpa(packet: Any) -> bool:
    name = str(packet)
    return "scaled_dot_product" in name and "backward" not in name


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return None


class _Attributor(TorchDispatchMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        from spfde.sparsity.masks import unit_name

        self.registry = flop_registry
        self.stack: list[str] = [""]
        # storage -> (canonical name, all names); one tensor may be registered under several names
        names: dict[int, list[str]] = {}
        canonical: dict[int, str] = {}
        by_id: dict[int, nn.Parameter] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
            canonical.setdefault(id(p), n)
            by_id[id(p)] = p
        # several parameters may be views of one flat storage: keep their element ranges
        self.params: dict[int, list[tuple[int, int, str, list[str], int]]] = {}
        for i, p in by_id.items():
            ptr = _storage(p)
            if ptr is not None and p.numel():
                lo = p.storage_offset()
                self.params.setdefault(ptr, []).append((lo, lo + p.numel(), canonical[i], names[i], p.dim()))
        self.buffers = {ptr for b in model.buffers() if b.numel() and (ptr := _storage(b)) is not None}
        self.unit_name = unit_name
        self.trace = ForwardTrace()
        self.raw: dict[str, int] = {}
        self.other = 0

    # ------------------------------------------------------------------ module stack
    def hooks(self, model: nn.Module) -> list[Any]:
        handles = []
        for name, m in model.named_modules():
            def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
                self.stack.append(name)

            def post(_m: nn.Module, _a: Any, _o: Any) -> None:
                self.stack.pop()
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        return handles

    # ------------------------------------------------------------------ ops
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if _is_rnn_layer(packet):  # nn.LSTM on CPU: without this, its weights would cost nothing and be unseen
            out = func(*args, **kwargs)
            ih, hh = _rnn_layer_flops(args)
            self._charge(ih, (args[0], args[1]), {}, False)
            self._charge(hh, (args[5], args[2]), {}, False)
            return out
        counted = packet in self.registry or _is_sdpa(packet)
        if not counted:
            with self:  # as FlopCounterMode: an op without a formula may decompose into ops with one
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        if counted:
            if packet in self.registry:
                flops = int(self.registry[packet](*args, **kwargs, out_val=out))
            else:
                flops = _sdpa_flops(args)
            if flops:
                self._charge(flops, args, kwargs, _is_sdpa(packet))
        return out

    def _charge(self, flops: int, args: tuple[Any, ...], kwargs: dict[str, Any], sdpa: bool) -> None:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
        found = [f for t in tensors if (f := self._param_of(t)) is not None]
        if found:
            # the weight, not the bias, of addmm(bias, x, w.t())
            canonical, names, _ = next((f for f in found if f[2] >= 2), found[0])
            if canonical not in self.trace.param_order:
                self.trace.param_order.append(canonical)
            unit = self.unit_name(self._nearest(canonical, names))
        elif not any(_storage(t) in self.buffers for t in tensors) and (
                sdpa or sum(t.requires_grad for t in tensors) >= 2):
            unit = attention_unit(self.stack[-1])
        else:
            self.other += flops
            return
        self.raw[unit] = self.raw.get(unit, 0) + flops

    def _param_of(self, t: torch.Tensor) -> tuple[str, list[str], int] | None:
        cands = self.params.get(_storage(t))
        if not cands:
            return None
        off = t.storage_offset()
        for lo, hi, canonical, names, dim in cands:
            if len(cands) == 1 or lo <= off < hi:
                return canonical, names, dim
        return None

    def _nearest(self, canonical: str, names: list[str]) -> str:
        """The name of a shared weight that belongs to the innermost running module (or an ancestor)."""
        if len(names) == 1:
            return canonical
        for mod in reversed(self.stack):
            inside = [n for n in names if not mod or name_matches(n, mod)]  # a parameter is never its module
            if inside:
                return min(inside, key=lambda n: n.count("."))
        return canonical


def trace_forward(model: nn.Module, example_input: torch.Tensor) -> ForwardTrace:
    """Per-sample forward FLOPs of ``model`` on ``example_input``, by unit (see the module card)."""
    x = example_input.detach()
    first = next(model.parameters(), None)
    if first is not None:
        x = x.to(first.device)  # token ids too
    if x.dim() > 0 and x.shape[0] == 1:
        x = torch.cat([x, x])  # train-mode batch norm needs two values per channel
    batch = int(x.shape[0]) if x.dim() > 0 else 1
    modes = {m: m.training for m in model.modules()}
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    mode = _Attributor(model)
    handles = mode.hooks(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    devices = [first.device] if first is not None and first.device.type == "cuda" else []
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        model.train()
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), mode:
            try:
                model(x)
            except (TypeError, RuntimeError, ValueError, IndexError) as e:
                # the first call of the user's model on their input: say what was called, not only where
                raise SpfdeError(
                    f"the model's forward failed on example_input (per-sample shape {tuple(example_input.shape[1:])}) "
                    f"({type(e).__name__}: {first_line(e)}). example_input must be "
                    "one batch as the model's forward takes it as its only argument (e.g. "
                    "next(iter(loader))[0]); a model with several inputs needs a wrapper module that "
                    "takes one tensor") from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])
    trace = mode.trace
    trace.units = {u: f // batch for u, f in mode.raw.items() if f // batch > 0}
    trace.other = mode.other // batch
    return trace
