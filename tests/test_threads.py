"""The default CPU thread count (spfde.utils.choose_threads / set_threads): a shared machine must
not collapse, explicit choices win, a resumed run keeps its count."""

from __future__ import annotations

import pytest
import torch

from spfde import utils
from spfde.utils import choose_threads, set_threads


def test_explicit_settings_win_in_order() -> None:
    busy = dict(usable_cores=8, load=7.9, torch_threads=8)
    assert choose_threads(3, {"OMP_NUM_THREADS": "2"}, **busy).threads == 3
    c = choose_threads(None, {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "5"}, **busy)
    assert (c.threads, c.reason) == (2, "set by OMP_NUM_THREADS")
    assert choose_threads(None, {"MKL_NUM_THREADS": "5"}, **busy).threads == 5
    # a value that is not a positive count is ignored, as torch ignores it
    assert choose_threads(None, {"OMP_NUM_THREADS": "0"}, **busy).threads == 1
    c = choose_threads(None, {"OMP_NUM_THREADS": "auto"}, **busy)
    assert c.threads == 1 and "OMP_NUM_THREADS='auto' ignored (not a positive integer)" in c.reason
    assert "ignored" not in choose_threads(None, {}, **busy).reason


def test_more_threads_than_usable_cores_are_kept_but_said() -> None:
    for c in (choose_threads(64, {}, 2, 0.0, 2), choose_threads(None, {"OMP_NUM_THREADS": "8"}, 2, 0.0, 2)):
        assert c.threads in (64, 8) and "more than the 2 usable cores" in c.reason
    assert "more than" not in choose_threads(2, {}, 2, 0.0, 2).reason


@pytest.mark.parametrize(("cores", "load", "torch_threads", "expected"), [
    (2, 0.1, 2, 2),    # idle 2-core box: both cores
    (2, 2.0, 2, 1),    # another job keeps both cores busy: one thread, never zero
    (2, 1.4, 2, 1),    # load rounds: 1.4 -> 1 busy core
    (16, 3.6, 16, 12),
    (16, 0.0, 8, 8),   # never above torch's own count (physical cores, or the user's set_num_threads)
    (4, 0.0, 64, 4),   # never above the cores the affinity mask allows
])
def test_free_cores_are_the_default(cores, load, torch_threads, expected) -> None:
    c = choose_threads(None, {}, cores, load, torch_threads)
    assert c.threads == expected
    assert f"{cores} usable core" in c.reason and f"load {load:.1f}" in c.reason


def test_set_threads_reads_affinity_and_load_and_keeps_a_resumed_count(monkeypatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(utils, "usable_cores", lambda: 2)
    monkeypatch.setattr(utils, "visible_load", lambda: 2.0)
    try:
        assert set_threads(None).threads == 1 == torch.get_num_threads()
        # a resumed run keeps the count it ran with (bit-identical resume), unless told otherwise
        kept = set_threads(None, keep=2)
        assert kept.threads == 2 == torch.get_num_threads() and "resume" in kept.reason
        changed = set_threads(1, keep=2)
        assert changed.threads == 1 and "not end bit-identical" in changed.reason
        assert "bit-identical" not in set_threads(2, keep=2).reason
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        env = set_threads(None, keep=2)
        assert env.threads == 1 and "trained on 2" in env.reason
    finally:
        torch.set_num_threads(before)


def _fake_proc(monkeypatch, runnable: list[int], own: int) -> None:
    readings = iter(f"0.2 0.1 0.1 {n}/200 99\n" for n in runnable)

    class Fake:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return next(readings)

    monkeypatch.setattr("builtins.open", lambda *a, **k: Fake())
    monkeypatch.setattr(utils, "_own_running", lambda: own)


def test_visible_load_counts_other_runnable_threads_not_the_load_average(monkeypatch) -> None:
    # a competitor started a moment ago: the load average (0.2) has not caught up with it
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    _fake_proc(monkeypatch, [3] * 5, own=1)
    assert utils.visible_load(gap_s=0.0) == 2.0  # three runnable threads, one of them the reader
    # a competitor that finished a moment ago (or this process's own earlier run): the load
    # average still says 2, nothing runs; an idle machine must get every core
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (2.0, 1.5, 1.0))
    _fake_proc(monkeypatch, [1] * 5, own=1)
    idle = utils.visible_load(gap_s=0.0)
    assert idle == 0.0 and choose_threads(None, {}, 2, idle, 2).threads == 2
    # this process's own runnable threads (a data thread, a spinning OpenMP worker) are not competitors;
    # one reading's blip does not move the median
    _fake_proc(monkeypatch, [3, 3, 6, 3, 3], own=3)
    assert utils.visible_load(gap_s=0.0) == 0.0


def test_visible_load_sees_a_real_busy_process_and_not_its_own_threads() -> None:
    import hashlib
    import subprocess
    import sys
    import threading
    import time

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert utils.visible_load() >= 1.0
    finally:
        busy.kill()
        busy.wait()
    # a thread of this process that runs without the GIL is counted as this process's own
    stop = threading.Event()
    data = bytes(1 << 24)

    def spin() -> None:
        while not stop.is_set():
            hashlib.sha256(data).digest()

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        time.sleep(0.1)
        assert max(utils._own_running() for _ in range(20)) >= 2
    finally:
        stop.set()
        t.join()


def test_passive_wait_policy_takes_every_core_whatever_the_load() -> None:
    """Sleeping idle threads do not stall each other on busy cores, so the load is not subtracted
    (a busy `make demo`: 1.9x idle with 2 passive threads, 2.4x with 1 thread; docs/benchmarks.md)."""
    spinning = choose_threads(None, {}, usable_cores=2, load=2.0, torch_threads=2)
    passive = choose_threads(None, {"OMP_WAIT_POLICY": "passive"}, usable_cores=2, load=2.0, torch_threads=2)
    assert spinning.threads == 1 and passive.threads == 2 and "OMP_WAIT_POLICY=PASSIVE" in passive.reason
    assert choose_threads(None, {"OMP_WAIT_POLICY": "PASSIVE"}, 8, 0.0, 4).threads == 4  # at most torch's count
    assert choose_threads(None, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}, 2, 0.0, 2).threads == 1


def test_the_cli_sets_a_passive_wait_policy_before_torch_loads_unless_the_environment_chose() -> None:
    import os
    import subprocess
    import sys

    code = ("import sys; from spfde.cli import main; main(['models']); import os, torch; "
            "print('policy', os.environ.get('OMP_WAIT_POLICY'))")
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if given:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert f"policy {want}" in out
