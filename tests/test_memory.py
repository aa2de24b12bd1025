"""The training-memory model (paper Section 5.2, Fig. 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spfde.accounting.memory import memory_model, memory_timeline, weight_bytes
from spfde.freezing import FreezePlan, resolve_blocks


class TinyLinear(nn.Module):
    def __init__(self, d_in: int = 4, d_hid: int = 3, d_out: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hid)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d_hid, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def blocks(self) -> list[str]:
        return ["fc1", "fc2"]


def test_dense_hand_check() -> None:
    m = TinyLinear()
    B = 8
    mem = memory_model(m, torch.zeros(5, 4), batch_size=B)
    n_params = 4 * 3 + 3 + 3 * 2 + 2  # 23
    assert mem["weights"] == 4 * n_params
    # saved for backward: fc1 input (4), ReLU input (3), fc2 input (3) per sample
    assert mem["activations"] == 4 * B * (4 + 3 + 3)
    assert mem["weight_grads"] == 4 * n_params
    # largest output + input-gradient pair: ReLU (3 out + 3 in); fc1's input needs no gradient
    assert mem["activation_grads"] == 4 * B * 6
    assert mem["optimizer"] == 4 * n_params
    assert mem["gradients"] == mem["weight_grads"] + mem["activation_grads"]
    assert mem["total"] == mem["weights"] + mem["activations"] + mem["gradients"] + mem["optimizer"]
    assert memory_model(m, torch.zeros(1, 4), batch_size=B, optimizer_slots=2)["optimizer"] == 8 * n_params


def test_frozen_prefix_hand_check() -> None:
    m = TinyLinear()
    B = 8
    dense = memory_model(m, torch.zeros(1, 4), batch_size=B)
    frz = memory_model(m, torch.zeros(1, 4), batch_size=B, frozen_params={"fc1.weight", "fc1.bias"},
                       frozen_modules={"fc1"})
    assert frz["weights"] == dense["weights"]  # frozen weights are still stored
    # fc1 is frozen and the ReLU after it gets no gradient: only fc2's input is kept.
    assert frz["activations"] == 4 * B * 3
    assert frz["weight_grads"] == 4 * (3 * 2 + 2)
    assert frz["activation_grads"] == 4 * B * 2  # fc2's output gradient; its input needs none
    assert frz["optimizer"] == 4 * (3 * 2 + 2)
    assert frz["total"] < dense["total"]
    # The probe restored the model's flags.
    assert all(p.requires_grad for p in m.parameters())


def test_a_probe_store_runs_one_forward_per_trainable_set() -> None:
    m = TinyLinear()
    calls = []
    m.fc1.register_forward_hook(lambda *_: calls.append(1))
    x, probes = torch.zeros(5, 4), {}
    dense = memory_model(m, x, batch_size=8, probes=probes)
    frozen = {"frozen_params": {"fc1.weight", "fc1.bias"}, "frozen_modules": {"fc1"}}
    masks = {"fc2.weight": torch.tensor([[True, False, False], [False, True, True]])}
    assert memory_model(m, x, batch_size=16, masks=masks, probes=probes) == memory_model(m, x, 16, masks=masks)
    assert memory_model(m, x, batch_size=8, probes=probes, **frozen) == memory_model(m, x, 8, **frozen)
    calls.clear()
    assert memory_model(m, x, batch_size=8, probes=probes) == dense
    assert memory_model(m, x, batch_size=8, probes=probes, **frozen) != dense
    assert not calls and len(probes) == 2  # both trainable sets served from the store


def test_sparse_weights_csr() -> None:
    m = TinyLinear(d_in=16, d_hid=8)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask.view(-1)[torch.arange(0, 128, 13)] = True  # 10 nonzeros
    assert int(mask.sum()) == 10
    dense = memory_model(m, torch.zeros(1, 16), 4)
    sp = memory_model(m, torch.zeros(1, 16), 4, masks={"fc1.weight": mask})
    # CSR: 10 x (4 B value + 4 B column index) + 9 row pointers x 4 B, instead of 128 x 4 B
    assert weight_bytes(m.fc1.weight, mask) == 10 * 8 + 9 * 4
    assert dense["weights"] - sp["weights"] == 128 * 4 - (10 * 8 + 9 * 4)
    assert dense["weight_grads"] - sp["weight_grads"] == (128 - 10) * 4
    assert dense["optimizer"] - sp["optimizer"] == (128 - 10) * 4
    assert sp["activations"] == dense["activations"]
    # A nearly dense mask is cheaper stored dense.
    assert weight_bytes(m.fc1.weight, torch.ones(8, 16, dtype=torch.bool)) == 128 * 4


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.b2(self.b1(self.stem(x)))), 1))

    def blocks(self) -> list[str]:
        return ["stem", "b1", "b2", "head"]


def test_more_frozen_blocks_never_cost_more_and_probe_is_side_effect_free() -> None:
    torch.manual_seed(0)
    m = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    blocks = resolve_blocks(m, example_input=x)
    m.train()
    before = copy.deepcopy(m.state_dict())
    prev = None
    for k in range(len(blocks)):
        fp = {p for b in blocks[:k] for p in b.param_names}
        fm = {n for b in blocks[:k] for n in b.module_names}
        mem = memory_model(m, x, 16, frozen_params=fp, frozen_modules=fm)
        if prev is not None:
            assert mem["activations"] < prev["activations"]
            assert mem["weight_grads"] < prev["weight_grads"]
            assert mem["total"] < prev["total"]
        prev = mem
    assert m.training
    for key, v in m.state_dict().items():
        assert torch.equal(v, before[key]), key


def test_memory_timeline_avg_and_min() -> None:
    torch.manual_seed(0)
    m = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    blocks = resolve_blocks(m, example_input=x)
    plan = FreezePlan(tfrz=2, scheme="single_shot", blocks=[("stem", 2), ("b1", 4)], predicted_reduction=0.0,
                      epochs=8, interval=2)
    tl = memory_timeline(m, x, 16, blocks, plan, epochs=8)
    none = memory_model(m, x, 16)["total"]
    fp = {p for b in blocks[:2] for p in b.param_names}
    fm = {n for b in blocks[:2] for n in b.module_names}
    all_frozen = memory_model(m, x, 16, frozen_params=fp, frozen_modules=fm)["total"]
    assert tl["per_epoch"][:2] == [none, none]
    assert tl["min"] == all_frozen == tl["per_epoch"][-1]
    assert tl["max"] == none
    assert tl["avg"] == pytest.approx(sum(tl["per_epoch"]) / 8)
    assert all_frozen < tl["avg"] < none


@pytest.mark.parametrize(("make", "slots"), [
    (lambda p: torch.optim.SGD(p, lr=0.1), 0),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),
    (lambda p: torch.optim.Adam(p, lr=1e-3), 2),
    (lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True), 3),
], ids=["sgd", "sgd-momentum", "adam", "adamw-amsgrad"])
def test_controller_models_its_own_optimizer_and_the_loops_batch(make, slots) -> None:
    """Your own loop: the epoch's mem_model_bytes counts the optimizer's real state (not always one SGD
    momentum buffer) and the loader's batch size (not the config's data.batch_size default, 128)."""
    from spfde import SpFDE
    from spfde.accounting.memory import optimizer_slots

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = make(m.parameters())
    assert optimizer_slots(opt) == slots  # before any step: from its type and hyper-parameters
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    ctl = SpFDE(m, opt, {"train": {"epochs": 1}, "sparsity": {"method": "mest", "target": 0.5, "kernels": "dense"},
                         "sieving": {"method": "none"}}, train_size=24, example_input=x)
    ctl.start_epoch(0)
    for idx in torch.arange(24).split(8):  # batches of 8
        out = m(x[idx])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(out, y[idx]).backward()
        ctl.before_step()
        opt.step()
        ctl.after_step(out, y[idx], idx)
    assert optimizer_slots(opt) == slots  # measured from its state
    row = ctl.end_epoch()
    want = memory_model(m, x, 8, masks=ctl.sparsity.masks, optimizer_slots=slots)
    assert row["mem_model_bytes"] == want["total"]
    assert row["mem_model_bytes"] != memory_model(m, x, 128, masks=ctl.sparsity.masks)["total"]
