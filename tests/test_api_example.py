"""The README's "Use it in your own loop" example runs as written, and misuse gives clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from spfde import SpFDE
from spfde.errors import SpfdeError
from spfde.sparsity import keep_count

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use it in your own loop"


def _example_block(path: Path, heading: str = HEADING) -> str | None:
    """The first python block of the section ``heading`` of a Markdown file."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    m = re.search(re.escape(heading) + r"\n(?:(?!\n## ).)*?```python\n(.*?)```", text, re.S)
    return m.group(1) if m else None


def example_source() -> tuple[str, str]:
    """The README's runnable example (a complete program: it has its own imports)."""
    readme = _example_block(ROOT / "README.md")
    assert readme is not None, f"README.md lost its '{HEADING}' python block"
    assert re.search(r"^(from|import) ", readme, re.M), "the README example must be complete (imports included)"
    return "README.md", readme


def test_the_documented_example_runs_and_does_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    where, code = example_source()
    ns: dict = {"__name__": "__example__"}
    exec(compile(code, where, "exec"), ns)
    ctl, model = ns["ctl"], ns["model"]
    assert isinstance(ctl, SpFDE) and ctl.epoch == ns["config"]["train"]["epochs"] - 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == ns["config"]["train"]["epochs"]
    # sparse: masked weights are exactly zero, at the configured sparsity in the masked layers
    params = dict(model.named_parameters())
    for name, mask in ctl.sparsity.masks.items():
        assert not params[name][~mask].any()
        # MEST's search ended (3/4 of training) and frozen layers were pruned to s as they froze
        assert int(mask.sum()) == keep_count(mask.numel(), ns["config"]["sparsity"]["target"])
    assert ctl.sparsity.masks
    # frozen: the first block stopped training; sieved: every epoch saw fewer samples than the set
    m = ns["metrics"]
    assert m["frozen_blocks"] and not params["0.weight"].requires_grad
    assert m["samples_seen"] == len(ctl.sieve.active) < ctl.train_size


def _tiny():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 1, 8, 8)


def test_a_step_before_the_first_epoch_is_refused() -> None:
    model, opt, x = _tiny()
    ctl = SpFDE(model, opt, {"sparsity": {"target": 0.5}}, train_size=8, example_input=x)
    logits = model(x)
    logits.sum().backward()
    with pytest.raises(SpfdeError, match=r"start_epoch\(epoch\) first"):
        ctl.before_step()
    with pytest.raises(SpfdeError, match=r"start_epoch\(epoch\) first"):
        ctl.after_step(logits, torch.tensor([0, 1]), torch.tensor([0, 1]))
    ctl.start_epoch(0)
    with pytest.raises(SpfdeError, match="before end_epoch"):
        ctl.start_epoch(1)


def test_an_optimizer_over_other_parameters_is_refused() -> None:
    model, _, x = _tiny()
    other = torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(SpfdeError, match="optimizer does not hold the model's parameters"):
        SpFDE(model, other, {"sparsity": {"target": 0.5}}, train_size=8, example_input=x)


def test_a_model_without_prunable_layers_is_refused() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale

    model = Scale()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SpfdeError, match="no prunable layer"):
        SpFDE(model, opt, {"sparsity": {"method": "mest", "target": 0.5}}, train_size=8,
              example_input=torch.randn(2, 4))


# --------------------------------------------------------------------------------------------
# the controller owns the learning rate (README, "What the controller does to your optimizer")


def _run_epochs(ctl, model, opt, epochs, scheduler=None, start=0):
    x, y = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 2 + [0, 1])
    for epoch in range(start, start + epochs):
        ctl.start_epoch(epoch)
        logits = model(x)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits, y).backward()
        ctl.before_step()
        opt.step()
        ctl.after_step(logits, y, torch.arange(8))
        ctl.end_epoch()
        if scheduler is not None:
            scheduler.step()


