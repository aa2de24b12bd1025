"""Small shared helpers: atomic writes, hashing, seeding, devices, CPU threads."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spfde.errors import SpfdeError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once: os.umask can only be read by setting it, which would race with other threads' writes
_FILE_MODE = 0o666 & ~_read_umask()


_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
#: the default way out of a full disk in a write's error (a command with another output flag passes its own)
ELSEWHERE = "choose another out dir"
#: below this much free space a write that failed without an OS error is taken for a full disk
_FULL_BELOW = 16 * 2**20
# torch's C++ zip writer prefixes its message with where in its source the check failed
_ENFORCE = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.?\s*")


def _os_error(e: BaseException) -> OSError | None:
    """The OS's error behind ``e``: ``e`` itself, or one it was raised from or while handling (torch.save
    re-raises a failed write of its file object as a RuntimeError whose context is the OSError)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_failed(path: Path, e: BaseException, kind: str = "", elsewhere: str = ELSEWHERE) -> SpfdeError:
    """One line naming the file (``kind``: what it is, e.g. "checkpoint"), the cause and, for a full
    disk, the fix (free space, or ``elsewhere``); never torch's internals. Call it before the temp file
    is removed: a write that failed on a full disk leaves that disk full until then."""
    os_error = _os_error(e)
    free = _free_bytes(path.parent)
    if os_error is not None and os_error.errno in _NO_SPACE:
        cause = f"{_NO_SPACE[os_error.errno]} (free space or {elsewhere})"
    elif os_error is not None:
        cause = os_error.strerror or type(os_error).__name__
    elif free is not None and free < _FULL_BELOW:  # torch's writer on a path says only where it failed
        cause = f"no space left on device (free space or {elsewhere})"
    else:
        lines = str(e).strip().splitlines()
        what = _ENFORCE.sub("", lines[-1] if lines else "")[:200] or type(e).__name__
        cause = f"the write failed ({what}" + (f"; {free / 2**20:.0f} MiB free on its disk)" if free is not None
                                               else ")")
    name = f"{kind} {str(path)!r}" if kind else repr(str(path))
    left = ("the previous version of the file is intact" if path.exists()
            else "no partial file is left in its place")
    return SpfdeError(f"could not write {name}: {cause}; {left}")


def _temp_beside(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes, elsewhere: str = ELSEWHERE) -> None:
    """Write ``data`` to ``path`` so a reader never sees a partial file (temp file + rename).

    A failed write (a full disk, a read-only folder) raises :class:`SpfdeError` naming ``path``
    and the cause (for a full disk: free space, or ``elsewhere``); ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = None
    try:
        tmp = _temp_beside(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask permissions
        os.replace(tmp, path)
    except BaseException as e:
        error = _write_failed(path, e, elsewhere=elsewhere) if isinstance(e, OSError) else None
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if error is not None:
            raise error from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


#: the advisory lock file of a run folder (:class:`RunLock`)
LOCK_NAME = ".spfde.lock"


class RunLock:
    """An advisory lock on a run folder for as long as a run uses it: ``fcntl.flock`` on
    ``<folder>/.spfde.lock``, so that a second ``spfde train --resume`` (or a ``--force``) of the same
    folder stops with one line instead of interleaving its checkpoints with the first one's.

    The OS drops the lock when the process ends, a crash or a kill included; :meth:`release` (or the
    ``with`` block's end) drops it and removes the file. A lock is held by its open file, so a second
    lock on the folder conflicts even within one process. ``enabled=False`` (the ranks of a torchrun
    job other than 0, which write nothing), a platform without ``fcntl`` and a folder that cannot hold
    the file (read-only: nothing can be written there anyway) make it a no-op; a filesystem without
    locks says so in one warning line.
    """

    def __init__(self, folder: str | os.PathLike, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.enabled = enabled
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op when held); another process holding it raises :class:`SpfdeError`."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        if self._fd is not None or not self.enabled:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
            except OSError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise SpfdeError(
                    f"run folder {str(self.folder)!r} is in use by another spfde process"
                    f"{f' (pid {owner})' if owner.isdigit() else ''}; wait for it to end (or stop it) and run this "
                    "again, or choose another --out") from None
            except OSError as e:
                os.close(fd)
                from spfde.errors import warn

                warn(f"cannot lock run folder {str(self.folder)!r} ({e.strerror}); nothing stops a second spfde "
                     "process from using it at the same time")
                return
            # the holder before us may have removed the file (release) between our open and our lock, and
            # a third process made a new one: then ours locks a file no one else sees, so start again
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(fd)):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message another process gives
        self._fd = fd

    def release(self) -> None:
        """Drop the lock and remove its file (first: a process that opened it meanwhile sees it gone)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def torch_save_temp(obj: Any, path: str | os.PathLike, kind: str = "") -> tuple[str, str]:
    """``torch.save`` into a synced temp file beside ``path``: ``(temp path, its SHA-256)``.

    The caller renames it into place. torch writes to a file object opened here, unbuffered, so a
    failed write reaches us as the OS's error (ENOSPC) rather than as the bare RuntimeError torch's
    own file writer raises, which names only a line of its C++ source. A failed write removes the
    temp file and raises :class:`SpfdeError` naming ``path`` (a ``kind``, e.g. "checkpoint") and the cause.
    """
    path = Path(path)
    tmp = None
    try:
        tmp = _temp_beside(path)
        with open(tmp, "wb", buffering=0) as f:
            torch.save(obj, f)
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        return tmp, file_sha256(tmp)
    except BaseException as e:
        error = _write_failed(path, e, kind) if isinstance(e, (OSError, RuntimeError)) else None
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if error is not None:
            raise error from None
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None,
                      kind: str = "") -> str:
    """``torch.save`` through a temp file and rename, so a kill never leaves a torn file; also
    writes ``<path>.sha256`` (``sha256sum`` format). Returns the SHA-256 of the file.

    ``keep_previous``: the current ``path`` (and its checksum) is renamed to it first, so the
    previous good file survives (checkpoint rotation). Order: temp file (synced, hashed) ->
    rotate -> checksum -> rename. A failed write raises :class:`SpfdeError` naming the file (as a
    ``kind``, e.g. "checkpoint") and the cause, with the previous file intact and no temp file left.
    """
    path = Path(path)
    tmp, digest = torch_save_temp(obj, path, kind)
    try:
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
            if sha256_path(path).exists():
                os.replace(sha256_path(path), sha256_path(keep_previous))
        write_sha256(path, digest)
        os.replace(tmp, path)
    except BaseException as e:
        error = _write_failed(path, e, kind) if isinstance(e, OSError) else None
        if os.path.exists(tmp):
            os.unlink(tmp)
        if error is not None:
            raise error from None
        raise
    return digest


