"""Prunable-parameter discovery and the pure mask operations every method is built from.

Everything here is a pure function of its inputs (tensors, shapes, a ``torch.Generator``), so
the methods in :mod:`spfde.sparsity.mest`, ``set``, ``rigl`` and ``static`` are short
compositions that can be tested by hand.

Counting rule (used everywhere, also by the FLOPs planner): a layer with ``n`` weights at
sparsity ``s`` keeps ``keep_count(n, s) = n - round(s * n)`` weights, so its density is
``1 - s`` up to one weight (``|density - (1 - s)| <= 0.5 / n``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from spfde.errors import ConfigError
from spfde.names import name_matches  # the one whole-component rule (spfde.names); importable from here too

#: Module types whose ``weight`` is pruned by default (paper Section 5: "all the convolutional
#: layers"; linear layers are included as in MEST/RigL; ``sparsity.exclude`` removes any of them).
DEFAULT_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

#: ``nn.MultiheadAttention``'s projection weights (fused, or separate when kdim/vdim differ)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable parameter: its unit name, the parameter's name and its shape.

    ``module`` is the *unit* name every per-layer table is keyed by (``layer_density``,
    ``sparsity.layer_overrides``, metrics, the FLOPs ledger): the module's name for a ``weight``
    (``"layer1.0.conv1"``, the contract for ordinary layers) and the parameter's own name
    otherwise (``"blocks.0.attn.in_proj_weight"``); see :func:`unit_name`.
    """

    module: str
    param: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def keep_count(numel: int, sparsity: float) -> int:
    """Number of weights a layer of ``numel`` weights keeps at ``sparsity``."""
    return numel - int(round(sparsity * numel))


def unit_name(param: str) -> str:
    """The unit a parameter is reported under: ``"a.b.weight"`` -> ``"a.b"``, else the parameter name.

    (``"weight"`` of a model that is itself one layer -> ``""``, its module name.)
    """
    if param == "weight":
        return ""
    return param[: -len(".weight")] if param.endswith(".weight") else param


_matches = name_matches  # the older private spelling


def _is_hf_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's linear layers, weight stored ``(in, out)``), found without importing it."""
    return type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers")


def default_prunable(mod: nn.Module, attr: str) -> bool:
    """Whether parameter ``attr`` of ``mod`` is pruned by default (module card of :mod:`spfde.sparsity`)."""
    if attr == "weight" and (isinstance(mod, DEFAULT_PRUNABLE) or _is_hf_conv1d(mod)):
        return True
    return isinstance(mod, nn.MultiheadAttention) and attr in ATTENTION_WEIGHTS


