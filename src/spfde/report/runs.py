"""Reading a run directory (docs/design.md, "Run outputs") into plain Python data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spfde.errors import SpfdeError


@dataclass
class Run:
    """One run directory: its per-epoch metrics, summary and resolved config (plain dicts)."""

    path: Path
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    label: str = ""
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[Any]]:
        """``(epochs, values)`` of a metrics key, skipping epochs where it is missing or null."""
        xs, ys = [], []
        for i, row in enumerate(self.metrics):
            v = row.get(key)
            if v is not None:
                xs.append(int(row.get("epoch", i)))
                ys.append(v)
        return xs, ys

    def cfg(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config or {}
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


# the fields the report and compare compute with: a number or null wherever they appear
METRIC_NUMBERS = ("epoch", "lr", "train_loss", "train_acc", "test_acc", "test_loss", "epoch_s", "wall_s", "density",
                  "train_flops", "cum_train_flops", "samples_seen", "active_samples", "returned",
                  "removed_this_update", "never_seen_count", "mem_model_bytes", "mem_model_unfrozen_bytes",
                  "peak_mem_bytes")
SUMMARY_NUMBERS = ("final_test_acc", "best_test_acc", "wall_s", "train_flops", "dense_train_flops", "flops_saving",
                   "train_size", "epochs", "seed")


def _check_numbers(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        v = obj.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SpfdeError(f"{where}: field {k!r} is {v!r}, expected a number or null; is the file damaged?")


def _read_text(path: Path) -> str:
    """A run file's text; unreadable or not UTF-8 (bytes of another file, a disk fault) is one
    :class:`SpfdeError` naming the file, as a damaged JSON or YAML file is."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpfdeError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SpfdeError(f"cannot read {str(path)!r}: it is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                         f"offset {e.start}); is the file damaged?") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    lines = _read_text(path).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpfdeError(f"{str(path)!r} line {n} is not valid JSON ({e.msg}); is the file damaged?") from None
        if not isinstance(row, dict):
            raise SpfdeError(f"{str(path)!r} line {n} must be a JSON object, got {type(row).__name__}")
        _check_numbers(row, METRIC_NUMBERS, f"{str(path)!r} line {n}")
        rows.append(row)
    return rows


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpfdeError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(obj, dict):
        raise SpfdeError(f"{str(path)!r} must hold a JSON object")
    return obj


def finished_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` when it is intact (a JSON object whose number fields are numbers or
    null), else None: missing (the run has not finished) or damaged (torn, edited, another tool's
    file). The one test of "this run is finished" for the commands that skip or reuse a finished run
    (``spfde train --resume``, ``spfde reproduce``): a damaged summary counts as not finished, so
    resuming the run writes it again from the last checkpoint instead of failing on it."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = _read_json(path)
        if summary is not None:
            _check_numbers(summary, SUMMARY_NUMBERS, repr(str(path)))
    except SpfdeError:
        return None
    return summary


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    text = _read_text(path)
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpfdeError(f"cannot read {str(path)!r}: {e}") from None
    return obj if isinstance(obj, dict) else None


def load_run(run_dir: str | Path, require_summary: bool = False) -> Run:
    """Load a run directory; a missing folder or one without metrics.jsonl raises :class:`SpfdeError`."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise SpfdeError(f"run directory {str(path)!r} {what}; pass the --out folder of a `spfde train` run")
    mfile, sfile = path / "metrics.jsonl", path / "summary.json"
    if not mfile.exists() and not sfile.exists():
        raise SpfdeError(f"{str(path)!r} is not a spfde run directory: it has neither metrics.jsonl nor summary.json")
    summary = _read_json(sfile)
    if summary is not None:
        _check_numbers(summary, SUMMARY_NUMBERS, repr(str(sfile)))
    if require_summary and summary is None:
        raise SpfdeError(f"run {str(path)!r} has no summary.json: it has not finished; resume it with "
                         f"`spfde train --resume {path}` or leave it out")
    metrics = read_metrics(mfile) if mfile.exists() else []
    return Run(path=path, metrics=metrics, summary=summary, config=_read_yaml(path / "config.yaml"))


def load_runs(run_dirs: list[str | Path], require_summary: bool = False) -> list[Run]:
    """Load several runs and give each a unique, readable label (its folder name, or parent/name)."""
    if not run_dirs:
        raise SpfdeError("no run directory given; pass at least one --out folder of a `spfde train` run")
    runs = [load_run(d, require_summary) for d in run_dirs]
    names = [r.path.resolve().name for r in runs]
    for r, name in zip(runs, names, strict=False):
        if names.count(name) > 1:
            rp = r.path.resolve()
            r.label = f"{rp.parent.name}/{rp.name}"
        else:
            r.label = name
    seen: dict[str, int] = {}
    for r in runs:  # the same folder twice still gets distinct labels
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label}#{seen[r.label]}"
    return runs
