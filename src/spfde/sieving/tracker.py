"""Per-sample forgetting statistics within one Δτ interval (paper Section 4.3, Appendix C.1).

A *forgetting event* is a transition of one training sample from classified correctly to
misclassified between two consecutive sightings (Toneva et al., the paper's [18]). The circular
sieve ranks the partial training set by the number of such events counted within the interval
that just ended; samples with the fewest are the easiest and go to the removed queue.

Choices (documented in the method card of :mod:`spfde.sieving`):

* the counts are *re-collected per interval* (Section 4.3: "counting the number of transitions
  from being correctly classified to being misclassified within each Δτ interval. We re-collect
  this number for each interval"): :meth:`reset_interval` zeroes every count and, by default
  (``sieving.carry_status: false``), the previous correctness too, so an interval only sees events
  between two of its own sightings and a sample's first sighting in an interval is never an event.
  With ``carry_status: true`` the first sighting of a sample in an interval is compared with its
  last sighting before it, even one from before the sample was removed;
* with Δτ = 1 epoch an interval holds one sighting per sample, so whatever ``carry_status`` says
  the ranking is only "misclassified now" (hardest, below) against "correct now" (0 events):
  the sieve then moves a random subset of the correctly classified samples. Δτ >= 2 epochs gives
  the forgetting counts room to rank samples;
* a sample seen in the interval but never classified correctly is the hardest kind of sample
  (it was never learnt, so it cannot be forgotten): :meth:`difficulty` maps it to
  :data:`NEVER_CORRECT`, above any possible count;
* a sample not seen in the interval has no evidence of being easy: it maps to :data:`UNSEEN`,
  above :data:`NEVER_CORRECT`, so the sieve keeps it.
"""

from __future__ import annotations

from typing import Any

import torch

from spfde.errors import SpfdeError

# Larger than any count a run can reach (one event needs two sightings), so the order is
# "forgettable samples by count" < "never correct" < "not seen".
NEVER_CORRECT = 1 << 40
UNSEEN = 1 << 41


