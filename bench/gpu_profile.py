"""Where a GPU training epoch's time goes: device-busy time against wall-clock (issue 13, GPU).

On a fast GPU, the small models of bench/end_to_end.py are bound by the host (Python, kernel
launches, synchronisations), not by the device's arithmetic: then FLOPs saved on the device are
not felt. This bench trains ResNet-20 (the end-to-end setting) on CUDA for a warm epoch, times
one epoch unprofiled, then one under ``torch.profiler`` and prints, per variant, the wall-clock
per step, the device's busy time (sum of its kernels' time) as a fraction of the profiled
wall-clock, and the host operations that took the most time.

    python bench/gpu_profile.py                      # dense and spfde/dense/off
    python bench/gpu_profile.py --variants dense,mest/dense --top 25
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from end_to_end import settings, variants  # noqa: E402
from spfde.train import Trainer  # noqa: E402


def device_us(event: object) -> float:
    """A GPU kernel's own time; 0 for CPU operations, whose device time repeats their kernels'."""
    if getattr(event, "device_type", None) != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
        return 0.0
    for name in ("self_device_time_total", "self_cuda_time_total"):  # renamed in torch 2.4
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="dense,spfde/dense/off")
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--top", type=int, default=15, help="host operations listed per variant")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_profile.py needs a CUDA device")
    common, spfde, path = settings("resnet20", 12, args.subset, 64)
    configs = variants(common, spfde, path)
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.variants.split(",")):
            tr = Trainer(configs[name], f"{tmp}/{i}", quiet=True)
            tr.train_epoch(0)  # warm: allocator, cuDNN's algorithm choice
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.train_epoch(1)
            torch.cuda.synchronize()
            plain = time.perf_counter() - t0
            steps = len(tr.train_loader)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                tr.train_epoch(2)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            events = prof.key_averages()
            busy = sum(device_us(e) for e in events) / 1e6
            print(f"\n{name}: {steps} steps; unprofiled epoch {plain:.3f} s ({1e3 * plain / steps:.2f} ms/step); "
                  f"profiled {wall:.3f} s, device busy {busy:.3f} s ({100 * busy / wall:.0f}% of it)")
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
