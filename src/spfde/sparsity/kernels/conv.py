"""Sparse ``nn.Conv2d``: the native direct sparse convolution as an autograd function.

Covers groups 1, dilation 1, zero padding (any integer padding, or ``"valid"``), any kernel size
and stride, any batch size, NCHW or channels_last input (the layout is converted inside the op;
the output follows PyTorch's rule: channels_last when the input or the weight is), fp32 on CPU.
Everything else (bf16/fp16, autocast, CUDA, dilation, groups, reflect padding, ``"same"``,
unbatched input, a missing native library) runs the module's own dense forward: never a wrong
answer. The native kernels are in ``sparse_conv.cpp`` (method notes there).
"""

from __future__ import annotations

import torch
from torch import nn

from spfde.sparsity.kernels import native
from spfde.sparsity.kernels.common import (
    NonzeroIndex,
    first_order_only,
    index_counts,
    is_dense_storage,
    note_masked_grad,
)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def unsupported_conv(module: nn.Module) -> str | None:
    """Why ``module`` cannot use the sparse convolution (None when it can)."""
    if not isinstance(module, nn.Conv2d) or type(module).forward is not nn.Conv2d.forward:
        return "not a plain nn.Conv2d"
    if type(module)._conv_forward is not nn.Conv2d._conv_forward:
        # nn.Conv2d.forward calls it with the weight: a subclass that transforms the weight there (weight
        # standardisation) or pads its own way computes another function than the sparse kernel's
        return f"{type(module).__name__} overrides _conv_forward"
    if module.groups != 1:
        return "groups != 1"
    if tuple(module.dilation) != (1, 1):
        return "dilation != 1"
    if module.padding_mode != "zeros":
        return f"padding_mode {module.padding_mode!r}"
    if isinstance(module.padding, str) and module.padding != "valid":
        return f"padding {module.padding!r}"
    return None


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _margins(k: int, s: int, p: int, size: int, out: int) -> tuple[int, int]:
    """Zero rows the output gradient needs above and below for the input-gradient gather."""
    need_lo, need_hi = 0, out - 1
    for tap in range(k):
        par = (tap - p) % s
        if size <= par:
            continue
        d = (par + p - tap) // s
        need_lo = min(need_lo, d)
        need_hi = max(need_hi, (size - par + s - 1) // s - 1 + d)
    return -need_lo, need_hi - (out - 1)


class ConvPlan:
    """Index structures of one masked conv weight, rebuilt only when its mask changes."""

    def __init__(self, mask: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                 padding: tuple[int, int]) -> None:
        self.index = NonzeroIndex(mask.cpu(), weight.stride())
        self.out_channels, self.in_channels, self.kh, self.kw = weight.shape
        self.stride, self.padding = stride, padding
        oc, ic, ky, kx = (c.to(torch.int32).contiguous() for c in self.index.coords)
        self.rowptr = index_counts(oc.long(), self.out_channels)
        self.ic, self.ky, self.kx = ic, ky, kx
        (sh, sw), (ph, pw) = stride, padding
        # input-gradient order: by input channel, then by the stride-parity class of the tap
        key = (ic.long() * sh + (ky.long() - ph) % sh) * sw + (kx.long() - pw) % sw
        order = torch.sort(key, stable=True).indices
        self.colptr = index_counts(key, self.in_channels * sh * sw)
        self.cidx = order.to(torch.int32).contiguous()
        self.coc, self.cky, self.ckx = (t[order].contiguous() for t in (oc, ky, kx))
        #: called with each weight gradient a sparse backward writes (common.note_masked_grad)
        self.note = None

    @property
    def nnz(self) -> int:
        return self.index.nnz

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        (sh, sw), (ph, pw) = self.stride, self.padding
        return (h + 2 * ph - self.kh) // sh + 1, (w + 2 * pw - self.kw) // sw + 1


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("spfde sparse convolution: out of memory for its scratch buffers")


class SparseConv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, weight * mask, bias)`` with work proportional to the mask's nonzeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: ConvPlan,
                dense_weight_grad: bool) -> torch.Tensor:
        lib = native.load()
        n, c, h, w = x.shape
        (sh, sw), (ph, pw) = plan.stride, plan.padding
        oh, ow = plan.out_size(h, w)
        vals = plan.index.gather(weight.detach())
        b = bias.detach().contiguous() if bias is not None else None
        fmt = torch.channels_last if _channels_last(x) or _channels_last(weight) else torch.contiguous_format
        y = torch.empty((n, plan.out_channels, oh, ow), dtype=torch.float32, memory_format=fmt)
        _check(lib.spfde_conv2d_forward(
            _ptr(x), n, c, h, w, *x.stride(), plan.out_channels, oh, ow, sh, sw, ph, pw, _ptr(plan.rowptr),
            _ptr(plan.ic), _ptr(plan.ky), _ptr(plan.kx), _ptr(vals), _ptr(b), _ptr(y), *y.stride(),
            torch.get_num_threads()))
        ctx.plan, ctx.dense_weight_grad = plan, dense_weight_grad
        ctx.save_for_backward(x, vals, weight)
        return y

    @staticmethod
    @first_order_only  # a double backward (create_graph=True) raises instead of dropping gradients
    def backward(ctx, gy: torch.Tensor):
        plan: ConvPlan = ctx.plan
        x, vals, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dense_w = need_w and ctx.dense_weight_grad  # RigL's update reads the dense weight gradient
        sparse_w = need_w and not dense_w
        gy = gy.float()
        n, c, h, w = x.shape
        (sh, sw), (ph, pw) = plan.stride, plan.padding
        oh, ow = gy.shape[2:]
        gx = torch.empty_like(x, memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format) \
            if need_x else None
        gvals = torch.empty(plan.nnz, dtype=torch.float32) if sparse_w else None
        if need_x or sparse_w:
            mt, mb = _margins(plan.kh, sh, ph, h, oh)
            ml, mr = _margins(plan.kw, sw, pw, w, ow)
            _check(native.load().spfde_conv2d_backward(
                _ptr(x), *x.stride(), _ptr(gy), *gy.stride(), n, c, h, w, plan.out_channels, oh, ow, sh, sw, ph, pw,
                mt, mb, ml, mr, _ptr(plan.rowptr), _ptr(plan.ic), _ptr(plan.ky), _ptr(plan.kx), _ptr(vals),
                _ptr(plan.colptr), _ptr(plan.cidx), _ptr(plan.coc), _ptr(plan.cky), _ptr(plan.ckx),
                _ptr(gx), *(gx.stride() if gx is not None else (0, 0, 0, 0)), _ptr(gvals), torch.get_num_threads()))
        gweight = None
        if dense_w:
            gweight = torch.ops.aten.convolution_backward(
                gy, x, weight, None, list(plan.stride), list(plan.padding), [1, 1], False, [0, 0], 1,
                [False, True, False])[1]
        elif sparse_w:
            gweight = plan.index.scatter(gvals, weight)
            note_masked_grad(plan, gweight)
        gbias = gy.sum((0, 2, 3)) if need_b else None
        return gx, gweight, gbias, None, None


