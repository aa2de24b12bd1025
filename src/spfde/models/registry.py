"""Model registry: ``register_model``, ``create_model``, ``list_models``, ``model_info``.

A timm-style registry of plain ``nn.Module`` definitions. Every registered model exposes
``blocks() -> list[str]``, its natural freezing units (paper Section 4.2: "each block consisting
of several consecutive DNN layers, such as a bottleneck block in the ResNet") in forward order.

Your own model: ``model.name`` may also be an import path ``package.module:callable`` (as
LightningCLI's ``class_path``), e.g. ``my_pkg.models:make_net`` or a class ``my_pkg.models:Net``.
The contract (:func:`create_model`): the callable is called with ``num_classes``, ``in_channels``
(from the dataset) and ``width`` (``model.width``) for those of the three its signature names,
plus ``model.kwargs`` (which may not repeat the three, and must be arguments its signature takes),
and must return an ``nn.Module``. The module is imported from ``sys.path`` and then, if not found
there, from the current folder (a console script does not put it on ``sys.path``).

A config naming a callable runs code (docs/design.md, "Trust model"): standard-library and
builtin callables (``os:system``) and classes that are no ``nn.Module`` are refused before
anything is imported or called.
Freezing needs the model's blocks: a ``blocks()`` method or ``freezing.blocks``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from spfde.errors import ConfigError, SpfdeError, first_line

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

    Raises :class:`ConfigError` naming the field, so a run fails before it loads data, when the
    name is unknown; the path cannot be imported, names something in the standard library or
    builtins (``os:system``: docs/design.md, "Trust model"), a class that is no ``nn.Module`` or a
    function annotated to return something else; or ``kwargs`` (``model.kwargs``) repeats an
    argument of :data:`AUTO_ARGS` or holds a key the factory's signature does not take (the error
    lists what it takes; issue audit H2).
    """
    clash = sorted(set(kwargs or {}) & set(AUTO_ARGS))
    if clash:
        raise ConfigError(f"config field 'model.kwargs.{clash[0]}': num_classes and in_channels come from the "
                          "dataset and width from model.width; drop it from model.kwargs")
    if not is_import_path(name):
        fn = _entry(name).fn
        _check_kwargs(name, fn, kwargs)
        return fn
    module, _, attr = name.partition(":")
    where = f"config field 'model.name' = {name!r}"
    if not module or not attr:
        raise ConfigError(f"{where} is not an import path; write 'package.module:callable'")
    _refuse_stdlib(where, module)
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
    _refuse_stdlib(where, _defined_in(obj) or module)  # e.g. `from os import system` re-exported by a user module
    _require_module_factory(where, attr, obj)
    _check_kwargs(name, obj, kwargs)
    return obj


def _top_module(module: str) -> str:
    return module.split(".")[0]


def is_stdlib_module(module: str) -> bool:
    """Whether ``module`` (a dotted name) belongs to Python's standard library or its builtins."""
    top = _top_module(module)
    return top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "builtins"


def _defined_in(obj: Any) -> str | None:
    """The module a function or class was defined in (a partial: its function's), None when unknown."""
    target = obj.func if isinstance(obj, functools.partial) else obj  # a partial: judge what it calls
    if inspect.isroutine(target) or inspect.isclass(target):
        mod = getattr(target, "__module__", None)
        return mod if isinstance(mod, str) else None
    return None


def _refuse_stdlib(where: str, module: str) -> None:
    """A config file can name any callable; one from the standard library (``os:system``,
    ``subprocess:run``, ``builtins:eval``) cannot build a model, only do harm (docs/design.md,
    "Trust model"), so it is refused before anything is imported or called."""
    if is_stdlib_module(module):
        raise ConfigError(f"{where}: {_top_module(module)!r} is part of Python's standard library or builtins, "
                          "which spfde does not call from a config; name a function or class of your own that "
                          "returns a torch.nn.Module")


def _require_module_factory(where: str, attr: str, obj: Any) -> None:
    """Refuse, before calling it, a class that is not an ``nn.Module`` or a function annotated to
    return something else; any other callable is checked on what it returns (create_model)."""
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise ConfigError(f"{where}: {attr!r} is the class {obj.__name__}, not a torch.nn.Module subclass; name "
                              "an nn.Module subclass or a function returning one")
        return
    try:
        ret = typing.get_type_hints(obj).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve says nothing either way
        return
    if inspect.isclass(ret) and not issubclass(ret, nn.Module) and ret is not object:
        raise ConfigError(f"{where}: {attr!r} is annotated to return {ret.__name__}, not a torch.nn.Module")


def _check_kwargs(name: str, fn: Callable[..., Any], kwargs: dict[str, Any] | None) -> None:
    """Every ``model.kwargs`` key must be an argument of the model's factory (unless it takes
    ``**kwargs``), checked before any data loads; the error names the key and what it accepts."""
    if not kwargs:
        return
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read: the call itself tells (create_model)
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in AUTO_ARGS]
    bad = sorted(k for k in kwargs if k not in accepted)
    if bad:
        takes = (f"it accepts: {', '.join(accepted)}" if accepted else
                 "it accepts none (num_classes and in_channels come from the dataset, width from model.width)")
        more = f" (also {', '.join(repr(b) for b in bad[1:])})" if len(bad) > 1 else ""
        raise ConfigError(f"config field 'model.kwargs.{bad[0]}': model.name = {name!r} has no argument "
                          f"{bad[0]!r}{more}; {takes}")


def _accepted(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass only model.kwargs
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _shown(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _accepts(fn: Callable[..., Any]) -> str:
    """``"it accepts: depth, dropout"``: the keyword arguments a factory takes besides :data:`AUTO_ARGS`."""
    names = sorted(_accepted(fn) - set(AUTO_ARGS))
    return f"it accepts: {', '.join(names)}" if names else "it accepts no model.kwargs"


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
        try:
            return fn(**given, **kwargs)
        except TypeError as e:
            if not kwargs:  # nothing from model.kwargs was passed: a bug in the factory, not the config
                raise
            raise ConfigError(f"config field 'model.kwargs': model.name = {name!r} refused {_shown(kwargs)} "
                              f"({first_line(e)}); {_accepts(fn)}") from None
    accepted = _accepted(fn)
    args = {**{k: v for k, v in given.items() if k in accepted}, **kwargs}
    try:
        model = fn(**args)
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        accepts = f" ({_accepts(fn)})" if isinstance(e, TypeError) else ""
        raise ConfigError(f"config field 'model.name' = {name!r}: calling it as {name.partition(':')[2]}"
                          f"({_shown(args)}) failed ({type(e).__name__}: {first_line(e)}); check model.kwargs "
                          f"against its signature{accepts}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config field 'model.name' = {name!r} returned an object of type "
                          f"{type(model).__name__}, not a torch.nn.Module")
    return model
