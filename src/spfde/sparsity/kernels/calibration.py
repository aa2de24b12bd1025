"""The per-machine store of ``sparsity.kernels: auto``'s decisions (``sparsity.kernels_calibration``).

``auto`` decides per layer and call by timing dense against sparse (:mod:`.execution`); two fresh
runs could then pick differently where the kernels are within noise of each other, and the runs
would not be bit-identical (audit H1). The store keeps every timed decision under a key made of
everything that sets the two kernels' costs (the layer's kind, weight shape and geometry, the
call, the density to 1%, the thread count, the torch version, the CPU model and the native
library's build), so a later run on the same machine with the same file reuses it untimed.

The file is JSON, written atomically (a temporary file, then ``os.replace``) and merged with what
is on disk at write time, so parallel runs (test workers, DDP ranks) lose nothing but their own
duplicate. A corrupt or unreadable file gives one warning line and an empty start; an unwritable
location gives one warning line and keeps the decisions in memory for the run. Never fatal.

``off`` keeps a store in memory only, for the run: a later run times afresh, but within one run
layers with the same key (the same shape, density and call: the four blocks of a ViT, the layers
of a ResNet stage) share one timing, as they do under a file.

Each entry also keeps the two kernels' best times and how many timings they pool (``timings``): a
decision timed once is provisional and is timed a second time in a later epoch
(:mod:`.execution`, ``CONFIRM_TIMINGS``), so a first timing that load on the machine disturbed
does not hold for the whole run, nor for every later run that reads the file.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from spfde.sparsity.kernels import native
from spfde.sparsity.kernels.common import warn_once

FILE_NAME = "calibration.json"
#: bumped when the key's fields or the timing rule change, so old decisions are not reused (3: best
#: times pooled over a confirming second timing, instead of one timing's medians)
FORMAT = 3


class Decision(NamedTuple):
    """One stored decision: ``choice`` (``dense`` | ``sparse``), ``speedup`` (dense time / sparse time),
    the best ``dense_s`` and ``sparse_s`` seconds it was decided on, and how many ``timings`` they pool."""

    choice: str
    speedup: float | None
    timings: int = 1
    dense_s: float | None = None
    sparse_s: float | None = None


def _decision(v: dict[str, Any]) -> Decision:
    def num(name: str) -> float | None:
        return None if v.get(name) is None else float(v[name])

    return Decision(str(v["choice"]), num("speedup"), int(v.get("timings", 1)), num("dense_s"), num("sparse_s"))


def resolve(setting: str) -> Path | None:
    """The file for ``sparsity.kernels_calibration``: ``auto`` -> beside the native kernel library
    (``$SPFDE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/spfde/kernels``, else ``~/.cache/spfde/kernels``),
    ``off`` -> None (time every run), anything else -> that path."""
    if setting == "off":
        return None
    if setting == "auto":
        return native.cache_dir() / FILE_NAME
    return Path(setting).expanduser()


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, str]:
    """The process-wide part of every key: torch version and CPU model."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu": model or platform.processor() or platform.machine()}


def key(fields: dict[str, Any]) -> str:
    """The store's key: ``fields`` plus the thread count and :func:`machine`, as canonical JSON."""
    return json.dumps({**fields, "threads": torch.get_num_threads(), **machine()}, sort_keys=True,
                      separators=(",", ":"))


class Calibration:
    """Decisions ``{key: Decision}`` loaded lazily from ``path`` and written back on each new one;
    ``path=None``: in memory only, for this run (``sparsity.kernels_calibration: off``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, Decision] | None = None
        self._writable = path is not None
        self._warned = False

    def _read(self) -> dict[str, Decision]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:  # another version's keys: start afresh, overwrite on write
                return {}
            return {str(k): _decision(v) for k, v in data["decisions"].items() if v["choice"] in ("dense", "sparse")}
        except (FileNotFoundError, NotADirectoryError):  # nothing stored yet (an unwritable folder warns on write)
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # corrupt: one line, never fatal
            if self._warned:  # re-read at the next write, still corrupt: said already
                return {}
            self._warned = True
            warn_once(f"kernel calibration file {self.path} unreadable ({type(e).__name__}: {e}); "
                      "starting with no stored decisions")
            return {}

    def get(self, k: str) -> Decision | None:
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(k)

    def put(self, k: str, choice: str, speedup: float | None, timings: int = 1, dense_s: float | None = None,
            sparse_s: float | None = None) -> None:
        """Record a decision and write the file: what is on disk now, plus this decision."""
        if self._entries is None:
            self._entries = self._read()
        entry = Decision(choice, speedup, timings, dense_s, sparse_s)
        self._entries[k] = entry
        if not self._writable or self.path is None:
            return
        merged = {**self._read(), k: entry}
        self._entries.update(merged)
        doc = {"format": FORMAT, "decisions": {key_: d._asdict() for key_, d in sorted(merged.items())}}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as e:  # unwritable: keep the decisions in memory for this run
            self._writable = False
            warn_once(f"kernel calibration file {self.path} not writable ({e.strerror or e}); "
                      "this run's kernel decisions are not stored")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
