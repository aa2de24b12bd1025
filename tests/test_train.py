"""End-to-end runs of the built-in trainer: outputs, determinism, kill-and-resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from spfde.config import load_config
from spfde.errors import SpfdeError
from spfde.train import Trainer, load_checkpoint, resume, train

TINY = [
    "data.name=synthetic", "data.synthetic_size=256", "data.image_size=16", "data.channels=3",
    "data.batch_size=32", "data.eval_batch_size=256", "data.augment=true", "model.name=resnet20",
    "model.width=0.25", "optim.lr=0.05", "train.epochs=4", "train.interval=1", "train.threads=1",
    "logging.progress=false",
]
SPFDE = ["sparsity.method=mest", "sparsity.target=0.8", "sparsity.search_end=3", "freezing.target=0.1",
         "freezing.tfrz=auto", "sieving.method=circular", "sieving.ratio=0.25"]


def tiny_cfg(*extra: str):
    return load_config(None, TINY + list(extra))


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spfde.cli", *args], capture_output=True, text=True, **kw)


def test_outputs_and_contract_fields(tmp_path):
    summary = train(tiny_cfg(*SPFDE), tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt"]:
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        for key in ["epoch", "lr", "train_loss", "train_acc", "test_acc", "wall_s", "train_flops", "density",
                    "frozen_blocks", "active_params", "bp_flops_saved", "active_samples", "returned",
                    "removed_this_update", "never_seen_count"]:
            assert key in r, key
    # the partial set is 75% of the data and only it is trained on
    assert all(r["active_samples"] == 192 and r["samples_seen"] == 192 for r in rows)
    assert rows[-1]["frozen_blocks"], "a 10% freezing target freezes at least one block"
    for key in ["final_test_acc", "best_test_acc", "epochs", "wall_s", "seed", "weights_sha256", "train_flops",
                "dense_train_flops", "flops_saving"]:
        assert key in summary
    assert json.loads((run / "summary.json").read_text()) == summary
    assert 0.0 < summary["flops_saving"] < 1.0
    assert summary["train_flops"] == sum(r["train_flops"] for r in rows)

    from spfde.report import write_report

    report = write_report([run])
    text = report.read_text()
    pngs = sorted(run.glob("**/*.png"))
    assert len(pngs) >= 6
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.name in text


def test_console_and_summary_are_wall_clock_first(tmp_path, capsys):
    summary = train(tiny_cfg(*SPFDE), tmp_path / "run", quiet=False)
    out = capsys.readouterr().out.splitlines()
    # one line saying how many threads and why, one saying how epochs are numbered (0-based everywhere)
    assert out[0] == "threads 1 (set by train.threads)"
    assert out[1].startswith("epochs 0..3 (0-based, as in metrics.jsonl")
    lines = [line for line in out if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["0/3", "1/3", "2/3", "3/3"]
    assert all("samples/s" in line and " ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0s")
    # MEST trains at s' = s - 0.05 until search_end: the console says so instead of a bare 0.250
    assert "(MEST search phase at s'=0.750; target 0.800 from epoch 3)" in lines[0]
    assert "MEST search" not in lines[3]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["threads"] == 1 and summary["train_size"] == 256
    assert summary["samples_per_s"] == pytest.approx(sum(r["samples_seen"] for r in rows) / summary["wall_s"])
    final = rows[-1]["test_acc"]
    first_close = next(r["wall_s"] for r in rows if r["test_acc"] >= final - 0.005)
    assert summary["time_to_final_acc_s"] == pytest.approx(first_close)
    assert set(summary["time_to_acc"]) == {"0.50", "0.60", "0.70", "0.80", "0.85", "0.90", "0.95"}
    for key, t in summary["time_to_acc"].items():
        reached = [r["wall_s"] for r in rows if r["test_acc"] >= float(key)]
        assert t == (reached[0] if reached else None)


def test_same_seed_bit_identical(tmp_path):
    a = train(tiny_cfg(*SPFDE), tmp_path / "a", quiet=True)
    b = train(tiny_cfg(*SPFDE), tmp_path / "b", quiet=True)
    c = train(tiny_cfg(*SPFDE, "seed=1"), tmp_path / "c", quiet=True)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["weights_sha256"] != c["weights_sha256"]


FMNIST = ["data.name=fashion_mnist", "data.subset=512", "data.test_subset=256", "data.channels=null",
          "data.image_size=32", "freezing.target=0.05"]


@pytest.mark.parametrize("data", [[], FMNIST], ids=["synthetic", "fashion_mnist"])
def test_removed_samples_never_reach_the_model(tmp_path, data):
    cfg = tiny_cfg(*SPFDE, *data)
    out = tmp_path / "run"
    out.mkdir()
    tr = Trainer(cfg, out, quiet=True)
    tr.ctl.track_seen = True
    for epoch in range(cfg.train.epochs):
        tr.train_epoch(epoch)
        seen = set(tr.ctl.seen_indices().tolist())
        assert seen == set(tr.ctl.sieve.active.tolist())
        assert not seen & set(tr.ctl.sieve.removed.tolist())


def test_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("keep me")
    with pytest.raises(SpfdeError, match="not a spfde run .*choose another --out"):
        train(tiny_cfg(), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "x").read_text() == "keep me"
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")  # a run folder: resume it or --force
    with pytest.raises(SpfdeError, match="--resume"):
        train(tiny_cfg(), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "x").read_text() == "keep me"


def test_truncated_and_foreign_checkpoints(tmp_path):
    from spfde.utils import file_sha256, write_sha256

    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SpfdeError, match="cannot be verified"):  # no checksum beside it
        load_checkpoint(bad)
    write_sha256(bad, file_sha256(bad))  # the checksum matches: the content itself is refused
    with pytest.raises(SpfdeError, match="truncated or not a spfde checkpoint"):
        load_checkpoint(bad)
    torch.save({"model": {}}, bad)
    write_sha256(bad, file_sha256(bad))
    with pytest.raises(SpfdeError, match="not a spfde checkpoint"):
        load_checkpoint(bad)
    r = cli("train", "--resume", str(tmp_path / "nothing-here"))  # not a run: a usage error
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_resume_in_process_matches(tmp_path):
    full = train(tiny_cfg(*SPFDE), tmp_path / "full", quiet=True)
    cfg = tiny_cfg(*SPFDE)
    part = tmp_path / "part"
    part.mkdir()
    from spfde.config import dump_config

    (part / "config.yaml").write_text(dump_config(cfg))
    tr = Trainer(cfg, part, quiet=True)
    # train two epochs, checkpointing like run() does, then abandon the trainer
    for epoch in range(2):
        m = tr.train_epoch(epoch)
        tr.metrics.append({"epoch": epoch, **m, "test_acc": None, "wall_s": 0.0})
        tr.checkpoint(epoch)
    resumed = resume(part, quiet=True)
    assert resumed["weights_sha256"] == full["weights_sha256"]


@pytest.mark.slow
def test_sigkill_and_resume_bit_identical(tmp_path):
    (tmp_path / "tiny.yaml").write_text("seed: 0\n")
    args = ["--config", str(tmp_path / "tiny.yaml")] + [a for kv in TINY + SPFDE + ["train.epochs=6"]
                                                         for a in ("--set", kv)]
    ref = cli("train", "--out", str(tmp_path / "ref"), "--quiet", *args)
    assert ref.returncode == 0, ref.stderr
    ref_sha = json.loads((tmp_path / "ref" / "summary.json").read_text())["weights_sha256"]

    run = tmp_path / "killed"
    for kill_after_checkpoints in (1, 3):
        proc = subprocess.Popen([sys.executable, "-m", "spfde.cli", "train", "--out", str(run), "--quiet", "--force",
                                 *args] if kill_after_checkpoints == 1 else
                                [sys.executable, "-m", "spfde.cli", "train", "--resume", str(run), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        target = kill_after_checkpoints
        while time.time() < deadline and proc.poll() is None:
            lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
            if len(lines) >= target:
                time.sleep(0.05)  # land somewhere inside the next epoch
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "summary.json").exists()
    r = cli("train", "--resume", str(run), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_sha256"] == ref_sha
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(6))


def test_ledger_savings_match_the_freezing_plan(tmp_path):
    """Issue 8: the FLOPs the ledger saved equal the plan's prediction within one iteration."""
    cfg = tiny_cfg(*SPFDE)
    tr = Trainer(cfg, tmp_path, quiet=True)
    for epoch in range(cfg.train.epochs):
        tr.train_epoch(epoch)
    ctl = tr.ctl
    without = ctl.planned_flops(with_freezing=False)["train_flops"]
    saved = without - ctl.ledger.total_flops
    one_iteration = 3 * sum(ctl.layer_flops.values()) * cfg.data.batch_size
    assert saved > 0
    assert abs(saved - ctl.plan.predicted_reduction * without) <= one_iteration
    assert ctl.plan.algorithm1_reduction >= cfg.freezing.target  # the default planner: Algorithm 1 as written


