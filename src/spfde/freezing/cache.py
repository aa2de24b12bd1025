"""The frozen-prefix activation cache: frozen blocks cost neither backward nor forward.

Method card
-----------
What: once blocks ``0..k`` are frozen (paper Section 4.2: a block freezes only after every block
before it), the prefix ``0..k`` is a fixed function of the input. When the input pipeline gives each
sample the same tensor every epoch, the prefix's output for a sample (its *boundary row*, the output
of block ``k``) is computed once and then served from memory, so the frozen blocks are skipped in
the forward as well as in the backward. When the next block freezes, the rows are extended through
the new block from the cached rows (not from the input) and the old rows are dropped.
Paper: Section 4.2 (progressive freezing: the frozen part is a prefix that needs no
back-propagation); Section 4.2.1 charges frozen blocks their forward, which this cache removes.
The paper has no cache; this is our extension (issue 13), exact by construction and by check.
How: while a batch is served, the frozen blocks' top-level modules get a temporary forward override:
the module that produces the boundary returns the batch's cached rows, every other frozen top-level
module returns an uninitialised placeholder of its usual output shape. Code between blocks (e.g. a
ViT's class token) still runs, on placeholders. On the first batch after each freeze a probe checks,
bit for bit, that (1) the stubbed model, with NaN placeholders, returns exactly what the real model
returns, so nothing but the boundary reaches the rest of the model, (2) the model draws no random
numbers before the boundary, (3) a sample's boundary row does not depend on its position or batch
mates at the run's batch size, (4) extending cached rows through a newly frozen block gives the rows
the real prefix gives. Each served batch compares every sample's input with a fingerprint stored
with its row. A failed check turns the cache off with the reason (``on``: a :class:`ConfigError`).
Exactness: rows are computed in batches of the run's batch size (a short chunk is padded with
repeats of its first sample), because a sample's output can differ in the last bit between batch
sizes (measured on CPU: batch 1 against 128). Batches of another size (the short last batch) run
the prefix for real. A run with the cache ends with the same weights as without it, bit for bit on
CPU (a test); probes and fills run under a forked RNG, so no random stream moves, and without
autograd (the probe's checks compare values, which recording does not change).
Filling: with an input provider (``cache.inputs = fn(indices) -> batch``, which the built-in
trainer's loaders give) every sample's rows are computed at the freeze, the removed ones too, so
the epoch after a freeze is served whole and the FLOPs plan is exact; without one, rows are stored
from the training batches that run for real (a batch holding a sample not cached yet, e.g. one the
sieve returns, runs whole, as the uncached run would, and its new rows are stored).
Hyper-parameters: ``freezing.cache`` (``auto``: on where exact and within
``freezing.cache_max_bytes``, default a quarter of the device's free memory at start; ``on``: on,
or an error where it cannot be exact or exceeds an explicit ``freezing.cache_max_bytes``; ``off``),
``freezing.cache_max_bytes``.
Expected effect: a frozen block's training cost drops from its forward (a third of its cost when
active) to its one-off fill, so a freezing plan that saves ``f`` of the training FLOPs by skipping
backward saves about ``1.5·f`` with the cache; wall-clock follows for conv prefixes. Memory: one
boundary row per training sample (``cache_bytes`` in metrics.jsonl).

Pieces: pure :func:`static_reasons`, :func:`prefix_reasons`, :func:`fingerprint`,
:func:`fill_chunks`, :func:`mix_permutation`, :func:`served_samples`, :class:`Layout`; the stateful
:class:`ActivationCache` (``set_frozen`` at epoch starts, ``batch(x, idx)`` around the forward).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from spfde.errors import ConfigError
from spfde.freezing.blocks import Block
from spfde.names import parent_name

MODES = ("auto", "off", "on")
_MISSING = object()


# ----------------------------------------------------------------------------- pure core
def static_reasons(*, augment: bool, world_size: int, compiled: bool) -> list[str]:
    """Why the cache cannot be exact for a whole run, before looking at any block (empty: it can)."""
    reasons = []
    if augment:
        reasons.append("data.augment is true: random crops and flips give a sample a new input every epoch "
                       "(set data.augment=false if your pipeline has no random transform)")
    if world_size > 1:
        reasons.append("distributed training: each rank sees a different share of the samples every epoch, so "
                       "every rank would have to hold every sample's rows (not supported)")
    if compiled:
        reasons.append("the model is torch.compile'd: its graph does not call the modules the cache overrides")
    return reasons


def prefix_reasons(modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Why frozen modules are not a fixed per-sample function: active dropout, batch statistics."""
    reasons = []
    for name, m in modules:
        if isinstance(m, _DropoutNd) and m.p > 0:
            reasons.append(f"frozen module {name!r} is {type(m).__name__}(p={m.p}): it draws a new mask every batch")
        elif isinstance(m, _BatchNorm) and not m.track_running_stats:
            reasons.append(f"frozen module {name!r} ({type(m).__name__}, track_running_stats=False) normalises with "
                           "the statistics of each batch")
    return reasons


