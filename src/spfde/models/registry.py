"""Model registry: ``register_model``, ``create_model``, ``list_models``, ``model_info``.

A timm-style registry of plain ``nn.Module`` definitions. Every registered model exposes
``blocks() -> list[str]``, its natural freezing units (paper Section 4.2: "each block consisting
of several consecutive DNN layers, such as a bottleneck block in the ResNet") in forward order.

Your own model: ``model.name`` may also be an import path ``package.module:callable`` (as
LightningCLI's ``class_path``), e.g. ``my_pkg.models:make_net`` or a class ``my_pkg.models:Net``.
The contract (:func:`create_model`): the callable is called with ``num_classes``, ``in_channels``
(from the dataset) and ``width`` (``model.width``) for those of the three its signature names,
plus ``model.kwargs`` (which may not repeat the three), and must return an ``nn.Module``. The
module is imported from ``sys.path`` and then, if not found there, from the current folder (a
console script does not put it on ``sys.path``).
Freezing needs the model's blocks: a ``blocks()`` method or ``freezing.blocks``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from spfde.errors import ConfigError, SpfdeError

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
        raise ConfigError(
            f"unknown model {name!r}; set model.name to one of: {', '.join(list_models())} "
            "(see `spfde models`), or to an import path 'package.module:callable' for your own model"
        )
    return _REGISTRY[name]


def is_import_path(name: str) -> bool:
    """``"pkg.mod:fn"``-style names load a user's callable instead of a registry entry."""
    return ":" in name


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        top = module.split(".")[0]
        if e.name != top or here in sys.path or "" in sys.path:  # a missing dependency, or looked here already
            raise
    sys.path.append(here)  # after everything else: an installed package of the same name wins
    return importlib.import_module(module)


#: what create_model passes itself (from the dataset and ``model.width``); never in ``model.kwargs``
AUTO_ARGS = ("num_classes", "in_channels", "width")


def resolve_model(name: str, kwargs: dict[str, Any] | None = None) -> ModelFn:
    """The factory behind ``model.name``: a registry entry or an imported ``module:callable``.

    Raises :class:`ConfigError` naming the field when the name is unknown, the path cannot be
    imported or ``kwargs`` (``model.kwargs``) repeats an argument of :data:`AUTO_ARGS`, so a run
    fails before it loads data.
    """
    clash = sorted(set(kwargs or {}) & set(AUTO_ARGS))
    if clash:
        raise ConfigError(f"config field 'model.kwargs.{clash[0]}': num_classes and in_channels come from the "
                          "dataset and width from model.width; drop it from model.kwargs")
    if not is_import_path(name):
        return _entry(name).fn
    module, _, attr = name.partition(":")
    where = f"config field 'model.name' = {name!r}"
    if not module or not attr:
        raise ConfigError(f"{where} is not an import path; write 'package.module:callable'")
    try:
        obj: Any = _import(module)
    except Exception as e:  # noqa: BLE001 - anything the user's module raises on import
        raise ConfigError(f"{where}: cannot import module {module!r} ({type(e).__name__}: {e}); put its folder on "
                          "PYTHONPATH, run from that folder, or pip install its package") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {attr!r} is a {type(obj).__name__}, not a function or class")
    return obj


def _accepted(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass only model.kwargs
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def model_info(name: str) -> dict[str, Any]:
    """``{"name", "description", "input_size"}`` for the ``spfde models`` table."""
    e = _entry(name)
    return {"name": name, "description": e.description, "input_size": list(e.input_size)}


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 **kwargs: Any) -> nn.Module:
    """Build the model ``name``: a registered one, or ``package.module:callable`` (module docstring).

    Parameters are drawn from the global torch RNG (seed it with ``torch.manual_seed`` for a
    deterministic init). ``kwargs`` (``model.kwargs``) go to the factory as keyword arguments.
    """
    fn = resolve_model(name, kwargs)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise SpfdeError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise SpfdeError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise SpfdeError(f"model.width must be a positive number, got {width!r}")
    given = dict(zip(AUTO_ARGS, (num_classes, in_channels, float(width)), strict=True))
    if not is_import_path(name):
        return fn(**given, **kwargs)
    accepted = _accepted(fn)
    args = {**{k: v for k, v in given.items() if k in accepted}, **kwargs}
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    try:
        model = fn(**args)
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise ConfigError(f"config field 'model.name' = {name!r}: calling it as {name.partition(':')[2]}({shown}) "
                          f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check "
                          "model.kwargs against its signature") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config field 'model.name' = {name!r} returned an object of type "
                          f"{type(model).__name__}, not a torch.nn.Module")
    return model
