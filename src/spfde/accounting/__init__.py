"""Cost accounting: the training-FLOPs ledger (:mod:`spfde.accounting.flops`) and the training
memory model (:mod:`spfde.accounting.memory`).

Kept light on purpose: submodules are imported on first use, so importing one never drags in
the other (``from spfde.accounting.flops import FlopsLedger``).
"""

from __future__ import annotations

import importlib
from typing import Any

_FLOPS = ("FlopsLedger", "bp_flops", "dense_train_flops", "forward_flops_breakdown", "forward_flops_summary",
          "layer_forward_flops",
          "per_sample_flops", "planned_flops")

__all__ = list(_FLOPS)


def __getattr__(name: str) -> Any:
    if name in _FLOPS:
        return getattr(importlib.import_module("spfde.accounting.flops"), name)
    if name in ("flops", "memory"):
        return importlib.import_module(f"spfde.accounting.{name}")
    raise AttributeError(f"module 'spfde.accounting' has no attribute {name!r}")
