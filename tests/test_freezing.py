"""Progressive layer freezing: blocks, Algorithm 1 planner, schemes, Freezer, block-wise LR."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from spfde.config import from_dict
from spfde.errors import ConfigError, SpfdeError
from spfde.freezing import (
    SCHEMES,
    BlockLR,
    FreezePlan,
    Freezer,
    block_lr,
    plan_freezing,
    plan_reduction,
    resolve_blocks,
    split_param_groups_by_block,
)

# --------------------------------------------------------------------------------------- models


class Tiny(nn.Module):
    """stem (conv+BN) -> body (conv+BN) -> head (linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.body(self.stem(x))), 1))

    def blocks(self) -> list[str]:
        return ["stem", "body", "head"]


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


# --------------------------------------------------------------------------------------- blocks


def test_resolve_blocks_from_model_and_partition() -> None:
    m = tiny()
    blocks = resolve_blocks(m, example_input=data()[0])
    assert [b.name for b in blocks] == ["stem", "body", "head"]
    names = [p for b in blocks for p in b.param_names]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())  # each exactly once
    assert "stem.1" in blocks[0].module_names and "stem" in blocks[0].module_names


def test_resolve_blocks_cifar_resnet_matches_model_blocks() -> None:
    from spfde.models import create_model

    m = create_model("resnet20", num_classes=10)
    blocks = resolve_blocks(m, example_input=torch.zeros(1, 3, 16, 16))
    assert [b.name for b in blocks] == m.blocks()
    assert sum(len(b.param_names) for b in blocks) == len(list(m.parameters()))


def test_resolve_blocks_errors() -> None:
    m = tiny()
    x = data()[0]
    with pytest.raises(SpfdeError, match="no blocks"):
        resolve_blocks(NoBlocks())
    # the error's example names the model's own modules (a Sequential's are '0', '2', ...), not a ResNet's
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"its top-level modules with parameters are \['0', '2', '3'\]"):
        resolve_blocks(seq)
    with pytest.raises(SpfdeError, match="nonexistent"):
        resolve_blocks(m, ["stem", "nonexistent", "head"])
    with pytest.raises(SpfdeError, match="no freezing block") as e:
        resolve_blocks(m, ["stem", "head"])
    assert "body.0.weight" in str(e.value)
    with pytest.raises(SpfdeError, match="two freezing blocks"):
        resolve_blocks(m, ["stem", "stem.0", "body", "head"])
    with pytest.raises(SpfdeError, match="forward order"):
        resolve_blocks(m, ["body", "stem", "head"], example_input=x)
    # Without an example input the order cannot be checked, but the partition still is.
    assert [b.name for b in resolve_blocks(m, ["body", "stem", "head"])] == ["body", "stem", "head"]


def test_resolve_blocks_prefix_callable_and_paramless() -> None:
    m = tiny()
    x = data()[0]
    # "pool" has no parameters: dropped. A nested list groups two modules into one block.
    blocks = resolve_blocks(m, [["stem", "body"], "pool", "head"], example_input=x)
    assert [b.name for b in blocks] == ["stem+body", "head"]
    # A plain string prefix that is not a module name.
    m2 = NoBlocks()
    assert [b.name for b in resolve_blocks(m2, ["a", "b"])] == ["a", "b"]
    # A callable is sorted into forward order with the example input (ids given back to front).
    rank = {"stem": "z", "body": "y", "head": "x"}
    blocks = resolve_blocks(m, lambda name, mod: rank.get(name), example_input=x)
    assert [b.name for b in blocks] == ["z", "y", "x"]
    assert "stem.0" in blocks[0].module_names


