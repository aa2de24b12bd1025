"""``nn.MultiheadAttention`` self-attention: sparse packed projection, short-sequence core.

Where the call is plain self-attention (``query is key is value``, no masks, ``need_weights=False``,
not causal, packed ``in_proj_weight``, no ``bias_k``/``add_zero_attn``), :func:`self_attention`
runs it as ``F.multi_head_attention_forward`` does, in three steps:

1. the packed q/k/v projection: the sparse Linear path when ``in_proj_weight`` is masked and
   runs sparse, ``F.linear`` otherwise;
2. the attention core ``softmax(q kᵀ / √d) v`` per head, read from the packed projection, for a
   sequence on CPU without dropout: up to :data:`NATIVE_MAX_LEN` tokens in fp32 the native
   short-attention kernel (``sparse_conv.cpp``, :class:`ShortAttentionFunction`: 16 samples per
   vector, probabilities kept for the backward pass, gradient written into one packed q/k/v
   buffer); up to :data:`SHORT_MAX_LEN` tokens (or when the library did not build) two matmuls
   and a softmax on views; ``F.scaled_dot_product_attention`` otherwise;
3. ``out_proj`` through its own forward (sparse when it is masked itself).

When both projections run sparse and the core is native, the three steps are one native call each
way (:func:`fused_plan`, :class:`FusedSelfAttentionFunction`; docs/kernels.md "The fused block"):
every activation of a 16-sample unit stays in one layout from the packed input to the output, so
none of the eight transposes between the steps is made, and the block is one autograd node. Its
output and input gradient are the three steps' bit for bit, its weight and bias gradients within
float rounding of them (another order of the sums over rows). :func:`prenorm_attention` (a pre-norm
block's self-attention of ``norm(x)``) runs a plain ``nn.LayerNorm`` inside the fused call too
(docs/kernels.md, "Pre-norms inside the fused calls"), within float rounding of PyTorch's.

Why (issue 13): on CPU, PyTorch's flash attention kernel spends most of a short sequence's time
on set-up and zero-filling: forward + backward for ViT-tiny's 128 samples x 4 heads x 17 tokens x
16 dims take 3.8 ms on 2 threads, the same maths as matmuls and a softmax 0.8-1.3 ms, the native
kernel about 0.23 ms (``bench/kernels.py --attention``; flash wins from about 64 tokens). In a
ViT-preset training step the core was a quarter of the time (``bench/step_breakdown.py``). The
functional MHA adds a copy of the projection per q/k/v slice and a zero-filled gradient per
slice; the native kernel and the views avoid both. This path runs for every plain self-attention
``nn.MultiheadAttention`` under ``sparsity.kernels: auto | sparse``, masked or not, so a dense and
a sparse run share one attention core and ``bench/end_to_end.py`` compares like with like.
``sparsity.kernels: dense`` installs nothing (the module's own forward). Any other call runs the
module's own forward.

Determinism: the native kernel gives one thread each (16 samples, head) unit and sums in a fixed
order, so results are bit-identical for any thread count; its exp is a polynomial within 2e-7
relative of ``torch.exp``, so outputs match the matmul core within float tolerance, not bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
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
    PROLOGUE_KWARG,
    RESIDUAL_KWARG,
    LinearPlan,
    _affine,
    _fx_tracing,
    _hooked,
    _ptr,
    installed_layer,
    linear_input_issue,
    needs_grad,
    normed_requires_grad,
    param,
    sparse_linear,
)

#: the explicit core runs for sequences up to this many tokens on CPU; longer ones go to
#: ``F.scaled_dot_product_attention`` (flash), which wins on long sequences (bench/kernels.py --attention)
SHORT_MAX_LEN = 48
#: the native short-attention kernel runs up to this many tokens (fp32 on CPU, the library built);
#: beyond it its per-unit probabilities outgrow the cache and the matmul core is faster
#: (``bench/kernels.py --attention``: 1.5-3.5x at 17-24 tokens, 0.5-1.1x at 32-48 for small batches)
NATIVE_MAX_LEN = 24


def unsupported_mha(module: nn.Module) -> str | None:
    """Why ``module`` cannot use the spfde attention path at all (None when it can)."""
    if not isinstance(module, nn.MultiheadAttention) or type(module).forward is not nn.MultiheadAttention.forward:
        return "not a plain nn.MultiheadAttention"
    if not module._qkv_same_embed_dim:
        return "separate q/k/v projection weights"
    if module.bias_k is not None or module.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    return None


def _call_args(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
               need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
               is_causal: bool = False) -> tuple[torch.Tensor, str | None]:
    """The query, and why the call is not plain self-attention (None when it is)."""
    if not (query is key and key is value):
        why = "cross-attention (query, key and value are not one tensor)"
    elif key_padding_mask is not None or attn_mask is not None or is_causal:
        why = "an attention mask (key_padding_mask, attn_mask or is_causal)"
    elif need_weights:
        why = "need_weights=True (pass need_weights=False)"
    elif not torch.is_tensor(query) or query.dim() != 3:
        why = "an unbatched input"
    else:
        why = None
    return query, why


def mha_input_issue(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | None]:
    """``(x, None)`` when this call can run the spfde path; else ``(None, why)`` (``""``: no explanation
    needed, see :func:`~spfde.sparsity.kernels.linear.linear_input_issue`)."""
    try:
        x, why = _call_args(*args, **kwargs)
    except TypeError:  # not a call MultiheadAttention accepts: its own forward raises
        return None, ""
    if why is None:
        why = linear_input_issue(module.in_proj_weight, x)
    return (x, None) if why is None else (None, why)


def short_ok(module: nn.MultiheadAttention, qkv: torch.Tensor) -> bool:
    """True when this call's core runs as explicit matmuls (else ``scaled_dot_product_attention``)."""
    return (qkv.device.type == "cpu" and qkv.shape[1] <= SHORT_MAX_LEN
            and not (module.training and module.dropout > 0))


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("spfde short attention: out of memory for its scratch buffers")


