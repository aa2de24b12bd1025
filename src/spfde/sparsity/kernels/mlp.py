"""A transformer MLP, ``fc2(GELU(fc1(x)))``, in one native call when both Linears run sparse.

Method card
-----------
What it does
    :func:`mlp_act` is what a model's MLP forward calls instead of ``fc2(act(fc1(x)))`` (the ViT's
    :class:`~spfde.models.vit.Mlp` does). When :class:`~spfde.sparsity.kernels.SparseExecution`
    runs both Linears sparse for this call, the native ``spfde_mlp_forward`` / ``_backward`` run
    the pair tile by tile: each tile of ``x`` is packed once, fc1's outputs go straight into a
    packed hidden tile (rows innermost, the layout fc2 reads), GELU'd there with its derivative
    kept, and fc2's outputs are written into ``y``. The hidden activation is never written
    row-major or packed again, forward or backward (four transposes of ``N x hidden`` floats
    fewer than two sparse Linear calls), the forward of a tile runs on one thread from cache with
    no barrier, and there is one autograd node and one Python call for the pair instead of two.
    Otherwise it is exactly ``fc2(linear_act(fc1, act, x))``: fc1's GELU epilogue when fc1 alone
    runs sparse (:func:`~spfde.sparsity.kernels.linear.linear_act`), module calls included.
    :func:`prenorm_mlp` (a pre-norm block's ``mlp(norm(x))``) runs a plain ``nn.LayerNorm`` inside the
    fused call too: normalising each packed tile, keeping each row's statistics, and applying the
    norm's backward to each tile's input-gradient rows (docs/kernels.md, "Pre-norms inside the
    fused calls"), and with ``residual`` returns ``x + mlp(norm(x))``, the block's residual added where
    the kernel writes each output row (and ``y``'s gradient where it writes ``x``'s).
Paper
    None: an execution detail of the sparse kernels (issue 13), not an algorithm of the paper.
When it is fused
    ``act`` is exactly ``nn.GELU()`` (erf form); both Linears have spfde's forward installed and
    no hooks (nor any global module hooks; the fused call never calls the modules), nothing is
    FX tracing, the native library loaded; the pair runs sparse by ``auto``'s decision for it
    (timed as one at fc1's first use: this fused call against ``fc2(gelu(fc1(x)))`` on dense
    kernels, both weights' gradients in both, fc2 taking fc1's decision, :class:`~.common.Unit`);
    no RigL dense-gradient step, not the memory model's probe (the activation cache's fill, a
    one-off pass, fuses by the layers' untimed choices); the call's packed buffers within
    ``common.FUSED_MAX_BYTES``.
Results
    Bit-identical to the two sparse Linear calls, forward and every gradient, for any thread
    count (the kernels form the same sums in the same order; ``tests/test_kernels.py``), so a
    run's weights do not depend on whether a call fused. With the pre-norm inside: within float
    rounding of PyTorch's LayerNorm before the two calls (about 1e-7 relative), bit-identical
    for any thread count.
Expected effect
    ``bench/step_breakdown.py`` (``unfused MLP`` row) and docs/benchmarks.md.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from spfde.sparsity.kernels import common, native
from spfde.sparsity.kernels.common import (
    Unit,
    carve,
    carved,
    first_order_only,
    note_masked_grad,
    weight_grad_buffer,
)
from spfde.sparsity.kernels.linear import (
    LinearPlan,
    _affine,
    _check,
    _fused_gelu,
    _fx_tracing,
    _hooked,
    _ptr,
    _rows,
    installed_layer,
    linear_act,
    needs_grad,
    norm_fusable,
    normed_requires_grad,
    sparse_linear,
)


class SparseMlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` with both weights masked, through ``spfde_mlp_forward`` / ``_backward``;
    with ``norm`` (a plain ``nn.LayerNorm`` over the features), ``fc2(gelu(fc1(norm(x))))``, the norm
    applied where the kernel packs x (:func:`prenorm_mlp`); ``residual``: ``x +`` that (``out == in``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, plan1: LinearPlan, plan2: LinearPlan, keep: tuple[bool, bool, bool],
                lnw: torch.Tensor | None = None, lnb: torch.Tensor | None = None, eps: float | None = None,
                residual: bool = False) -> torch.Tensor:
        # keep: (x's packed tiles for fc1's weight gradient, the packed hidden activation for fc2's,
        # the GELU derivative for any gradient through fc1): decided by the caller, which knows
        # whether autograd records this call. eps None: no norm
        lib = native.load(quiet=True)
        hidden, in_f = plan1.shape
        out_f = plan2.shape[0]
        x2 = _rows(x, in_f)
        n = x2.shape[0]
        b1d = b1.detach().contiguous() if b1 is not None else None
        b2d = b2.detach().contiguous() if b2 is not None else None
        y = torch.empty((n, out_f), dtype=torch.float32)
        ln = eps is not None
        # x's packed tiles, the packed hidden activation, the GELU derivative, each row's mean and rstd:
        # one buffer (common.carve)
        total, offsets = _kept_floats(lib, n, in_f, hidden, keep, ln)
        kept = torch.empty(total, dtype=torch.float32) if total else None
        xk, hk, dk, mean, rstd = carved(kept, offsets)
        lw = lnw.detach().contiguous() if lnw is not None else None
        lb = lnb.detach().contiguous() if lnb is not None else None
        p1, p2 = plan1.ptrs, plan2.ptrs
        # the weights' values at the nonzeros are gathered inside the call (from the dense weights)
        _check(lib.spfde_mlp_forward(x2.data_ptr(), n, in_f, x2.stride(0), hidden, out_f, p1["crow"], p1["col"],
                                     w1.data_ptr(), p1["offsets"], _ptr(b1d), p2["crow"], p2["col"], w2.data_ptr(),
                                     p2["offsets"], _ptr(b2d), y.data_ptr(), y.stride(0), torch.get_num_threads(),
                                     xk, hk, dk, int(ln), _ptr(lw), _ptr(lb), float(eps or 0.0), mean, rstd,
                                     int(residual)))
        ctx.plans, ctx.x_shape, ctx.lib, ctx.ln, ctx.residual = (plan1, plan2), x.shape, lib, ln, residual
        ctx.offsets = offsets
        ctx.save_for_backward(kept, w1, w2, *((x2, lnw) if ln else ()))
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    @first_order_only
    def backward(ctx, gy: torch.Tensor):
        plan1, plan2 = ctx.plans
        kept, w1, w2, *normed = ctx.saved_tensors
        xk, hk, dk, mean, rstd = carved(kept, ctx.offsets)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        need_lnw, need_lnb = ctx.needs_input_grad[8:10] if ctx.ln else (False, False)
        hidden, in_f = plan1.shape
        out_f = plan2.shape[0]
        g2 = _rows(gy, out_f)
        n = g2.shape[0]
        # the gradient at fc1's input: x's own, or, with the norm, the norm's output's
        need_h = need_x or need_lnw or need_lnb
        gx = torch.empty((n, in_f), dtype=torch.float32) if need_h else None

        gw1, zero1 = weight_grad_buffer(need_w1, w1)
        gw2, zero2 = weight_grad_buffer(need_w2, w2)
        gb1 = torch.empty(hidden, dtype=torch.float32) if need_b1 else None
        gb2 = torch.empty(out_f, dtype=torch.float32) if need_b2 else None
        x2, lnw = normed if ctx.ln else (None, None)
        glnw = torch.empty(in_f, dtype=torch.float32) if need_lnw else None
        glnb = torch.empty(in_f, dtype=torch.float32) if need_lnb else None
        lw = lnw.detach().contiguous() if lnw is not None else None
        p1, p2 = plan1.ptrs, plan2.ptrs
        _check(ctx.lib.spfde_mlp_backward(
            g2.data_ptr(), g2.stride(0), n, in_f, hidden, out_f,
            p1["crow"], p1["col"], w1.data_ptr(), p1["tcrow"], p1["tcol"], p1["perm32"], p1["offsets"],
            p2["crow"], p2["col"], w2.data_ptr(), p2["tcrow"], p2["tcol"], p2["perm32"], p2["offsets"],
            xk, hk, dk, _ptr(gx), in_f, _ptr(gw1), int(zero1), _ptr(gb1), _ptr(gw2), int(zero2), _ptr(gb2),
            torch.get_num_threads(), int(ctx.ln), _ptr(x2), x2.stride(0) if x2 is not None else 0, _ptr(lw), mean,
            rstd, _ptr(glnw), _ptr(glnb), int(ctx.residual and need_x)))
        note_masked_grad(plan1, gw1)
        note_masked_grad(plan2, gw2)
        gx = gx.view(ctx.x_shape) if gx is not None and need_x else None
        return gx, gw1, gb1, gw2, gb2, None, None, None, glnw, glnb, None, None


def sparse_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, plan1: LinearPlan, plan2: LinearPlan,
               norm: nn.LayerNorm | None = None, residual: bool = False) -> torch.Tensor:
    """``fc2(F.gelu(fc1(x)))`` with both weights masked by their plans, fused (native library needed);
    with ``norm`` (:func:`~.linear.norm_fusable`), ``fc2(F.gelu(fc1(norm(x))))`` with the norm in the kernel;
    ``residual``: ``x +`` that, the add in the kernel (bit for bit the add after it).

    Without ``norm``, always the two sparse Linear calls' result, bit for bit: where fc1's GELU
    epilogue is ``F.gelu`` after its kernel (a call whose only gradient through fc1 is its bias's:
    :func:`~spfde.sparsity.kernels.linear._fused_gelu`), it is those two calls."""
    if residual and fc2.out_features != fc1.in_features:
        raise ValueError(f"a residual MLP needs fc2's {fc2.out_features} outputs to match fc1's {fc1.in_features} "
                         "inputs")
    rec = torch.is_grad_enabled()
    w1, b1, w2, b2 = fc1.weight, fc1.bias, fc2.weight, fc2.bias
    ln = () if norm is None else (*_affine(norm), float(norm.eps))
    through_norm = needs_grad(*ln[:2])
    if _fused_gelu(x, w1, b1, False, rec and w1.requires_grad) == 0 and not through_norm:
        h = norm(x) if norm is not None else x
        out = sparse_linear(sparse_linear(h, w1, b1, plan1, gelu=True), w2, b2, plan2)
        return x + out if residual else out
    through_fc1 = x.requires_grad or needs_grad(w1, b1) or through_norm
    keep = (rec and w1.requires_grad, rec and w2.requires_grad, rec and through_fc1)
    return SparseMlpFunction.apply(x, w1, b1, w2, b2, plan1, plan2, keep, *(ln or (None, None, None)), residual)


@functools.lru_cache(maxsize=64)
def _kept_floats(lib: Any, rows: int, in_f: int, hidden: int, keep: tuple[bool, bool, bool],
                 ln: bool) -> tuple[int, tuple[int | None, ...]]:
    """:func:`~.common.carve` of the fused forward's kept arrays: x's packed tiles, the packed hidden
    activation, the GELU derivative (by ``keep``), each row's mean and rstd (``ln``)."""
    packed = [lib.spfde_linear_packed_floats(rows, f) if k else 0
              for k, f in zip(keep, (in_f, hidden, hidden), strict=True)]
    return carve((*packed, rows if ln else 0, rows if ln else 0))


