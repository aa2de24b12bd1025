"""Shared by ``bench/freeze.py`` and ``bench/sieve.py``: train several configs in lock-step, time each epoch.

Every variant is a real :class:`spfde.train.Trainer` (the built-in trainer, controller and loader
a user runs). The variants advance one epoch at a time in turn, and the order rotates each epoch,
so clock drift and other load on this shared machine hit every variant alike; each variant's
wall-clock is the sum of its own ``train_epoch`` times (evaluation and checkpoints excluded, as
in the paper's Tables A11/A12, which time training epochs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from spfde.config import Config, load_config
from spfde.train import Trainer

# A sparse ResNet-20 on Fashion-MNIST, as in the reproduction harness (spfde.reproduce, cpu preset).
BASE = ["data.name=fashion_mnist", "data.augment=false", "model.name=resnet20", "optim.lr=0.1",
        "optim.end_lr=0.0", "optim.weight_decay=5e-4", "train.interval=1", "sparsity.method=mest",
        "sparsity.target=0.9", "freezing.target=0", "sieving.method=none", "sieving.ratio=0",
        "logging.progress=false",
        # freezing's own effect, as the paper times it: frozen blocks still run forward
        # (bench/cache.py measures the activation cache)
        "freezing.cache=off",
        # masked weights on dense kernels, as the paper times them (bench/kernels.py, bench/end_to_end.py)
        "sparsity.kernels=dense"]


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="a smaller setting (a few minutes here)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--subset", type=int, default=None, help="training images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every variant (e.g. model.name=resnet32)")
    ap.add_argument("--json", action="store_true", help="print exactly one JSON object")


def base_overrides(args: argparse.Namespace) -> list[str]:
    epochs = args.epochs or (12 if args.quick else 24)
    subset = args.subset or (2000 if args.quick else 4000)
    out = BASE + [f"train.epochs={epochs}", f"sparsity.search_end={3 * epochs // 4}", f"data.subset={subset}",
                  f"data.batch_size={args.batch_size}", f"train.eval_every={epochs}"]
    if args.threads:
        out.append(f"train.threads={args.threads}")
    return out + list(args.overrides)


def run_lockstep(configs: dict[str, Config], hook: Callable[[str, Trainer], None] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Train every config for its epochs, one epoch each in rotating order; return times and FLOPs."""
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed epoch first, so one-time costs (allocator, kernel selection) hit no variant
        Trainer(next(iter(configs.values())), f"{tmp}/warmup", quiet=True).train_epoch(0)
        trainers = {name: Trainer(cfg, f"{tmp}/{i}", quiet=True) for i, (name, cfg) in enumerate(configs.items())}
        if hook is not None:
            for name, tr in trainers.items():
                hook(name, tr)
        names = list(trainers)
        epochs = max(cfg.train.epochs for cfg in configs.values())
        times: dict[str, list[float]] = {n: [] for n in names}
        # on CUDA, each variant's peak device memory over its training epochs (max_memory_allocated, reset
        # before each epoch, so one variant's peak never shows up in another's)
        peaks: dict[str, int | None] = {n: None for n in names}
        for epoch in range(epochs):
            order = names[epoch % len(names):] + names[: epoch % len(names)]
            for name in order:
                tr = trainers[name]
                if epoch >= tr.cfg.train.epochs:
                    continue
                cuda = tr.device.type == "cuda"
                if cuda:
                    torch.cuda.synchronize(tr.device)
                    torch.cuda.reset_peak_memory_stats(tr.device)
                t0 = time.perf_counter()
                tr.train_epoch(epoch)
                if cuda:
                    torch.cuda.synchronize(tr.device)
                times[name].append(time.perf_counter() - t0)
                if cuda:
                    peaks[name] = max(peaks[name] or 0, int(torch.cuda.max_memory_allocated(tr.device)))
        return {name: {"wall_s": sum(times[name]), "epoch_s": times[name], "peak_mem_bytes": peaks[name],
                       "train_flops": float(tr.ctl.ledger.total_flops), "trainer": tr}
                for name, tr in trainers.items()}


def reductions(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, float]:
    flops = 1.0 - variant["train_flops"] / base["train_flops"]
    wall = 1.0 - variant["wall_s"] / base["wall_s"]
    return {"flops_reduction": round(flops, 4), "wall_reduction": round(wall, 4),
            "efficiency": round(wall / flops, 3) if flops > 0 else None,
            "wall_s": round(variant["wall_s"], 2), "baseline_wall_s": round(base["wall_s"], 2)}


def make_config(overrides: list[str]) -> Config:
    return load_config(None, overrides)


def emit(args: argparse.Namespace, rows: list[dict[str, Any]], cfg: Config, columns: list[tuple[str, str, str]],
         goal: str, **extra: Any) -> None:
    """Print ``{"rows": rows, ...}`` as one JSON object (``--json``) or as a table.

    ``columns``: (header, row key, format) with format ``pct`` (a fraction shown as %), ``ratio``, ``int`` or
    ``str``.
    """
    out = {"rows": rows, "epochs": cfg.train.epochs, "subset": cfg.data.subset, "batch_size": cfg.data.batch_size,
           "model": cfg.model.name, "threads": torch.get_num_threads(), **extra}
    if args.json:
        print(json.dumps(out))
        return

    def cell(v: Any, kind: str) -> str:
        if v is None:
            return "-"
        if kind in ("int", "str"):
            return f"{v}"
        return {"pct": f"{100 * v:.2f}%", "ratio": f"{v:.3f}"}[kind]

    print("".join(f"{h:>13}" for h, _, _ in columns))
    for r in rows:
        print("".join(f"{cell(r.get(k), kind):>13}" for _, k, kind in columns))
    print(f"baseline training wall-clock {rows[0]['baseline_wall_s']:.1f}s; goal: {goal}")