def conv_input_issue(module: nn.Conv2d, x: torch.Tensor) -> str | None:
    """Why this call cannot run sparse (then the module's dense forward runs), None when it can; ``""``
    for a call whose dense forward needs no explanation (an empty input; a wrong shape, which
    PyTorch's own error reports). The native library is checked separately
    (:func:`spfde.sparsity.kernels.native.load`)."""
    w = module.weight
    if x.numel() == 0:
        return ""
    if x.dim() != 4:
        return f"a {x.dim()}-D input (the sparse convolution takes batched 4-D input)"
    kh, kw = w.shape[2:]
    ph, pw = conv_padding(module)
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw or x.shape[1] != w.shape[1]:
        return ""
    if x.device.type != "cpu" or w.device.type != "cpu":
        return f"input on {x.device.type}, weight on {w.device.type} (the sparse kernels are CPU only)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on (the sparse kernels are fp32 only)"
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return f"input {x.dtype}, weight {w.dtype} (the sparse kernels are fp32 only)"
    if not is_dense_storage(w):
        return "the weight does not fill its storage (a strided view)"
    return None


def conv_input_ok(module: nn.Conv2d, x: torch.Tensor) -> bool:
    """True when this call can run sparse (else the module's dense forward runs); the native
    library is checked separately (:func:`spfde.sparsity.kernels.native.load`)."""
    return conv_input_issue(module, x) is None


def conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    return (0, 0) if module.padding == "valid" else _pair(module.padding)


def make_conv_plan(module: nn.Conv2d, mask: torch.Tensor) -> ConvPlan:
    return ConvPlan(mask, module.weight, _pair(module.stride), conv_padding(module))


def sparse_conv2d(module: nn.Conv2d, x: torch.Tensor, plan: ConvPlan, dense_weight_grad: bool = False) -> torch.Tensor:
    """The sparse forward of ``module`` on ``x`` (call :func:`conv_input_ok` first)."""
    return SparseConv2dFunction.apply(x, module.weight, module.bias, plan, dense_weight_grad)
