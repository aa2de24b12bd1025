"""Property test: the circular sieve driven by a real ForgettingTracker (paper Section 4.3, Appendix C.2).

For random record sequences, the sieve's decisions are a pure function of (seed, records) -- not of
the global RNG -- and each update moves out exactly ``k = ceil(r * |removed|)`` samples, all among
the easiest of the partial set by ``tracker.difficulty()`` (ties allowed), while the ``k`` at the
queue's head come back.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spfde.sieving import CircularSieve, ForgettingTracker

RATIOS = [0.1, 0.2, 0.25, 0.3, 0.5, 0.6]
UPDATE_RATIOS = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


@st.composite
def scenarios(draw):
    n = draw(st.integers(6, 40))
    ratio = draw(st.sampled_from(RATIOS))
    update_ratio = draw(st.sampled_from(UPDATE_RATIOS))
    seed = draw(st.integers(0, 2**20))
    n_updates = draw(st.integers(1, 6))
    # per interval: sightings as (position in the partial set, correct), several passes so counts vary
    intervals = [draw(st.lists(st.tuples(st.integers(0, n - 1), st.booleans()), min_size=0, max_size=4 * n))
                 for _ in range(n_updates)]
    return n, ratio, update_ratio, seed, intervals


def simulate(n, ratio, update_ratio, seed, intervals, interval=1):
    """Drive the sieve like the controller: record the interval, then step_epoch at the update epoch."""
    sieve = CircularSieve(n, ratio, update_ratio, seed=seed, interval=interval)
    tracker = ForgettingTracker(n)
    history = [(sieve.active.clone(), sieve.removed.clone(), None, None)]
    for j, sightings in enumerate(intervals):
        active = sieve.active
        if sightings:
            # positions wrap into the current partial set (the loader serves only it), batches of 8
            idx = torch.tensor([int(active[p % active.numel()]) for p, _ in sightings])
            ok = torch.tensor([c for _, c in sightings])
            for b in range(0, idx.numel(), 8):
                tracker.record(idx[b:b + 8], ok[b:b + 8])
        difficulty = tracker.difficulty()
        epoch = (j + 1) * interval
        info = sieve.step_epoch(epoch, tracker)
        history.append((sieve.active.clone(), sieve.removed.clone(), difficulty, info))
    return history


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(0, 2**31 - 1))
def test_circular_sieve_with_real_tracker(scenario, global_seed):
    n, ratio, update_ratio, seed, intervals = scenario
    torch.manual_seed(global_seed)
    first = simulate(n, ratio, update_ratio, seed, intervals)
    torch.manual_seed(global_seed + 1)  # the global RNG must not matter: only (seed, purpose, epoch) does
    torch.rand(17)
    second = simulate(n, ratio, update_ratio, seed, intervals)
    assert len(first) == len(second)
    for (a1, r1, _, _), (a2, r2, _, _) in zip(first, second, strict=True):
        assert torch.equal(a1, a2) and torch.equal(r1, r2)

    m = round(Fraction(str(ratio)) * n)  # samples kept out: round(p * n)
    initial = set(first[0][1].tolist())
    assert len(initial) == m and first[0][0].numel() == n - m
    returned_so_far: set[int] = set()
    for (act0, rem0, _, _), (act1, rem1, diff, info) in zip(first[:-1], first[1:], strict=True):
        before_active, before_removed = act0.tolist(), rem0.tolist()
        # k = ceil(r * |removed|) with r as written (0.3 means 30%), capped at |partial set|
        k = min(math.ceil(Fraction(str(update_ratio)) * len(before_removed)), len(before_active))
        assert info["returned"] == info["removed_this_update"] == k
        returned = before_removed[:k]
        dropped = set(before_active) - set(act1.tolist())
        stayed = set(before_active) - dropped
        assert len(dropped) == k
        assert set(act1.tolist()) == stayed | set(returned)
        assert torch.equal(act1, torch.sort(act1).values)
        assert sorted(rem1.tolist()) == sorted(before_removed[k:] + list(dropped))
        # the k that left are k of the easiest: none is harder than any sample that stayed (ties allowed)
        if dropped and stayed:
            assert max(int(diff[i]) for i in dropped) <= min(int(diff[i]) for i in stayed)
        returned_so_far |= set(returned)
        if not initial <= returned_so_far:
            # FIFO until every initially removed sample has been back: head kept, easiest appended first
            assert rem1.tolist()[:len(before_removed) - k] == before_removed[k:]
            tail = rem1.tolist()[len(before_removed) - k:]
            assert [int(diff[i]) for i in tail] == sorted(int(diff[i]) for i in tail)
