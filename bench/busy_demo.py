"""`make demo` on an idle machine, then with a competitor keeping every core busy (issue 16).

Runs ``spfde demo`` twice in fresh processes with the thread-count default at work (the script
removes ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OMP_WAIT_POLICY`` from their environment, so
the CLI sets its passive wait policy): once alone, once while one busy-loop process per usable
core competes for the CPU, started ``--warmup`` seconds before. Prints both training wall-clocks
(``summary.json``'s ``wall_s``: training epochs only) and the whole command's, the thread count
each run chose, and the busy/idle ratio. Goal: the busy run's training under 2x the idle one's.
``--old-default`` adds a third run, busy again, with ``train.threads`` = one per core and
OpenMP's spinning wait policy (torch's behaviour before issue 16), which is the collapse the
default avoids; it can take many times longer.

    python bench/busy_demo.py --json                       # the real demo: two runs of a few minutes
    python bench/busy_demo.py --set data.subset=1000 --set train.epochs=3 --set sparsity.search_end=2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_demo(out: Path, overrides: list[str], extra_env: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}  # the default rule decides
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "spfde.cli", "demo", "--out", str(out), "--force"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"spfde demo failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    threads_line = next((line for line in proc.stdout.splitlines() if line.startswith("threads ")), "")
    return {"train_wall_s": summary["wall_s"], "command_s": total, "threads": summary.get("threads"),
            "threads_line": threads_line, "final_test_acc": summary.get("final_test_acc")}


def with_competitors(n: int, warmup: float, fn):
    """Run ``fn()`` while ``n`` busy-loop processes keep the cores busy."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(warmup)
        return fn()
    finally:
        for p in busy:
            p.terminate()
        for p in busy:
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/busy_demo", help="run folders go here (default runs/busy_demo)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override passed to spfde demo (e.g. a smaller data.subset for a smoke test)")
    ap.add_argument("--competitors", type=int, default=None, help="busy-loop processes (default: one per core)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds the competitors run before the demo starts")
    ap.add_argument("--old-default", action="store_true",
                    help="also run busy with one thread per core (the former default): slow by design")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    out = Path(args.out)
    n = args.competitors or _cores()
    result = {"cores": _cores(), "competitors": n, "overrides": args.overrides}
    result["idle"] = run_demo(out / "idle", args.overrides)
    result["busy"] = with_competitors(n, args.warmup, lambda: run_demo(out / "busy", args.overrides))
    if args.old_default:
        result["busy_old_default"] = with_competitors(
            n, args.warmup, lambda: run_demo(out / "busy_old", [*args.overrides, f"train.threads={_cores()}"],
                                       {"OMP_WAIT_POLICY": "ACTIVE"}))
    result["ratio"] = result["busy"]["train_wall_s"] / result["idle"]["train_wall_s"]
    result["goal_met"] = result["ratio"] < 2.0
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key in ("idle", "busy", "busy_old_default"):
        if key in result:
            r = result[key]
            print(f"{key:<17} training {r['train_wall_s']:8.1f} s  command {r['command_s']:8.1f} s  "
                  f"{r['threads_line'] or 'threads ?'}")
    print(f"busy / idle training wall-clock: {result['ratio']:.2f}x (goal < 2x: "
          f"{'met' if result['goal_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
