"""Freezing blocks: a partition of a model's trainable parameters into consecutive blocks.

Paper Section 4.2.1: "For a given DNN model with L layers, we divide it into N blocks, with each
block consisting of several consecutive DNN layers, such as a bottleneck block in the ResNet."
Progressive freezing only works when the blocks are in forward order and partition the
trainable parameters exactly, so :func:`resolve_blocks` checks both before training starts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spfde.errors import SpfdeError
from spfde.utils import probe_forward

BlockSpecEntry = str | Sequence[str]
BlockSpec = Sequence[BlockSpecEntry] | Callable[[str, nn.Module], Hashable | None] | None


@dataclass
class Block:
    """One freezing block.

    Attributes:
        name: display name (the spec entry, or the id a callable returned).
        prefixes: the spec entries that define the block (module names or name prefixes).
        module_names: every ``named_modules()`` name inside the block (containers and leaves), so
            a ledger keyed by leaf layer names can look its layers up directly.
        param_names: the block's trainable ``named_parameters()`` names, in model order.
    """

    name: str
    prefixes: list[str] = field(default_factory=list)
    module_names: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "prefixes": list(self.prefixes), "module_names": list(self.module_names),
                "param_names": list(self.param_names)}


def _owner(param_name: str) -> str:
    """``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"`` (``""`` for a root parameter)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _covers(entry: str, module: str, is_module: bool) -> bool:
    # A real module name covers its subtree on dot boundaries ("layer1" does not cover
    # "layer10"); anything else is a plain string prefix of module names ("features.").
    if is_module:
        return module == entry or module.startswith(entry + ".")
    return module.startswith(entry)


def _from_names(model: nn.Module, spec: Sequence[BlockSpecEntry]) -> list[Block]:
    modules = [n for n, _ in model.named_modules()]
    module_set = set(modules)
    blocks: list[Block] = []
    for entry in spec:
        entries = [entry] if isinstance(entry, str) else list(entry)
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise SpfdeError(
                f"freezing.blocks entry {entry!r} is not a module name; give non-empty module names or "
                "name prefixes from model.named_modules(), e.g. ['stem', 'layer1.0', 'head']")
        covered: list[str] = []
        for e in entries:
            hits = [m for m in modules if _covers(e, m, e in module_set)]
            if not hits:
                close = [m for m in modules if m and (m.startswith(e.split(".")[0]))][:5]
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise SpfdeError(
                    f"freezing.blocks entry {e!r} matches no module of {type(model).__name__}{hint}; use names "
                    "from model.named_modules()")
            covered += [m for m in hits if m not in covered]
        name = entries[0] if len(entries) == 1 else "+".join(entries)
        blocks.append(Block(name=name, prefixes=entries, module_names=covered))
    return blocks


def _from_callable(model: nn.Module, fn: Callable[[str, nn.Module], Hashable | None]) -> list[Block]:
    resolved: dict[str, Hashable | None] = {}
    order: list[Hashable] = []
    members: dict[Hashable, list[str]] = {}
    tops: dict[Hashable, list[str]] = {}
    for name, module in model.named_modules():
        bid = fn(name, module)
        parent = resolved.get(_owner(name)) if name else None
        own = bid if bid is not None else parent
        resolved[name] = own
        if own is None:
            continue
        if own not in members:
            order.append(own)
            members[own] = []
            tops[own] = []
        members[own].append(name)
        if not name or parent != own:
            tops[own].append(name)
    return [Block(name=str(b), prefixes=tops[b], module_names=members[b]) for b in order]


def _assign_params(model: nn.Module, blocks: list[Block]) -> None:
    holders: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        for m in b.module_names:
            holders.setdefault(m, []).append(i)
    orphans: list[str] = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue  # fixed by the user before training: never ours to freeze or defrost
        where = holders.get(_owner(pname), [])
        if not where:
            orphans.append(pname)
            continue
        if len(where) > 1:
            raise SpfdeError(
                f"parameter {pname!r} lies in two freezing blocks ({blocks[where[0]].name!r} and "
                f"{blocks[where[1]].name!r}); freezing blocks must not overlap, so list each module once")
        blocks[where[0]].param_names.append(pname)
    if orphans:
        more = f" and {len(orphans) - 3} more" if len(orphans) > 3 else ""
        raise SpfdeError(
            f"parameter(s) {', '.join(repr(o) for o in orphans[:3])}{more} lie in no freezing block; every "
            "trainable parameter must belong to exactly one block: add their modules to freezing.blocks")


