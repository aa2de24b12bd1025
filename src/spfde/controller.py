"""The loop-agnostic SpFDE controller (paper Section 4, Algorithm 1).

One object that any training loop calls at five points; it owns the three cost-saving
dimensions and the accounting around them:

* weight sparsity (``spfde.sparsity``): masks, Prune&Grow every Δτ epochs;
* progressive layer freezing (``spfde.freezing``): block i frozen at Tfrz + i·Δτ, block-wise
  cosine learning rate;
* circular data sieving (``spfde.sieving``): the partial training set, served by ``sampler``;
* the training-FLOPs ledger and the memory model (``spfde.accounting``).

Usage (the built-in trainer does exactly this)::

    ctl = SpFDE(model, optimizer, config, train_size=len(train_set), example_input=x0)
    loader = DataLoader(train_set, batch_size=128, sampler=ctl.sampler)
    for epoch in range(config.train.epochs):
        ctl.start_epoch(epoch)
        model.train()
        for x, y, idx in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctl.before_step()
            optimizer.step()
            ctl.after_step(logits, y, idx)
        metrics = ctl.end_epoch()

Order inside ``start_epoch`` follows Algorithm 1: freeze first, then Prune&Grow the layers that
are still active, then update the training dataset from the interval's sample status.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spfde.accounting.flops import FlopsLedger, forward_flops_breakdown, modules_forward_flops
from spfde.config import Config, from_dict, load_config, warn_config
from spfde.errors import ConfigError, SpfdeError, warn
from spfde.names import ancestors
from spfde.sieving import NoSieve, SieveSampler, build_sieve, build_tracker
from spfde.sparsity import build_sparsity
from spfde.utils import lazy_parameters

BlockSpec = Sequence[str] | Callable[[str, nn.Module], Any] | None


def _as_config(config: Config | dict | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(config)
    return load_config(config)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP/compile wrapper holds, so parameter names match the user's model."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


#: the entries :meth:`SpFDE.load_state_dict` cannot do without (the others are optional)
_STATE_KEYS = ("epoch", "sparsity", "sieve", "tracker", "ledger")


class SpFDE:
    """Drives sparsity, freezing and sieving from inside any training loop.

    Args:
        model: the network (a DDP wrapper is fine; its ``.module`` is used).
        optimizer: an optimizer over the model's parameters. When freezing with block-wise LR is
            enabled under ``optim.schedule: cosine``, its param groups are split per block (before
            the first step), and the controller sets every group's lr at each step. The cosine
            schedule (``optim.schedule``) starts from the learning rate this optimizer was built
            with (its first group's ``initial_lr`` or ``lr``) and ends at ``optim.end_lr``; a
            group built at another rate (a 10x head) follows the same schedule times its own rate's
            ratio to the first group's, as torch's schedulers keep each group's base rate.
            ``optim.lr`` is only what the built-in trainer builds its optimizer with.
        config: a :class:`~spfde.config.Config`, a dict of sections or a YAML path.
        train_size: number of samples in the training set (indices are ``0..train_size-1``).
        example_input: one input batch (its first sample is used) to measure per-layer FLOPs,
            find the first layer and check the block order.
        blocks: the model's freezing blocks, overriding ``model.blocks()`` and
            ``config.freezing.blocks``, in forward order: module names (each covers its submodules,
            matched in whole dotted components: ``layer1`` covers ``layer1.0.conv1``, never
            ``layer10``), parameter names (a root parameter such as ``cls_token``), globs
            (``features.*``) or a nested list grouping several into one block; or a
            ``(name, module) -> block id`` function (docs/freezing.md, "Blocks").
        rank, world_size: for distributed training; decisions are taken identically on every
            rank from the shared seed, and the sampler splits the partial set across ranks.
        snip_batch: one labelled batch ``(x, y)``, needed only by ``sparsity.static_init: snip``.
        cache_off_reason: why this loop cannot serve the frozen-prefix activation cache (it cannot
            wrap the training forward in ``cache.batch(x, idx)``, e.g. the Lightning callback):
            ``freezing.cache: auto`` is then off with this reason in its one note and in
            ``cache_status``, and ``on`` is refused (a :class:`ConfigError`) as where it cannot be exact.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config | dict | str | Path,
        train_size: int,
        example_input: torch.Tensor,
        blocks: BlockSpec = None,
        rank: int = 0,
        world_size: int = 1,
        snip_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_off_reason: str | None = None,
    ) -> None:
        self.cfg = cfg = _as_config(config)
        self.model = model
        self.net = net = _unwrap(model)
        self.optimizer = optimizer
        self.train_size = int(train_size)
        if self.train_size <= 0:
            raise SpfdeError(f"train_size must be a positive number of samples, got {train_size}")
        self._check_optimizer(net, optimizer)
        lazy = lazy_parameters(net)
        if lazy:
            raise SpfdeError(f"the model has {len(lazy)} uninitialized lazy parameter(s) ({lazy[0]!r}: a LazyLinear, "
                             "LazyConv2d, ...): run one forward pass on a batch before creating the optimizer and "
                             "SpFDE, so that every weight has its shape")
        group = optimizer.param_groups[0]
        self.base_lr = float(group.get("initial_lr", group["lr"]))
        if not torch.is_tensor(example_input) or example_input.dim() < 2:
            raise SpfdeError("example_input must be a batched input tensor, e.g. next(iter(loader))[0]")
        x0 = example_input[:1].detach()
        self._x0 = x0
        warn_config(cfg)  # contradictory but harmless settings: one line each, once per run set up
        self._memory_probes: dict = {}  # memory_model's probe of each trainable set (one forward each)
        self.rank, self.world_size = rank, world_size

        # ---- accounting: per-unit dense forward FLOPs, measured once on the real input shape
        self.layer_flops, self.other_forward_flops = forward_flops_breakdown(net, x0)
        self.ledger = FlopsLedger(self.layer_flops, backward=cfg.accounting.backward)
        #: one-line remarks a trainer shows at start (e.g. FLOPs the ledger cannot attribute)
        self.notes: list[str] = []
        measured = sum(self.layer_flops.values()) + self.other_forward_flops
        if self.other_forward_flops > 0.01 * measured:
            self.notes.append(
                f"{100 * self.other_forward_flops / measured:.1f}% of the measured forward FLOPs use no parameter and "
                "no attention operands (e.g. a matmul with a buffer); the ledger leaves them out "
                "(other_forward_flops_per_sample)")

        # ---- weight sparsity
        self.sparsity = build_sparsity(net, cfg, example_input=x0, snip_batch=snip_batch)
        self.sparsity.apply_masks()

        # ---- data sieving
        self.sieve = build_sieve(cfg, self.train_size)
        self.tracker = build_tracker(cfg, self.train_size)
        self._track_status = not isinstance(self.sieve, NoSieve)
        self.sampler = self._make_sampler()
        # the sample status is buffered and recorded into the tracker at end_epoch (one vectorized
        # update, not a dozen small ops per step); under DDP each rank sees only its share of the
        # samples and the status of all ranks is merged, so all ranks take the same sieving decision
        self._status = None
        self._kernels_by_rank: list[Any] | None = None  # every rank's kernel state (end_epoch, under DDP)
        if self._track_status:
            from spfde.distributed import StatusGatherer

            self._status = StatusGatherer()

        # ---- progressive layer freezing
        self.blocks = None
        self.plan = None
        self.freezer = None
        self.block_lr = None
        self._setup_freezing(net, x0, blocks)
        from spfde.freezing.cache import build_cache

        # frozen-prefix activation cache: wrap the forward in `with ctl.cache.batch(x, idx):` to use it
        self.cache = build_cache(net, model, self.blocks, self.plan, cfg, self.train_size, world_size,
                                 off_reason=cache_off_reason)

        self.grad_norms = None
        if cfg.analysis.grad_norms:
            from spfde.analysis import GradNormTracker

            self.grad_norms = GradNormTracker(net)

        self.epoch = -1
        self._in_epoch = False
        self._epoch_info: dict[str, Any] = {}
        self._seen = 0
        self._seen_indices: torch.Tensor | None = None
        self.track_seen = False
        self._bp_saved = 0
        self._skipped: int | torch.Tensor = 0  # steps the loop reported skipped this epoch
        self._batch_max = 0  # the largest batch after_step saw this epoch (this process): the memory model's
        self._fwd_saved = self._fill_flops = 0.0
        self._last_step: tuple[int, dict[str, float], set[str]] | None = None
        self._lr_warned = False
        self._set_lr(0.0)

        # ---- sparse kernels for the masked layers (sparsity.kernels, docs/kernels.md)
        from spfde.sparsity.kernels import SparseExecution

        self.kernels = SparseExecution(net, self.sparsity, cfg.sparsity.kernels, cfg.sparsity.kernels_calibration)
        self.cache.one_off = self.kernels.one_off

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _check_optimizer(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SpfdeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise SpfdeError(
                f"the optimizer does not hold the model's parameters (e.g. {missing[0]!r}); "
                "build it from this model's parameters: SGD(model.parameters(), ...)")

    def _make_sampler(self) -> SieveSampler:
        if self.world_size > 1:
            from spfde.distributed import DistributedSieveSampler

            return DistributedSieveSampler(self.sieve, self.cfg.seed, self.rank, self.world_size)
        return SieveSampler(self.sieve, self.cfg.seed)

    def _setup_freezing(self, net: nn.Module, x0: torch.Tensor, blocks: BlockSpec) -> None:
        from spfde.freezing import BlockLR, Freezer, plan_freezing, resolve_blocks, split_param_groups_by_block

        cfg = self.cfg
        freezing = cfg.freezing.target > 0
        spec = blocks if blocks is not None else cfg.freezing.blocks
        if freezing or spec is not None:
            self.blocks = resolve_blocks(net, spec, example_input=x0)
        if freezing:
            if cfg.freezing.planner == "exact":
                self.plan = self._plan_to_target(plan_freezing)
            else:
                self.plan = self._plan_algorithm1(plan_freezing)
            if self.plan.reduced:
                self._warn_reduced(self.plan)
            if cfg.freezing.prune_on_freeze:
                # one rule (Schedule.last_update_epochs), as planned_flops replays it: a layer's last
                # update before it freezes prunes it to its target and grows nothing
                names = [lay.module for lay in self.sparsity.layers]
                self.sparsity.set_final_updates(self.sparsity.schedule.last_update_epochs(
                    names, lambda e: self.frozen_modules_at(e)))
                self.sparsity.apply_masks()
            if cfg.freezing.block_lr and cfg.optim.schedule == "cosine":  # per-block groups only serve BlockLR
                split_param_groups_by_block(self.optimizer, net, self.blocks)
            self.freezer = Freezer(net, self.blocks, self.plan, self.optimizer)
        if cfg.optim.schedule == "cosine":
            self.block_lr = BlockLR(
                self.optimizer, self.plan if cfg.freezing.block_lr else None, cfg.train.epochs,
                self.base_lr, cfg.optim.end_lr, warmup_epochs=cfg.optim.warmup_epochs)
            early = self.block_lr.frozen_in_warmup()
            if early:
                listed = ", ".join(f"{name!r} at epoch {e}" for name, e in early[:3]) + (", ..." * (len(early) > 3))
                warn(f"{len(early)} block(s) freeze before optim.warmup_epochs = {cfg.optim.warmup_epochs} ends "
                     f"({listed}): the block-wise learning rate is still rising when they freeze, so they never train "
                     "at optim.lr and get no cosine decay; lower optim.warmup_epochs, or set freezing.tfrz later")

    def _plan_algorithm1(self, plan_freezing: Callable[..., Any]) -> Any:
        """``freezing.planner: algorithm1``: Algorithm 1's arithmetic as written (BpFlops of every block
        and the un-frozen total at the target sparsity sp); the exact ledger's reduction is reported
        beside the target (``predicted_reduction``)."""
        plan = plan_freezing(**self.freeze_plan_inputs())
        plan.algorithm1_reduction = plan.predicted_reduction
        return self._with_realized(plan, "algorithm1")

    def _plan_to_target(self, plan_freezing: Callable[..., Any]) -> Any:
        """``freezing.planner: exact``: Algorithm 1, re-planned until the exact ledger replay meets the target.

        Algorithm 1 prices a block's saving with one per-epoch BpFlops; the real run's densities
        change over training (MEST trains at s' until ``search_end``, frozen layers keep their
        mask), so the realized reduction can differ from Algorithm 1's arithmetic. We re-plan with a
        raised internal target until the replayed ledger meets the user's target.
        """
        inputs = self.freeze_plan_inputs()
        target = self.cfg.freezing.target
        goal = target
        plan = plan_freezing(**inputs)
        best = plan
        for _ in range(12):
            realized = self.realized_reduction(plan)
            if realized >= target - 1e-9:
                plan.reduced = False  # an internal goal may have been out of reach; the user's target is met
                break
            if plan.reduced:  # `freezing.unreachable: reduce` and nothing freezes more: keep what saves most
                if realized < self.realized_reduction(best):
                    plan = best
                plan.reduced = True
                break
            best = plan
            goal = min(goal + (target - realized) + 1e-4, 0.999)
            try:
                plan = plan_freezing(**{**inputs, "target": goal})
            except SpfdeError:
                raise ConfigError(
                    f"freezing.target = {100 * target:.2f}% is unreachable once the sparsity schedule is "
                    f"counted: the best plan reaches {100 * realized:.2f}%; lower freezing.target, raise "
                    "freezing.max_blocks_fraction, set freezing.tfrz or use freezing.planner: algorithm1") from None
        plan.algorithm1_reduction = plan.predicted_reduction
        return self._with_realized(plan, "exact")

    def _warn_reduced(self, plan: Any) -> None:
        """One warning line: ``freezing.unreachable: reduce`` planned below the target (issue 16 item 3)."""
        from spfde.freezing.planner import FreezingWarning

        cfg = self.cfg
        what = (f"{len(plan.blocks)} of {len(self.blocks)} blocks from epoch {plan.tfrz}, "
                f"{100 * plan.predicted_reduction:.2f}% by the exact ledger (Algorithm 1's arithmetic: "
                f"{100 * (plan.algorithm1_reduction or 0.0):.2f}%)" if plan.blocks else "no block")
        warnings.warn_explicit(
            f"freezing.target = {100 * cfg.freezing.target:.2f}% is unreachable in train.epochs = "
            f"{cfg.train.epochs} (train.interval {cfg.train.interval}, freezing.tfrz {cfg.freezing.tfrz}); "
            f"freezing.unreachable: reduce freezes as much as the schedule allows: {what}",
            FreezingWarning, "spfde.freezing", 0, module="spfde.freezing")

    def _with_realized(self, plan: Any, planner: str) -> Any:
        """Set the plan's exact-ledger reductions: total (``predicted_reduction``) and backward-only."""
        with_f, without = self.planned_flops(plan), self.planned_flops(plan, with_freezing=False)
        plan.predicted_reduction = 1.0 - with_f["train_flops"] / without["train_flops"]
        plan.backward_reduction = with_f["bp_flops_saved"] / without["train_flops"]
        plan.target = self.cfg.freezing.target
        plan.planner = planner
        return plan

    def frozen_modules_at(self, epoch: int, plan: Any = None) -> set[str]:
        """Layer (module) names frozen during ``epoch`` under ``plan`` (default: this run's)."""
        plan = plan if plan is not None else self.plan
        if plan is None:
            return set()
        frozen = plan.frozen_at(epoch)
        return {m for m, b in self._module_block().items() if b in frozen}

    def planned_flops(self, plan: Any = None, with_freezing: bool = True, with_cache: bool = False) -> dict[str, Any]:
        """The ledger replayed over the whole run without training (``spfde flops``).

        ``with_cache``: assume the activation cache serves every frozen block (``freezing.cache: on``);
        the freezing plan itself never assumes it, so the cache cannot change which blocks freeze.
        """
        from spfde.accounting.flops import forward_flops_summary, planned_flops

        plan = plan if plan is not None else self.plan
        frozen_fn = (lambda e: self.frozen_modules_at(e, plan)) if with_freezing and plan is not None else None
        out = planned_flops(self.cfg, self.layer_flops, self.train_size, frozen_fn=frozen_fn,
                            samples_per_epoch=self.sieve.planned_samples, engine=self.sparsity,
                            cache=with_cache and with_freezing and plan is not None)
        return {**out, **forward_flops_summary(self.layer_flops, self.other_forward_flops)}

    def realized_reduction(self, plan: Any) -> float:
        """Training-FLOPs reduction of ``plan`` versus the same run without freezing (exact replay)."""
        without = self.planned_flops(plan, with_freezing=False)["train_flops"]
        return 1.0 - self.planned_flops(plan)["train_flops"] / without

    def freeze_plan_inputs(self) -> dict[str, Any]:
        """Algorithm 1's inputs: per-block sparse backward FLOPs per epoch and the epoch's total, both at
        the target sparsity sp (Algorithm 1's input "network under sparsity sp"; a block is at its target
        when it freezes, ``freezing.prune_on_freeze``)."""
        cfg = self.cfg
        density = self.sparsity.target_density()
        samples = self.samples_per_epoch()
        owner = self._module_block()
        bp = [0.0] * len(self.blocks)
        fwd = 0.0
        for name, flops in self.layer_flops.items():
            d = density.get(name, 1.0)
            fwd += d * flops
            if name in owner:
                bp[owner[name]] += 2.0 * d * flops * samples
        return dict(
            block_bp_flops=bp,
            epoch_train_flops=3.0 * fwd * samples,
            epochs=cfg.train.epochs,
            interval=cfg.train.interval,
            target=cfg.freezing.target,
            tfrz=cfg.tfrz,
            scheme=cfg.freezing.scheme,
            max_blocks_fraction=cfg.freezing.max_blocks_fraction,
            freezable=len(self.blocks) - (0 if cfg.freezing.freeze_head else 1),
            resume_epochs=cfg.freezing.resume_epochs,
            block_names=[b.name for b in self.blocks],
            unreachable=cfg.freezing.unreachable,
        )

    def _module_block(self) -> dict[str, int]:
        owner: dict[str, int] = {}
        for i, b in enumerate(self.blocks or []):
            for m in b.module_names:
                owner[m] = i
        return {name: owner[m] for name in self.layer_flops for m in ancestors(name) if m in owner}

    def samples_per_epoch(self) -> int:
        return len(self.sieve.active)

    # ------------------------------------------------------------------ the five call points
    def start_epoch(self, epoch: int) -> dict[str, Any]:
        """Epoch boundary: freezing, Prune&Grow and the dataset update (Algorithm 1's order)."""
        if self._in_epoch:
            raise SpfdeError(f"start_epoch({epoch}) called before end_epoch() of epoch {self.epoch}")
        epoch = self._check_epoch(epoch)
        info: dict[str, Any] = {}
        if self.freezer is not None:
            info.update(self.freezer.apply(epoch) or {})
            self.cache.set_frozen(len(self.freezer.frozen))
        frozen_params = self.freezer.frozen_param_names() if self.freezer else set()
        info["sparsity_update"] = self.sparsity.update(epoch, frozen_params=frozen_params)
        self.kernels.refresh()
        self.kernels.start_epoch()
        info.update(self.sieve.step_epoch(epoch, self.tracker))
        self.sampler.set_epoch(epoch)
        self.epoch = epoch
        self._in_epoch = True
        self._seen = 0
        self._bp_saved = 0
        self._skipped = 0
        self._batch_max = 0
        self._fwd_saved = self._fill_flops = 0.0
        self._seen_indices = torch.zeros(self.train_size, dtype=torch.bool) if self.track_seen else None
        self._epoch_info = info
        self._set_lr(float(epoch))
        return info

    def _check_epoch(self, epoch: Any) -> int:
        """``epoch`` as an int within ``train.epochs``: the freezing plan, MEST's schedule, the sieve's
        rotation and the cosine are laid out over epochs ``0 .. T-1`` (Algorithm 1), so an epoch outside
        them would run a schedule the plan never made. (Order is not checked: a resumed Lightning run
        may start an epoch again.)"""
        total = self.cfg.train.epochs
        try:  # an int, numpy's or a 0-dim integer tensor; not a float or a bool
            if isinstance(epoch, bool):
                raise TypeError
            epoch = operator.index(epoch)
        except TypeError:
            raise SpfdeError(f"start_epoch({epoch!r}): the epoch must be an int (0 .. {total - 1})") from None
        if not 0 <= epoch < total:
            raise SpfdeError(f"start_epoch({epoch}): train.epochs = {total}, so epochs run from 0 to {total - 1}; "
                             "set train.epochs in the config to the number of epochs your loop runs")
        return epoch

    def before_step(self) -> None:
        """After ``loss.backward()`` (and ``scaler.unscale_(optimizer)`` with AMP), before
        ``optimizer.step()``: mask the gradients of pruned weights; compute this step's statistics."""
        self._require_epoch("before_step")
        self.sparsity.before_step()
        if self.grad_norms is not None:  # the gradients the optimizer applies: pruned positions masked
            self.grad_norms.record(defer=True)

    def after_step(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
                   losses: torch.Tensor | None = None, skipped: bool | torch.Tensor = False) -> None:
        """After ``optimizer.step()``: re-apply masks, record sample status, charge the ledger.

        ``losses``: the batch's per-sample training losses, shape ``(batch,)`` (e.g.
        ``F.cross_entropy(logits, y, reduction="none")``; a sequence model averages each
        sequence's token losses). Needed with ``sieving.criterion: loss``, ignored otherwise.

        ``skipped``: True when the optimizer did not apply this step (GradScaler skips a step whose
        unscaled gradients hold inf/NaN: ``skipped = scaler.get_scale() < scale_before_update``). The
        step's statistics (MEST's |g|, RigL's dense gradient, gradient norms, the sample status) are
        dropped; its FLOPs are charged, the work was done. A 0-dim bool tensor is accepted so that no
        host sync happens unless a statistic is recorded. Gradient statistics also drop a step whose
        gradients are not finite on their own.
        """
        self._require_epoch("after_step")
        indices = torch.as_tensor(indices)
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            # a float would be truncated and a bool read as a mask: the sieve would track other samples
            raise SpfdeError(f"after_step: indices are {indices.dtype}; pass the batch's integer sample indices "
                             "(the idx the loader yields with each batch, 0 .. train_size-1)")
        n = int(indices.numel())
        self._batch_max = max(self._batch_max, n)
        # sample status only feeds the sieve; skip the device sync without one
        status = (self._sample_status(logits, targets, indices, losses)
                  if self._track_status and not bool(skipped) else None)
        self._seen += n
        progress = self.epoch + min(self._seen / max(len(self.sampler), 1), 1.0)
        frozen = self.freezer.frozen_module_names() if self.freezer else set()
        density = self.sparsity.layer_density()  # what this step ran at (a step-mode update follows it)
        dense_grad_kept = self.sparsity.after_step(self.optimizer, skipped=skipped, progress=progress)
        if self.grad_norms is not None:
            self.grad_norms.commit(skipped)
        if skipped is not False:
            self._skipped = self._skipped + torch.as_tensor(skipped).to(torch.int64)
        if status is not None:
            if self._status is not None:
                self._status.add(indices.cpu(), status.cpu())
            else:
                self.tracker.record(indices.cpu(), status.cpu())
        # every rank runs the same number of equally sized steps (DistributedSieveSampler)
        b = n * self.world_size
        for rows, modules in self.cache.pop_fills():  # rows the cache computed in this step's forward
            fill = rows * modules_forward_flops(self.layer_flops, density, modules)
            self.ledger.add(fill)
            self._fill_flops += fill
        cached = self.cache.step_modules()  # served from the cache: no forward either
        charged = self.ledger.charge(b, density, frozen, cached=cached)
        if dense_grad_kept:  # RigL's update reads this step's unmasked gradient: it was computed densely
            if self.sparsity.schedule.per_step:
                self.ledger.add(self.ledger.dense_grad_surcharge(b, density, frozen))
            else:  # surcharged in end_epoch once we know which kept step was the last
                self._last_step = (b, density, frozen)
        if frozen:  # the ledger's own difference, so accounting.backward: exact is honoured too
            as_run = self.ledger.cost(b, density, frozen) if cached else charged
            self._bp_saved += self.ledger.cost(b, density) - as_run
            self._fwd_saved += as_run - charged
        if self._seen_indices is not None:
            self._seen_indices[indices.cpu()] = True
        self._set_lr(progress)

    def _sample_status(self, logits: Any, targets: Any, indices: torch.Tensor, losses: Any) -> torch.Tensor:
        """What the tracker records for this batch: per-sample correctness, or losses (``sieving.criterion``)."""
        n = int(indices.numel())
        if self.tracker.criterion == "loss":
            if losses is None:
                raise ConfigError("sieving.criterion is 'loss', so after_step needs the per-sample losses: "
                                  "after_step(logits, targets, indices, losses=per_sample_loss)")
            losses = torch.as_tensor(losses).detach()
            if losses.dim() != 1 or losses.numel() != n:
                raise ConfigError(
                    f"after_step got losses of shape {tuple(losses.shape)} for {n} sample indices; sieving.criterion"
                    f" 'loss' needs one loss per sample, shape ({n},) (reduction='none', per sequence: its mean)")
            # an integer pattern of the float losses when the status is gathered across ranks
            return self.tracker.encode(losses) if self._status is not None else losses
        shape = lambda t: tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        if not torch.is_tensor(logits) and torch.is_tensor(getattr(logits, "logits", None)):
            # a Hugging Face ModelOutput passed whole (model(x) instead of model(x).logits): a call mistake,
            # not a criterion choice, so the criterion error below would send the user the wrong way
            raise SpfdeError(
                f"after_step got a {type(logits).__name__} as logits; pass its logits tensor "
                "(after_step(out.logits, targets, indices), or 'logits': out.logits in SpFDECallback's dict)")
        if (torch.is_tensor(logits) and torch.is_tensor(targets) and logits.dim() == 2 and targets.dim() == 1
                and logits.shape[0] == targets.shape[0] != n):
            # a batch whose index column does not match it (a sliced or accumulated batch): not a criterion choice
            raise SpfdeError(
                f"after_step got {n} sample indices for a batch of {logits.shape[0]} (logits {shape(logits)}); pass "
                "the indices of exactly the samples in logits and targets (the third item of each batch)")
        if not (torch.is_tensor(logits) and torch.is_tensor(targets) and logits.dim() == 2 and targets.dim() == 1
                and logits.shape[0] == targets.shape[0] == n and not targets.is_floating_point()):
            # a config choice that does not fit this model's outputs: exit 2 from the CLI, like any config error
            raise ConfigError(
                f"sieving.criterion 'forgetting' needs single-label class logits (batch, classes) and integer targets "
                f"(batch,) to tell a correct sample; got logits {shape(logits)} and targets {shape(targets)} for {n} "
                "indices. For multi-label or sequence outputs set sieving.criterion: loss and pass "
                "after_step(logits, targets, indices, losses=per_sample_loss)")
        with torch.no_grad():
            return logits.detach().argmax(dim=1) == targets

    def end_epoch(self) -> dict[str, Any]:
        """Close the epoch; returns the per-epoch metrics (docs/design.md, "Run outputs")."""
        self._require_epoch("end_epoch")
        if self._status is not None:
            self._status.flush(self.tracker)  # a collective: every rank calls end_epoch
        if self.world_size > 1:
            from spfde.distributed import all_gather_objects, is_distributed

            if is_distributed():
                # under sparsity.kernels: auto each rank times and decides for itself: a checkpoint (written
                # by one rank) keeps every rank's choices, so each resumes with its own (state_dict)
                self._kernels_by_rank = all_gather_objects(self.kernels.state_dict())
        self._in_epoch = False
        if self._last_step is not None:
            # RigL's update reads the last step's (unmasked) gradient: that step computed it densely
            self.ledger.add(self.ledger.dense_grad_surcharge(*self._last_step))
        self._last_step = None
        info = self._epoch_info
        layer_density = self.sparsity.layer_density()
        m: dict[str, Any] = {
            "train_flops": int(self.ledger.end_epoch()),
            "cum_train_flops": int(self.ledger.total_flops),
            "density": float(self.sparsity.density()),
            "layer_density": {k: round(float(v), 6) for k, v in layer_density.items()},
            "samples_seen": int(self._seen) * self.world_size,  # all ranks (equal shares)
            "active_samples": int(len(self.sieve.active)),
            "returned": int(info.get("returned", 0)),
            "removed_this_update": int(info.get("removed_this_update", 0)),
            "never_seen_count": int(info.get("never_seen_count", 0)),
            "frozen_blocks": self.freezer.frozen_block_names if self.freezer else [],  # forward order
            "active_params": self.active_params(),
            "bp_flops_saved": int(self._bp_saved),
            "skipped_steps": int(self._skipped),
            "fwd_flops_saved": int(self._fwd_saved),
            "cache_fill_flops": int(self._fill_flops),
            **self.cache.end_epoch(),
            "sparsity_updated": bool(info.get("sparsity_update", {}).get("updated", False)),
            "kernels": self.kernels.choices(),
        }
        speedups = self.kernels.speedups()
        if speedups:  # only what sparsity.kernels: auto timed
            m["kernel_speedup"] = speedups
            m["kernel_speedup_density"] = self.kernels.speedup_densities()
        m["mem_model_bytes"] = int(self.memory_model()["total"])
        # the same sparse model with nothing frozen: Fig. 4's "DST methods Min." baseline
        m["mem_model_unfrozen_bytes"] = (int(self.memory_model(frozen=False)["total"]) if m["frozen_blocks"]
                                         else m["mem_model_bytes"])
        if "forgetting_histogram" in info:
            m["forgetting_histogram"] = info["forgetting_histogram"]
        if self.block_lr is not None:
            m["block_lr"] = self.block_lr.lrs()
        if self.grad_norms is not None:
            m["grad_norms"] = self.grad_norms.epoch_summary()
        return m

    # ------------------------------------------------------------------ queries
    def active_params(self) -> int:
        """Trainable nonzero parameters (frozen blocks and pruned weights excluded)."""
        total = 0
        masks = self.sparsity.masks
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            total += int(masks[name].sum()) if name in masks else p.numel()
        return total

    def memory_model(self, batch_size: int | None = None, frozen: bool = True) -> dict[str, int]:
        """Training memory of the current state (Section 5.2): weights, activations, grads, optimizer.

        ``batch_size``: default the largest batch ``after_step`` saw this epoch (your loader's, this
        process's), before any step ``data.batch_size``. The optimizer state counts the tensors per weight
        this controller's optimizer keeps (:func:`~spfde.accounting.memory.optimizer_slots`: SGD with
        momentum 1, Adam 2). ``frozen=False``: the same masks with no block frozen (the un-frozen sparse run).
        """
        from spfde.accounting.memory import memory_model, optimizer_slots

        fp = self.freezer.frozen_param_names() if self.freezer and frozen else set()
        fm = self.freezer.frozen_module_names() if self.freezer and frozen else set()
        kernels = getattr(self, "kernels", None)
        # the probe is one forward of one sample: it neither times, decides nor reports a kernel choice
        with kernels.one_off(probe=True) if kernels is not None else contextlib.nullcontext():
            return memory_model(self.net, self._x0, batch_size or self._batch_max or self.cfg.data.batch_size,
                                masks=self.sparsity.masks, frozen_params=fp, frozen_modules=fm,
                                optimizer_slots=optimizer_slots(self.optimizer), probes=self._memory_probes)

    def seen_indices(self) -> torch.Tensor | None:
        """Indices passed to ``after_step`` this epoch (set ``track_seen = True`` first)."""
        return None if self._seen_indices is None else self._seen_indices.nonzero().flatten()

    @property
    def in_epoch(self) -> bool:
        """True between ``start_epoch`` and ``end_epoch``."""
        return self._in_epoch

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[-1]["lr"])

    def _set_lr(self, epoch_float: float) -> None:
        if self.block_lr is None:
            return
        changed = self.block_lr.changed_outside()
        if changed is not None and not self._lr_warned:
            self._lr_warned = True
            i, was, now = changed
            warnings.warn(
                f"spfde: param group {i}'s learning rate was changed outside the controller (set to {was:.4g}, "
                f"found {now:.4g}: an LR scheduler or your code?). With optim.schedule: cosine the controller "
                "sets every group's lr at each step and overwrites that change. To keep your own schedule, set "
                "optim.schedule: constant (the controller then leaves the lr alone); README, 'Use it in your "
                "own loop'", UserWarning, stacklevel=3)
        self.block_lr.set(epoch_float)

    def _require_epoch(self, what: str) -> None:
        if not self._in_epoch:
            raise SpfdeError(f"{what}() called outside an epoch: call start_epoch(epoch) first")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "sparsity": self.sparsity.state_dict(),
            "sieve": self.sieve.state_dict(),
            "tracker": self.tracker.state_dict(),
            "ledger": self.ledger.state_dict(),
            "freezer": self.freezer.state_dict() if self.freezer else None,
            "grad_norms": self.grad_norms.state_dict() if self.grad_norms is not None else None,
            "kernels": self.kernels.state_dict(),
            **self._kernels_of_every_rank(),
        }

    def _kernels_of_every_rank(self) -> dict[str, Any]:
        """``{"kernels_by_rank": [...]}`` under DDP (gathered at the last end_epoch, this rank's own
        entry as it is now: rank 0 evaluates after end_epoch, which can add decisions), else ``{}``."""
        by_rank = self._kernels_by_rank
        if not by_rank or len(by_rank) != self.world_size:
            return {}
        by_rank = list(by_rank)
        by_rank[self.rank] = self.kernels.state_dict()
        return {"kernels_by_rank": by_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            what = f"a {type(state).__name__}" if not isinstance(state, dict) else f"a dict without {missing}"
            raise SpfdeError(f"SpFDE.load_state_dict got {what}: pass what SpFDE.state_dict() returned (saved with "
                             "the model's and the optimizer's state), not the model's or a hand-made dict")
        self.epoch = state["epoch"]
        self.sparsity.load_state_dict(state["sparsity"])
        self.sieve.load_state_dict(state["sieve"])
        self.tracker.load_state_dict(state["tracker"])
        self.ledger.load_state_dict(state["ledger"])
        if self.freezer is not None and state.get("freezer") is not None:
            self.freezer.load_state_dict(state["freezer"])
        if self.grad_norms is not None and state.get("grad_norms") is not None:
            self.grad_norms.load_state_dict(state["grad_norms"])
        self.sparsity.apply_masks()
        self.cache.reset()  # derived data: rebuilt from the restored model at the next epoch start
        by_rank = state.get("kernels_by_rank")
        own = by_rank[self.rank] if isinstance(by_rank, list) and len(by_rank) == self.world_size else None
        self.kernels.load_state_dict(own if own is not None else state.get("kernels") or {})
        self._in_epoch = False

    def optimizer_loaded(self) -> None:
        """Call after ``optimizer.load_state_dict(...)`` (in either order with :meth:`load_state_dict`).

        A loaded optimizer state may hold momentum for parameters that are frozen now (their state is
        dropped: frozen blocks keep none, Section 4.2) and nonzero momentum at positions that are
        pruned now (zeroed, so it cannot revive a pruned weight). A Prune&Grow update of an epoch
        already started still zeroes its freshly grown positions after the next step, as without
        the load.
        """
        if self.freezer is not None:
            self.freezer.drop_optimizer_state()
        self.sparsity.mask_optimizer_state(self.optimizer, pending=False)
        if self.block_lr is not None:  # the loaded rates are ours from before the checkpoint, not a user's
            self.block_lr.forget()


def count_steps(n_samples: int, batch_size: int, drop_last: bool = False) -> int:
    return n_samples // batch_size if drop_last else math.ceil(n_samples / batch_size)
