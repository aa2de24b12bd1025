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
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spfde.sparsity.kernels import native
from spfde.sparsity.kernels.common import first_order_only
from spfde.sparsity.kernels.linear import LinearPlan, linear_input_issue, sparse_linear

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
                   project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, None]:
    """The module's self-attention of ``x`` (from :func:`mha_input_issue`), its packed projection by ``project``
    (default: the dense ``F.linear``)."""
    if not module.batch_first:
        x = x.transpose(0, 1)
    qkv = (project or (lambda t: F.linear(t, module.in_proj_weight, module.in_proj_bias)))(x)
    out = module.out_proj(attention_core(module, qkv).transpose(0, 1))  # (L, B, E), contiguous
    return (out.transpose(0, 1) if module.batch_first else out), None


def sparse_mha(module: nn.MultiheadAttention, x: torch.Tensor, plan: LinearPlan,
               dense_weight_grad: bool = False) -> tuple[torch.Tensor, None]:
    """Self-attention with the packed input projection through the sparse Linear path."""
    return self_attention(module, x, lambda t: sparse_linear(t, module.in_proj_weight, module.in_proj_bias, plan,
                                                             dense_weight_grad))
