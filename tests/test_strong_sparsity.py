"""Strong checks of the sparse engines: MEST's late phase, SET/RigL's cosine drop fraction, RigL growth.

Every expected value here is written out independently of ``spfde.sparsity.schedule`` from the
paper's Table A3 and the method cards (the only shared helper is the counting rule
``keep_count(n, s) = n - round(s * n)`` of :mod:`spfde.sparsity.masks`).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import masked_sgd_steps, small_conv_net
from spfde.config import from_dict
from spfde.sparsity import build_sparsity, keep_count

X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(11))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(12))
make_model = small_conv_net


def make_cfg(method: str, epochs: int, interval: int, search_end: int, target: float = 0.8, **sp):
    # the classifier is pruned here too (dense_last_layer: false), so three layers exercise the schedule
    return from_dict({"seed": 5, "train": {"epochs": epochs, "interval": interval},
                      "sparsity": {"method": method, "target": target, "search_end": search_end,
                                   "dense_last_layer": False, **sp}})


def train_steps(model, engine, opt, steps: int = 2) -> None:
    for _ in masked_sgd_steps(model, engine, opt, X, Y, steps):
        pass


def mask_counts(engine) -> dict[str, int]:
    return {lay.module: int(engine.masks[lay.param].sum()) for lay in engine.masked_layers}


def update_epochs(interval: int, search_end: int) -> list[int]:
    """Table A3 / Algorithm 1: every Δτ epochs up to search_end, plus search_end itself."""
    return sorted({e for e in range(1, search_end + 1) if e % interval == 0} | {search_end})


# ----------------------------------------------------------------------------- 1. MEST late phase


def mest_train_sparsity(s: float, last_update: int | None, search_end: int) -> float:
    """Table A3 (0-90: GR(s-0.05), 90-120: GR(s-0.025), then no search) with search_end = 120, switch 75%."""
    if last_update is None:  # initial mask: the same soft bound as the early phase
        return s - 0.05
    if last_update == search_end:
        return s
    return s - 0.05 if last_update < 0.75 * search_end else s - 0.025


@pytest.mark.parametrize("interval,search_end,epochs", [(1, 10, 13), (2, 11, 14)])
def test_mest_late_phase_grows_to_s_minus_grow_late(interval, search_end, epochs):
    model = make_model()
    # counting swaps from mask differences needs growth that never picks a just-pruned weight
    c = make_cfg("mest", epochs, interval, search_end, grow_exclude_dropped=True)
    engine = build_sparsity(model, c, X[:1])
    engine.apply_masks()
    target = engine.layer_sparsity_target()
    numel = {lay.module: lay.numel for lay in engine.masked_layers}
    assert len(numel) == 3  # stem is the dense first layer; body.0, body.3, head are masked
    for m in numel:  # the three phases are distinguishable in every masked layer
        s = target[m]
        assert len({keep_count(numel[m], s - 0.05), keep_count(numel[m], s - 0.025), keep_count(numel[m], s)}) == 3
    ups = update_epochs(interval, search_end)
    late = [e for e in ups if 0.75 * search_end <= e < search_end]
    assert late and any(e < 0.75 * search_end for e in ups)  # both phases are exercised

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    params = dict(model.named_parameters())
    last: int | None = None
    final_masks = None
    for epoch in range(epochs):
        before = {n: m.clone() for n, m in engine.masks.items()}
        info = engine.update(epoch)
        assert info["updated"] == (epoch in ups), epoch
        prev_sp = {m: mest_train_sparsity(target[m], last, search_end) for m in numel}
        if epoch in ups:
            last = epoch
        want = {m: keep_count(numel[m], mest_train_sparsity(target[m], last, search_end)) for m in numel}
        assert mask_counts(engine) == want, (epoch, last)
        if epoch in ups:
            total_pruned = total_grown = 0
            for lay in engine.masked_layers:
                old, new = before[lay.param], engine.masks[lay.param]
                n, s = lay.numel, target[lay.module]
                pruned, grown = int((old & ~new).sum()), int((new & ~old).sum())
                # RM(s) then GR(s'): prune from the previous s' down to s, grow back to this update's s'
                assert pruned == keep_count(n, prev_sp[lay.module]) - keep_count(n, s), (epoch, lay.module)
                assert grown == want[lay.module] - keep_count(n, s), (epoch, lay.module)
                total_pruned += pruned
                total_grown += grown
            assert (info["pruned"], info["grown"]) == (total_pruned, total_grown)
            if epoch == search_end:
                assert total_grown == 0
        else:
            assert all(torch.equal(engine.masks[n], before[n]) for n in before), epoch
        train_steps(model, engine, opt)
        assert mask_counts(engine) == want, epoch
        for name, mask in engine.masks.items():
            assert (params[name][~mask] == 0).all()
        if epoch == search_end:
            assert want == {m: keep_count(numel[m], target[m]) for m in numel}  # exactly s
            final_masks = {n: m.clone() for n, m in engine.masks.items()}
        elif epoch > search_end:  # no structure change after search_end
            assert all(torch.equal(engine.masks[n], final_masks[n]) for n in final_masks), epoch
    assert final_masks is not None


def test_mest_late_phase_at_paper_scale_schedule():
    """Table A3 itself: 160 epochs, Δτ = 5, search 120 -- updates 85 (early) and 95..115 (late)."""
    model = make_model()
    c = make_cfg("mest", 160, 5, 120)
    engine = build_sparsity(model, c, X[:1])
    target = engine.layer_sparsity_target()
    head = next(lay for lay in engine.masked_layers if lay.module == "head")
    s = target["head"]
    for epoch in range(0, 161):
        engine.update(epoch)
        if epoch in (85, 89):
            assert int(engine.masks[head.param].sum()) == keep_count(head.numel, s - 0.05), epoch
        if epoch in (95, 100, 115, 119):
            assert int(engine.masks[head.param].sum()) == keep_count(head.numel, s - 0.025), epoch
        if epoch >= 120:
            assert int(engine.masks[head.param].sum()) == keep_count(head.numel, s), epoch


# ----------------------------------------------------------------------------- 2. SET / RigL drop fraction


def cosine_drop(alpha: float, epoch: int, search_end: int) -> float:
    """Evci et al. 2020 / SET and RigL method cards: f(e) = alpha/2 * (1 + cos(pi e / search_end))."""
    return alpha / 2 * (1 + math.cos(math.pi * epoch / search_end))


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("interval,search_end,alpha", [(1, 6, 0.5), (2, 7, 0.3)])
def test_drop_fraction_follows_cosine_decay(method, interval, search_end, alpha):
    model = make_model(1)
    epochs = search_end + 2
    c = make_cfg(method, epochs, interval, search_end, drop_fraction=alpha, grow_exclude_dropped=True)
    engine = build_sparsity(model, c, X[:1])
    engine.apply_masks()
    target = engine.layer_sparsity_target()
    ups = update_epochs(interval, search_end)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fractional_parts = []
    swapped_any = 0
    for epoch in range(epochs):
        before = {n: m.clone() for n, m in engine.masks.items()}
        info = engine.update(epoch)
        total = 0
        for lay in engine.masked_layers:
            old, new = before[lay.param], engine.masks[lay.param]
            active = keep_count(lay.numel, target[lay.module])
            assert int(old.sum()) == int(new.sum()) == active  # density stays at the target
            pruned, grown = int((old & ~new).sum()), int((new & ~old).sum())
            if epoch in ups:
                x = cosine_drop(alpha, epoch, search_end) * active
                fractional_parts.append(x - math.floor(x))
                want = int(round(x))
            else:
                want = 0
            assert pruned == grown == want, (method, epoch, lay.module, pruned, grown, want)
            total += pruned
        assert info["pruned"] == info["grown"] == total
        swapped_any += total
        train_steps(model, engine, opt)
    assert swapped_any > 0
    # the data tell round() from floor()/ceil(): some products round up, some down
    assert any(0.5 < f < 1 for f in fractional_parts) and any(0 < f < 0.5 for f in fractional_parts)


# ----------------------------------------------------------------------------- 3. RigL dense-gradient growth


def _rigl_setup(exclude_dropped: bool = True):
    torch.manual_seed(0)
    lin = nn.Linear(10, 8, bias=False)
    model = nn.Sequential(lin)
    # search_end 2, Δτ 1: the update at epoch 1 drops f(1) = 0.5/2 * (1 + cos(pi/2)) = 0.25 of the active weights
    c = from_dict({"seed": 3, "train": {"epochs": 4, "interval": 1}, "sparsity": {
        "method": "rigl", "target": 0.5, "search_end": 2, "drop_fraction": 0.5, "dense_first_layer": False,
        "dense_last_layer": False, "grow_exclude_dropped": exclude_dropped}})
    engine = build_sparsity(model, c)
    mask = engine.masks["0.weight"].clone()
    assert int(mask.sum()) == 40
    g = torch.Generator().manual_seed(7)
    # distinct magnitudes: the dropped set (10 lowest |w| among the active) is unique
    mags = torch.randperm(80, generator=g).float().add(1).view(8, 10) / 10
    signs = torch.where(torch.rand(8, 10, generator=g) < 0.5, -1.0, 1.0)
    w = mags * signs * mask
    with torch.no_grad():
        lin.weight.copy_(w)
    active = mask.flatten().nonzero().flatten()
    dropped = active[w.flatten()[active].abs().argsort()[:10]]
    # the dense gradient: distinct magnitudes everywhere, the largest ones at the weights being dropped
    # (with grow_exclude_dropped growth must not undo the drop), large negative entries among the
    # candidates (|g|, not g)
    grad = (torch.randperm(80, generator=g).float().add(1) * torch.where(
        torch.rand(80, generator=g) < 0.5, -1.0, 1.0))
    grad[dropped] = torch.arange(1000.0, 1010.0)
    grad = grad.view(8, 10)
    cand = (~mask).flatten().nonzero().flatten()
    grown = cand[grad.flatten()[cand].abs().argsort(descending=True)[:10]]
    want = mask.clone().flatten()
    want[dropped] = False
    want[grown] = True
    return model, lin, engine, mask, grad, w, want.view(8, 10), dropped, grown


def test_rigl_grows_exactly_at_largest_recorded_dense_gradient():
    model, lin, engine, mask, grad, w, want, dropped, grown = _rigl_setup()
    assert (grad.flatten()[grown] < 0).any()  # the sign must not matter
    engine.update(0)  # epoch 0 precedes the update at 1: the dense gradient is recorded
    assert engine.needs_dense_grad(0)
    lin.weight.grad = grad.clone()
    engine.before_step()
    assert torch.equal(lin.weight.grad, grad * mask)  # training still sees the masked gradient
    info = engine.update(1)
    assert info["updated"] and info["pruned"] == info["grown"] == 10
    new = engine.masks["0.weight"]
    assert torch.equal(new, want)
    # grown weights start at zero, survivors keep their values, dropped ones are zero
    assert torch.equal(lin.weight.detach(), w * (mask & new))


def test_rigl_default_regrows_a_just_dropped_weight_with_its_value():
    """RigL's own code grows from every position outside the post-drop mask: the dropped weights, whose
    dense gradients are the largest here, come straight back with their values (reinit_when_same=False)."""
    model, lin, engine, mask, grad, w, _, dropped, _ = _rigl_setup(exclude_dropped=False)
    engine.update(0)
    lin.weight.grad = grad.clone()
    engine.before_step()
    info = engine.update(1)
    new = engine.masks["0.weight"]
    assert torch.equal(new, mask)  # the 10 dropped are the 10 largest |g| outside the post-drop mask
    assert info["pruned"] == info["grown"] == 0
    assert torch.equal(lin.weight.detach(), w)  # regrown ones kept their values


def test_rigl_grows_exactly_at_largest_batch_gradient():
    model, lin, engine, mask, grad, w, want, _, _ = _rigl_setup()
    engine.update(0)
    # nothing recorded: the update takes a fresh dense gradient from batch_grad_fn (d/dW sum(W * G) = G)
    info = engine.update(1, batch_grad_fn=lambda: (lin.weight * grad).sum())
    assert info["pruned"] == info["grown"] == 10
    assert torch.equal(engine.masks["0.weight"], want)
    assert lin.weight.grad is None
