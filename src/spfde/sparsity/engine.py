"""The stateful wrapper every sparse method shares: masks, per-step masking, updates, checkpoints.

A :class:`SparseEngine` holds one boolean mask per masked weight (parameter name -> mask) and
is driven by the controller at four points (docs/design.md):

* ``update(epoch, frozen_params)`` at every epoch start: a no-op unless the method's schedule
  (:mod:`spfde.sparsity.schedule`) says the structure changes now; never touches the masks or
  weights of frozen params. A layer's *final* update (``set_final_updates``, from the freezing plan:
  its last update before it freezes with ``freezing.prune_on_freeze``) prunes it to its target and
  grows nothing (MEST), so it trains at ``s`` before it freezes and meets ``s`` at the end.
* ``before_step()`` after ``backward``: multiplies the gradients by the masks (so momentum and
  weight decay see zero at pruned positions) and, only in the epoch (or, with
  ``sparsity.update_unit: step``, the step) just before an update, computes the gradient statistic
  the method needs (MEST with λ > 0: mean ``|g|`` at active positions; RigL: the last step's dense
  gradient) together with a device-side "all finite" flag.
* ``after_step(optimizer, skipped=False)``: multiplies the weights by the masks (bit-exact zeros
  whatever the optimizer does), commits the step's statistic unless the step was ``skipped`` (e.g. a
  GradScaler overflow step) or its gradients were not finite (no host sync: a ``torch.where`` on the
  flag), and, once after each update, zeroes every optimizer state tensor shaped like the weight (SGD
  ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``) at pruned and freshly grown positions. In step
  mode it also runs the update that is due after this step.

Per-step cost outside recording steps is two ``torch._foreach_mul_`` calls over the masked weights
with masks kept as precomputed float tensors of the weight's dtype/layout (bench/mask_overhead.py
measures it). Layers at sparsity 0 (the dense first and last layers) get no mask at all.

Where the multiplications are known to change nothing, they are skipped (the same bits either way):

* a gradient a sparse kernel wrote (:meth:`note_masked_grad`: zero at every pruned position of the
  mask it was built on) and that is still, unmodified, the weight's ``.grad`` (same storage and
  version counter: an accumulation, clipping or any other in-place write, or a sum with another use
  of the weight, makes it another tensor or version) is not multiplied in ``before_step``;
* with :attr:`SparseEngine.optimizer_keeps_zeros` (the built-in trainer, which builds the optimizer
  and loads its state only through the controller), the weights are not multiplied after a step of
  ``torch.optim.SGD``, ``Adam`` or ``AdamW`` when ``before_step`` found every masked weight zero at
  its pruned positions (unchanged since it was last masked or checked) and left every gradient
  zero there, and the optimizer state is masked (no update since): such a step adds exactly zero at
  those positions (momentum, weight decay, Adam's moments and AdamW's decay keep a zero, of either
  sign, as it is). A write through ``param.data`` between steps is invisible to this check, as to
  :meth:`weight_issue` (call :meth:`apply_masks` after one). Why: the two multiplications took
  0.3 ms of a 14 ms ViT-preset SpFDE step (16 small tensors; 2% of the run), work a dense run does
  not do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from spfde.errors import SpfdeError
from spfde.sparsity.masks import PrunableLayer, keep_count, random_mask
from spfde.sparsity.schedule import Schedule
from spfde.utils import make_generator

BatchGradFn = Callable[[], Any]
#: optimizers whose step adds exactly zero to a weight whose gradient and state are zero (module doc)
ZERO_KEEPING_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


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
    #: the optimizer's state is written only by its own steps and by the controller's loads (which mask
    #: it), so :meth:`after_step` may skip re-masking the weights after a zero-keeping step (module doc)
    optimizer_keeps_zeros = False
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
        self._grad_steps: int | torch.Tensor = 0  # committed (finite, not skipped) steps; a device tensor
        self._grad_calls = 0  # recording steps seen, committed or not
        self._pending: tuple[list[str], list[torch.Tensor], torch.Tensor] | None = None
        self._state_dirty = False
        self._state_keep: dict[str, torch.Tensor] = {}
        self._lists: tuple[list[str], list[nn.Parameter], list[torch.Tensor]] | None = None
        # each masked weight's (version counter, storage address) when last masked or checked, and
        # whether it was zero at every pruned position then (weight_issue)
        self._clean: dict[str, tuple[int, int, bool]] = {}
        # gradients sparse kernels wrote in this step (note_masked_grad): name -> (address, version,
        # the mask they are zero off); a .grad at that address is that tensor (autograd gives a
        # parameter's gradient its shape and adopts or copies the kernel's tensor whole)
        self._kernel_grads: dict[str, tuple[int, int, torch.Tensor]] = {}
        self._step_zeros = False  # before_step saw every masked weight and gradient zero where pruned
        #: {module: epoch of its final update} (Schedule.last_update_epochs); missing: the run's last update
        self.final_update: dict[str, int] = {}
        #: step mode: optimizer steps taken so far, and the frozen params of the current epoch
        self.step = 0
        self._frozen: set[str] = set()
        #: sparsity.grow_exclude_dropped: never regrow a weight dropped in the same update
        self.exclude_dropped = False
        self._init_masks()

    # ------------------------------------------------------------------ masks
    def _init_masks(self) -> None:
        """Random masks at the schedule's initial sparsity (paper Section 4.1: random structure)."""
        for lay in self.masked_layers:
            self._set_mask(lay.param, random_mask(lay.shape, self._initial_keep(lay), self._init_generator(lay)))

    def _initial_keep(self, lay: PrunableLayer) -> int:
        return keep_count(lay.numel, self.schedule.initial_sparsity(self.target[lay.module],
                                                                    self.final_update.get(lay.module)))

    def _init_generator(self, lay: PrunableLayer) -> torch.Generator:
        return make_generator(self.seed, "sparsity-init", lay.module)

    def _set_mask(self, param: str, mask: torch.Tensor) -> None:
        p = self._params[param]
        m = torch.empty_like(p, dtype=torch.bool).copy_(mask)
        self.masks[param] = m
        self._clean.pop(param, None)  # the weight is not known to fit the new mask until checked
        self._step_zeros = False
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
            self._mark_clean()

    def _mark_clean(self) -> None:
        self._clean = {name: (p._version, p.data_ptr(), True) for name, p in self._params.items()}

    def note_masked_grad(self, param: str, mask: torch.Tensor, grad: torch.Tensor) -> None:
        """A sparse kernel wrote ``grad`` as the weight gradient of ``param``: zero at every position
        ``mask`` prunes. If it is still the weight's ``.grad``, unmodified, at :meth:`before_step`, the
        gradient is not multiplied by the mask there (module doc). No reference is kept: holding one
        would make autograd copy the gradient instead of adopting it as ``.grad``."""
        self._kernel_grads[param] = (grad.data_ptr(), grad._version, mask)

    def weight_issue(self, param: str, weight: torch.Tensor | None = None) -> str | None:
        """None when masked weight ``param`` is zero at every pruned position, else why it is not.
        ``weight``: the tensor a layer computes with, when that may not be the engine's parameter
        (``torch.func.functional_call`` substitutes its own; checked every call).

        Something outside the engine can write pruned positions between two steps (``load_state_dict``
        after set-up, an in-place edit); the next :meth:`after_step` masks them again. Until then the
        sparse kernels, which read the nonzeros only, would compute a different function than the
        dense layer, so they ask this first (:mod:`spfde.sparsity.kernels.execution`). The answer for
        the parameter itself is kept per (version counter, storage address): an in-place write or a new
        storage (``param.data = ...``, ``vector_to_parameters``, a deep copy) is checked again; a write
        through ``param.data`` into the same storage is invisible to both (mask with
        :meth:`apply_masks` after one).
        """
        p = self._params[param]
        own = weight is None or weight is p
        w = p if own else weight
        seen = (p._version, p.data_ptr())
        known = self._clean.get(param) if own else None
        if known is not None and known[:2] == seen:
            clean = known[2]
        else:
            with torch.no_grad():
                clean = not bool(w.ne(0).logical_and_(self.masks[param].logical_not()).any())
            if own:
                self._clean[param] = (*seen, clean)
        if clean:
            return None
        if isinstance(w, nn.Parameter) and not own:  # never masked by after_step: say so
            return ("its module holds another Parameter than the one the controller masks, nonzero at "
                    "pruned positions (replaced after set-up, e.g. by load_state_dict(assign=True): set the "
                    "controller up after loading)")
        return ("its weight is nonzero at pruned positions (written outside the controller, e.g. "
                "load_state_dict after set-up; the next after_step masks it)")

    def set_final_updates(self, final_update: dict[str, int]) -> None:
        """Tell the engine each layer's final update epoch (:meth:`Schedule.last_update_epochs`).

        Before training starts, a layer whose final update is the initial mask (``0``) is re-drawn at
        its target (the same random permutation, so the mask shrinks to a subset); call
        :meth:`apply_masks` afterwards.
        """
        self.final_update = {m: int(e) for m, e in final_update.items()}
        if self.epoch >= 0 or self.last_update >= 0 or self.step:
            return  # training has started: the masks are what they are
        for lay in self.masked_layers:
            keep = self._initial_keep(lay)
            if keep != self._counts[lay.module]:
                self._set_mask(lay.param, random_mask(lay.shape, keep, self._init_generator(lay)))

    # ------------------------------------------------------------------ per step
    def _recording_now(self) -> bool:
        if self.grad_stat is None:
            return False
        if self.schedule.per_step:
            return self.schedule.is_update_step(self.step + 1, self.epoch)
        return self._recording

    def needs_dense_grad_now(self) -> bool:
        """True when the coming step's unmasked weight gradient feeds an update (RigL), so sparse
        kernels must compute it densely (:mod:`spfde.sparsity.kernels`)."""
        return self.grad_stat == "dense_last" and self._recording_now()

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the gradients at pruned positions; compute the update's gradient statistic if due."""
        self._commit(False)  # a loop that never calls after_step still gets its statistics
        noted, self._kernel_grads = self._kernel_grads, {}
        self._step_zeros = False
        if not self._params:
            return
        names, weights, masks = self._cached_lists()
        if masks[0].device != weights[0].device:
            self._sync_device()
            names, weights, masks = self._cached_lists()
        clean, current = self._clean, self.masks
        zeros = True  # every weight zero at its pruned positions, unchanged since it was masked or checked
        kept: list[str] = []
        grads: list[torch.Tensor] = []
        kept_masks: list[torch.Tensor] = []
        todo: list[int] = []  # of grads: those no kernel wrote masked (module doc)
        for n, w, m in zip(names, weights, masks, strict=True):
            c = clean.get(n)
            if zeros and (c is None or not c[2] or c[0] != w._version or c[1] != w.data_ptr()):
                zeros = False
            g = w.grad
            if g is None:  # frozen or unused layers have no gradient
                continue
            k = noted.get(n)
            if k is None or k[0] != g.data_ptr() or k[1] != g._version or k[2] is not current[n]:
                todo.append(len(grads))
            kept.append(n)
            grads.append(g)
            kept_masks.append(m)
        if not grads:
            self._step_zeros = zeros
            return
        names, masks = kept, kept_masks
        recording = self._recording_now()
        if recording and self.grad_stat == "dense_last":
            # RigL reads the dense gradient autograd computed anyway, before it is masked
            stat = [g.detach().float().clone() for g in grads]
        if len(todo) == len(grads):
            torch._foreach_mul_(grads, masks)
        elif todo:
            torch._foreach_mul_([grads[i] for i in todo], [masks[i] for i in todo])
        self._step_zeros = zeros
        if recording and self.grad_stat == "sparse_mean_abs":
            stat = torch._foreach_abs(grads)
        if recording:
            # one flag for the whole step (max |g| propagates NaN): an AMP overflow step is dropped whole
            finite = torch.stack(torch._foreach_norm(stat, ord=float("inf"))).isfinite().all()
            self._pending = (names, stat, finite)
            self._grad_calls += 1

    def _buf(self, name: str) -> torch.Tensor:
        b = self._grad_buf.get(name)
        if b is None:
            p = self._params[name]
            b = self._grad_buf[name] = torch.zeros_like(p, dtype=torch.float32)
        return b

    @torch.no_grad()
    def _commit(self, skipped: bool | torch.Tensor) -> bool:
        """Keep the pending statistic unless the step was skipped or its gradients are not finite.

        MEST's running sum stays on the device (a ``torch.where`` on the flag, no host sync). RigL's
        dense gradient replaces the last kept one, and whether it did decides which step the ledger
        charges at dense cost: one sync, in the steps that record it only. Returns True when a dense
        gradient was kept.
        """
        if self._pending is None:
            return False
        names, stat, finite = self._pending
        self._pending = None
        ok = finite & ~torch.as_tensor(skipped, device=finite.device) if skipped is not False else finite
        if self.grad_stat == "dense_last":  # keep the last good step's gradient
            if not bool(ok):
                return False
            self._grad_buf.update(zip(names, stat, strict=True))
            self._grad_steps = 1
            return True
        for n, g in zip(names, stat, strict=True):
            self._buf(n).add_(torch.where(ok, g, 0.0))
        self._grad_steps = self._grad_steps + ok.to(torch.int64)
        return False

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None,
                   skipped: bool | torch.Tensor = False, progress: float | None = None) -> bool:
        """Keep pruned weights exactly zero; commit this step's statistic; in step mode run a due update.

        ``skipped``: the optimizer did not apply this step (a bool, or a 0-dim bool tensor so that no
        host sync is needed; e.g. a GradScaler overflow step): its statistic is dropped.
        ``progress``: the fractional epoch of this step (step mode: the cosine drop fraction).
        Returns True when this step's dense gradient was kept for a RigL update (the ledger charges it).
        """
        kept = self._commit(skipped)
        zeros, self._step_zeros = self._step_zeros, False
        if self._params:
            if not (zeros and self.optimizer_keeps_zeros and not self._state_dirty
                    and type(optimizer) in ZERO_KEEPING_OPTIMIZERS):
                _, weights, fmasks = self._cached_lists()
                torch._foreach_mul_(weights, fmasks)
            self._mark_clean()
        if self.schedule.per_step:
            self.step += 1
            if self.schedule.is_update_step(self.step, self.epoch):
                self._sync_device()
                self._update_structure(self.epoch, self.step, progress if progress is not None else self.epoch,
                                       make_generator(self.seed, "sparsity-update-step", self.step))
                self._reset_stats()
        if self._state_dirty and optimizer is not None:
            self.mask_optimizer_state(optimizer)
        return kept

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer, pending: bool = True) -> None:
        """Zero every state tensor shaped like a masked weight at its pruned (and freshly grown) positions.

        ``pending=False`` (a state just loaded into the optimizer) zeroes the pruned positions of the
        current masks and leaves a weight whose update's zeroing is still due (after the next step)
        to that zeroing: an update taken before the load (Lightning's resume runs the epoch's
        ``start_epoch`` before it loads the optimizer) then zeroes its pruned and freshly grown
        positions after that step, as in an uninterrupted run, and the resume stays bit-identical.
        """
        for name, p in self._params.items():
            keep = self._state_keep.get(name)
            if keep is not None and not pending:
                continue
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(self._fmasks[name].to(v.dtype) if keep is None else keep.to(v.device, v.dtype))
        if pending or not self._state_keep:
            self._state_keep = {}
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
        self._frozen = set(frozen_params)
        info: dict[str, Any] = {"updated": False, "pruned": 0, "grown": 0}
        if self.schedule.is_update_epoch(epoch) and epoch > self.last_update:
            self._sync_device()
            info = self._update_structure(epoch, None, float(epoch), make_generator(self.seed, "sparsity-update",
                                                                                     int(epoch)), batch_grad_fn)
        self._reset_stats()
        self._recording = self.schedule.records_grad(epoch) and self.grad_stat is not None
        return info

    def _reset_stats(self) -> None:
        self._grad_buf = {}
        self._grad_steps = 0
        self._grad_calls = 0
        self._pending = None

    def _update_structure(self, epoch: int, step: int | None, progress: float, gen: torch.Generator,
                          batch_grad_fn: BatchGradFn | None = None) -> dict[str, Any]:
        """Prune&Grow every active masked layer once (the update of ``epoch``, or of ``step`` in step mode)."""
        info: dict[str, Any] = {"updated": False, "pruned": 0, "grown": 0}
        self._commit(False)
        stats = self._gradient_stats(batch_grad_fn, progress)
        if stats is None:  # RigL: every step that could feed this update was skipped; keep the masks
            return {**info, "skipped_update": True}
        skipped = []
        for lay in self.masked_layers:
            if lay.param in self._frozen:
                skipped.append(lay.module)
                continue
            old = self.masks[lay.param]
            w = self._params[lay.param]
            new, keep = self._update_layer(lay, old, w, stats.get(lay.param), progress, gen)
            info["pruned"] += int((old & ~new).sum())
            info["grown"] += int((new & ~old).sum())
            self._set_mask(lay.param, new)
            # pruned and grown weights are 0 (zero-initialised growth): keep only the survivors' values
            w.mul_(keep)
            self._clean[lay.param] = (w._version, w.data_ptr(), True)
            self._state_keep[lay.param] = keep
        if step is None:
            self.last_update = int(epoch)
        self._state_dirty = True
        info.update(updated=True, frozen_skipped=skipped, density=self.density())
        return info

    def importance(self, weight: torch.Tensor, grad_stat: torch.Tensor | None) -> torch.Tensor:
        """The score a prune keeps the highest of (magnitude ``|w|``; MEST adds ``λ|g|``)."""
        return weight.detach().abs().float()

    def _gradient_stats(self, batch_grad_fn: BatchGradFn | None, progress: float
                        ) -> dict[str, torch.Tensor] | None:
        """The recorded statistic per masked weight; empty when no step was kept (MEST then scores by
        |w| alone). A method that cannot update without one returns None: the update is skipped."""
        steps = int(self._grad_steps)
        return {n: b / steps for n, b in self._grad_buf.items()} if steps else {}

    def _update_layer(self, lay: PrunableLayer, mask: torch.Tensor, weight: torch.Tensor,
                      grad_stat: torch.Tensor | None, epoch: float, gen: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new mask, positions whose weight and optimizer state survive)``."""
        return mask, mask

    # ------------------------------------------------------------------ queries
    def layer_density(self) -> dict[str, float]:
        """``{module: density}`` over every prunable module (1.0 for unmasked ones)."""
        return {m: self._counts[m] / self._numel[m] for m in self._numel}

    def density(self) -> float:
        """Overall density over the prunable layers."""
        total = sum(self._numel.values())
        return sum(self._counts.values()) / total if total else 1.0

    def target_density(self) -> dict[str, float]:
        """``{module: density}`` every prunable module has at its target sparsity (keep_count rounding)."""
        return {m: keep_count(n, self.target.get(m, 0.0)) / n for m, n in self._numel.items()}

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
            "grad_steps": int(self._grad_steps),
            "grad_calls": self._grad_calls,
            "target": dict(self.target),
            "step": self.step,
            "frozen": sorted(self._frozen),
            "final_update": dict(self.final_update),
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
        self._grad_calls = int(state.get("grad_calls", self._grad_steps))
        self._pending = None
        self.step = int(state.get("step", 0))
        self._frozen = set(state.get("frozen", []))
        if "final_update" in state:
            self.final_update = {m: int(e) for m, e in state["final_update"].items()}
        self._state_keep = {}
        self._state_dirty = True


class DenseEngine(SparseEngine):
    """``sparsity.method: dense``: no masks, density 1 (the baseline)."""

    method = "dense"
