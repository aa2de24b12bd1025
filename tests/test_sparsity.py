"""Sparse engine: masks, distributions, the MEST/SET/RigL/static schedules, checkpoints, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import masked_sgd_steps
from spfde.config import ConfigError, from_dict
from spfde.errors import SpfdeError
from spfde.sparsity import build_sparsity, find_prunable, keep_count, layer_sparsity
from spfde.sparsity.masks import PrunableLayer


class Net(nn.Module):
    """Modules declared out of forward order, so named_modules order != forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def make(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
LAYERS = ["stem", "body.0", "body.3", "head"]


def cfg(method="mest", target=0.8, distribution="uniform", epochs=8, interval=2, search_end=6, **sp):
    return from_dict({"seed": 3, "train": {"epochs": epochs, "interval": interval},
                      "sparsity": {"method": method, "target": target, "distribution": distribution,
                                   "search_end": search_end, **sp}})


def train_epoch(model, engine, opt, steps=2):
    return masked_sgd_steps(model, engine, opt, X, Y, steps)


def counts(engine):
    return {lay.module: int(engine.masks[lay.param].sum()) if lay.param in engine.masks else lay.numel
            for lay in engine.layers}


def expected_sparsity(method, s, epoch, c):
    """The schedule written out independently of spfde.sparsity.schedule (Table A3)."""
    if s == 0:
        return 0.0
    if method != "mest":
        return s
    interval, search_end = c.train.interval, c.search_end
    last = max([e for e in range(1, epoch + 1) if e % interval == 0 and e <= search_end] + [0])
    if epoch >= search_end:
        return s
    grow = c.sparsity.grow_early if last < c.sparsity.grow_switch * search_end else c.sparsity.grow_late
    return max(s - grow, 0.0)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("method", ["mest", "set", "rigl", "static"])
def test_layer_density_follows_schedule_every_step(method, distribution):
    model = make()
    c = cfg(method, 0.8, distribution, grow_early=0.1, grow_late=0.05)
    engine = build_sparsity(model, c, X[:1])
    engine.apply_masks()
    target = engine.layer_sparsity_target()
    numel = {lay.module: lay.numel for lay in engine.layers}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    updates = 0
    for epoch in range(c.train.epochs):
        info = engine.update(epoch)
        updates += info["updated"]
        want = {m: keep_count(numel[m], expected_sparsity(method, target[m], epoch, c)) for m in numel}
        assert counts(engine) == want, (epoch, info)
        for _ in train_epoch(model, engine, opt):
            assert counts(engine) == want
        dens = engine.layer_density()
        assert all(dens[m] == pytest.approx(want[m] / numel[m]) for m in numel)
    assert updates == (0 if method == "static" else 3)  # epochs 2, 4, 6 (search_end)
    final = {m: keep_count(numel[m], target[m]) for m in numel}
    assert counts(engine) == final


def test_uniform_dense_first_and_last_layer_in_forward_order():
    model = make()
    engine = build_sparsity(model, cfg("set", 0.9), X[:1])
    assert [lay.module for lay in engine.layers] == LAYERS
    dens = engine.layer_density()
    # the classifier (last in forward order) stays dense by default, as in the paper and MEST
    assert dens["stem"] == 1.0 and "stem.weight" not in engine.masks
    assert dens["head"] == 1.0 and "head.weight" not in engine.masks
    assert all(abs(dens[m] - 0.1) < 1e-3 for m in LAYERS[1:-1])
    only_first = build_sparsity(make(), cfg("set", 0.9, dense_last_layer=False), X[:1]).layer_density()
    assert only_first["stem"] == 1.0 and abs(only_first["head"] - 0.1) < 1e-3
    # without an example input, named_modules order decides: head comes first, stem last
    engine2 = build_sparsity(make(), cfg("set", 0.9, dense_last_layer=False))
    assert engine2.layer_density()["head"] == 1.0 and engine2.layer_density()["stem"] < 0.2


def test_classifier_dense_by_default_through_the_python_api():
    from spfde import SpFDE

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = SpFDE(model, opt, {"sparsity": {"method": "mest", "target": 0.9}, "train": {"epochs": 2}},
                train_size=8, example_input=X[:2])
    assert "head.weight" not in ctl.sparsity.masks and ctl.sparsity.layer_density()["head"] == 1.0
    assert ctl.sparsity.layer_density()["body.3"] < 0.2


def test_mest_prune_picks_lowest_importance():
    lin = nn.Linear(4, 3, bias=False)
    model = nn.Sequential(lin)
    w = torch.tensor([[0.10, -0.20, 0.30, 0.40], [-0.50, 0.60, 0.70, -0.80], [0.90, 1.00, -1.10, 1.20]])
    g = torch.tensor([[0.90, 0.00, 0.00, 0.00], [0.00, 0.00, 0.00, 0.00], [0.00, 0.00, 0.00, 0.70]])
    lam = 0.5
    # s' = 0 at the start (all weights active), search_end = 2: the update at epoch 2 only prunes to s
    c = from_dict({"train": {"epochs": 4, "interval": 2}, "sparsity": {
        "method": "mest", "target": 0.5, "search_end": 2, "grow_early": 0.5, "dense_first_layer": False,
        "dense_last_layer": False, "mest_lambda": lam}})
    engine = build_sparsity(model, c)
    with torch.no_grad():
        lin.weight.copy_(w)
    assert int(engine.masks["0.weight"].sum()) == 12
    engine.update(0)
    engine.update(1)  # epoch 1 precedes an update: gradients are recorded
    for scale in (1.0, 3.0):  # the statistic is the mean |g| over the epoch's steps: 2.0 * g
        lin.weight.grad = (g * scale).clone()
        engine.before_step()
    info = engine.update(2)
    score = w.abs() + lam * 2.0 * g.abs()
    want = torch.zeros(12, dtype=torch.bool)
    want[score.flatten().argsort(descending=True)[:6]] = True
    assert torch.equal(engine.masks["0.weight"], want.view(3, 4))
    # magnitude alone would have kept a different set: the gradient term matters here
    assert not torch.equal(engine.masks["0.weight"], (w.abs() >= w.abs().flatten().sort().values[6]))
    assert info["pruned"] == 6 and info["grown"] == 0
    assert torch.equal(lin.weight != 0, want.view(3, 4))


def test_mest_grow_counts_and_zero_init():
    model = make()
    c = cfg("mest", 0.9, grow_early=0.1, grow_late=0.05, search_end=6, interval=2, grow_exclude_dropped=True)
    engine = build_sparsity(model, c, X[:1])
    engine.apply_masks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        engine.update(epoch)
        list(train_epoch(model, engine, opt))
    before = {n: m.clone() for n, m in engine.masks.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = engine.update(2)
    total_grown = 0
    for lay in engine.masked_layers:
        old, new = before[lay.param], engine.masks[lay.param]
        pruned, grown = old & ~new, new & ~old
        assert int(pruned.sum()) == keep_count(lay.numel, 0.8) - keep_count(lay.numel, 0.9)
        assert int(grown.sum()) == keep_count(lay.numel, 0.8) - keep_count(lay.numel, 0.9)
        assert not (grown & pruned).any()  # grow_exclude_dropped: just-pruned positions are not regrown
        p = dict(model.named_parameters())[lay.param]
        assert (p[grown] == 0).all() and (p[~new] == 0).all()
        assert torch.equal(p[old & new], weights[lay.param][old & new])  # survivors untouched
        total_grown += int(grown.sum())
    assert info["grown"] == total_grown > 0
    # after the switch (epoch 6 >= 0.75 * 6 is search_end here, so use epoch 4 < 4.5: still early)
    engine.update(3)
    engine.update(4)
    assert counts(engine)["body.3"] == keep_count(16 * 32 * 9, 0.8)


@pytest.mark.parametrize("method", ["mest", "set"])
def test_random_growth_draws_from_every_zero_by_default(method):
    """MEST and SET (RigL's SparseSETOptimizer, sparselearning) grow among all zeros after the prune, the
    just-dropped weights included; ``grow_exclude_dropped`` restores the exclusion. MEST restarts a
    regrown weight at zero (it zeroes what it prunes), SET keeps its value (``reinit_when_same = False``)."""
    regrown = {False: 0, True: 0}
    for exclude in (False, True):
        for seed in range(6):
            model = make()
            c = cfg(method, 0.5, interval=1, search_end=4, grow_early=0.25, drop_fraction=0.8,
                    grow_exclude_dropped=exclude)
            c.seed = seed
            engine = build_sparsity(model, c, X[:1])
            engine.apply_masks()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            engine.update(0)
            list(train_epoch(model, engine, opt))
            before = {n: m.clone() for n, m in engine.masks.items()}
            w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
            engine.update(1)
            engine.after_step(opt)  # the optimizer state of grown weights is reset here
            for lay in engine.masked_layers:
                p = dict(model.named_parameters())[lay.param]
                new, old = engine.masks[lay.param], before[lay.param]
                if method == "mest":  # a weight MEST pruned and regrew restarts at 0 with zero momentum
                    back = new & old & (p.detach() == 0) & (w0[lay.param] != 0)
                    assert (opt.state[p]["momentum_buffer"][back] == 0).all()
                    n_back = int(back.sum())
                else:  # SET drops round(f * active) and keeps a regrown weight's value
                    n_drop = round(engine.schedule.drop_fraction_at(1) * int(old.sum()))
                    n_back = int((new & old).sum()) - (int(old.sum()) - n_drop)
                    assert torch.equal(p.detach()[new & old], w0[lay.param][new & old])
                regrown[exclude] += n_back
    assert regrown[True] == 0 and regrown[False] > 0


def test_pruned_weights_and_momentum_stay_zero():
    model = make()
    engine = build_sparsity(model, cfg("set", 0.75, interval=1, search_end=3, drop_fraction=0.5), X[:1])
    engine.apply_masks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-2, nesterov=True)
    params = dict(model.named_parameters())
    for epoch in range(4):
        engine.update(epoch)
        for _ in train_epoch(model, engine, opt, steps=3):
            for name, mask in engine.masks.items():
                p = params[name]
                assert (p[~mask] == 0).all(), name
                assert (opt.state[p]["momentum_buffer"][~mask] == 0).all(), name
                assert (p[mask] != 0).float().mean() > 0.5  # active weights are trained


def test_adam_state_masked_after_update():
    model = make()
    engine = build_sparsity(model, cfg("mest", 0.8, interval=1, search_end=2), X[:1])
    engine.apply_masks()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    params = dict(model.named_parameters())
    for epoch in range(3):
        engine.update(epoch)
        for _ in train_epoch(model, engine, opt):
            for name, mask in engine.masks.items():
                assert (params[name][~mask] == 0).all()
                assert (opt.state[params[name]]["exp_avg"][~mask] == 0).all()


def test_rigl_grows_at_largest_dense_gradient():
    model = make()
    engine = build_sparsity(model, cfg("rigl", 0.8, interval=2, search_end=6), X[:1])
    engine.apply_masks()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # 6 = search_end: drop fraction 0, no dense gradient needed before it
    assert [engine.needs_dense_grad(e) for e in range(6)] == [False, True, False, True, False, False]
    engine.update(0)
    list(train_epoch(model, engine, opt))
    engine.update(1)
    assert engine.needs_dense_grad(1)
    dense = {}
    for _ in train_epoch(model, engine, opt, steps=1):
        dense = {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # masked now
    # recompute the dense gradient the engine recorded: same weights before the last step
    rec = {n: b.clone() for n, b in engine._grad_buf.items()}
    assert all((rec[n][~engine.masks[n]] != 0).any() for n in rec)  # dense: nonzero at pruned spots
    assert all(torch.equal(rec[n] * engine.masks[n], dense[n]) for n in rec)
    before = {n: m.clone() for n, m in engine.masks.items()}
    engine.update(2)
    for n, new in engine.masks.items():
        old = before[n]
        grown = new & ~old
        cand = ~old  # candidates: zero before the update (just-dropped are excluded)
        assert int(grown.sum()) > 0
        assert rec[n].abs()[grown].min() >= rec[n].abs()[cand & ~grown].max()


def test_static_snip_keeps_highest_sensitivity():
    model = make()
    ref = copy.deepcopy(model)
    engine = build_sparsity(model, cfg("static", 0.7, static_init="snip"), X[:1], snip_batch=(X, Y))
    nn.functional.cross_entropy(ref(X), Y).backward()
    for name, p in ref.named_parameters():
        if name in engine.masks:
            score = (p * p.grad).abs().flatten()
            k = keep_count(p.numel(), 0.7)
            assert engine.masks[name].flatten()[score.argsort(descending=True)[:k]].all()
            assert int(engine.masks[name].sum()) == k
    assert all(p.grad is None for p in model.parameters())
    lazy = build_sparsity(make(), cfg("static", 0.7, static_init="snip"), X[:1])
    with pytest.raises(SpfdeError, match="snip"):
        lazy.update(0)


def test_erk_meets_target_and_redistributes():
    layers = [PrunableLayer("a", "a.weight", (4, 3, 3, 3)), PrunableLayer("b", "b.weight", (64, 4, 3, 3)),
              PrunableLayer("c", "c.weight", (64, 64, 3, 3)), PrunableLayer("d", "d.weight", (10, 64))]
    total = sum(lay.numel for lay in layers)
    for s in (0.5, 0.8, 0.95):
        sp = layer_sparsity(layers, s, "erk", dense_first_layer=False)
        overall = sum((1 - sp[lay.module]) * lay.numel for lay in layers) / total
        assert overall == pytest.approx(1 - s, abs=1e-9)
        assert sp["a"] <= sp["b"] < sp["c"]  # small layers are denser
    sp = layer_sparsity(layers, 0.5, "erk", dense_first_layer=False)
    assert sp["a"] == 0.0  # ERK wanted density > 1: made dense, budget redistributed
    sp = layer_sparsity(layers, 0.9, "erk", dense_first_layer=True, overrides={"d": 0.5})
    assert sp["a"] == 0.0 and sp["d"] == 0.5
    assert sum((1 - sp[lay.module]) * lay.numel for lay in layers) / total == pytest.approx(0.1)
    # the engine's masks realise it
    engine = build_sparsity(make(), cfg("set", 0.9, "erk"), X[:1])
    n = {lay.module: lay.numel for lay in engine.layers}
    assert engine.density() == pytest.approx(0.1, abs=2 / sum(n.values()))


def test_include_exclude_and_overrides():
    model = make()
    assert [lay.module for lay in find_prunable(model)] == ["head", "body.0", "body.3", "stem"]
    assert [lay.module for lay in find_prunable(model, exclude=["body"])] == ["head", "stem"]
    assert [lay.module for lay in find_prunable(model, include=["body.0", "stem"])] == ["body.0", "stem"]
    engine = build_sparsity(model, cfg("static", 0.9, layer_overrides={"head": 0.5}, exclude=["body.3"]), X[:1])
    assert set(engine.layer_density()) == {"stem", "body.0", "head"}
    assert engine.layer_density()["head"] == pytest.approx(0.5)


@pytest.mark.parametrize("kw,match", [
    (dict(layer_overrides={"nope": 0.5}), "nope"),
    (dict(layer_overrides={"body.1": 0.5}), "body.1"),  # a BN module is not prunable
    (dict(exclude=["missing"]), "missing"),
    (dict(include=["ghost"]), "ghost"),
])
def test_bad_layer_names_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_sparsity(make(), cfg("mest", 0.9, **kw), X[:1])


def test_impossible_requests():
    with pytest.raises(ConfigError, match="target"):
        from_dict({"sparsity": {"method": "set", "target": 1.0}})
    layers = [PrunableLayer("tiny", "tiny.weight", (2, 2))]
    with pytest.raises(ConfigError, match="target"):
        layer_sparsity(layers, 1.0)
    with pytest.raises(ConfigError, match="none would remain"):
        layer_sparsity(layers + [PrunableLayer("big", "big.weight", (64, 64))], 0.9, dense_first_layer=False)
    with pytest.raises(ConfigError, match="no prunable layer"):
        build_sparsity(nn.Sequential(nn.BatchNorm1d(4)), cfg("mest", 0.5))
    big = [PrunableLayer("a", "a.weight", (64, 64)), PrunableLayer("b", "b.weight", (8, 8))]
    with pytest.raises(ConfigError, match="erk"):
        layer_sparsity(big, 0.9, "erk", overrides={"a": 0.0})


@pytest.mark.parametrize("prune_on_freeze", [False, True])
def test_frozen_layers_untouched_by_update(prune_on_freeze):
    """A layer freezing at epoch 2 (Δτ = 1): with prune_on_freeze its last update before that (epoch 1)
    prunes it to exactly s and grows nothing; from then on, frozen, it is never edited."""
    model = make()
    engine = build_sparsity(model, cfg("mest", 0.8, interval=1, search_end=3), X[:1])
    names = [lay.module for lay in engine.layers]
    if prune_on_freeze:
        final = engine.schedule.last_update_epochs(names, lambda e: {"body.3"} if e >= 2 else set())
        assert final["body.3"] == 1 and final["body.0"] == 3
        engine.set_final_updates(final)
    engine.apply_masks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    n = model.body[3].weight.numel()
    engine.update(0)
    list(train_epoch(model, engine, opt))
    before = engine.masks["body.3.weight"].clone()
    w = model.body[3].weight.detach().clone()
    assert int(before.sum()) == keep_count(n, 0.8 - 0.05)  # MEST's soft bound s' = s - 0.05
    info = engine.update(1)
    mask = engine.masks["body.3.weight"]
    if prune_on_freeze:  # its final update: pruned to s by |w|, nothing grown, survivors bit for bit
        assert int(mask.sum()) == keep_count(n, 0.8) and not (mask & ~before).any()
        assert torch.equal(model.body[3].weight, w * mask)
        assert w.abs()[before & ~mask].max() <= w.abs()[mask].min()
    else:
        assert int(mask.sum()) == keep_count(n, 0.8 - 0.05) and info["grown"] > 0
    assert int(engine.masks["body.0.weight"].sum()) == keep_count(model.body[0].weight.numel(), 0.75)
    list(train_epoch(model, engine, opt))
    frozen_mask = engine.masks["body.3.weight"].clone()
    w = model.body[3].weight.detach().clone()
    other = engine.masks["body.0.weight"].clone()
    for epoch in (2, 3):  # frozen from epoch 2: the update at 2 and the final prune at 3 skip it
        info = engine.update(epoch, frozen_params={"body.3.weight"})
        assert info["frozen_skipped"] == ["body.3"]
        assert torch.equal(engine.masks["body.3.weight"], frozen_mask)
        assert torch.equal(model.body[3].weight, w)
    assert not torch.equal(engine.masks["body.0.weight"], other)
    want = keep_count(n, 0.8 if prune_on_freeze else 0.75)
    assert int(engine.masks["body.3.weight"].sum()) == want


def test_layer_taking_part_in_no_update_starts_at_its_target():
    """A layer frozen before the first update: the initial mask is its last structure decision."""
    engine = build_sparsity(make(), cfg("mest", 0.8, interval=2, search_end=6), X[:1])
    n = {lay.module: lay.numel for lay in engine.layers}
    assert counts(engine)["body.0"] == keep_count(n["body.0"], 0.75)
    before = engine.masks["body.0.weight"].clone()
    engine.set_final_updates(engine.schedule.last_update_epochs(n, lambda e: {"body.0"}))
    assert counts(engine)["body.0"] == keep_count(n["body.0"], 0.8)
    assert counts(engine)["body.3"] == keep_count(n["body.3"], 0.75)
    assert not (engine.masks["body.0.weight"] & ~before).any()  # the same draw, shrunk


def test_state_dict_round_trip_and_determinism():
    def run(seed_model: int):
        model = make(seed_model)
        engine = build_sparsity(model, cfg("mest", 0.8, interval=1, search_end=3, mest_lambda=1.0), X[:1])
        engine.apply_masks()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for epoch in range(3):
            engine.update(epoch)
            list(train_epoch(model, engine, opt))
        return model, engine

    model, engine = run(0)
    model2, engine2 = run(0)
    assert all(torch.equal(engine.masks[n], engine2.masks[n]) for n in engine.masks)
    state = copy.deepcopy(engine.state_dict())
    assert state["grad_buf"]  # epoch 2 precedes the update at 3: the statistic is checkpointed
    fresh_model = make(5)
    fresh = build_sparsity(fresh_model, from_dict({"seed": 99, "train": {"epochs": 8, "interval": 1}, "sparsity": {
        "method": "mest", "target": 0.8, "search_end": 3, "mest_lambda": 1.0}}), X[:1])
    assert any(not torch.equal(fresh.masks[n], engine.masks[n]) for n in engine.masks)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    fresh.apply_masks()
    assert all(torch.equal(fresh.masks[n], engine.masks[n]) for n in engine.masks)
    assert fresh.layer_density() == engine.layer_density()
    # the resumed engine makes the same next update as the original
    a, b = engine.update(3), fresh.update(3)
    assert a["pruned"] == b["pruned"] > 0
    assert all(torch.equal(fresh.masks[n], engine.masks[n]) for n in engine.masks)
    assert engine.update(3)["updated"] is False  # idempotent per epoch
    with pytest.raises(SpfdeError, match="method"):
        build_sparsity(make(), cfg("set", 0.8), X[:1]).load_state_dict(state)


def test_dense_method():
    model = make()
    engine = build_sparsity(model, cfg("dense", 0.0), X[:1])
    assert engine.masks == {} and engine.density() == 1.0
    assert set(engine.layer_density().values()) == {1.0}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        assert engine.update(epoch)["updated"] is False
        list(train_epoch(model, engine, opt))


def test_a_target_that_prunes_nothing_says_so() -> None:
    """Two prunable layers, both edges kept dense: a run would train dense under a sparse target."""
    from torch import nn

    from spfde.config import load_config
    from spfde.sparsity import SparsityWarning, build_sparsity

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(SparsityWarning, match="prunes nothing.*'1', '3'.*dense_first_layer"):
        engine = build_sparsity(model, load_config(None, ["sparsity.target=0.5"]), torch.randn(1, 16))
    assert all(m.all() for m in engine.masks.values())
    engine = build_sparsity(model, load_config(None, ["sparsity.target=0.5", "sparsity.dense_first_layer=false"]),
                            torch.randn(1, 16))
    assert not engine.masks["1.weight"].all()


def test_a_weight_the_user_fixed_is_never_pruned():
    """A parameter set to requires_grad=False before SpFDE is built (a pretrained stem) gets no gradient:
    pruning it would zero weights that can never grow back. The freezing blocks already leave it alone."""
    model = make()
    model.body[0].weight.requires_grad_(False)
    assert "body.0" not in [lay.module for lay in find_prunable(model)]
    assert "body.0" not in [lay.module for lay in find_prunable(model, include=["body"])]
    with pytest.raises(ConfigError, match="requires_grad=False"):
        find_prunable(model, include=["body.0"])
    before = model.body[0].weight.detach().clone()
    engine = build_sparsity(model, cfg("mest", 0.9), X[:1])
    engine.apply_masks()
    assert "body.0" not in engine.layer_density() and "body.3" in engine.layer_density()
    assert torch.equal(model.body[0].weight.detach(), before)  # not one weight of it zeroed
    # a model whose every prunable weight is fixed (one an earlier run froze) says so, not "no conv/linear"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"every prunable weight of .* requires_grad=False .*requires_grad_\(True\)"):
        find_prunable(model)
