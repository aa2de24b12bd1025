"""What a run will cost, without training it: `spfde flops` and `spfde plan`.

The plan uses the same objects as training (model, controller, FLOPs ledger, freezing planner),
built on the dataset's shape alone, so CIFAR-100 or ImageNet configs can be planned on a machine
that does not hold the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spfde.config import Config
from spfde.errors import config_caused, memory_errors


@dataclass(frozen=True)
class DataShape:
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int


_KNOWN = {
    "fashion_mnist": DataShape(10, 1, 28, 60_000),
    "cifar10": DataShape(10, 3, 32, 50_000),
    "cifar100": DataShape(100, 3, 32, 50_000),
    "digits": DataShape(10, 1, 8, 1_500),
}


def data_shape(cfg: Config) -> DataShape:
    """The dataset's shape after the config's options (padding, channels, subset): the published
    dataset's from the table above, else (``data.root`` given, ``imagefolder``) read from the files."""
    d = cfg.data
    if d.name == "synthetic":
        shape = DataShape(d.synthetic_classes, d.channels or 3, d.image_size, d.synthetic_size)
    elif d.name in _KNOWN and d.root is None:  # data.root: the user's own files in that format, read below
        shape = _KNOWN[d.name]
        size = 32 if d.pad_to_32 and shape.image_size < 32 else shape.image_size
        shape = DataShape(shape.num_classes, d.channels or shape.in_channels, size, shape.train_size)
    else:
        from spfde.data import load_datasets

        train, _, info = load_datasets(d, seed=cfg.seed)
        return DataShape(info.num_classes, info.in_channels, info.image_size, len(train))
    if d.subset is not None:
        from spfde.data.datasets import check_subset

        check_subset(d.subset, shape.train_size, d.name)  # the published size: no data is read here
        shape = DataShape(shape.num_classes, shape.in_channels, shape.image_size, d.subset)
    return shape


def planned_run(cfg: Config) -> dict[str, Any]:
    """``{"flops": {...}, "plan": FreezePlan.to_json() or None}`` for a config."""
    from spfde.controller import SpFDE
    from spfde.models import create_model, resolve_model

    resolve_model(cfg.model.name, cfg.model.kwargs)  # a bad model fails before an ImageFolder is read
    shape = data_shape(cfg)
    torch.manual_seed(cfg.seed)
    with memory_errors(at_start=True), config_caused():  # every input below comes from the config
        model = create_model(cfg.model.name, num_classes=shape.num_classes, in_channels=shape.in_channels,
                             width=cfg.model.width, **cfg.model.kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
        x = torch.zeros(1, shape.in_channels, shape.image_size, shape.image_size)
        ctl = SpFDE(model, opt, cfg, train_size=shape.train_size, example_input=x)
    plan = ctl.plan
    # the cache is assumed only where the run must use it (`on`); `auto` decides at run time
    flops = ctl.planned_flops(with_cache=cfg.freezing.cache == "on")
    if plan is None:
        return {"flops": flops, "plan": None}
    from spfde.accounting.flops import forward_flops_summary

    # the per-sample forward by kind, so the plan shows what Algorithm 1's BpFlops were made of
    return {"flops": flops, "plan": {**plan.to_json(),
                                     **forward_flops_summary(ctl.layer_flops, ctl.other_forward_flops)}}
