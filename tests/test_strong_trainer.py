"""Strong end-to-end checks of the built-in trainer: frozen blocks stay bit-identical, final masks
meet the target exactly, forgetting histograms match an independent count, block-wise cosine LR.

Expected values are derived from the run's own outputs (metrics.jsonl, snapshots, sieve/*.json)
and from the paper's definitions, not from the functions that produced them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from spfde.analysis import load_snapshots
from spfde.config import load_config
from spfde.sparsity import keep_count
from spfde.train import Trainer, train

BASE = [
    "data.name=synthetic", "data.synthetic_size=128", "data.image_size=16", "data.channels=3",
    "data.batch_size=32", "data.eval_batch_size=256", "model.name=resnet20", "model.width=0.25",
    "optim.lr=0.05", "optim.end_lr=0.001", "optim.momentum=0.9", "optim.weight_decay=0.0005",
    "train.threads=1", "logging.progress=false", "sparsity.method=mest", "sparsity.target=0.8",
    "sieving.method=circular", "sieving.ratio=0.25", "freezing.tfrz=2",
]
BLOCKS = ["stem", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
          "layer3.0", "layer3.1", "layer3.2", "head"]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def freeze_epochs(rows: list[dict]) -> dict[str, int]:
    """Block -> first epoch it is listed as frozen (read from the metrics, not the plan)."""
    out: dict[str, int] = {}
    for r in rows:
        for b in r["frozen_blocks"]:
            out.setdefault(b, r["epoch"])
    return out


def in_block(key: str, block: str) -> bool:
    return key.startswith(block + ".")


# ----------------------------------------------------------------------------- 4. frozen blocks, final masks


def test_frozen_blocks_bit_identical_and_final_masks_exact(tmp_path):
    epochs, search_end, s = 8, 6, 0.8  # search_end: the default 3/4 of 8 epochs
    cfg = load_config(None, BASE + [f"train.epochs={epochs}", "train.interval=1", "freezing.target=0.18",
                                    "analysis.snapshots=true"])
    assert cfg.search_end == search_end and cfg.freezing.prune_on_freeze
    run = tmp_path / "run"
    train(cfg, run, quiet=True)
    rows = rows_of(run)
    snaps = dict(load_snapshots(run))
    assert sorted(snaps) == list(range(epochs))  # Δτ = 1: a snapshot after every epoch
    frozen_at = freeze_epochs(rows)
    # the run exercises what it should: several blocks freeze, masked ones during MEST's search
    assert len(frozen_at) >= 3, frozen_at
    # Algorithm 1 (single_shot): block i freezes at Tfrz + i * Δτ, front to back
    assert frozen_at == {BLOCKS[i]: 2 + i for i in range(len(frozen_at))}
    masked_frozen = [b for b in frozen_at if any(in_block(n, b) for n in snaps[epochs - 1]["masks"])]
    assert any(frozen_at[b] < search_end for b in masked_frozen), frozen_at
    for r in rows:  # once frozen, a block stays frozen (single_shot)
        assert set(r["frozen_blocks"]) == {b for b, f in frozen_at.items() if f <= r["epoch"]}

    checked_buffers = set()
    for block, f in frozen_at.items():
        assert 1 <= f < epochs - 1
        keys = [k for k in snaps[f]["model"] if in_block(k, block)]
        assert keys, block
        prev, at = snaps[f - 1], snaps[f]
        for k in keys:
            kind = k.rsplit(".", 1)[1]
            if kind in ("running_mean", "running_var", "num_batches_tracked"):
                checked_buffers.add(kind)
            # nothing moved during the freeze epoch, nor at the freeze itself: weights, masks and BN
            # statistics as they were at the end of the epoch before
            assert torch.equal(at["model"][k], prev["model"][k]), (block, k)
            if k in at["masks"]:
                assert torch.equal(at["masks"][k], prev["masks"][k]), (block, k)
            for e in range(f + 1, epochs):  # and at every later epoch, bit for bit
                assert torch.equal(snaps[e]["model"][k], at["model"][k]), (block, k, e)
                if k in at["masks"]:
                    assert torch.equal(snaps[e]["masks"][k], at["masks"][k]), (block, k, e)
        for k in keys:  # a masked layer frozen during the search: its last update before freezing
            if k in at["masks"] and f < search_end:  # (epoch f - 1) pruned it from s' to exactly s
                n = at["masks"][k].numel()
                if f >= 2:
                    assert int(snaps[f - 2]["masks"][k].sum()) > keep_count(n, s), (block, k)
                assert int(prev["masks"][k].sum()) == keep_count(n, s), (block, k)
    assert checked_buffers == {"running_mean", "running_var", "num_batches_tracked"}
    # a block that never froze did train in the last epoch (the snapshots are live)
    assert not torch.equal(snaps[epochs - 1]["model"]["head.weight"], snaps[epochs - 2]["model"]["head.weight"])

    final = snaps[epochs - 1]
    assert len(final["masks"]) == 18  # every conv but the dense first layer; the head stays dense
    for name, mask in final["masks"].items():
        w = final["model"][name]
        assert int(mask.sum()) == keep_count(mask.numel(), s), name
        assert (w[~mask] == 0).all(), name
        assert int((w != 0).sum()) <= keep_count(mask.numel(), s), name
    assert rows[-1]["layer_density"] == {
        m: round(keep_count(final["masks"][m + ".weight"].numel(), s) / final["masks"][m + ".weight"].numel(), 6)
        if m + ".weight" in final["masks"] else 1.0 for m in rows[-1]["layer_density"]}


# ----------------------------------------------------------------------------- 5. histograms and block LR


def reference_histogram(batches: list[tuple[torch.Tensor, torch.Tensor]], last: dict[int, bool]) -> dict[str, int]:
    """Appendix C.1 by a plain loop: forgetting events (correct -> wrong between consecutive sightings)
    per sample seen in the interval; key -1: seen but never correct. ``last`` (each sample's last
    correctness) starts empty each interval, as the paper counts "within each Δτ interval"
    (``sieving.carry_status: false``, the default)."""
    count: dict[int, int] = {}
    ever: dict[int, bool] = {}
    for idx, ok in batches:
        for i, c in zip(idx.tolist(), ok.tolist(), strict=True):
            if last.get(i) is True and not c:
                count[i] = count.get(i, 0) + 1
            last[i] = bool(c)
            ever[i] = ever.get(i, False) or bool(c)
    hist: dict[str, int] = {}
    for i in ever:
        key = str(count.get(i, 0)) if ever[i] else "-1"
        hist[key] = hist.get(key, 0) + 1
    return hist


def test_forgetting_histograms_and_block_cosine_lr(tmp_path):
    epochs, interval, base_lr, end_lr = 10, 2, 0.1, 0.001
    cfg = load_config(None, BASE + [f"train.epochs={epochs}", f"train.interval={interval}", "freezing.target=0.15",
                                    f"optim.lr={base_lr}", f"optim.end_lr={end_lr}"])
    run = tmp_path / "run"
    run.mkdir()
    tr = Trainer(cfg, run, quiet=True)
    tracker = tr.ctl.tracker
    intervals: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    current: list[tuple[torch.Tensor, torch.Tensor]] = []
    record, reset = tracker.record, tracker.reset_interval

    def logged_record(indices, correct):
        current.append((torch.as_tensor(indices).clone(), torch.as_tensor(correct).clone()))
        record(indices, correct)

    def logged_reset():
        intervals.append(list(current))
        current.clear()
        reset()

    tracker.record, tracker.reset_interval = logged_record, logged_reset
    tr.run()
    rows = rows_of(run)
    assert [r["epoch"] for r in rows] == list(range(epochs))

    # --- sieve/forgetting_epoch_XXXX.json at exactly the sieving updates (every Δτ epochs, never epoch 0)
    updates = [e for e in range(1, epochs) if e % interval == 0]
    files = sorted(p.name for p in (run / "sieve").iterdir())
    assert files == [f"forgetting_epoch_{e:04d}.json" for e in updates]
    assert len(intervals) == len(updates)
    partial = rows[0]["active_samples"]
    assert partial == 128 - 32  # p = 0.25 of 128 samples is kept out
    nonzero_counts = 0
    for j, e in enumerate(updates):
        obj = json.loads((run / "sieve" / f"forgetting_epoch_{e:04d}.json").read_text())
        assert obj["epoch"] == e
        hist = {k: int(v) for k, v in obj["histogram"].items()}
        # the histogram is over the partial set trained on in the interval that just ended
        assert sum(hist.values()) == partial == rows[e - 1]["active_samples"]
        assert hist == reference_histogram(intervals[j], {}), e
        nonzero_counts += sum(v for k, v in hist.items() if int(k) > 0)
        assert "forgetting_histogram" not in rows[e]  # written to its file, not to metrics.jsonl
    assert nonzero_counts > 0  # some sample was forgotten: the counts are not all trivial

    # --- block-wise cosine LR: each block decays over its own active epochs, reaching end_lr as it freezes
    frozen_at = freeze_epochs(rows)
    assert len(frozen_at) >= 3, frozen_at
    assert frozen_at == {BLOCKS[i]: 2 + interval * i for i in range(len(frozen_at))}  # Tfrz + i * Δτ
    assert all(f < epochs for f in frozen_at.values())
    for r in rows:
        assert set(r["block_lr"]) == set(BLOCKS)
        t = r["epoch"] + 1.0  # the rate logged at the end of an epoch is the one for progress epoch + 1
        for b, lr in r["block_lr"].items():
            end = frozen_at.get(b, epochs)
            want = end_lr + (base_lr - end_lr) * 0.5 * (1 + math.cos(math.pi * min(t / end, 1.0)))
            assert math.isclose(lr, want, rel_tol=1e-9, abs_tol=1e-15), (r["epoch"], b, lr, want)
        assert math.isclose(r["lr"], r["block_lr"]["head"], rel_tol=1e-12)
    for b, f in frozen_at.items():
        assert rows[f - 1]["block_lr"][b] == end_lr  # reached exactly when it freezes, and stays there
        assert all(r["block_lr"][b] == end_lr for r in rows[f:])
        assert f < 2 or rows[f - 2]["block_lr"][b] > end_lr
    assert rows[-1]["block_lr"]["head"] == end_lr
    first = min(frozen_at, key=frozen_at.get)
    assert rows[0]["block_lr"][first] < rows[0]["block_lr"]["head"]  # a shorter cosine decays faster
