"""Block-wise cosine learning rate (paper Section 4.2.1).

"[We] adopt a layer/block-wise cosine learning rate schedule according to the total active
training epoch of each layer/block": each block's learning rate decays from ``base_lr`` to
``end_lr`` with a cosine over its own active epochs ``[0, freeze epoch)``, so it reaches the
small final rate just when it freezes; blocks that never freeze follow the global cosine over T.

What "active epochs" means per scheme:

* ``single_shot``: ``[0, freeze epoch)``.
* ``single_shot_resume``: ``[0, freeze epoch)`` (which already includes the shift ``t``); in the
  final defrost epochs every block follows the global cosine, whose value there is small: the
  "fine-tuned at the end of training with a small learning rate" of Appendix B.
* ``periodic`` / ``delayed_periodic``: every block keeps training until T, so all follow the
  global cosine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spfde.errors import SpfdeError
from spfde.freezing.blocks import Block
from spfde.freezing.planner import FreezePlan


def block_lr(base_lr: float, end_lr: float, epoch_float: float, active_end_epoch: float,
             warmup_epochs: float = 0) -> float:
    """Cosine from ``base_lr`` (epoch ``warmup_epochs``) to ``end_lr`` (epoch ``active_end_epoch``).

    During warmup the rate rises linearly from ``end_lr`` at epoch 0 to ``base_lr``; after
    ``active_end_epoch`` it stays at ``end_lr``.
    """
    if warmup_epochs > 0 and epoch_float < warmup_epochs:
        return end_lr + (base_lr - end_lr) * max(epoch_float, 0.0) / warmup_epochs
    span = active_end_epoch - warmup_epochs
    if span <= 0:
        return end_lr
    progress = min(max((epoch_float - warmup_epochs) / span, 0.0), 1.0)
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_param_groups_by_block(optimizer: torch.optim.Optimizer, model: nn.Module,
                                blocks: Sequence[Block]) -> None:
    """Re-partition ``optimizer``'s param groups in place so each group holds one block's parameters.

    Every original group is split into one group per block it touches (block order), keeping the
    group's hyper-parameters and adding ``"block"``: the block name, or ``None`` for parameters in
    no block. Call before the first step: optimizer state is keyed by parameter and survives, but
    an optimizer ``state_dict`` saved with the old grouping no longer loads, and LR schedulers
    built on the old groups must be rebuilt.
    """
    index = {id(p): i for i, b in enumerate(blocks) for p in _params_of(model, b)}
    new_groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        buckets: dict[int, list[torch.Tensor]] = {}
        for p in group["params"]:
            buckets.setdefault(index.get(id(p), len(blocks)), []).append(p)
        for i in sorted(buckets):
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = buckets[i]
            g["block"] = blocks[i].name if i < len(blocks) else None
            new_groups.append(g)
    optimizer.param_groups[:] = new_groups


def _params_of(model: nn.Module, block: Block) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    return [params[n] for n in block.param_names]


class BlockLR:
    """Sets every param group's learning rate from its block's cosine (Section 4.2.1).

    Args:
        optimizer: ideally split with :func:`split_param_groups_by_block` (groups carry ``"block"``).
        plan: the freezing plan; ``None`` (no freezing) puts every group on the global cosine.
        epochs: T. base_lr, end_lr: the cosine's start and end for the first param group and every
            group built at its rate; a group whose ``initial_lr`` (else ``lr``) differs from the first
            group's gets the same schedule times that ratio (:meth:`ratio`).
        block_lr_enabled: ``False`` puts every group on the global cosine over T.
        warmup_epochs: linear warmup before the cosine.

    Stateless apart from its inputs: ``set(epoch_float)`` is a pure function of the epoch, so a
    resumed run gets the same rates.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: FreezePlan | None, epochs: int, base_lr: float,
                 end_lr: float, block_lr_enabled: bool = True, warmup_epochs: int = 0) -> None:
        if epochs < 1:
            raise SpfdeError(f"train.epochs = {epochs} must be at least 1")
        self.optimizer = optimizer
        self.plan = plan
        self.epochs = epochs
        self.base_lr = float(base_lr)
        self.end_lr = float(end_lr)
        self.enabled = bool(block_lr_enabled) and plan is not None
        self.warmup_epochs = warmup_epochs
        self._end = {name: plan.active_end_epoch(i) for i, (name, _) in enumerate(plan.blocks)} if plan else {}
        self._lrs: dict[str, float] = {}
        self._set_last: list[float] | None = None  # each group's lr as set() left it
        # as torch's schedulers do: each group's own starting rate stays readable, and a group built at
        # another rate than the first (a 10x head, a low-lr backbone) keeps that ratio along the schedule
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._first = float(optimizer.param_groups[0]["initial_lr"]) if optimizer.param_groups else 0.0

    def frozen_in_warmup(self) -> list[tuple[str, int]]:
        """``[(block, freeze epoch)]`` of the blocks that stop training before the warmup ends: their rate
        is still rising when they freeze, so they never train at ``base_lr`` and no cosine decay brings
        them down (the schedule of Section 4.2.1 assumes the warmup ends first)."""
        if not self.enabled or self.warmup_epochs <= 0:
            return []
        return [(name, int(end)) for name, end in self._end.items() if end < self.epochs and end <= self.warmup_epochs]

    def lr_for(self, block: str | None, epoch_float: float) -> float:
        """The learning rate of ``block`` (``None``: a group outside every block) at ``epoch_float``."""
        end = float(self.epochs)
        if self.enabled and block is not None and block in self._end:
            defrost = self.plan.defrost_epoch if self.plan is not None else None
            if defrost is None or epoch_float < defrost:
                end = float(self._end[block])
        return block_lr(self.base_lr, self.end_lr, epoch_float, end, self.warmup_epochs)

    def set(self, epoch_float: float) -> None:
        """Set each group's ``lr`` for training progress ``epoch_float`` (e.g. 3.5 = mid epoch 3)."""
        lrs: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            block = group.get("block")
            lr = self.lr_for(block, epoch_float) * self.ratio(group)
            group["lr"] = lr
            lrs[block if block is not None else "all"] = lr
        self._lrs = lrs
        self._set_last = [g["lr"] for g in self.optimizer.param_groups]

    def ratio(self, group: dict[str, Any]) -> float:
        """``group``'s starting rate over the first group's (whose schedule starts at ``base_lr``): exactly
        1.0 for a group built at the first group's rate, so such groups get the schedule's values bit
        for bit."""
        return float(group["initial_lr"]) / self._first if self._first else 1.0

    def changed_outside(self) -> tuple[int, float, float] | None:
        """``(group index, lr set here, lr now)`` of the first group whose lr someone else changed
        since the last :meth:`set` (an LR scheduler, user code), else ``None``."""
        for i, (was, group) in enumerate(zip(self._set_last or [], self.optimizer.param_groups, strict=False)):
            if group["lr"] != was:
                return i, was, group["lr"]
        return None

    def forget(self) -> None:
        """After ``optimizer.load_state_dict``: the loaded rates are the new reference."""
        self._set_last = None

    def lrs(self) -> dict[str, float]:
        """``{block name: lr}`` as last set (groups without a block under ``"all"``)."""
        return dict(self._lrs)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