def fused_bytes(rows: int, fc1: nn.Linear, fc2: nn.Linear) -> int:
    """The packed buffers a fused call of ``rows`` rows allocates at most (forward keeps + backward)."""
    return _fused_bytes(rows, fc1.in_features, fc1.out_features, fc2.out_features)


@functools.lru_cache(maxsize=64)
def _fused_bytes(rows: int, in_f: int, hidden: int, out_f: int) -> int:
    lib = native.load(quiet=True)
    return 4 * int(sum(lib.spfde_linear_packed_floats(rows, f) for f in (in_f, hidden, hidden, hidden, out_f)))


def mlp_act(fc1: nn.Module, act: nn.Module, fc2: nn.Module, x: torch.Tensor, norm: nn.Module | None = None,
            residual: bool = False) -> torch.Tensor:
    """``fc2(act(fc1(x)))``, a transformer MLP, for a model's own forward: fused into one native call
    when both Linears run sparse (module card), otherwise exactly ``fc2(linear_act(fc1, act, x))``.
    ``norm``: ``fc2(act(fc1(norm(x))))``, the norm inside the fused call where it can run there
    (:func:`~.linear.norm_fusable`; not while the pair is being timed, which times it on ``norm(x)``).
    ``residual``: ``x +`` the result (``x`` the input before ``norm``), added inside the fused call
    where the kernel's input is ``x`` itself, bit for bit the add after it."""
    x0 = x
    l1, l2 = installed_layer(fc1), installed_layer(fc2)
    if (l1 is not None and l2 is not None and type(act) is nn.GELU and act.approximate == "none"
            and not _hooked(fc1) and not _hooked(act) and not _hooked(fc2) and not _fx_tracing()
            and native.load(quiet=True) is not None and fc2.in_features == fc1.out_features
            and not l1.exe.dense_weight_grad):
        rec = torch.is_grad_enabled()
        if norm is not None and not norm_fusable(norm, x):
            x, norm = norm(x), None
        # the key of fc1's call on norm(x), also where the norm runs inside (behind a cached boundary x
        # needs no gradient, the norm's output does)
        x_grad = normed_requires_grad(norm, x) if norm is not None else x.requires_grad
        deciding = l1.deciding(l1.key_for(tuple(x.shape), x_grad))
        if norm is not None and deciding:
            x, norm = norm(x), None
        through = rec and (x_grad or needs_grad(fc1.weight, fc1.bias))
        key2 = l2.key_for((*x.shape[:-1], fc1.out_features), through)
        rows = x.numel() // max(fc1.in_features, 1)
        fusable = fused_bytes(rows, fc1, fc2) <= common.FUSED_MAX_BYTES
        unit = None  # auto times the pair as one where it can fuse (common.Unit)
        if fusable and deciding and l2.can_fuse(x):
            unit = Unit("mlp", l2, key2, dense=lambda t: l2.dense(act(l1.dense(t))),
                        sparse=lambda t: sparse_mlp(t, fc1, fc2, l1.plan, l2.plan))
        key1 = l1.sparse_key(x, unit, x_grad)
        if key1 is not None and fusable and l2.decided_sparse(key2, x):
            l1.record_sparse()
            l2.record_sparse()
            if x is x0:  # the kernel's input is the residual's: the add runs there
                return sparse_mlp(x, fc1, fc2, l1.plan, l2.plan, norm, residual)
            out = sparse_mlp(x, fc1, fc2, l1.plan, l2.plan, norm)
            return x0 + out if residual else out
    out = fc2(linear_act(fc1, act, norm(x) if norm is not None else x))
    return x0 + out if residual else out


def prenorm_mlp(norm: nn.Module, mlp: nn.Module, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
    """``mlp(norm(x))`` (``residual``: ``x + mlp(norm(x))``, the add inside the fused call too, where
    the norm runs there) in a pre-norm transformer block whose ``mlp`` is spfde's ViT ``Mlp`` (``fc1``,
    ``act``, ``fc2``, forward :func:`mlp_act`): where the MLP runs as one fused native call and the
    norm can run inside it (:func:`mlp_act` decides), it does, forward and backward, on the rows the
    kernel packs and writes anyway (PyTorch's LayerNorm costs about 55 us forward and 80 us backward a
    call on the ViT preset, a tenth of the fused MLP's). An MLP with hooks is called as a module,
    ``mlp(norm(x))``, so its hooks see what they always saw."""
    if _hooked(mlp) or not all(hasattr(mlp, a) for a in ("fc1", "act", "fc2")):
        out = mlp(norm(x))
        return x + out if residual else out
    return mlp_act(mlp.fc1, mlp.act, mlp.fc2, x, norm, residual)
