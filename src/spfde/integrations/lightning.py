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
``on_before_optimizer_step``        ``before_step()`` (after backward: gradients are masked)
``on_train_batch_end``              ``after_step(logits, targets, indices)``
``on_train_epoch_end``              ``end_epoch()``; scalar metrics logged as ``spfde/<key>``
``state_dict``/``load_state_dict``  the controller's state, saved in Lightning checkpoints
=================================  ==========================================================

**Contract with the LightningModule.**

* ``training_step`` returns a dict with ``"loss"``, ``"logits"``, ``"targets"`` and
  ``"indices"`` (the dataset indices of the batch's samples, ``0..train_size-1``): the forgetting
  statistics of data sieving are per sample;
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
* one optimizer and ``accumulate_grad_batches=1``. With ``optim.schedule: cosine`` the
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
from spfde.errors import ConfigError, SpfdeError

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("spfde.integrations.lightning needs Lightning 2.x: pip install 'spfde[lightning]'") from e

__all__ = ["SpFDECallback", "step_outputs"]

_REQUIRED = ("logits", "targets", "indices")


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
        raise SpfdeError(
            "SpFDECallback needs training_step to return a dict with 'loss', 'logits', 'targets' and 'indices' "
            f"(the batch's dataset indices), got {got}")
    return outputs["logits"], outputs["targets"], outputs["indices"]


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
            return
        if len(trainer.optimizers) != 1:
            raise SpfdeError(f"SpFDECallback supports exactly one optimizer, configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
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
                                world_size=trainer.world_size)
        if self._pending is not None:
            self._load(self._pending, saved)
            self._pending = None
        self._install_sampler(trainer)

    def _check_trainer(self, trainer: pl.Trainer) -> None:
        """The run's length from the Trainer, DDP's sampler flag, a competing LR scheduler."""
        cfg = self.config
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
        if self._prestarted is not None:
            pre, self._prestarted = self._prestarted, None
            if pre == epoch:
                return
            ctl.end_epoch()  # Lightning resumed elsewhere than expected: close the early epoch, empty
        ctl.start_epoch(epoch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._ctl().before_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logits, targets, indices = step_outputs(outputs)
        self._ctl().after_step(logits, targets, indices)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctl = self._ctl()
        m = ctl.end_epoch()
        m = {"epoch": int(trainer.current_epoch), "lr": ctl.current_lr(), **m}
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
