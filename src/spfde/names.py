"""Module and parameter names: one rule for "is this inside that" (whole dotted components).

``layer1`` contains ``layer1.0.conv1`` and its parameter ``layer1.0.conv1.weight``, never
``layer10``. Sparsity's ``include``/``exclude``, the freezing blocks, the FLOPs ledger's frozen
layers, the controller's layer-to-block map and the activation cache's outermost modules all
ask this question; they ask it here, so the rule cannot drift between them. No torch here.
"""

from __future__ import annotations

from collections.abc import Iterable


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` is ``name`` or one of its ancestors, in whole dotted components
    (``layer1`` covers ``layer1.0.conv1`` and ``layer1.0.conv1.weight``, not ``layer10``)."""
    return name == pattern or name.startswith(pattern + ".")


def ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``: the name itself and every module that contains it,
    innermost first (the root module ``""`` is left out)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def parent_name(name: str) -> str | None:
    """The module directly holding ``name``: ``"a.b.c"`` -> ``"a.b"``, ``"a"`` -> ``""`` (the root);
    ``None`` for the root ``""`` itself."""
    if not name:
        return None
    return name.rsplit(".", 1)[0] if "." in name else ""


def covered_by(name: str, names: set[str] | frozenset[str]) -> bool:
    """Whether ``name`` or one of its ancestors is in ``names`` (the same rule as :func:`name_matches`,
    a set lookup per ancestor instead of a scan of ``names``)."""
    return any(a in names for a in ancestors(name))


def within(names: Iterable[str], root: str) -> list[str]:
    """The names in ``names`` that ``root`` covers (``root`` itself and everything under it), in order."""
    return [n for n in names if name_matches(n, root)]