def _freezing_setup(schedule: str):
    import warnings as _w

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cfg = {"train": {"epochs": 4, "interval": 1}, "optim": {"schedule": schedule},
           "sparsity": {"method": "mest", "target": 0.5}, "freezing": {"target": 0.1, "tfrz": 1}}
    with _w.catch_warnings():
        _w.simplefilter("ignore")  # torch's "scheduler.step() before optimizer.step()" hint
        ctl = SpFDE(model, opt, cfg, train_size=8, example_input=torch.randn(2, 1, 8, 8), blocks=["0", "2", "5"])
    return model, opt, sched, ctl


def test_a_user_scheduler_under_the_cosine_is_reported_once() -> None:
    model, opt, sched, ctl = _freezing_setup("cosine")
    assert len(opt.param_groups) == 3  # split per block for the block-wise cosine
    with pytest.warns(UserWarning, match="changed outside the controller.*optim.schedule: constant") as rec:
        _run_epochs(ctl, model, opt, 4, sched)
    assert sum("changed outside" in str(w.message) for w in rec) == 1


def test_schedule_constant_leaves_the_optimizer_to_the_user() -> None:
    import warnings

    model, opt, sched, ctl = _freezing_setup("constant")
    assert len(opt.param_groups) == 1  # not split: the user's scheduler still sees its one group
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_epochs(ctl, model, opt, 3, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert ctl.freezer.frozen_block_names  # freezing still happened


def test_a_resumed_optimizer_is_not_mistaken_for_a_user_change() -> None:
    import warnings

    model, opt, _, ctl = _freezing_setup("cosine")
    _run_epochs(ctl, model, opt, 2)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "ctl": ctl.state_dict()}
    model2, opt2, _, ctl2 = _freezing_setup("cosine")
    model2.load_state_dict(saved["model"])
    ctl2.load_state_dict(saved["ctl"])
    opt2.load_state_dict(saved["opt"])
    ctl2.optimizer_loaded()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run_epochs(ctl2, model2, opt2, 2, start=2)


def test_param_groups_built_at_other_rates_keep_their_ratio_along_the_schedule() -> None:
    """A 10x head stays 10x under the cosine (and the block-wise cosine, whose split groups inherit the
    rate), as torch's schedulers keep each group's base rate; groups at the first group's rate get the
    schedule's values bit for bit, and nothing warns."""
    import warnings

    from spfde.freezing.lr import block_lr

    def build(head_lr: float, freezing: dict) -> tuple[SpFDE, nn.Module]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.SGD([{"params": [*model[0].parameters(), *model[2].parameters()]},
                               {"params": model[4].parameters(), "lr": head_lr}], lr=0.1)
        cfg = {"train": {"epochs": 4, "interval": 1}, "data": {"augment": False}, "optim": {"end_lr": 0.001},
               "sparsity": {"target": 0.5, "dense_first_layer": False}, "freezing": freezing}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return SpFDE(model, opt, cfg, train_size=8, example_input=torch.randn(2, 8)), model

    for freezing in ({"target": 0}, {"target": 0.2, "tfrz": 1, "blocks": ["0", "2", "4"]}):
        ctl, model = build(1.0, freezing)
        ctl.start_epoch(1)
        head = id(next(model[4].parameters()))
        rates = {id(p): g["lr"] for g in ctl.optimizer.param_groups for p in g["params"]}
        assert rates[head] > 0.0 and rates[head] == pytest.approx(10 * block_lr(0.1, 0.001, 1.0, 4))
        # the other groups are untouched by the ratio: the schedule's value exactly
        same, _ = build(0.1, freezing)
        same.start_epoch(1)
        for g, g_same in zip(ctl.optimizer.param_groups, same.optimizer.param_groups, strict=True):
            if head not in {id(p) for p in g["params"]}:
                assert g["lr"] == g_same["lr"]