def test_resolve_blocks_probe_leaves_bn_stats_alone() -> None:
    m = tiny()
    before = copy.deepcopy(m.state_dict())
    m.train()
    resolve_blocks(m, example_input=data()[0])
    assert m.training and all(mod.training for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------------------- planner

BP = [4.0, 3.0, 2.0, 1.0]


def test_plan_matches_hand_algorithm1() -> None:
    # T = 20, Δτ = 2, Tfrz = 4, one epoch costs 30 -> total 600; target 20% -> target_flops 480.
    #   block0: saved 4 * (20 - 4 - 0) = 64  -> 536 > 480, continue
    #   block1: saved 3 * (20 - 4 - 2) = 42  -> 494 > 480, continue
    #   block2: saved 2 * (20 - 4 - 4) = 24  -> 470 <= 480, stop
    # predicted reduction = (64 + 42 + 24) / 600 = 130 / 600.
    plan = plan_freezing(BP, 30.0, epochs=20, interval=2, target=0.2, tfrz=4, block_names=list("abcd"))
    assert plan.tfrz == 4
    assert plan.blocks == [("a", 4), ("b", 6), ("c", 8)]
    assert plan.predicted_reduction == pytest.approx(130 / 600)
    assert plan_reduction(plan, BP, 30.0) == pytest.approx(130 / 600)
    assert plan.frozen_at(3) == set() and plan.frozen_at(4) == {0} and plan.frozen_at(7) == {0, 1}
    assert plan.frozen_at(19) == {0, 1, 2}
    j = plan.to_json()
    assert j["tfrz"] == 4 and j["predicted_reduction"] == pytest.approx(130 / 600)
    assert j["blocks"] == [{"name": "a", "freeze_epoch": 4}, {"name": "b", "freeze_epoch": 6},
                           {"name": "c", "freeze_epoch": 8}]
    assert FreezePlan.from_json(j) == plan


def test_tfrz_auto_hand_example() -> None:
    # 4 freezable blocks, 2/3 -> at most 2 blocks. Total 25 * 20 = 500; need saved >= 100.
    # Two blocks at Tfrz: 4(20 - Tfrz) + 3(18 - Tfrz) = 134 - 7 Tfrz >= 100  <=>  Tfrz <= 4.86.
    # Latest grid point (Δτ = 2): Tfrz = 4; block0 alone saves 64 < 100, so both: 106 / 500.
    plan = plan_freezing(BP, 25.0, epochs=20, interval=2, target=0.2, tfrz="auto", freezable=4)
    assert plan.tfrz == 4
    assert [f for _, f in plan.blocks] == [4, 6]
    assert plan.predicted_reduction == pytest.approx(106 / 500)


@pytest.mark.parametrize("seed", range(6))
def test_tfrz_auto_is_latest_grid_point_meeting_target(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(3, 8, (1,), generator=g))
    bp = (torch.rand(n, generator=g) * 10 + 0.1).tolist()
    epochs, interval, target = 40, 4, 0.15
    epoch_flops = 1.5 * sum(bp)  # backward is 2/3 of training -> bp / epoch_flops plausible
    freezable = n - 1
    cap = min(freezable, max(1, math.floor(2 / 3 * n + 1e-9)))  # 2/3 of all n blocks, head included

    def brute(t0: int) -> float:  # freeze the first `cap` blocks at t0 + i*interval
        return sum(bp[i] * max(epochs - t0 - interval * i, 0) for i in range(cap)) / (epoch_flops * epochs)

    ok = [t for t in range(interval, epochs, interval) if brute(t) >= target]
    if not ok:
        with pytest.raises(SpfdeError, match="unreachable"):
            plan_freezing(bp, epoch_flops, epochs, interval, target, "auto", freezable=freezable)
        return
    plan = plan_freezing(bp, epoch_flops, epochs, interval, target, "auto", freezable=freezable)
    assert plan.tfrz == max(ok)
    assert len(plan.blocks) <= cap
    assert plan.predicted_reduction >= target
    # Algorithm 1 stops as soon as the target is met: one block fewer would not be enough.
    fewer = sum(bp[i] * (epochs - plan.blocks[i][1]) for i in range(len(plan.blocks) - 1))
    assert fewer / (epoch_flops * epochs) < target


def test_unreachable_target_states_max() -> None:
    # config values no plan can follow are configuration errors (exit code 2)
    # auto: 2/3 of 4 blocks -> at most 2, earliest Tfrz = 2: 4*18 + 3*16 = 120 of 500 -> 24.00%.
    with pytest.raises(ConfigError, match=r"24\.00%"):
        plan_freezing(BP, 25.0, 20, 2, 0.5, "auto", freezable=4)
    # explicit Tfrz = 4, all blocks: 4*16 + 3*14 + 2*12 + 1*10 = 140 of 500 -> 28.00%.
    with pytest.raises(ConfigError, match=r"28\.00%"):
        plan_freezing(BP, 25.0, 20, 2, 0.5, 4)


def test_unreachable_reduce_freezes_as_much_as_the_schedule_allows() -> None:
    """Audit H6 / issue 16 item 3: ``freezing.unreachable: reduce`` plans the maximum the error above
    states, flagged ``reduced``; a reachable target plans exactly as under ``error``."""
    auto = plan_freezing(BP, 25.0, 20, 2, 0.5, "auto", freezable=4, unreachable="reduce")
    assert auto.reduced and auto.tfrz == 2 and [f for _, f in auto.blocks] == [2, 4]  # the earliest Tfrz, 2 blocks
    assert auto.predicted_reduction == pytest.approx(120 / 500) == plan_reduction(auto, BP, 25.0)
    fixed = plan_freezing(BP, 25.0, 20, 2, 0.5, 4, unreachable="reduce")
    assert fixed.reduced and fixed.tfrz == 4 and [f for _, f in fixed.blocks] == [4, 6, 8, 10]  # the user's Tfrz
    assert fixed.predicted_reduction == pytest.approx(140 / 500)
    assert fixed.to_json()["reduced"] is True and FreezePlan.from_json(fixed.to_json()) == fixed
    ok = plan_freezing(BP, 25.0, 20, 2, 0.2, "auto", freezable=4, unreachable="reduce")
    assert not ok.reduced and ok == plan_freezing(BP, 25.0, 20, 2, 0.2, "auto", freezable=4)
    assert "reduced" not in ok.to_json()
    # T <= Δτ leaves no epoch on the grid to freeze at: an empty plan (an error under `error`)
    none = plan_freezing(BP, 25.0, 2, 2, 0.2, "auto", freezable=4, unreachable="reduce")
    assert none.reduced and none.blocks == [] and none.predicted_reduction == 0.0 and none.frozen_at(1) == set()
    with pytest.raises(ConfigError, match="auto needs"):
        plan_freezing(BP, 25.0, 2, 2, 0.2, "auto", freezable=4)
    with pytest.raises(ConfigError, match="unreachable"):
        plan_freezing(BP, 25.0, 20, 2, 0.2, "auto", unreachable="bogus")
    with pytest.raises(ConfigError, match="head"):  # the model, not the schedule: an error under both
        plan_freezing([5.0], 25.0, 20, 2, 0.2, 4, freezable=0, unreachable="reduce")


@pytest.mark.parametrize("scheme", ["single_shot_resume", "periodic", "delayed_periodic"])
def test_unreachable_reduce_in_every_scheme_saves_the_most_that_scheme_can(scheme: str) -> None:
    with pytest.raises(ConfigError, match="unreachable"):
        plan_freezing(BP, 25.0, 20, 2, 0.9, "auto", scheme=scheme, freezable=4)
    plan = plan_freezing(BP, 25.0, 20, 2, 0.9, "auto", scheme=scheme, freezable=4, unreachable="reduce")
    assert plan.reduced and plan.blocks and 0 < plan.predicted_reduction < 0.9
    assert plan.predicted_reduction == pytest.approx(plan_reduction(plan, BP, 25.0))
    reached = []
    for t in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35):
        try:
            reached.append(plan_freezing(BP, 25.0, 20, 2, t, "auto", scheme=scheme, freezable=4).predicted_reduction)
        except ConfigError:
            pass
    assert reached and max(reached) <= plan.predicted_reduction + 1e-12  # no reachable plan saves more


