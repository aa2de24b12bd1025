"""Sparse ``nn.Linear`` (and fused attention projections): a CSR autograd function.

Two implementations of the same three products, chosen per call:

* **native** (``sparse_conv.cpp``, ``spfde_linear_*``; used whenever :func:`native.load` returns
  the library): rows (samples, tokens) innermost in 16-wide vectors, register accumulation,
  parallel over OpenMP threads with the GIL released, bit-identical for any thread count (issue
  13: the pure-PyTorch path below did not scale with threads). Method notes in the C++ source.
* **pure PyTorch** (the fallback when the library did not build): forward ``y = W_csr @ x^T``
  (CSR ``addmm``, the bias fused), transposed back; input gradient ``gx = W^T_csr @ gy^T``;
  weight gradient at the nonzeros by ``torch.sparse.sampled_addmm`` on the mask's pattern.

Both compute the weight gradient at the nonzeros only and scatter it into a dense tensor that is
zero at every pruned position; the transposed (CSC) structure is built once per mask. fp32 on
CPU; inputs of any rank (``(..., in_features)``) and strides. Other dtypes, devices and autocast
run the module's dense forward.

**GELU epilogue** (:func:`linear_act`, a transformer MLP's ``fc1`` -> ``GELU``): the native
forward applies the GELU to each output tile while it is still feature-major in registers' reach
and keeps the GELU's derivative in the same packed layout; the backward multiplies the output
gradient by it while packing it, which it does anyway. So the GELU costs neither a pass over the
activations of its own, forward or backward, nor an autograd node (11% of a ViT-preset MEST step,
``bench/step_breakdown.py``'s ``unfused GELU`` row, docs/benchmarks.md). Without the native
library, or in a step that needs RigL's dense weight gradient, it is ``F.gelu`` after the sparse
Linear.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spfde.sparsity.kernels import native
from spfde.sparsity.kernels.common import (
    NonzeroIndex,
    first_order_only,
    index_counts,
    is_dense_storage,
    note_masked_grad,
)

_quiet = [False]


def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if _quiet[0]:
        return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)
    # torch warns once per process that CSR tensors are a beta feature; the ops used here are stable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        out = torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)
    _quiet[0] = True
    return out


def unsupported_linear(module: nn.Module) -> str | None:
    """Why ``module`` cannot use the sparse Linear path (None when it can)."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return "not a plain nn.Linear"
    return None