def test_ledger_savings_match_algorithm_1_arithmetic(tmp_path):
    """With a constant density (SET), what the ledger saved is Algorithm 1's own sum, not just the replay:
    Σ_i BpFlops(block_i) × (T − freeze epoch of block i)."""
    cfg = tiny_cfg("sparsity.method=set", "sparsity.target=0.8", "freezing.target=0.1", "freezing.tfrz=auto",
                   "sieving.method=circular", "sieving.ratio=0.25")
    tr = Trainer(cfg, tmp_path, quiet=True)
    for epoch in range(cfg.train.epochs):
        tr.train_epoch(epoch)
    ctl = tr.ctl
    bp = ctl.freeze_plan_inputs()["block_bp_flops"]
    names = [b.name for b in ctl.blocks]
    algorithm_1 = sum(bp[names.index(name)] * (cfg.train.epochs - f) for name, f in ctl.plan.blocks)
    without = ctl.planned_flops(with_freezing=False)["train_flops"]
    saved = without - ctl.ledger.total_flops
    one_iteration = 3 * sum(ctl.layer_flops.values()) * cfg.data.batch_size
    assert ctl.plan.blocks and abs(saved - algorithm_1) <= one_iteration
    assert saved / without >= cfg.freezing.target


def test_rigl_ledger_matches_plan_with_a_short_last_batch(tmp_path):
    """RigL's dense-gradient step is the epoch's last one (its gradient is the one kept); with a
    short last batch the ledger still spends exactly what the plan predicts."""
    cfg = tiny_cfg("data.synthetic_size=250", "sparsity.method=rigl", "sparsity.target=0.8",
                   "sparsity.search_end=3", "train.epochs=3")
    tr = Trainer(cfg, tmp_path, quiet=True)
    ctl = tr.ctl
    assert ctl.train_size % cfg.data.batch_size  # the last batch really is short
    rows = [tr.train_epoch(epoch) for epoch in range(cfg.train.epochs)]
    density = ctl.sparsity.layer_density()  # RigL drops and grows as many: constant density
    n, b = ctl.train_size, cfg.data.batch_size
    sparse_epoch = ctl.ledger.cost(n, density)
    last = n - b * (n // b)
    for e, row in enumerate(rows):
        surcharge = ctl.ledger.dense_grad_surcharge(last, density) if ctl.sparsity.needs_dense_grad(e) else 0
        assert row["train_flops"] == round(sparse_epoch + surcharge), e
    assert any(ctl.sparsity.needs_dense_grad(e) for e in range(cfg.train.epochs))
    assert ctl.ledger.total_flops == ctl.planned_flops()["train_flops"]


@pytest.mark.parametrize("backward", ["paper", "exact"])
def test_bp_flops_saved_is_what_freezing_took_off_the_ledger(tmp_path, backward):
    cfg = tiny_cfg("sparsity.method=set", "sparsity.target=0.8", "freezing.target=0.1", "freezing.tfrz=auto",
                   f"accounting.backward={backward}")
    tr = Trainer(cfg, tmp_path, quiet=True)
    rows = [tr.train_epoch(epoch) for epoch in range(cfg.train.epochs)]
    without = tr.ctl.planned_flops(with_freezing=False)["epoch_flops"]
    assert any(r["bp_flops_saved"] > 0 for r in rows)
    for e, row in enumerate(rows):
        assert abs(row["bp_flops_saved"] - (without[e] - row["train_flops"])) <= 2, e
