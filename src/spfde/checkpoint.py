"""Checkpoints of the built-in trainer: the file format, its checksum, rotation and safe loading.

Format ``spfde-checkpoint-v2`` (docs/design.md, "Checkpoints"): one ``torch.save`` of a dict
``{"format", "epoch", "config", "model", "optimizer", "controller", "scaler", "rng", "metrics",
"wall_s"}`` holding only the types of :data:`ALLOWED_TYPES` (tensors and plain containers; the
RNG states are stored as tensors and ints, :func:`spfde.utils.rng_states`). It is read with
``torch.load(weights_only=True)`` and then checked against that allow-list, so a crafted file
cannot run code and a foreign one is refused with one line.

Integrity: every checkpoint has ``<name>.sha256`` beside it (``sha256sum`` format), written
before the checkpoint is renamed into place and verified before it is unpickled. The previous
good checkpoint is kept as ``prev.pt``: ``last.pt -> prev.pt`` is rotated at each save. On load,
``last.pt`` is tried first and ``prev.pt`` second; a file is accepted when its SHA-256 equals a
digest recorded beside ``last.pt`` or ``prev.pt`` (a kill between the two renames of a rotation
can leave a file beside its partner's digest; every recorded digest is one of a complete file
we wrote).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from spfde.errors import ConfigError, SpfdeError, warn
from spfde.utils import atomic_torch_save, read_sha256, sha256_path

FORMAT = "spfde-checkpoint-v2"
LAST, PREV = "last.pt", "prev.pt"
#: every object a checkpoint may hold (dict subclasses other than OrderedDict are refused)
ALLOWED_TYPES = (dict, OrderedDict, list, tuple, str, int, float, bool, type(None), torch.Tensor)


# --------------------------------------------------------------------------------------------
# writing


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike, rotate: bool = True) -> Path:
    """Write ``state`` as ``folder/last.pt`` with its checksum; the previous ``last.pt`` becomes
    ``prev.pt`` (``rotate=False``: it is overwritten, for a ``last.pt`` known to be bad). A failed
    write raises :class:`SpfdeError` naming the file and the cause, the previous checkpoint intact."""
    folder = Path(folder)
    atomic_torch_save(state, folder / LAST, keep_previous=folder / PREV if rotate else None, kind="checkpoint")
    return folder / LAST


# --------------------------------------------------------------------------------------------
# reading


def _partner(path: Path) -> Path | None:
    return {LAST: path.with_name(PREV), PREV: path.with_name(LAST)}.get(path.name)


def _check_types(obj: Any, path: Path) -> None:
    """Refuse any object outside :data:`ALLOWED_TYPES` (iterative: no recursion limit)."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        o, where = stack.pop()
        if type(o) not in ALLOWED_TYPES:
            raise SpfdeError(f"checkpoint {str(path)!r} holds a {type(o).__name__} at '{where or '<root>'}', which a "
                             f"{FORMAT} file never does; refusing it")
        if isinstance(o, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in o.items())
            stack.extend((k, f"{where}<key>") for k in o)
        elif isinstance(o, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(o))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """One checkpoint file, verified (checksum, allow-list, format); anything wrong raises
    :class:`SpfdeError` with one line naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpfdeError(f"checkpoint {str(path)!r} not found") from None
    except OSError as e:
        raise SpfdeError(f"cannot read checkpoint {str(path)!r}: {e.strerror}") from None
    partner = _partner(path)
    recorded = {d for d in (read_sha256(path), read_sha256(partner) if partner else None) if d}
    if not recorded:
        raise SpfdeError(f"checkpoint {str(path)!r} cannot be verified: {sha256_path(path).name} is missing "
                         f"(files older than format {FORMAT} have none; restart such a run)")
    if hashlib.sha256(data).hexdigest() not in recorded:
        raise SpfdeError(f"checkpoint {str(path)!r} fails its SHA-256 check: the file changed after it was written")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"refers to {found.group(1)}" if found else "holds objects"
        raise SpfdeError(f"checkpoint {str(path)!r} {what} outside the checkpoint allow-list (tensors and plain "
                         f"containers); refusing to load it") from None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: torch raises many different types here
        raise SpfdeError(f"checkpoint {str(path)!r} is truncated or not a spfde checkpoint ({type(e).__name__}); "
                         "delete it to restart the run from scratch") from None
    _check_types(ckpt, path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise SpfdeError(f"{str(path)!r} is not a spfde checkpoint of format {FORMAT} "
                         f"({'format ' + repr(found) if found else 'no format field'})")
    return ckpt


def load_latest(folder: str | os.PathLike) -> tuple[Path, dict[str, Any], bool] | None:
    """The newest intact checkpoint in ``folder``: ``(path, checkpoint, last_rejected)``, or None
    when there is none yet. ``last.pt`` failing its checks falls back to ``prev.pt`` with one
    ``warning:`` line; both failing raises :class:`SpfdeError` with both reasons."""
    folder = Path(folder)
    candidates = [p for p in (folder / LAST, folder / PREV) if p.exists()]
    if not candidates:
        return None
    problems: list[str] = []
    for p in candidates:
        try:
            ckpt = read_checkpoint(p)
        except SpfdeError as e:
            problems.append(str(e))
            continue
        if problems:
            warn(f"{problems[0]}; resuming from {str(p)!r} (epoch {ckpt['epoch']}) instead")
        return p, ckpt, p.name != LAST
    raise SpfdeError(f"{'; '.join(problems)}; no intact checkpoint left: delete {str(folder)!r} to restart the run "
                     "from scratch")


# --------------------------------------------------------------------------------------------
# a resumed run's config against the one its checkpoint was trained with

#: changes that cannot alter the trained weights: accepted silently on resume
HARMLESS_ON_RESUME = frozenset({
    "logging.progress", "logging.tensorboard", "train.threads", "train.eval_every", "data.eval_batch_size",
    "data.num_workers", "analysis.probe_size"})
#: changes accepted with ``--allow-config-change``: they change what is measured or where, not the
#: schedule of the epochs already trained (``train.epochs`` only where nothing depends on it). The
#: activation cache gives bit-identical weights on CPU but changes the ledger's forward FLOPs; the
#: kernels compute the same function in another summation order (weights within float tolerance)
ALLOWED_WITH_FLAG = frozenset({"train.epochs", "train.device", "data.test_subset", "analysis.snapshots",
                               "train.on_nonfinite", "freezing.cache", "freezing.cache_max_bytes",
                               "sparsity.kernels", "sparsity.kernels_calibration"})


def _flat(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{section: {field: value}}`` as ``{"section.field": value}`` (mapping fields stay whole)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _epochs_independent(cfg: dict[str, Any]) -> str | None:
    """Why the planned schedule depends on ``train.epochs`` (None when it does not)."""
    if cfg["optim"]["schedule"] != "constant":
        return f"the {cfg['optim']['schedule']} learning-rate schedule spans train.epochs"
    if cfg["freezing"]["target"] > 0:
        return "the freezing plan (Algorithm 1) is made for train.epochs"
    search_end = cfg["sparsity"]["search_end"]  # None (3/4 of train.epochs) or a fraction of it follow it
    if not (isinstance(search_end, int) and not isinstance(search_end, bool)) and \
            cfg["sparsity"]["method"] not in ("dense", "static"):
        return "sparsity.search_end is a share of train.epochs (set it to an epoch)"
    return None


def check_resume_config(old: dict[str, Any], new: dict[str, Any], allow_change: bool, run: str) -> list[str]:
    """Compare the config a checkpoint was trained with (``old``) against the run's config.yaml
    now (``new``). Returns the accepted changes (``"key old -> new"``) beyond the harmless ones;
    raises :class:`ConfigError` listing the changed keys when a change is refused."""
    a, b = _flat(old), _flat(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = {k: f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed}
    flagged = [k for k in changed if k in ALLOWED_WITH_FLAG]
    refused = [k for k in changed if k not in HARMLESS_ON_RESUME and k not in ALLOWED_WITH_FLAG]
    why = ""
    if "train.epochs" in flagged:
        reason = _epochs_independent(new) or _epochs_independent(old)
        if b["train.epochs"] < a["train.epochs"]:
            reason = "a run can only be made longer"
        if reason:
            flagged.remove("train.epochs")
            refused.append("train.epochs")
            why = f" (train.epochs: {reason})"
    if refused:
        raise ConfigError(
            f"cannot resume {run!r}: its config.yaml differs from the config its checkpoint was trained with: "
            f"{', '.join(shown[k] for k in sorted(refused))}{why}; put the old values back, or start a new run "
            f"with --out (only {', '.join(sorted(ALLOWED_WITH_FLAG))} may change, with --allow-config-change)")
    if flagged and not allow_change:
        raise ConfigError(
            f"cannot resume {run!r}: its config.yaml changed since the checkpoint: "
            f"{', '.join(shown[k] for k in flagged)}; pass --allow-config-change to continue with the new values")
    return [shown[k] for k in flagged]
