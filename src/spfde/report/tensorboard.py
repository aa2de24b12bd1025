"""TensorBoard logging of the per-epoch metrics (``logging.tensorboard: true``).

Writes the same fields as one ``metrics.jsonl`` line (docs/design.md, "Run outputs"): every
number becomes a scalar under its key; a ``{name: number}`` dict (``layer_density``,
``block_lr``, ``grad_norms``) becomes one scalar per entry under ``key/name``; lists
(``frozen_blocks``) are logged as their length (``frozen_blocks/count``). The step is the epoch.
Needs the ``tensorboard`` package (``pip install tensorboard``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spfde.errors import SpfdeError


def metrics_to_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """Flatten a metrics.jsonl row to ``{tag: value}`` (see the module docstring); nulls are dropped."""
    out: dict[str, float] = {}
    for key, v in row.items():
        if key == "epoch" or v is None or isinstance(v, str):
            continue
        if isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, Mapping):
            for name, x in v.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{key}/{name}"] = float(x)
        elif isinstance(v, (list, tuple)):
            out[f"{key}/count"] = float(len(v))
    return out


def require_tensorboard() -> Any:
    """``SummaryWriter``, or a clear error when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SpfdeError("logging.tensorboard is true but the tensorboard package is not installed; "
                         "run `pip install tensorboard` (or `pip install spfde[tensorboard]`) or set "
                         "logging.tensorboard=false") from None
    return SummaryWriter


class TensorBoardLogger:
    """``log_epoch(row)`` writes a metrics row as TensorBoard scalars under ``log_dir``."""

    def __init__(self, log_dir: str | Path, writer: Any = None) -> None:
        if writer is None:
            writer = require_tensorboard()(log_dir=str(log_dir))
        self.writer = writer

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        step = int(row.get("epoch", 0))
        for tag, value in metrics_to_scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
