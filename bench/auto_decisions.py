"""What ``sparsity.kernels: auto`` decides, run by run, on a quiet or a disturbed machine (issue 13).

``auto`` times each masked layer (or fused pair, ``common.Unit``) at its first call and confirms
the decision with a second timing an epoch later (docs/kernels.md "`auto`: decided by
measurement"). This bench starts ``--runs`` fresh MEST trainers one after another (the ViT preset's
model and data at MEST 90% by default, ``sparsity.kernels_calibration=off``, so every run times
afresh) and prints, per run and epoch, the epoch's seconds and every masked layer's choice (``S``
sparse, ``d`` dense, in model order), and each timing's dense ÷ sparse speedup as it is taken.
``--disturb S`` starts a busy process (one pure-Python spin loop, one core) for the first ``S``
seconds of every run, so the first timings fall in a busy moment, as on a shared machine.

    python bench/auto_decisions.py                       # 4 quiet runs, 3 epochs each
    python bench/auto_decisions.py --disturb 3           # a core taken for each run's first 3 s
    python bench/auto_decisions.py --model resnet20 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spfde.sparsity.kernels.execution as ex  # noqa: E402
from end_to_end import settings, variants  # noqa: E402
from spfde.train import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit", choices=("vit", "resnet20"))
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--disturb", type=float, default=0.0, metavar="S",
                    help="seconds of a busy process at the start of each run (default 0: none)")
    args = ap.parse_args()
    common, spfde, path = settings(args.model, 10, 4000, 128)
    cfg = variants(common + [f"train.threads={args.threads}"], spfde, path)["mest/auto"]
    race = ex.race

    def timed(dense, sparse):
        d, s = race(dense, sparse)
        print(f"    timing: dense {d * 1e3:.3f} ms, sparse {s * 1e3:.3f} ms, speedup {d / max(s, 1e-12):.2f}")
        return d, s

    ex.race = timed
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            busy = stop = None
            if args.disturb > 0:
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                stop = threading.Timer(args.disturb, busy.kill)
                stop.start()
            print(f"run {run}" + (f" (a core busy for its first {args.disturb:g} s)" if busy else ""))
            tr = Trainer(cfg, os.path.join(tmp, str(run)), quiet=True)
            for epoch in range(args.epochs):
                t = time.perf_counter()
                tr.train_epoch(epoch)
                choices = "".join("S" if c == "sparse" else "d" for c in tr.ctl.kernels.choices().values())
                print(f"  epoch {epoch}: {time.perf_counter() - t:.3f} s  {choices}")
            if busy is not None:
                stop.cancel()
                busy.kill()
                busy.wait()


if __name__ == "__main__":
    main()
