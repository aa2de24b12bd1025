"""Tests of spfde.analysis: structural similarity, linear CKA, gradient norms, snapshot artifacts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from spfde.analysis import (
    GradNormTracker,
    grad_norm_change,
    layer_cka_over_time,
    linear_cka,
    load_forgetting_histograms,
    load_snapshots,
    save_forgetting_histogram,
    save_snapshot,
    structural_similarity,
    structural_similarity_over_time,
    top_fraction_positions,
)
from spfde.errors import SpfdeError


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------ structural similarity


def test_structural_similarity_identical_and_disjoint():
    w = torch.tensor([[0.0, 3.0, 0.0, -1.0], [2.0, 0.0, 0.5, 0.0]])
    assert structural_similarity(w, w) == 1.0
    assert structural_similarity(w, w != 0) == 1.0
    disjoint = (w == 0)
    assert structural_similarity(w, disjoint) == 0.0


def test_structural_similarity_hand_computed_partial():
    # nonzeros: 6 -> top ceil(3) = |-5|, 4, 3 at flat positions 1, 4, 6
    w_t = torch.tensor([0.0, -5.0, 1.0, 0.0, 4.0, 2.0, 3.0, 0.5])
    final = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    # positions 1 and 6 are in the final mask, 4 is not -> 2/3
    assert structural_similarity(w_t, final) == pytest.approx(2 / 3)
    # a float final model counts its nonzeros as the support
    assert structural_similarity(w_t, final.float() * 7.0) == pytest.approx(2 / 3)
    # with fraction 1 every nonzero counts: positions 1,2,4,5,6,7 -> in mask: 1,2,6 -> 3/6
    assert structural_similarity(w_t, final, fraction=1.0) == pytest.approx(0.5)


def test_structural_similarity_ties_odd_count_and_edge_cases():
    # 3 nonzeros, all tied: ceil(1.5) = 2 -> the two lowest flat indices (0 and 2)
    w = torch.tensor([1.0, 0.0, -1.0, 1.0])
    top = top_fraction_positions(w)
    assert top.tolist() == [True, False, True, False]
    assert structural_similarity(w, torch.tensor([True, False, False, True])) == 0.5
    # all-dense: top half of all weights; a dense final gives 1
    dense = torch.arange(1.0, 9.0)
    assert top_fraction_positions(dense).sum() == 4
    assert structural_similarity(dense, torch.ones(8)) == 1.0
    # no nonzeros: undefined
    assert math.isnan(structural_similarity(torch.zeros(4), torch.ones(4)))
    # an intermediate mask restricts the candidates
    assert structural_similarity(dense, dense > 4, mask_t=dense <= 4) == 0.0
    with pytest.raises(SpfdeError):
        structural_similarity(torch.ones(3), torch.ones(4))


def test_structural_similarity_over_time_uses_final_masks():
    g = _gen(1)
    w_final = torch.randn(6, 5, generator=g)
    mask = w_final.abs() > 0.5
    final = {"epoch": 9, "model": {"fc.weight": w_final * mask, "fc.bias": torch.zeros(6)},
             "masks": {"fc.weight": mask}}
    other = torch.randn(6, 5, generator=g)
    snaps = [(0, {"epoch": 0, "model": {"fc.weight": other, "fc.bias": torch.zeros(6)}, "masks": {}}),
             (9, final)]
    out = structural_similarity_over_time(snaps, final)
    assert list(out) == ["fc"]
    assert out["fc"][1] == (9, 1.0)
    assert out["fc"][0] == (0, structural_similarity(other, mask))


# ------------------------------------------------------------------ CKA


def _orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def test_linear_cka_properties():
    g = _gen(2)
    x = torch.randn(64, 10, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(10, 7, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        64, 7, generator=g, dtype=torch.float64)
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(y, x) == pytest.approx(base, abs=1e-12)  # symmetric
    assert linear_cka(x @ _orthogonal(10, g), y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, y @ _orthogonal(7, g)) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 1e-4 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, abs=1e-10)  # centring
    # an invertible but non-orthogonal map changes it
    a = torch.eye(10, dtype=torch.float64)
    a[0, 0] = 25.0
    a[1, 0] = 3.0
    assert abs(linear_cka(x @ a, y) - base) > 1e-3
    # the Gram path (features wider than the batch) agrees with the feature path
    wide = torch.randn(16, 40, generator=g, dtype=torch.float64)
    proj = wide @ torch.randn(40, 8, generator=g, dtype=torch.float64)
    kx, ky = wide - wide.mean(0), proj - proj.mean(0)
    expected = (torch.linalg.norm(ky.T @ kx) ** 2 / (torch.linalg.norm(kx.T @ kx) * torch.linalg.norm(ky.T @ ky)))
    assert linear_cka(wide, proj) == pytest.approx(float(expected), abs=1e-10)
    # 4-D layer outputs are flattened per sample; float32 inputs are handled in float64
    assert linear_cka(x.float().reshape(64, 2, 5, 1), x) == pytest.approx(1.0, abs=1e-6)


def test_linear_cka_independent_features_near_zero_and_errors():
    g = _gen(3)
    x = torch.randn(4000, 5, generator=g)
    y = torch.randn(4000, 5, generator=g)
    assert linear_cka(x, y) < 0.02
    assert math.isnan(linear_cka(torch.ones(8, 3), torch.randn(8, 3, generator=g)))
    with pytest.raises(SpfdeError):
        linear_cka(torch.ones(8, 3), torch.ones(9, 3))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_layer_cka_over_time_final_is_one_and_model_untouched(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    probe = torch.randn(12, 1, 4, 4, generator=_gen(4))
    early = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(5)))
    save_snapshot(tmp_path, 0, _tiny_from(early), None)
    save_snapshot(tmp_path, 3, model, {"conv.weight": model.conv.weight != 0})
    snaps = load_snapshots(tmp_path)
    assert [e for e, _ in snaps] == [0, 3]
    assert snaps[1][1]["masks"]["conv.weight"].dtype == torch.bool
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = layer_cka_over_time(model, snaps, snaps[-1][1], probe)
    assert set(out) == {"conv", "fc"}
    assert out["conv"][1] == (3, pytest.approx(1.0, abs=1e-9))
    assert out["fc"][0][1] < 1.0 - 1e-6
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the factory form gives the same answer, and unknown layers are a user error
    same = layer_cka_over_time(_Tiny, snaps, snaps[-1][1], probe, layers=["fc"])
    assert same["fc"] == out["fc"]
    with pytest.raises(SpfdeError):
        layer_cka_over_time(_Tiny, snaps, snaps[-1][1], probe, layers=["nope"])


def _tiny_from(state):
    m = _Tiny()
    m.load_state_dict(state)
    return m


# ------------------------------------------------------------------ gradient norms


def test_grad_norm_tracker_matches_hand_computation():
    torch.manual_seed(0)
    model = _Tiny()
    tracker = GradNormTracker(model)
    assert tracker.layer_names == ["conv", "fc"]
    g = _gen(6)
    per_step = {"conv": [], "fc": []}
    for step in range(3):
        model.zero_grad(set_to_none=True)
        x = torch.randn(5, 1, 4, 4, generator=g)
        model(x).square().mean().backward()
        if step == 2:
            model.fc.weight.grad = None  # a frozen-like parameter: only its bias counts this step
        for name in per_step:
            mod = getattr(model, name)
            grads = [p.grad.reshape(-1) for p in mod.parameters() if p.grad is not None]
            per_step[name].append(float(torch.linalg.norm(torch.cat(grads))))
        tracker.record()
    s = tracker.epoch_summary()
    for name, vals in per_step.items():
        assert s[name] == pytest.approx(sum(vals) / len(vals), rel=1e-6)
    # reset after the summary; a layer with no gradient in an epoch reports None
    model.zero_grad(set_to_none=True)
    model.fc(torch.randn(2, 64, generator=g)).sum().backward()
    tracker.record()
    s2 = tracker.epoch_summary()
    assert s2["conv"] is None and s2["fc"] > 0
    # state_dict round trip keeps the history
    t2 = GradNormTracker(model)
    t2.load_state_dict(tracker.state_dict())
    assert t2.history == tracker.history
    assert math.isnan(t2.change()["conv"][0])
    with pytest.raises(SpfdeError):
        GradNormTracker(model, ["missing"])


def test_grad_norm_change():
    hist = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 1.5}, {"a": 2.5, "b": 1.5}]
    assert grad_norm_change(hist) == {"a": [2.0, 0.5], "b": [0.5, 0.0]}
    assert grad_norm_change({"a": [1.0, 4.0]}) == {"a": [3.0]}


# ------------------------------------------------------------------ artifacts


def test_forgetting_histogram_round_trip(tmp_path):
    save_forgetting_histogram(tmp_path, 5, torch.tensor([7, 0, 2]))
    save_forgetting_histogram(tmp_path, 10, {0: 4, 3: 1})
    obj = json.loads((tmp_path / "sieve" / "forgetting_epoch_0005.json").read_text())
    assert obj == {"epoch": 5, "histogram": {"0": 7, "2": 2}}
    assert load_forgetting_histograms(tmp_path) == [(5, {0: 7, 2: 2}), (10, {0: 4, 3: 1})]
    (tmp_path / "sieve" / "forgetting_epoch_0011.json").write_text("{not json")
    with pytest.raises(SpfdeError, match="forgetting_epoch_0011"):
        load_forgetting_histograms(tmp_path)
    assert load_snapshots(tmp_path) == []
