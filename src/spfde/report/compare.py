"""``spfde compare``: one table of finished runs, seeds grouped (paper Tables 1-2 style).

Runs whose resolved config differs only in ``seed`` (and in settings that do not change the
experiment: device, threads, logging) form one row; accuracy is reported as mean ± sample
standard deviation (ddof=1; 0 for a single seed) over the group, costs as means, peak memory as
the maximum.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from spfde.errors import SpfdeError
from spfde.report.runs import Run, load_runs
from spfde.units import FINAL_ACC_TOLERANCE, time_to_acc_fields, time_to_accuracy

# config keys that do not change what is being measured, so runs differing in them are seeds
# of the same experiment
_IGNORED = ("seed", "train.device", "train.threads", "train.eval_every", "logging", "data.root",
            "data.num_workers")


def _strip(cfg: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(cfg, sort_keys=True, default=str))
    for key in _IGNORED:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return out


def _group_key(run: Run) -> str:
    if run.config:
        return json.dumps(_strip(run.config), sort_keys=True)
    s = run.summary or {}
    return json.dumps({k: s.get(k) for k in ("method", "sparsity", "freeze_target", "sieve_ratio", "model",
                                              "dataset", "epochs")}, sort_keys=True, default=str)


def _mean(xs: list[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None
    if len(xs) == 1:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _final_acc(run: Run) -> float | None:
    s = run.summary or {}
    if s.get("final_test_acc") is not None:
        return float(s["final_test_acc"])
    _, accs = run.series("test_acc")
    return float(accs[-1]) if accs else None


def _group_name(runs: list[Run]) -> str:
    labels = [r.label for r in runs]
    if len(labels) == 1:
        return labels[0]
    # common prefix of the folder names, without a trailing seed marker ("..._seed", "-s")
    prefix = labels[0]
    for lab in labels[1:]:
        while not lab.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip("_-/.").removesuffix("seed").removesuffix("_s").rstrip("_-/.")
    return prefix or labels[0]


def _is_dense_baseline(row: dict[str, Any]) -> bool:
    return ((row.get("method") == "dense" or not row.get("sparsity")) and not row.get("freeze_target")
            and not row.get("sieve_ratio"))


def _data_size(run: Run) -> str:
    """The training data a run saw, for the "different dataset sizes" note."""
    s = run.summary or {}
    size = s.get("train_size")
    if size is None:  # runs from before summary.json had train_size
        sub = run.cfg("data.subset")
        size = "all" if sub is None else f"<= {sub}"
    return f"{s.get('dataset', run.cfg('data.name'))} ({size} samples)"


def compare_runs(run_dirs: list[str | Path], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per group of runs that differ only in seed, in the order groups first appear.

    Keys: ``name``, ``runs`` (paths), ``seeds``, ``n``, ``method``, ``model``, ``dataset``,
    ``sparsity``, ``freeze_target``, ``sieve_ratio``, ``acc_mean``, ``acc_std``, ``accs``,
    ``best_acc_mean``, ``train_flops``, ``dense_train_flops``, ``flops_saving``, ``wall_s``,
    ``peak_mem_bytes``, ``mem_model_avg_bytes``, and, wall-clock first: ``samples_per_s``,
    ``time_to_final_acc_s``, ``common_acc`` (the lowest final accuracy of the table minus 0.5
    points) with ``time_to_common_acc_s`` (training seconds until a run first reached it), and
    ``dense_wall_s`` / ``wall_saving`` / ``dense_ref`` when the table holds a dense run (no
    sparsity, freezing or sieving) of the same model and data. Accuracies and ratios are
    fractions in [0, 1].

    Folders that are not runs, and runs without summary.json (not finished), are skipped with a
    line in ``notes``; so is a mix of training-set sizes. :class:`SpfdeError` if no finished run is left.
    """
    notes = notes if notes is not None else []
    runs = []
    seen: dict[Path, str | Path] = {}
    for d in run_dirs:
        where = Path(d).resolve()
        if where in seen:  # one run counted twice would pass for two seeds with a spread of 0
            notes.append(f"skipped {str(d)!r}: the same run as {str(seen[where])!r}")
            continue
        seen[where] = d
        try:
            runs.append(load_runs([d], require_summary=True)[0])
        except SpfdeError as e:
            notes.append(f"skipped {str(d)!r}: {e}")
    if not runs:
        raise SpfdeError("no finished run to compare" + (f" ({'; '.join(notes)})" if notes else ""))
    runs = load_runs([r.path for r in runs], require_summary=True)  # labels unique over the runs kept
    sizes = {}
    for r in runs:
        sizes.setdefault(_data_size(r), r.label)
    if len(sizes) > 1:
        notes.append("these runs trained on different data (" + ", ".join(f"{r}: {k}" for k, r in sizes.items())
                     + "): their accuracy, FLOPs and wall-clock are not directly comparable")
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_group_key(r), []).append(r)
    rows = []
    for members in groups.values():
        s0 = members[0].summary or {}
        sums = [m.summary or {} for m in members]
        accs = [_final_acc(m) for m in members]
        peaks = [s.get("peak_mem_bytes") for s in sums if s.get("peak_mem_bytes") is not None]
        rows.append({
            "name": _group_name(members),
            "runs": [str(m.path) for m in members],
            "seeds": [s.get("seed", m.cfg("seed")) for s, m in zip(sums, members, strict=False)],
            "n": len(members),
            "method": s0.get("method", members[0].cfg("sparsity.method")),
            "model": s0.get("model", members[0].cfg("model.name")),
            "dataset": s0.get("dataset", members[0].cfg("data.name")),
            "sparsity": s0.get("sparsity", members[0].cfg("sparsity.target")),
            "freeze_target": s0.get("freeze_target", members[0].cfg("freezing.target")),
            "sieve_ratio": s0.get("sieve_ratio", members[0].cfg("sieving.ratio")),
            "acc_mean": _mean(accs),
            "acc_std": _std(accs),
            "accs": accs,
            "best_acc_mean": _mean([s.get("best_test_acc") for s in sums]),
            "train_flops": _mean([s.get("train_flops") for s in sums]),
            "dense_train_flops": _mean([s.get("dense_train_flops") for s in sums]),
            "flops_saving": _mean([s.get("flops_saving") for s in sums]),
            "wall_s": _mean([s.get("wall_s") for s in sums]),
            "peak_mem_bytes": max(peaks) if peaks else None,
            "mem_model_avg_bytes": _mean([s.get("mem_model_avg_bytes") for s in sums]),
            "samples_per_s": _mean([s.get("samples_per_s") for s in sums]),
            "time_to_final_acc_s": _mean([time_to_acc_fields(m.metrics)["time_to_final_acc_s"] for m in members]),
            "_members": members,
            "_data": _data_size(members[0]),
        })
    _add_wall_clock_references(rows)
    return rows


