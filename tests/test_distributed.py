"""Distributed training: the sampler split, status gathering and a 2-process gloo run under torchrun.

The end-to-end test launches ``torchrun --nproc_per_node 2`` on 127.0.0.1 (CPU, gloo) with
sparsity (MEST), progressive freezing and circular sieving all active at interval 1, and checks
that after every epoch both ranks hold identical weights, masks, MEST gradient statistics, frozen
blocks and partial set, and that the union of the samples the ranks trained on is the partial set.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import torchrun
from spfde.distributed import (
    DistributedSieveSampler,
    StatusGatherer,
    all_gather_status,
    broadcast_state,
    init_from_env,
    maybe_rewrap_ddp,
    rank_shard,
    wrap_ddp,
)
from spfde.errors import SpfdeError
from spfde.sieving import ForgettingTracker, SieveSampler


class _Sieve:
    def __init__(self, active: torch.Tensor) -> None:
        self.active = active


@pytest.mark.parametrize("n", [1, 2, 7, 16, 61])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_shards_cover_the_order_evenly(n: int, world: int) -> None:
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(n))[:n]
    shards = [rank_shard(order, r, world) for r in range(world)]
    per_rank = -(-n // world)
    assert all(s.numel() == per_rank for s in shards)  # same number of samples -> same steps
    union = torch.cat(shards)
    assert set(union.tolist()) == set(order.tolist())  # padded, never truncated
    # only the padding repeats, and it repeats the head of the order
    assert union.numel() - n == per_rank * world - n
    counts = torch.bincount(union, minlength=1000)
    assert int((counts > 1).sum()) <= max(per_rank * world - n, 0)


def test_distributed_sampler_splits_the_single_process_order() -> None:
    active = torch.arange(100, 161)
    single = SieveSampler(_Sieve(active), seed=3)
    ranks = [DistributedSieveSampler(_Sieve(active), 3, r, 2) for r in range(2)]
    for epoch in (0, 4):
        single.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        full = single.indices()
        assert torch.equal(ranks[0].global_order(), full)
        got = [list(s) for s in ranks]
        assert [len(g) for g in got] == [len(ranks[0])] * 2 == [31, 31]
        assert got[0] == full[0::2].tolist()
        assert got[1] == full[1::2].tolist() + [int(full[0])]
        assert set(got[0]) | set(got[1]) == set(active.tolist())
    # the partial set is read at every pass: a sieving update takes effect on the next epoch
    ranks[0].sieve.active = active[:10]
    assert set(ranks[0]) <= set(active[:10].tolist())


def test_tensor_loader_augments_each_rank_differently() -> None:
    """Batch augmentation draws from one generator per epoch: salted with the sampler's rank, or
    position p of every rank's batch k would get the same crop and flip (half the variety)."""
    from spfde.data.datasets import ArrayDataset
    from spfde.data.loader import TensorLoader

    images = torch.randint(0, 256, (1, 1, 12, 12), dtype=torch.uint8).expand(16, 1, 12, 12).contiguous()  # one image
    ds = ArrayDataset(images, torch.zeros(16, dtype=torch.long), mean=(0.5,), std=(0.25,))
    first = {}
    for rank in (0, 1):
        sampler = DistributedSieveSampler(_Sieve(torch.arange(16)), 3, rank, 2)
        loader = TensorLoader(ds, 4, sampler=sampler, augment=True, seed=9)
        loader.set_epoch(0)
        first[rank] = next(iter(loader))[0]
    assert not torch.equal(first[0], first[1])
    single = TensorLoader(ds, 4, sampler=DistributedSieveSampler(_Sieve(torch.arange(16)), 3, 0, 2),
                          augment=True, seed=9)
    plain = TensorLoader(ds, 4, augment=True, seed=9)  # rank 0 keeps the single process's stream
    for loader in (single, plain):
        loader.set_epoch(0)
    assert torch.equal(next(iter(single))[0], next(iter(plain))[0])