def forgetting_update(
    last_correct: torch.Tensor,
    indices: torch.Tensor,
    correct: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forgetting events of one batch of sightings, vectorized (Appendix C.1).

    Args:
        last_correct: ``(n,)`` bool, correctness at each sample's previous sighting (False when
            not seen yet, so a first sighting is never an event).
        indices: ``(b,)`` int64 sample indices, duplicates allowed.
        correct: ``(b,)`` bool, whether each sighting was classified correctly.

    Returns:
        ``(sorted_idx, events, last_idx, last_val)``: ``events[j]`` is 1 where sighting
        ``sorted_idx[j]`` is a forgetting event (to ``index_add_`` onto the counts);
        ``last_val`` is the correctness of the last sighting of each distinct ``last_idx``
        (the new ``last_correct`` of those samples).

    Duplicates are resolved as if the batch's sightings happened one after another in batch
    order: a stable sort by index keeps each sample's sightings in batch order, and each
    sighting compares with the one before it (or with ``last_correct`` for the first).
    """
    order = torch.argsort(indices, stable=True)
    si = indices[order]
    sc = correct[order]
    first = torch.ones_like(si, dtype=torch.bool)
    first[1:] = si[1:] != si[:-1]
    prev = torch.empty_like(sc)
    prev[1:] = sc[:-1]
    prev[first] = last_correct[si[first]]
    events = (prev & ~sc).to(torch.int64)
    last = torch.ones_like(si, dtype=torch.bool)
    last[:-1] = first[1:]
    return si, events, si[last], sc[last]


class ForgettingTracker:
    """Per-sample status within the current interval: last correctness, forgetting count,
    seen and ever-correct flags (paper Section 4.3, Appendix C.1; ``sieving.criterion: forgetting``).

    Args:
        n: training-set size; indices are ``0..n-1``.
        device: where the statistics live (keep it with the logits to avoid host syncs).
        carry_status: keep each sample's last correctness across :meth:`reset_interval` (see the
            module docstring; default False, the paper's counts within each interval); counts are
            reset either way.
    """

    criterion = "forgetting"

    def __init__(self, n: int, device: str | torch.device = "cpu", carry_status: bool = False) -> None:
        if int(n) <= 0:
            raise SpfdeError(f"ForgettingTracker needs a positive training-set size, got n={n}")
        self.n = int(n)
        self.carry_status = bool(carry_status)
        self.device = torch.device(device)
        self._count = torch.zeros(self.n, dtype=torch.int64, device=self.device)
        self._last_correct = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self._seen = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self._ever_correct = torch.zeros(self.n, dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------ recording
    def record(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        """Record one batch: ``correct[i]`` is whether sample ``indices[i]`` was classified
        correctly. Duplicate indices count as consecutive sightings in batch order."""
        idx = torch.as_tensor(indices).reshape(-1).to(self.device, torch.int64)
        ok = torch.as_tensor(correct).reshape(-1).to(self.device, torch.bool)
        if idx.numel() != ok.numel():
            raise SpfdeError(
                f"ForgettingTracker.record got {idx.numel()} indices but {ok.numel()} correctness flags; "
                "pass one flag per sample of the batch")
        if idx.numel() == 0:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.n:
            bad = lo if lo < 0 else hi
            raise SpfdeError(
                f"sample index {bad} is outside the training set of {self.n} samples; "
                "pass the dataset's sample indices (0..n-1) and build the tracker with n=len(train_set)")
        si, events, last_idx, last_val = forgetting_update(self._last_correct, idx, ok)
        self._count.index_add_(0, si, events)
        self._last_correct[last_idx] = last_val
        self._seen[idx] = True
        self._ever_correct[idx[ok]] = True

    def record_logits(self, indices: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """:meth:`record` with correctness = ``argmax(logits) == target`` (soft / one-hot targets:
        their argmax)."""
        with torch.no_grad():
            tgt = targets.argmax(dim=1) if targets.dim() == 2 else targets
            self.record(indices, logits.detach().argmax(dim=1) == tgt)

    # ------------------------------------------------------------------ queries
    def counts(self) -> torch.Tensor:
        """Forgetting events per sample within the current interval (int64, ``(n,)``)."""
        return self._count.clone()

    def seen_in_interval(self) -> torch.Tensor:
        return self._seen.clone()

    def never_correct_in_interval(self) -> torch.Tensor:
        """Seen in the interval but never classified correctly."""
        return self._seen & ~self._ever_correct

    def difficulty(self) -> torch.Tensor:
        """int64 ``(n,)``: the forgetting count; :data:`NEVER_CORRECT` for samples seen but never
        correct; :data:`UNSEEN` for samples not seen this interval. Higher = harder = kept."""
        d = self._count.clone()
        d[self.never_correct_in_interval()] = NEVER_CORRECT
        d[~self._seen] = UNSEEN
        return d

    def histogram(self, indices: torch.Tensor | None = None) -> dict[int, int]:
        """``{forgetting count: samples}`` over ``indices`` (default all) seen this interval;
        key ``-1`` counts samples never classified correctly."""
        sel = torch.arange(self.n, device=self.device) if indices is None else torch.as_tensor(indices).to(
            self.device, torch.int64)
        seen = self._seen[sel]
        never = (seen & ~self._ever_correct[sel])
        learnt = seen & ~never
        c = self._count[sel][learnt]
        out: dict[int, int] = {}
        if bool(never.any()):
            out[-1] = int(never.sum())
        if c.numel():
            for k, v in enumerate(torch.bincount(c).tolist()):
                if v:
                    out[k] = int(v)
        return out

    def reset_interval(self) -> None:
        """Start a new interval: counts, seen and ever-correct clear (Section 4.3 re-collects per
        interval); the previous correctness too unless ``carry_status``."""
        self._count.zero_()
        if not self.carry_status:
            self._last_correct.zero_()
        self._seen.zero_()
        self._ever_correct.zero_()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "criterion": self.criterion,
            "count": self._count.cpu().clone(),
            "last_correct": self._last_correct.cpu().clone(),
            "seen": self._seen.cpu().clone(),
            "ever_correct": self._ever_correct.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state)
        if int(state["n"]) != self.n:
            raise SpfdeError(
                f"forgetting-tracker state is for {state['n']} training samples but this run has {self.n}; "
                "resume with the same dataset (and data.subset)")
        self._count = state["count"].to(self.device, torch.int64).clone()
        self._last_correct = state["last_correct"].to(self.device, torch.bool).clone()
        self._seen = state["seen"].to(self.device, torch.bool).clone()
        self._ever_correct = state["ever_correct"].to(self.device, torch.bool).clone()


def _check_state(tracker: Any, state: dict[str, Any]) -> None:
    saved = state.get("criterion", "forgetting")  # checkpoints older than the criterion key
    if saved != tracker.criterion:
        raise SpfdeError(f"the checkpoint's sample statistics are for sieving.criterion {saved!r} but this run uses "
                         f"{tracker.criterion!r}; resume with the same sieving.criterion")


def _last_per_index(indices: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct index, in batch order (stable sort)."""
    order = torch.argsort(indices, stable=True)
    si = indices[order]
    last = torch.ones_like(si, dtype=torch.bool)
    last[:-1] = si[1:] != si[:-1]
    return order[last]


