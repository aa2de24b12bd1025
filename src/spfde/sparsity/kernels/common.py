"""What the sparse layers share: the nonzero index of a mask, and gather/scatter on dense weights.

The model keeps its dense, masked parameters (optimizer, state and checkpoints unchanged). A
sparse layer gathers the values at the mask's nonzeros from the dense weight every step and
writes its weight gradient back into a dense tensor that is zero at every pruned position, so
the engine's gradient masking stays valid.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class KernelWarning(RuntimeWarning):
    """A sparse kernel fell back to the dense one (a failed build, an unsupported layer)."""


_WARNED: dict = {}

#: a fused call (a transformer MLP, :mod:`.mlp`; a self-attention block, :mod:`.attention`) may
#: allocate at most this many bytes of packed buffers; a larger call runs its layers one by one,
#: which work in bounded groups of tiles
FUSED_MAX_BYTES = 1 << 28


@dataclass(frozen=True)
class Unit:
    """Two masked layers that run as one fused native call when both run sparse (a transformer
    MLP's ``fc1`` and ``fc2``, :mod:`.mlp`; a self-attention block's ``in_proj`` and ``out_proj``,
    :mod:`.attention`). ``auto`` times such a pair as one: ``sparse`` (the fused call) against
    ``dense`` (the pair's dense path), the gradients of both weights in both, and the first
    layer's decision is also the ``partner``'s for ``partner_key``. Why: the fused call is what
    training runs; each layer timed alone times an unfused call with its layout transposes, which
    put the ViT preset's layers on dense in a slow phase of a shared host where the fused calls
    still win (docs/kernels.md)."""

    name: str                               # "mlp" | "attention": part of the calibration key
    partner: Any                            # the second layer's ``execution._Layer``
    partner_key: tuple                      # the second layer's decision key for this call
    dense: Callable[[torch.Tensor], Any]    # the pair on dense kernels, from the first layer's input
    sparse: Callable[[torch.Tensor], Any]   # the fused call


@functools.lru_cache(maxsize=256)
def carve(sizes: tuple[int, ...]) -> tuple[int, tuple[int | None, ...]]:
    """One fp32 buffer for several scratch arrays a native call keeps for its backward: ``(total floats,
    each array's offset in floats)`` for arrays of ``sizes`` floats (0: absent, offset None), each
    starting on a 64-byte line. Why: a fused call's forward kept five arrays, each a ``torch.empty``
    of about 2 us; one allocation carved by address costs one (:func:`carved`)."""
    offsets: list[int | None] = []
    total = 0
    for n in sizes:
        offsets.append(total if n else None)
        total += (int(n) + 15) // 16 * 16
    return total, tuple(offsets)


def carved(buf: torch.Tensor | None, offsets: tuple[int | None, ...]) -> list[int | None]:
    """The addresses of :func:`carve`'s arrays in ``buf`` (fp32), None for an absent one."""
    base = buf.data_ptr() if buf is not None else 0
    return [None if o is None else base + 4 * o for o in offsets]


def warn_once(message: str) -> None:
    """One warning line (no source line under it), shown once per message and process."""
    warnings.warn_explicit(message, KernelWarning, "spfde.sparsity.kernels", 0, registry=_WARNED,
                           module="spfde.sparsity.kernels")


DOUBLE_BACKWARD = ("a double backward (create_graph=True, e.g. a gradient penalty) through spfde's sparse kernels: "
                   "they compute first-order gradients only; set sparsity.kernels=dense for this model")


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.autograd.function.once_differentiable`` with an error that names spfde and the fix.

    The backward runs without building a graph; under ``create_graph=True`` its outputs carry a node
    that raises when they are differentiated again, so a double backward fails loudly instead of
    dropping the second-order terms, while a first-order backward with ``create_graph=True`` works.
    """
    delayed = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
    if delayed is None:  # a torch without the private node: its own decorator, its own message
        return torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx: Any, *args: Any) -> Any:
        with torch.no_grad():
            outputs = backward(ctx, *args)
        if not torch.is_grad_enabled() or not any(torch.is_tensor(a) and a.requires_grad for a in args):
            return outputs
        single = not isinstance(outputs, tuple)
        outs = (outputs,) if single else outputs
        err = delayed(DOUBLE_BACKWARD.encode(), len(outs))
        marked = err(*[o.detach().requires_grad_() if torch.is_tensor(o) else o for o in outs])
        marked = marked if isinstance(marked, tuple) else (marked,)
        return marked[0] if single else marked

    return wrapper


def note_masked_grad(plan: Any, grad: torch.Tensor | None) -> None:
    """A sparse backward wrote ``grad``, a weight gradient zero at every position its plan's mask prunes:
    tell the plan's owner (``plan.note``, set by SparseExecution: the sparsity engine's
    :meth:`~spfde.sparsity.engine.SparseEngine.note_masked_grad`), so the per-step masking can skip it."""
    note = getattr(plan, "note", None)
    if note is not None and grad is not None:
        note(grad)


def weight_grad_buffer(need: bool, w: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """The dense ``.grad`` buffer a native fused backward writes a weight's gradient into, and whether
    the kernel zeroes it itself (it does for a row-major one; any other layout is zeroed here)."""
    if not need:
        return None, False
    row_major = w.stride() == (w.shape[1], 1)
    g = torch.empty_strided(w.shape, w.stride())
    return (g if row_major else g.zero_()), row_major


def is_dense_storage(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill its storage span exactly once (contiguous, channels_last, ...)."""
    if t.numel() == 0:
        return False
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def flat_storage(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in storage order (``t`` must satisfy :func:`is_dense_storage`)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class NonzeroIndex:
    """The nonzeros of one boolean mask: logical flat indices (row-major), coordinates and the
    storage offsets of the same elements in a weight with the given strides."""

    def __init__(self, mask: torch.Tensor, weight_stride: tuple[int, ...]) -> None:
        self.shape = tuple(mask.shape)
        self.flat = mask.reshape(-1).nonzero().squeeze(1)  # row-major order = CSR order
        coords = []
        rest = self.flat
        for size in reversed(self.shape):
            coords.append(rest % size)
            rest = rest // size
        self.coords = list(reversed(coords))
        self.stride = tuple(weight_stride)
        self.offsets = sum(c * s for c, s in zip(self.coords, self.stride, strict=True)) if self.coords else self.flat
        self.nnz = int(self.flat.numel())

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight's values at the nonzeros, in CSR order (a new contiguous tensor)."""
        return flat_storage(weight).index_select(0, self.offsets)

    def scatter(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A dense tensor shaped and strided like ``like``: ``values`` at the nonzeros, zero elsewhere."""
        out = torch.zeros_like(like)
        if out.stride() == self.stride:
            flat_storage(out).index_copy_(0, self.offsets, values.to(out.dtype))
        else:  # zeros_like kept another layout: index by logical position instead
            out = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
            out.view(-1).index_copy_(0, self.flat, values.to(out.dtype))
        return out


def index_counts(keys: torch.Tensor, bins: int) -> torch.Tensor:
    """CSR-style pointer array (int32): ``ptr[i+1] - ptr[i]`` = number of keys equal to ``i``."""
    ptr = torch.zeros(bins + 1, dtype=torch.int64)
    if keys.numel():
        ptr[1:] = torch.bincount(keys, minlength=bins).cumsum(0)
    return ptr.to(torch.int32)