def sha256_path(path: str | os.PathLike) -> Path:
    """Where the checksum of ``path`` lives: ``<path>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_sha256(path: str | os.PathLike, digest: str) -> None:
    atomic_write_text(sha256_path(path), f"{digest}  {Path(path).name}\n")


def read_sha256(path: str | os.PathLike) -> str | None:
    """The digest recorded beside ``path``, or None when there is none (or it is unreadable)."""
    try:
        text = sha256_path(path).read_text(errors="replace")
    except OSError:
        return None
    word = text.split(maxsplit=1)[0] if text.strip() else ""
    return word.lower() if len(word) == 64 and all(c in "0123456789abcdefABCDEF" for c in word) else None


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state_dict's tensors in key order (names, dtypes, shapes and raw bytes)."""
    h = hashlib.sha256()
    for key in state_dict:
        t = state_dict[key]
        if not torch.is_tensor(t):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def lazy_parameters(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters a lazy module (``LazyLinear``, ``LazyConv2d``...) has not shaped yet."""
    return [n for n, p in model.named_parameters() if isinstance(p, torch.nn.parameter.UninitializedParameter)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int, *salt: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A dedicated generator seeded from ``(seed, *salt)``, so each purpose/epoch has its own stream."""
    h = hashlib.sha256(repr((seed,) + tuple(salt)).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return g


def rng_states() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python values only, so a checkpoint holding
    them loads with ``torch.load(weights_only=True)`` (docs/design.md, "Checkpoints")."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    py, npy = states["python"], states["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def probe_forward(model: torch.nn.Module, handles: list[Any]) -> Iterator[None]:
    """Context for a measuring forward pass: eval mode and ``no_grad``, so batch-norm running
    statistics and autograd are untouched; on exit the hook ``handles`` are removed and every
    module's train/eval mode is restored."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t


# ------------------------------------------------------------------ CPU threads
# On a shared CPU, torch's default (one intra-op thread per core) collapses: its threads wait on
# each other at every parallel region while other processes hold the cores, and a run can be 10x
# slower than with one thread. The default below takes what the process may use and what is busy.

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """How many torch intra-op threads a run uses and why (one line for the console)."""

    threads: int
    reason: str


def choose_threads(configured: int | None, env: Mapping[str, str], usable_cores: int, load: float,
                   torch_threads: int) -> ThreadChoice:
    """The thread-count rule, a pure function of what the process can see.

    1. ``train.threads`` when set; 2. ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) when set to a
    positive integer; 3. otherwise the cores this process may run on (its CPU affinity) minus the
    load already there (rounded), at least 1, at most torch's own count (its default, one per
    physical core, or what ``torch.set_num_threads`` chose before). Under
    ``OMP_WAIT_POLICY=PASSIVE`` (the ``spfde`` CLI sets it unless the environment says otherwise)
    the load is not subtracted: sleeping idle threads do not stall each other on busy cores.
    """
    usable = max(1, int(usable_cores))
    cores = f"{usable} usable core{'s' if usable != 1 else ''}"

    def chosen(threads: int, reason: str) -> ThreadChoice:
        if threads > usable:  # the user's count stands, but they should know what it costs
            reason += f", more than the {cores}: the threads will wait on each other"
        return ThreadChoice(threads, reason)

    if configured:
        return chosen(int(configured), "set by train.threads")
    from_env = _env_threads(env)
    if from_env is not None:
        return chosen(from_env[0], f"set by {from_env[1]}")
    bad = [f"{var}={env[var]!r}" for var in THREAD_ENV if env.get(var, "").strip()]
    reason = f"{cores}, load {load:.1f} at start"
    if bad:  # set but not a positive integer (a nested list "4,2" included): spfde picks its own count
        reason = f"{' and '.join(bad)} ignored (not a positive integer); {reason}"
    if env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        # Idle OpenMP threads sleep instead of spinning, so threads on busy cores no longer stall
        # one another: taking every core gets the run its fair share of all of them (busy make demo
        # 1.8x idle with 2 passive threads, 2.4x with the 1 thread that subtracting the load gives;
        # docs/benchmarks.md), so the load is not subtracted.
        free, reason = usable, reason + ", OMP_WAIT_POLICY=PASSIVE"
    else:
        free = usable - round(max(load, 0.0))
    threads = max(1, min(free, int(torch_threads), usable))
    if threads == torch_threads and free > torch_threads:
        reason += f"; torch's count {torch_threads}"
    return ThreadChoice(threads, reason + "; set train.threads to choose")


def _env_threads(env: Mapping[str, str]) -> tuple[int, str] | None:
    for var in THREAD_ENV:
        raw = env.get(var, "").strip()
        if raw.isdigit() and int(raw) > 0:
            return int(raw), var
    return None


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroup cpusets), else ``cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def visible_load(samples: int = 5, gap_s: float = 0.02) -> float:
    """Other work competing for the cores now: the median number of runnable threads that are not
    this process's own, over a few readings of ``/proc/loadavg`` (its 4th field) and
    ``/proc/self/task``.

    Not the load average: it lags both ways. It misses a competitor started seconds ago, and it
    still counts, for about a minute, work that has finished, this process's own included: a run
    started right after another (a sweep, a benchmark's next process, a second ``Trainer`` in one
    script) saw the load the last one left (0.54 on an idle 2-core machine, seconds after a
    benchmark) and trained on one thread of two. Without ``/proc`` (not Linux) the 1-minute load
    average is all there is.
    """
    running = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                total = int(f.read().split()[3].split("/")[0])
        except (OSError, IndexError, ValueError):
            break
        running.append(max(0, total - _own_running()))  # the reader is one of its own
        if i + 1 < samples:
            time.sleep(gap_s)
    if not running:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    return float(sorted(running)[len(running) // 2])


def _own_running() -> int:
    """This process's threads in state R (running or runnable), the calling thread included."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                # the state follows the command name, which is in parentheses and may hold spaces
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return max(count, 1)