def test_a_resume_with_another_process_count_is_a_config_change(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from spfde.errors import ConfigError
    from spfde.train import _check_world_size

    trainer = SimpleNamespace(world_size=1, cfg=SimpleNamespace(data=SimpleNamespace(batch_size=32),
                                                                 train=SimpleNamespace(epochs=10)))
    ckpt = {"world_size": 2, "epoch": 4}
    with pytest.raises(ConfigError, match=r"trained with 2 process\(es\).*global batch from 64 to 32"):
        _check_world_size(ckpt, trainer, False, [], tmp_path)
    changes: list[str] = []
    _check_world_size(ckpt, trainer, True, changes, tmp_path)
    assert changes == ["processes 2 -> 1 (global batch 64 -> 32)"]
    for same in ({"world_size": 1, "epoch": 4}, {"epoch": 4}, {"world_size": 2, "epoch": 9}):  # or finished
        _check_world_size(same, trainer, False, [], tmp_path)


def test_each_rank_loads_its_own_kernel_choices() -> None:
    from torch import nn

    from spfde.controller import SpFDE

    loaded = {}
    for rank in (0, 1):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        ctl = SpFDE(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    {"train": {"epochs": 2}, "sparsity": {"kernels": "sparse"}}, train_size=16,
                    example_input=torch.randn(2, 8), rank=rank, world_size=2)
        state = ctl.state_dict()
        mine = state["kernels"]
        state["kernels_by_rank"] = [{"mode": "sparse", "layers": {}, "rank": 0}, {**mine, "rank": 1}]
        seen = []
        ctl.kernels.load_state_dict = seen.append
        ctl.load_state_dict(state)
        loaded[rank] = seen[-1].get("rank")
        state.pop("kernels_by_rank")  # another world size, or a checkpoint before the field: rank 0's
        ctl.load_state_dict({**state, "kernels_by_rank": [mine]})
        assert seen[-1] is state["kernels"]
    assert loaded == {0: 0, 1: 1}


def test_sampler_rejects_a_bad_rank() -> None:
    with pytest.raises(SpfdeError, match="rank 2"):
        DistributedSieveSampler(_Sieve(torch.arange(4)), 0, 2, 2)


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_from_env() == (0, 1, 0)
    idx, ok = all_gather_status(torch.tensor([3, 1]), torch.tensor([True, False]))
    assert idx.tolist() == [3, 1] and ok.tolist() == [True, False]
    assert broadcast_state({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model) is model and maybe_rewrap_ddp(model) is model


def test_exit_process_skips_teardown_only_after_a_process_group(tmp_path: Path) -> None:
    assert __import__("spfde.distributed").distributed.exit_process(5) == 5  # no group: just the code
    script = tmp_path / "one_rank.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, sys
        import torch.distributed as dist
        from spfde import distributed as sd
        atexit.register(print, "teardown ran")
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        sd.cleanup()
        print("trained", end="")  # unflushed on purpose: exit_process must flush it
        sys.exit(sd.exit_process(3))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "trained"  # flushed, and interpreter teardown (atexit) skipped


def test_status_gatherer_equals_recording_every_step() -> None:
    g = torch.Generator().manual_seed(0)
    steps = [(torch.randint(0, 20, (6,), generator=g), torch.rand(6, generator=g) > 0.5) for _ in range(12)]
    direct, merged, buf = ForgettingTracker(20), ForgettingTracker(20), StatusGatherer()
    for idx, ok in steps:
        direct.record(idx, ok)
        buf.add(idx, ok)
        idx.zero_()  # a loop that reuses its index buffer: the gatherer keeps its own copy
    assert buf.pending() == 72
    assert buf.flush(merged) == 72 and buf.pending() == 0
    assert torch.equal(direct.difficulty(), merged.difficulty())
    assert direct.counts().sum() > 0  # the sequence really has forgetting events to order


# ---------------------------------------------------------------------------------------------
# two processes under torchrun

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    import torch.distributed as dist
    from spfde import distributed as sd
    from spfde.controller import SpFDE
    from spfde.utils import state_dict_sha256

    rank, world, _ = sd.init_from_env()
    assert world == 2 and dist.get_backend() == "gloo"
    torch.manual_seed(1234 + rank)  # different on purpose: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(7)
    N = 61  # odd: exercises the padding
    X = torch.randn(N, 1, 8, 8, generator=g)
    Y = torch.randint(0, 4, (N,), generator=g)
    ddp = sd.wrap_ddp(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"seed": 5, "train": {"epochs": 5, "interval": 1},
           # λ = 1: MEST records the (all-reduced) mean |g|, which must be identical on both ranks
           "sparsity": {"method": "mest", "target": 0.5, "dense_first_layer": True, "mest_lambda": 1.0},
           "freezing": {"target": 0.1, "tfrz": 2, "max_blocks_fraction": 0.67},
           "sieving": {"method": "circular", "ratio": 0.25, "update_ratio": 0.5},
           "optim": {"lr": 0.05}}
    ctl = SpFDE(ddp, opt, cfg, train_size=N, example_input=X[:2],
                blocks=[["0", "1"], "3", "5", "9"], rank=rank, world_size=world)
    ctl.track_seen = True
    assert isinstance(ctl.sampler, sd.DistributedSieveSampler)
    epochs, rewraps = [], 0
    for epoch in range(cfg["train"]["epochs"]):
        info = ctl.start_epoch(epoch)
        new = sd.maybe_rewrap_ddp(ddp)
        rewraps += new is not ddp
        ddp = new
        order = ctl.sampler.indices()
        ddp.train()
        for b in range(0, order.numel(), 8):
            idx = order[b:b + 8]
            logits = ddp(X[idx])
            loss = F.cross_entropy(logits, Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ctl.before_step()
            opt.step()
            ctl.after_step(logits, Y[idx], idx)
        buf = ctl.sparsity.state_dict()["grad_buf"]
        grad_buf = state_dict_sha256(dict(sorted(buf.items())))
        m = ctl.end_epoch()
        sd.sync_buffers(ddp)  # BN running stats: each rank's last forward updated its own copy
        seen = [None, None]
        dist.all_gather_object(seen, ctl.seen_indices().tolist())
        fp = sd.check_in_sync(ddp, ctl)
        frozen_params = [n for n, p in model.named_parameters() if not p.requires_grad]
        epochs.append({"fp": fp, "grad_buf": grad_buf, "grad_buf_n": len(buf),
                       "tracker": state_dict_sha256(ctl.tracker.state_dict()),
                       "union": sorted(set(seen[0]) | set(seen[1])),
                       "active": sorted(ctl.sieve.active.tolist()),
                       "local_seen": len(ctl.seen_indices()), "removed": m["removed_this_update"],
                       "updated": m["sparsity_updated"], "frozen": m["frozen_blocks"],
                       "ddp_params": list(getattr(ddp, "_spfde_trainable", ())),
                       "frozen_params": frozen_params, "train_flops": m["train_flops"]})
    out = {"rank": rank, "epochs": epochs, "rewraps": rewraps,
           "weights": state_dict_sha256(model.state_dict())}
    with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:
        json.dump(out, f)
    sd.cleanup()
    sys.exit(sd.exit_process(0))  # as `spfde train` ends: no interpreter teardown with gloo threads alive
''')


def test_two_ranks_stay_identical_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = torchrun(str(script), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["weights"] == r1["weights"]
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        # weights, masks, frozen blocks, partial set, MEST gradient statistic, forgetting tracker
        assert e0["fp"] == e1["fp"]
        assert e0["grad_buf"] == e1["grad_buf"] and e0["tracker"] == e1["tracker"]
        assert e0["frozen"] == e1["frozen"] and e0["active"] == e1["active"]
        # the ranks together trained on exactly the partial set, each on about half of it
        assert e0["union"] == e0["active"]
        assert e0["local_seen"] + e1["local_seen"] >= len(e0["active"])
        assert e0["local_seen"] <= -(-len(e0["active"]) // 2)
        # frozen parameters are not registered with DDP, so they take no part in the all-reduce
        assert not set(e0["frozen_params"]) & set(e0["ddp_params"])
    last = r0["epochs"][-1]
    # the run really exercised every dimension, or the equalities above would be vacuous
    assert any(e["updated"] for e in r0["epochs"])
    assert any(e["grad_buf_n"] for e in r0["epochs"])  # MEST recorded the all-reduced gradients
    assert any(e["removed"] > 0 for e in r0["epochs"])
    assert last["frozen"] and r0["rewraps"] >= 1
    assert len(last["active"]) < 61


@pytest.mark.slow
def test_spfde_train_runs_unchanged_under_torchrun(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent("""
        seed: 1
        data: {name: synthetic, synthetic_size: 96, synthetic_classes: 4, image_size: 16, batch_size: 16,
               test_subset: 24, augment: false}
        model: {name: resnet20, width: 0.25}
        train: {epochs: 3, interval: 1, device: cpu, threads: 1}
        sparsity: {method: mest, target: 0.5}
        freezing: {target: 0.05, tfrz: 1}
        sieving: {method: circular, ratio: 0.25, update_ratio: 0.5}
        logging: {progress: false}
    """))
    out = tmp_path / "run"
    proc = torchrun("-m", "spfde.cli", "train", "-c", str(cfg), "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # written once, by rank 0
    summary = json.loads((out / "summary.json").read_text())
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    from spfde.utils import state_dict_sha256

    assert summary["weights_sha256"] == state_dict_sha256(ckpt["model"])
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the plain model, not the DDP wrapper
    # each rank resumes with its own kernel choices and RNG (dropout draws per rank); the world size is kept
    assert ckpt["world_size"] == 2 and len(ckpt["controller"]["kernels_by_rank"]) == 2
    assert len(ckpt["rng_by_rank"]) == 2
    assert not torch.equal(ckpt["rng_by_rank"][0]["torch"], ckpt["rng_by_rank"][1]["torch"])
    assert torch.equal(ckpt["rng_by_rank"][0]["torch"], ckpt["rng"]["torch"])
    for r in rows:  # both ranks' shares together cover the partial set (72 of 96 samples, padded to even)
        assert r["active_samples"] == 72 and r["samples_seen"] == 72
    assert rows[-1]["frozen_blocks"] and summary["final_test_acc"] is not None


def test_closing_lines_under_torchrun_are_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank of a torchrun job ends with the same config error or signal: rank 0 says it; a
    rank's own failure (a lost peer) is said with its rank, as one line, not a gloo traceback."""
    from helpers import run_main
    from spfde import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, want in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        code, _, err = run_main("train")  # no --config: a ConfigError on every rank
        assert code == 2 and len([line for line in err.splitlines() if "error:" in line]) == want

    def lost(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:"
                           " Connection reset by peer\nException raised from ...")

    monkeypatch.setitem(cli.COMMANDS, "train", lost)
    code, _, err = run_main("train", "--resume", "some/run")
    assert code == 1 and err.splitlines() == [
        "rank 1: error: lost contact with the job's other processes ([../third_party/gloo/gloo/transport/tcp/"
        "pair.cc:537] Read error [127.0.0.1]: Connection reset by peer); resume with "
        "`spfde train --resume some/run`"]
    monkeypatch.delenv("RANK")  # outside torchrun a RuntimeError is not ours to explain
    with pytest.raises(RuntimeError, match="gloo"):
        run_main("train", "--resume", "some/run")
