"""Model registry: ``register_model``, ``create_model``, ``list_models``, ``model_info``.

A timm-style registry of plain ``nn.Module`` definitions. Every registered model exposes
``blocks() -> list[str]``, its natural freezing units (paper Section 4.2: "each block consisting
of several consecutive DNN layers, such as a bottleneck block in the ResNet") in forward order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from spfde.errors import SpfdeError

ModelFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Entry:
    fn: ModelFn
    description: str
    input_size: tuple[int, int, int]


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, *, description: str | None = None, input_size: tuple[int, int, int] = (3, 32, 32)
) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering a factory ``fn(num_classes, in_channels, width) -> nn.Module`` under ``name``.

    ``description`` defaults to the first line of the factory's docstring; ``input_size`` is the
    default ``(C, H, W)`` the model was designed for (shown by ``spfde models``).
    """

    def deco(fn: ModelFn) -> ModelFn:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        desc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = _Entry(fn=fn, description=desc, input_size=tuple(input_size))
        return fn

    return deco


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise SpfdeError(
            f"unknown model {name!r}; set model.name to one of: {', '.join(list_models())} "
            "(see `spfde models`)"
        )
    return _REGISTRY[name]


def model_info(name: str) -> dict[str, Any]:
    """``{"name", "description", "input_size"}`` for the ``spfde models`` table."""
    e = _entry(name)
    return {"name": name, "description": e.description, "input_size": list(e.input_size)}


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Build the registered model ``name``; parameters are drawn from the global torch RNG
    (seed it with ``torch.manual_seed`` for a deterministic init)."""
    entry = _entry(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise SpfdeError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise SpfdeError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise SpfdeError(f"model.width must be a positive number, got {width!r}")
    return entry.fn(num_classes=num_classes, in_channels=in_channels, width=float(width))