class LossTracker:
    """Per-sample recent training loss within the current interval (``sieving.criterion: loss``).

    InfoBatch-style difficulty (Qin et al. 2024, "InfoBatch: lossless training speed up by
    unbiased dynamic data pruning"): a sample whose last training loss in the interval is low is
    easy. Works wherever a per-sample loss exists (multi-label, sequence models), where
    correctness by argmax does not. Choices, as for the forgetting tracker: the statistic is
    re-collected per interval (:meth:`reset_interval`); the *last* sighting of the interval
    counts (duplicates in a batch: the last in batch order); a sample not seen in the interval,
    or whose loss is not finite, ranks hardest (``inf``) so the sieve keeps it. The circular
    queue, the update ratio and the sampler are the paper's, unchanged.
    """

    criterion = "loss"

    def __init__(self, n: int, device: str | torch.device = "cpu") -> None:
        if int(n) <= 0:
            raise SpfdeError(f"LossTracker needs a positive training-set size, got n={n}")
        self.n = int(n)
        self.device = torch.device(device)
        self._loss = torch.zeros(self.n, dtype=torch.float32, device=self.device)
        self._seen = torch.zeros(self.n, dtype=torch.bool, device=self.device)

    @staticmethod
    def encode(losses: torch.Tensor) -> torch.Tensor:
        """Losses as int32 bit patterns, so the integer status gatherer of DDP runs carries them exactly."""
        return losses.detach().float().contiguous().view(torch.int32)

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record one batch: ``losses[i]`` is the training loss of sample ``indices[i]`` (float, or
        the integer patterns of :meth:`encode`)."""
        idx = torch.as_tensor(indices).reshape(-1).to(self.device, torch.int64)
        v = torch.as_tensor(losses).detach().reshape(-1)
        v = v.to(torch.int32).view(torch.float32) if not v.is_floating_point() else v.float()
        v = v.to(self.device)
        if idx.numel() != v.numel():
            raise SpfdeError(f"LossTracker.record got {idx.numel()} indices but {v.numel()} losses; pass one loss "
                             "per sample of the batch")
        if idx.numel() == 0:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.n:
            raise SpfdeError(f"sample index {lo if lo < 0 else hi} is outside the training set of {self.n} samples; "
                             "pass the dataset's sample indices (0..n-1)")
        last = _last_per_index(idx)
        self._loss[idx[last]] = v[last]
        self._seen[idx] = True

    def seen_in_interval(self) -> torch.Tensor:
        return self._seen.clone()

    def losses(self) -> torch.Tensor:
        """The last loss of each sample in the interval (0 where not seen)."""
        return self._loss.clone()

    def difficulty(self) -> torch.Tensor:
        """float32 ``(n,)``: the last loss; ``inf`` for samples not seen (or not finite). Higher = kept."""
        d = self._loss.clone()
        d[~self._seen | ~torch.isfinite(d)] = float("inf")
        return d

    def histogram(self, indices: torch.Tensor | None = None) -> None:
        """No forgetting histogram under the loss criterion."""
        return None

    def reset_interval(self) -> None:
        self._loss.zero_()
        self._seen.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "criterion": self.criterion, "loss": self._loss.cpu().clone(),
                "seen": self._seen.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state)
        if int(state["n"]) != self.n:
            raise SpfdeError(f"loss-tracker state is for {state['n']} training samples but this run has {self.n}; "
                             "resume with the same dataset (and data.subset)")
        self._loss = state["loss"].to(self.device, torch.float32).clone()
        self._seen = state["seen"].to(self.device, torch.bool).clone()


def build_tracker(cfg: Any, n: int) -> ForgettingTracker | LossTracker:
    """The sample-status tracker ``cfg.sieving.criterion`` asks for."""
    if cfg.sieving.criterion == "loss":
        return LossTracker(n)
    return ForgettingTracker(n, carry_status=cfg.sieving.carry_status)