class LinearPlan:
    """CSR and transposed-CSR index structures of one masked ``(out, in)`` weight."""

    def __init__(self, mask: torch.Tensor, weight: torch.Tensor) -> None:
        self.index = NonzeroIndex(mask.cpu(), weight.stride())
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        rows, cols = self.index.coords
        self.crow = index_counts(rows, self.shape[0])
        self.col = cols.to(torch.int32)
        self.perm = torch.sort(cols, stable=True).indices  # CSR order -> order of W^T's CSR
        self.tcrow = index_counts(cols, self.shape[1])
        self.tcol = rows[self.perm].to(torch.int32)
        self.perm32 = self.perm.to(torch.int32)  # the native kernel reads W^T's values through it
        # the native calls' index arguments, as addresses once (the tensors live as long as the plan)
        self.ptrs = {k: getattr(self, k).data_ptr() for k in ("crow", "col", "tcrow", "tcol", "perm32")}
        self.ptrs["offsets"] = self.index.offsets.data_ptr()
        #: called with each weight gradient a sparse backward writes (common.note_masked_grad)
        self.note: Any = None

    @property
    def nnz(self) -> int:
        return self.index.nnz

    def matrix(self, vals: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.col, vals, self.shape)

    def transposed(self, vals: torch.Tensor) -> torch.Tensor:
        return _csr(self.tcrow, self.tcol, vals[self.perm], self.shape[::-1])


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, width)`` fp32 matrix with unit column stride (a copy only when needed);
    any row stride (a sliced or expanded input) is read in place."""
    t2 = t.reshape(-1, width).float()
    return t2.contiguous() if width > 1 and t2.stride(1) != 1 else t2


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("spfde sparse linear: out of memory for its scratch buffers")


class SparseLinearFunction(torch.autograd.Function):
    """``y = x @ (weight * mask)^T + bias`` with work proportional to the mask's nonzeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan,
                dense_weight_grad: bool, sparse_weight_grad: bool | None = None, gelu: int = 0) -> torch.Tensor:
        # gelu: 0 none; 1 GELU fused, forward only (no backward will run); 2 fused, derivative kept
        # (native library only, never with dense_weight_grad: _fused_gelu decides)
        out_f, in_f = plan.shape
        vals = plan.index.gather(weight.detach())
        lib = native.load(quiet=True)  # no library: the pure-PyTorch path below (no warning: still sparse)
        ctx.plan, ctx.dense_weight_grad, ctx.x_shape, ctx.lib = plan, dense_weight_grad, x.shape, lib
        if gelu and lib is None:
            raise RuntimeError("SparseLinearFunction: the fused GELU needs the native library")
        if lib is not None:
            x2 = _rows(x, in_f)
            n = x2.shape[0]
            b = bias.detach().contiguous() if bias is not None else None
            y = torch.empty((n, out_f), dtype=torch.float32)
            # the sparse weight gradient reads x as the forward packs it: keep the packed tiles instead of
            # x (about the same bytes), so the backward does not pack x again. None: whenever the weight
            # needs a gradient (sparse_linear passes whether autograd records this call)
            if sparse_weight_grad is None:
                sparse_weight_grad = ctx.needs_input_grad[1]
            keep = sparse_weight_grad and not dense_weight_grad
            xk = torch.empty(lib.spfde_linear_packed_floats(n, in_f), dtype=torch.float32) if keep else None
            dk = torch.empty(lib.spfde_linear_packed_floats(n, out_f), dtype=torch.float32) if gelu == 2 else None
            p = plan.ptrs
            _check(lib.spfde_linear_forward(x2.data_ptr(), n, in_f, x2.stride(0), out_f, p["crow"], p["col"],
                                            vals.data_ptr(), _ptr(b), y.data_ptr(), y.stride(0),
                                            torch.get_num_threads(), _ptr(xk), int(gelu > 0), _ptr(dk)))
            # x itself only for a weight gradient from x (RigL's dense one, or a caller that asked for no
            # packed copy); the input gradient alone needs neither
            ctx.x_packed = keep
            ctx.save_for_backward(xk if keep else (x2 if ctx.needs_input_grad[1] else None), vals, weight, dk)
            return y.view(*x.shape[:-1], out_f)
        x2 = x.reshape(-1, in_f)
        a = plan.matrix(vals)
        if bias is not None:
            yt = torch.addmm(bias.detach().unsqueeze(1), a, x2.t())
        else:
            yt = torch.sparse.mm(a, x2.t())
        ctx.save_for_backward(x2, vals, weight, None)
        return yt.t().contiguous().view(*x.shape[:-1], out_f)

    @staticmethod
    @first_order_only  # a double backward (create_graph=True) raises instead of dropping gradients
    def backward(ctx, gy: torch.Tensor):
        plan: LinearPlan = ctx.plan
        # read once: non-reentrant activation checkpointing allows one unpack per backward
        x2, vals, weight, dk = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.lib is not None:
            return SparseLinearFunction._native_backward(ctx, gy, x2, vals, weight, dk, need_x, need_w, need_b)
        g2 = gy.reshape(-1, plan.shape[0]).float()
        gx = gw = gb = None
        if need_x:
            # a row-major gy^T: MKL's CSR x dense is 2-3x faster on it for long batches (ViT tokens)
            gx = torch.sparse.mm(plan.transposed(vals), g2.t().contiguous()).t().contiguous().view(ctx.x_shape)
        if need_w and ctx.dense_weight_grad:  # RigL's update reads the dense weight gradient
            gw = g2.t() @ x2
        elif need_w:
            gvals = torch.sparse.sampled_addmm(plan.matrix(vals), g2.t(), x2, beta=0.0).values()
            gw = plan.index.scatter(gvals, weight)
            note_masked_grad(plan, gw)
        if need_b:
            gb = g2.sum(0)
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def _native_backward(ctx, gy: torch.Tensor, xs: torch.Tensor | None, vals: torch.Tensor, weight: torch.Tensor,
                         dk: torch.Tensor | None, need_x: bool, need_w: bool, need_b: bool):
        plan: LinearPlan = ctx.plan  # xs: x's packed tiles (ctx.x_packed), else x
        out_f, in_f = plan.shape
        g2 = _rows(gy, out_f)
        n = g2.shape[0]
        dense_w = need_w and ctx.dense_weight_grad  # RigL's update reads the dense weight gradient
        sparse_w = need_w and not dense_w
        gx = torch.empty((n, in_f), dtype=torch.float32) if need_x else None
        gw = None
        zero_rows = False
        if sparse_w:  # written by the kernel: its nonzeros, zeros elsewhere
            zero_rows = weight.stride() == (in_f, 1)
            # the kernel zeroes a row-major gradient itself (in parallel); another layout is zeroed here
            gw = torch.empty_strided(weight.shape, weight.stride())
            if not zero_rows:
                gw.zero_()
        kernel = need_x or sparse_w
        if dk is not None and (dense_w or not kernel):  # _fused_gelu rules these out at the forward
            raise RuntimeError("SparseLinearFunction: a fused GELU's backward must run the native kernel")
        # the kernel sums the bias gradient from the output gradient it packs anyway
        gb = torch.empty(out_f, dtype=torch.float32) if need_b and kernel else None
        if kernel:
            p = plan.ptrs
            x2, xkept = (None, xs) if ctx.x_packed else (xs, None)
            _check(ctx.lib.spfde_linear_backward(
                _ptr(x2), x2.stride(0) if x2 is not None else 0, g2.data_ptr(), g2.stride(0), n, in_f, out_f,
                p["crow"], p["col"], vals.data_ptr(), p["tcrow"], p["tcol"], p["perm32"], _ptr(gx), in_f, _ptr(gw),
                p["offsets"], int(zero_rows), _ptr(gb), torch.get_num_threads(), _ptr(xkept), _ptr(dk)))
            if sparse_w:
                note_masked_grad(plan, gw)
        if dense_w:
            gw = g2.t() @ xs
        if need_b and gb is None:
            gb = g2.sum(0)
        return (gx.view(ctx.x_shape) if gx is not None else None), gw, gb, None, None, None, None


