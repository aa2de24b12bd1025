"""Analysis artifacts a run directory holds: model snapshots and forgetting histograms.

Both formats are part of the run-output contract (docs/design.md, "Run outputs"); the trainer
writes them with the functions below and ``spfde report`` reads them back with the loaders.

Snapshot (``snapshots/epoch_XXXX.pt``, written when ``analysis.snapshots`` is true, at every Δτ
epoch and after the last epoch)::

    torch.save({"epoch": int,                         # 0-based epoch just finished
                "model": model.state_dict(),          # CPU tensors, parameters and buffers
                "masks": {param name: bool tensor}},  # the sparse masks ({} for a dense run)
               "snapshots/epoch_{epoch:04d}.pt")

with its SHA-256 in ``epoch_XXXX.pt.sha256`` beside it; read back with ``weights_only=True``.

Forgetting histogram (``sieve/forgetting_epoch_XXXX.json``, written at each data-sieving update,
paper Section 4.3)::

    {"epoch": int, "histogram": {"<forgetting count>": <number of samples>, ...}}

JSON object keys are strings; counts with no samples may be omitted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from spfde.errors import SpfdeError
from spfde.utils import atomic_torch_save, atomic_write_json, file_sha256, read_sha256

SNAPSHOT_DIR = "snapshots"
SIEVE_DIR = "sieve"
_SNAP_RE = re.compile(r"^epoch_(\d+)\.pt$")
_HIST_RE = re.compile(r"^forgetting_epoch_(\d+)\.json$")


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; the snapshot must hold the plain model's names
    return getattr(model, "_orig_mod", model)


def _masks_to_dict(masks: Any) -> dict[str, torch.Tensor]:
    if masks is None:
        return {}
    if isinstance(masks, Mapping):
        items = masks.items()
    elif hasattr(masks, "items"):
        items = masks.items()
    else:
        raise SpfdeError(f"save_snapshot: masks must be a mapping of parameter name to tensor, got {type(masks)!r}")
    return {str(k): torch.as_tensor(v).detach().to("cpu").bool().clone() for k, v in items}


def save_snapshot(run_dir: str | Path, epoch: int, model: nn.Module, masks: Any = None) -> Path:
    """Save ``{"epoch", "model", "masks"}`` to ``run_dir/snapshots/epoch_{epoch:04d}.pt`` (atomically).

    ``masks`` is a mapping ``{param name: tensor}`` (any dtype; stored as bool) or ``None`` for a
    dense model. Returns the written path.
    """
    state = {k: v.detach().to("cpu").clone() for k, v in _unwrap(model).state_dict().items()}
    payload = {"epoch": int(epoch), "model": state, "masks": _masks_to_dict(masks)}
    path = Path(run_dir) / SNAPSHOT_DIR / f"epoch_{int(epoch):04d}.pt"
    atomic_torch_save(payload, path, kind="snapshot")
    return path


def load_snapshot(path: str | Path) -> dict[str, Any]:
    """One snapshot file as ``{"epoch", "model", "masks"}``; a bad file raises :class:`SpfdeError`."""
    path = Path(path)
    recorded = read_sha256(path)  # written beside every snapshot; older runs have none
    if recorded is not None and file_sha256(path) != recorded:
        raise SpfdeError(f"snapshot {str(path)!r} fails its SHA-256 check; delete the damaged file")
    try:  # tensors and plain containers only: a crafted file cannot run code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a damaged file to the user
        reason = " ".join(str(e).split())[:200]
        raise SpfdeError(f"cannot read snapshot {str(path)!r}: {reason}; delete the damaged file") from None
    if not isinstance(obj, dict) or "model" not in obj or "epoch" not in obj:
        raise SpfdeError(f"snapshot {str(path)!r} is not a spfde snapshot (needs keys 'epoch' and 'model')")
    obj.setdefault("masks", {})
    return obj


def load_snapshots(run_dir: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """All snapshots of a run as ``[(epoch, {"epoch", "model", "masks"}), ...]`` sorted by epoch.

    A run without a ``snapshots/`` folder gives ``[]``.
    """
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _SNAP_RE.match(p.name)
        if m:
            snap = load_snapshot(p)
            out.append((int(snap["epoch"]), snap))
    out.sort(key=lambda t: t[0])
    return out


def _normalise_histogram(hist: Any) -> dict[str, int]:
    """``{count: n}`` mapping, a list/1-D tensor indexed by count (a bincount), -> ``{"count": n}``."""
    if torch.is_tensor(hist):
        hist = hist.detach().to("cpu").reshape(-1).tolist()
    if isinstance(hist, Mapping):
        out = {str(int(k)): int(v) for k, v in hist.items()}
    elif isinstance(hist, (list, tuple)):
        out = {str(i): int(v) for i, v in enumerate(hist)}
    else:
        raise SpfdeError(f"forgetting histogram must be a mapping count -> samples or a list, got {type(hist)!r}")
    return {k: v for k, v in sorted(out.items(), key=lambda kv: int(kv[0])) if v}


def save_forgetting_histogram(run_dir: str | Path, epoch: int, hist: Any) -> Path:
    """Write ``sieve/forgetting_epoch_{epoch:04d}.json`` = ``{"epoch", "histogram": {count: samples}}``.

    ``hist`` is a mapping ``{forgetting count: number of samples}`` or a list / 1-D tensor whose
    index is the count (``torch.bincount`` output).
    """
    path = Path(run_dir) / SIEVE_DIR / f"forgetting_epoch_{int(epoch):04d}.json"
    atomic_write_json(path, {"epoch": int(epoch), "histogram": _normalise_histogram(hist)})
    return path


def load_forgetting_histograms(run_dir: str | Path) -> list[tuple[int, dict[int, int]]]:
    """``[(epoch, {count: samples})]`` sorted by epoch from ``run_dir/sieve``; ``[]`` when absent."""
    folder = Path(run_dir) / SIEVE_DIR
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _HIST_RE.match(p.name)
        if not m:
            continue
        try:
            obj = json.loads(p.read_text())
            hist = _normalise_histogram(obj["histogram"] if isinstance(obj, dict) and "histogram" in obj else obj)
            epoch = int(obj.get("epoch", m.group(1))) if isinstance(obj, dict) else int(m.group(1))
        except (OSError, ValueError, KeyError, TypeError, SpfdeError) as e:
            raise SpfdeError(f"cannot read forgetting histogram {str(p)!r}: {e}") from None
        out.append((epoch, {int(k): v for k, v in hist.items()}))
    out.sort(key=lambda t: t[0])
    return out