def test_unreachable_reduce_in_the_controller_warns_once_with_target_and_reached() -> None:
    from spfde import SpFDE
    from spfde.freezing import FreezingWarning

    def build(unreachable: str, planner: str = "algorithm1") -> SpFDE:
        torch.manual_seed(0)
        model = Tiny()
        cfg = {"train": {"epochs": 3, "interval": 1},
               "freezing": {"target": 0.5, "unreachable": unreachable, "planner": planner}}
        return SpFDE(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, train_size=32,
                     example_input=torch.randn(2, 3, 8, 8))

    with pytest.raises(ConfigError, match="unreachable"):
        build("error")
    for planner in ("algorithm1", "exact"):
        with pytest.warns(FreezingWarning) as rec:
            ctl = build("reduce", planner)
        assert len(rec) == 1
        text = str(rec[0].message)
        assert "\n" not in text and "freezing.target = 50.00% is unreachable in train.epochs = 3" in text
        assert f"{100 * ctl.plan.predicted_reduction:.2f}% by the exact ledger" in text
        assert ctl.plan.reduced and ctl.plan.blocks and ctl.plan.to_json()["reduced"] is True
        assert 0 < ctl.plan.predicted_reduction < 0.5


def test_off_grid_tfrz_is_rejected_and_fractions_snap() -> None:
    """Algorithm 1 freezes only at epoch mod Δτ == 0: an off-grid Tfrz is a ConfigError naming the grid
    points around it; a fraction of train.epochs snaps to the nearest grid point."""
    with pytest.raises(ConfigError, match=r"off the Δτ grid.*use 4 or 6"):
        plan_freezing(BP, 25.0, 20, 2, 0.2, 5)
    assert plan_freezing(BP, 25.0, 20, 2, 0.2, 6).tfrz == 6
    c = from_dict({"train": {"epochs": 160, "interval": 5}, "freezing": {"tfrz": 0.37}})
    assert c.tfrz == 60  # 0.37 * 160 = 59.2 -> the nearest multiple of 5
    assert from_dict({"train": {"epochs": 20, "interval": 4}, "freezing": {"tfrz": 0.01}}).tfrz == 4
    with pytest.raises(ConfigError, match="fraction"):
        from_dict({"freezing": {"tfrz": 1.5}})


