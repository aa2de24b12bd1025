"""What ``sparsity.kernels: auto`` measures: its own timing of each masked layer, on a slice of the
batch and on the whole batch, repeated in one process (issue 13, docs/kernels.md).

``auto`` decides per layer from ``_Layer.time`` (dense vs sparse forward + backward, interleaved
repetitions, best times). A large batch is timed on its first ``TIME_MAX_BATCH`` samples unless the
whole call is at most ``TIME_WHOLE_MACS`` multiply-adds. This bench trains one epoch of a real
``Trainer`` (the ViT preset's model and data at MEST 90%, or ResNet-20), captures each masked
layer's real training input, then runs that exact timing many times, alternating the two rules
repetition by repetition: ``slice`` (the batch cut to ``TIME_MAX_BATCH`` samples) and ``whole``.
It prints per layer the median dense/sparse speedup each rule measured (> 1: sparse faster) and
the spread, so a bias of the rule shows as a gap between the columns larger than their spread.

    python bench/auto_timing.py                  # ViT preset, 2 threads, 8 repetitions
    python bench/auto_timing.py --model resnet20 --reps 5
    python bench/auto_timing.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import spfde.sparsity.kernels.execution as ex  # noqa: E402
from end_to_end import settings  # noqa: E402
from lockstep import make_config  # noqa: E402
from spfde.config import load_config  # noqa: E402
from spfde.train import Trainer  # noqa: E402


def capture_inputs(tr: Trainer) -> dict[str, tuple[Any, tuple, dict]]:
    """Each masked layer's ``(layer, args, kwargs)`` of one real training forward."""
    seen: dict[str, tuple[Any, tuple, dict]] = {}
    for layer in tr.ctl.kernels.layers.values():
        def call(*args: Any, _layer=layer, **kwargs: Any) -> Any:
            seen.setdefault(_layer.name, (_layer, args, kwargs))
            return _layer(*args, **kwargs)
        layer.module._spfde_kernel = call
    x, _, _ = next(iter(tr.train_loader))
    tr.model.train()
    tr.model(x.to(tr.device))
    for layer in tr.ctl.kernels.layers.values():
        layer.module._spfde_kernel = layer
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("vit", "resnet20"), default="vit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=8, help="timings per layer and rule")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    batch = 128 if args.model == "vit" else 64
    common, _, path = settings(args.model, 1, 1024, batch)
    common += [f"train.threads={args.threads}", "sparsity.kernels=auto"]
    cfg = load_config(path, common) if path else make_config(common)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp, quiet=True)
        tr.train_epoch(0)
        seen = capture_inputs(tr)
    rules = {"slice": 0, "whole": 1 << 62}  # TIME_WHOLE_MACS for each rule
    speedups: dict[str, dict[str, list[float]]] = {name: {r: [] for r in rules} for name in seen}
    saved = ex.TIME_WHOLE_MACS
    try:
        for _ in range(args.reps):
            for rule, whole in rules.items():
                ex.TIME_WHOLE_MACS = whole
                for name, (layer, a, k) in seen.items():
                    x = layer._input(a, k)
                    td, ts = layer.time(layer.call_key(x), x, a, k)
                    speedups[name][rule].append(td / ts)
    finally:
        ex.TIME_WHOLE_MACS = saved
    rows = []
    for name, by_rule in speedups.items():
        layer, a, k = seen[name]
        x = layer._input(a, k)
        row: dict[str, Any] = {"layer": name, "input": list(x.shape), "macs": layer.macs(x),
                               "timed_whole_by_default": not layer.sliced(x)}
        for rule, vals in by_rule.items():
            row[rule] = round(statistics.median(vals), 3)
            row[f"{rule}_range"] = [round(min(vals), 3), round(max(vals), 3)]
        rows.append(row)
    out = {"model": args.model, "threads": torch.get_num_threads(), "reps": args.reps,
           "time_max_batch": ex.TIME_MAX_BATCH, "time_whole_macs": ex.TIME_WHOLE_MACS, "rows": rows}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.model}, {out['threads']} threads, {args.reps} timings per layer and rule "
          f"(slice: first {ex.TIME_MAX_BATCH} samples); dense/sparse speedup, median (range)")
    print(f"{'layer':<32}{'input':>16}{'M MACs':>8}{'slice':>20}{'whole':>20}  default")
    for r in rows:
        cell = {rule: f"{r[rule]:.2f} ({r[rule + '_range'][0]:.2f}-{r[rule + '_range'][1]:.2f})" for rule in rules}
        print(f"{r['layer']:<32}{str(tuple(r['input'])):>16}{r['macs'] / 1e6:>8.1f}{cell['slice']:>20}"
              f"{cell['whole']:>20}  {'whole' if r['timed_whole_by_default'] else 'slice'}")


if __name__ == "__main__":
    main()
