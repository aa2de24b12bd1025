"""Data-parallel training with SpFDE: torchrun, DDP and keeping every rank's decisions identical.

Method card
-----------
**What it does.** Runs the same SpFDE schedule on N processes (``torchrun --nproc_per_node N``,
one node or several through torchrun's rendezvous) with ``DistributedDataParallel``:

* the partial training set (circular sieving, paper Section 4.3) is shuffled identically on every
  rank from ``make_generator(seed, "shuffle", epoch)`` and dealt out ``rank::world_size``
  (:class:`DistributedSieveSampler`); every rank gets the same number of samples, so every rank
  runs the same number of steps and DDP's collectives never wait on a rank that ran out;
* masks, Prune&Grow (Section 4.1) and the freezing plan (Section 4.2, Algorithm 1) are taken on
  every rank from the shared seed and from *all-reduced* gradients: DDP averages gradients during
  ``backward``, so ``SpFDE.before_step`` (called between ``backward`` and ``optimizer.step``)
  sees bit-identical gradients on all ranks and records identical MEST/RigL statistics;
* the forgetting statistics that drive sieving are per sample, and each rank only sees its share
  of the samples, so the sample status is all-gathered (:func:`all_gather_status`, or once per
  epoch with :class:`StatusGatherer`) and every rank's tracker records every sighting in the same
  (step, rank) order: all ranks take the same sieving decision;
* frozen blocks (``requires_grad=False``) are excluded from the gradient all-reduce by
  re-wrapping the model in a new DDP after the set of trainable parameters changed
  (:func:`maybe_rewrap_ddp`); DDP registers its parameters at construction, so without the
  re-wrap a frozen block would still be waited for (an error or a hang), and a defrosted one
  would silently stop being synchronised;
* :func:`broadcast_state` / :func:`sync_controller` copy rank 0's controller state to every rank
  and :func:`check_in_sync` verifies that model weights, masks, frozen blocks and the partial set
  hash identically on every rank (a safety net and a test oracle, not needed in normal runs).

**Hyper-parameters.** None of its own. ``data.batch_size`` is per process (as in PyTorch DDP):
the global batch is ``batch_size * world_size``; scale ``optim.lr`` accordingly.

**Expected effect.** The same savings as a single-process run (the FLOPs are simply spread over
the ranks); the extra communication is one small all-gather of (index, correct) pairs per epoch
(or per step with :func:`all_gather_status`) and one DDP construction per freezing event.

Padding: when the partial set does not divide evenly, the shuffled order is padded by repeating
its head (as ``torch.utils.data.DistributedSampler`` does) rather than truncated, so the union of
the indices the ranks see in an epoch is exactly the partial set; at most ``world_size - 1``
samples are seen twice per epoch.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spfde.errors import SpfdeError
from spfde.sieving.sampler import SieveSampler
from spfde.utils import state_dict_sha256

__all__ = [
    "DistributedSieveSampler",
    "StatusGatherer",
    "all_gather_status",
    "all_reduce_sum",
    "barrier",
    "broadcast_state",
    "check_in_sync",
    "cleanup",
    "exit_process",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "maybe_rewrap_ddp",
    "rank_shard",
    "rewrap_ddp",
    "sync_buffers",
    "sync_controller",
    "wrap_ddp",
]


# ---------------------------------------------------------------------------------------------
# process group


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes outputs and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


_LEFT_GROUP = False


def cleanup(sync: bool = True) -> None:
    """Destroy the process group created by :func:`init_from_env` (safe to call when none exists).

    With ``sync`` every rank first waits at a barrier, so no rank closes its connections while a
    peer still has traffic on them. Pass ``sync=False`` on an error path: a peer that died would
    hold the barrier until the group's timeout.
    """
    global _LEFT_GROUP
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
        _LEFT_GROUP = True


def exit_process(code: int) -> int:
    """End a process that used a process group with ``code`` now, skipping interpreter teardown.

    Why: a DDP wrapper leaves references to the process group in PyTorch's C++ side, so the gloo
    worker threads outlive ``destroy_process_group``; when one of them touches Python during
    interpreter teardown the process aborts (``terminate called without an active exception``,
    SIGABRT) after a run that succeeded, and torchrun reports the job as failed. Outputs are
    flushed first. Without a process group (none was ever left by :func:`cleanup`) this only
    returns ``code``, so a plain script exits normally.
    """
    if not _LEFT_GROUP:
        return code
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed by a reader that left
            pass
    os._exit(code)


def all_reduce_sum(*values: float | int | torch.Tensor) -> list[float]:
    """Sum each value over all ranks (one collective for all of them); the values themselves without a group."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise SpfdeError(f"environment variable {name} is not set; launch with torchrun, which sets it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise SpfdeError(f"environment variable {name}={raw!r} is not an integer") from None


