"""spfde.names: the one whole-dotted-component rule every name match uses (audit LOW, "one rule in one place")."""

from __future__ import annotations

import random

import pytest

from spfde.accounting.flops import _frozen_layers
from spfde.names import ancestors, covered_by, name_matches, parent_name, within

NAMES = ["", "layer1", "layer10", "layer1.0", "layer1.0.conv1", "layer1.0.conv1.weight", "layer10.0.conv1",
         "layer1.01", "head", "head.fc", "heads", "a.b.c.d"]


def test_whole_components_only():
    assert name_matches("layer1.0.conv1", "layer1") and name_matches("layer1", "layer1")
    assert not name_matches("layer10.0.conv1", "layer1") and not name_matches("layer1", "layer1.0")
    assert not name_matches("heads", "head") and not name_matches("layer1.01", "layer1.0")
    assert ancestors("a.b.c") == ["a.b.c", "a.b", "a"] and ancestors("x") == ["x"]
    assert parent_name("a.b.c") == "a.b" and parent_name("a") == "" and parent_name("") is None
    assert within(NAMES, "layer1") == ["layer1", "layer1.0", "layer1.0.conv1", "layer1.0.conv1.weight", "layer1.01"]


@pytest.mark.parametrize("seed", range(3))
def test_the_helpers_agree_with_name_matches(seed):
    rng = random.Random(seed)
    parts = ["layer1", "layer10", "0", "01", "conv1", "head", "fc"]
    names = sorted({".".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(60)})
    for n in names:
        # ancestors: exactly the string prefixes of n that name_matches accepts, innermost first
        assert set(ancestors(n)) == {n[:i] for i in range(1, len(n) + 1) if name_matches(n, n[:i])}
        assert [a.count(".") for a in ancestors(n)] == list(range(n.count("."), -1, -1))
        p = parent_name(n)
        assert p is not None and (p == "" or (name_matches(n, p) and p.count(".") == n.count(".") - 1))
        chosen = set(rng.sample(names, 5))
        assert covered_by(n, chosen) == any(name_matches(n, c) for c in chosen)
    frozen = set(rng.sample(names, 4))
    # the FLOPs ledger's frozen layers follow the same rule (it had its own copy of it)
    assert _frozen_layers(names, frozen) == {n for n in names if any(name_matches(n, f) for f in frozen)}


def test_every_user_of_the_rule_shares_the_one_helper():
    import spfde.sparsity.masks as masks
    from spfde.freezing import cache

    assert masks.name_matches is name_matches
    assert cache._parent is parent_name