def _forward_calls(model: nn.Module, blocks: list[Block], example_input: torch.Tensor) -> list[list[int]]:
    """For each block, the step numbers at which its parameter-owning modules ran."""
    calls: dict[str, list[int]] = {}
    counter = [0]
    handles = []
    named = dict(model.named_modules())
    owners = {_owner(p) for b in blocks for p in b.param_names}

    def make_hook(mname: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: Any) -> None:
            calls.setdefault(mname, []).append(counter[0])
            counter[0] += 1
        return hook

    for mname in owners:
        handles.append(named[mname].register_forward_pre_hook(make_hook(mname)))
    first = next(model.parameters(), None)
    x = example_input.detach()
    if first is not None and x.is_floating_point():
        x = x.to(device=first.device)
    with probe_forward(model, handles):  # no BN running-stat updates from this probe
        model(x)
    out = []
    for b in blocks:
        steps = sorted(s for m in {_owner(p) for p in b.param_names} for s in calls.get(m, []))
        out.append(steps)
    return out


def _check_order(blocks: list[Block], calls: list[list[int]]) -> None:
    seen = [(b, c) for b, c in zip(blocks, calls, strict=True) if c]
    for (a, ca), (b, cb) in zip(seen, seen[1:], strict=False):
        if max(ca) > min(cb):
            raise SpfdeError(
                f"freezing blocks are out of forward order: block {b.name!r} runs before block {a.name!r} has "
                "finished; a block can only be frozen after every block before it, so list the blocks in the "
                "order the forward pass runs them (and keep each block's layers consecutive)")


def resolve_blocks(model: nn.Module, spec: BlockSpec = None, example_input: torch.Tensor | None = None) -> list[Block]:
    """The model's freezing blocks, checked to partition its trainable parameters in forward order.

    Args:
        model: the network (unwrapped: names are its ``named_modules()`` names).
        spec: ``None`` uses ``model.blocks()``; a list of module names or name prefixes (one block
            each; a nested list/tuple groups several into one block), in forward order; or a
            callable ``(name, module) -> block id`` called on every ``named_modules()`` entry
            (``None`` inherits the parent module's block).
        example_input: a batch to run once (in eval mode, without gradients) to verify the forward
            order; a callable spec's blocks are sorted into forward order with it.

    Blocks without trainable parameters are dropped. Raises :class:`SpfdeError` for an unknown
    name, a trainable parameter in no block or in two, or blocks out of forward order.
    """
    if spec is None:
        getter = getattr(model, "blocks", None)
        if not callable(getter):
            raise SpfdeError(
                f"model {type(model).__name__} has no blocks() method, so its freezing blocks are unknown; set "
                "freezing.blocks to its module names in forward order (e.g. ['conv1', 'layer1', 'fc']) or pass "
                "blocks= to SpFDE")
        spec = list(getter())
    if callable(spec):
        blocks = _from_callable(model, spec)
        by_callable = True
    elif isinstance(spec, (list, tuple)):
        blocks = _from_names(model, spec)
        by_callable = False
    else:
        raise SpfdeError(f"freezing blocks must be a list of module names or a callable, got {type(spec).__name__}")
    _assign_params(model, blocks)
    blocks = [b for b in blocks if b.param_names]
    if not blocks:
        raise SpfdeError(f"model {type(model).__name__} has no trainable parameters to freeze")
    names = [b.name for b in blocks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SpfdeError(f"freezing block {dup!r} is listed twice; list each block once")
    if example_input is not None:
        calls = _forward_calls(model, blocks, example_input)
        if by_callable:
            big = 1 << 62
            order = sorted(range(len(blocks)), key=lambda i: (min(calls[i]) if calls[i] else big, i))
            blocks, calls = [blocks[i] for i in order], [calls[i] for i in order]
        _check_order(blocks, calls)
    return blocks


def block_of_params(blocks: Sequence[Block]) -> dict[str, int]:
    """``{parameter name: block index}``."""
    return {p: i for i, b in enumerate(blocks) for p in b.param_names}
