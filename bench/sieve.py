"""Wall-clock savings of circular data sieving versus the FLOPs it saves, and its bookkeeping cost.

The same sparse model (ResNet-20, MEST at 90%, Fashion-MNIST) is trained on the whole set and with
circular sieving at removal ratios 10, 15, 20 and 25% (update ratio 0.3), all five in lock-step
in one process (``bench/lockstep.py``). For each ratio: the ledger's training-FLOPs reduction, the
measured training wall-clock reduction, their ratio (paper Table A12: 0.91-0.98; our goal: >= 0.97)
and the bookkeeping share: time in the forgetting tracker's per-step update plus the per-interval
dataset update, over the run's training time (goal: under 1%).

    python bench/sieve.py --quick           # 12 epochs x 2,000 images: a few minutes on 2 cores
    python bench/sieve.py --json            # 24 epochs x 4,000 images; one JSON object:
            # {"rows": [{"ratio", "flops_reduction", "wall_reduction", "bookkeeping_fraction"}, ...]}
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lockstep import add_args, base_overrides, emit, make_config, reductions, run_lockstep  # noqa: E402

RATIOS = (0.10, 0.15, 0.20, 0.25)
PAPER_A12 = {0.10: 0.0914, 0.15: 0.1438, 0.20: 0.1909, 0.25: 0.2439}


def _timed(fn: Any, acc: list[float]) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[0] += time.perf_counter() - t0
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(ap)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--update-ratio", type=float, default=0.3)
    args = ap.parse_args()
    base = base_overrides(args)
    configs = {"baseline": make_config(base)}
    for p in args.ratios:
        configs[f"sieve{p:g}"] = make_config(base + ["sieving.method=circular", f"sieving.ratio={p}",
                                                      f"sieving.update_ratio={args.update_ratio}"])
    book: dict[str, list[float]] = {name: [0.0] for name in configs}

    def instrument(name: str, trainer: Any) -> None:
        # the two places sieving adds work: per step (sample status) and per interval (the update)
        ctl = trainer.ctl
        ctl.tracker.record = _timed(ctl.tracker.record, book[name])
        ctl.sieve.step_epoch = _timed(ctl.sieve.step_epoch, book[name])

    res = run_lockstep(configs, hook=instrument)
    rows = []
    for p in args.ratios:
        name = f"sieve{p:g}"
        r = reductions(res["baseline"], res[name])
        rows.append({"ratio": p, "flops_reduction": r["flops_reduction"], "wall_reduction": r["wall_reduction"],
                     "bookkeeping_fraction": round(book[name][0] / res[name]["wall_s"], 5),
                     "efficiency": r["efficiency"], "paper_wall_reduction": PAPER_A12.get(round(p, 2)),
                     "wall_s": r["wall_s"], "baseline_wall_s": r["baseline_wall_s"]})
    emit(args, rows, configs["baseline"],
         [("ratio", "ratio", "pct"), ("FLOPs red.", "flops_reduction", "pct"), ("wall red.", "wall_reduction", "pct"),
          ("wall/FLOPs", "efficiency", "ratio"), ("bookkeeping", "bookkeeping_fraction", "pct"),
          ("paper wall", "paper_wall_reduction", "pct")], "wall/FLOPs >= 0.97, bookkeeping < 1%",
         update_ratio=args.update_ratio)


if __name__ == "__main__":
    main()