def test_head_excluded_and_bad_inputs() -> None:
    plan = plan_freezing([1.0, 1.0, 100.0], 10.0, 20, 2, 0.15, 2, freezable=2)
    assert len(plan.blocks) <= 2
    with pytest.raises(SpfdeError, match="tfrz"):
        plan_freezing(BP, 25.0, 20, 2, 0.2, 20)
    with pytest.raises(SpfdeError, match="scheme"):
        plan_freezing(BP, 25.0, 20, 2, 0.2, 4, scheme="bogus")
    with pytest.raises(SpfdeError, match="head"):
        plan_freezing([5.0], 25.0, 20, 2, 0.2, 4, freezable=0)


def realized(plan: FreezePlan, bp: list[float], epoch_flops: float) -> float:
    total = 0.0
    for e in range(plan.epochs):
        total += sum(bp[i] for i in plan.frozen_at(e))
    return total / (epoch_flops * plan.epochs)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bp", [[4.0, 3.0, 2.0, 1.0, 1.0], [1.0] * 9, [2.0, 5.0, 5.0, 3.0, 1.0, 0.5, 2.0]])
def test_every_scheme_is_prefix_and_meets_target(scheme: str, bp: list[float]) -> None:
    epochs, interval, target = 40, 4, 0.2
    epoch_flops = 1.5 * sum(bp)
    freezable = len(bp) - 1
    try:
        plan = plan_freezing(bp, epoch_flops, epochs, interval, target, "auto", scheme=scheme, freezable=freezable)
    except SpfdeError as e:  # only acceptable when even the unconstrained pattern cannot reach it
        assert "unreachable" in str(e)
        pytest.skip("target unreachable for this toy")
    n = len(bp)
    for e in range(epochs + 3):
        fr = plan.frozen_at(e)
        assert fr == set(range(len(fr))), (e, fr)  # a prefix
        assert len(fr) <= freezable < n  # the head never freezes
    red = realized(plan, bp, epoch_flops)
    assert red >= target - 1e-12
    assert red == pytest.approx(plan.predicted_reduction)
    assert json_roundtrip(plan) == plan