def init_from_env(backend: str | None = None, device: str | torch.device | None = None,
                  timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment.

    Returns ``(rank, world_size, local_rank)``. Without ``WORLD_SIZE`` (a plain ``python`` or
    ``spfde train``) or with ``WORLD_SIZE=1`` this is a no-op returning ``(0, 1, 0)``. The backend
    is ``nccl`` when CUDA is used (``device`` is a CUDA device, or ``None``/``"auto"`` and a GPU
    is visible) and ``gloo`` otherwise; with nccl the current CUDA device is set to ``local_rank``.
    Calling it again when a group already exists returns the existing group's numbers.
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    if world <= 1:
        return 0, 1, 0
    if not dist.is_available():
        raise SpfdeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    rank = _env_int("RANK")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise SpfdeError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun, which sets it")
    if backend is None:
        dev = str(device) if device is not None else "auto"
        use_cuda = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise SpfdeError("the nccl backend needs CUDA; use train.device=cpu (gloo) on a machine without GPUs")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local_rank


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the sampler: a pure core plus the stateful Sampler


def rank_shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``order`` padded by repeating its head to a multiple of ``world_size``, then ``[rank::world_size]``.

    Every rank gets ``ceil(len(order) / world_size)`` indices; the shards' union is ``set(order)``
    and only the ``pad < world_size`` repeated head entries appear twice.
    """
    n = int(order.numel())
    if not 0 <= rank < world_size:
        raise SpfdeError(f"rank {rank} is outside 0..{world_size - 1}")
    if n == 0:
        return order
    total = math.ceil(n / world_size) * world_size
    if total > n:
        # repeating the whole order pads with its head, and also covers more ranks than samples
        order = order.repeat(math.ceil(total / n))[:total]
    return order[rank:total:world_size]


class DistributedSieveSampler(SieveSampler):
    """The partial training set split across ranks without overlap (up to the head padding).

    Every rank draws the same permutation of the sieve's current partial set (``sieve.active``)
    from ``make_generator(seed, "shuffle", epoch)`` -- the single-process :class:`SieveSampler`'s
    stream -- pads it by repeating its head to a multiple of ``world_size`` and keeps every
    ``world_size``-th index starting at ``rank``. The partial set is read at every ``__iter__``,
    so a sieving update at an epoch boundary takes effect on every rank at once.

    Args:
        sieve: the controller's sieve (anything with an ``active`` LongTensor of indices).
        seed: the run seed, identical on every rank.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, sieve: Any, seed: int, rank: int, world_size: int) -> None:
        if world_size < 1:
            raise SpfdeError(f"world_size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise SpfdeError(f"rank {rank} is outside 0..{world_size - 1}")
        super().__init__(sieve, seed)
        self.rank = int(rank)
        self.world_size = int(world_size)

    def global_order(self) -> torch.Tensor:
        """This epoch's permutation of the whole partial set (identical on every rank)."""
        return super().indices()

    def indices(self) -> torch.Tensor:
        """This rank's share of this epoch's order (int64)."""
        return rank_shard(self.global_order(), self.rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return math.ceil(int(self.sieve.active.numel()) / self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # rank/world_size describe this process, not the run: a run may resume on another layout
        super().load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# sample status for the forgetting tracker


def _pack(indices: torch.Tensor, correct: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
    idx = torch.as_tensor(indices).reshape(-1).to(torch.int64)
    ok = torch.as_tensor(correct).reshape(-1).to(torch.int64)
    if idx.numel() != ok.numel():
        raise SpfdeError(f"got {idx.numel()} sample indices but {ok.numel()} correctness flags; pass one per sample")
    cols = [idx.cpu(), ok.cpu()]
    if step is not None:
        cols.append(step.reshape(-1).to(torch.int64).cpu())
    return torch.stack(cols, dim=1) if idx.numel() else torch.zeros((0, len(cols)), dtype=torch.int64)


def _all_gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """All-gather a ``(k_r, c)`` int64 tensor whose ``k_r`` differs per rank; list in rank order."""
    dev = _comm_device()
    world = dist.get_world_size()
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    width = max(max(counts), 1)
    buf = torch.zeros((width, rows.shape[1]), dtype=torch.int64, device=dev)
    buf[: rows.shape[0]] = rows.to(dev)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf)
    return [o[:c].cpu() for o, c in zip(out, counts, strict=True)]


def all_gather_status(indices: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(indices, correct)`` of this step, concatenated in rank order (CPU tensors).

    A collective: every rank must call it at the same step. Without a process group it returns
    the inputs (on the CPU). Rank order makes the concatenation identical on every rank, so a
    :class:`~spfde.sieving.ForgettingTracker` fed with it takes identical decisions everywhere.
    """
    rows = _pack(indices, correct)
    if not is_distributed():
        return rows[:, 0], rows[:, 1].bool()
    allr = torch.cat(_all_gather_rows(rows))
    return allr[:, 0], allr[:, 1].bool()


class StatusGatherer:
    """Buffers this rank's sample status and merges all ranks' status into a tracker once per epoch.

    Equivalent to calling :func:`all_gather_status` at every step and recording the result
    (the tracker treats one batch's sightings as consecutive in batch order, and the merge orders
    them by (step, rank, position)), but with two small collectives per epoch instead of two per
    step. Use: ``add(idx, correct)`` after every step; ``flush(tracker)`` on every rank at the
    end of the epoch, before the sieve reads the tracker. Single-process runs use it too: one
    vectorized ``record`` per epoch instead of a dozen small tensor ops per step (about 0.25 ms
    of a 11 ms ViT-preset step, issue 13), with the same tracker state at the end of the epoch.
    """

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # added, not packed yet
        self._step = 0

    def add(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        # copies: a training loop may reuse its buffers before they are packed at the end of the epoch
        self._steps.append((torch.as_tensor(indices).reshape(-1).clone(), torch.as_tensor(correct).reshape(-1).clone()))

    def _pack_steps(self) -> None:
        for idx, ok in self._steps:
            self._rows.append(_pack(idx, ok, torch.full((idx.numel(),), self._step, dtype=torch.int64)))
            self._step += 1
        self._steps = []

    def pending(self) -> int:
        self._pack_steps()
        return sum(int(r.shape[0]) for r in self._rows)

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' buffered ``(indices, status)`` in (step, rank, position) order; clears the buffer.

        The status is int64 as packed (the tracker's ``record`` reads it: correctness flags, or
        :meth:`~spfde.sieving.LossTracker.encode` bit patterns)."""
        self._pack_steps()
        local = torch.cat(self._rows) if self._rows else torch.zeros((0, 3), dtype=torch.int64)
        self._rows, self._step = [], 0
        parts = _all_gather_rows(local) if is_distributed() else [local]
        tagged = [torch.cat([p, torch.full((p.shape[0], 1), r, dtype=torch.int64)], dim=1) for r, p in enumerate(parts)]
        allr = torch.cat(tagged)
        # stable sort by (step, rank); rows of one (step, rank) keep their batch order
        key = allr[:, 2] * len(parts) + allr[:, 3]
        allr = allr[torch.argsort(key, stable=True)]
        return allr[:, 0], allr[:, 1]  # the status as packed: 0/1 correctness, or LossTracker.encode patterns

    def flush(self, tracker: Any) -> int:
        """Record every rank's buffered status into ``tracker``; returns the number of sightings."""
        idx, ok = self.gather()
        tracker.record(idx, ok)
        return int(idx.numel())

    def state_dict(self) -> dict[str, Any]:
        self._pack_steps()
        return {"rows": [r.clone() for r in self._rows], "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rows = [r.clone() for r in state["rows"]]
        self._steps = []
        self._step = int(state["step"])


# ---------------------------------------------------------------------------------------------
# state broadcast and consistency checks


def broadcast_state(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable state, e.g. a ``state_dict()``) on every rank.

    Tensors travel on the CPU. A collective; without a process group ``obj`` is returned as is.
    """
    if not is_distributed():
        return obj
    box = [_to_cpu(obj) if get_rank() == src else None]
    dev = _comm_device()
    dist.broadcast_object_list(box, src=src, device=dev if dev.type == "cuda" else None)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order. A collective; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    everyone: list[Any] = [None] * get_world_size()
    dist.all_gather_object(everyone, _to_cpu(obj))
    return everyone


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def sync_controller(controller: Any, src: int = 0) -> None:
    """Copy rank ``src``'s controller state (masks, frozen blocks, sieve, tracker, ledger) to every rank.

    Call it between ``end_epoch`` and the next ``start_epoch`` (e.g. at update epochs, as a
    safety net against any divergence); the masks are re-applied to the weights. A collective.
    """
    if not is_distributed():
        return
    state = broadcast_state(controller.state_dict() if get_rank() == src else None, src=src)
    if get_rank() != src:
        # each rank keeps its own kernel choices: they are this rank's timings, and the ranks' weights
        # stay equal whatever each one runs (gradients are averaged)
        state = {**state, "kernels": controller.kernels.state_dict()}
        state.pop("kernels_by_rank", None)
        controller.load_state_dict(state)


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Broadcast rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last step of an epoch each
    rank holds the statistics of its own last batch; call this before evaluating or hashing. A
    collective; a no-op without a process group.
    """
    if not is_distributed():
        return
    dev = _comm_device()
    with torch.no_grad():
        for b in _unwrap(model).buffers():
            t = b.to(dev)
            dist.broadcast(t, src=src)
            if t is not b:
                b.copy_(t)


def controller_fingerprint(model: nn.Module, controller: Any | None = None) -> dict[str, str]:
    """Hashes of what must be identical on every rank: weights, masks, frozen blocks, partial set."""
    net = _unwrap(model)
    out = {"weights": state_dict_sha256(dict(net.named_parameters())),
           "buffers": state_dict_sha256(dict(net.named_buffers()))}
    if controller is not None:
        out["masks"] = state_dict_sha256(dict(sorted(controller.sparsity.masks.items())))
        frozen = controller.freezer.frozen_block_names if controller.freezer is not None else []
        out["frozen"] = ",".join(frozen)
        out["partial_set"] = state_dict_sha256({"active": torch.sort(controller.sieve.active.cpu()).values})
    return out


def check_in_sync(model: nn.Module, controller: Any | None = None) -> dict[str, str]:
    """Raise :class:`SpfdeError` naming what differs when ranks disagree; returns this rank's hashes.

    A collective (an ``all_gather_object`` of a few strings); a no-op check without a process group.
    """
    mine = controller_fingerprint(model, controller)
    if not is_distributed():
        return mine
    everyone: list[Any] = [None] * get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = sorted({k for fp in everyone for k in fp if fp[k] != everyone[0][k]})
    if differ == ["buffers"]:
        raise SpfdeError("ranks disagree only on buffers (BatchNorm running statistics): call "
                         "spfde.distributed.sync_buffers(model) at the end of the epoch before checking")
    if differ:
        raise SpfdeError(
            f"ranks disagree on {', '.join(differ)}; every rank must use the same config, seed and data, "
            "and the model must be wrapped with spfde.distributed.wrap_ddp (re-wrapped after freezing)")
    return mine


# ---------------------------------------------------------------------------------------------
# DDP wrapping that follows freezing


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _trainable(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in module.named_parameters() if p.requires_grad)


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that remembers its arguments for re-wrapping.

    On CUDA pass ``device_ids=[local_rank]``. Returns ``model`` itself without a process group.
    ``static_graph`` is refused: freezing changes the graph.
    """
    if not is_distributed():
        return model
    if ddp_kwargs.get("static_graph"):
        raise SpfdeError("static_graph=True cannot follow freezing (the set of trainable parameters changes); "
                         "leave it False")
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not _trainable(model):
        raise SpfdeError("every parameter of the model is frozen, so DDP has nothing to synchronise; "
                         "lower freezing.max_blocks_fraction or keep freezing.freeze_head false")
    ddp = DDP(model, **ddp_kwargs)
    ddp._spfde_ddp_kwargs = dict(ddp_kwargs)
    ddp._spfde_trainable = _trainable(model)
    return ddp


def rewrap_ddp(model_ddp: nn.Module) -> nn.Module:
    """A fresh DDP around ``model_ddp.module`` that registers only the currently trainable parameters.

    The old wrapper's autograd hooks are removed first, so it can never launch a reduction again.
    Construction broadcasts rank 0's parameters and buffers (identical anyway when in sync).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model_ddp, DDP):
        return model_ddp
    kwargs = getattr(model_ddp, "_spfde_ddp_kwargs", None)
    if kwargs is None:  # a DDP the user built: recover its main settings
        kwargs = {"device_ids": model_ddp.device_ids, "output_device": model_ddp.output_device,
                  "broadcast_buffers": model_ddp.broadcast_buffers,
                  "find_unused_parameters": model_ddp.find_unused_parameters,
                  "gradient_as_bucket_view": model_ddp.gradient_as_bucket_view,
                  "process_group": model_ddp.process_group}
    remove = getattr(model_ddp, "_remove_autograd_hooks", None)
    if callable(remove):
        remove()
    for h in getattr(model_ddp, "_accum_grad_hooks", []):
        h.remove()
    return wrap_ddp(model_ddp.module, **kwargs)


def maybe_rewrap_ddp(model_ddp: nn.Module) -> nn.Module:
    """``rewrap_ddp(model_ddp)`` when the trainable parameters changed since it was wrapped, else itself.

    Call it after every ``SpFDE.start_epoch`` (freezing and defrosting happen only there) on every
    rank; all ranks freeze the same blocks at the same epoch, so all re-wrap together.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model_ddp, DDP):
        return model_ddp
    registered = getattr(model_ddp, "_spfde_trainable", None)
    if registered == _trainable(model_ddp.module):
        return model_ddp
    return rewrap_ddp(model_ddp)