def test_indices_that_do_not_match_the_batch_are_named_as_such() -> None:
    """A batch of 8 with 6 indices is a loop mistake: the error names the indices, not sieving.criterion."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = SpFDE(model, opt, {"train": {"epochs": 2, "interval": 1}, "sieving": {"ratio": 0.25}}, train_size=32,
                example_input=torch.randn(2, 8))
    ctl.start_epoch(0)
    logits, y = model(torch.randn(8, 8)), torch.randint(0, 4, (8,))
    with pytest.raises(SpfdeError, match=r"6 sample indices for a batch of 8") as err:
        ctl.after_step(logits, y, torch.arange(6))
    assert "criterion" not in str(err.value)


def test_a_state_dict_that_is_not_the_controllers_is_named_as_such() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = SpFDE(model, opt, {"train": {"epochs": 2}, "data": {"augment": False}}, train_size=8,
                example_input=torch.randn(2, 8))
    for wrong, said in (({"epoch": 1}, "a dict without ['sparsity', 'sieve', 'tracker', 'ledger']"),
                        (model.state_dict(), "a dict without ['epoch', 'sparsity'"), (None, "a NoneType")):
        with pytest.raises(SpfdeError, match="SpFDE.load_state_dict got " + re.escape(said)):
            ctl.load_state_dict(wrong)
    ctl.load_state_dict(ctl.state_dict())  # its own state loads


def test_frozen_blocks_are_listed_in_forward_order() -> None:
    from collections import OrderedDict

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("stem", nn.Linear(8, 32)), ("act", nn.ReLU()), ("body", nn.Linear(32, 32)),
                                       ("act2", nn.ReLU()), ("head", nn.Linear(32, 4))]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"train": {"epochs": 4, "interval": 1}, "data": {"augment": False}, "sieving": {"method": "none"},
           "sparsity": {"target": 0.5, "dense_first_layer": False},
           "freezing": {"target": 0.2, "tfrz": 1, "blocks": ["stem", "body", "head"], "unreachable": "reduce"}}
    ctl = SpFDE(model, opt, cfg, train_size=16, example_input=torch.randn(2, 8))
    x, y, idx = torch.randn(16, 8), torch.randint(0, 4, (16,)), torch.arange(16)
    for epoch in range(4):
        ctl.start_epoch(epoch)
        out = model(x)
        opt.zero_grad()
        nn.functional.cross_entropy(out, y).backward()
        ctl.before_step()
        opt.step()
        ctl.after_step(out, y, idx)
        m = ctl.end_epoch()
    assert m["frozen_blocks"] == ["stem", "body"]  # not sorted by name (body, stem)


def test_an_epoch_outside_the_configured_epochs_is_refused() -> None:
    import numpy as np

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = SpFDE(model, opt, {"train": {"epochs": 4}, "data": {"augment": False}}, train_size=8,
                example_input=torch.randn(2, 8))
    for wrong in (4, 10, -1):
        with pytest.raises(SpfdeError, match=rf"start_epoch\({wrong}\): train.epochs = 4, so epochs run from 0 to 3"):
            ctl.start_epoch(wrong)
    for wrong in (1.0, True, "1"):
        with pytest.raises(SpfdeError, match="the epoch must be an int"):
            ctl.start_epoch(wrong)
    ctl.start_epoch(np.int64(3))  # numpy's ints are ints
    assert ctl.epoch == 3 and type(ctl.epoch) is int


def test_indices_that_are_not_integers_are_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = SpFDE(model, opt, {"train": {"epochs": 2}, "data": {"augment": False}}, train_size=8,
                example_input=torch.randn(2, 8))
    ctl.start_epoch(0)
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    for wrong in (torch.arange(4).float(), torch.ones(4, dtype=torch.bool), [0.0, 1.0, 2.0, 3.0]):
        with pytest.raises(SpfdeError, match="after_step: indices are torch.(float32|bool); pass the batch's integer"):
            ctl.after_step(model(x), y, wrong)
    ctl.after_step(model(x), y, torch.arange(4))  # integer indices, a tensor or a list, are what it takes
    ctl.after_step(model(x), y, [4, 5, 6, 7])
