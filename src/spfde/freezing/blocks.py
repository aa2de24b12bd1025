"""Freezing blocks: a partition of a model's trainable parameters into consecutive blocks.

Paper Section 4.2.1: "For a given DNN model with L layers, we divide it into N blocks, with each
block consisting of several consecutive DNN layers, such as a bottleneck block in the ResNet."
Progressive freezing only works when the blocks are in forward order and partition the
trainable parameters exactly, so :func:`resolve_blocks` checks both before training starts.

How blocks are found (docs/design.md, "Blocks and prunable parameters"):

* ``freezing.blocks`` / ``blocks=`` / ``model.blocks()``: a list of entries in forward order, each
  one block (a nested list groups several entries into one block). An entry is a module name
  (it covers the module's whole subtree: ``layer1`` covers ``layer1.0.conv1``, never
  ``layer10``), a parameter name (``cls_token``: how a parameter on the root module is given to a
  block), or a glob over module and parameter names (``features.*``, ``layer[12]``: the one
  explicit way to give a name prefix);
* without any of these, the usual transformer layouts are recognised: a ``ModuleList`` /
  ``Sequential`` of numbered layers called ``blocks`` (timm), ``layer`` (Hugging Face
  ``encoder.layer``), ``layers``, ``h`` (GPT-2) or ``block``; each numbered layer is a block and
  every other parameter-holding module beside the path to it is one (``patch_embed``, ``norm``,
  ``head``; ``embeddings``, ``pooler``, ``classifier``; ``wpe``, ``ln_f``, ``lm_head``), in
  forward order;
* parameters on the root module that no entry names (``cls_token``, ``pos_embed``) join the
  first block;
* a weight tied under several names (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)
  belongs to the *last* block that holds one of its modules, the block of its last use, so it
  trains until that block freezes (the embedding lookup's backward is an index-add that the
  FLOPs ledger does not count).

Every mistake in a spec (an entry that matches nothing, an empty spec, parameters left in no
block or in two, blocks out of forward order) is a :class:`~spfde.errors.ConfigError`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spfde.errors import ConfigError
from spfde.names import name_matches, parent_name, within
from spfde.utils import probe_forward

BlockSpecEntry = str | Sequence[str]
BlockSpec = Sequence[BlockSpecEntry] | Callable[[str, nn.Module], Hashable | None] | None

#: names of the numbered layer stacks recognised without a spec (timm, Hugging Face, GPT-2, T5)
STACK_NAMES = ("blocks", "layer", "layers", "h", "block")
_GLOB = set("*?[")


@dataclass
class Block:
    """One freezing block.

    Attributes:
        name: display name (the spec entry, or the id a callable returned).
        prefixes: the spec entries that define the block (module names, parameter names or globs).
        module_names: every ``named_modules()`` name inside the block (containers and leaves), so
            a ledger keyed by leaf layer names can look its layers up directly, plus the names of
            root-level parameters the block holds (a ledger unit named after such a parameter is
            found the same way).
        param_names: the block's trainable ``named_parameters()`` names, in model order.
    """

    name: str
    prefixes: list[str] = field(default_factory=list)
    module_names: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)
    #: parameter names the spec named directly (internal: they win over module coverage)
    named_params: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "prefixes": list(self.prefixes), "module_names": list(self.module_names),
                "param_names": list(self.param_names)}


def _owner(param_name: str) -> str:
    """``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"`` (``""`` for a root parameter)."""
    return parent_name(param_name) or ""


def _subtree(modules: list[str], root: str) -> list[str]:
    return within(modules, root)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{canonical parameter name: every name of that tensor}`` (tied weights have several)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return {names[0]: names for names in by_id.values()}