def linear_input_issue(weight: torch.Tensor, x: torch.Tensor) -> str | None:
    """Why this call cannot run sparse (then the module's dense forward runs), None when it can; ``""``
    for a call whose dense forward needs no explanation (an empty input; a wrong width, which
    PyTorch's own error reports)."""
    if x.numel() == 0 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return ""
    return linear_type_issue(weight, x.dtype, x.device)


def linear_type_issue(weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> str | None:
    """:func:`linear_input_issue`'s part that an input's dtype and device decide (a fused call asks it
    for a Linear whose input it forms itself)."""
    if not (device.type == "cpu" and weight.is_cpu):
        return f"input on {device.type}, weight on {weight.device.type} (the sparse kernels are CPU only)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on (the sparse kernels are fp32 only)"
    if dtype != torch.float32 or weight.dtype != torch.float32:
        return f"input {dtype}, weight {weight.dtype} (the sparse kernels are fp32 only)"
    if not (weight.is_contiguous() or is_dense_storage(weight)):
        return "the weight does not fill its storage (a strided view)"
    return None


def linear_input_ok(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """True when this call can run sparse (else the module's dense forward runs)."""
    return linear_input_issue(weight, x) is None


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan,
                  dense_weight_grad: bool = False, gelu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` through the CSR path (call :func:`linear_input_ok` first);
    ``gelu``: ``F.gelu`` of it (erf form), fused into the native kernel where it can be."""
    # forward cannot tell whether autograd records it (needs_input_grad ignores no_grad): decided here
    sparse_w = torch.is_grad_enabled() and weight.requires_grad
    fused = _fused_gelu(x, weight, bias, dense_weight_grad, sparse_w) if gelu else 0
    y = SparseLinearFunction.apply(x, weight, bias, plan, dense_weight_grad, sparse_w, fused)
    return F.gelu(y) if gelu and not fused else y


def _fused_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dense_weight_grad: bool,
                sparse_w: bool) -> int:
    """How a GELU after this call runs: 0 ``F.gelu`` after it, 1 fused (no backward will run), 2 fused
    with its derivative kept. Fused only where every gradient comes out of the native backward
    kernel, which applies the derivative: not with RigL's dense weight gradient (computed from the
    output gradient in Python), nor for a call whose only gradient is the bias's."""
    if native.load(quiet=True) is None:
        return 0
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    if not grad:
        return 1
    return 2 if not dense_weight_grad and (x.requires_grad or sparse_w) else 0


#: the keyword :func:`linear_act` passes to a Linear whose forward SparseExecution installed
EPILOGUE_KWARG = "spfde_epilogue"
#: the keyword :func:`~.attention.prenorm_attention` passes (the block's pre-norm) to an attention
#: module whose forward SparseExecution installed
PROLOGUE_KWARG = "spfde_prologue"
#: the keyword it passes with it: whether the call returns ``x +`` the attention (the block's residual)
RESIDUAL_KWARG = "spfde_residual"


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hooked(m: nn.Module, forward_pre: bool = True) -> bool:
    """Whether ``m`` has hooks that the fused path would bypass or show another output or gradient
    to (forward, backward; forward pre-hooks unless ``forward_pre`` is False, when only those that
    see keyword arguments count), or any module has global ones."""
    # asked several times per fused call: plain truth tests, no generators (a few us a call otherwise)
    if m._forward_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
        return True
    pre = m._forward_pre_hooks
    if pre and (forward_pre or any(h in getattr(m, "_forward_pre_hooks_with_kwargs", {}) for h in pre)):
        return True
    glob = vars(nn.modules.module)
    return bool(glob.get(_GLOBAL_HOOKS[0]) or glob.get(_GLOBAL_HOOKS[1]) or glob.get(_GLOBAL_HOOKS[2])
                or glob.get(_GLOBAL_HOOKS[3]))


def norm_fusable(norm: nn.Module | None, x: torch.Tensor) -> bool:
    """Whether ``norm`` (a transformer block's pre-norm) can run inside a fused MLP or attention kernel
    on ``x``: a plain ``nn.LayerNorm`` over the last dimension alone, fp32 on CPU like the rest of the
    call, without hooks (the fused call never calls it)."""
    if type(norm) is not nn.LayerNorm or "forward" in vars(norm) or norm.normalized_shape != (x.shape[-1],):
        return False  # (nn.LayerNorm keeps normalized_shape a tuple)
    for t in _affine(norm):
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu):
            return False
    return not _hooked(norm)


def _affine(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A plain ``nn.LayerNorm``'s scale and shift (None without them)."""
    return param(norm, "weight"), param(norm, "bias")


def param(m: nn.Module, name: str) -> Any:
    """``getattr(m, name)`` for a parameter: the registered one where there is one (where
    ``nn.Module.__getattr__`` looks first, without its slow path: the fused calls read several per
    call), else the attribute (a parametrization or ``weight_norm`` computes it; None if absent)."""
    p = m._parameters.get(name)
    return p if p is not None else getattr(m, name, None)


def normed_requires_grad(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``norm(x)`` requires grad (``norm`` a plain ``nn.LayerNorm``): a call with the norm inside
    is decided under the key of the call on ``norm(x)``, the call ``auto`` timed. Behind a cached
    boundary ``x`` needs no gradient, the norm's scale and shift still do."""
    return x.requires_grad or needs_grad(*_affine(norm))


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` (None: absent) requires grad."""
    return any(t is not None and t.requires_grad for t in tensors)


def installed_layer(m: nn.Module) -> Any:
    """The sparse-execution layer installed on ``m`` (``SparseExecution``'s ``_Layer``), None if none."""
    forward = getattr(vars(m).get("forward"), "__func__", None)
    return m.__dict__.get("_spfde_kernel") if getattr(forward, "spfde_forward", False) else None


try:  # torch's is_fx_tracing logs a deprecation warning: the flag it returns, read as the newer call does
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _is_fx_symbolic_tracing
except ImportError:  # older torch
    try:
        from torch.fx._symbolic_trace import is_fx_tracing as _is_fx_symbolic_tracing
    except ImportError:
        _is_fx_symbolic_tracing = None


def _fx_tracing() -> bool:
    """FX symbolic tracing or compiling (``torch.export`` traces with the same flag): a fused call
    would be recorded as the module's."""
    if _is_fx_symbolic_tracing is None:
        return False
    return bool(_is_fx_symbolic_tracing() or torch.compiler.is_compiling())


def linear_act(linear: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(linear(x))``, the first half of a transformer MLP, for a model's own forward.

    When ``act`` is ``nn.GELU()`` (erf form) and :class:`~spfde.sparsity.kernels.SparseExecution`
    runs ``linear`` sparse, the GELU is fused into the kernel (module docstring). Everything else
    is exactly ``act(linear(x))``, module calls included, so a dense run is bit-identical to writing
    it out; so are modules with hooks (the ledger's trace, the memory model, similarity probes, a
    backward hook), which would see the GELU's output or gradient as the Linear's, or miss the
    activation's call, and FX tracing, which would record the fused call as the Linear's.
    """
    forward = getattr(vars(linear).get("forward"), "__func__", None)
    if (getattr(forward, "spfde_forward", False) and type(act) is nn.GELU and act.approximate == "none"
            and not _hooked(linear, forward_pre=False) and not _hooked(act) and not _fx_tracing()):
        return linear(x, **{EPILOGUE_KWARG: "gelu"})
    return act(linear(x))
