"""The stateful wrapper every sparse method shares: masks, per-step masking, updates, checkpoints.

A :class:`SparseEngine` holds one boolean mask per masked weight (parameter name -> mask) and
is driven by the controller at four points (docs/design.md):

* ``update(epoch, frozen_params)`` at every epoch start: a no-op unless the method's schedule
  (:mod:`spfde.sparsity.schedule`) says the structure changes now; never grows or swaps weights
  of frozen params. One exception, on by default (``freezing.prune_on_freeze``): a frozen layer
  still above its target density (MEST trains at ``s' < s`` during the search) is pruned once to
  exactly ``s`` by the method's importance. That is the prune half of the update MEST would run
  at that epoch; its grow half would only add zero weights that a frozen layer never trains.
  The final model then meets the requested sparsity in every layer (docs/freezing.md).
* ``before_step()`` after ``backward``: multiplies the gradients by the masks (so momentum and
  weight decay see zero at pruned positions) and, only in the epoch just before an update,
  records the gradient statistic the method needs (MEST: mean ``|g|`` at active positions;
  RigL: the last step's dense ``|g|``).
* ``after_step(optimizer)``: multiplies the weights by the masks (bit-exact zeros whatever the
  optimizer does) and, once after each update, zeroes every optimizer state tensor shaped like
  the weight (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``) at pruned positions.

Per-step cost is two ``torch._foreach_mul_`` calls over the masked weights with masks kept as
precomputed float tensors of the weight's dtype/layout (bench/mask_overhead.py measures it).
Layers at sparsity 0 (e.g. the dense first layer) get no mask at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from spfde.errors import SpfdeError
from spfde.sparsity.masks import PrunableLayer, keep_count, prune_lowest, random_mask
from spfde.sparsity.schedule import Schedule
from spfde.utils import make_generator

BatchGradFn = Callable[[], Any]


class SparseEngine:
    """Masks + schedule for one model. Subclasses implement :meth:`_update_layer`.

    Args:
        model: the network whose parameters are masked in place.
        layers: prunable layers in forward order.
        target: ``{module: target sparsity}`` for every prunable layer.
        schedule: the run's update schedule.
        seed: run seed; every random draw uses ``make_generator(seed, purpose, ...)``.
    """

    method = "base"
    #: which gradient statistic ``before_step`` records in the epoch before an update
    grad_stat: str | None = None  # None | "sparse_mean_abs" | "dense_last"

    def __init__(self, model: nn.Module, layers: list[PrunableLayer], target: dict[str, float],
                 schedule: Schedule, seed: int = 0) -> None:
        self.model = model
        self.layers = list(layers)
        self.target = dict(target)
        self.schedule = schedule
        self.seed = int(seed)
        params = dict(model.named_parameters())
        self.masked_layers = [lay for lay in self.layers if self.target.get(lay.module, 0.0) > 0]
        self._params: dict[str, nn.Parameter] = {lay.param: params[lay.param] for lay in self.masked_layers}
        self._module_of = {lay.param: lay.module for lay in self.layers}
        self.masks: dict[str, torch.Tensor] = {}
        self._fmasks: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {lay.module: lay.numel for lay in self.layers}
        self._numel = {lay.module: lay.numel for lay in self.layers}
        self.epoch = -1
        self.last_update = -1
        self._recording = False
        self._grad_buf: dict[str, torch.Tensor] = {}
        self._grad_steps = 0
        self._state_dirty = False
        self._lists: tuple[list[str], list[nn.Parameter], list[torch.Tensor]] | None = None
        #: freezing.prune_on_freeze: prune a frozen layer above its target density to the target
        self.prune_frozen = True
        self._init_masks()

    # ------------------------------------------------------------------ masks
    def _init_masks(self) -> None:
        """Random masks at the schedule's initial sparsity (paper Section 4.1: random structure)."""
        for lay in self.masked_layers:
            s = self.schedule.initial_sparsity(self.target[lay.module])
            g = make_generator(self.seed, "sparsity-init", lay.module)
            keep = lay.numel - int(round(s * lay.numel))
            self._set_mask(lay.param, random_mask(lay.shape, keep, g))

    def _set_mask(self, param: str, mask: torch.Tensor) -> None:
        p = self._params[param]
        m = torch.empty_like(p, dtype=torch.bool).copy_(mask)
        self.masks[param] = m
        # a float copy in the weight's dtype and memory format makes the per-step multiply one kernel
        self._fmasks[param] = torch.empty_like(p).copy_(m)
        self._counts[self._module_of[param]] = int(m.sum())
        self._lists = None

    def _cached_lists(self) -> tuple[list[str], list[nn.Parameter], list[torch.Tensor]]:
        """Names, weights and float masks as lists, rebuilt only when a mask changes (per-step speed)."""
        if self._lists is None:
            names = list(self._params)
            self._lists = (names, [self._params[n] for n in names], [self._fmasks[n] for n in names])
        return self._lists

    def _sync_device(self) -> None:
        """Follow the model when it moved (``model.to(device)``), changed dtype or memory format."""
        for name, p in self._params.items():
            fm = self._fmasks[name]
            if fm.device != p.device or fm.dtype != p.dtype or fm.stride() != p.stride():
                self._set_mask(name, self.masks[name].to(p.device))
                if name in self._grad_buf:
                    self._grad_buf[name] = self._grad_buf[name].to(p.device)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """``w *= mask`` for every masked weight (at start, after loading, after an update)."""
        self._sync_device()
        if self._params:
            _, weights, fmasks = self._cached_lists()
            torch._foreach_mul_(weights, fmasks)

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the gradients at pruned positions; record the update's gradient statistic."""
        if not self._params:
            return
        names, weights, masks = self._cached_lists()
        if masks[0].device != weights[0].device:
            self._sync_device()
            names, weights, masks = self._cached_lists()
        grads = [p.grad for p in weights]
        if any(g is None for g in grads):  # frozen or unused layers have no gradient
            keep = [i for i, g in enumerate(grads) if g is not None]
            if not keep:
                return
            names, grads, masks = [names[i] for i in keep], [grads[i] for i in keep], [masks[i] for i in keep]
        if self._recording and self.grad_stat == "dense_last":
            # RigL reads the dense gradient autograd computed anyway, before it is masked
            torch._foreach_copy_([self._buf(n) for n in names], grads)
            self._grad_steps = 1
        torch._foreach_mul_(grads, masks)
        if self._recording and self.grad_stat == "sparse_mean_abs":
            torch._foreach_add_([self._buf(n) for n in names], torch._foreach_abs(grads))
            self._grad_steps += 1

    def _buf(self, name: str) -> torch.Tensor:
        b = self._grad_buf.get(name)
        if b is None:
            p = self._params[name]
            b = self._grad_buf[name] = torch.zeros_like(p, dtype=torch.float32)
        return b

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep pruned weights exactly zero; after an update also zero optimizer state there."""
        if not self._params:
            return
        _, weights, fmasks = self._cached_lists()
        torch._foreach_mul_(weights, fmasks)
        if self._state_dirty and optimizer is not None:
            self.mask_optimizer_state(optimizer)

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every state tensor shaped like a masked weight at its pruned positions."""
        for name, p in self._params.items():
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(self._fmasks[name].to(v.dtype))
        self._state_dirty = False

    # ------------------------------------------------------------------ epoch boundary
    def needs_dense_grad(self, epoch: int) -> bool:
        """True when one step of ``epoch`` computes a dense weight gradient (RigL; charged by the ledger)."""
        return False

    @torch.no_grad()
    def update(self, epoch: int, frozen_params: Iterable[str] = frozenset(),
               batch_grad_fn: BatchGradFn | None = None) -> dict[str, Any]:
        """Prune and grow at the start of ``epoch`` when the schedule says so.

        ``frozen_params`` (parameter names) are left untouched. Calling ``update`` twice for the
        same epoch (e.g. after resuming) changes nothing the second time.
        """
        self.epoch = int(epoch)
        frozen = set(frozen_params)
        info: dict[str, Any] = {"updated": False, "pruned": 0, "grown": 0}
        if self.prune_frozen and frozen:
            info["pruned_on_freeze"] = self._prune_frozen(frozen)
        if self.schedule.is_update_epoch(epoch) and epoch > self.last_update:
            self._sync_device()
            stats = self._gradient_stats(batch_grad_fn)
            gen = make_generator(self.seed, "sparsity-update", int(epoch))
            skipped = []
            for lay in self.masked_layers:
                if lay.param in frozen:
                    skipped.append(lay.module)
                    continue
                old = self.masks[lay.param]
                w = self._params[lay.param]
                new = self._update_layer(lay, old, w, stats.get(lay.param), epoch, gen)
                info["pruned"] += int((old & ~new).sum())
                info["grown"] += int((new & ~old).sum())
                self._set_mask(lay.param, new)
                # pruned -> 0, grown -> 0 (zero-initialised growth): keep only the survivors' values
                w.mul_(old & new)
            self.last_update = int(epoch)
            self._state_dirty = True
            info.update(updated=True, frozen_skipped=skipped, density=self.density())
        self._grad_buf = {}
        self._grad_steps = 0
        self._recording = self.schedule.records_grad(epoch) and self.grad_stat is not None
        return info

    def _prune_frozen(self, frozen: set[str]) -> int:
        """Prune every frozen layer still above its target density down to exactly its target."""
        pruned = 0
        stats: dict[str, torch.Tensor] | None = None
        for lay in self.masked_layers:
            keep = keep_count(lay.numel, self.target[lay.module])
            if lay.param not in frozen or self._counts[lay.module] <= keep:
                continue
            if stats is None:
                self._sync_device()
                # only MEST's importance reads a gradient statistic (RigL's would ask for a dense batch)
                stats = self._gradient_stats(None) if self.grad_stat == "sparse_mean_abs" else {}
            old = self.masks[lay.param]
            w = self._params[lay.param]
            new = prune_lowest(old, self.importance(w, stats.get(lay.param)), keep)
            pruned += int((old & ~new).sum())
            self._set_mask(lay.param, new)
            w.mul_(new)
            self._state_dirty = True
        return pruned

    def importance(self, weight: torch.Tensor, grad_stat: torch.Tensor | None) -> torch.Tensor:
        """The score a prune keeps the highest of (magnitude ``|w|``; MEST adds ``λ|g|``)."""
        return weight.detach().abs().float()

    def _gradient_stats(self, batch_grad_fn: BatchGradFn | None) -> dict[str, torch.Tensor]:
        """The recorded statistic per masked weight (empty when nothing was recorded)."""
        if not self._grad_steps:
            return {}
        return {n: b / self._grad_steps for n, b in self._grad_buf.items()}

    def _update_layer(self, lay: PrunableLayer, mask: torch.Tensor, weight: torch.Tensor,
                      grad_stat: torch.Tensor | None, epoch: int, gen: torch.Generator) -> torch.Tensor:
        return mask

    # ------------------------------------------------------------------ queries
    def layer_density(self) -> dict[str, float]:
        """``{module: density}`` over every prunable module (1.0 for unmasked ones)."""
        return {m: self._counts[m] / self._numel[m] for m in self._numel}

    def density(self) -> float:
        """Overall density over the prunable layers."""
        total = sum(self._numel.values())
        return sum(self._counts.values()) / total if total else 1.0

    def layer_sparsity_target(self) -> dict[str, float]:
        """``{module: target sparsity}`` (the distribution's output)."""
        return dict(self.target)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "epoch": self.epoch,
            "last_update": self.last_update,
            "recording": self._recording,
            "grad_buf": {n: b.detach().cpu().clone() for n, b in self._grad_buf.items()},
            "grad_steps": self._grad_steps,
            "target": dict(self.target),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method:
            raise SpfdeError(f"checkpoint holds sparsity method {state.get('method')!r} but the config says "
                             f"{self.method!r}; resume with the same sparsity.method")
        masks = state["masks"]
        if set(masks) != set(self._params):
            raise SpfdeError(
                "checkpoint masks do not match this model's masked layers "
                f"(checkpoint: {sorted(masks)[:3]}..., model: {sorted(self._params)[:3]}...); "
                "resume with the same model and sparsity settings")
        for name, m in masks.items():
            if tuple(m.shape) != tuple(self._params[name].shape):
                raise SpfdeError(f"checkpoint mask {name!r} has shape {tuple(m.shape)}, the weight has "
                                 f"{tuple(self._params[name].shape)}")
            self._set_mask(name, m.bool())
        self.epoch = int(state["epoch"])
        self.last_update = int(state["last_update"])
        self._recording = bool(state.get("recording", False))
        self._grad_buf = {n: b.to(self._params[n].device) for n, b in state.get("grad_buf", {}).items()}
        self._grad_steps = int(state.get("grad_steps", 0))
        self._state_dirty = True


class DenseEngine(SparseEngine):
    """``sparsity.method: dense``: no masks, density 1 (the baseline)."""

    method = "dense"
