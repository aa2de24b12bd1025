"""Training memory of SpFDE against the same sparse run without freezing (paper Section 5.2, Fig. 4).

The analytic memory model (``spfde.accounting.memory``): fp32 weights (sparse ones CSR-like),
activations kept for backward, weight gradients, optimizer state and the activation-gradient
working set, for one batch size, over the whole freezing timeline of a config. "DST" is the same
masks with nothing frozen (the paper's "DST methods Min."), "Avg." and "Min." are SpFDE's average
and minimum over training. No training is run: masks are at the final sparsity s.

    python bench/memory.py                              # Fig. 4: ResNet-32 2x, CIFAR-100 shape, batch 64
    python bench/memory.py --json
    python bench/memory.py --config fmnist-demo --batch-size 128 --sparsity 0.9
"""

from __future__ import annotations

import argparse
import json

import torch

from spfde.accounting.memory import memory_model, memory_timeline
from spfde.config import load_config
from spfde.controller import SpFDE
from spfde.models import create_model
from spfde.planning import data_shape
from spfde.sparsity import keep_count

MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="cifar100-resnet32x2")
    ap.add_argument("--batch-size", type=int, default=64, help="Fig. 4 uses 64")
    ap.add_argument("--freeze", type=float, default=0.2, help="freezing.target")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for s in args.sparsity:
        cfg = load_config(args.config, [f"sparsity.target={s}", "sieving.ratio=0", f"freezing.target={args.freeze}",
                                        f"data.batch_size={args.batch_size}"])
        shape = data_shape(cfg)
        torch.manual_seed(0)
        model = create_model(cfg.model.name, num_classes=shape.num_classes, in_channels=shape.in_channels,
                             width=cfg.model.width)
        x = torch.zeros(1, shape.in_channels, shape.image_size, shape.image_size)
        ctl = SpFDE(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), cfg,
                    train_size=shape.train_size, example_input=x)
        masks = {}  # at the final sparsity s (the bytes depend on the count, not the pattern)
        for lay in ctl.sparsity.masked_layers:
            flat = torch.zeros(lay.numel, dtype=torch.bool)
            flat[: keep_count(lay.numel, ctl.sparsity.target[lay.module])] = True
            masks[lay.param] = flat.view(lay.shape)
        timeline = memory_timeline(model, x, args.batch_size, ctl.blocks, ctl.plan, cfg.train.epochs, masks=masks)
        dst = memory_model(model, x, args.batch_size, masks=masks)["total"]
        dense = memory_model(model, x, args.batch_size, masks=None)["total"]
        rows.append({"sparsity": s, "dense_bytes": dense, "dst_bytes": dst, "spfde_avg_bytes": timeline["avg"],
                     "spfde_min_bytes": timeline["min"], "avg_saving": 1 - timeline["avg"] / dst,
                     "min_saving": 1 - timeline["min"] / dst, "tfrz": ctl.plan.tfrz if ctl.plan else None})
    if args.json:
        print(json.dumps({"config": args.config, "batch_size": args.batch_size, "freeze": args.freeze, "rows": rows}))
        return
    print(f"{args.config}, batch {args.batch_size}, freezing {100 * args.freeze:.0f}%")
    print(f"{'sparsity':>9}{'dense MiB':>11}{'DST MiB':>9}{'SpFDE avg':>18}{'SpFDE min':>18}{'Tfrz':>6}")
    for r in rows:
        print(f"{100 * r['sparsity']:>8.0f}%{r['dense_bytes'] / MIB:>11.1f}{r['dst_bytes'] / MIB:>9.1f}"
              f"{r['spfde_avg_bytes'] / MIB:>9.1f} ({100 * r['avg_saving']:4.1f}%)"
              f"{r['spfde_min_bytes'] / MIB:>9.1f} ({100 * r['min_saving']:4.1f}%){str(r['tfrz']):>6}")


if __name__ == "__main__":
    main()