def json_roundtrip(plan: FreezePlan) -> FreezePlan:
    import json

    return FreezePlan.from_json(json.loads(json.dumps(plan.to_json())))


def test_resume_same_reduction_shifted_and_defrosted() -> None:
    bp, epochs, interval = [4.0, 3.0, 2.0, 1.0, 1.0], 40, 4
    base = plan_freezing(bp, 20.0, epochs, interval, 0.2, 12, freezable=4)
    res = plan_freezing(bp, 20.0, epochs, interval, 0.2, 12, scheme="single_shot_resume", freezable=4,
                        resume_epochs=3)
    assert [f for _, f in res.blocks] == [f - 3 for _, f in base.blocks]
    assert res.defrost_epoch == epochs - 3 and res.tfrz == 9
    assert res.frozen_at(epochs - 4) == base.frozen_at(epochs - 1) and res.frozen_at(epochs - 3) == set()
    assert realized(res, bp, 20.0) == pytest.approx(realized(base, bp, 20.0))
    with pytest.raises(SpfdeError, match="resume_epochs"):
        plan_freezing(bp, 20.0, epochs, interval, 0.2, 12, scheme="single_shot_resume", freezable=4,
                      resume_epochs=12)


def test_periodic_pattern_and_group_choice() -> None:
    bp, epochs = [4.0, 3.0, 2.0, 1.0, 1.0], 20
    plan = plan_freezing(bp, 25.0, epochs, 2, 0.2, "auto", scheme="periodic", freezable=4)
    # Over epochs 0..19 a period-4 block is frozen 15 epochs, a period-2 block 10. Appendix B: a front
    # group (1/4) and a middle group (1/2), both non-empty; the last group never freezes.
    # Two blocks: only (P4,P2) = 60 + 30 = 90 < 100 ((P4,P4) = 105 has no middle group).
    # Three: (P4,P4,P2) = 60 + 45 + 20 = 125, (P4,P2,P2) = 60 + 30 + 20 = 110 -> the closest above 100.
    assert plan.periods == [4, 2, 2] and plan.predicted_reduction == pytest.approx(110 / 500)
    assert plan.frozen_at(0) == set() and plan.frozen_at(1) == {0, 1, 2} and plan.frozen_at(2) == {0}
    assert plan.frozen_at(4) == set()
    # A mixed split: period-4 blocks are frozen whenever period-2 blocks are.
    mixed = FreezePlan(tfrz=0, scheme="periodic", blocks=[("a", 1), ("b", 1)], predicted_reduction=0.0,
                       epochs=8, interval=2, periods=[4, 2])
    assert [sorted(mixed.frozen_at(e)) for e in range(8)] == [[], [0, 1], [0], [0, 1], [], [0, 1], [0], [0, 1]]
    with pytest.raises(SpfdeError, match="powers of two"):
        FreezePlan(tfrz=0, scheme="periodic", blocks=[("a", 1), ("b", 1)], predicted_reduction=0.0,
                   epochs=8, interval=2, periods=[2, 4])


