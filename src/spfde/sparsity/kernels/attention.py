"""Sparse ``nn.MultiheadAttention`` input projection (``<mha>.in_proj_weight``).

Where the call is plain self-attention (``query is key is value``, no masks, ``need_weights=False``,
not causal, packed ``in_proj_weight``, no ``bias_k``/``add_zero_attn``), the packed q/k/v
projection runs through the sparse Linear path and attention through
``F.scaled_dot_product_attention``, as ``F.multi_head_attention_forward`` does for such a call;
the output projection goes through ``out_proj``'s own forward (sparse when it is masked itself).
Any other call runs the module's dense forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spfde.sparsity.kernels.linear import LinearPlan, linear_input_ok, sparse_linear


def unsupported_mha(module: nn.Module) -> str | None:
    """Why ``module`` cannot use the sparse attention path at all (None when it can)."""
    if not isinstance(module, nn.MultiheadAttention) or type(module).forward is not nn.MultiheadAttention.forward:
        return "not a plain nn.MultiheadAttention"
    if not module._qkv_same_embed_dim:
        return "separate q/k/v projection weights"
    if module.bias_k is not None or module.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    return None


def _call_args(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
               need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
               is_causal: bool = False) -> tuple[torch.Tensor, bool]:
    simple = (query is key and key is value and key_padding_mask is None and attn_mask is None
              and not need_weights and not is_causal and query.dim() == 3)
    return query, simple


def mha_input(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The self-attention input when this call can run the sparse path, else None."""
    x, simple = _call_args(*args, **kwargs)
    if not simple or not linear_input_ok(module.in_proj_weight, x):
        return None
    return x


def sparse_mha(module: nn.MultiheadAttention, x: torch.Tensor, plan: LinearPlan,
               dense_weight_grad: bool = False) -> tuple[torch.Tensor, None]:
    """Self-attention with the packed input projection through the sparse Linear path."""
    if not module.batch_first:
        x = x.transpose(0, 1)
    b, length, e = x.shape
    h = module.num_heads
    qkv = sparse_linear(x, module.in_proj_weight, module.in_proj_bias, plan, dense_weight_grad)
    q, k, v = qkv.view(b, length, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=module.dropout if module.training else 0.0)
    out = module.out_proj(o.transpose(1, 2).reshape(b, length, e))
    if not module.batch_first:
        out = out.transpose(0, 1)
    return out, None