@functools.lru_cache(maxsize=8)
def _fp_weights(length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x5EED + length)
    return torch.randint(1, 1 << 24, (2, length), generator=g, dtype=torch.int64).to(device)


#: the most 16-bit words a sample may have for the word-wise sums (|word| <= 2^15, weights < 2^24:
#: 2^24 products stay below 2^63); a longer sample (over 32 MiB) is summed byte by byte
_MAX_WORDS = 1 << 24


def _native() -> Any:
    from spfde.sparsity.kernels import native  # lazily: the kernels package imports much more

    return native.load(quiet=True)


def fingerprint(x: torch.Tensor, budget_bytes: int = 1 << 25) -> torch.Tensor:
    """``(b, 2)`` int64 fingerprints of a batch's samples, exact and independent of the batch.

    Two weighted sums of each sample's raw bytes read as signed 16-bit words (in logical element
    order, so the memory layout does not matter; an odd byte count gets a zero byte), in integer
    arithmetic: no rounding, no overflow, no dependence on summation order, so the same sample
    gives the same fingerprint in any batch and any changed byte changes it (up to chance, about
    2^-48). Why words, not bytes: half the elements to widen and multiply, about 18x faster on a
    ViT-preset batch (0.19 against 3.4 ms), which every step the activation cache serves pays. On CPU
    the native library (when it built) forms the same sums without temporaries, about ten times
    faster again; otherwise rows are processed in chunks of at most ``budget_bytes`` of temporaries.
    """
    b = int(x.shape[0])
    raw = x.detach().reshape(b, -1).contiguous().view(torch.uint8)
    if raw.shape[1] % 2:
        raw = torch.cat([raw, raw.new_zeros(b, 1)], 1)
    words = raw.view(torch.int16) if raw.shape[1] // 2 <= _MAX_WORDS else raw
    length = int(words.shape[1])
    out = torch.zeros(b, 2, dtype=torch.int64, device=x.device)
    if length == 0:
        return out
    w = _fp_weights(length, x.device)
    lib = _native() if x.device.type == "cpu" and words.dtype == torch.int16 else None
    if lib is not None:  # the same integer sums without the int64 temporaries (sparse_conv.cpp)
        lib.spfde_fingerprint(words.data_ptr(), b, length, words.stride(0), w.data_ptr(), out.data_ptr(),
                              torch.get_num_threads())
        return out
    step = max(1, budget_bytes // (8 * length))
    for s in range(0, b, step):
        wide = words[s:s + step].to(torch.int64)
        out[s:s + step, 0] = (wide * w[0]).sum(1)
        out[s:s + step, 1] = (wide * w[1]).sum(1)
    return out


def fill_chunks(indices: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """``(chunk of exactly size indices, how many are real)``: the last chunk is padded with repeats
    of its first index, so every row is computed in a batch of the run's batch size."""
    for s in range(0, int(indices.numel()), size):
        chunk = indices[s:s + size]
        n = int(chunk.numel())
        if n < size:
            chunk = torch.cat([chunk, chunk[:1].expand(size - n)])
        yield chunk, n


def mix_permutation(b: int) -> torch.Tensor:
    """Batch rows for the invariance probe: the second half twice, so every sample moves to another
    position and half of its batch mates change (``b >= 2``)."""
    h = b // 2
    half = torch.arange(h, b)
    return torch.cat([half, half])[:b]


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches of an epoch of ``n`` samples (no ``drop_last``)."""
    return [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])


def served_samples(n: int, batch_size: int, ref: int) -> int:
    """Samples of an epoch the cache serves: those in batches of the reference size ``ref``."""
    return sum(s for s in batch_sizes(n, batch_size) if s == ref)


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def default_max_bytes(device: torch.device) -> int | None:
    """A quarter of the device's free memory now (``MemAvailable`` on CPU); ``None`` if unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0] // 4
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, RuntimeError, ValueError):
        pass
    return None


@dataclass(frozen=True)
class Layout:
    """A batched tensor's per-sample shape, dimension order in memory, dtype and device.

    Rows are served in exactly the layout the real block produced (channels_last stays
    channels_last), because kernels may pick a different path, and other bits, for another layout.
    """

    shape: tuple[int, ...]
    order: tuple[int, ...]  # dims of the batched tensor, outermost first
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(t: torch.Tensor) -> Layout:
        st = t.stride()
        order = tuple(sorted(range(t.dim()), key=lambda d: (-st[d], d)))
        return Layout(tuple(t.shape[1:]), order, t.dtype, t.device)

    def empty(self, b: int) -> torch.Tensor:
        full = (b, *self.shape)
        t = torch.empty([full[d] for d in self.order], dtype=self.dtype, device=self.device)
        inverse = sorted(range(len(self.order)), key=lambda i: self.order[i])
        return t.permute(inverse)

    def full(self, b: int, value: float) -> torch.Tensor:
        t = self.empty(b)
        return t.fill_(value if t.is_floating_point() else 0)

    def gather(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = self.empty(int(idx.numel()))
        torch.index_select(rows, 0, idx, out=out)
        return out

    def conform(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s values in this layout (a copy unless it already is)."""
        if Layout.of(t) == self:
            return t
        return self.empty(int(t.shape[0])).copy_(t)

    def nbytes(self, n: int) -> int:
        return int(n * math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size())


# ----------------------------------------------------------------------------- helpers
class NotExact(Exception):
    """A probe found that serving this boundary from the cache would change the run."""


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass at the boundary."""


_parent = parent_name


def top_modules(block: Block, modules: set[str]) -> list[str]:
    """A block's outermost modules: those whose parent module is not in the block.

    ``modules`` are the model's module names: a block can also list root parameters (``cls_token``),
    which are no modules, and the root module itself is never overridden.
    """
    inside = set(block.module_names)
    return [m for m in block.module_names if m and m in modules and _parent(m) not in inside]


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_state(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _same(a: Any, b: Any) -> bool:
    """Bit-for-bit equal model outputs (tensors, or tuples/lists/dicts of them)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@contextmanager
def _isolated(net: nn.Module, device: torch.device) -> Iterator[None]:
    """A probe leaves no trace: the RNG streams and every buffer (BN statistics) are restored."""
    saved = [(b, b.detach().clone()) for b in net.buffers()]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda") else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@dataclass
class _Store:
    """One boundary's rows for every training sample."""

    k: int                          # boundary block index
    module: str                     # the top-level module whose output is the boundary
    layout: Layout                  # of the boundary output
    placeholders: dict[str, Layout]  # the other frozen top-level modules' outputs
    in_layout: Layout               # of the model input
    ref: int                        # batch size the rows were computed at
    rows: torch.Tensor
    have: torch.Tensor              # bool (N,), CPU
    fp: torch.Tensor                # int64 (N, 2), CPU: fingerprints of the inputs

    @staticmethod
    def new(k: int, module: str, layout: Layout, placeholders: dict[str, Layout], in_layout: Layout, ref: int,
            n: int) -> _Store:
        return _Store(k, module, layout, placeholders, in_layout, ref, layout.empty(n),
                      torch.zeros(n, dtype=torch.bool), torch.zeros(n, 2, dtype=torch.int64))

    def put(self, idx: torch.Tensor, rows: torch.Tensor, fp: torch.Tensor) -> None:
        self.rows.index_copy_(0, idx.to(self.rows.device), rows.detach())
        self.have[idx] = True
        self.fp[idx] = fp.cpu()

    @staticmethod
    def nbytes_for(layout: Layout, n: int) -> int:
        return layout.nbytes(n) + 16 * n  # the rows and two int64 fingerprints per sample

    @property
    def nbytes(self) -> int:
        return self.nbytes_for(self.layout, int(self.have.numel()))


# ----------------------------------------------------------------------------- the cache
class ActivationCache:
    """Stateful wrapper: serves the frozen prefix's output per sample (module card).

    Args:
        net: the unwrapped model, called as ``net(x)``.
        blocks: its freezing blocks (forward order).
        mode: ``auto``, ``on`` or ``off``.
        train_size: number of training samples (indices ``0..train_size-1``).
        off_reason: why it is off for the whole run (:func:`static_reasons`), if it is.
        max_bytes: the memory limit (``None``: no limit); exceeding it turns ``auto`` off, refuses ``on``.

    Use: ``set_frozen(n)`` after each freezing change, ``with cache.batch(x, idx):`` around the
    training forward; ``step_modules()`` / ``pop_fills()`` for the ledger, ``end_epoch()`` for metrics.
    """

    def __init__(self, net: nn.Module, blocks: Sequence[Block], mode: str, train_size: int, *,
                 off_reason: str | None = None, max_bytes: int | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"config field 'freezing.cache' = {mode!r}; allowed: {', '.join(MODES)}")
        self.net = net
        self.blocks = list(blocks)
        self.mode = mode
        self.n = int(train_size)
        self.max_bytes = max_bytes
        self.inputs: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: a context for the activation's own passes (probe and fill), whose layer calls happen once
        #: per freeze: the controller passes its sparse kernels' ``one_off``, so ``auto`` does not
        #: time a frozen layer's forward for a pass that timing would cost more than it could save
        self.one_off: Callable[[], AbstractContextManager[Any]] = nullcontext
        self.log: Callable[[str], None] | None = None
        self.notes: list[str] = []
        names = {n for n, _ in net.named_modules()}
        self._tops = [top_modules(b, names) for b in self.blocks]
        self._off: str | None = "freezing.cache is off" if mode == "off" else off_reason
        self._boundary: int | None = None
        self._boundary_off: str | None = None
        self._pending = False
        self._store: _Store | None = None
        self._old: _Store | None = None
        self._step: frozenset[str] = frozenset()
        self._fills: list[tuple[int, frozenset[str]]] = []
        self._served_steps = 0
        self._served_blocks: list[str] = []

    # ------------------------------------------------------------------ set-up
    def check_prefix(self, n_frozen: int) -> None:
        """``on``: refuse now (before training) if the first ``n_frozen`` blocks can never be served."""
        if self.mode == "on" and self._off is None:
            reasons = prefix_reasons(self._modules(n_frozen - 1)) if n_frozen > 0 else []
            if reasons:
                self._refuse(reasons[0])

    def set_log(self, log: Callable[[str], None] | None) -> None:
        """Where the one-line notes go (the trainer prints them); pending notes are flushed."""
        self.log = log
        if log is not None:
            for note in self.notes:
                log(note)

    # ------------------------------------------------------------------ the call points
    def set_frozen(self, n_frozen: int) -> None:
        """Blocks ``0..n_frozen-1`` are frozen now (call at every epoch start, after the freezer)."""
        k = n_frozen - 1 if n_frozen > 0 else None
        if k == self._boundary:
            return
        self._boundary, self._boundary_off, self._pending = k, None, k is not None and self._off is None
        if self._store is not None and (k is None or self._store.k > k):  # defrosted: the rows are stale
            self._note("freezing.cache: dropped the cached rows (blocks defrosted)")
            self._store = self._old = None
        elif self._store is not None:  # the next block froze: extend from these rows
            self._old, self._store = self._store, None

    @contextmanager
    def batch(self, x: Any, idx: Any) -> Iterator[None]:
        """Around the training forward of the batch ``x`` with sample indices ``idx``."""
        self._step = frozenset()
        store = self._ready(x, idx)
        if store is None:
            yield
            return
        idx = torch.as_tensor(idx).reshape(-1).cpu().long()
        if self._servable(store, x, idx):
            with self._stubbed(store, idx, int(idx.numel())) as calls:
                yield
            if calls[0] != 1:
                self._disable("the training forward did not call the frozen blocks' modules (a compiled or wrapped "
                              "forward?), so nothing was served")
                return
            self._step = self._block_modules(0, store.k)
            self._served_steps += 1
            self._served_blocks = [b.name for b in self.blocks[:store.k + 1]]
        elif int(idx.numel()) == store.ref and not bool(store.have[idx].all()):
            with self._capturing(store, x, idx):
                yield
        else:
            yield

    def reset(self) -> None:
        """Forget every row (after loading a checkpoint): the next ``set_frozen`` fills again."""
        self._store = self._old = None
        self._boundary, self._boundary_off, self._pending = None, None, False

    def step_modules(self) -> frozenset[str]:
        """Module names served from the cache in the last forward (for the ledger); resets."""
        out, self._step = self._step, frozenset()
        return out

    def pop_fills(self) -> list[tuple[int, frozenset[str]]]:
        """``[(rows, module names computed for them)]`` since the last call (for the ledger)."""
        out, self._fills = self._fills, []
        return out

    def end_epoch(self) -> dict[str, Any]:
        m = {"cached_blocks": list(self._served_blocks), "cache_served_steps": int(self._served_steps),
             "cache_bytes": int(self._store.nbytes if self._store is not None else 0), "cache_status": self.status}
        self._served_steps, self._served_blocks = 0, []
        return m

    @property
    def status(self) -> str:
        if self._off is not None:
            return f"off: {self._off}"
        if self._boundary is None:
            return "idle: no block is frozen"
        name = self.blocks[self._boundary].name
        if self._boundary_off is not None:
            return f"off at block {name!r}: {self._boundary_off}"
        if self._store is None:
            return ("waiting: no training forward ran inside cache.batch(x, idx) since block "
                    f"{name!r} froze")
        return f"on: {self._span(self._boundary)} served ({human_bytes(self._store.nbytes)})"

    # ------------------------------------------------------------------ activation
    def _ready(self, x: Any, idx: Any) -> _Store | None:
        if self._off is not None or self._boundary is None or self._boundary_off is not None:
            return None
        if self._pending:
            self._pending = False
            if not torch.is_tensor(x) or idx is None or x.dim() < 1 or len(torch.as_tensor(idx).reshape(-1)) != len(x):
                self._disable("cache.batch(x, idx) needs the input tensor and its sample indices")
                return None
            try:
                with self.one_off():
                    self._activate(x, torch.as_tensor(idx).reshape(-1).cpu().long())
            except NotExact as e:
                self._off_here(str(e))
        return self._store

    def _activate(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        k = self._boundary
        assert k is not None
        old, self._old = self._old, None
        reasons = prefix_reasons(self._modules(k))
        if reasons:
            raise NotExact(reasons[0])
        if old is not None and (old.ref != len(idx) or old.in_layout != Layout.of(x)):
            old = None  # rows computed at another batch size or input layout: start from the input
        module, layouts, extend_ok = self._probe(x, k, old)
        if not extend_ok:
            old = None
        layout = layouts.pop(module)
        need = _Store.nbytes_for(layout, self.n)
        if self.max_bytes is not None:  # under ``on`` only an explicit freezing.cache_max_bytes (build_cache)
            if old is not None and need + old.nbytes > self.max_bytes:
                old = None  # no room for both while extending: fill the new rows from the input
            if need > self.max_bytes:
                raise NotExact(f"its rows need {human_bytes(need)} for {self.n} samples, above "
                               f"freezing.cache_max_bytes = {human_bytes(self.max_bytes)} (raise it to cache "
                               "this block)")
        self._store = store = _Store.new(k, module, layout, layouts, Layout.of(x), len(idx), self.n)
        provider = self._check_provider(x, idx, store)
        with torch.no_grad():
            if old is not None:
                have = old.have.nonzero().flatten()
                for chunk, n in fill_chunks(have, store.ref):
                    rows = self._extend(old, chunk.to(old.rows.device), store.module)
                    store.put(chunk[:n], rows[:n], old.fp[chunk[:n]])
                self._filled(int(have.numel()), old.k + 1, k)
                del old
            if provider is not None:
                missing = (~store.have).nonzero().flatten()
                for chunk, n in fill_chunks(missing, store.ref):
                    xs = store.in_layout.conform(provider(chunk))
                    rows = self._prefix(xs, store.module)
                    store.put(chunk[:n], rows[:n], fingerprint(xs[:n]))
                self._filled(int(missing.numel()), 0, k)
        self._note(f"freezing.cache: {self._span(k)} now served from the cache ({human_bytes(store.nbytes)} for "
                   f"{self.n} samples"
                   + (", filled now)" if provider is not None else ", filled as the training batches run)"))

    def _check_provider(self, x: torch.Tensor, idx: torch.Tensor, store: _Store) -> Any:
        """The input provider, if it gives exactly the training batch's inputs (else ``None``, noted)."""
        if self.inputs is None:
            return None
        try:
            mine = self.inputs(idx)
            same = (torch.is_tensor(mine) and tuple(mine.shape) == tuple(x.shape) and mine.dtype == x.dtype
                    and torch.equal(fingerprint(mine.to(x.device)), fingerprint(x)))
        except Exception as e:  # a user's provider: any failure only means we fill lazily
            same, why = False, f"it raised {type(e).__name__}: {e}"
        else:
            why = "its tensors differ from the training batch's"
        if not same:
            self._note(f"freezing.cache: not using the input provider ({why}); rows are stored as the training "
                       "batches run")
            self.inputs = None
            return None
        return lambda chunk: self.inputs(chunk).to(store.in_layout.device)

    def _probe(self, x: torch.Tensor, k: int, old: _Store | None) -> tuple[str, dict[str, Layout], bool]:
        """Checks (1)-(4) of the module card on one training batch; raises :class:`NotExact`."""
        b = int(x.shape[0])
        tops = [name for i in range(k + 1) for name in self._tops[i]]
        outs: dict[str, list[Any]] = {}
        order: list[str] = []
        rng_after: dict[str, list[torch.Tensor]] = {}

        def recorder(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _a: Any, out: Any) -> None:
                order.append(name)
                outs.setdefault(name, []).append(out.detach().clone() if torch.is_tensor(out) else out)
                rng_after[name] = _rng_state(x.device)
            return hook

        # without autograd, as the fill: (1)-(4) compare values, which recording would not change
        with _isolated(self.net, x.device), torch.no_grad():
            rng0 = _rng_state(x.device)
            handles = [self._module(n).register_forward_hook(recorder(n)) for n in tops]
            try:
                y = self.net(x)
            except Exception as e:  # a model the cache cannot call as model(x): not exact, say why
                raise NotExact(f"the probe forward model(x) raised {type(e).__name__}: {e}") from None
            finally:
                for h in handles:
                    h.remove()
            ran = [n for n in order if n in self._tops[k]]
            if not ran:
                raise NotExact(f"block {self.blocks[k].name!r} did not run in the forward")
            module = ran[-1]
            for n, got in outs.items():
                if len(got) != 1:
                    raise NotExact(f"frozen module {n!r} runs {len(got)} times per forward")
                if not torch.is_tensor(got[0]) or got[0].dim() < 1 or got[0].shape[0] != b:
                    raise NotExact(f"frozen module {n!r} returns {type(got[0]).__name__}, not a tensor of one row "
                                   "per sample")
            if any(not torch.equal(s, t) for s, t in zip(rng_after[module], rng0, strict=True)):
                raise NotExact("the model draws random numbers before the boundary (dropout or another random op "
                               "in or before the frozen blocks)")
            z = outs[module][0]
            layouts = {n: Layout.of(got[0]) for n, got in outs.items()}
            # (1) the stubbed model, NaN placeholders, the boundary through the serving path
            _set_rng_state(rng0, x.device)
            probe = _Store(k, module, layouts[module], {n: v for n, v in layouts.items() if n != module},
                           Layout.of(x), b, layouts[module].empty(b).copy_(z), torch.ones(b, dtype=torch.bool),
                           torch.zeros(b, 2, dtype=torch.int64))
            with self._stubbed(probe, torch.arange(b), b, nan=True) as calls:
                y_stub = self.net(x)
            if calls[0] != 1 or not _same(y, y_stub):
                raise NotExact("serving the boundary from the cache changes the model's output: the model uses a "
                               "frozen block's output other than through the next block (or the forward does not "
                               "call the frozen modules)")
            del y, y_stub
            # (3) a row does not depend on its position or batch mates at this batch size
            if b > 1:
                perm = mix_permutation(b)
                z_mixed = self._prefix(probe.in_layout.gather(x, perm.to(x.device)), module)
                if not torch.equal(z_mixed, z[perm.to(z.device)]):
                    raise NotExact("a sample's frozen-prefix output depends on its batch mates or position")
            # (4) extending the old rows through the new blocks gives the real rows
            extend_ok = False
            if old is not None and old.module in outs:
                prev = _Store(old.k, old.module, old.layout, old.placeholders, old.in_layout, b,
                              old.layout.empty(b).copy_(outs[old.module][0]), torch.ones(b, dtype=torch.bool),
                              torch.zeros(b, 2, dtype=torch.int64))
                extend_ok = torch.equal(self._extend(prev, torch.arange(b, device=z.device), module, nan=True), z)
        return module, layouts, extend_ok

    # ------------------------------------------------------------------ running the prefix
    def _prefix(self, x: torch.Tensor, module: str) -> torch.Tensor:
        """The real model on ``x``, stopped at ``module``'s output (the boundary rows)."""
        got: list[torch.Tensor] = []

        def stop(_m: nn.Module, _a: Any, out: Any) -> None:
            got.append(out)
            raise _Stop

        h = self._module(module).register_forward_hook(stop)
        try:
            self.net(x)
        except _Stop:
            pass
        finally:
            h.remove()
        if not got:
            raise NotExact(f"frozen module {module!r} did not run")
        return got[0]

    def _extend(self, old: _Store, idx: torch.Tensor, module: str, nan: bool = False) -> torch.Tensor:
        """Rows at ``module`` computed from ``old``'s cached rows (stubs up to the old boundary)."""
        b = int(idx.numel())
        x = old.in_layout.full(b, math.nan) if nan else old.in_layout.empty(b)
        with self._stubbed(old, idx, b, nan=nan):
            return self._prefix(x, module)

    @contextmanager
    def _stubbed(self, store: _Store, idx: torch.Tensor, b: int, nan: bool = False) -> Iterator[list[int]]:
        """The frozen top-level modules up to ``store``'s boundary return placeholders / cached rows."""
        calls = [0]
        dev_idx = idx.to(store.rows.device)

        def rows(*_a: Any, **_k: Any) -> torch.Tensor:
            calls[0] += 1
            return store.layout.gather(store.rows, dev_idx)

        def placeholder(layout: Layout) -> Callable[..., torch.Tensor]:
            return lambda *_a, **_k: layout.full(b, math.nan) if nan else layout.empty(b)

        saved = []
        try:
            for name, fn in [(store.module, rows), *((n, placeholder(v)) for n, v in store.placeholders.items())]:
                m = self._module(name)
                saved.append((m, m.__dict__.get("forward", _MISSING)))
                m.forward = fn
            yield calls
        finally:
            for m, prev in reversed(saved):
                if prev is _MISSING:
                    del m.forward
                else:
                    m.forward = prev

    @contextmanager
    def _capturing(self, store: _Store, x: torch.Tensor, idx: torch.Tensor) -> Iterator[None]:
        """A batch that runs for real stores the rows of its samples that are not cached yet."""
        miss = ~store.have[idx]
        fp = fingerprint(x)[miss.to(x.device)]

        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            if torch.is_tensor(out) and out.shape[0] == idx.numel():
                store.put(idx[miss], out.detach()[miss.to(out.device)], fp)

        h = self._module(store.module).register_forward_hook(hook)
        try:
            yield
        finally:
            h.remove()

    def _servable(self, store: _Store, x: Any, idx: torch.Tensor) -> bool:
        if int(idx.numel()) != store.ref or not bool(store.have[idx].all()):
            return False
        if not torch.is_tensor(x) or Layout.of(x) != store.in_layout:
            return False
        changed = (fingerprint(x).cpu() != store.fp[idx]).any(1)
        if bool(changed.any()):
            i = int(idx[changed.nonzero()[0]].item())
            self._disable(f"sample {i}'s input differs from the input its cached row was computed from (a random "
                          "transform in the input pipeline?)")
            return False
        return True

    # ------------------------------------------------------------------ small helpers
    def _module(self, name: str) -> nn.Module:
        return self.net.get_submodule(name)  # by name each time: a module may be swapped after set-up

    def _modules(self, k: int) -> list[tuple[str, nn.Module]]:
        named = dict(self.net.named_modules())
        return [(m, named[m]) for b in self.blocks[:k + 1] for m in b.module_names if m in named]

    def _span(self, k: int) -> str:
        names = [b.name for b in self.blocks[:k + 1]]
        return f"block {names[0]!r}" if k == 0 else f"blocks {names[0]!r}..{names[-1]!r}"

    def _filled(self, rows: int, first: int, last: int) -> None:
        if rows:
            self._fills.append((rows, self._block_modules(first, last)))

    def _block_modules(self, first: int, last: int) -> frozenset[str]:
        return frozenset(m for b in self.blocks[first:last + 1] for m in b.module_names)

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.log is not None:
            self.log(text)

    @staticmethod
    def _refuse(reason: str) -> None:
        raise ConfigError(f"config field 'freezing.cache' = 'on', but the cache cannot be used: {reason}; use "
                          "freezing.cache=auto (it then stays off) or off")

    def _off_here(self, reason: str) -> None:
        if self.mode == "on":
            self._refuse(reason)
        self._boundary_off = reason
        self._store = None
        name = self.blocks[self._boundary].name if self._boundary is not None else "?"
        self._note(f"freezing.cache: not used while block {name!r} is the last frozen one: {reason}")

    def _disable(self, reason: str) -> None:
        if self.mode == "on":
            self._refuse(reason)
        self._off = reason
        self._store = self._old = None
        self._note(f"freezing.cache: off from now on: {reason}")


def build_cache(net: nn.Module, model: nn.Module, blocks: Sequence[Block] | None, plan: Any, cfg: Any,
                train_size: int, world_size: int, off_reason: str | None = None) -> ActivationCache:
    """The controller's cache for a config (``freezing.cache``, ``freezing.cache_max_bytes``).

    ``off_reason``: why the training loop cannot serve the cache at all (it does not wrap its forward
    in :meth:`ActivationCache.batch`, e.g. the Lightning callback); it comes before every other reason.
    """
    fz = cfg.freezing
    freezing = plan is not None and blocks is not None
    compiled = hasattr(model, "_orig_mod") or hasattr(getattr(model, "module", None), "_orig_mod")
    reasons = ([off_reason] if off_reason else []) + static_reasons(augment=cfg.data.augment, world_size=world_size,
                                                                    compiled=compiled)
    if fz.cache == "on" and freezing and reasons:
        ActivationCache._refuse(reasons[0])
    if not freezing:
        reasons = ["no block freezes (freezing.target is 0)"]
    first = next(net.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    # ``on`` has no default limit (the user asked for the cache), but honours one they set
    max_bytes = fz.cache_max_bytes if fz.cache_max_bytes is not None else (
        default_max_bytes(device) if fz.cache == "auto" else None)
    cache = ActivationCache(net, blocks or [], fz.cache, train_size, off_reason=reasons[0] if reasons else None,
                            max_bytes=max_bytes)
    if freezing:
        cache.check_prefix(max(len(plan.frozen_at(e)) for e in range(cfg.train.epochs)))
        if fz.cache == "off":
            cache.notes.append("freezing.cache: off")
        elif reasons:
            cache.notes.append(f"freezing.cache: off ({reasons[0]})")
        else:
            limit = f"up to {human_bytes(max_bytes)}" if max_bytes is not None else "no memory limit"
            cache.notes.append(f"freezing.cache: {fz.cache}: frozen blocks will be served from a cache where exact "
                               f"({limit})")
    return cache
