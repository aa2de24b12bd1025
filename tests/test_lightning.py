"""SpFDECallback with a real ``lightning.Trainer`` on CPU: training, logging, checkpoint and resume."""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import torchrun
from test_api_example import ROOT, _example_block

L = pytest.importorskip("lightning", reason="the Lightning integration needs the 'lightning' extra")

from spfde.errors import ConfigError, SpfdeError  # noqa: E402
from spfde.integrations.lightning import SpFDECallback  # noqa: E402
from spfde.utils import state_dict_sha256  # noqa: E402

N = 48
EPOCHS = 4
CONFIG = {"seed": 3, "train": {"epochs": EPOCHS, "interval": 1},
          "sparsity": {"method": "mest", "target": 0.5},
          "freezing": {"target": 0.2, "tfrz": 1},
          "sieving": {"method": "circular", "ratio": 0.25, "update_ratio": 0.5},
          "optim": {"lr": 0.05}}


class Indexed(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Module(L.LightningModule):
    def __init__(self, callback: SpFDECallback, dataset: Dataset, full_output: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        self.example_input_array = torch.zeros(2, 1, 8, 8)
        self.cb, self.ds, self.full_output = callback, dataset, full_output
        self.batches: list[list[int]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.batches.append(idx.tolist())
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if not self.full_output:
            return loss
        return {"loss": loss, "logits": logits, "targets": y, "indices": idx}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=8, sampler=self.cb.sampler)


class StopAfter(L.Callback):
    """Ends fit after ``n`` epochs, as a killed run would (max_epochs stays the run's length)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.n:
            trainer.should_stop = True


def _fit(tmp: Path, max_epochs: int = EPOCHS, ckpt: Path | None = None, full_output: bool = True,
         stop_after: int | None = None, config: dict | None = None, **trainer_kw):
    cb = SpFDECallback(CONFIG if config is None else config, train_size=N,
                       blocks=[["net.0", "net.1"], "net.3", "net.7"])
    module = Module(cb, Indexed(), full_output)
    extra = [StopAfter(stop_after)] if stop_after else []
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=[cb, *extra], **trainer_kw,
                        use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and small datasets
        trainer.fit(module, ckpt_path=ckpt)
    return cb, module, trainer


def _state(cb: SpFDECallback, module: Module) -> dict:
    ctl = cb.controller
    return {"weights": state_dict_sha256(module.state_dict()),
            "masks": state_dict_sha256(dict(sorted(ctl.sparsity.masks.items()))),
            "active": sorted(ctl.sieve.active.tolist()),
            "frozen": ctl.freezer.frozen_block_names if ctl.freezer else []}


def test_callback_trains_logs_and_resumes_identically(tmp_path: Path) -> None:
    full_cb, full_mod, full_trainer = _fit(tmp_path / "full", EPOCHS)
    hist = full_cb.history
    assert [h["epoch"] for h in hist] == list(range(EPOCHS))
    # every dimension acted: masks moved, samples left the partial set, a block froze
    assert any(h["sparsity_updated"] for h in hist)
    assert any(h["removed_this_update"] > 0 for h in hist)
    assert hist[-1]["frozen_blocks"]
    assert full_cb.controller.sparsity.density() < 0.75
    # the loader only served the partial set, and pruned weights are exactly zero
    for name, mask in full_cb.controller.sparsity.masks.items():
        assert not dict(full_mod.named_parameters())[name][~mask].any()
    assert len(full_mod.batches) == sum(-(-h["active_samples"] // 8) for h in hist)
    # scalar metrics reached Lightning's logger connector
    assert float(full_trainer.callback_metrics["spfde/density"]) == pytest.approx(hist[-1]["density"])
    assert float(full_trainer.callback_metrics["spfde/train_flops"]) == pytest.approx(hist[-1]["train_flops"])

    # stop after 2 epochs, save through Lightning, resume in a fresh process-like setup
    half_cb, half_mod, half_trainer = _fit(tmp_path / "half", stop_after=2)
    ckpt = tmp_path / "half.ckpt"
    half_trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    cb_state = next(v for k, v in saved["callbacks"].items() if "SpFDECallback" in k)
    assert set(cb_state["controller"]["sparsity"]["masks"]) == set(half_cb.controller.sparsity.masks)
    res_cb, res_mod, _ = _fit(tmp_path / "resumed", EPOCHS, ckpt=ckpt)
    assert [h["epoch"] for h in res_cb.history] == list(range(EPOCHS))
    # the resumed epochs saw exactly the batches of the uninterrupted run's last epochs
    assert res_mod.batches == full_mod.batches[len(half_mod.batches):]
    assert _state(res_cb, res_mod) == _state(full_cb, full_mod)


def test_resume_at_a_prune_and_grow_epoch_is_bit_identical(tmp_path: Path) -> None:
    # the resumed epoch 2 starts with a Prune&Grow update of a layer that is not frozen: the callback
    # takes it in on_fit_start, before Lightning loads the optimizer state, and that load must not
    # move the zeroing of the update's pruned and grown positions' momentum to before the first step
    config = {**CONFIG, "freezing": {}, "sparsity": {"method": "mest", "target": 0.5, "search_end": 3}}
    full_cb, full_mod, _ = _fit(tmp_path / "full", EPOCHS, config=config)
    assert full_cb.history[2]["sparsity_updated"]
    _, _, half_trainer = _fit(tmp_path / "half", stop_after=2, config=config)
    ckpt = tmp_path / "half.ckpt"
    half_trainer.save_checkpoint(ckpt)
    res_cb, res_mod, _ = _fit(tmp_path / "resumed", EPOCHS, ckpt=ckpt, config=config)
    assert _state(res_cb, res_mod) == _state(full_cb, full_mod)
    full_opt = full_cb.controller.optimizer.state_dict()["state"]
    res_opt = res_cb.controller.optimizer.state_dict()["state"]
    assert all(torch.equal(full_opt[k]["momentum_buffer"], res_opt[k]["momentum_buffer"]) for k in full_opt)


class TwoOptimizers(Module):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[:3].parameters(), lr=0.05),
                torch.optim.SGD(self.net[3:].parameters(), lr=0.05)]


def test_several_optimizers_are_refused_naming_param_groups(tmp_path: Path) -> None:
    cb = SpFDECallback(CONFIG, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    module = TwoOptimizers(cb, Indexed())
    module.automatic_optimization = False  # Lightning's own rule for several optimizers
    with pytest.raises(SpfdeError, match=r"exactly one optimizer, configure_optimizers returned 2; return one "
                                         r"optimizer with a param group per part"):
        _quiet_fit(_trainer(tmp_path, cb), module)


def test_a_callback_reused_for_a_second_fit_says_so(tmp_path: Path) -> None:
    cb = SpFDECallback(CONFIG, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    module = Module(cb, Indexed())
    _quiet_fit(_trainer(tmp_path, cb), module)
    with pytest.raises(SpfdeError, match="already drove an earlier trainer.fit.*build a new SpFDECallback"):
        _quiet_fit(_trainer(tmp_path, cb), module)


def test_training_step_must_return_the_sample_status(tmp_path: Path) -> None:
    with pytest.raises(SpfdeError, match="'logits', 'targets' and 'indices'"):
        _fit(tmp_path, full_output=False)


def test_sampler_before_fit_is_a_clear_error() -> None:
    with pytest.raises(SpfdeError, match="on_fit_start"):
        _ = SpFDECallback(CONFIG, train_size=N).sampler


DDP_WORKER = textwrap.dedent('''
    import json, sys, warnings
    sys.path.insert(0, sys.argv[2])  # this test module, for its dataset, module and config
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from spfde import distributed as sd
    from spfde.integrations.lightning import SpFDECallback
    from spfde.utils import state_dict_sha256
    from test_lightning import CONFIG, EPOCHS, N, Indexed, Module

    class Marked(Module):
        def on_train_epoch_start(self):
            self.batches.append([-1])

    cb = SpFDECallback(CONFIG, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    module = Marked(cb, Indexed())
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, num_nodes=1, callbacks=[cb],
                        strategy=DDPStrategy(find_unused_parameters=True, process_group_backend="gloo"),
                        use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=sys.argv[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    ctl = cb.controller
    out = {"weights": state_dict_sha256(module.state_dict()),
           "masks": state_dict_sha256(dict(sorted(ctl.sparsity.masks.items()))),
           "active": sorted(ctl.sieve.active.tolist()), "history": cb.history, "batches": module.batches}
    with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(out, f)
    sd.cleanup()
    sys.exit(sd.exit_process(0))
''')


@pytest.mark.slow
def test_callback_under_lightning_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    proc = torchrun(str(script), str(tmp_path), str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for key in ("weights", "masks", "active", "history"):  # history: frozen blocks, partial set sizes, FLOPs
        assert r0[key] == r1[key], key
    hist = r0["history"]
    assert hist[-1]["frozen_blocks"] and any(h["removed_this_update"] > 0 for h in hist)

    def per_epoch(batches: list[list[int]]) -> list[set[int]]:
        epochs: list[set[int]] = []
        for b in batches:
            if b == [-1]:
                epochs.append(set())
            else:
                epochs[-1].update(b)
        return epochs

    for h, seen0, seen1 in zip(hist, per_epoch(r0["batches"]), per_epoch(r1["batches"]), strict=True):
        # the callback's sampler split the partial set between the ranks, Lightning did not replace it
        assert len(seen0 | seen1) == h["active_samples"] == h["samples_seen"]
        assert len(seen0) == len(seen1) == h["active_samples"] // 2
    assert len(seen0 | seen1) < N and set(r0["active"]) == seen0 | seen1


# --------------------------------------------------------------------------------------------
# drop-in: the callback's sampler, the Trainer's epochs, schedulers, DDP's sampler flag


class Shuffled(Module):
    """A module written without knowing SpFDE: a shuffling loader, no callback.sampler."""

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=8, shuffle=True)


class NotALoader:
    def __init__(self, ds) -> None:
        self.ds = ds

    def __iter__(self):
        for i in range(0, N, 8):
            idx = torch.arange(i, min(i + 8, N))
            yield self.ds.x[idx], self.ds.y[idx], idx

    def __len__(self) -> int:
        return -(-N // 8)


class Iterable(Module):
    def train_dataloader(self):
        return NotALoader(self.ds)


def _trainer(tmp: Path, cb, **kw):
    return L.Trainer(accelerator="cpu", devices=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp,
                     **{"max_epochs": EPOCHS, **kw})


def _quiet_fit(trainer, module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)


@pytest.mark.parametrize("given", ["by the module", "to fit"])
def test_a_shuffling_loader_gets_the_callbacks_sampler(tmp_path: Path, given: str) -> None:
    cb = SpFDECallback(CONFIG, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    module = Shuffled(cb, Indexed())
    trainer = _trainer(tmp_path, cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if given == "to fit":  # a loader built outside Lightning's hooks, passed to trainer.fit
            trainer.fit(module, train_dataloaders=DataLoader(module.ds, batch_size=8, shuffle=True))
        else:
            trainer.fit(module)
    assert trainer.train_dataloader.sampler is cb.sampler
    # every epoch served exactly the partial set, so the removed samples were never trained on
    starts = [0]
    for h in cb.history:
        starts.append(starts[-1] + -(-h["active_samples"] // 8))
    assert len(module.batches) == starts[-1]
    epochs = [{i for b in module.batches[a:z] for i in b} for a, z in zip(starts, starts[1:], strict=False)]
    assert [len(e) for e in epochs] == [h["active_samples"] for h in cb.history]
    assert any(h["removed_this_update"] > 0 for h in cb.history) and min(len(e) for e in epochs) < N


def test_a_loader_that_cannot_carry_the_sampler_fails_loudly(tmp_path: Path) -> None:
    cb = SpFDECallback(CONFIG, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    with pytest.raises(SpfdeError, match="does not draw from SpFDECallback's sampler.*NotALoader"):
        _quiet_fit(_trainer(tmp_path, cb), Iterable(cb, Indexed()))


def test_epochs_come_from_the_trainer_or_a_mismatch_is_refused(tmp_path: Path) -> None:
    no_epochs = {k: v for k, v in CONFIG.items() if k != "train"} | {"train": {"interval": 1}}
    cb = SpFDECallback(no_epochs, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    _quiet_fit(_trainer(tmp_path, cb, max_epochs=3), Shuffled(cb, Indexed()))
    assert cb.controller.cfg.train.epochs == 3 and len(cb.history) == 3
    assert cb.controller.plan.epochs == 3  # the freezing plan was made for the Trainer's run
    cb = SpFDECallback(CONFIG, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    with pytest.raises(SpfdeError, match=r"'train.epochs' = 4 but Trainer\(max_epochs=3\)"):
        _quiet_fit(_trainer(tmp_path, cb, max_epochs=3), Shuffled(cb, Indexed()))


class WithScheduler(Module):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


def test_a_module_scheduler_under_the_cosine_is_warned_about(tmp_path: Path) -> None:
    cb = SpFDECallback(CONFIG, train_size=N, blocks=[["net.0", "net.1"], "net.3", "net.7"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, cb).fit(WithScheduler(cb, Indexed()))
    ours = [str(w.message) for w in caught if str(w.message).startswith("spfde:")]
    assert any("configure_optimizers returned an LR scheduler" in m and "optim.schedule: constant" in m
               for m in ours), ours
    # and the controller saw the scheduler's change behind its back (once, not every step)
    assert sum("changed outside the controller" in m for m in ours) == 1, ours


def test_ddp_with_lightnings_distributed_sampler_is_refused() -> None:
    from types import SimpleNamespace

    cb = SpFDECallback(CONFIG, train_size=N)
    fake = SimpleNamespace(max_epochs=EPOCHS, world_size=2, lr_scheduler_configs=[],
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(SpfdeError, match="use_distributed_sampler=False"):
        cb._check_trainer(fake)
    fake._accelerator_connector.use_distributed_sampler = False
    cb._check_trainer(fake)


def test_the_docs_lightning_example_runs_and_does_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    code = _example_block(ROOT / "docs" / "lightning.md", "## A complete example")
    assert code is not None, "docs/lightning.md lost its '## A complete example' python block"
    ns: dict = {"__name__": "__example__"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")  # hints about workers and logging
        exec(compile(code, "docs/lightning.md", "exec"), ns)
    cb, trainer = ns["spfde_cb"], ns["trainer"]
    hist = cb.history
    assert len(capsys.readouterr().out.strip().splitlines()) >= len(hist) == trainer.max_epochs == 4
    # the shuffling loader was given the callback's sampler: every epoch trained on the partial set
    assert trainer.train_dataloader.sampler is cb.sampler
    assert all(h["samples_seen"] == h["active_samples"] < 256 for h in hist)
    assert hist[-1]["frozen_blocks"] and cb.controller.plan.epochs == 4
    params = dict(cb.controller.net.named_parameters())
    for name, mask in cb.controller.sparsity.masks.items():
        assert not params[name][~mask].any()


def test_the_docs_loss_criterion_block_runs_and_sieves_by_loss(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/lightning.md's second block (it continues the first): per-sample 'losses' reach the controller."""
    path = ROOT / "docs" / "lightning.md"
    headings = ("## A complete example", "## Sieving by loss, and skipped steps")
    first, second = (_example_block(path, h) for h in headings)
    assert first is not None and second is not None, "docs/lightning.md lost one of its python blocks"
    ns: dict = {"__name__": "__example__"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        exec(compile(first, "docs/lightning.md", "exec"), ns)
        exec(compile(second, "docs/lightning.md", "exec"), ns)
    hist = ns["loss_cb"].history
    assert ns["loss_cb"].controller.tracker.criterion == "loss" and len(hist) == 4
    assert all(h["removed_this_update"] > 0 for h in hist[1:])  # the loss-ranked updates ran
    assert all(h["skipped_steps"] == h["nonfinite_skipped"] == 0 for h in hist)
    assert len(capsys.readouterr().out.strip().splitlines()) >= 2 * len(hist)


# --------------------------------------------------------------------------------------------
# feature parity with the built-in trainer: per-sample losses, skipped steps, cache, notes, accumulation

BLOCKS = [["net.0", "net.1"], "net.3", "net.7"]


def _with(**sections: dict) -> dict:
    """CONFIG with some sections' keys changed."""
    return {**CONFIG, **{k: {**CONFIG.get(k, {}), **v} for k, v in sections.items()}}


def _run(tmp: Path, cb: SpFDECallback, module: L.LightningModule, callbacks: tuple = (), **kw) -> L.Trainer:
    trainer = L.Trainer(**{"max_epochs": EPOCHS, **kw}, accelerator="cpu", devices=1, callbacks=[cb, *callbacks],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp)
    _quiet_fit(trainer, module)
    return trainer


SCORE = torch.randperm(N, generator=torch.Generator().manual_seed(5)).float()  # sample i's loss: SCORE[i]


class LossOutputs(Module):
    """Returns per-sample losses: the real ones plus a fixed per-sample offset, so the ranking is known."""

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.batches.append(idx.tolist())
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        return {"loss": losses.mean(), "logits": logits, "targets": y, "indices": idx,
                "losses": losses.detach() * 1e-3 + SCORE[idx]}


def test_loss_criterion_sieves_by_the_losses_the_training_step_returns(tmp_path: Path) -> None:
    """Issue 12 item 5 under Lightning: outputs['losses'] reach after_step(losses=...); the update at epoch 1
    drops the k lowest-loss samples of epoch 0's partial set (old code: after_step had no losses, an error)."""
    cb = SpFDECallback(_with(sieving={"criterion": "loss"}), train_size=N, blocks=BLOCKS)
    module = LossOutputs(cb, Indexed())
    _run(tmp_path, cb, module, callbacks=(StopAfter(2),))
    ctl, hist = cb.controller, cb.history
    k = hist[1]["removed_this_update"]
    assert ctl.tracker.criterion == "loss" and k == 6  # ceil(0.5 · 12)
    epoch0 = sorted({i for b in module.batches[:-(-36 // 8)] for i in b})
    assert len(epoch0) == hist[0]["active_samples"] == 36
    lowest = sorted(epoch0, key=lambda i: float(SCORE[i]))[:k]
    assert sorted(ctl.sieve.removed[-k:].tolist()) == sorted(lowest)  # the queue's tail: the easiest, by loss


def test_loss_criterion_without_losses_is_a_clear_error(tmp_path: Path) -> None:
    cb = SpFDECallback(_with(sieving={"criterion": "loss"}), train_size=N, blocks=BLOCKS)
    with pytest.raises(SpfdeError, match="needs training_step's dict to hold 'losses'"):
        _run(tmp_path, cb, Module(cb, Indexed()))


class NanAt(Module):
    """The ``at``-th training step's loss (0-based over the run) is NaN."""

    def __init__(self, callback, dataset, at: int) -> None:
        super().__init__(callback, dataset)
        self.at = at

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if len(self.batches) - 1 == self.at:
            out["loss"] = out["loss"] * float("nan")
        return out


def _plain_loop(config: dict, at: int):
    """spfde.train's loop over the controller with the same module, data and sampler: the NaN step is not
    taken and reported ``after_step(..., skipped=True)`` (train.on_nonfinite: skip)."""
    from spfde.controller import SpFDE

    module = NanAt(None, Indexed(), at)
    opt = module.configure_optimizers()
    ctl = SpFDE(module, opt, config, train_size=N, example_input=module.example_input_array, blocks=BLOCKS)
    loader = DataLoader(module.ds, batch_size=8, sampler=ctl.sampler)
    hist = []
    for epoch in range(EPOCHS):
        ctl.start_epoch(epoch)
        module.train()
        for i, batch in enumerate(loader):
            out = module.training_step(batch, i)
            skipped = not bool(torch.isfinite(out["loss"]))
            if not skipped:
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                ctl.before_step()
                opt.step()
            ctl.after_step(out["logits"], out["targets"], out["indices"], skipped=skipped)
        hist.append(ctl.end_epoch())
    return ctl, module, hist


def test_a_nan_step_is_skipped_and_leaves_the_statistics_of_the_builtin_loop(tmp_path: Path) -> None:
    """Issue 15 under Lightning, train.on_nonfinite: skip. MEST with λ = 1 scores by the mean |g| of the epoch
    before each update; the NaN step (epoch 1, step 2) must neither move the weights nor enter that mean nor
    the sample status: the run ends bit-identical to the built-in loop's, which does not take the step. Old
    code: the optimizer applied NaN gradients and MEST summed them."""
    config = _with(train={"on_nonfinite": "skip"}, sparsity={"mest_lambda": 1.0})
    at = 5 + 2  # 36 active samples: 5 batches per epoch
    cb = SpFDECallback(config, train_size=N, blocks=BLOCKS)
    module = NanAt(cb, Indexed(), at)
    _run(tmp_path, cb, module)
    ref_ctl, ref_module, ref_hist = _plain_loop(config, at)
    assert module.batches == ref_module.batches
    assert [h["skipped_steps"] for h in cb.history] == [h["skipped_steps"] for h in ref_hist] == [0, 1, 0, 0]
    assert [h["nonfinite_skipped"] for h in cb.history] == [0, 1, 0, 0]
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert cb.history[2]["sparsity_updated"]  # the update that read epoch 1's statistics ran
    assert state_dict_sha256(module.state_dict()) == state_dict_sha256(ref_module.state_dict())
    for name, mask in ref_ctl.sparsity.masks.items():
        assert torch.equal(cb.controller.sparsity.masks[name], mask), name
    assert torch.equal(cb.controller.sieve.active, ref_ctl.sieve.active)
    assert [h["train_flops"] for h in cb.history] == [h["train_flops"] for h in ref_hist]  # charged alike


def test_a_nan_loss_stops_the_run_by_default(tmp_path: Path) -> None:
    from spfde.errors import NonFiniteLossError

    cb = SpFDECallback(CONFIG, train_size=N, blocks=BLOCKS)  # train.on_nonfinite: stop
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 2 .*train.on_nonfinite=skip"):
        _run(tmp_path, cb, NanAt(cb, Indexed(), 5 + 2))


class InfGradAt(Module):
    """The ``at``-th step's gradient holds an inf after backward (an fp16 overflow, as GradScaler sees one)."""

    def __init__(self, callback, dataset, at: int) -> None:
        super().__init__(callback, dataset)
        self.at = at

    def on_after_backward(self) -> None:
        if len(self.batches) - 1 == self.at:
            self.net[3].weight.grad[0, 0, 0, 0] = float("inf")


class SeenAtEpochEnd(L.Callback):
    """Samples the sieve's tracker saw in each epoch (read before the next epoch resets it)."""

    def __init__(self, cb: SpFDECallback) -> None:
        self.cb, self.seen = cb, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seen.append(int(self.cb.controller.tracker.seen_in_interval().sum()))


def test_a_gradscaler_skip_is_reported_to_the_controller(tmp_path: Path) -> None:
    """precision 16-mixed: GradScaler skips the overflow step and shrinks its scale; the callback reads that
    and passes skipped (old code: skipped=False, so the step's sample status entered the sieve)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    cb = SpFDECallback(CONFIG, train_size=N, blocks=BLOCKS)
    seen = SeenAtEpochEnd(cb)
    _run(tmp_path, cb, InfGradAt(cb, Indexed(), 5 + 1), callbacks=(seen,), max_epochs=EPOCHS,
         plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))])
    hist = cb.history
    assert [h["skipped_steps"] for h in hist] == [0, 1, 0, 0]
    assert [h["nonfinite_skipped"] for h in hist] == [0, 0, 0, 0]  # GradScaler skipped it, not the callback
    # the skipped batch (8 samples of epoch 1) left no sample status
    assert seen.seen == [h["active_samples"] - 8 * (h["epoch"] == 1) for h in hist]


class BufferMix(Module):
    """A forward with a matmul on a buffer: FLOPs the ledger cannot attribute (one of the controller's notes)."""

    def __init__(self, callback, dataset) -> None:
        super().__init__(callback, dataset)
        self.register_buffer("mix", torch.eye(8))

    def forward(self, x):
        return self.net(x @ self.mix)


def test_cache_on_is_refused_and_auto_is_off_under_lightning(tmp_path: Path) -> None:
    """freezing.cache: on is a ConfigError when the callback is built; auto is off, and cache_status says why
    (old code: 'on' trained silently without the cache, auto waited for a cache.batch that never came)."""
    with pytest.raises(ConfigError, match=r"'freezing.cache' = 'on', but SpFDECallback cannot serve it"):
        SpFDECallback(_with(freezing={"cache": "on"}), train_size=N, blocks=BLOCKS)
    cb = SpFDECallback(CONFIG, train_size=N, blocks=BLOCKS)  # freezing.cache: auto
    _run(tmp_path, cb, Module(cb, Indexed()))
    assert cb.history[-1]["frozen_blocks"]
    assert all(h["cache_status"].startswith("off: SpFDECallback cannot serve it") for h in cb.history)
    assert all(h["cache_served_steps"] == h["cache_fill_flops"] == 0 for h in cb.history)


def test_the_controller_notes_are_logged_once_at_fit_start(tmp_path: Path) -> None:
    """ctl.notes (here: FLOPs the ledger cannot attribute) and the cache's note reach Lightning's rank-zero log,
    once each (old code: never shown)."""
    import logging

    from lightning_utilities.core import rank_zero

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler, lightning_log = Keep(), rank_zero.log  # the logger rank_zero_info writes to
    lightning_log.addHandler(handler)
    try:
        cb = SpFDECallback(CONFIG, train_size=N, blocks=BLOCKS)
        _run(tmp_path, cb, BufferMix(cb, Indexed()))
    finally:
        lightning_log.removeHandler(handler)
    notes = [r for r in records if r.startswith("spfde: note: ")]
    assert len(notes) == 2, notes
    assert sum(n.startswith("spfde: note: freezing.cache: off (SpFDECallback cannot serve it") for n in notes) == 1
    assert sum("use no parameter" in n and n == f"spfde: note: {cb.controller.notes[0]}" for n in notes) == 1


def test_gradient_accumulation_is_refused(tmp_path: Path) -> None:
    cb = SpFDECallback(CONFIG, train_size=N, blocks=BLOCKS)
    with pytest.raises(SpfdeError, match=r"accumulate_grad_batches=1\), got 2.*one optimizer step per batch"):
        _run(tmp_path, cb, Module(cb, Indexed()), accumulate_grad_batches=2)
    assert cb.controller is None  # refused before the controller touched the model