@pytest.mark.parametrize("scheme", ["periodic", "delayed_periodic"])
@pytest.mark.parametrize("bp", [[4.0, 3.0, 2.0, 1.0, 1.0], [1.0] * 9, [9.0, 1.0, 1.0, 1.0], [1.0] * 17])
def test_periodic_groups_follow_appendix_b(scheme: str, bp: list[float]) -> None:
    """Front group period 4, middle group period 2, both non-empty; the last group (here also when the
    head may freeze) always trains."""
    try:
        plan = plan_freezing(bp, 1.2 * sum(bp), 40, 4, 0.2, "auto", scheme=scheme, freezable=len(bp))
    except ConfigError as e:
        assert "unreachable" in str(e) and "both non-empty" in str(e)
        pytest.skip("target unreachable for this toy")
    assert plan.periods.count(4) >= 1 and plan.periods.count(2) >= 1
    assert plan.periods == sorted(plan.periods, reverse=True) and set(plan.periods) == {2, 4}
    assert len(plan.periods) < len(bp)
    assert all(len(bp) - 1 not in plan.frozen_at(e) for e in range(40))


def test_delayed_periodic_trains_everything_first() -> None:
    bp = [1.0] * 9
    plan = plan_freezing(bp, 12.0, 40, 4, 0.2, 8, scheme="delayed_periodic", freezable=8)
    assert plan.tfrz == 8
    assert all(plan.frozen_at(e) == set() for e in range(9))
    assert plan.frozen_at(9) == set(range(len(plan.blocks)))
    early = plan_freezing(bp, 12.0, 40, 4, 0.2, "auto", scheme="periodic", freezable=8)
    assert len(plan.blocks) >= len(early.blocks)  # a delayed start needs at least as many blocks


# --------------------------------------------------------------------------------------- Freezer


def manual_plan(freeze: list[tuple[str, int]], epochs: int = 10, **kw) -> FreezePlan:
    return FreezePlan(tfrz=freeze[0][1], scheme=kw.pop("scheme", "single_shot"), blocks=freeze,
                      predicted_reduction=0.0, epochs=epochs, interval=1, **kw)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    for s in range(steps):
        x, y = data(seed=seed * 100 + s)
        model.train()  # the user's loop calls train() every epoch: frozen BN must stay fixed
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_freezer_keeps_frozen_block_bit_identical_through_sgd() -> None:
    m = tiny()
    blocks = resolve_blocks(m, example_input=data()[0])
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-2)
    fr = Freezer(m, blocks, manual_plan([("stem", 1)]), opt)
    assert fr.apply(0) == {"frozen_now": [], "defrosted_now": []}
    train_steps(m, opt, 3, seed=1)  # momentum buffers exist for every parameter now
    stem_params = [p for n, p in m.named_parameters() if n.startswith("stem.")]
    assert all(p in opt.state for p in stem_params)

    info = fr.apply(1)
    assert info["frozen_now"] == ["stem"]
    assert fr.frozen_block_names == ["stem"]
    assert fr.frozen_param_names() == {n for n, _ in m.named_parameters() if n.startswith("stem.")}
    assert {"stem", "stem.0", "stem.1", "stem.2"} <= fr.frozen_module_names()
    assert all(not p.requires_grad and p.grad is None for p in stem_params)
    assert not any(p in opt.state for p in stem_params)  # optimizer state dropped
    assert fr.active_params() == sum(p.numel() for n, p in m.named_parameters() if not n.startswith("stem."))

    stem_before = {k: v.clone() for k, v in m.stem.state_dict().items()}
    body_before = {k: v.clone() for k, v in m.body.state_dict().items()}
    train_steps(m, opt, 4, seed=2)
    for k, v in m.stem.state_dict().items():  # weights, bias AND running stats
        assert torch.equal(v, stem_before[k]), k
    assert not m.stem[1].training
    changed = [k for k, v in m.body.state_dict().items() if not torch.equal(v, body_before[k])]
    assert "0.weight" in changed and "1.running_mean" in changed  # the rest still trains


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_frozen_prefix_records_no_autograd() -> None:
    m = tiny()
    x, y = data()
    blocks = resolve_blocks(m, example_input=x)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def run() -> tuple[dict[str, int], int, list[torch.Size]]:
        calls = {"stem": 0, "body": 0}
        outs_need_grad = {}
        handles = []
        for name in calls:
            mod = getattr(m, name)
            handles.append(mod.register_full_backward_hook(
                lambda *_a, _n=name: calls.__setitem__(_n, calls[_n] + 1)))
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, _n=name: outs_need_grad.__setitem__(_n, out.requires_grad)))
        shapes: list[torch.Size] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        for h in handles:
            h.remove()
        assert outs_need_grad["body"]
        return calls, int(not outs_need_grad["stem"]), shapes

    m.train()
    calls, _, shapes_all = run()
    assert calls == {"stem": 1, "body": 1}
    assert x.shape in shapes_all  # the first conv saves the raw input when it trains

    Freezer(m, blocks, manual_plan([("stem", 0)]), opt).apply(0)
    m.zero_grad(set_to_none=True)
    calls, stem_out_is_const, shapes_frz = run()
    assert calls == {"stem": 0, "body": 1}  # no backward ran through the frozen block
    assert stem_out_is_const
    assert x.shape not in shapes_frz  # nothing saved for the frozen block's input
    assert len(shapes_frz) < len(shapes_all)
    assert all(p.grad is None for p in m.stem.parameters())


