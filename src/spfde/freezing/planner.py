"""The progressive-freezing planner: Algorithm 1's "generate freeze config" loop and its schemes.

Pure functions of numbers (per-block backward FLOPs, epochs, Δτ, the target), so `spfde plan`
can print a plan without a model, and a resumed run recomputes the identical plan.

Paper: Section 4.2.1 (Algorithm 1, Tfrz from "freeze 2/3 of the layers") and Appendix B (the four
freezing schemes of Fig. 3a and Table A1).

How every scheme meets the same target
--------------------------------------
The predicted reduction of any plan is ``Σ_epochs Σ_{b frozen that epoch} BpFlops(b)`` divided by
the un-frozen run's training FLOPs ``epoch_train_flops × T`` (:func:`plan_reduction`): a frozen
block still runs its forward pass, so freezing it saves its backward FLOPs (Section 4.2.1).

* ``single_shot``: Algorithm 1. Block i freezes at ``Tfrz + i·Δτ`` and stays frozen; blocks are
  added front to back while the predicted FLOPs exceed the target, each saving
  ``BpFlops(block_i) × (T − Tfrz − Δτ·i)``. A block whose freeze epoch would be ``≥ T`` saves
  nothing and is never added.
* ``single_shot_resume``: the single-shot plan with every freeze epoch moved ``t`` epochs earlier
  and all blocks defrosted for the last ``t`` epochs (Appendix B), so every block is frozen for
  exactly as many epochs as in ``single_shot``: the same reduction. ``t = resume_epochs``, by
  default ``min(Δτ, Tfrz − 1)`` (the first freeze must stay after epoch 0).
* ``periodic``: from epoch 0 the front group of ``n4 >= 1`` blocks is updated only in epochs
  ``e ≡ 0 (mod 4)`` and the middle group of ``n2 >= 1`` blocks only in epochs ``e ≡ 0 (mod 2)``
  (update frequencies 1/4 and 1/2, Appendix B); the last group (at least the head) is never frozen.
  Periods are powers of two, so whenever a block is frozen every block before it is frozen too.
  The group sizes are the fewest blocks ``n4 + n2`` that meet the target with both groups
  non-empty and, among those, the split whose reduction is closest to (and not below) the target.
* ``delayed_periodic``: every block trains for epochs ``[0, Td)``, then the periodic pattern runs
  with its phase starting at ``Td`` (``e − Td ≡ 0 mod P`` is an update epoch). ``Td = tfrz``;
  ``tfrz: auto`` takes the latest ``Td`` on the Δτ grid at which at most ``max_blocks_fraction`` of
  the blocks meet the target (so, as the paper notes, it needs more blocks than ``periodic``).

For the two periodic schemes ``FreezePlan.tfrz`` is the first epoch of the periodic phase (0 for
``periodic``) and each block's ``freeze_epoch`` is the first epoch it is frozen.

A target no plan of the scheme reaches is a :class:`ConfigError` stating the reachable maximum
(``freezing.unreachable: error``), or (``reduce``) the plan reaching that maximum, marked
``reduced`` (docs/freezing.md: a shortened preset must still run, issue 16 item 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from spfde.errors import ConfigError, SpfdeError


class FreezingWarning(UserWarning):
    """The freezing plan stays below ``freezing.target`` (``freezing.unreachable: reduce``)."""


SCHEMES = ("single_shot", "single_shot_resume", "periodic", "delayed_periodic")
# Update periods of the front and middle groups (Appendix B: frequencies 1/4 and 1/2).
PERIODS = (4, 2)
# Float slack when comparing a predicted reduction with the target (sums of large FLOP counts).
_EPS = 1e-12


@dataclass
class FreezePlan:
    """Which blocks freeze when; block ``i`` of the plan is block ``i`` of the model's blocks.

    Attributes:
        tfrz: epoch the first block freezes (single-shot schemes) or the periodic phase starts.
        scheme: one of :data:`SCHEMES`.
        blocks: ``(name, freeze_epoch)`` for every block the plan freezes, front to back.
        predicted_reduction: predicted training-FLOPs reduction (fraction of the un-frozen run).
        epochs, interval: T and Δτ the plan was made for.
        target: the requested reduction.
        periods: periodic schemes: each planned block's update period (non-increasing powers of 2).
        defrost_epoch: ``single_shot_resume``: the epoch from which every block trains again.
        planner: ``algorithm1`` or ``exact`` (``freezing.planner``) when the controller made the plan.
        algorithm1_reduction: the reduction Algorithm 1's arithmetic predicts for this plan.
        backward_reduction: the backward FLOPs of the frozen blocks over the un-frozen run's training
            FLOPs (the paper's definition), from the exact ledger; ``predicted_reduction`` is then the
            total reduction from the same replay.
        reduced: the target was unreachable and ``freezing.unreachable: reduce`` made the plan that
            freezes as much as the schedule allows instead (below the target).
    """

    tfrz: int
    scheme: str
    blocks: list[tuple[str, int]]
    predicted_reduction: float
    epochs: int
    interval: int
    target: float = 0.0
    periods: list[int] | None = None
    defrost_epoch: int | None = None
    planner: str | None = None
    algorithm1_reduction: float | None = None
    backward_reduction: float | None = None
    reduced: bool = False

    def __post_init__(self) -> None:
        self.blocks = [(str(n), int(f)) for n, f in self.blocks]
        if self.scheme not in SCHEMES:
            raise SpfdeError(f"unknown freezing scheme {self.scheme!r}; allowed: {', '.join(SCHEMES)}")
        if self.periods is not None:
            self.periods = [int(p) for p in self.periods]
            ok = len(self.periods) == len(self.blocks) and all(
                p >= 2 and p & (p - 1) == 0 for p in self.periods) and all(
                a >= b for a, b in zip(self.periods, self.periods[1:], strict=False))
            if not ok:
                raise SpfdeError("periodic freezing periods must be powers of two, non-increasing front to back")
        elif self.scheme in ("periodic", "delayed_periodic"):
            raise SpfdeError(f"a {self.scheme} plan needs periods")

    @property
    def periodic(self) -> bool:
        return self.scheme in ("periodic", "delayed_periodic")

    def frozen_at(self, epoch: int) -> set[int]:
        """Block indices frozen during ``epoch``; always a prefix ``{0, ..., m-1}``."""
        if self.periodic:
            assert self.periods is not None
            if epoch < self.tfrz:
                return set()
            k = epoch - self.tfrz
            return {i for i, p in enumerate(self.periods) if k % p != 0}
        if self.defrost_epoch is not None and epoch >= self.defrost_epoch:
            return set()
        return {i for i, (_, f) in enumerate(self.blocks) if f <= epoch}

    def active_end_epoch(self, index: int) -> int:
        """Epoch at which block ``index`` stops training for good (``epochs`` if it never does).

        Used by the block-wise cosine LR: ``single_shot``/``single_shot_resume`` return the freeze
        epoch; the periodic schemes keep every block training until the end, so ``epochs``.
        """
        if self.periodic or index >= len(self.blocks):
            return self.epochs
        return self.blocks[index][1]

    def to_json(self) -> dict[str, Any]:
        """The `spfde plan --json` contract: ``tfrz``, ``blocks`` [{name, freeze_epoch}], ``predicted_reduction``."""
        blocks: list[dict[str, Any]] = []
        for i, (name, f) in enumerate(self.blocks):
            row: dict[str, Any] = {"name": name, "freeze_epoch": f}
            if self.periods is not None:
                row["period"] = self.periods[i]
            blocks.append(row)
        out: dict[str, Any] = {
            "tfrz": self.tfrz, "scheme": self.scheme, "blocks": blocks,
            "predicted_reduction": self.predicted_reduction, "target": self.target,
            "epochs": self.epochs, "interval": self.interval,
        }
        if self.defrost_epoch is not None:
            out["defrost_epoch"] = self.defrost_epoch
        for key in ("planner", "algorithm1_reduction", "backward_reduction"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.reduced:
            out["reduced"] = True
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FreezePlan:
        periods = [b["period"] for b in d["blocks"]] if d["blocks"] and "period" in d["blocks"][0] else None
        if periods is None and d["scheme"] in ("periodic", "delayed_periodic"):
            periods = []
        return cls(tfrz=d["tfrz"], scheme=d["scheme"], blocks=[(b["name"], b["freeze_epoch"]) for b in d["blocks"]],
                   predicted_reduction=d["predicted_reduction"], epochs=d["epochs"], interval=d["interval"],
                   target=d.get("target", 0.0), periods=periods, defrost_epoch=d.get("defrost_epoch"),
                   planner=d.get("planner"), algorithm1_reduction=d.get("algorithm1_reduction"),
                   backward_reduction=d.get("backward_reduction"), reduced=bool(d.get("reduced", False)))


def plan_reduction(plan: FreezePlan, block_bp_flops: Sequence[float], epoch_train_flops: float) -> float:
    """Realized reduction of ``plan``: backward FLOPs of the frozen blocks summed over every epoch."""
    saved = sum(block_bp_flops[i] for e in range(plan.epochs) for i in plan.frozen_at(e))
    return saved / (epoch_train_flops * plan.epochs)


# ---------------------------------------------------------------------------------------- core


def _algorithm1(bp: Sequence[float], total: float, epochs: int, interval: int, tfrz: int, target: float,
                limit: int) -> tuple[list[int], float]:
    """Algorithm 1's freeze-config loop over the first ``limit`` blocks: (freeze epochs, reduction)."""
    target_flops = total * (1.0 - target)
    train = total
    freeze: list[int] = []
    for i in range(limit):
        if train <= target_flops * (1 + _EPS):
            break
        f = tfrz + interval * i
        if f >= epochs:  # would freeze after training ends: saves nothing
            break
        freeze.append(f)
        train -= bp[i] * (epochs - f)
    return freeze, (total - train) / total


def _frozen_epochs(period: int, start: int, epochs: int) -> int:
    """Epochs in ``[start, epochs)`` in which a block with this update period is frozen."""
    n = max(epochs - start, 0)
    return n - math.ceil(n / period)


def _periodic_split(bp: Sequence[float], total: float, epochs: int, start: int, target: float,
                    limit: int) -> tuple[list[int], float] | None:
    """Periods of the fewest blocks that meet the target with a non-empty front (period 4) and middle
    (period 2) group (closest reduction above the target), or None."""
    big, small = PERIODS
    fb = _frozen_epochs(big, start, epochs)
    fs = _frozen_epochs(small, start, epochs)
    for m in range(2, limit + 1):
        best: tuple[float, int] | None = None
        for n_big in range(1, m):
            saved = sum(bp[:n_big]) * fb + sum(bp[n_big:m]) * fs
            red = saved / total
            if red >= target - _EPS and (best is None or red < best[0] - _EPS):
                best = (red, n_big)
        if best is not None:
            red, n_big = best
            return [big] * n_big + [small] * (m - n_big), red
    return None


def _grid(epochs: int, interval: int) -> list[int]:
    return list(range(interval, epochs, interval))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def plan_freezing(
    block_bp_flops: Sequence[float],
    epoch_train_flops: float,
    epochs: int,
    interval: int,
    target: float,
    tfrz: int | Literal["auto"],
    scheme: str = "single_shot",
    max_blocks_fraction: float = 2 / 3,
    freezable: int | None = None,
    resume_epochs: int | None = None,
    block_names: Sequence[str] | None = None,
    unreachable: Literal["error", "reduce"] = "error",
) -> FreezePlan:
    """Plan progressive layer freezing to cut training FLOPs by ``target`` (Algorithm 1, Appendix B).

    Args:
        block_bp_flops: each block's (sparse) backward FLOPs for one epoch, in forward order.
        epoch_train_flops: training FLOPs of one epoch without freezing (total = this × epochs).
        epochs: T. interval: Δτ, the freezing (and Prune&Grow) interval.
        target: training-FLOPs reduction to reach through freezing, e.g. 0.2.
        tfrz: first freeze epoch (``0 < tfrz < T``, a multiple of Δτ: Algorithm 1 freezes only at
            ``epoch mod Δτ == 0``; :class:`ConfigError` otherwise), or ``"auto"``: the latest Tfrz on the Δτ grid at
            which freezing at most ``max_blocks_fraction`` of the freezable blocks meets the target
            (Section 4.2.1, "we empirically choose to freeze 2/3 layers").
        scheme: one of :data:`SCHEMES` (see the module docstring for how each meets the target).
        freezable: how many leading blocks may freeze (default all; the controller passes N − 1 so
            the head keeps training unless ``freezing.freeze_head``).
        resume_epochs: ``single_shot_resume``'s t (default ``min(Δτ, Tfrz − 1)``).
        block_names: names for the plan (default ``block0``, ``block1``, ...).
        unreachable: ``freezing.unreachable``: ``error`` refuses a target no plan reaches;
            ``reduce`` returns the plan that freezes the most the schedule allows (the earliest Tfrz
            on the grid, every block the limits permit; no block when T <= Δτ) with
            ``reduced=True``, so a shortened preset still runs (issue 16 item 3).

    Raises:
        ConfigError: a config value no plan can follow (an unreachable target under ``error``, with
            the largest reachable reduction in the message; an off-grid tfrz; a too large resume_epochs).
        SpfdeError: impossible FLOPs inputs.
    """
    bp = [float(b) for b in block_bp_flops]
    n = len(bp)
    names = list(block_names) if block_names is not None else [f"block{i}" for i in range(n)]
    if scheme not in SCHEMES:
        raise ConfigError(f"freezing.scheme {scheme!r} is unknown; allowed: {', '.join(SCHEMES)}")
    if len(names) != n:
        raise SpfdeError(f"got {len(names)} block names for {n} blocks")
    if epochs < 1 or interval < 1:
        raise ConfigError(f"train.epochs ({epochs}) and train.interval ({interval}) must be at least 1")
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"freezing.target = {target} must be in [0, 1)")
    if not epoch_train_flops > 0:
        raise SpfdeError(f"the epoch's training FLOPs must be positive, got {epoch_train_flops}")
    if any(b < 0 or math.isnan(b) for b in bp):
        raise SpfdeError("per-block backward FLOPs must be non-negative numbers")
    freezable = n if freezable is None else int(freezable)
    if not 0 <= freezable <= n:
        raise SpfdeError(f"freezable = {freezable} must be between 0 and the number of blocks ({n})")
    if tfrz != "auto" and not (isinstance(tfrz, int) and 0 < tfrz < epochs):
        raise ConfigError(f"freezing.tfrz = {tfrz!r} must satisfy 0 < tfrz < train.epochs ({epochs}), or be 'auto'")
    if isinstance(tfrz, int) and tfrz % interval and scheme != "periodic":
        # Algorithm 1 freezes only at epoch mod Δτ == 0, in step with Prune&Grow and the dataset update
        lo, hi = tfrz - tfrz % interval, tfrz - tfrz % interval + interval
        raise ConfigError(
            f"freezing.tfrz = {tfrz} is off the Δτ grid (train.interval = {interval}): Algorithm 1 freezes only at "
            f"epochs that are multiples of Δτ; use {lo if lo > 0 else hi}"
            + (f" or {hi}" if lo > 0 and hi < epochs else "") + ", a fraction of train.epochs (snapped to the "
            "grid) or auto")
    if resume_epochs is not None and resume_epochs < 0:
        raise ConfigError(f"freezing.resume_epochs = {resume_epochs} must be >= 0")
    if unreachable not in ("error", "reduce"):
        raise ConfigError(f"freezing.unreachable = {unreachable!r}; allowed: error, reduce")
    reduce = unreachable == "reduce"

    total = epoch_train_flops * epochs
    # "freeze 2/3 layers of the model" (Section 4.2.1): a fraction of all N blocks, the head included
    k_max = min(freezable, max(1, math.floor(max_blocks_fraction * n + 1e-9)))
    periodic = scheme in ("periodic", "delayed_periodic")

    if target == 0.0:
        start = 0 if scheme == "periodic" else (tfrz if isinstance(tfrz, int) else min(interval, max(epochs - 1, 1)))
        return FreezePlan(tfrz=start, scheme=scheme, blocks=[], predicted_reduction=0.0, epochs=epochs,
                          interval=interval, target=target, periods=[] if periodic else None)
    if freezable == 0:
        raise ConfigError("no block may be frozen (the model has only its head block); define more freezing blocks "
                         "or set freezing.freeze_head: true")

    def nothing(start: int) -> FreezePlan:  # `reduce` where the schedule leaves no epoch to freeze in
        return FreezePlan(tfrz=start, scheme=scheme, blocks=[], predicted_reduction=0.0, epochs=epochs,
                          interval=interval, target=target, periods=[] if periodic else None, reduced=True)

    if periodic:
        if reduce and scheme == "delayed_periodic" and tfrz == "auto" and not _grid(epochs, interval):
            return nothing(min(interval, max(epochs - 1, 1)))
        return _plan_periodic(bp, names, total, epochs, interval, target, tfrz, scheme, k_max, freezable, reduce)

    # ---- single-shot (Algorithm 1), the base of single_shot_resume too
    if tfrz == "auto":
        grid = _grid(epochs, interval)
        if not grid and reduce:
            return nothing(min(interval, max(epochs - 1, 1)))
        if not grid:
            raise ConfigError(f"freezing.tfrz: auto needs train.epochs ({epochs}) > train.interval ({interval}); "
                             "set freezing.tfrz explicitly")
        chosen: tuple[int, list[int], float] | None = None
        for t0 in reversed(grid):
            freeze, red = _algorithm1(bp, total, epochs, interval, t0, target, k_max)
            if red >= target - _EPS:
                chosen = (t0, freeze, red)
                break
        if chosen is None and reduce:  # the earliest Tfrz with every block allowed saves the most
            chosen = (grid[0], *_algorithm1(bp, total, epochs, interval, grid[0], 1.0, k_max))
        if chosen is None:
            _, best = _algorithm1(bp, total, epochs, interval, grid[0], 1.0, k_max)
            raise ConfigError(
                f"freezing.target = {_pct(target)} is unreachable with tfrz: auto: freezing at most {k_max} of "
                f"{freezable} blocks (max_blocks_fraction = {max_blocks_fraction:.3g}) reaches at most "
                f"{_pct(best)} (tfrz = {grid[0]}); lower freezing.target, raise freezing.max_blocks_fraction or set "
                "freezing.tfrz")
        t0, freeze, red = chosen
    else:
        t0 = int(tfrz)
        freeze, red = _algorithm1(bp, total, epochs, interval, t0, target, freezable)
        if red < target - _EPS and reduce:  # the user's tfrz is kept: freeze every freezable block from it
            freeze, red = _algorithm1(bp, total, epochs, interval, t0, 1.0, freezable)
        elif red < target - _EPS:
            _, best = _algorithm1(bp, total, epochs, interval, 1, 1.0, freezable)
            raise ConfigError(
                f"freezing.target = {_pct(target)} is unreachable with freezing.tfrz = {t0}: freezing all "
                f"{freezable} freezable blocks reaches at most {_pct(red)} (at most {_pct(best)} with tfrz = 1); "
                "lower freezing.target or choose an earlier freezing.tfrz")

    blocks = [(names[i], f) for i, f in enumerate(freeze)]
    short = red < target - _EPS  # only under `reduce`: every other way here met the target
    if scheme == "single_shot":
        return FreezePlan(tfrz=t0, scheme=scheme, blocks=blocks, predicted_reduction=red, epochs=epochs,
                          interval=interval, target=target, reduced=short)

    # ---- single_shot_resume: shift by t, defrost for the last t epochs (same frozen epochs per block)
    if resume_epochs is None:
        t = min(interval, t0 - 1)
    else:
        t = int(resume_epochs)
        if t >= t0:
            raise ConfigError(
                f"freezing.resume_epochs = {t} must be smaller than the first freeze epoch ({t0}), since every "
                f"freeze moves {t} epochs earlier; use at most {t0 - 1} or a later freezing.tfrz")
    shifted = [(name, f - t) for name, f in blocks]
    plan = FreezePlan(tfrz=t0 - t, scheme=scheme, blocks=shifted, predicted_reduction=red, epochs=epochs,
                      interval=interval, target=target, defrost_epoch=epochs - t if t > 0 else None, reduced=short)
    return plan


