"""SpFDE as a PyTorch Lightning 2.x callback.

Method card
-----------
**What it does.** Drives the loop-agnostic :class:`~spfde.controller.SpFDE` controller from a
``lightning.Trainer``: weight sparsity with Prune&Grow (paper Section 4.1), progressive layer
freezing with block-wise LR (Section 4.2, Algorithm 1) and circular data sieving (Section 4.3),
with the training-FLOPs ledger. The five call points map to Lightning hooks:

=================================  ==========================================================
``on_fit_start``                    builds ``SpFDE(pl_module, trainer.optimizers[0], ...)``
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
* ``train_dataloader`` uses ``callback.sampler`` (it exists from ``on_fit_start``, which Lightning
  runs before it asks for the dataloaders) and the Trainer gets ``use_distributed_sampler=False``
  so Lightning does not replace it (under DDP the callback's sampler already splits the partial
  set across ranks);
* one optimizer, no LR scheduler when ``optim.schedule`` is ``cosine`` (the controller sets the
  learning rate per step, block-wise when freezing) and ``accumulate_grad_batches=1``.

Example::

    spfde_cb = SpFDECallback(config, train_size=len(train_set), example_input=x0)

    class Module(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits, "targets": y, "indices": idx}

        def train_dataloader(self):
            return DataLoader(train_set, batch_size=128, sampler=spfde_cb.sampler)

    L.Trainer(max_epochs=config.train.epochs, callbacks=[spfde_cb], use_distributed_sampler=False).fit(Module())

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

**Hyper-parameters.** Everything comes from the :class:`~spfde.config.Config`; set
``train.epochs`` to the Trainer's ``max_epochs`` (the freezing plan and the cosine schedule use it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spfde.config import Config
from spfde.controller import SpFDE, _as_config
from spfde.errors import SpfdeError

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("spfde.integrations.lightning needs Lightning 2.x: pip install 'spfde[lightning]'") from e

__all__ = ["SpFDECallback", "step_outputs"]

_REQUIRED = ("logits", "targets", "indices")


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
        self.train_size = int(train_size)
        self.example_input = example_input
        self.blocks = blocks
        self.log_metrics = log_metrics
        self.controller: SpFDE | None = None
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._prestarted: int | None = None
        self._resumed = False

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
        x0 = x0.to(pl_module.device)
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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctl = self.controller
        if ctl is None or not self._resumed:
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
