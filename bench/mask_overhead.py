"""Per-step cost of sparse masking: masked sparse training step vs the same dense step.

Both loops run the same model (ResNet-20 from spfde.models, else a small conv net), batch of
random 32x32 images, SGD with momentum and weight decay, in the same process. The sparse loop
adds ``engine.before_step()`` / ``engine.after_step(opt)`` around ``optimizer.step()`` with 90 %
masks (mest / set). Timed steps are interleaved in rounds (dense, sparse, dense, ...) so clock
drift and neighbours' load hit both alike. Goal: ratio <= 1.03.

    python bench/mask_overhead.py                # table
    python bench/mask_overhead.py --json         # exactly one JSON object: {"ratio": ..., ...}
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

from spfde.config import from_dict
from spfde.sparsity import build_sparsity


def make_model(name: str) -> tuple[nn.Module, str]:
    try:
        from spfde.models import create_model

        return create_model(name, num_classes=10), name
    except Exception:  # noqa: BLE001 - fall back to a plain conv net when the zoo is unavailable
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
        return net, "convnet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--methods", default="mest,set", help="comma-separated sparse methods to time")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per mode")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds the timed steps are split into")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    base, model_name = make_model(args.model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    methods = [m for m in args.methods.split(",") if m]

    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, object]] = {}
    for mode in ["dense", *methods]:
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        engine = None
        if mode != "dense":
            cfg = from_dict({"sparsity": {"method": mode, "target": args.sparsity}})
            engine = build_sparsity(model, cfg, example_input=x[:1])
            engine.apply_masks()
            engine.update(0)
        runs[mode] = (model, opt, engine)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(mode: str) -> None:
        model, opt, engine = runs[mode]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if engine is not None:
            engine.before_step()
        opt.step()
        if engine is not None:
            engine.after_step(opt)

    for mode in runs:
        for _ in range(args.warmup):
            step(mode)
    sync()
    elapsed = dict.fromkeys(runs, 0.0)
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for mode in runs:
            sync()
            t0 = time.perf_counter()
            for _ in range(per_round):
                step(mode)
            sync()
            elapsed[mode] += time.perf_counter() - t0
    n = per_round * args.rounds
    ms = {m: 1e3 * t / n for m, t in elapsed.items()}
    ratios = {m: ms[m] / ms["dense"] for m in methods}
    density = {m: runs[m][2].density() for m in methods}
    result = {
        "ratio": max(ratios.values()) if ratios else 1.0,
        "ratios": ratios,
        "step_ms": ms,
        "density": density,
        "model": model_name,
        "device": str(device),
        "batch_size": args.batch_size,
        "timed_steps": n,
        "sparsity": args.sparsity,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"mask overhead: {model_name} on {device}, batch {args.batch_size}, {n} timed steps per mode")
    print(f"{'mode':<8} {'density':>8} {'step ms':>9} {'ratio':>7}")
    print(f"{'dense':<8} {1.0:>8.3f} {ms['dense']:>9.2f} {1.0:>7.3f}")
    for m in methods:
        print(f"{m:<8} {density[m]:>8.3f} {ms[m]:>9.2f} {ratios[m]:>7.3f}")
    print(f"worst ratio {result['ratio']:.3f} (goal <= 1.03)")


if __name__ == "__main__":
    main()
