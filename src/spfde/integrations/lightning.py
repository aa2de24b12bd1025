"""SpFDE as a PyTorch Lightning 2.x callback.

Method card
-----------
**What it does.** Drives the loop-agnostic :class:`~spfde.controller.SpFDE` controller from a
``lightning.Trainer``: weight sparsity with Prune&Grow (paper Section 4.1), progressive layer
freezing with block-wise LR (Section 4.2, Algorithm 1) and circular data sieving (Section 4.3),
with the training-FLOPs ledger. The five call points map to Lightning hooks:

=================================  ==========================================================
``on_fit_start``                    builds ``SpFDE(pl_module, trainer.optimizers[0], ...)``;
                                    puts its sampler in the train DataLoader
``on_train_start``                  checks that the train DataLoader draws from that sampler
``on_train_epoch_start``            ``start_epoch(trainer.current_epoch)``
``on_before_backward``              checks the loss is finite (``train.on_nonfinite``)
``on_before_optimizer_step``        ``before_step()`` (after backward and AMP's unscale: gradients
                                    are masked), or the step is voided (non-finite, ``skip``)
``on_train_batch_end``              ``after_step(logits, targets, indices, losses=, skipped=)``
``on_train_epoch_end``              ``end_epoch()``; scalar metrics logged as ``spfde/<key>``
``state_dict``/``load_state_dict``  the controller's state, saved in Lightning checkpoints
=================================  ==========================================================

**Contract with the LightningModule.**

* ``training_step`` returns a dict with ``"loss"``, ``"logits"``, ``"targets"`` and
  ``"indices"`` (the dataset indices of the batch's samples, ``0..train_size-1``): the forgetting
  statistics of data sieving are per sample. With ``sieving.criterion: loss`` it also holds
  ``"losses"``, the per-sample training losses, shape ``(batch,)`` (e.g.
  ``F.cross_entropy(logits, y, reduction="none")``, whose mean is ``"loss"``; issue 12): the sieve
  ranks samples by them, and a missing ``"losses"`` is a clear error at the first step;
* a step the optimizer did not apply is reported to the controller as skipped (its statistics are
  dropped, its FLOPs charged), as the built-in trainer does (issue 15): a GradScaler overflow step
  under ``precision="16-mixed"`` (the scaler's scale shrank), and with ``train.on_nonfinite: skip``
  a step whose loss or gradients are NaN/inf (the callback voids it: the optimizer gets no
  gradient). With ``train.on_nonfinite: stop`` (the default) a NaN/inf loss stops the run with a
  :class:`~spfde.errors.NonFiniteLossError`;
* the train dataloader is one ``torch.utils.data.DataLoader`` (any sampler, ``shuffle=True``
  included): the callback **installs its own sampler** in it when Lightning requests it (the
  loader is rebuilt with the same arguments, as Lightning does for its ``DistributedSampler``),
  so removed samples are never loaded. A loader that cannot carry the sampler (not a
  ``DataLoader``, a custom batch sampler) is a :class:`~spfde.errors.SpfdeError` before the
  first step, never a silently unsieved run. Building it with ``sampler=callback.sampler``
  yourself also works;
* the epoch count is the Trainer's ``max_epochs``: a config without ``train.epochs`` takes it,
  a config whose ``train.epochs`` differs is refused (the freezing plan and the cosine schedule
  are planned over the run's length);
* under DDP the Trainer needs ``use_distributed_sampler=False``, else Lightning would put its
  ``DistributedSampler`` in place of the callback's (which already splits the partial set
  across ranks): refused at ``on_fit_start``;
* one optimizer and ``accumulate_grad_batches=1`` (refused otherwise: every per-step hook of the
  controller assumes one optimizer step per batch). With ``optim.schedule: cosine`` the
  controller sets the learning rate at every step (block-wise when freezing): an LR scheduler
  from ``configure_optimizers`` is warned about, and its changes are overwritten; use
  ``optim.schedule: constant`` to keep yours.

Example (complete and tested: docs/lightning.md)::

    spfde_cb = SpFDECallback({"sparsity": {"target": 0.8}, "freezing": {"target": 0.1},
                              "sieving": {"method": "circular", "ratio": 0.2}},
                             train_size=len(train_set), example_input=x0)

    class Module(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits, "targets": y, "indices": idx}

        def train_dataloader(self):
            return DataLoader(train_set, batch_size=128, shuffle=True)  # the callback swaps in its sampler

    L.Trainer(max_epochs=10, callbacks=[spfde_cb]).fit(Module())

**Distributed.** Under ``strategy="ddp"`` the callback passes ``trainer.global_rank`` and
``trainer.world_size`` to the controller (sample status is all-gathered at each epoch end, see
:mod:`spfde.distributed`). Lightning builds its DDP wrapper once, so with freezing use
``DDPStrategy(find_unused_parameters=True)``: frozen parameters then count as unused instead of
blocking the reduction (they are still part of the buckets; the built-in trainer re-wraps instead).

**Activation cache.** Lightning's ``training_step`` runs the forward, so the callback cannot wrap
it in ``cache.batch(x, idx)`` and cannot serve the frozen-prefix cache (issue 13) exactly:
``freezing.cache: auto`` is off under Lightning (one note says so; ``cache_status`` in the metrics
too), ``freezing.cache: on`` is a :class:`~spfde.errors.ConfigError` when the callback is built.
Frozen blocks still skip their backward.

**Notes.** The controller's one-line notes (``ctl.notes``, the cache's) are logged once, on rank 0,
at ``on_fit_start`` with ``rank_zero_info`` as ``spfde: note: ...``, like the callback's other
messages.

**Checkpoints.** The callback state holds the controller state. Lightning restores callbacks before
``on_fit_start``, so the state is kept until the controller exists, then loaded; the restored model
weights are kept (building the controller applies its initial masks). Lightning creates the
training iterator of the first resumed epoch *before* ``on_train_epoch_start``, so that epoch's
structural decisions (freezing, Prune&Grow, sieving) are taken already in ``on_fit_start`` when
resuming from an end-of-epoch checkpoint, and the sampler serves the right partial set. Resume
from checkpoints saved at epoch ends (``ModelCheckpoint``'s default).

**Hyper-parameters.** Everything comes from the :class:`~spfde.config.Config`, except the
epoch count, which is the Trainer's ``max_epochs``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from spfde.config import Config, _read_yaml, from_dict, resolve_config_path
from spfde.controller import SpFDE, _as_config
from spfde.errors import ConfigError, NonFiniteLossError, SpfdeError

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("spfde.integrations.lightning needs Lightning 2.x: pip install 'spfde[lightning]'") from e

__all__ = ["CACHE_OFF", "SpFDECallback", "step_losses", "step_outputs"]

_REQUIRED = ("logits", "targets", "indices")

#: why the callback cannot serve the frozen-prefix activation cache (``freezing.cache``, issue 13)
CACHE_OFF = ("SpFDECallback cannot serve it: Lightning's training_step runs the forward, which the callback cannot "
             "wrap in cache.batch(x, idx); frozen blocks still skip their backward (the built-in trainer serves the "
             "cache)")


def _epochs_given(config: Config | dict | str | Path) -> bool:
    """Whether the user chose ``train.epochs`` (a :class:`Config` object always counts as chosen)."""
    if isinstance(config, Config):
        return True
    data = config if isinstance(config, dict) else _read_yaml(resolve_config_path(config))
    return isinstance(data.get("train"), dict) and "epochs" in data["train"]


def _uses(loader: Any, sampler: Any) -> bool:
    return getattr(loader, "sampler", None) is sampler or getattr(
        getattr(loader, "batch_sampler", None), "sampler", None) is sampler


def step_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, targets, indices)`` from a ``training_step`` output, or a clear error."""
    if not isinstance(outputs, dict) or any(k not in outputs for k in _REQUIRED):
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        hint = ("; returning None to skip a batch is not supported: return the dict (a NaN loss with "
                "train.on_nonfinite: skip skips the step)" if outputs == {} or outputs is None else "")
        raise SpfdeError(
            "SpFDECallback needs training_step to return a dict with 'loss', 'logits', 'targets' and 'indices' "
            f"(the batch's dataset indices), got {got}{hint}")
    return outputs["logits"], outputs["targets"], outputs["indices"]