def _plan_periodic(bp: list[float], names: list[str], total: float, epochs: int, interval: int, target: float,
                   tfrz: int | str, scheme: str, k_max: int, freezable: int, reduce: bool = False) -> FreezePlan:
    # Appendix B: the last group is never frozen, so at least one block always trains
    freezable = min(freezable, len(bp) - 1)
    k_max = min(k_max, freezable)
    if scheme == "periodic":
        # Appendix B: periodic freezing runs from the start of training; tfrz does not apply.
        starts, limit = [0], freezable
    elif tfrz == "auto":
        starts, limit = list(reversed(_grid(epochs, interval))), k_max
        if not starts:
            raise ConfigError(f"freezing.tfrz: auto needs train.epochs ({epochs}) > train.interval ({interval}); "
                             "set freezing.tfrz explicitly")
    else:
        starts, limit = [int(tfrz)], freezable
    for s in starts:
        found = _periodic_split(bp, total, epochs, s, target, limit)
        if found is not None:
            periods, red = found
            first = s + 1  # epoch s is an update epoch for every period
            blocks = [(names[i], first) for i in range(len(periods))]
            return FreezePlan(tfrz=s, scheme=scheme, blocks=blocks, predicted_reduction=red, epochs=epochs,
                              interval=interval, target=target, periods=periods)
    s = starts[-1]
    fb, fs = (_frozen_epochs(p, s, epochs) for p in PERIODS)
    best = (sum(bp[:limit - 1]) * fb + sum(bp[limit - 1:limit]) * fs) / total if limit >= 2 else 0.0
    if reduce:  # the most the pattern saves: every allowed block, all but the last in the period-4 group
        # no block at all when the pattern saves nothing (too few epochs after the start to skip one)
        periods = [PERIODS[0]] * (limit - 1) + [PERIODS[1]] if limit >= 2 and best > 0 else []
        return FreezePlan(tfrz=s, scheme=scheme, blocks=[(names[i], s + 1) for i in range(len(periods))],
                          predicted_reduction=best, epochs=epochs, interval=interval, target=target,
                          periods=periods, reduced=True)
    how = f"at most {limit} of {freezable} blocks" if limit < freezable else f"all {freezable} freezable blocks"
    raise ConfigError(
        f"freezing.target = {_pct(target)} is unreachable with the {scheme} scheme: freezing {how} (a front group "
        f"with update period {PERIODS[0]} and a middle group with period {PERIODS[1]}, both non-empty) from epoch "
        f"{s} reaches at most {_pct(best)}; lower freezing.target"
        + (", raise freezing.max_blocks_fraction or set an earlier freezing.tfrz" if scheme == "delayed_periodic"
           else ""))
