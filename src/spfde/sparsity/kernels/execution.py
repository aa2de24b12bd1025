"""Sparse execution: run every masked layer with a sparse kernel where it is faster.

Method card
-----------
What it does
    Weight sparsity saves FLOPs on paper only while masked layers run dense kernels. A
    :class:`SparseExecution` puts a sparse forward and backward (work proportional to the
    nonzeros) in place of each masked layer's forward: sparse Linear (:mod:`.linear`), packed
    attention input projection (:mod:`.attention`), native direct Conv2d (:mod:`.conv`). The
    model's parameters, optimizer, optimizer state and checkpoints are untouched (dense, masked):
    each step gathers the nonzero values from the dense weight and writes the weight gradient
    into the dense ``.grad`` at the nonzeros, zero elsewhere, so the engine's masking stays valid.
    Under ``auto`` and ``sparse`` every plain self-attention ``nn.MultiheadAttention``, masked or
    not, also runs spfde's attention path (:mod:`.attention`: a short-sequence core without
    PyTorch's flash set-up cost), so dense and sparse runs share one attention core.
Paper
    Section 2 and 5.3 / Appendix F count the savings of unstructured sparsity in FLOPs; this
    makes a share of them wall-clock on CPU.
Hyper-parameters
    ``sparsity.kernels``: ``auto`` (default) | ``dense`` | ``sparse``.

    * ``dense``: nothing is installed; bit-identical to a run without this module.
    * ``sparse``: every supported layer runs its sparse kernel (unsupported layers or calls, e.g.
      CUDA, bf16, groups, dilation, a failed native build: dense, with one warning line).
    * ``auto``: each layer is timed on its real input (shape, and whether the input and weight
      need gradients) at its first call, and again after its nonzero count changed: a few
      interleaved repetitions of dense and sparse forward + backward (forward alone for a frozen
      layer), best times compared, sparse kept only when at least ``MARGIN`` faster, so ``auto`` is
      not slower than dense beyond timing noise. A decision timed once is provisional: the same
      call is timed again in the next epoch and decided on the best times of both timings
      (``CONFIRM_TIMINGS``). Why: another process on a shared machine can stall one of the two
      threads for a scheduler slice during the few milliseconds a timing takes, which once made
      the ViT preset's attention projections time at 0.04x dense for the whole run (they run at
      1.7x); a stall only adds time, so the better of two timings apart is the kernel's. The same
      call at a somewhat smaller batch (a short last batch) reuses the decision; a large batch is timed on its first
      ``TIME_MAX_BATCH`` samples unless the whole call is at most ``TIME_WHOLE_MACS`` multiply-adds
      (there the sparse path's fixed cost per call is a visible share, which a slice overstates).
      Calls below ``TINY_MACS`` multiply-adds run dense untimed (the sparse path's fixed cost
      cannot win there). A re-decision that an earlier timing of the layer already settles is
      not timed (``PREDICT_SAME_CALL`` / ``PREDICT_OTHER_CALL``): the sparse kernels' time follows
      the nonzero count, so a layer that lost by 3x at the search density still loses at s. On
      CUDA every call runs dense: torch's 2:4 and CSR kernels measured slower than the dense fp16
      layer the trainer runs there (docs/kernels.md).

    ``sparsity.kernels_calibration``: ``auto`` (default) | ``off`` | a file path. Where ``auto``
    keeps its timed decisions across runs (:mod:`.calibration`): ``auto`` is ``calibration.json``
    in the native kernel cache folder. A decision is keyed by the layer's kind, weight shape,
    geometry, the call, the density to 1%, threads, torch version, CPU model and native build; a
    stored one is used untimed (with its stored speedup). ``off`` times in every run (within a run,
    layers with the same key still share one timing: an in-memory store).
Dynamic masks
    A layer's index structures are rebuilt only when the engine installs a new mask (Prune&Grow,
    prune-on-freeze, a loaded checkpoint), detected by the mask tensor's identity; ``auto``'s
    decisions are kept while the layer's nonzero count stays within ``RETIME_NNZ_CHANGE`` of the
    count they were timed at (the kernels' cost depends on shapes and the number of nonzeros, not
    on their positions), so it re-times at the start, when MEST's density steps (grow switch,
    search end) and when a layer freezes (a forward-only key; not inside :meth:`SparseExecution.one_off`,
    the activation cache's probe and fill, which run a frozen layer once). In an epoch where RigL
    records its dense gradient (``engine.needs_dense_grad``), sparse layers compute the dense
    weight gradient (forward and input gradient stay sparse); the ledger charges as before.
Determinism
    ``dense`` and ``sparse`` give bit-identical fresh runs and resumes on CPU (every kernel sums in
    a fixed order). ``auto`` is bit-identical given the same choices (audit H1): on the same machine
    with the same calibration file, fresh runs take every decision from the file (the first run
    times and stores them), so they are bit-identical. The run that timed can differ from them
    where its confirming second timing overturned a first one (a timing load disturbed); the
    runs after it replay the confirmed decision from their first call. The choices are also part of the
    controller's state, so a resumed run replays the ones in force at the checkpoint. With
    ``kernels_calibration: off`` every run times afresh and two runs may pick differently.
Expected effect
    CPU fwd+bwd per layer on 2 threads (bench/kernels.py, idle machine): native Linear 1024x1024
    3.3x at 90%, conv 3x3 1.9-3.9x at 95% on ResNet-20/32 shapes. End to end (bench/end_to_end.py):
    ResNet-20 SpFDE 90%+20%+20% at 0.48x dense wall-clock, MEST 90% alone 0.80x; the ViT preset at 90/20/20
    0.39x (the median of five runs, 0.37-0.40) and 0.58-0.63x (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spfde import __version__ as spfde_version
from spfde.errors import ConfigError
from spfde.sparsity.kernels import calibration, native
from spfde.sparsity.kernels.attention import (
    SHORT_MAX_LEN,
    attention_unit,
    fused_prenorm_call,
    mha_input_issue,
    self_attention,
    sparse_mha,
    unsupported_mha,
)
from spfde.sparsity.kernels.common import Unit, warn_once
from spfde.sparsity.kernels.conv import conv_input_issue, make_conv_plan, sparse_conv2d, unsupported_conv
from spfde.sparsity.kernels.linear import (
    EPILOGUE_KWARG,
    PROLOGUE_KWARG,
    RESIDUAL_KWARG,
    LinearPlan,
    linear_input_issue,
    linear_type_issue,
    norm_fusable,
    normed_requires_grad,
    param,
    sparse_linear,
    unsupported_linear,
)

KERNEL_MODES = ("auto", "dense", "sparse")
#: calls with fewer dense multiply-adds than this run dense without timing (auto)
TINY_MACS = 1 << 22
#: auto keeps the sparse kernel only when its best time is at most (1 - MARGIN) x dense
MARGIN = 0.05
#: timings a decision pools before it is final: the first one's decision holds until the call's first
#: use after the next epoch start, which times it again (load on the machine during one timing
#: cannot decide a whole run, nor, through the calibration file, every later run)
CONFIRM_TIMINGS = 2
#: distinct call keys (input shape, gradient needs) timed per layer; later ones reuse the first
MAX_KEYS = 8
#: timing budget per layer and key, and the bounds on interleaved repetitions per variant
TIME_BUDGET_S = 0.015
MIN_REPS, MAX_REPS = 3, 9
#: a call is timed on at most this many samples (both kernels scale linearly in the batch beyond it)
TIME_MAX_BATCH = 64
#: ... unless the whole call is at most this many dense multiply-adds: then it is timed whole. At such
#: sizes the sparse path's fixed cost per call (Python, scratch, layout) is a visible share, and a
#: slice would charge it twice per sample: on 64 of their 128 samples the ViT preset's MLP linears
#: (2,176 rows, 18 M multiply-adds) measured a dense/sparse speedup about 0.1 lower than whole
#: (bench/auto_timing.py, docs/kernels.md)
TIME_WHOLE_MACS = 1 << 26
#: a smaller batch reuses the decision of the same call at a batch at most this many times larger
#: (a short last batch); a larger batch is timed (a large call on TIME_MAX_BATCH samples)
REUSE_BATCH_RATIO = 4
#: a new mask keeps the layer's decisions while its nonzero count is within this fraction of the
#: count they were timed at: both kernels' cost follows the shapes and the number of nonzeros, not
#: where the nonzeros are, so a Prune&Grow that swaps positions at constant density is not re-timed
RETIME_NNZ_CHANGE = 0.1
#: a call whose speedup can be predicted from an earlier timing of the same layer outside these
#: bounds is decided without timing: sparse time follows the nonzero count, dense time does not,
#: so a timed speedup ``s`` at ``n0`` nonzeros predicts about ``s * n0 / n`` at ``n`` nonzeros. The
#: same call at another density uses the tight bounds, another call of the same input shape (the
#: forward-only call of a layer that froze, from its forward + backward) the wide ones
PREDICT_SAME_CALL = (0.6, 1.6)
PREDICT_OTHER_CALL = (0.4, 2.5)

# (input needs grad, weight needs grad, dense weight grad, input shape)
Key = tuple[bool, bool, bool, tuple[int, ...]]


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - older torch
    _get_current_dispatch_mode = lambda: None  # noqa: E731
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _traced() -> bool:
    """Tracing, compiling, a dispatch mode (FlopCounterMode, fake tensors) or a ``torch.func``
    transform (``grad``, ``vmap``, ``jacrev``: the sparse autograd functions define no vmap rule):
    run the dense forward."""
    return (torch.jit.is_tracing() or _is_compiling() or _get_current_dispatch_mode() is not None
            or _functorch_active())


def _clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def race(dense, sparse) -> tuple[float, float]:
    """Best seconds of ``dense()`` and ``sparse()`` over interleaved repetitions after one warm-up run
    each: the minimum, not the median, because what another process does to a repetition only adds
    time (a median of a few milliseconds' repetitions is what one stalled thread moves)."""
    warm = _clock(dense) + _clock(sparse)
    reps = min(MAX_REPS, max(MIN_REPS, int(TIME_BUDGET_S / max(warm, 1e-9))))
    td, ts = [], []
    for i in range(reps):
        order = ((td, dense), (ts, sparse)) if i % 2 == 0 else ((ts, sparse), (td, dense))
        for out, fn in order:
            out.append(_clock(fn))
    return min(td), min(ts)


def _swap(obj: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    return new if obj is old else obj


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance forward SparseExecution installs; the class forward is the dense path."""
    return self._spfde_kernel(*args, **kwargs)


_forward.spfde_forward = True  # type: ignore[attr-defined]  # linear_act: this instance forward is spfde's


def _encode(key: Key) -> list:
    return [key[0], key[1], key[2], list(key[3])]


def _decode(data: list) -> Key:
    return (bool(data[0]), bool(data[1]), bool(data[2]), tuple(int(d) for d in data[3]))


class _Layer:
    """The sparse path of one masked layer, called in place of the module's forward."""

    def __init__(self, exe: SparseExecution, name: str, param: str, module: nn.Module, kind: str) -> None:
        self.exe, self.name, self.param, self.module, self.kind = exe, name, param, module, kind
        self._weight_name = "in_proj_weight" if kind == "mha" else "weight"
        self.plan: Any = None
        self._mask: torch.Tensor | None = None
        self.basis_nnz: int | None = None  # the nonzero count the decisions were timed at
        self.decisions: dict[Key, str] = {}
        self.speedups: dict[Key, float] = {}
        self.primary: Key | None = None
        self._primary_grad = False
        self.used: str | None = None  # what the latest training call ran (_record)
        self.fell_back = False  # whether that call could not run sparse at all (_fell_back)
        self.calls = 0  # training calls since the epoch started (SparseExecution.start_epoch)
        self.pending: dict[str, Any] | None = None
        # speedups timed at earlier nonzero counts: key -> (dense/sparse speedup, nonzeros)
        self.prior: dict[Key, tuple[float, int]] = {}
        # decisions timed fewer than CONFIRM_TIMINGS times: key -> (best dense s, best sparse s, timings),
        # timed again at their first call after the next epoch start (when they move to ``recheck``)
        self.provisional: dict[Key, tuple[float, float, int]] = {}
        self.recheck: dict[Key, tuple[float, float, int]] = {}

    @property
    def weight(self) -> torch.Tensor:
        return param(self.module, self._weight_name)  # on every call: a replaced parameter is seen at once

    # ------------------------------------------------------------------ index structures
    def sync(self) -> Any:
        """The plan for the engine's current mask; rebuilt only when a new mask was installed."""
        mask = self.exe.engine.masks.get(self.param)
        if mask is None:
            return None
        w = self.weight
        if self.plan is not None and mask is self._mask and self.plan.index.stride == tuple(w.stride()):
            return self.plan
        self.plan = make_conv_plan(self.module, mask) if self.kind == "conv" else LinearPlan(mask, w)
        self._mask = mask
        note = getattr(self.exe.engine, "note_masked_grad", None)
        if note is not None:  # the engine's per-step masking skips the gradients the kernels wrote masked
            self.plan.note = functools.partial(note, self.param, mask)
        if self.pending is not None:  # choices from a checkpoint
            saved, self.pending = self.pending, None
            self._restore(saved)
        nnz = self.plan.nnz
        if self.basis_nnz is None or abs(nnz - self.basis_nnz) > RETIME_NNZ_CHANGE * max(self.basis_nnz, 1):
            if self.basis_nnz is not None:
                self.prior.update({k: (v, self.basis_nnz) for k, v in self.speedups.items()})
            self._restore({})
            self.basis_nnz = nnz
        return self.plan

    def start_epoch(self) -> None:
        """Provisional decisions are timed again at their next call (:data:`CONFIRM_TIMINGS`)."""
        self.recheck.update(self.provisional)
        self.provisional = {}

    def _restore(self, saved: dict[str, Any]) -> None:
        self.basis_nnz = saved.get("basis_nnz")
        self.decisions = {_decode(d[:4]): str(d[4]) for d in saved.get("decisions", [])}
        self.speedups = {_decode(d[:4]): float(d[5]) for d in saved.get("decisions", []) if d[5] is not None}
        self.primary = _decode(saved["primary"]) if saved.get("primary") is not None else None
        self._primary_grad = bool(saved.get("primary_grad", False))
        self.provisional, self.recheck = (
            {_decode(d[:4]): (float(d[4]), float(d[5]), int(d[6])) for d in saved.get(k, [])}
            for k in ("provisional", "recheck"))

    # ------------------------------------------------------------------ the call
    def _input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | None]:
        """``(x, None)`` when this call can run sparse, else ``(None, why it runs dense)``."""
        if self.kind == "mha":
            return mha_input_issue(self.module, args, kwargs)
        x = args[0] if args else kwargs.get("input")
        if not torch.is_tensor(x):
            return None, ""
        why = conv_input_issue(self.module, x) if self.kind == "conv" else linear_input_issue(self.weight, x)
        return (x, None) if why is None else (None, why)

    def dense(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def dense_call(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The dense path of a call that could run sparse: for attention, spfde's attention path with
        a dense projection, so dense and sparse differ only in the projection (:mod:`.attention`)."""
        return self_attention(self.module, x) if self.kind == "mha" else self.dense(*args, **kwargs)

    def sparse(self, x: torch.Tensor, dense_weight_grad: bool, gelu: bool = False) -> Any:
        m = self.module
        if self.kind == "conv":
            return sparse_conv2d(m, x, self.plan, dense_weight_grad)
        if self.kind == "mha":
            return sparse_mha(m, x, self.plan, dense_weight_grad)
        return sparse_linear(x, m.weight, m.bias, self.plan, dense_weight_grad, gelu)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # linear_act's call: F.gelu of the output, fused into the kernel when the call runs sparse
        # (auto decides on the Linear alone, as for any other call)
        gelu = kwargs.pop(EPILOGUE_KWARG, None) == "gelu"
        if gelu and self.kind != "linear":
            return F.gelu(self(*args, **kwargs))
        # prenorm_attention's call: the block's pre-norm (and residual), inside the fused kernel where
        # the call runs there (decided, not being timed), else applied here and the call runs as usual
        norm = kwargs.pop(PROLOGUE_KWARG, None)
        residual = kwargs.pop(RESIDUAL_KWARG, False)
        x0 = args[0] if residual else None
        if norm is not None:
            out = self._prenorm_fused(norm, args, kwargs, residual)
            if out is not None:
                return out
            args = _prenormed(norm, args)
        return _with_residual(x0, self._call(args, kwargs, gelu))

    def _call(self, args: tuple, kwargs: dict, gelu: bool) -> Any:
        def dense(out: Any) -> Any:
            return F.gelu(out) if gelu else out

        if _traced():
            return dense(self.dense(*args, **kwargs))
        x, why = self._input(args, kwargs)
        if x is not None:
            if self.sync() is None:
                return dense(self.dense(*args, **kwargs))
            why = self.exe.engine.weight_issue(self.param, self.weight)
        if why is not None:
            self._fell_back(why)
            if self.kind == "mha":
                _out_proj_runs_dense(self.module, why)
            return dense(self.dense(*args, **kwargs))
        key = self.call_key(x)
        # a block whose out_proj can fuse with this in_proj is timed and decided as one (common.Unit)
        deciding = self.kind == "mha" and not key[2] and self.deciding(key)
        unit = attention_unit(self.module, x, self) if deciding else None
        choice = self.choose(key, x, args, kwargs, unit)
        self._record(choice)
        if choice == "dense":
            return dense(self.dense_call(x, args, kwargs))
        return self.sparse(x, key[2], gelu)

    def _prenorm_fused(self, norm: nn.Module, args: tuple, kwargs: dict, residual: bool = False) -> Any:
        """The attention call's output with ``norm`` (and ``residual``'s add) run inside the fused block
        kernel, or None where the call does not run that kernel by a decision already made (the caller
        then normalises)."""
        if self.kind != "mha" or _traced() or self.exe.in_probe:
            return None
        x, _ = self._input(args, kwargs)
        if x is None or not norm_fusable(norm, x) or self.sync() is None:
            return None
        if self.exe.engine.weight_issue(self.param, self.weight) is not None:
            return None
        key = self.key_for(tuple(x.shape), normed_requires_grad(norm, x))  # the call on norm(x), as timed
        if key[2] or self.deciding(key) or self.choose(key, x, args, kwargs) != "sparse":
            return None
        out = fused_prenorm_call(self.module, x, self.plan, norm, residual)
        if out is None:
            return None
        self._record("sparse")
        return out, None

    def _record(self, ran: str, fell_back: bool = False) -> None:
        # what training ran: a call with autograd on outside a one-off pass (the memory model's probe,
        # the activation cache's fill), which would otherwise overwrite it
        if torch.is_grad_enabled() and not self.exe.in_one_off:
            self.used, self.fell_back = ran, fell_back
            self.calls += 1

    def _fell_back(self, why: str) -> None:
        """A call that could not run sparse runs dense: recorded; under ``sparse`` one warning line
        per reason and run (under ``auto`` running dense is a normal outcome)."""
        self._record("dense", fell_back=True)
        if why and not self.exe.in_one_off:
            self.exe.warn_sparse(why, f"layer {self.name!r} runs dense for a call: {why} (the epoch's "
                                      "`kernels` field in metrics.jsonl says which layers did)")

    def call_key(self, x: torch.Tensor) -> Key:
        """The decision key of a call on ``x`` in the current grad mode."""
        return self.key_for(tuple(x.shape), x.requires_grad)

    def key_for(self, shape: tuple[int, ...], x_grad: bool) -> Key:
        """The decision key of a call on an input of ``shape`` (needing a gradient when ``x_grad``)."""
        if not torch.is_grad_enabled():
            return (False, False, False, shape)
        w_grad = self.weight.requires_grad
        return (x_grad, w_grad, w_grad and self.exe.dense_weight_grad, shape)

    # ------------------------------------------------------------------ fused calls (kernels/mlp.py)
    def sparse_key(self, x: torch.Tensor, unit: Unit | None = None, x_grad: bool | None = None) -> Key | None:
        """The key of a training call of this Linear on ``x`` that runs sparse by the layer's choice
        (timed now when not decided yet, as a call would be; as one with ``unit``'s partner when
        given); None when the call would run dense for any reason (the module's own call then runs,
        records and explains it). Not recorded. ``x_grad``: whether the call's input needs a gradient,
        when not ``x``'s own (a pre-norm inside the call: :func:`~.linear.normed_requires_grad`)."""
        if self.kind != "linear" or _traced() or self.exe.in_probe:
            return None
        if linear_input_issue(self.weight, x) is not None or self.sync() is None:
            return None
        if self.exe.engine.weight_issue(self.param, self.weight) is not None:
            return None
        key = self.key_for(tuple(x.shape), x.requires_grad if x_grad is None else x_grad)
        return key if self.choose(key, x, (x,), {}, unit) == "sparse" else None

    def can_fuse(self, like: torch.Tensor) -> bool:
        """Whether this Linear can run sparse inside a fused call on an input of ``like``'s dtype and
        device (its plan is current: a partner's decision adopted after this is kept)."""
        if self.kind != "linear" or self.sync() is None or self.exe.in_probe:
            return False
        if linear_type_issue(self.weight, like.dtype, like.device) is not None:
            return False
        return self.exe.engine.weight_issue(self.param, self.weight) is None

    def decided_sparse(self, key: Key, like: torch.Tensor) -> bool:
        """Whether a call with ``key`` (on an input of ``like``'s dtype and device) runs sparse by a
        decision already made: for a Linear whose input a fused kernel never forms, so nothing can
        be timed (its :class:`~.common.Unit` partner's timing decides it, else an undecided call
        runs the Linears one by one, which decides it)."""
        if not self.can_fuse(like):
            return False
        if self.exe.mode == "sparse" or self.decisions.get(key) == "sparse":
            return True
        # a one-off pass (the activation cache's fill) fuses by the untimed choice it would make for
        # the call alone: the fused forward is the separate calls' bit for bit
        return (self.exe.in_one_off and key not in self.decisions
                and self.one_off_choice(key, like.new_empty(key[3])) == "sparse")

    def deciding(self, key: Key) -> bool:
        """Whether a call with ``key`` may be timed now (undecided, or due for its confirming timing):
        only then does a caller build the :class:`~.common.Unit` that its timing needs."""
        return self.exe.mode == "auto" and not self.exe.in_one_off and (key not in self.decisions
                                                                         or key in self.recheck)

    def adopt(self, key: Key, choice: str, speedup: float | None) -> None:
        """The decision of the :class:`~.common.Unit` this layer is the partner of, for ``key``."""
        self.decisions[key] = choice
        if speedup is not None:
            self.speedups[key] = speedup
        self.provisional.pop(key, None)  # the unit's first layer confirms it
        self.recheck.pop(key, None)
        self._note_primary(key)

    def record_sparse(self) -> None:
        """A fused call ran this layer sparse."""
        self._record("sparse")

    # ------------------------------------------------------------------ the choice
    def macs(self, x: torch.Tensor) -> int:
        w = self.weight
        if self.kind == "conv":
            oh, ow = self.plan.out_size(x.shape[2], x.shape[3])
            return x.shape[0] * oh * ow * w.numel()
        return x.numel() * w.shape[0]

    def choose(self, key: Key, x: torch.Tensor, args: tuple, kwargs: dict, unit: Unit | None = None) -> str:
        """``dense`` | ``sparse`` for a call; with ``unit``, for the fused pair, whose partner adopts it."""
        choice = self._choose(key, x, args, kwargs, unit)
        if unit is not None and self.decisions.get(key) == choice and not (self.exe.in_one_off or self.exe.in_probe):
            unit.partner.adopt(unit.partner_key, choice, self.speedups.get(key))
        return choice

    def _choose(self, key: Key, x: torch.Tensor, args: tuple, kwargs: dict, unit: Unit | None) -> str:
        if self.exe.mode == "sparse":
            return "dense" if self.kind == "conv" and native.load() is None else "sparse"
        choice = self.decisions.get(key)
        if choice is not None:
            if key not in self.recheck or self.exe.in_one_off or self.exe.in_probe:
                return choice
            choice, speedup = self.measure(key, x, args, kwargs, unit)  # a provisional decision's second timing
            self.decisions[key] = choice
            if speedup is not None:
                self.speedups[key] = speedup
            return choice
        if self.exe.in_one_off and (choice := self.one_off_choice(key, x)) is not None:
            return choice
        if self.exe.in_probe or len(self.decisions) >= MAX_KEYS:
            return self.primary_choice()
        similar = [c for k, c in self.decisions.items() if k[:3] == key[:3] and k[3][1:] == key[3][1:]
                   and key[3][0] <= k[3][0] <= REUSE_BATCH_RATIO * key[3][0]] if self._batch_leading() else []
        if similar:  # the same call at a somewhat smaller batch (a short last batch)
            choice = similar[0]
        elif self.macs(x) < TINY_MACS or (self.kind == "conv" and native.load() is None):
            choice = "dense"
        elif (predicted := self.predict(key)) is not None:
            choice = predicted
        else:
            choice, speedup = self.measure(key, x, args, kwargs, unit)
            if speedup is not None:
                self.speedups[key] = speedup
        self.decisions[key] = choice
        self._note_primary(key)
        return choice

    def _note_primary(self, key: Key) -> None:
        """The layer's main call (reported by :meth:`choice`): its first decided call, or its first
        decided call with autograd on."""
        grad = torch.is_grad_enabled()
        if self.primary is None or (grad and not self._primary_grad):
            self.primary, self._primary_grad = key, grad

    def one_off_choice(self, key: Key, x: torch.Tensor) -> str | None:
        """An untimed choice for a call of a one-off pass (:meth:`SparseExecution.one_off`), not
        recorded: the stored decision when there is one, else the one this layer's timings of the
        same input shape predict (a frozen layer's forward from its forward + backward); None: none.
        Memoised for the pass, as a fill calls it per chunk: nothing it reads changes inside one (a
        None is not kept: that call is timed, which makes it a decision)."""
        memo = (self.name, key, tuple(x.stride()))
        if memo in self.exe.one_off_choices:
            return self.exe.one_off_choices[memo]
        store = self.exe.calibration
        hit = store.get(self.calibration_key(key, x)) if store is not None else None
        if hit is not None:
            choice: str | None = hit.choice
        else:
            nnz = max(self.plan.nnz, 1)
            same_shape = [s * n / nnz for k, (s, n) in self._timings() if k[3] == key[3]]
            choice = ("sparse" if same_shape[-1] * (1.0 - MARGIN) >= 1.0 else "dense") if same_shape else None
        if choice is not None:
            self.exe.one_off_choices[memo] = choice
        return choice

    def _timings(self) -> list[tuple[Key, tuple[float, int]]]:
        """Every speedup this layer timed, earlier counts first: ``(key, (speedup, nonzeros then))``."""
        nnz = max(self.plan.nnz, 1)
        return [*self.prior.items(), *((k, (v, self.basis_nnz or nnz)) for k, v in self.speedups.items())]

    def _batch_leading(self) -> bool:
        """The input's first dimension is the batch (not the sequence of a seq-first attention)."""
        return self.kind != "mha" or bool(self.module.batch_first)

    def predict(self, key: Key) -> str | None:
        """A choice that timing could not change, from this layer's earlier timings; else None.

        Deterministic given the timings it reads, so runs that replay the same timings (the
        calibration file, a checkpoint) predict the same.
        """
        nnz = max(self.plan.nnz, 1)
        same = [(s * n / nnz, PREDICT_SAME_CALL) for k, (s, n) in self.prior.items() if k == key]
        other = [(s * n / nnz, PREDICT_OTHER_CALL) for k, (s, n) in self._timings() if k != key and k[3] == key[3]]
        for speedup, (low, high) in same[-1:] or other[-1:]:
            if speedup < low:
                return "dense"
            if speedup > high:
                return "sparse"
        return None

    def measure(self, key: Key, x: torch.Tensor, args: tuple, kwargs: dict,
                unit: Unit | None = None) -> tuple[str, float | None]:
        """(choice, dense/sparse speedup) for a call: the calibration store's, else timed and stored.

        A decision pooling fewer than :data:`CONFIRM_TIMINGS` timings is provisional (timed again
        after the next epoch start); that timing decides on the best times of both."""
        store = self.exe.calibration
        ckey = self.calibration_key(key, x, unit) if store is not None else ""
        hit = store.get(ckey) if store is not None else None
        earlier = self.recheck.pop(key, None)
        if hit is not None and (earlier is None or hit.timings >= CONFIRM_TIMINGS):
            if hit.timings < CONFIRM_TIMINGS and hit.dense_s is not None and hit.sparse_s is not None:
                self.provisional[key] = (hit.dense_s, hit.sparse_s, hit.timings)
            return hit.choice, hit.speedup
        td, ts = self.time(key, x, args, kwargs, unit)
        timings = 1
        stored = (hit.dense_s, hit.sparse_s, hit.timings) if hit is not None else None
        for before in (earlier, stored):  # the best times of every timing of this call so far
            if before is not None and before[0] is not None and before[1] is not None:
                td, ts, timings = min(td, before[0]), min(ts, before[1]), max(timings, before[2] + 1)
        choice, speedup = ("sparse" if ts <= (1.0 - MARGIN) * td else "dense"), td / max(ts, 1e-12)
        if timings < CONFIRM_TIMINGS:
            self.provisional[key] = (td, ts, timings)
        if store is not None:
            store.put(ckey, choice, speedup, timings, td, ts)
        return choice, speedup

    def sliced(self, x: torch.Tensor) -> bool:
        """Whether :meth:`time` times this call on its first ``TIME_MAX_BATCH`` samples (a large
        call of a large batch; an attention layer, whose leading dimension may be the sequence, and
        calls of at most ``TIME_WHOLE_MACS`` are timed whole)."""
        return self.kind != "mha" and x.shape[0] > TIME_MAX_BATCH and self.macs(x) > TIME_WHOLE_MACS

    def calibration_key(self, key: Key, x: torch.Tensor, unit: Unit | None = None) -> str:
        """Everything that sets the two kernels' costs for this call (:mod:`.calibration` adds the
        thread count, torch version and CPU model); the nonzero count enters as density to 1%. A
        :class:`~.common.Unit`'s timing is keyed by the pair: its name, the partner's weight and density."""
        m, w = self.module, self.weight
        fields: dict[str, Any] = {
            "kind": self.kind, "weight": w.shape, "weight_stride": w.stride(), "dtype": str(w.dtype),
            "bias": getattr(m, "in_proj_bias" if self.kind == "mha" else "bias", None) is not None,
            "call": _encode(key), "input_stride": x.stride(), "training": m.training,
            # the samples the timing ran on: a decision timed on a slice is not one timed whole
            "timed_batch": TIME_MAX_BATCH if self.sliced(x) else int(x.shape[0]),
            "density": round(100 * self.plan.nnz / max(w.numel(), 1)), "version": spfde_version,
            # every sparse path runs the native library when it loads (status() loads it): its build
            "native": Path(str(native.status()["path"])).name}
        if unit is not None:
            w2 = unit.partner.weight
            fields.update(unit=unit.name, partner_weight=w2.shape,
                          partner_density=round(100 * unit.partner.plan.nnz / max(w2.numel(), 1)))
        if self.kind == "conv":
            fields.update(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
        elif self.kind == "mha":
            # both paths now share spfde's attention core: decisions timed against the module's own
            # forward (before it existed) are not reused
            fields.update(heads=m.num_heads, dropout=m.dropout, batch_first=m.batch_first,
                          attention_path=SHORT_MAX_LEN)
        return calibration.key(fields)

    def time(self, key: Key, x: torch.Tensor, args: tuple, kwargs: dict,
             unit: Unit | None = None) -> tuple[float, float]:
        """(dense, sparse) best seconds of this call's work on a detached copy of its input (of the
        fused pair's and the pair's dense path with ``unit``, both weights' gradients in both)."""
        need_x, need_w, dense_w, _ = key
        weights = [self.weight] + ([unit.partner.weight] if unit is not None else [])
        if self.sliced(x):
            part = x[:TIME_MAX_BATCH]
            args, kwargs = tuple(_swap(a, x, part) for a in args), {k: _swap(v, x, part) for k, v in kwargs.items()}
            x = part

        def run(fn):
            def go() -> None:
                xx = x.detach().requires_grad_(need_x)
                with torch.set_grad_enabled(need_x or need_w):
                    out = fn(xx)
                    out = out[0] if isinstance(out, tuple) else out
                    if need_x or need_w:  # autograd.grad: nothing accumulates into .grad
                        inputs = ([xx] if need_x else []) + ([t for t in weights if t.requires_grad] if need_w else [])
                        torch.autograd.grad(out, inputs, torch.ones_like(out))
            return go

        def dense(xx: torch.Tensor) -> Any:
            return self.dense_call(xx, tuple(_swap(a, x, xx) for a in args),
                                   {k: _swap(v, x, xx) for k, v in kwargs.items()})

        # dropout inside (attention) must not move the run's RNG; identity saved-tensor hooks: the timing's
        # graphs are its own, not part of an enclosing non-reentrant torch.utils.checkpoint region (whose
        # hooks would pack them and recompute at unpack)
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            if unit is not None:
                return race(run(unit.dense), run(unit.sparse))
            return race(run(dense), run(lambda xx: self.sparse(xx, dense_w)))

    # ------------------------------------------------------------------ reporting and state
    def primary_choice(self) -> str:
        """The decision for the layer's main call (dense before there is one)."""
        return self.decisions.get(self.primary, "dense") if self.primary is not None else "dense"

    def choice(self) -> str:
        if self.exe.mode == "auto" and not self.fell_back:
            return self.primary_choice()
        # never called with autograd on: its forward did not run (e.g. the out_proj of an attention
        # call that ran the module's own forward, which reads the weight directly), so nothing ran sparse
        return self.used or "dense"

    def state(self) -> dict[str, Any]:
        return {"basis_nnz": self.basis_nnz, "primary": _encode(self.primary) if self.primary else None,
                "primary_grad": self._primary_grad, "used": self.used, "fell_back": self.fell_back,
                "decisions": [_encode(k) + [c, self.speedups.get(k)] for k, c in self.decisions.items()],
                "provisional": [_encode(k) + list(v) for k, v in self.provisional.items()],
                "recheck": [_encode(k) + list(v) for k, v in self.recheck.items()]}


class _Attention:
    """spfde's attention path for a plain ``nn.MultiheadAttention`` whose projection is not masked
    (:mod:`.attention`: the same core a masked one runs); any other call runs the module's forward."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        norm = kwargs.pop(PROLOGUE_KWARG, None)
        x0 = args[0] if kwargs.pop(RESIDUAL_KWARG, False) else None
        if norm is not None:  # prenorm_attention's call: the pre-norm only fuses into a sparse block
            args = _prenormed(norm, args)
        return _with_residual(x0, self._call(args, kwargs))

    def _call(self, args: tuple, kwargs: dict) -> Any:
        if _traced():
            return type(self.module).forward(self.module, *args, **kwargs)
        x, why = mha_input_issue(self.module, args, kwargs)
        if x is None:
            _out_proj_runs_dense(self.module, why)
            return type(self.module).forward(self.module, *args, **kwargs)
        return self_attention(self.module, x)


def _with_residual(x: torch.Tensor | None, out: tuple) -> tuple:
    """An attention call's ``(output, weights)`` with ``x`` added to the output (None: as it is)."""
    return out if x is None else (x + out[0], *out[1:])


def _prenormed(norm: nn.Module, args: tuple) -> tuple:
    """prenorm_attention's ``(x, x, x)`` as ``(h, h, h)``, ``h = norm(x)``: the call without the fusion."""
    h = norm(args[0])
    return (h, h, h, *args[3:])


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _out_proj_runs_dense(module: nn.Module, why: str | None) -> None:
    """The module's own attention forward reads ``out_proj.weight`` directly, so a masked
    ``out_proj``'s sparse path is not called: record (and under ``sparse`` say) that it ran dense."""
    layer = getattr(module.out_proj, "_spfde_kernel", None)
    if isinstance(layer, _Layer):
        layer._fell_back(f"its attention module runs its own forward ({why})" if why else "")


def _out_proj_never_called(modules: dict[str, nn.Module], owner: str, module: nn.Module) -> str | None:
    """Why the Linear ``owner`` can never run sparse: it is the ``out_proj`` of a plain
    ``nn.MultiheadAttention`` that always runs its own forward (:func:`unsupported_mha`), which reads
    ``out_proj.weight`` directly and never calls the Linear. Said at set-up like any other layer without a
    sparse path, instead of an epoch later as "no training call went through spfde's kernels", a
    message that blames torch.compile."""
    parent, _, leaf = owner.rpartition(".")
    mha = modules.get(parent)
    if leaf != "out_proj" or not isinstance(mha, nn.MultiheadAttention) or mha.out_proj is not module:
        return None
    why = unsupported_mha(mha)
    if why is None or type(mha).forward is not nn.MultiheadAttention.forward:
        return None  # spfde's attention path calls it, or a subclass's own forward may call it as a module
    return (f"the out_proj of an nn.MultiheadAttention that runs its own forward ({why}), which reads the "
            "weight directly")


def _kind(module: nn.Module | None, attr: str) -> tuple[str | None, str | None]:
    """(kind, None) when parameter ``attr`` of ``module`` has a sparse path, else (None, reason)."""
    if isinstance(module, nn.Conv2d) and attr == "weight":
        reason = unsupported_conv(module)
        return ("conv", None) if reason is None else (None, reason)
    if isinstance(module, nn.Linear) and attr == "weight":
        reason = unsupported_linear(module)
        return ("linear", None) if reason is None else (None, reason)
    if isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight":
        reason = unsupported_mha(module)
        return ("mha", None) if reason is None else (None, reason)
    return None, f"no sparse kernel for {type(module).__name__}.{attr}"


class SparseExecution:
    """Installs and drives the sparse path of every masked layer of ``model``.

    Args:
        model: the (unwrapped) network the engine masks.
        engine: its :class:`~spfde.sparsity.engine.SparseEngine` (masks, epoch, RigL's needs).
        mode: ``auto`` | ``dense`` | ``sparse`` (``sparsity.kernels``).
        calibration_file: ``auto`` | ``off`` | a path (``sparsity.kernels_calibration``): where
            ``auto`` keeps its decisions across runs (:mod:`.calibration`).

    The controller creates it after the masks are applied and calls :meth:`refresh` at every
    epoch start (after Prune&Grow); :meth:`choices` goes into ``metrics.jsonl`` as ``kernels``.
    :meth:`remove` restores every module's own forward.
    """

    def __init__(self, model: nn.Module, engine: Any, mode: str = "auto", calibration_file: str = "auto") -> None:
        if mode not in KERNEL_MODES:
            raise ConfigError(f"config field 'sparsity.kernels' = {mode!r}; allowed: {', '.join(KERNEL_MODES)}")
        self.model, self.engine, self.mode = model, engine, mode
        #: auto's stored decisions (in memory only under ``off``; None when not ``auto``)
        self.calibration = calibration.Calibration(calibration.resolve(calibration_file)) if mode == "auto" else None
        self.layers: dict[str, _Layer] = {}
        self.unsupported: dict[str, str] = {}
        self.in_one_off = False
        self.in_probe = False
        #: _Layer.one_off_choice's memo, valid for one one-off pass (cleared when the outermost starts)
        self.one_off_choices: dict[tuple, str | None] = {}
        self.counting = False  # start_epoch was called: choices() knows which layers made training calls
        self.warned: set[str] = set()  # the reasons said under ``sparse`` (warn_sparse)
        #: plain self-attention modules whose projection is not masked: spfde's attention path too
        self.attention: dict[str, nn.Module] = {}
        self._order = [lay.module for lay in engine.masked_layers]
        if mode == "dense":
            return
        modules = dict(model.named_modules())
        for lay in engine.masked_layers:
            # the parameter's owner: lay.module is the unit name metrics use ("<mha>.in_proj_weight"
            # names the parameter itself)
            owner, _, attr = lay.param.rpartition(".")
            m = modules.get(owner)
            kind, reason = _kind(m, attr)
            if kind is not None:
                reason = _out_proj_never_called(modules, owner, m)
                kind = None if reason is not None else kind
            if kind is not None and "forward" in vars(m):
                kind, reason = None, "its forward is already replaced on the instance"
            if kind is None:
                self.unsupported[lay.module] = str(reason)
                continue
            layer = _Layer(self, lay.module, lay.param, m, kind)
            m._spfde_kernel = layer
            m.forward = types.MethodType(_forward, m)
            self.layers[lay.module] = layer
        wrapped = {id(layer.module) for layer in self.layers.values()}
        for name, m in modules.items():
            if id(m) not in wrapped and unsupported_mha(m) is None and "forward" not in vars(m):
                m._spfde_kernel = _Attention(m)
                m.forward = types.MethodType(_forward, m)
                self.attention[name] = m
        if mode == "sparse" and self.unsupported:
            name, why = next(iter(self.unsupported.items()))
            warn_once(f"sparsity.kernels=sparse: {len(self.unsupported)} masked layer(s) run dense kernels "
                      f"({name!r}: {why})")
        self.refresh()

    @contextmanager
    def one_off(self, probe: bool = False) -> Iterator[None]:
        """Calls inside are a pass that runs once (the activation cache's probe and fill at a freeze):
        ``auto`` decides a new call from the stored decisions or this layer's earlier timings
        (:meth:`_Layer.one_off_choice`) without timing it and without recording it, so a later real
        call of the same key is still timed. Timing a frozen layer's forward costs a few
        milliseconds; the fill it would decide runs the layer once per sample.

        ``probe``: a pass whose choice does not matter (the memory model's one-sample forward): a call
        nothing predicts takes the layer's main decision (else dense), is never timed, and leaves no
        decision behind (a probe's shapes would take up the layer's keys and its checkpoint)."""
        was = self.in_one_off, self.in_probe
        if not self.in_one_off:
            self.one_off_choices = {}
        self.in_one_off, self.in_probe = True, probe or self.in_probe
        try:
            yield
        finally:
            self.in_one_off, self.in_probe = was

    @property
    def dense_weight_grad(self) -> bool:
        """RigL: the coming step's dense weight gradient feeds an update (per epoch or per step)."""
        return bool(self.engine.needs_dense_grad_now())

    def refresh(self) -> None:
        """Rebuild the index structures of layers whose mask changed; follow RigL's dense-gradient epochs."""
        for layer in self.layers.values():
            layer.sync()

    def warn_sparse(self, why: str, message: str) -> None:
        """Under ``sparse`` (where running dense is not what was asked), one warning line per reason and
        run, kept here, not only in the warnings registry, which any change of the warning filters (a
        ``catch_warnings`` block in the user's loop) empties; under ``auto`` dense is a normal outcome."""
        if self.mode == "sparse" and why not in self.warned:
            self.warned.add(why)
            warn_once(f"sparsity.kernels=sparse: {message}")

    def start_epoch(self) -> None:
        """Count each layer's training calls from here on (the controller, at every epoch start): a
        trainable layer with none by :meth:`choices` ran outside spfde's path this epoch."""
        self.counting = True
        for layer in self.layers.values():
            layer.calls = 0
            layer.start_epoch()

    def choices(self) -> dict[str, str]:
        """``{layer: "sparse" | "dense"}`` for every masked layer (metrics.jsonl ``kernels``).

        A layer whose weight trains but that made no training call through its sparse path since
        :meth:`start_epoch` ran PyTorch's dense forward: a ``torch.compile``'d or traced model calls
        the module's own forward (``_traced``). It is ``dense`` here, and under ``sparse`` says so once.
        """
        out = {}
        for name in self._order:
            layer = self.layers.get(name)
            if layer is not None and self.counting and layer.calls == 0 and layer.weight.requires_grad:
                out[name] = "dense"
                why = "none of its training calls this epoch went through spfde's kernels"
                self.warn_sparse(why, f"layer {name!r} (and maybe others): {why}; a torch.compile'd or traced "
                                      "forward runs PyTorch's dense kernels (compile the parts without masked "
                                      "layers to keep the sparse ones)")
            else:
                out[name] = layer.choice() if layer is not None else "dense"
        return out

    def speedups(self) -> dict[str, float]:
        """``{layer: dense time / sparse time}`` measured by ``auto`` for the layer's main call."""
        out = {}
        for name, layer in self.layers.items():
            s = layer.speedups.get(layer.primary) if layer.primary is not None else None
            if s is not None:
                out[name] = round(float(s), 3)
        return out

    def speedup_densities(self) -> dict[str, float]:
        """``{layer: its density when the speedup of :meth:`speedups` was measured}``: a measurement is
        kept while the nonzero count stays within ``RETIME_NNZ_CHANGE`` of it, so it can be older
        than the layer's present density."""
        return {name: round(self.layers[name].basis_nnz / max(self.layers[name].weight.numel(), 1), 4)
                for name in self.speedups() if self.layers[name].basis_nnz is not None}

    def remove(self) -> None:
        """Put every module's own forward back (the model is then exactly as it was)."""
        for m in [*(layer.module for layer in self.layers.values()), *self.attention.values()]:
            vars(m).pop("forward", None)
            vars(m).pop("_spfde_kernel", None)
        self.layers, self.attention = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "layers": {name: layer.state() for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay saved choices (each layer re-times only if its nonzero count moved since)."""
        if not state or state.get("mode") != self.mode:
            return
        for name, saved in state.get("layers", {}).items():
            layer = self.layers.get(name)
            if layer is not None:
                layer.pending, layer.plan = dict(saved), None
                # what the latest training call ran, so a resumed run reports what an uninterrupted one
                # does (a frozen layer the cache serves makes no training call after its freeze)
                layer.used, layer.fell_back = saved.get("used"), bool(saved.get("fell_back", False))
                layer.sync()
