"""Circular data sieving and its baselines (paper Section 4.3, Appendix C.2, Fig. A2).

The functional core works on index tensors only (``active`` = the partial training set,
``removed`` = the removed queue, head first); the stateful sieves wrap it with the epoch
schedule, the seeding and the checkpoint state. Every random choice comes from a generator
derived from ``(seed, purpose, epoch)``, so a resumed sieve replays the identical sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from spfde.errors import ConfigError, SpfdeError
from spfde.utils import make_generator

# ---------------------------------------------------------------------------------------------
# functional core


def removal_count(n: int, ratio: float) -> int:
    """``round(p·n)``: samples kept out of the partial set (the same rounding the FLOPs planner
    uses for samples per epoch, so planned and charged FLOPs agree)."""
    return int(round(float(ratio) * int(n)))


def update_count(n_removed: int, n_active: int, update_ratio: float) -> int:
    """Samples exchanged per update: ``ceil(r·|removed|)`` (Appendix C.2, Table A2), capped at
    ``|active|`` because returned samples may not leave again in the same update.

    A small tolerance keeps binary round-off from bumping exact products up by one
    (``0.3 * 10`` is ``3.0000000000000004`` in floating point)."""
    k = math.ceil(float(update_ratio) * int(n_removed) - 1e-9)
    return max(0, min(k, int(n_active)))


def initial_split(n: int, n_removed: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random removal at the start of training: ``(active sorted, removed queue in random order)``."""
    perm = torch.randperm(n, generator=generator)
    return torch.sort(perm[n_removed:]).values, perm[:n_removed].clone()