def step_losses(outputs: dict[str, Any], criterion: str) -> torch.Tensor | None:
    """The per-sample losses ``outputs["losses"]``; required under ``sieving.criterion: loss``."""
    losses = outputs.get("losses")
    if losses is None and criterion == "loss":
        raise SpfdeError(
            "sieving.criterion is 'loss', so SpFDECallback needs training_step's dict to hold 'losses': the batch's "
            "per-sample training losses, shape (batch,), e.g. losses = F.cross_entropy(logits, targets, "
            "reduction='none') and 'loss': losses.mean() (a sequence model: each sequence's mean token loss)")
    return losses


def _finite_grads(module: torch.nn.Module) -> bool:
    """All gradients finite (under DDP they are all-reduced already: every rank decides alike)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's enabled GradScaler (``precision="16-mixed"``), else ``None``."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _scale(scaler: Any) -> torch.Tensor:
    """The scaler's current scale as a tensor: the private one, since get_scale() syncs the device."""
    s = getattr(scaler, "_scale", None)
    return s if torch.is_tensor(s) else torch.tensor(float(scaler.get_scale()))


class SpFDECallback(pl.Callback):
    """Sparse training with layer freezing and data sieving inside a ``lightning.Trainer``.

    Args:
        config: a :class:`~spfde.config.Config`, a dict of sections or a YAML path.
        train_size: number of training samples (dataset indices are ``0..train_size-1``).
        example_input: one input batch for the per-layer FLOPs and the block order; defaults to
            the LightningModule's ``example_input_array``.
        blocks: freezing blocks, as for :class:`~spfde.controller.SpFDE` (module names in forward
            order, or a ``(name, module) -> block id`` function); default ``module.blocks()`` or
            ``config.freezing.blocks``. Names are relative to the LightningModule
            (e.g. ``"net.0"`` for ``self.net = nn.Sequential(...)``).
        log_metrics: log the scalar per-epoch metrics with ``pl_module.log`` as ``spfde/<key>``.

    Attributes:
        controller: the :class:`SpFDE` (``None`` before ``on_fit_start``).
        history: the full per-epoch metrics dicts (including per-layer dicts that are not logged).
    """

    def __init__(self, config: Config | dict | str | Path, train_size: int,
                 example_input: torch.Tensor | None = None, blocks: Any = None, log_metrics: bool = True) -> None:
        super().__init__()
        self.config = _as_config(config)
        if self.config.freezing.cache == "on":
            raise ConfigError(f"config field 'freezing.cache' = 'on', but {CACHE_OFF}; use freezing.cache=auto (off "
                              "under Lightning) or off")
        self._epochs_given = _epochs_given(config)
        self.train_size = int(train_size)
        self.example_input = example_input
        self.blocks = blocks
        self.log_metrics = log_metrics
        self.controller: SpFDE | None = None
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._prestarted: int | None = None
        self._resumed = False
        self._install_failed: str | None = None  # why the train loader could not be rebuilt, if so
        # this batch: optimizer steps seen, a non-finite loss, a step voided by on_nonfinite=skip,
        # GradScaler's scale before its update (a smaller one after it: the scaler skipped the step)
        self._steps = 0
        self._bad_loss = False
        self._voided = False
        self._scale_before: torch.Tensor | None = None
        self._batch_idx = 0
        self._epoch_batches = self._epoch_voided = 0  # this epoch: batches, and steps voided

    # ------------------------------------------------------------------ set-up
    @property
    def sampler(self):
        """The sampler serving the partial training set; pass it to the train DataLoader."""
        if self.controller is None:
            raise SpfdeError("SpFDECallback.sampler exists from on_fit_start on: build the train DataLoader in "
                             "the LightningModule's train_dataloader() (or a DataModule), not before trainer.fit")
        return self.controller.sampler

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None:
            if trainer.optimizers and trainer.optimizers[0] is not self.controller.optimizer:
                # a second fit built a new optimizer: the controller would set the lr of, and drop the state
                # from, the first fit's, and its sampler is not in the new loader
                raise SpfdeError(
                    "this SpFDECallback already drove an earlier trainer.fit (its controller holds that fit's "
                    "optimizer, masks, frozen blocks and partial set); build a new SpFDECallback for each fit, and "
                    "continue a run with trainer.fit(..., ckpt_path=...)")
            return
        if len(trainer.optimizers) != 1:
            # the controller sets each param group's lr and masks one optimizer's state: one optimizer whose
            # param groups carry the per-part settings does what several would
            raise SpfdeError(f"SpFDECallback supports exactly one optimizer, configure_optimizers returned "
                             f"{len(trainer.optimizers)}; return one optimizer with a param group per part "
                             "(e.g. SGD([{'params': a, 'lr': 0.1}, {'params': b, 'lr': 0.01}]))")
        x0 = self.example_input if self.example_input is not None else getattr(pl_module, "example_input_array", None)
        if not torch.is_tensor(x0):
            raise SpfdeError("SpFDECallback needs an example input batch: pass example_input= or set "
                             "self.example_input_array in the LightningModule")
        if type(pl_module).forward is pl.LightningModule.forward:
            raise SpfdeError(f"SpFDECallback runs one forward pass of {type(pl_module).__name__} on the example input "
                             "to measure each layer's FLOPs: define its forward()")
        x0 = x0.to(pl_module.device)
        self._check_trainer(trainer)
        # Lightning restored the weights already; building the controller applies the *initial* masks,
        # which would zero weights grown later, so keep a copy and put it back after loading the state
        saved = ({k: v.detach().clone() for k, v in pl_module.state_dict().items()}
                 if self._pending is not None else None)
        self.controller = SpFDE(pl_module, trainer.optimizers[0], self.config, train_size=self.train_size,
                                example_input=x0, blocks=self.blocks, rank=trainer.global_rank,
                                world_size=trainer.world_size, cache_off_reason=CACHE_OFF)
        self._show_notes(self.controller)
        if self._pending is not None:
            self._load(self._pending, saved)
            self._pending = None
        self._install_sampler(trainer)

    @staticmethod
    def _show_notes(ctl: SpFDE) -> None:
        """The controller's console notes, once, on rank 0 (the built-in trainer prints them at start)."""
        def say(text: str) -> None:
            rank_zero_info(f"spfde: note: {text}")

        for note in ctl.notes:
            say(note)
        ctl.cache.set_log(say)  # the cache's notes so far, and any later one

    @staticmethod
    def _check_accumulate(trainer: pl.Trainer) -> None:
        acc = getattr(trainer, "accumulate_grad_batches", 1)
        if acc != 1:
            raise SpfdeError(
                f"SpFDECallback needs Trainer(accumulate_grad_batches=1), got {acc}: the controller's per-step hooks "
                "(gradient masking, the MEST/RigL gradient statistics, the sample status of data sieving, the FLOPs "
                "ledger, the per-step learning rate) assume one optimizer step per batch; use a larger batch instead")

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        """The run's length from the Trainer, DDP's sampler flag, a competing LR scheduler, accumulation."""
        cfg = self.config
        self._check_accumulate(trainer)
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise SpfdeError("SpFDECallback needs Trainer(max_epochs=N): the freezing plan, the sieving updates and "
                             "the cosine schedule are planned over the run's epochs")
        if max_epochs != cfg.train.epochs:
            if self._epochs_given:
                raise ConfigError(
                    f"config field 'train.epochs' = {cfg.train.epochs} but Trainer(max_epochs={max_epochs}); the "
                    "plan would not fit the run: make them equal, or leave train.epochs out of the config and the "
                    "callback takes max_epochs")
            data = cfg.to_dict()
            data["train"]["epochs"] = max_epochs
            self.config = from_dict(data)  # re-validated: e.g. a search_end past the new last epoch is named
        use_ds = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False)
        if trainer.world_size > 1 and use_ds:
            raise SpfdeError(
                "SpFDECallback under DDP needs Trainer(use_distributed_sampler=False): Lightning would replace the "
                "callback's sampler, which already splits the partial training set across ranks, with its own "
                "DistributedSampler over the whole dataset (no sieving)")
        if trainer.lr_scheduler_configs and cfg.optim.schedule == "cosine":
            warnings.warn(
                "spfde: configure_optimizers returned an LR scheduler, but optim.schedule is cosine: SpFDE sets the "
                "learning rate at every step (block-wise when freezing) and overwrites the scheduler's; set "
                "optim.schedule: constant in the config to keep your scheduler", UserWarning, stacklevel=2)

    def _install_sampler(self, trainer: pl.Trainer) -> None:
        """Have the train dataloader use the callback's sampler, whatever the LightningModule built.

        Lightning asks ``fit_loop``'s data source for the loader after ``on_fit_start``, inside its
        context that records the loader's constructor arguments; the loader is rebuilt around our
        sampler there with Lightning's own ``_update_dataloader``. :meth:`on_train_start` checks
        the result, so a Lightning version without these internals fails loudly instead.
        """
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is None or getattr(source, "_spfde_callback", None) is self:
            return
        request = source.dataloader

        def dataloader() -> Any:
            return self._with_sampler(request())

        source.dataloader = dataloader
        source._spfde_callback = self

    def _with_sampler(self, loader: Any) -> Any:
        from torch.utils.data import DataLoader

        sampler = self._ctl().sampler
        if not isinstance(loader, DataLoader) or _uses(loader, sampler):
            return loader  # anything else is refused by on_train_start with the reason
        from lightning.pytorch.utilities.data import _update_dataloader

        try:
            rebuilt = _update_dataloader(loader, sampler)
        except Exception as e:  # noqa: BLE001 - a loader Lightning cannot re-instantiate: say why, below
            self._install_failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return loader
        before = type(getattr(loader.batch_sampler, "sampler", loader.sampler)).__name__
        rank_zero_info(f"SpFDECallback: the train DataLoader's {before} was replaced by the callback's sampler "
                       "(it serves the partial training set of data sieving)")
        return rebuilt

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctl = self._ctl()
        loader = trainer.train_dataloader
        if not _uses(loader, ctl.sampler):
            why = (f"it is a {type(loader).__name__}, not one torch DataLoader" if not isinstance(
                loader, torch.utils.data.DataLoader) else f"it uses {type(loader.sampler).__name__}")
            if self._install_failed:
                why += f", and rebuilding it around the callback's sampler failed ({self._install_failed})"
            raise SpfdeError(
                f"the train dataloader does not draw from SpFDECallback's sampler ({why}), so data sieving would "
                "silently do nothing; return one DataLoader from train_dataloader(), built with "
                "sampler=callback.sampler (and Trainer(use_distributed_sampler=False) under DDP)")
        self._resume_optimizer(ctl)

    def _load(self, state: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
        ctl = self.controller
        assert ctl is not None
        ctl.load_state_dict(state["controller"])
        if weights is not None:
            ctl.net.load_state_dict(weights)
            ctl.sparsity.apply_masks()
        self.history = list(state.get("history", []))
        self._resumed = True
        if not state.get("in_epoch", False):
            # Lightning draws the first resumed epoch's iterator before on_train_epoch_start: take
            # that epoch's decisions now so the sampler already serves its partial set
            nxt = int(state["controller"]["epoch"]) + 1
            if nxt < self.config.train.epochs:
                ctl.start_epoch(nxt)
                self._prestarted = nxt

    def _resume_optimizer(self, ctl: SpFDE) -> None:
        if not self._resumed:
            return
        # Lightning loaded the optimizer state after on_fit_start: frozen blocks' state came back,
        # pruned positions' momentum must be zero and the LR must be the epoch's
        ctl.optimizer_loaded()
        if ctl.block_lr is not None and self._prestarted is not None:
            ctl.block_lr.set(float(self._prestarted))

    # ------------------------------------------------------------------ the five call points
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctl = self._ctl()
        epoch = int(trainer.current_epoch)
        self._count_reset()
        if self._prestarted is not None:
            pre, self._prestarted = self._prestarted, None
            if pre == epoch:
                return
            ctl.end_epoch()  # Lightning resumed elsewhere than expected: close the early epoch, empty
        ctl.start_epoch(epoch)

    def _count_reset(self) -> None:
        self._epoch_batches = self._epoch_voided = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check_accumulate(trainer)  # a GradientAccumulationScheduler may change it between epochs
        self._steps, self._bad_loss, self._voided, self._scale_before = 0, False, False, None
        self._batch_idx = int(batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """A NaN/inf loss: stop the run (``train.on_nonfinite: stop``) or void the step (``skip``)."""
        here = not bool(torch.isfinite(loss.detach()).all())  # one host sync per step, as the built-in trainer
        bad = bool(trainer.strategy.reduce_boolean_decision(here, all=False)) if trainer.world_size > 1 else here
        if bad and self.config.train.on_nonfinite == "stop":
            value = float(loss.detach().float().reshape(-1)[0]) if here else "finite here, not on another rank"
            raise NonFiniteLossError(
                f"the training loss is {value} at epoch {trainer.current_epoch}, step {self._batch_idx} (both counted "
                "from 0; train.on_nonfinite=stop); lower the learning rate, or set train.on_nonfinite=skip in the "
                "SpFDECallback config to skip such steps")
        self._bad_loss = self._bad_loss or bad  # manual optimization may call backward more than once

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._steps += 1
        if self._steps > 1:
            raise SpfdeError("SpFDECallback saw a second optimizer step in one batch: the controller's per-step hooks "
                             "assume one optimizer step per training batch (one optimizer, no accumulation)")
        scaler = _scaler(trainer)
        # train.on_nonfinite=skip: a NaN/inf loss or (without GradScaler, which skips such steps itself)
        # NaN/inf gradients void the step: with no gradient the optimizer changes no weight nor its state
        if self._bad_loss or (scaler is None and self.config.train.on_nonfinite == "skip"
                              and not _finite_grads(pl_module)):
            optimizer.zero_grad(set_to_none=True)
            self._voided = True
            return
        if scaler is not None:
            self._scale_before = _scale(scaler).clone()  # scaler.update() changes it in place
        self._ctl().before_step()

    def _skipped(self, trainer: pl.Trainer) -> bool | torch.Tensor:
        """Whether the optimizer did not apply this batch's step: voided, never taken, or GradScaler's skip
        (its scale shrank in ``update``; a 0-dim tensor, so no host sync unless a statistic is recorded)."""
        if self._voided or self._steps == 0:  # no step: e.g. manual optimization that did not step
            return True
        scaler = _scaler(trainer)
        if scaler is not None and self._scale_before is not None:
            return _scale(scaler).to(self._scale_before.device) < self._scale_before
        return False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ctl = self._ctl()
        logits, targets, indices = step_outputs(outputs)
        losses = step_losses(outputs, ctl.tracker.criterion)
        skipped = self._skipped(trainer)
        # a step not applied leaves no statistic (sample status, |g|, dense gradient); its FLOPs are charged
        ctl.after_step(logits, targets, indices, losses=None if skipped is True else losses, skipped=skipped)
        self._epoch_batches += 1
        self._epoch_voided += int(self._voided)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctl = self._ctl()
        voided, batches = self._epoch_voided, self._epoch_batches
        self._count_reset()
        if voided and voided == batches:
            raise NonFiniteLossError(
                f"every one of the {batches} steps of epoch {trainer.current_epoch} had a non-finite loss or gradient "
                "(train.on_nonfinite=skip); lower the learning rate")
        m = ctl.end_epoch()
        m = {"epoch": int(trainer.current_epoch), "lr": ctl.current_lr(), **m, "nonfinite_skipped": voided}
        self.history.append(m)
        if self.log_metrics:
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    pl_module.log(f"spfde/{k}", float(v), on_step=False, on_epoch=True, sync_dist=False)

    def _ctl(self) -> SpFDE:
        if self.controller is None:
            raise SpfdeError("SpFDECallback was used before on_fit_start; add it to Trainer(callbacks=[...]) "
                             "and train with trainer.fit")
        return self.controller

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return dict(self._pending) if self._pending is not None else {}
        return {"controller": self.controller.state_dict(), "in_epoch": bool(self.controller.in_epoch),
                "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.controller is None:
            self._pending = dict(state_dict)
        else:  # strategies that restore after setup (e.g. FSDP) call this after on_fit_start
            self._load(state_dict, None)
