"""Circular data sieving (paper Section 4.3, Appendix C): tracker, sieves, sampler."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from spfde.config import from_dict
from spfde.errors import SpfdeError
from spfde.sieving import (
    NEVER_CORRECT,
    UNSEEN,
    CircularSieve,
    ForgettingTracker,
    NoSieve,
    RandomSieve,
    SieveSampler,
    StaticSieve,
    build_sieve,
)

FAST = settings(max_examples=40, deadline=None)


def check_partition(sieve, n):
    allidx = torch.cat([sieve.active, sieve.removed])
    assert allidx.numel() == n
    assert torch.equal(torch.sort(allidx).values, torch.arange(n))
    assert torch.equal(sieve.active, torch.sort(sieve.active).values)


def reference_counts(n, batches):
    """Plain per-sighting loop: the definition of a forgetting event (Appendix C.1)."""
    last = [None] * n
    count = [0] * n
    ever = [False] * n
    for idx, ok in batches:
        for i, c in zip(idx, ok, strict=True):
            if last[i] is True and not c:
                count[i] += 1
            last[i] = bool(c)
            ever[i] |= bool(c)
    seen = [v is not None for v in last]
    return count, seen, ever


# ----------------------------------------------------------------------------- tracker


@pytest.mark.parametrize("carry", [False, True])
def test_tracker_hand_made_sequence_with_duplicates_and_never_correct(carry):
    t = ForgettingTracker(5, carry_status=carry)
    t.record(torch.tensor([0, 1, 2, 3]), torch.tensor([True, True, False, True]))
    t.record(torch.tensor([0, 1, 2]), torch.tensor([False, True, False]))  # 0 forgets
    # duplicates in one batch are consecutive sightings in batch order: 0 goes F->T->F->T (one event)
    t.record(torch.tensor([0, 1, 0, 0]), torch.tensor([True, False, False, True]))
    assert t.counts().tolist() == [2, 1, 0, 0, 0]
    assert t.seen_in_interval().tolist() == [True, True, True, True, False]
    assert t.never_correct_in_interval().tolist() == [False, False, True, False, False]
    assert t.difficulty().tolist() == [2, 1, NEVER_CORRECT, 0, UNSEEN]
    assert NEVER_CORRECT > 10**6 and UNSEEN > NEVER_CORRECT
    assert t.histogram() == {-1: 1, 0: 1, 1: 1, 2: 1}
    assert t.histogram(torch.tensor([0, 3])) == {0: 1, 2: 1}
    t.record(torch.tensor([0]), torch.tensor([False]))  # last sighting of 0 was correct
    assert t.counts()[0] == 3

    # a new interval: counts restart; the previous correctness carries over only with carry_status
    # (3 was last correct, 1 last wrong: with it, 3's first sighting of the interval is an event)
    t.reset_interval()
    assert t.counts().tolist() == [0] * 5
    t.record(torch.tensor([3, 1]), torch.tensor([False, False]))
    assert t.counts().tolist() == ([0, 0, 0, 1, 0] if carry else [0] * 5)
    assert t.seen_in_interval().tolist() == [False, True, False, True, False]
    assert t.difficulty().tolist() == [UNSEEN, NEVER_CORRECT, UNSEEN, NEVER_CORRECT, UNSEEN]


@FAST
@given(n=st.integers(1, 12), data=st.data())
def test_tracker_matches_reference_loop(n, data):
    batches = data.draw(st.lists(
        st.lists(st.tuples(st.integers(0, n - 1), st.booleans()), min_size=0, max_size=10), max_size=8))
    batches = [([i for i, _ in b], [c for _, c in b]) for b in batches]
    t = ForgettingTracker(n)
    for idx, ok in batches:
        t.record(torch.tensor(idx, dtype=torch.int64), torch.tensor(ok, dtype=torch.bool))
    count, seen, ever = reference_counts(n, batches)
    assert t.counts().tolist() == count
    assert t.seen_in_interval().tolist() == seen
    assert t.never_correct_in_interval().tolist() == [s and not e for s, e in zip(seen, ever, strict=True)]


def test_tracker_record_logits_and_errors():
    t = ForgettingTracker(4)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    t.record_logits(torch.tensor([0, 1, 2]), logits, torch.tensor([0, 0, 0]))
    t.record_logits(torch.tensor([0, 1, 2]), -logits, torch.tensor([0, 0, 0]))
    assert t.counts().tolist() == [1, 0, 1, 0]
    with pytest.raises(SpfdeError, match="index 4"):
        t.record(torch.tensor([4]), torch.tensor([True]))
    with pytest.raises(SpfdeError, match="2 indices but 1"):
        t.record(torch.tensor([0, 1]), torch.tensor([True]))
    t2 = ForgettingTracker(4)
    t2.load_state_dict(t.state_dict())
    assert torch.equal(t2.difficulty(), t.difficulty())
    with pytest.raises(SpfdeError, match="same dataset"):
        ForgettingTracker(5).load_state_dict(t.state_dict())


# ----------------------------------------------------------------------------- circular sieve


@FAST
@given(n=st.integers(2, 150), ratio=st.floats(0.01, 0.95), r=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
       levels=st.integers(1, 4), updates=st.integers(1, 8))
def test_circular_update_properties(n, ratio, r, seed, levels, updates):
    assume(round(ratio * n) < n)
    s = CircularSieve(n, ratio, r, seed, interval=1)
    m = round(ratio * n)
    size = n - m
    assert s.active.numel() == size and s.never_seen_count == m
    check_partition(s, n)
    g = torch.Generator().manual_seed(seed)
    for e in range(1, updates + 1):
        diff = torch.randint(0, levels, (n,), generator=g)  # few levels: many ties
        old_active, old_removed = s.active.clone(), s.removed.clone()
        pending_before = s.never_seen_count
        info = s.update(diff, e)
        k = info["returned"]
        assert k == info["removed_this_update"] == min(math.ceil(round(r * m, 9)), size)
        check_partition(s, n)
        assert s.active.numel() == size == info["active_samples"]
        returned = old_removed[:k]
        assert torch.isin(returned, s.active).all()  # head of the queue came back, none left again
        dropped = old_active[~torch.isin(old_active, s.active)]
        assert dropped.numel() == k
        # exactly the k easiest of the partial set (as a multiset of difficulties: ties are arbitrary)
        assert sorted(diff[dropped].tolist()) == sorted(diff[old_active].tolist())[:k]
        if s.never_seen_count > 0:  # FIFO until every initially removed sample has been back
            assert pending_before > 0
            assert torch.equal(s.removed[: old_removed.numel() - k], old_removed[k:])
        assert info["never_seen_count"] == s.never_seen_count


@FAST
@given(n=st.integers(4, 300), ratio=st.floats(0.05, 0.5), r=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_every_initially_removed_sample_returns(n, ratio, r, seed):
    s = CircularSieve(n, ratio, r, seed, interval=1)
    initial = set(s.removed.tolist())
    ever_active: set[int] = set()
    g = torch.Generator().manual_seed(seed)
    for e in range(1, math.ceil(1 / r) + 2):
        s.update(torch.randint(0, 3, (n,), generator=g), e)
        ever_active |= set(s.active.tolist())
    assert initial <= ever_active
    assert s.never_seen_count == 0


def test_queue_shuffled_only_after_all_initial_samples_returned():
    n, ratio, r = 100, 0.3, 0.5  # m = 30, k = 15: every initial sample is back after 2 updates
    s = CircularSieve(n, ratio, r, seed=3, interval=1)
    diff = torch.arange(n)  # distinct difficulties: the dropped samples are known exactly
    for e in (1, 2):
        before, old_active = s.removed.clone(), s.active.clone()
        s.update(diff, e)
        fifo = torch.cat([before[15:], old_active[:15]])  # active is sorted, so its head is the easiest
        if e == 1:
            assert s.never_seen_count == 15
            assert torch.equal(s.removed, fifo)
        else:
            assert s.never_seen_count == 0
            assert torch.equal(torch.sort(s.removed).values, torch.sort(fifo).values)
            assert not torch.equal(s.removed, fifo)  # shuffled once all initial samples were back


def test_easy_samples_leave_and_hard_ones_stay():
    n = 200
    s = CircularSieve(n, 0.25, 0.3, seed=0, interval=1)
    hard = torch.arange(n) < 40  # these are forgotten every interval; the rest are always right
    t = ForgettingTracker(n)
    for e in range(1, 25):
        for flip in (True, False, True):
            idx = s.active
            t.record(idx, ~hard[idx] | flip)
        s.step_epoch(e, t)
    assert not hard[s.removed].any()


def run_sequence(seed, n=120, start=1, stop=12, sieve=None, tracker=None):
    s = sieve or CircularSieve(n, 0.3, 0.3, seed, interval=2)
    t = tracker or ForgettingTracker(n)
    out = []
    for e in range(start, stop):
        g = torch.Generator().manual_seed(1000 + e)  # the "model": same for every run
        for _ in range(2):
            t.record(s.active, torch.rand(s.active.numel(), generator=g) > 0.4)
        s.step_epoch(e, t)
        out.append((s.active.clone(), s.removed.clone()))
    return out, s, t


def test_deterministic_per_seed_and_differs_across_seeds():
    a, _, _ = run_sequence(0)
    b, _, _ = run_sequence(0)
    c, _, _ = run_sequence(1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("cls", [CircularSieve, RandomSieve])
def test_state_dict_round_trip_gives_identical_continuation(cls):
    n = 120
    full, _, _ = run_sequence(0, sieve=cls(n, 0.3, 0.3, 0, interval=2))
    head, s, t = run_sequence(0, stop=7, sieve=cls(n, 0.3, 0.3, 0, interval=2))
    buf = io.BytesIO()
    torch.save({"sieve": s.state_dict(), "tracker": t.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    s2, t2 = cls(n, 0.3, 0.3, 0, interval=2), ForgettingTracker(n)
    s2.load_state_dict(state["sieve"])
    t2.load_state_dict(state["tracker"])
    tail, _, _ = run_sequence(0, start=7, sieve=s2, tracker=t2)
    assert len(head) + len(tail) == len(full)
    for x, y in zip(full, head + tail, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    with pytest.raises(SpfdeError, match="sieving.method"):
        StaticSieve(n, 0.3).load_state_dict(s.state_dict())


def test_step_epoch_schedule_histogram_and_reset():
    n = 50
    s = CircularSieve(n, 0.2, 0.3, seed=0, interval=3)
    t = ForgettingTracker(n)
    assert [e for e in range(10) if s.is_update_epoch(e)] == [3, 6, 9]
    t.record(s.active, torch.ones(s.active.numel(), dtype=torch.bool))
    t.record(s.active[:5], torch.zeros(5, dtype=torch.bool))
    info = s.step_epoch(2, t)
    assert info == {"active_samples": 40, "returned": 0, "removed_this_update": 0, "never_seen_count": 10}
    assert t.counts().sum() == 5  # no reset off the grid
    info = s.step_epoch(3, t)
    assert info["returned"] == info["removed_this_update"] == 3
    assert info["forgetting_histogram"] == {0: 35, 1: 5}
    assert not t.seen_in_interval().any()  # interval restarted
    again = s.step_epoch(3, t)  # a repeated call for the same epoch changes nothing
    assert again["returned"] == 0 and "forgetting_histogram" not in again


def test_update_cost_is_tiny_for_60k_samples():
    # One intra-op thread for the measurement only: on an oversubscribed shared CPU, a second
    # thread makes every small sort spin for ~100x its cost, which says nothing about the sieve.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 60_000
        s = CircularSieve(n, 0.2, 0.3, seed=0)
        t = ForgettingTracker(n)
        idx = torch.randperm(n)
        for _ in range(3):
            t.record(idx, torch.rand(n) > 0.3)
        s.step_epoch(5, t)  # warm-up of the allocator
        t.record(idx, torch.rand(n) > 0.3)
        t0 = time.perf_counter()
        s.step_epoch(10, t)
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 0.25  # a few milliseconds in practice; generous for a shared CPU


# ----------------------------------------------------------------------------- baselines


@FAST
@given(n=st.integers(2, 120), ratio=st.floats(0.01, 0.9), seed=st.integers(0, 1000))
def test_baselines_keep_the_partition(n, ratio, seed):
    assume(round(ratio * n) < n)
    g = torch.Generator().manual_seed(seed)
    size = n - round(ratio * n)
    for s in (RandomSieve(n, ratio, 0.3, seed, 1), StaticSieve(n, ratio, 2, seed, 1), NoSieve(n, 1, seed)):
        t = ForgettingTracker(n)
        for e in range(6):
            t.record(s.active, torch.rand(s.active.numel(), generator=g) > 0.5)
            s.step_epoch(e, t)
            check_partition(s, n)
            if isinstance(s, NoSieve) or (isinstance(s, StaticSieve) and e < 2):
                assert s.active.numel() == n
            else:
                assert s.active.numel() == size


def test_random_sieve_ignores_difficulty():
    n = 400
    s = RandomSieve(n, 0.25, 0.3, seed=0, interval=1)
    diff = torch.arange(n)
    old = s.active.clone()
    s.update(diff, 1)
    dropped = old[~torch.isin(old, s.active)]
    easiest = torch.sort(old).values[: dropped.numel()]
    assert not torch.equal(torch.sort(dropped).values, easiest)


def test_static_removes_exactly_the_easiest_once():
    n = 100
    s = StaticSieve(n, 0.2, warmup=4, seed=0, interval=2)
    assert [e for e in range(10) if s.is_update_epoch(e)] == [4]
    t = ForgettingTracker(n)
    g = torch.Generator().manual_seed(0)
    for e in range(12):
        d = t.difficulty()  # what the update at this epoch sees
        info = s.step_epoch(e, t)
        if e < 4:
            assert s.active.numel() == n and info["removed_this_update"] == 0
        if e == 4:
            assert info["removed_this_update"] == 20 and s.active.numel() == 80
            assert sorted(d[s.removed].tolist()) == sorted(d.tolist())[:20]
            frozen = s.active.clone()
        if e > 4:
            assert torch.equal(s.active, frozen)
        t.record(s.active, torch.rand(s.active.numel(), generator=g) > 0.5)
        t.record(s.active, torch.rand(s.active.numel(), generator=g) > 0.5)


# ----------------------------------------------------------------------------- factory and sampler


def test_build_sieve_from_config():
    def cfg(**sv):
        return from_dict({"seed": 3, "train": {"interval": 4, "epochs": 20}, "sieving": sv})

    assert isinstance(build_sieve(cfg(ratio=0.0), 10), NoSieve)
    assert isinstance(build_sieve(cfg(method="none", ratio=0.3), 10), NoSieve)
    c = build_sieve(cfg(ratio=0.3, update_ratio=0.5), 100)
    assert isinstance(c, CircularSieve) and c.interval == 4 and c.seed == 3 and c.removed.numel() == 30
    assert isinstance(build_sieve(cfg(method="random", ratio=0.3), 100), RandomSieve)
    st_ = build_sieve(cfg(method="static", ratio=0.3), 100)
    assert isinstance(st_, StaticSieve) and st_.warmup == 4
    assert build_sieve(cfg(method="static", ratio=0.3, static_warmup=7), 100).warmup == 7
    with pytest.raises(SpfdeError, match="static_warmup"):
        build_sieve(cfg(method="static", ratio=0.3, static_warmup=20), 100)
    with pytest.raises(SpfdeError, match="sieving.ratio"):
        build_sieve(cfg(ratio=0.9), 1)


class IndexDataset(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(float(i)), i


def test_sampler_yields_exactly_the_partial_set_each_epoch():
    n = 60
    s = CircularSieve(n, 0.25, 0.3, seed=0, interval=1)
    sampler = SieveSampler(s, seed=5)
    orders = []
    for e in range(4):
        if e:
            s.update(torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(e)), e)
        sampler.set_epoch(e)
        order = list(sampler)
        assert len(sampler) == sampler.num_samples == len(order) == 45
        assert sorted(order) == s.active.tolist()
        assert not set(order) & set(s.removed.tolist())
        loader = DataLoader(IndexDataset(n), batch_size=8, sampler=sampler)
        assert torch.cat([idx for _, idx in loader]).tolist() == order  # removed samples never loaded
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 4
    other = SieveSampler(s, seed=5)
    other.set_epoch(3)
    assert list(other) == orders[3]
    other.set_epoch(2)
    assert list(other) != orders[3]
    assert list(SieveSampler(NoSieve(n), seed=5)) != list(range(n))  # shuffled even without sieving