def easiest(difficulty: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Positions of the ``k`` lowest values of ``difficulty``; ties broken uniformly at random.

    A random permutation followed by a *stable* sort on difficulty orders tied samples by the
    permutation, which is a uniform tie-break that depends only on the generator.
    """
    perm = torch.randperm(difficulty.numel(), generator=generator)
    order = torch.argsort(difficulty[perm], stable=True)
    return perm[order[:k]]


def circular_update(
    active: torch.Tensor,
    removed: torch.Tensor,
    difficulty: torch.Tensor,
    k: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One dataset update (Section 4.3, Fig. A2).

    The ``k`` samples at the queue's head return to the partial set; the ``k`` easiest samples of
    the *current* partial set (lowest ``difficulty[active]``) go to the queue's tail, easiest
    first. Samples just returned are not candidates, and both sets keep their sizes.

    Returns ``(new_active sorted, new_removed head first, returned, dropped)``.
    """
    if not 0 <= k <= min(active.numel(), removed.numel()):
        raise SpfdeError(f"cannot exchange {k} samples between a partial set of {active.numel()} "
                         f"and a queue of {removed.numel()}")
    returned = removed[:k]
    pos = easiest(difficulty[active], k, generator)
    dropped = active[pos]
    keep = torch.ones(active.numel(), dtype=torch.bool)
    keep[pos] = False
    new_active = torch.sort(torch.cat([active[keep], returned])).values
    new_removed = torch.cat([removed[k:], dropped])
    return new_active, new_removed, returned.clone(), dropped


def shuffle_queue(removed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return removed[torch.randperm(removed.numel(), generator=generator)]


# ---------------------------------------------------------------------------------------------
# stateful sieves


class Sieve:
    """Common interface: ``active`` (sorted LongTensor, the partial training set), ``removed``
    (LongTensor queue, head first), :meth:`is_update_epoch`, :meth:`update`,
    :meth:`step_epoch`, :meth:`state_dict` / :meth:`load_state_dict`."""

    method = "none"

    def __init__(self, n: int, interval: int = 5, seed: int = 0) -> None:
        if int(n) <= 0:
            raise SpfdeError(f"a sieve needs a positive training-set size, got n={n}")
        if int(interval) <= 0:
            raise ConfigError(f"config field 'train.interval' = {interval} must be a positive number of epochs")
        self.n = int(n)
        self.interval = int(interval)
        self.seed = int(seed)
        self.active = torch.arange(self.n, dtype=torch.int64)
        self.removed = torch.zeros(0, dtype=torch.int64)
        self.last_update_epoch = -1
        self.updates = 0

    # -- schedule
    def is_update_epoch(self, epoch: int) -> bool:
        """Algorithm 1 updates the dataset at ``epoch mod Δτ == 0`` (never at epoch 0)."""
        return epoch > 0 and epoch % self.interval == 0

    def planned_samples(self, epoch: int) -> int:
        """Samples trained on in ``epoch``, known in advance (the FLOPs plan uses it)."""
        return int(len(self.active))

    @property
    def never_seen_count(self) -> int:
        """Samples that have never been in the partial set yet."""
        return 0

    def _info(self, returned: int = 0, removed: int = 0) -> dict[str, Any]:
        return {"active_samples": int(self.active.numel()), "returned": int(returned),
                "removed_this_update": int(removed), "never_seen_count": int(self.never_seen_count)}

    def update(self, difficulty: torch.Tensor, epoch: int) -> dict[str, Any]:
        return self._info()

    def step_epoch(self, epoch: int, tracker: Any) -> dict[str, Any]:
        """At an update epoch: update from ``tracker.difficulty()``, then start the tracker's next
        interval. Returns the per-epoch log fields (docs/design.md) and, on update epochs with the
        forgetting criterion, ``forgetting_histogram`` ``{count: samples}`` of the partial set that was trained on
        (key ``-1``: never classified correctly in the interval)."""
        # a repeated call for the same epoch (e.g. start_epoch retried) must not update twice
        if not self.is_update_epoch(epoch) or epoch == self.last_update_epoch:
            return self._info()
        hist = tracker.histogram(self.active)
        info = self.update(tracker.difficulty(), epoch)
        tracker.reset_interval()
        if hist is not None:  # the loss criterion has none
            info["forgetting_histogram"] = hist
        return info

    def _check_difficulty(self, difficulty: torch.Tensor) -> torch.Tensor:
        d = torch.as_tensor(difficulty).detach().to("cpu").reshape(-1)
        if d.numel() != self.n:
            raise SpfdeError(f"sieve update got difficulty for {d.numel()} samples but the training set has "
                             f"{self.n}; pass one value per training sample (tracker.difficulty())")
        return d

    # -- checkpointing
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "n": self.n, "active": self.active.clone(), "removed": self.removed.clone(),
                "last_update_epoch": self.last_update_epoch, "updates": self.updates, **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method or int(state.get("n", -1)) != self.n:
            raise SpfdeError(
                f"sieve state is for method {state.get('method')!r} with {state.get('n')} samples, but this run "
                f"uses {self.method!r} with {self.n}; resume with the same sieving.method and dataset")
        self.active = state["active"].to("cpu", torch.int64).clone()
        self.removed = state["removed"].to("cpu", torch.int64).clone()
        self.last_update_epoch = int(state["last_update_epoch"])
        self.updates = int(state["updates"])
        self._load_extra_state(state)


class NoSieve(Sieve):
    """The full training set every epoch (``sieving.method: none`` or ``ratio: 0``)."""

    method = "none"

    def is_update_epoch(self, epoch: int) -> bool:
        return False


class CircularSieve(Sieve):
    """Circular data sieving (Section 4.3, Appendix C.2).

    Args:
        n: training-set size.
        ratio: ``p``, the fraction of the training set kept out of the partial set.
        update_ratio: share of the removed queue exchanged per update (Table A2: 0.3 best).
        seed: base seed of the initial split, tie-breaks and queue shuffles.
        interval: Δτ, epochs between updates.
    """

    method = "circular"

    def __init__(self, n: int, ratio: float, update_ratio: float = 0.3, seed: int = 0, interval: int = 5) -> None:
        super().__init__(n, interval, seed)
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"config field 'sieving.ratio' = {ratio} is out of range; allowed: [0, 1)")
        if not 0.0 < update_ratio <= 1.0:
            raise ConfigError(f"config field 'sieving.update_ratio' = {update_ratio} is out of range; allowed: (0, 1]")
        m = removal_count(self.n, ratio)
        if m >= self.n:
            raise ConfigError(f"config field 'sieving.ratio' = {ratio} removes all {self.n} training samples; "
                              "lower it so at least one sample stays in the partial set")
        self.ratio = float(ratio)
        self.update_ratio = float(update_ratio)
        self.active, self.removed = initial_split(self.n, m, make_generator(self.seed, "sieve_init"))
        # initially removed samples not returned yet: the queue is not shuffled while any remain
        self.pending_initial = torch.zeros(self.n, dtype=torch.bool)
        self.pending_initial[self.removed] = True

    @property
    def never_seen_count(self) -> int:
        return int(self.pending_initial.sum())

    def _difficulty_for_update(self, difficulty: torch.Tensor) -> torch.Tensor:
        return difficulty

    def update(self, difficulty: torch.Tensor, epoch: int) -> dict[str, Any]:
        """Return ``k = ceil(r·|removed|)`` samples from the queue's head and move the ``k``
        easiest of the partial set to its tail; shuffle the queue once every initially removed
        sample has been back."""
        d = self._difficulty_for_update(self._check_difficulty(difficulty))
        k = update_count(self.removed.numel(), self.active.numel(), self.update_ratio)
        self.active, removed, returned, _ = circular_update(
            self.active, self.removed, d, k, make_generator(self.seed, "sieve", int(epoch)))
        self.pending_initial[returned] = False
        if not bool(self.pending_initial.any()):
            removed = shuffle_queue(removed, make_generator(self.seed, "sieve_queue", int(epoch)))
        self.removed = removed
        self.last_update_epoch = int(epoch)
        self.updates += 1
        return self._info(k, k)

    def _extra_state(self) -> dict[str, Any]:
        return {"pending_initial": self.pending_initial.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.pending_initial = state["pending_initial"].to("cpu", torch.bool).clone()


class RandomSieve(CircularSieve):
    """Baseline: the same queue and exchange sizes as :class:`CircularSieve`, but the samples
    leaving the partial set are a uniformly random ``k`` instead of the easiest."""

    method = "random"

    def _difficulty_for_update(self, difficulty: torch.Tensor) -> torch.Tensor:
        # all tied: the random tie-break of `easiest` then picks a uniform random subset
        return torch.zeros(self.n, dtype=torch.int64)


class StaticSieve(Sieve):
    """Baseline: one-shot removal of the easiest ``p`` after ``warmup`` epochs of full-set
    training, as MEST's data-efficient variant and forgetting-score pruning do; the partial set
    never changes afterwards.

    Args:
        warmup: the epoch of the removal (default Δτ); forgetting events are counted over all
            epochs before it.
    """

    method = "static"

    def __init__(self, n: int, ratio: float, warmup: int | None = None, seed: int = 0, interval: int = 5) -> None:
        super().__init__(n, interval, seed)
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"config field 'sieving.ratio' = {ratio} is out of range; allowed: [0, 1)")
        self.ratio = float(ratio)
        self.m = removal_count(self.n, ratio)
        if self.m >= self.n:
            raise ConfigError(f"config field 'sieving.ratio' = {ratio} removes all {self.n} training samples; "
                              "lower it so at least one sample stays in the partial set")
        self.warmup = self.interval if warmup is None else int(warmup)
        if self.warmup < 0:
            raise ConfigError(f"config field 'sieving.static_warmup' = {warmup} must be >= 0")

    def is_update_epoch(self, epoch: int) -> bool:
        return epoch == self.warmup

    def planned_samples(self, epoch: int) -> int:
        return self.n if epoch < self.warmup else self.n - self.m

    def update(self, difficulty: torch.Tensor, epoch: int) -> dict[str, Any]:
        if self.updates:  # one-shot: later calls change nothing
            return self._info()
        d = self._check_difficulty(difficulty)
        pos = easiest(d[self.active], self.m, make_generator(self.seed, "sieve", int(epoch)))
        keep = torch.ones(self.active.numel(), dtype=torch.bool)
        keep[pos] = False
        self.removed = self.active[pos]
        self.active = self.active[keep]  # stays sorted
        self.last_update_epoch = int(epoch)
        self.updates += 1
        return self._info(0, self.m)


def build_sieve(cfg: Any, n_train: int) -> Sieve:
    """The sieve ``cfg.sieving`` asks for (``cfg`` is a :class:`spfde.config.Config`)."""
    s = cfg.sieving
    interval, seed = cfg.train.interval, cfg.seed
    if s.method == "none" or s.ratio == 0.0:
        return NoSieve(n_train, interval, seed)
    if s.method == "circular":
        return CircularSieve(n_train, s.ratio, s.update_ratio, seed, interval)
    if s.method == "random":
        return RandomSieve(n_train, s.ratio, s.update_ratio, seed, interval)
    if s.method == "static":
        warmup = interval if s.static_warmup is None else s.static_warmup
        if warmup >= cfg.train.epochs:
            raise ConfigError(
                f"config field 'sieving.static_warmup' = {warmup} is not before the last epoch; the one-shot "
                f"removal would never happen. Set it below train.epochs ({cfg.train.epochs})")
        return StaticSieve(n_train, s.ratio, warmup, seed, interval)
    raise ConfigError(f"config field 'sieving.method' = {s.method!r}; allowed: circular, random, static, none")
