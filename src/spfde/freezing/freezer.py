"""The Freezer: applies a :class:`FreezePlan` to a live model at epoch boundaries.

Paper Section 4.1 ("the sparse structure and weight values of the frozen layers will remain
unchanged"; "the computational and memory costs of all gradients of weights and gradients of
activations in the frozen layers can be eliminated") and Section 4.2 (a block freezes only after
every block before it, so the frozen part needs no back-propagation at all).

Freezing a block:

* its parameters get ``requires_grad=False`` and ``.grad=None``. The frozen blocks are a prefix
  from the input, so (for an input that does not require grad) autograd records no graph for
  them: neither their backward nor their saved activations are paid for. Optimizers skip
  parameters whose ``.grad`` is ``None``, so weight decay and momentum cannot move them;
* its normalisation layers with running statistics run in eval mode even after ``model.train()``
  (a forward pre-hook resets ``training``), so BatchNorm statistics stay fixed too;
* its optimizer state (e.g. SGD momentum buffers) is deleted to free memory; a block defrosted
  later (``single_shot_resume``, periodic schemes) restarts with fresh state.

Defrosting reverses the first two points (the norm layers follow the model's mode again).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from spfde.errors import SpfdeError
from spfde.freezing.blocks import Block
from spfde.freezing.planner import FreezePlan


def _force_eval(module: nn.Module, _args: Any) -> None:
    module.training = False


class Freezer:
    """Stateful wrapper: ``apply(epoch)`` sets the frozen blocks to ``plan.frozen_at(epoch)``.

    Args:
        model: the (unwrapped) model the blocks were resolved on.
        blocks: :func:`~spfde.freezing.resolve_blocks` output; the plan's block i is ``blocks[i]``.
        plan: the freezing plan.
        optimizer: optional; frozen parameters' state is dropped from it.
    """

    def __init__(self, model: nn.Module, blocks: list[Block], plan: FreezePlan,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        if len(plan.blocks) > len(blocks):
            raise SpfdeError(f"the freezing plan has {len(plan.blocks)} blocks but the model only {len(blocks)}")
        for i, (name, _) in enumerate(plan.blocks):
            if name != blocks[i].name:
                raise SpfdeError(f"freezing plan block {i} is {name!r} but the model's block {i} is "
                                 f"{blocks[i].name!r}; plan with the same blocks")
        self.model = model
        self.blocks = blocks
        self.plan = plan
        self.optimizer = optimizer
        self.epoch: int | None = None
        self._frozen: set[int] = set()
        self._hooks: dict[int, list[Any]] = {}
        params = dict(model.named_parameters())
        mods = dict(model.named_modules())
        self._params = [[params[p] for p in b.param_names] for b in blocks]
        self._norms = [[mods[m] for m in b.module_names if isinstance(mods.get(m), _NormBase)
                        and getattr(mods[m], "track_running_stats", False)] for b in blocks]

    # ------------------------------------------------------------------ state changes
    def apply(self, epoch: int) -> dict[str, Any]:
        """At the start of ``epoch``: freeze / defrost so that exactly ``plan.frozen_at(epoch)`` is frozen.

        Returns ``{"frozen_now": [...], "defrosted_now": [...]}`` (block names changed this call).
        """
        want = self.plan.frozen_at(epoch)
        info = self._set_frozen(want)
        self.epoch = int(epoch)
        return info

    def _set_frozen(self, want: set[int]) -> dict[str, Any]:
        want = {int(i) for i in want}
        if want != set(range(len(want))) or len(want) > len(self.blocks):
            raise SpfdeError(f"frozen blocks {sorted(want)} are not a prefix of the {len(self.blocks)} blocks; "
                             "a block can only be frozen when every block before it is frozen")
        newly = sorted(want - self._frozen)
        thawed = sorted(self._frozen - want)
        for i in newly:
            self._freeze(i)
        for i in thawed:
            self._defrost(i)
        self._frozen = want
        return {"frozen_now": [self.blocks[i].name for i in newly],
                "defrosted_now": [self.blocks[i].name for i in thawed]}

    def _freeze(self, i: int) -> None:
        for p in self._params[i]:
            p.requires_grad_(False)
            p.grad = None
            if self.optimizer is not None:
                self.optimizer.state.pop(p, None)
        hooks = []
        for m in self._norms[i]:
            m.train(False)
            hooks.append(m.register_forward_pre_hook(_force_eval))
        self._hooks[i] = hooks

    def _defrost(self, i: int) -> None:
        for p in self._params[i]:
            p.requires_grad_(True)
        for h in self._hooks.pop(i, []):
            h.remove()
        for m in self._norms[i]:
            m.train(self.model.training)

    # ------------------------------------------------------------------ queries
    @property
    def frozen(self) -> set[int]:
        return set(self._frozen)

    @property
    def frozen_block_names(self) -> list[str]:
        return [self.blocks[i].name for i in sorted(self._frozen)]

    def frozen_param_names(self) -> set[str]:
        return {p for i in self._frozen for p in self.blocks[i].param_names}

    def frozen_module_names(self) -> set[str]:
        return {m for i in self._frozen for m in self.blocks[i].module_names}

    def active_params(self) -> int:
        """Number of parameters that still train (dense count; pruned weights included)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"frozen": sorted(self._frozen), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the frozen set and re-apply it to the model (hooks, requires_grad, optimizer state)."""
        want = {int(i) for i in state["frozen"]}
        if any(i >= len(self.blocks) for i in want):
            raise SpfdeError(f"checkpoint freezes block {max(want)} but the model has {len(self.blocks)} blocks")
        self._set_frozen(want)
        for i in want:  # an optimizer state loaded before us may hold frozen blocks' state again
            for p in self._params[i]:
                p.grad = None
                if self.optimizer is not None:
                    self.optimizer.state.pop(p, None)
        self.epoch = state.get("epoch")

    def drop_optimizer_state(self) -> None:
        """Delete frozen parameters' optimizer state (call after loading an optimizer checkpoint)."""
        for i in self._frozen:
            for p in self._params[i]:
                if self.optimizer is not None:
                    self.optimizer.state.pop(p, None)