def _add_wall_clock_references(rows: list[dict[str, Any]]) -> None:
    """Time to a common accuracy, and the wall-clock saving against a dense run of the same data."""
    finals = [r["acc_mean"] for r in rows if r["acc_mean"] is not None]
    common = min(finals) - FINAL_ACC_TOLERANCE if finals else None
    for r in rows:
        members = r.pop("_members")
        r["common_acc"] = common
        # every seed must reach it for the mean to mean something; otherwise say "not reached"
        times = [time_to_accuracy(m.metrics, common) for m in members] if common is not None else [None]
        r["time_to_common_acc_s"] = None if any(t is None for t in times) else _mean(times)
    data = [r.pop("_data") for r in rows]
    for r, dr in zip(rows, data, strict=True):
        ref = None if _is_dense_baseline(r) else next(
            (d for d, dd in zip(rows, data, strict=True)
             if _is_dense_baseline(d) and d.get("model") == r.get("model") and dd == dr), None)
        r["dense_ref"] = ref["name"] if ref else None
        r["dense_wall_s"] = ref["wall_s"] if ref else None
        r["wall_saving"] = (1.0 - r["wall_s"] / ref["wall_s"] if ref and r["wall_s"] is not None and ref["wall_s"]
                            else None)


def _f(v: Any, fmt: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(float(v) * scale, fmt)


COMPARE_COLUMNS = ("run", "method", "sparsity %", "freeze %", "sieve %", "seeds", "final acc % (mean±std)",
                   "train FLOPs (×1e12)", "FLOPs saving %", "wall-clock s", "wall-clock saving %", "peak mem MiB",
                   "s to final acc", "s to common acc")


def compare_row_cells(row: dict[str, Any]) -> list[str]:
    acc = "-" if row.get("acc_mean") is None else (
        f"{100 * row['acc_mean']:.2f} ± {100 * (row.get('acc_std') or 0.0):.2f}")
    return [
        str(row.get("name", "")), str(row.get("method") or "-"), _f(row.get("sparsity"), ".0f", 100),
        _f(row.get("freeze_target"), ".0f", 100), _f(row.get("sieve_ratio"), ".0f", 100), str(row.get("n", 1)),
        acc, _f(row.get("train_flops"), ".4g", 1e-12), _f(row.get("flops_saving"), ".1f", 100),
        _f(row.get("wall_s"), ".1f"), _f(row.get("wall_saving"), ".1f", 100),
        _f(row.get("peak_mem_bytes"), ".1f", 1 / 2**20), _f(row.get("time_to_final_acc_s"), ".1f"),
        _f(row.get("time_to_common_acc_s"), ".1f"),
    ]


def compare_footnotes(rows: list[dict[str, Any]]) -> list[str]:
    """What the wall-clock columns of :func:`format_compare_table` measure, for below the table."""
    refs = sorted({r["dense_ref"] for r in rows if r.get("dense_ref")})
    if refs:
        wall = (f"wall-clock saving %: measured against the dense run {', '.join(f'`{r}`' for r in refs)} in this "
                "table; "
                "FLOPs saving %: the ledger's count against dense training of the same data and epochs.")
    else:
        wall = ("wall-clock saving %: not measured, no dense run (no sparsity, freezing or sieving; same model "
                "and data) in this table. FLOPs saving % is the ledger's count: masked weights are counted as "
                "saved, and how much of that wall-clock realizes depends on the kernels that ran them "
                "(sparsity.kernels, docs/kernels.md), so compare wall-clock with a dense run.")
    out = [wall]
    common = next((r["common_acc"] for r in rows if r.get("common_acc") is not None), None)
    if common is not None:
        out.append(f"s to common acc: training seconds until test accuracy first reached {100 * common:.2f}% (the "
                   "lowest final accuracy here minus 0.5 points); s to final acc: until within 0.5 points of the "
                   "run's own final accuracy; both at the evaluated epochs (train.eval_every).")
    return out


def format_compare_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown pipe table (aligned, so it also reads well in a terminal) of :func:`compare_runs` rows."""
    cells = [list(COMPARE_COLUMNS)] + [compare_row_cells(r) for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(COMPARE_COLUMNS))]

    def line(cs: list[str]) -> str:
        padded = (c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cs, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if j else ":" + "-" * (w + 1) for j, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(c) for c in cells[1:]]) + "\n"