def test_defrost_and_state_dict_roundtrip() -> None:
    m = tiny()
    blocks = resolve_blocks(m, example_input=data()[0])
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    plan = manual_plan([("stem", 1), ("body", 2)], epochs=6, scheme="single_shot_resume", defrost_epoch=4)
    fr = Freezer(m, blocks, plan, opt)
    fr.apply(2)
    assert fr.frozen_block_names == ["stem", "body"]
    state = fr.state_dict()

    m2 = copy.deepcopy(tiny())
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    fr2 = Freezer(m2, resolve_blocks(m2), plan, opt2)
    fr2.load_state_dict(torch.load(_save(state), weights_only=False))
    assert fr2.frozen_block_names == ["stem", "body"]
    assert [p.requires_grad for p in m2.parameters()] == [p.requires_grad for p in m.parameters()]
    m2.train()
    m2(data()[0])
    assert not m2.stem[1].training  # the BN hook is re-installed on load

    info = fr.apply(4)  # defrost all for the last epochs
    assert info["defrosted_now"] == ["stem", "body"] and fr.frozen_block_names == []
    assert all(p.requires_grad for p in m.parameters())
    m.train()
    before = m.stem[1].running_mean.clone()
    train_steps(m, opt, 1, seed=3)
    assert m.stem[1].training and not torch.equal(before, m.stem[1].running_mean)


def _save(obj: object):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_freezer_rejects_mismatched_plan() -> None:
    m = tiny()
    with pytest.raises(SpfdeError, match="same blocks"):
        Freezer(m, resolve_blocks(m), manual_plan([("body", 1)]), None)


# --------------------------------------------------------------------------------------- LR


def test_split_param_groups_by_block() -> None:
    m = tiny()
    blocks = resolve_blocks(m)
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in m.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-3}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    split_param_groups_by_block(opt, m, blocks)
    assert len(opt.param_groups) == 6
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters())  # every parameter exactly once
    owner = {id(p): b.name for b in blocks for n, p in m.named_parameters() if n in b.param_names}
    for g in opt.param_groups:
        assert {owner[id(p)] for p in g["params"]} == {g["block"]}
        assert g["momentum"] == 0.9 and g["nesterov"] is True
        wd = {1e-3 if any(p is q for q in decay) else 0.0 for p in g["params"]}
        assert wd == {g["weight_decay"]}
    train_steps(m, opt, 1, seed=0)  # the optimizer still works