class ShortAttentionFunction(torch.autograd.Function):
    """``softmax(q kᵀ · scale) v`` per head of a packed fp32 ``(B, L, 3·E)`` projection, out ``(B, L, E)``,
    by the native kernel ``lib`` (what :func:`native.load` returned)."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, lib: ctypes.CDLL) -> torch.Tensor:
        keep = ctx.needs_input_grad[0]
        qkv = _unit_columns(qkv)
        b, length, three_e = qkv.shape
        e = three_e // 3
        scale = (e // heads) ** -0.5
        # (B, L, E) stored (L, B, E): the layout nn.MultiheadAttention returns (attention_core)
        out = torch.empty((length, b, e), dtype=torch.float32).transpose(0, 1)
        # the probabilities, [sample block of 16][head][query][key][16 samples], for the backward pass
        probs = torch.empty(((b + 15) // 16 * heads * length * length * 16) if keep else 0, dtype=torch.float32)
        _check(lib.spfde_attention_forward(
            qkv.data_ptr(), b, length, e, heads, qkv.stride(0), qkv.stride(1), scale, out.data_ptr(), out.stride(0),
            out.stride(1), probs.data_ptr() if keep else None, torch.get_num_threads()))
        ctx.heads, ctx.scale, ctx.lib = heads, scale, lib
        if keep:
            ctx.save_for_backward(qkv, probs)
        return out

    @staticmethod
    @first_order_only  # a double backward (create_graph=True) raises instead of dropping gradients
    def backward(ctx, go: torch.Tensor):
        qkv, probs = ctx.saved_tensors
        go = _unit_columns(go.float())
        b, length, three_e = qkv.shape
        dqkv = torch.empty((b, length, three_e), dtype=torch.float32)
        _check(ctx.lib.spfde_attention_backward(
            qkv.data_ptr(), b, length, three_e // 3, ctx.heads, qkv.stride(0), qkv.stride(1), ctx.scale,
            go.data_ptr(), go.stride(0), go.stride(1), probs.data_ptr(), dqkv.data_ptr(), dqkv.stride(0),
            dqkv.stride(1), torch.get_num_threads()))
        return dqkv, None, None


def attention_core(module: nn.MultiheadAttention, qkv: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of a packed ``(B, L, 3·E)`` projection, out ``(B, L, E)`` (heads merged)
    stored sequence-first, ``(L, B, E)`` contiguous, as ``F.multi_head_attention_forward`` stores it:
    ``out_proj`` then writes the module's own output layout, and whatever follows in the model sees
    the same strides (a dropout draws its mask in memory order; a ``view`` needs the strides)."""
    b, length, three_e = qkv.shape
    e, h = three_e // 3, module.num_heads
    short = short_ok(module, qkv)
    lib = native.load(quiet=True) if short and length <= NATIVE_MAX_LEN and qkv.dtype == torch.float32 else None
    if lib is not None:
        return ShortAttentionFunction.apply(qkv, h, lib)
    q, k, v = qkv.view(b, length, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)
    if short:
        o = torch.softmax((q * (e // h) ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=module.dropout if module.training else 0.0)
    return o.permute(2, 0, 1, 3).reshape(length, b, e).transpose(0, 1)


def self_attention(module: nn.MultiheadAttention, x: torch.Tensor,
                   project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   out_proj: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, None]:
    """The module's self-attention of ``x`` (from :func:`mha_input_issue`), its packed projection by ``project``
    (default: the dense ``F.linear``), its output projection by ``out_proj`` (default: the module's)."""
    if not module.batch_first:
        x = x.transpose(0, 1)
    qkv = (project or (lambda t: F.linear(t, module.in_proj_weight, module.in_proj_bias)))(x)
    out = (out_proj or module.out_proj)(attention_core(module, qkv).transpose(0, 1))  # (L, B, E), contiguous
    return (out.transpose(0, 1) if module.batch_first else out), None


def sparse_mha(module: nn.MultiheadAttention, x: torch.Tensor, plan: LinearPlan,
               dense_weight_grad: bool = False) -> tuple[torch.Tensor, None]:
    """Self-attention with the packed input projection through the sparse Linear path: the whole
    block as one native call where :func:`fused_plan` allows (``out_proj`` sparse too), else the
    three steps of :func:`self_attention`."""
    out_plan = None if dense_weight_grad else fused_plan(module, x)
    if out_plan is not None:
        return fused_self_attention(module, x, plan, out_plan), None
    return self_attention(module, x, lambda t: sparse_linear(t, module.in_proj_weight, module.in_proj_bias, plan,
                                                             dense_weight_grad))


def _seq_batch(module: nn.MultiheadAttention, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(tokens, samples, token stride, sample stride) of the module's input ``x``."""
    if module.batch_first:
        return x.shape[1], x.shape[0], x.stride(1), x.stride(0)
    return x.shape[0], x.shape[1], x.stride(0), x.stride(1)


def _strides(t: torch.Tensor, batch_first: bool) -> tuple[int, int]:
    """(sample stride, token stride) of a ``(B, L, E)`` (``batch_first``) or ``(L, B, E)`` tensor."""
    return (t.stride(0), t.stride(1)) if batch_first else (t.stride(1), t.stride(0))


def _block_buffer(samples: int, tokens: int, dim: int, batch_first: bool) -> tuple[torch.Tensor, int, int]:
    """An uninitialised activation of the module's own layout, contiguous (a consumer that flattens
    its rows, the MLP after the block, reads it in place), and its sample and token strides."""
    t = torch.empty((samples, tokens, dim) if batch_first else (tokens, samples, dim), dtype=torch.float32)
    return (t, *_strides(t, batch_first))


@functools.lru_cache(maxsize=64)
def _kept_floats(lib: ctypes.CDLL, samples: int, tokens: int, dim: int, heads: int, keep: tuple[bool, bool, bool],
                 ln: bool) -> tuple[int, tuple[int | None, ...]]:
    """:func:`~.common.carve` of the fused forward's kept arrays: unit-layout x, q/k/v, probabilities,
    core output (by ``keep``), the norm's mean and rstd (``ln``)."""
    floats = lambda c: lib.spfde_mha_unit_floats(samples, tokens, c)  # noqa: E731
    probs = (samples + 15) // 16 * heads * tokens * tokens * 16
    stats = samples * tokens if ln else 0
    return carve((floats(dim) if keep[0] else 0, floats(3 * dim) if keep[1] else 0, probs if keep[1] else 0,
                  floats(dim) if keep[2] else 0, stats, stats))


def fused_bytes(samples: int, tokens: int, dim: int, heads: int) -> int:
    """The buffers a fused block call of this shape allocates at most (forward keeps and backward)."""
    units = (samples + 15) // 16
    return 4 * units * 16 * tokens * (11 * dim + heads * tokens)


def _fusable_out_proj(module: nn.MultiheadAttention, x: torch.Tensor, x_grad: bool | None = None
                      ) -> tuple[Any, tuple] | None:
    """``(out_proj's layer, its decision key)`` when this call of ``module`` could run as one fused
    native call, whatever ``out_proj`` decides: see :func:`fused_plan` (``x_grad``: whether the input
    needs a gradient, when not ``x``'s own)."""
    out_proj = module._modules["out_proj"]
    layer = installed_layer(out_proj)
    if layer is None or _hooked(out_proj) or _fx_tracing() or module.embed_dim % module.num_heads:
        return None
    lib = native.load(quiet=True)
    tokens, samples = _seq_batch(module, x)[:2]
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or tokens > NATIVE_MAX_LEN
            or (module.training and module.dropout > 0)):
        return None
    if fused_bytes(samples, tokens, module.embed_dim, module.num_heads) > common.FUSED_MAX_BYTES:
        return None
    rec = torch.is_grad_enabled()
    x_grad = x.requires_grad if x_grad is None else x_grad
    through = rec and (x_grad or needs_grad(param(module, "in_proj_weight"), param(module, "in_proj_bias")))
    return layer, layer.key_for((tokens, samples, module.embed_dim), through)  # out_proj's call: (L, B, E)


def fused_plan(module: nn.MultiheadAttention, x: torch.Tensor, x_grad: bool | None = None) -> LinearPlan | None:
    """``out_proj``'s plan when this call (whose ``in_proj`` runs sparse) can run as one fused native
    call, None otherwise: ``out_proj`` masked and decided sparse for this call already (by the
    block's timing as one, :func:`attention_unit`, or else by its own call's: an undecided one runs
    the three steps once, which decides it), unhooked (the fused call never calls it), the core
    native (CPU fp32, at most ``NATIVE_MAX_LEN`` tokens, no dropout in training), no FX tracing, no
    memory-model probe, and the call's buffers within ``common.FUSED_MAX_BYTES`` (``x_grad``: as for
    :func:`_fusable_out_proj`)."""
    found = _fusable_out_proj(module, x, x_grad)
    if found is None or not found[0].decided_sparse(found[1], x):
        return None
    found[0].record_sparse()
    return found[0].plan


def attention_unit(module: nn.MultiheadAttention, x: torch.Tensor, first: Any) -> Unit | None:
    """The block as one :class:`~.common.Unit` for ``auto``'s timing of this call by ``first`` (the
    ``in_proj`` layer, which runs sparse by that decision): the fused call against the dense three
    steps; None where it could not fuse."""
    found = _fusable_out_proj(module, x)
    if found is None or not found[0].can_fuse(x):
        return None
    layer, key = found
    w2, b2 = module.out_proj.weight, module.out_proj.bias
    return Unit("attention", layer, key,
                dense=lambda t: self_attention(module, t, out_proj=lambda u: F.linear(u, w2, b2))[0],
                sparse=lambda t: fused_self_attention(module, t, first.plan, layer.plan))


class FusedSelfAttentionFunction(torch.autograd.Function):
    """``out_proj(attention(in_proj(x)))`` with both projections masked, through ``spfde_mha_forward`` /
    ``_backward`` (``sparse_conv.cpp``: one call per direction, 16-sample units in one layout)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None, plan1: LinearPlan, plan2: LinearPlan, module: nn.MultiheadAttention,
                keep: tuple[bool, bool, bool], lnw: torch.Tensor | None = None, lnb: torch.Tensor | None = None,
                eps: float | None = None, residual: bool = False) -> torch.Tensor:
        # keep: (x for in_proj's weight gradient, q/k/v and the probabilities for any gradient through
        # the core, the core's output for out_proj's weight gradient): the caller knows whether autograd records.
        # eps None: no pre-norm; else in_proj's input is the layer norm of x (prenorm_attention);
        # residual: the output is x + the block's, the add where the kernel writes each output row
        lib = native.load(quiet=True)
        x = _unit_columns(x)
        tokens, samples, xl, xb = _seq_batch(module, x)
        e, h = module.embed_dim, module.num_heads
        scale = (e // h) ** -0.5
        b1d = b1.detach().contiguous() if b1 is not None else None
        b2d = b2.detach().contiguous() if b2 is not None else None
        out, ob, ol = _block_buffer(samples, tokens, e, module.batch_first)
        ln = eps is not None
        # the kept unit-layout x, q/k/v, probabilities and core output, the norm's mean and rstd per
        # (sample, token): one buffer (common.carve)
        total, offsets = _kept_floats(lib, samples, tokens, e, h, keep, ln)
        kept = torch.empty(total, dtype=torch.float32) if total else None
        xk, qk, pk, ok, mean, rstd = carved(kept, offsets)
        lw = lnw.detach().contiguous() if lnw is not None else None
        lb = lnb.detach().contiguous() if lnb is not None else None
        p1, p2 = plan1.ptrs, plan2.ptrs
        _check(lib.spfde_mha_forward(
            x.data_ptr(), samples, tokens, e, h, xb, xl, scale, p1["crow"], p1["col"], w1.data_ptr(), p1["offsets"],
            _ptr(b1d), p2["crow"], p2["col"], w2.data_ptr(), p2["offsets"], _ptr(b2d), out.data_ptr(), ob, ol,
            torch.get_num_threads(), xk, qk, pk, ok, int(ln), _ptr(lw), _ptr(lb), float(eps or 0.0), mean, rstd,
            int(residual)))
        ctx.plans, ctx.lib, ctx.geometry = (plan1, plan2), lib, (samples, tokens, e, h, scale, module.batch_first)
        ctx.ln, ctx.x_strides, ctx.residual, ctx.offsets = ln, (xb, xl), residual, offsets
        ctx.save_for_backward(kept, w1, w2, *((x, lnw) if ln else ()))
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, gy: torch.Tensor):
        plan1, plan2 = ctx.plans
        kept, w1, w2, *normed = ctx.saved_tensors
        xk, qk, pk, ok, mean, rstd = carved(kept, ctx.offsets)
        samples, tokens, e, h, scale, batch_first = ctx.geometry
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        need_lnw, need_lnb = ctx.needs_input_grad[9:11] if ctx.ln else (False, False)
        gy = _unit_columns(gy.float())
        gb, gl = _strides(gy, batch_first)
        # the gradient at in_proj's input: x's own, or, with the pre-norm, through it (the kernel)
        need_gx = need_x or need_lnw or need_lnb
        gx, gxb, gxl = _block_buffer(samples, tokens, e, batch_first) if need_gx else (None, 0, 0)
        x, lnw = normed if ctx.ln else (None, None)
        glnw = torch.empty(e, dtype=torch.float32) if need_lnw else None
        glnb = torch.empty(e, dtype=torch.float32) if need_lnb else None
        lw = lnw.detach().contiguous() if lnw is not None else None

        gw1, zero1 = weight_grad_buffer(need_w1, w1)
        gw2, zero2 = weight_grad_buffer(need_w2, w2)
        gb1 = torch.empty(3 * e, dtype=torch.float32) if need_b1 else None
        gb2 = torch.empty(e, dtype=torch.float32) if need_b2 else None
        p1, p2 = plan1.ptrs, plan2.ptrs
        _check(ctx.lib.spfde_mha_backward(
            gy.data_ptr(), gb, gl, samples, tokens, e, h, scale,
            p1["crow"], p1["col"], w1.data_ptr(), p1["tcrow"], p1["tcol"], p1["perm32"], p1["offsets"],
            p2["crow"], p2["col"], w2.data_ptr(), p2["tcrow"], p2["tcol"], p2["perm32"], p2["offsets"],
            xk, qk, pk, ok, _ptr(gx), gxb, gxl, _ptr(gw1), int(zero1), _ptr(gb1), _ptr(gw2), int(zero2), _ptr(gb2),
            torch.get_num_threads(), int(ctx.ln), _ptr(x), *(ctx.x_strides if ctx.ln else (0, 0)), _ptr(lw), mean,
            rstd, _ptr(glnw), _ptr(glnb), int(ctx.residual and need_x)))
        note_masked_grad(plan1, gw1)
        note_masked_grad(plan2, gw2)
        if gx is not None and not need_x:
            gx = None
        return gx, gw1, gb1, gw2, gb2, None, None, None, None, glnw, glnb, None, None


def fused_self_attention(module: nn.MultiheadAttention, x: torch.Tensor, plan1: LinearPlan, plan2: LinearPlan,
                         norm: nn.LayerNorm | None = None, residual: bool = False) -> torch.Tensor:
    """The module's self-attention output for ``x`` as one fused call (:func:`fused_plan` said it can);
    with ``norm`` (:func:`~.linear.norm_fusable`), the self-attention of ``norm(x)``, the norm in the kernel;
    ``residual``: ``x +`` that, the add in the kernel (bit for bit the add after it)."""
    rec = torch.is_grad_enabled()
    out_proj = module._modules["out_proj"]
    w1, b1 = param(module, "in_proj_weight"), param(module, "in_proj_bias")
    w2, b2 = param(out_proj, "weight"), param(out_proj, "bias")
    ln = () if norm is None else (*_affine(norm), float(norm.eps))
    through = x.requires_grad or needs_grad(w1, b1, *ln[:2])
    keep = (rec and w1.requires_grad, rec and through, rec and w2.requires_grad)
    return FusedSelfAttentionFunction.apply(x, w1, b1, w2, b2, plan1, plan2, module, keep,
                                            *(ln or (None, None, None)), residual)


def fused_prenorm_call(module: nn.MultiheadAttention, x: torch.Tensor, plan: LinearPlan, norm: nn.LayerNorm,
                       residual: bool = False) -> torch.Tensor | None:
    """The block's output for ``norm(x)`` (``residual``: ``x +`` it) as one fused call with the norm
    inside, where :func:`fused_plan` allows (the caller, ``in_proj``'s layer, decided the call sparse);
    None otherwise."""
    out_plan = fused_plan(module, x, normed_requires_grad(norm, x))
    return None if out_plan is None else fused_self_attention(module, x, plan, out_plan, norm, residual)


def prenorm_attention(norm: nn.Module, attn: nn.Module, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
    """``attn(h, h, h, need_weights=False)[0]`` with ``h = norm(x)``, a pre-norm block's self-attention
    (spfde's ViT calls it); ``residual``: ``x +`` it, the block's residual. Where SparseExecution runs
    ``attn`` as one fused native call, the norm runs inside it, on the rows the kernel packs anyway,
    forward and backward, and so does the residual's add, where the kernel writes each output row
    (:meth:`~.execution._Layer.__call__` takes them as ``PROLOGUE_KWARG`` and ``RESIDUAL_KWARG`` and
    decides, normalising first where the norm cannot run there: :func:`~.linear.norm_fusable`); an
    attention module with hooks, or any other module, gets ``norm(x)``, so its hooks see what they
    always saw."""
    forward = getattr(vars(attn).get("forward"), "__func__", None)
    if isinstance(attn, nn.MultiheadAttention) and getattr(forward, "spfde_forward", False) and not _hooked(attn):
        return attn(x, x, x, need_weights=False, **{PROLOGUE_KWARG: norm, RESIDUAL_KWARG: residual})[0]
    h = norm(x)
    out = attn(h, h, h, need_weights=False)[0]
    return x + out if residual else out