def _no_match(model: nn.Module, entry: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(entry, names, n=4, cutoff=0.6)
    hint = f" (similar: {', '.join(close)})" if close else ""
    return ConfigError(
        f"freezing.blocks entry {entry!r} matches no module or parameter of {type(model).__name__}{hint}; entries are "
        "whole names from model.named_modules() / named_parameters(), or globs such as 'features.*'")


def _from_names(model: nn.Module, spec: Sequence[BlockSpecEntry]) -> list[Block]:
    modules = [n for n, _ in model.named_modules()]
    module_set = set(modules)
    param_names = [n for names in _aliases(model).values() for n in names]
    param_set = set(param_names)
    blocks: list[Block] = []
    for entry in spec:
        entries = [entry] if isinstance(entry, str) else list(entry)
        if not entries or not all(isinstance(e, str) and e for e in entries):
            raise ConfigError(
                f"freezing.blocks entry {entry!r} is not a name; give module names, parameter names (a root "
                "parameter such as 'cls_token') or globs, e.g. ['stem', 'layer1.0', 'head']")
        covered: list[str] = []
        named: list[str] = []
        for e in entries:
            if _GLOB & set(e):
                mods = [m for m in modules if m and fnmatch.fnmatchcase(m, e)]
                pars = [p for p in param_names if fnmatch.fnmatchcase(p, e)]
            else:
                mods = [e] if e in module_set else []
                pars = [e] if e in param_set else []
            if not mods and not pars:
                raise _no_match(model, e, [m for m in modules if m] + param_names)
            for m in mods:
                covered += [x for x in _subtree(modules, m) if x not in covered]
            named += [p for p in pars if p not in named]
        name = entries[0] if len(entries) == 1 else "+".join(entries)
        blocks.append(Block(name=name, prefixes=entries, module_names=covered, named_params=named))
    return blocks


def layout_blocks(model: nn.Module) -> list[str] | None:
    """Block entries for a recognised transformer layout (module docstring), or ``None``.

    Registration order; :func:`resolve_blocks` sorts them into forward order.
    """
    named = dict(model.named_modules())
    stacks = [n for n, m in named.items() if n and n.rpartition(".")[2] in STACK_NAMES
              and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0
              and all(c.isdigit() for c, _ in m.named_children())]
    stacks = [s for s in stacks if not any(name_matches(s, o) for o in stacks if o != s)]  # outermost stacks only
    if not stacks:
        return None
    path = {""} | {".".join(s.split(".")[:i]) for s in stacks for i in range(1, s.count(".") + 1)}
    entries: list[str] = []

    def expand(node: str) -> None:
        for child, _ in named[node].named_children():
            full = f"{node}.{child}" if node else child
            if full in stacks:
                entries.extend(f"{full}.{c}" for c, _ in named[full].named_children())
            elif full in path:
                expand(full)
            else:
                entries.append(full)

    expand("")
    return entries


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


def _assign_params(model: nn.Module, blocks: list[Block]) -> list[str]:
    """Give every trainable parameter to one block; returns the root parameters no block holds."""
    covers: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        for m in b.module_names:
            covers.setdefault(m, []).append(i)
    named_by: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        for pn in b.named_params:
            named_by.setdefault(pn, []).append(i)
    params = dict(model.named_parameters())
    orphans: list[str] = []
    roots: list[str] = []
    for pname, names in _aliases(model).items():
        if not params[pname].requires_grad:
            continue  # fixed by the user before training: never ours to freeze or defrost
        direct = sorted({i for n in names for i in named_by.get(n, [])})
        where: list[int] = direct
        if not direct:
            for n in names:
                held = covers.get(_owner(n), [])
                if len(held) > 1:
                    raise ConfigError(
                        f"parameter {n!r} lies in two freezing blocks ({blocks[held[0]].name!r} and "
                        f"{blocks[held[1]].name!r}); freezing blocks must not overlap, so list each module once")
                where = sorted(set(where) | set(held))
            # a tied weight used in several blocks trains until the last of them freezes
            where = where[-1:]
        if len(where) > 1:
            raise ConfigError(
                f"parameter {pname!r} is named by two freezing blocks ({blocks[where[0]].name!r} and "
                f"{blocks[where[1]].name!r}); list each parameter once")
        if where:
            blocks[where[0]].param_names.append(pname)
        elif all(_owner(n) == "" for n in names):
            roots.append(pname)
        else:
            orphans.append(pname)
    if orphans:
        more = f" and {len(orphans) - 3} more" if len(orphans) > 3 else ""
        raise ConfigError(
            f"parameter(s) {', '.join(repr(o) for o in orphans[:3])}{more} lie in no freezing block; every "
            "trainable parameter must belong to exactly one block: add their modules to freezing.blocks")
    return roots


def _call_modules(model: nn.Module, block: Block) -> set[str]:
    """The modules whose calls place ``block`` in the forward pass: owners of its parameters'
    names inside the block (a tied weight's other owners run elsewhere), never the root."""
    aliases = _aliases(model)
    inside = set(block.module_names)
    out = set()
    for p in block.param_names:
        owners = [_owner(n) for n in aliases.get(p, [p])]
        out |= {o for o in owners if o in inside and o}
    return out


def _forward_calls(model: nn.Module, blocks: list[Block], example_input: torch.Tensor) -> list[list[int]]:
    """For each block, the step numbers at which its parameter-owning modules ran."""
    calls: dict[str, list[int]] = {}
    counter = [0]
    handles = []
    named = dict(model.named_modules())
    owners = [_call_modules(model, b) for b in blocks]

    def make_hook(mname: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _args: Any) -> None:
            calls.setdefault(mname, []).append(counter[0])
            counter[0] += 1
        return hook

    for mname in set().union(*owners):
        handles.append(named[mname].register_forward_pre_hook(make_hook(mname)))
    first = next(model.parameters(), None)
    x = example_input.detach()
    if first is not None and x.is_floating_point():
        x = x.to(device=first.device)
    with probe_forward(model, handles):  # no BN running-stat updates from this probe
        model(x)
    return [sorted(s for m in own for s in calls.get(m, [])) for own in owners]


def _check_order(blocks: list[Block], calls: list[list[int]]) -> None:
    seen = [(b, c) for b, c in zip(blocks, calls, strict=True) if c]
    for (a, ca), (b, cb) in zip(seen, seen[1:], strict=False):
        if max(ca) > min(cb):
            raise ConfigError(
                f"freezing blocks are out of forward order: block {b.name!r} runs before block {a.name!r} has "
                "finished; a block can only be frozen after every block before it, so list the blocks in the "
                "order the forward pass runs them (and keep each block's layers consecutive)")


def resolve_blocks(model: nn.Module, spec: BlockSpec = None, example_input: torch.Tensor | None = None) -> list[Block]:
    """The model's freezing blocks, checked to partition its trainable parameters in forward order.

    Args:
        model: the network (unwrapped: names are its ``named_modules()`` names).
        spec: ``None`` uses ``model.blocks()``, or else a recognised layout (module docstring); a
            list of entries (module names, parameter names or globs; one block each; a nested
            list/tuple groups several into one block), in forward order; or a callable
            ``(name, module) -> block id`` called on every ``named_modules()`` entry (``None``
            inherits the parent module's block).
        example_input: a batch to run once (in eval mode, without gradients) to verify the forward
            order; a callable spec's or a recognised layout's blocks are sorted into forward order
            with it.

    Blocks without trainable parameters are dropped; root parameters no entry names join the
    first block. Raises :class:`ConfigError` for an entry that matches nothing, an empty spec, a
    trainable parameter in no block or in two, or blocks out of forward order.
    """
    sort = False
    if spec is None:
        getter = getattr(model, "blocks", None)
        if callable(getter) and not isinstance(getter, nn.Module):  # timm's `blocks` is the layer stack
            spec = list(getter())
        else:
            spec = layout_blocks(model)
            sort = True
            if spec is None:
                # the model's own top-level modules with trainable parameters, as the example of a spec
                own = [n for n, m in model.named_children() if any(p.requires_grad for p in m.parameters())]
                example = (f"its top-level modules with parameters are {own[:6]}{' ...' if len(own) > 6 else ''}"
                           if own else "e.g. ['conv1', 'layer1', 'fc']")
                raise ConfigError(
                    f"model {type(model).__name__} has no blocks() method and no recognised layout (a list of "
                    f"numbered layers called {', '.join(STACK_NAMES)}), so its freezing blocks are unknown; set "
                    f"freezing.blocks to its module names in forward order ({example}) or pass blocks= to SpFDE")
    if callable(spec):
        blocks = _from_callable(model, spec)
        sort = True
    elif isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError("freezing.blocks is empty; list the model's blocks in forward order, or leave it "
                              "unset to use the model's own blocks")
        blocks = _from_names(model, spec)
    else:
        raise ConfigError(f"freezing blocks must be a list of module names or a callable, got {type(spec).__name__}")
    roots = _assign_params(model, blocks)
    blocks = [b for b in blocks if b.param_names]
    if not blocks:
        raise ConfigError(f"model {type(model).__name__} has no trainable parameters to freeze")
    names = [b.name for b in blocks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"freezing block {dup!r} is listed twice; list each block once")
    if example_input is not None:
        calls = _forward_calls(model, blocks, example_input)
        if sort:
            big = 1 << 62
            order = sorted(range(len(blocks)), key=lambda i: (min(calls[i]) if calls[i] else big, i))
            blocks, calls = [blocks[i] for i in order], [calls[i] for i in order]
        _check_order(blocks, calls)
    if roots:  # cls_token, pos_embed: used with the first block's output
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        first = blocks[0]
        first.param_names = sorted(first.param_names + roots, key=order.__getitem__)
    for b in blocks:  # parameters named directly are units of their own in the FLOPs ledger
        b.module_names += [p for p in b.param_names if _owner(p) == "" and p not in b.module_names]
    return blocks


def block_of_params(blocks: Sequence[Block]) -> dict[str, int]:
    """``{parameter name: block index}``."""
    return {p: i for i, b in enumerate(blocks) for p in b.param_names}