def test_block_lr_known_points() -> None:
    assert block_lr(0.1, 0.0, 0.0, 10) == pytest.approx(0.1)
    assert block_lr(0.1, 0.0, 5.0, 10) == pytest.approx(0.05)
    assert block_lr(0.1, 0.01, 5.0, 10) == pytest.approx(0.055)
    assert block_lr(0.1, 0.0, 2.5, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert block_lr(0.1, 0.001, 10.0, 10) == pytest.approx(0.001)
    assert block_lr(0.1, 0.001, 15.0, 10) == pytest.approx(0.001)
    assert block_lr(0.1, 0.0, 1.0, 10, warmup_epochs=2) == pytest.approx(0.05)
    assert block_lr(0.1, 0.0, 6.0, 10, warmup_epochs=2) == pytest.approx(0.05)


def test_block_lr_names_the_blocks_that_freeze_before_the_warmup_ends() -> None:
    m = tiny()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    split_param_groups_by_block(opt, m, resolve_blocks(m))
    plan = manual_plan([("stem", 2), ("body", 6)], epochs=12)
    sched = BlockLR(opt, plan, 12, 0.1, 0.0, warmup_epochs=2)
    assert sched.frozen_in_warmup() == [("stem", 2)]
    # what the warning says: the stem's rate is still rising on its last active step and never reaches 0.1
    assert sched.lr_for("stem", 1.99) < 0.1 and sched.lr_for("body", 2.0) == pytest.approx(0.1)
    assert BlockLR(opt, plan, 12, 0.1, 0.0, warmup_epochs=1).frozen_in_warmup() == []
    assert BlockLR(opt, plan, 12, 0.1, 0.0, warmup_epochs=6).frozen_in_warmup() == [("stem", 2), ("body", 6)]
    # block-wise LR off, no warmup, or no plan: every block follows the global schedule, nothing to say
    assert BlockLR(opt, plan, 12, 0.1, 0.0, block_lr_enabled=False, warmup_epochs=6).frozen_in_warmup() == []
    assert BlockLR(opt, plan, 12, 0.1, 0.0).frozen_in_warmup() == []
    assert BlockLR(opt, None, 12, 0.1, 0.0, warmup_epochs=6).frozen_in_warmup() == []


def test_block_lr_scheduler_per_block() -> None:
    m = tiny()
    blocks = resolve_blocks(m)
    opt = torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9)
    split_param_groups_by_block(opt, m, blocks)
    plan = manual_plan([("stem", 4), ("body", 6)], epochs=12)
    sched = BlockLR(opt, plan, 12, base_lr=0.1, end_lr=0.0)
    sched.set(2.0)
    lrs = sched.lrs()
    assert lrs["stem"] == pytest.approx(0.05)  # halfway through its 4 active epochs
    assert lrs["body"] == pytest.approx(0.05 * (1 + math.cos(math.pi / 3)))
    assert lrs["head"] == pytest.approx(0.05 * (1 + math.cos(math.pi / 6)))  # global cosine over T
    assert {g["block"]: g["lr"] for g in opt.param_groups} == lrs
    sched.set(5.0)
    assert sched.lrs()["stem"] == 0.0
    off = BlockLR(opt, plan, 12, 0.1, 0.0, block_lr_enabled=False)
    off.set(2.0)
    assert list(off.lrs().values()) == [pytest.approx(0.05 * (1 + math.cos(math.pi / 6)))] * 3
    # No plan and unsplit groups: one global cosine.
    opt2 = torch.optim.SGD(m.parameters(), lr=1.0)
    none = BlockLR(opt2, None, 12, 0.1, 0.0)
    none.set(6.0)
    assert none.lrs() == {"all": pytest.approx(0.05)}
    # single_shot_resume: after the defrost every block follows the global cosine.
    res = manual_plan([("stem", 3), ("body", 5)], epochs=12, scheme="single_shot_resume", defrost_epoch=10)
    sched = BlockLR(opt, res, 12, 0.1, 0.0)
    sched.set(10.5)
    assert sched.lrs()["stem"] == pytest.approx(block_lr(0.1, 0.0, 10.5, 12))
    assert sched.lrs()["stem"] > 0.0
