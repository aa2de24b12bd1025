"""`spfde reproduce NAME`: run the grid behind one of the paper's tables, write ours beside theirs.

Presets:

* ``paper``: the paper's exact setting (CIFAR-100, ResNet-32 2x, 160 epochs, Table A3). Needs
  the data (``--set data.root=...``) and a GPU to be practical.
* ``cpu``: a scaled setting that runs on a 2-core CPU in about a minute per run: Fashion-MNIST
  (2,000 training images, class-stratified from the seed; the full 10,000-image test set),
  ResNet-20, batch 64, 24 epochs.
  **Scaling rule**: keep the *shape* of the paper's schedule, not its length. The paper has
  T/Δτ = 160/5 = 32 structure/data/freezing updates; we keep Δτ = 1 epoch (the finest grid the
  epoch-level controller has) and T = 24, so 24 updates, and every epoch-valued setting keeps its
  fraction of training: ``search_end`` = 0.75 (a fraction of ``train.epochs``: 18 of 24; Table
  A3: 120 of 160, so ``--set train.epochs=N`` keeps the shape), Tfrz from the ``auto`` rule on the
  Δτ grid (our values beside Table A4's in ``docs/freezing.md``), sieving update ratio 0.3
  (Table A2). The training set is cut so that T × N stays at 48,000 images.

Both presets prune the convolutions only, as the paper does (Section 5: "uniform unstructured
sparsity across all the convolutional layers while only keeping the first layer dense"): the
classifier stays dense (``sparsity.dense_last_layer``, the default). Pruning a 64×10 head to 90%
lets per-layer SNIP keep weights for only 4 of 10 classes, which sinks that baseline to about 50%.

Every other setting is the library's default, which follows the paper or the method's public code
(docs/sparsity.md, docs/freezing.md, docs/sieving.md): MEST importance |w| (λ = 0), growth from all
zeros, Algorithm 1's planner, prune-before-freeze, Appendix B's periodic groups, forgetting counts
within each Δτ interval.

Runs are shared between tables: each distinct (settings, seed) pair lives once in
``OUT/runs-PRESET/<hash>_seed<k>`` (its overrides beside it in ``<hash>_seed<k>.json``), so the
MEST baseline that Table 2, A1, A8 and A11 all need is trained once. A run whose ``summary.json``
exists (and is intact) is skipped, so an interrupted sweep resumes where it stopped (a half-finished
run, or a finished one whose ``summary.json`` is damaged, is resumed from its checkpoint). The
table is written to ``OUT/NAME-PRESET/table.md`` (and ``table.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spfde.config import load_config
from spfde.errors import SpfdeError
from spfde.report.runs import finished_summary


@dataclass
class RunSpec:
    run_id: str
    label: str                      # row label in the table
    column: str                     # column label in the table
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: float | None = None      # the paper's accuracy for this cell (%)
    paper_speedup: float | None = None  # Tables A11/A12: the paper's epoch-time reduction (%)


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "data.name": "fashion_mnist", "data.subset": 2000, "data.batch_size": 64, "data.augment": False,
        "model.name": "resnet20", "model.width": 1.0, "optim.lr": 0.1, "optim.end_lr": 0.0,
        "optim.weight_decay": 5e-4, "train.epochs": 24, "train.interval": 1, "train.eval_every": 12,
        "sparsity.search_end": 0.75, "logging.progress": False,
        "freezing.cache": "off",  # the paper's accounting: frozen blocks pay their forward (Section 4.2.1)
        "sparsity.kernels": "dense",  # timing-free kernel choice: a rerun of a table is bit-identical
    },
    "paper": {
        "data.name": "cifar100", "data.batch_size": 32, "data.augment": True, "model.name": "resnet32",
        "model.width": 2.0, "optim.lr": 0.15, "optim.end_lr": 4e-8, "optim.weight_decay": 1e-4,
        "train.epochs": 160, "train.interval": 5, "sparsity.search_end": 0.75, "logging.progress": False,
        "freezing.cache": "off", "sparsity.kernels": "dense",
    },
}

_OFF = {"freezing.target": 0.0, "sieving.ratio": 0.0, "sieving.method": "none"}


def _spfde(x: float, y: float) -> dict[str, Any]:
    return {"freezing.target": x, "sieving.method": "circular", "sieving.ratio": y}


def _table2(sparsities: tuple[float, ...] = (0.9, 0.95, 0.98)) -> list[RunSpec]:
    paper = {
        "MEST": (71.30, 70.36, 67.16), "SpFDE 15%+15%": (71.35, 70.43, 67.04),
        "SpFDE 20%+20%": (71.25, 70.14, 66.37), "SpFDE 25%+25%": (71.02, 69.48, 65.04),
        "SET": (69.66, 67.41, 62.25), "static (SNIP)": (68.89, 65.22, 54.81),
    }
    rows = {
        "MEST": {"sparsity.method": "mest", **_OFF},
        "SpFDE 15%+15%": {"sparsity.method": "mest", **_spfde(0.15, 0.15)},
        "SpFDE 20%+20%": {"sparsity.method": "mest", **_spfde(0.20, 0.20)},
        "SpFDE 25%+25%": {"sparsity.method": "mest", **_spfde(0.25, 0.25)},
        "SET": {"sparsity.method": "set", **_OFF},
        "static (SNIP)": {"sparsity.method": "static", "sparsity.static_init": "snip", **_OFF},
    }
    ids = {"MEST": "mest", "SpFDE 15%+15%": "spfde15", "SpFDE 20%+20%": "spfde20", "SpFDE 25%+25%": "spfde25",
           "SET": "set", "static (SNIP)": "snip"}
    all_s = (0.9, 0.95, 0.98)
    specs = []
    for label, ov in rows.items():
        for s in sparsities:
            specs.append(RunSpec(f"{ids[label]}_s{round(s * 100)}", label, f"{round(s * 100)}%",
                                 {**ov, "sparsity.target": s}, paper[label][all_s.index(s)]))
    return specs


def _tableA1() -> list[RunSpec]:
    paper = {"Non-Freeze": 71.28, "single_shot": 71.30, "single_shot_resume": 71.21,
             "periodic": 70.86, "delayed_periodic": 70.95}
    specs = [RunSpec("nofreeze", "Non-Freeze", "90%", {"sparsity.target": 0.9, **_OFF}, paper["Non-Freeze"])]
    for scheme in ("single_shot", "single_shot_resume", "periodic", "delayed_periodic"):
        specs.append(RunSpec(scheme, scheme, "90%", {"sparsity.target": 0.9, **_OFF, "freezing.target": 0.2,
                                                     "freezing.scheme": scheme}, paper[scheme]))
    return specs


def _tableA2() -> list[RunSpec]:
    paper = {0.1: 70.69, 0.2: 71.03, 0.3: 71.25, 0.5: 70.86}
    return [RunSpec(f"update{int(r * 100)}", "remove 20%", f"{int(r * 100)}%",
                    {"sparsity.target": 0.9, **_spfde(0.2, 0.2), "sieving.update_ratio": r}, paper[r])
            for r in (0.1, 0.2, 0.3, 0.5)]


def _tableA8_A10() -> list[RunSpec]:
    """Freezing alone, sieving alone, and both at similar FLOPs reductions (Tables A8, A9, A10).

    The paper's A8/A9 rows run 10-35%; we keep 20 (the A8/A9 trend from "none"), 27.5 and 35 (the
    two A10 comparisons), which keeps the 3-seed grid inside an hour on 2 cores.
    """
    a8 = {0.2: 71.29, 0.275: 71.08, 0.35: 70.26}
    a9 = {0.2: 71.33, 0.275: 71.09, 0.35: 70.59}
    specs = [RunSpec("none", "none", "0%", {"sparsity.target": 0.9, **_OFF}, 71.30)]
    for r, acc in a8.items():
        specs.append(RunSpec(f"freeze{r * 100:g}", "freeze only", f"{r * 100:g}%",
                             {"sparsity.target": 0.9, **_OFF, "freezing.target": r}, acc))
    for r, acc in a9.items():
        specs.append(RunSpec(f"sieve{r * 100:g}", "sieve only", f"{r * 100:g}%",
                             {"sparsity.target": 0.9, **_OFF, "sieving.method": "circular", "sieving.ratio": r}, acc))
    specs.append(RunSpec("both15", "freeze + sieve", "15%+15%", {"sparsity.target": 0.9, **_spfde(0.15, 0.15)}, 71.35))
    specs.append(RunSpec("both20", "freeze + sieve", "20%+20%", {"sparsity.target": 0.9, **_spfde(0.2, 0.2)}, 71.25))
    return specs


def _tableA11_A12() -> list[RunSpec]:
    """Wall-clock (Tables A11, A12). Run with ``--jobs 1``: parallel runs share the cores. The
    lock-step benches (``bench/freeze.py``, ``bench/sieve.py``) measure the same more tightly."""
    a11 = {0.1: 8.93, 0.15: 13.66, 0.2: 18.83, 0.25: 23.67}
    a12 = {0.1: 9.14, 0.15: 14.38, 0.2: 19.09, 0.25: 24.39}
    specs = [RunSpec("baseline", "baseline", "0%", {"sparsity.target": 0.9, **_OFF})]
    for r in (0.1, 0.15, 0.2, 0.25):
        specs.append(RunSpec(f"freeze{int(r * 100)}", "freeze", f"{int(r * 100)}%",
                             {"sparsity.target": 0.9, **_OFF, "freezing.target": r}, paper_speedup=a11[r]))
        specs.append(RunSpec(f"sieve{int(r * 100)}", "sieve", f"{int(r * 100)}%",
                             {"sparsity.target": 0.9, **_OFF, "sieving.method": "circular", "sieving.ratio": r},
                             paper_speedup=a12[r]))
    return specs


TABLES = {
    "table2": _table2,
    "table2-90": lambda: _table2((0.9,)),
    # Section 5.1's headline at 90%: SpFDE 20%+20% against the same MEST run without freezing/sieving
    "headline": lambda: [r for r in _table2((0.9,)) if r.label in ("MEST", "SpFDE 20%+20%")],
    "tableA1": _tableA1,
    "tableA2": _tableA2,
    "tableA8-A10": _tableA8_A10,
    "tableA11-A12": _tableA11_A12,
}

#: one line per table for `spfde reproduce --help`
TABLE_HELP = {
    "table2": "MEST, SET, static (SNIP) and SpFDE 15/20/25% at 90/95/98% sparsity (Table 2)",
    "table2-90": "Table 2 at 90% sparsity only",
    "headline": "Section 5.1's headline: SpFDE 20%+20% against the same MEST run at 90%",
    "tableA1": "the four freezing schemes against no freezing (Table A1)",
    "tableA2": "sieving update ratio 10-50% (Table A2)",
    "tableA8-A10": "freezing alone, sieving alone and both at similar FLOPs reductions (Tables A8-A10)",
    "tableA11-A12": "wall-clock of freezing and sieving 10-25% (Tables A11, A12); run with --jobs 1",
}


def grid(name: str, preset: str, seeds: int) -> list[tuple[RunSpec, int, list[str]]]:
    if name not in TABLES:
        raise SpfdeError(f"unknown table {name!r}; choose one of: {', '.join(TABLES)}")
    if preset not in PRESETS:
        raise SpfdeError(f"unknown preset {preset!r}; choose cpu or paper")
    if seeds < 1:
        raise SpfdeError("--seeds must be at least 1")
    out = []
    for spec in TABLES[name]():
        for seed in range(seeds):
            ov = {**PRESETS[preset], "sparsity.method": "mest", **spec.overrides, "seed": seed}
            out.append((spec, seed, [f"{k}={json.dumps(v)}" for k, v in ov.items()]))
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "layer_overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_dir(out: Path, preset: str, overrides: list[str]) -> Path:
    """Where the run with these ``--set`` overrides lives: one folder per distinct resolved setting and seed.

    The key hashes the settings that differ from the defaults after resolving the config, so
    ``freezing.scheme=single_shot`` and no ``freezing.scheme`` at all are the same run, and a config
    key added later (with a default) leaves every finished run where it was. ``train.threads`` and
    progress bars are not part of it.
    """
    cfg = _flat(load_config(None, overrides).to_dict())
    default = _flat(load_config(None, []).to_dict())
    seed = cfg.pop("seed")
    for k in ("train.threads", "logging.progress"):
        cfg.pop(k, None)
    diff = sorted((k, v) for k, v in cfg.items() if v != default.get(k))
    key = hashlib.sha256(json.dumps(diff).encode()).hexdigest()[:12]
    return out / f"runs-{preset}" / f"{key}_seed{seed}"


def _run_one(run: Path, overrides: list[str], threads: int) -> subprocess.Popen:
    from spfde.utils import atomic_write_text  # here, not at the top: `spfde --help` lists TABLES without torch

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if (run / "config.yaml").exists():
        cmd = [sys.executable, "-m", "spfde.cli", "train", "--resume", str(run), "--quiet"]
    else:
        run.parent.mkdir(parents=True, exist_ok=True)
        base_cfg = run.parent / "base.yaml"  # every setting comes from the overrides
        if not base_cfg.exists():
            atomic_write_text(base_cfg, "# spfde reproduce: each run's settings are the --set overrides in "
                                        "<run>.json\n{}\n")
        atomic_write_text(run.with_suffix(".json"), json.dumps({"overrides": overrides}, indent=1))
        cmd = [sys.executable, "-m", "spfde.cli", "train", "--config", str(base_cfg), "--out", str(run),
               "--quiet", "--force"]
        for o in overrides:
            cmd += ["--set", o]
        if not any(o.startswith("train.threads=") for o in overrides):
            cmd += ["--set", f"train.threads={threads}"]
    log = open(run.with_suffix(".log"), "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def reproduce(name: str, preset: str = "cpu", seeds: int = 3, jobs: int = 1, out: Path = Path("runs/reproduce"),
              dry_run: bool = False, overrides: list[str] | None = None, only: str | None = None) -> Path | None:
    """Train the runs of table ``name`` not finished yet (``only``: a regex on row ids), then write the table."""
    if jobs < 1:  # no slot would ever start a run: the loop below would wait forever
        raise SpfdeError(f"--jobs must be at least 1, got {jobs}")
    extra = list(overrides or [])
    runs = [(spec, seed, ov + extra) for spec, seed, ov in grid(name, preset, seeds)]
    if only is not None:
        try:
            pattern = re.compile(only)
        except re.error as e:
            raise SpfdeError(f"--only {only!r} is not a valid regular expression: {e}") from None
        runs = [r for r in runs if pattern.search(r[0].run_id)]
        if not runs:
            ids = sorted({spec.run_id for spec in TABLES[name]()})
            raise SpfdeError(f"--only {only!r} matches no row of {name}; its rows: {', '.join(ids)}")
    todo: dict[Path, tuple[RunSpec, int, list[str]]] = {}
    for spec, seed, ov in runs:
        run = run_dir(out, preset, ov)
        if finished_summary(run) is None:
            todo.setdefault(run, (spec, seed, ov))  # two cells of one table may be the same run
    distinct = len({run_dir(out, preset, ov) for _, _, ov in runs})
    print(f"{name} ({preset}): {distinct} distinct runs, {distinct - len(todo)} already finished, {len(todo)} to go")
    if dry_run:
        for run, (spec, seed, ov) in todo.items():
            print(f"  {spec.run_id} seed {seed} -> {run}: {' '.join(ov)}")
        return None
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: list[tuple[Path, str, subprocess.Popen, float]] = []
    failed = []
    queue = list(todo.items())
    t_start = time.time()
    while queue or running:
        while queue and len(running) < jobs:
            run, (spec, seed, ov) = queue.pop(0)
            running.append((run, f"{spec.run_id}_seed{seed}", _run_one(run, ov, threads), time.time()))
        time.sleep(0.5)
        for item in list(running):
            run, label, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {run}.log)"
                if proc.returncode != 0:
                    failed.append(label)
                print(f"  {label}: {status} in {time.time() - t0:.0f}s", flush=True)
    if todo:
        print(f"{len(todo)} run(s) in {time.time() - t_start:.0f}s with --jobs {jobs}")
    path = write_table(name, preset, seeds, out, extra)
    if failed:
        raise SpfdeError(f"{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry")
    return path


def _mean(values: Any) -> float | None:
    """The mean of the values that are there (a summary written before a field existed lacks it)."""
    import statistics

    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def collect(name: str, preset: str, seeds: int, out: Path, extra: list[str] | None = None) -> list[dict[str, Any]]:
    import statistics

    rows = []
    by_spec: dict[str, list[dict[str, Any]]] = {}
    for spec, _seed, ov in grid(name, preset, seeds):
        summary = finished_summary(run_dir(out, preset, ov + list(extra or [])))
        if summary is not None:
            by_spec.setdefault(spec.run_id, []).append(summary)
    for spec in TABLES[name]():
        sums = by_spec.get(spec.run_id, [])
        accs = [100 * s["final_test_acc"] for s in sums if s.get("final_test_acc") is not None]
        rows.append({
            "label": spec.label, "column": spec.column, "run_id": spec.run_id, "n": len(accs),
            "acc_mean": statistics.fmean(accs) if accs else None,
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0 if accs else None,
            "train_flops": _mean(s.get("train_flops") for s in sums),
            "flops_saving": _mean(s.get("flops_saving") for s in sums),
            "wall_s": _mean(s.get("wall_s") for s in sums),
            "paper_acc": spec.paper,
            "paper_speedup": spec.paper_speedup,
        })
    return rows


def write_table(name: str, preset: str, seeds: int, out: Path, extra: list[str] | None = None) -> Path:
    from spfde.utils import atomic_write_text

    rows = collect(name, preset, seeds, out, extra)
    ref = {r["column"]: r for r in rows if r["label"] in ("MEST", "none", "Non-Freeze", "baseline")}
    lines = [f"### {name} ({preset} preset, {seeds} seed(s))", "",
             ("| setting | column | ours: acc (%) | FLOPs (×1e12) | FLOPs saved vs. ref | wall-clock (s) "
              "| wall-clock saved vs. ref | paper acc (%) |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "—" if r["acc_mean"] is None else f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f} (n={r['n']})"
        fl = "—" if r["train_flops"] is None else f"{r['train_flops'] / 1e12:.3f}"
        base_row = ref.get(r["column"]) or (rows[0] if rows else None)
        rel = "—"
        if r["train_flops"] and base_row and base_row["train_flops"]:
            rel = f"{100 * (1 - r['train_flops'] / base_row['train_flops']):+.1f}% saved"
        wall = "—" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        wall_rel = "—"
        if r["wall_s"] and base_row and base_row["wall_s"]:
            wall_rel = f"{100 * (1 - r['wall_s'] / base_row['wall_s']):+.1f}%"
            if r.get("paper_speedup") is not None:
                wall_rel += f" (paper {r['paper_speedup']:.2f}%)"
        paper = "—" if r["paper_acc"] is None else f"{r['paper_acc']:.2f}"
        lines.append(f"| {r['label']} | {r['column']} | {acc} | {fl} | {rel} | {wall} | {wall_rel} | {paper} |")
    base = out / f"{name}-{preset}"
    base.mkdir(parents=True, exist_ok=True)
    path = base / "table.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_text(base / "table.json", json.dumps(rows, indent=2))
    return path
