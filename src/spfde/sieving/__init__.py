"""Circular data sieving (paper Section 4.3, Appendix C, Fig. 2 and Fig. A2).

Method card
-----------
**What it does.** At the start of training a random ``p`` of the training set is moved to a
*removed queue*; only the remaining *partial training set* is loaded and trained on. Every Δτ
epochs (the same interval as Prune&Grow, so structure changes disturb the statistics as little
as possible) the ``k = ceil(r·|removed|)`` samples at the queue's head return to the partial set
and the ``k`` easiest samples of the partial set go to the queue's tail, so the number of samples
per epoch never changes. Until every initially removed sample has been returned once the queue
is strictly FIFO, which guarantees that all training samples are used at least once; after that
the queue is shuffled after each update.

**Difficulty** (Appendix C.1): the number of *forgetting events* -- a sample classified correctly
at one sighting and misclassified at its next -- counted within the interval that just ended
(:class:`ForgettingTracker`). Choices this implementation makes where the paper is silent:

* statistics are re-collected per interval (Section 4.3: transitions "within each Δτ interval") and,
  by default (``sieving.carry_status: false``), :meth:`ForgettingTracker.reset_interval` clears the
  previous correctness too, so a sample's first sighting in an interval is never an event: samples
  just returned from the queue and samples that stayed are treated equally. ``carry_status: true``
  compares a first sighting with the sample's last one before the interval instead;
* the sample status of a step the loop reports as skipped (``SpFDE.after_step(..., skipped=True)``,
  e.g. a GradScaler overflow step) is not recorded;
* a sample seen but never classified correctly in the interval is hardest (``NEVER_CORRECT``,
  above any count); a sample not seen in the interval (possible only when the loop skips part of
  the partial set) ranks above that (``UNSEEN``) so it is kept -- there is no evidence it is easy;
* duplicate indices within one batch count as consecutive sightings in batch order;
* an event needs two sightings within one interval, so with Δτ = 1 every count is 0 and the
  ranking reduces to "correct at its one sighting" (easy) vs. "wrong" (``NEVER_CORRECT``); the
  paper's Δτ = 5 gives counts 0..4;
* ties among the easiest are broken uniformly at random from ``make_generator(seed, "sieve", epoch)``;
  samples just returned are not eligible to leave in the same update; ``k`` is capped at the
  partial set's size (only matters for ``p > 1/(1+r)``).

**Criterion** (``sieving.criterion``). ``forgetting`` (default, the paper's): the counts above,
which need single-label classification (correct = argmax). ``loss``: rank by each sample's last
training loss in the interval, lowest = easiest (InfoBatch-style, :class:`LossTracker`), for
multi-label, sequence or any model with a per-sample loss; the loop passes the losses with
``ctl.after_step(logits, targets, indices, losses=per_sample_loss)``. The queue, ``k``, the update
ratio and the sampler are the same for both.

**Hyper-parameters.** ``sieving.ratio`` = p (the paper uses 15-25%, Table 2), ``sieving.update_ratio``
= r (Table A2: 30% best among 10/20/30/50%), Δτ = ``train.interval``. Baselines: ``random``
(same queue, random k leave), ``static`` (one-shot removal of the easiest p after
``static_warmup`` epochs, as MEST and forgetting-score pruning), ``none``.

**Expected effect.** Training FLOPs and time scale with ``1 - p`` (Tables A9, A12: 20% removal
costs ~0.1-0.3 points of CIFAR-100 accuracy at 90% sparsity; dynamic circular sieving beats
one-shot removal, Section 5.2). Bookkeeping per update is a few sorts of ``n`` integers
(milliseconds for 60k samples).

Use: ``sieve = build_sieve(cfg, n)``, ``tracker = ForgettingTracker(n)``,
``sampler = SieveSampler(sieve, cfg.seed)``; per batch ``tracker.record_logits(idx, logits, y)``;
at each epoch start ``sieve.step_epoch(epoch, tracker)`` then ``sampler.set_epoch(epoch)``.
"""

from spfde.sieving.sampler import SieveSampler
from spfde.sieving.sieve import (
    CircularSieve,
    NoSieve,
    RandomSieve,
    Sieve,
    StaticSieve,
    build_sieve,
    circular_update,
    easiest,
    initial_split,
    removal_count,
    shuffle_queue,
    update_count,
)
from spfde.sieving.tracker import (
    NEVER_CORRECT,
    UNSEEN,
    ForgettingTracker,
    LossTracker,
    build_tracker,
    forgetting_update,
)

__all__ = [
    "NEVER_CORRECT",
    "UNSEEN",
    "CircularSieve",
    "ForgettingTracker",
    "LossTracker",
    "NoSieve",
    "RandomSieve",
    "Sieve",
    "SieveSampler",
    "StaticSieve",
    "build_sieve",
    "build_tracker",
    "circular_update",
    "easiest",
    "forgetting_update",
    "initial_split",
    "removal_count",
    "shuffle_queue",
    "update_count",
]