_THREADS_SET: int | None = None  # what set_threads last gave torch
_TORCH_THREADS: int | None = None  # torch's count before that (its default or the user's choice)


def set_threads(configured: int | None = None, keep: int | None = None) -> ThreadChoice:
    """Choose (:func:`choose_threads`) and apply the intra-op thread count of a run.

    ``keep``: the count a resumed run used before, applied unless ``train.threads`` or the
    environment says otherwise: the thread count changes floating-point reduction order, so a
    resume is bit-identical only with the same count.
    """
    global _THREADS_SET, _TORCH_THREADS
    current = torch.get_num_threads()
    if _THREADS_SET is None or current != _THREADS_SET:  # changed by someone else since: theirs
        _TORCH_THREADS = current
    if keep and not configured and _env_threads(os.environ) is None:
        choice = ThreadChoice(int(keep), "kept from before the resume, so it stays bit-identical")
    else:
        explicit = bool(configured) or _env_threads(os.environ) is not None
        load = 0.0 if explicit else visible_load()  # reading it takes a few short samples: only when used
        choice = choose_threads(configured, os.environ, usable_cores(), load, _TORCH_THREADS or current)
        if keep and choice.threads != int(keep):  # the user's choice wins, but they must learn its price
            choice = ThreadChoice(choice.threads, f"{choice.reason}; the run trained on {int(keep)} before the "
                                                  "resume, so it will not end bit-identical to an uninterrupted run")
    torch.set_num_threads(choice.threads)
    _THREADS_SET = choice.threads
    return choice