def find_prunable(
    model: nn.Module, include: list[str] | None = None, exclude: Iterable[str] = ()
) -> list[PrunableLayer]:
    """The prunable parameters of ``model`` in ``named_parameters`` order.

    Default: the ``weight`` of every conv/linear module (Hugging Face ``Conv1D`` too) and
    ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``q_proj_weight`` / ``k_proj_weight`` /
    ``v_proj_weight``; never embedding tables, norms or biases. ``include`` (parameter names,
    module names or their ancestors, in whole dotted components) replaces the default with every
    parameter of 2+ dims it covers; an embedding table only when named itself. ``exclude``
    removes parameters the same way. A weight tied between modules (GPT-2's ``lm_head`` =
    ``wte``) is never pruned (a module registered under several names, ALBERT's ``[layer] * N``, is
    one layer: its weights are pruned as any), nor is one the caller fixed with ``requires_grad=False`` before
    training (a pretrained stem, a frozen embedding): it never gets a gradient, so a pruned weight
    could never grow back and MEST/SET/RigL would only ever take weights from it; the freezing
    blocks leave such a parameter alone for the same reason (``spfde.freezing.blocks``). Naming
    either in ``include`` itself is a :class:`ConfigError`, as is a pattern that matches nothing.
    """
    modules = dict(model.named_modules())
    every_module = dict(model.named_modules(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    # the (module object, attribute) pairs holding each tensor: a module registered under several names
    # (ALBERT's `layers = [shared] * 3`) holds its weights once, under several names; only a tensor held
    # by two modules (or two attributes) is tied
    holders: dict[int, set[tuple[int, str]]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
        owner, _, attr = n.rpartition(".")
        holders.setdefault(id(p), set()).add((id(every_module[owner]), attr))
    params = list(model.named_parameters())
    every = [n for names in aliases.values() for n in names]
    exclude = list(exclude)
    for key, names in (("include", include or []), ("exclude", exclude)):
        for pat in names:
            if not pat or not any(name_matches(n, pat) for n in every + [m for m in modules if m]):
                raise ConfigError(
                    f"config field 'sparsity.{key}' names {pat!r}, which is no module or parameter of "
                    f"{type(model).__name__}; names are whole dotted components of model.named_modules() / "
                    f"named_parameters(), e.g. {', '.join(repr(n) for n in [n for n, _ in params][:3])}")

    aliases_of = {n: aliases[id(p)] for n, p in params}

    def named(n: str, pats: Iterable[str]) -> bool:
        return any(name_matches(a, p) for a in aliases_of[n] for p in pats)

    out: list[PrunableLayer] = []
    skipped_fixed: list[str] = []  # prunable but for requires_grad=False
    picked: dict[str, list[str]] = {p: [] for p in include or []}
    for name, p in params:
        owner, _, attr = name.rpartition(".")
        mod = modules[owner]
        tied = len(holders[id(p)]) > 1
        fixed = not p.requires_grad  # fixed by the user's code before SpFDE was built, not by our freezer
        if include is not None:
            pats = [pat for pat in include if named(name, [pat])]
            if not pats or p.dim() < 2:
                continue
            # named itself or through its own module, not through an ancestor
            direct = [pat for pat in pats if any(pat in (a, a.rpartition(".")[0]) for a in aliases_of[name])]
            if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and not direct:
                continue
            if tied:
                if direct:
                    raise ConfigError(
                        f"config field 'sparsity.include' names {direct[0]!r}, a weight tied under several names "
                        f"({', '.join(aliases_of[name])}); tied weights are never pruned: drop it from include")
                continue
            if fixed:
                if direct:
                    raise ConfigError(
                        f"config field 'sparsity.include' names {direct[0]!r}, a parameter with requires_grad=False "
                        "(fixed before training): it gets no gradient, so a pruned weight could never grow back; "
                        "drop it from include, or make it trainable before building SpFDE")
                continue
            for pat in pats:
                picked[pat].append(name)
        elif tied or p.dim() < 2 or not default_prunable(mod, attr):
            continue
        elif fixed:
            if not named(name, exclude):
                skipped_fixed.append(name)
            continue
        if named(name, exclude):
            continue
        out.append(PrunableLayer(unit_name(name), name, tuple(p.shape)))
    empty = [pat for pat, got in picked.items() if not got]
    if empty:
        raise ConfigError(
            f"config field 'sparsity.include' names {empty[0]!r}, which holds no prunable parameter (a weight of "
            "2+ dims that is not a bias, a norm, a tied weight or fixed with requires_grad=False); name "
            "conv/linear/attention modules or weights")
    if not out and skipped_fixed:
        raise ConfigError(
            f"every prunable weight of {type(model).__name__} has requires_grad=False ({len(skipped_fixed)}, e.g. "
            f"{skipped_fixed[0]!r}), and weights fixed before training are never pruned; a model that an earlier "
            "run froze needs p.requires_grad_(True) on its parameters before SpFDE is built")
    return out


def forward_order(model: nn.Module, names: list[str], example_input: torch.Tensor | None) -> list[str]:
    """Unit ``names`` sorted by the order their parameters are first used on ``example_input``.

    Without an input (or for units the forward never reaches) the given order is kept. Uses the
    FLOPs tracer (:func:`spfde.accounting.trace.trace_forward`), which sees functional calls such
    as ``nn.MultiheadAttention``'s projections and restores every buffer and the RNG state.
    """
    if example_input is None or not names:
        return list(names)
    from spfde.accounting.trace import trace_forward

    used = [unit_name(p) for p in trace_forward(model, example_input).param_order]
    wanted = set(names)
    seen = [u for u in dict.fromkeys(used) if u in wanted]
    return seen + [n for n in names if n not in seen]


# ----------------------------------------------------------------------------- mask operations


def random_mask(shape: tuple[int, ...], keep: int, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask of ``shape`` with exactly ``keep`` ones at uniformly random positions (CPU)."""
    n = 1
    for d in shape:
        n *= d
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:keep]] = True
    return flat.view(shape)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores`` (same shape)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        flat[torch.topk(scores.reshape(-1), k, sorted=False).indices] = True
    return flat.view(scores.shape)


def prune_lowest(mask: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the ``keep`` active positions of ``mask`` with the highest ``scores``; drop the rest.

    Inactive positions are never selected. ``keep`` larger than the active count keeps ``mask``.
    """
    active = int(mask.sum())
    if keep >= active:
        return mask.clone()
    s = scores.detach().float().masked_fill(~mask, float("-inf"))
    return topk_mask(s, keep)


def grow(
    mask: torch.Tensor, n: int, scores: torch.Tensor | None = None, forbidden: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Activate ``n`` inactive positions of ``mask``: those with the largest ``scores`` or, when
    ``scores`` is None, uniformly random ones (from ``generator``).

    Positions in ``forbidden`` (e.g. the weights pruned in the same update) are used only when
    there are not enough other inactive positions. Returns the new mask.
    """
    if n <= 0:
        return mask.clone()
    if scores is None:
        if generator is None:
            raise ValueError("random growth needs a generator")
        scores = torch.rand(mask.numel(), generator=generator).view(mask.shape).to(mask.device)
    s = scores.detach().float()
    free = ~mask
    cand = free & ~forbidden if forbidden is not None else free
    n_cand = int(cand.sum())
    if n <= n_cand:
        return mask | topk_mask(s.masked_fill(~cand, float("-inf")), n)
    # Not enough fresh positions: take them all, then the best of the forbidden ones.
    rest = free & ~cand
    extra = min(n - n_cand, int(rest.sum()))
    return mask | cand | topk_mask(s.masked_fill(~rest, float("-inf")), extra)
