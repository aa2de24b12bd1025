"""Per-step overhead of the SpFDE controller: a dense training step with and without it.

One model, one optimizer, one process. The controller runs with ``sparsity.method: dense``, no
freezing and no sieving, so the work it adds is only its own bookkeeping per step (gradient-mask
hook, sample-status tracking, the FLOPs ledger, the per-step cosine learning rate). Timed steps
alternate between the plain loop and the loop with ``ctl.before_step()`` / ``ctl.after_step()``
in short interleaved rounds, so clock drift and neighbours' load hit both alike; the ratio is
the median controlled step over the median plain step. Goal: ratio <= 1.03.

    python bench/overhead.py                  # table
    python bench/overhead.py --json           # exactly one JSON object: {"ratio": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from spfde import SpFDE


def make_model(name: str) -> nn.Module:
    from spfde.models import create_model

    return create_model(name, num_classes=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    ap.add_argument("--round", type=int, default=2, help="consecutive steps of one mode per round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    model = make_model(args.model).to(device)
    g = torch.Generator().manual_seed(1)
    n = args.batch_size * 8
    data_x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    data_y = torch.randint(0, 10, (n,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    cfg = {"train": {"epochs": 10, "interval": 5}, "sparsity": {"method": "dense"},
           "freezing": {"target": 0.0}, "sieving": {"method": "none"}}
    ctl = SpFDE(model, opt, cfg, train_size=n, example_input=data_x[:2])
    ctl.start_epoch(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()

    def step(i: int, controlled: bool) -> float:
        lo = (i * args.batch_size) % n
        idx = torch.arange(lo, lo + args.batch_size)
        x, y = data_x[lo:lo + args.batch_size], data_y[lo:lo + args.batch_size]
        sync()
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if controlled:
            ctl.before_step()
        opt.step()
        if controlled:
            ctl.after_step(logits, y, idx)
        sync()
        return time.perf_counter() - t0

    for i in range(args.warmup):
        step(i, i % 2 == 1)
    times: dict[bool, list[float]] = {False: [], True: []}
    i, r = 0, 0
    while min(len(v) for v in times.values()) < args.steps:
        # alternate which mode goes first in each round, so neither always follows the other
        for mode in ((False, True) if r % 2 == 0 else (True, False)):
            for _ in range(args.round):
                times[mode].append(step(i, mode))
                i += 1
        r += 1
    plain, ctl_t = statistics.median(times[False]), statistics.median(times[True])
    ratio = ctl_t / plain
    # the controller's own per-step cost, measured alone (no forward/backward around it)
    t0 = time.perf_counter()
    reps = 200
    logits = torch.zeros(args.batch_size, 10, device=device)
    y = data_y[: args.batch_size]
    idx = torch.arange(args.batch_size)
    for _ in range(reps):
        ctl.before_step()
        ctl.after_step(logits, y, idx)
    sync()
    ctl_us = (time.perf_counter() - t0) / reps * 1e6
    ctl.end_epoch()
    result = {"ratio": round(ratio, 4), "plain_step_ms": round(plain * 1e3, 3),
              "controlled_step_ms": round(ctl_t * 1e3, 3), "controller_us_per_step": round(ctl_us, 1),
              "model": args.model, "batch_size": args.batch_size, "steps": args.steps, "device": str(device),
              "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'model':<12}{'batch':>6}{'plain ms':>11}{'with ctl ms':>13}{'ratio':>8}{'ctl us/step':>13}")
    print(f"{args.model:<12}{args.batch_size:>6}{plain * 1e3:>11.2f}{ctl_t * 1e3:>13.2f}{ratio:>8.4f}"
          f"{ctl_us:>13.1f}")
    print("goal: ratio <= 1.03")


if __name__ == "__main__":
    main()
