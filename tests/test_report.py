"""Tests of spfde.report: plots and report.md/html from a fake run directory, and compare_runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from spfde.analysis import save_forgetting_histogram, save_snapshot
from spfde.errors import SpfdeError
from spfde.models import create_model
from spfde.report import compare_main, compare_runs, format_compare_table, report_main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPOCHS = 4


def _config(seed: int = 0, model: str = "resnet20", sparsity: float = 0.8, freeze: float = 0.2,
            sieve: float = 0.2) -> dict:
    return {"seed": seed, "data": {"name": "synthetic"}, "model": {"name": model, "width": 0.25},
            "train": {"epochs": EPOCHS, "interval": 2, "device": "cpu"},
            "sparsity": {"method": "mest", "target": sparsity},
            "freezing": {"target": freeze}, "sieving": {"method": "circular", "ratio": sieve},
            "analysis": {"snapshots": True, "grad_norms": True, "probe_size": 16}}


def make_fake_run(root: Path, name: str, *, seed: int = 0, final_acc: float = 0.5, full: bool = True,
                  sparsity: float = 0.8, summary: bool = True, model: str = "resnet20") -> Path:
    """A run directory with the documented files (docs/design.md, "Run outputs"), no training."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config(seed, model, sparsity, 0.2 if full else 0.0,
                                                            0.2 if full else 0.0)))
    blocks = ["stem", "layer1", "layer2", "layer3", "head"]
    rows = []
    for e in range(EPOCHS):
        acc = final_acc * (e + 1) / EPOCHS
        row = {"epoch": e, "lr": 0.1 * (1 - e / EPOCHS), "train_loss": 2.0 - 0.3 * e, "train_acc": acc + 0.05,
               "test_acc": acc if e != 1 else None, "test_loss": 2.1 - 0.3 * e if e != 1 else None,
               "wall_s": 1.5 * (e + 1), "epoch_s": 1.5, "train_flops": int(2e11),
               "cum_train_flops": int(2e11 * (e + 1)),
               "density": 1 - sparsity, "layer_density": {"stem.0": 1.0, "layer1.0.conv1": 1 - sparsity,
                                                          "head.fc": 1 - sparsity},
               "frozen_blocks": [], "active_samples": 100, "returned": 0, "removed_this_update": 0,
               "never_seen_count": 0, "samples_seen": 100 * (e + 1), "peak_mem_bytes": None,
               "mem_model_bytes": 3 * 2**20}
        if full:
            row["frozen_blocks"] = ["stem", "layer1"][: max(0, e - 1)]
            row["block_lr"] = {b: 0.1 * (1 - e / EPOCHS) / (1 + i) for i, b in enumerate(blocks)}
            row["active_samples"] = 80 if e < 2 else 85
            row["returned"] = 5 if e == 2 else 0
            row["removed_this_update"] = 5 if e == 2 else 0
            row["grad_norms"] = {"stem.0": 1.0 / (e + 1), "layer1.0.conv1": 0.5 + 0.1 * e, "head.fc": 0.2}
            row["mem_model_bytes"] = (3 - 0.5 * len(row["frozen_blocks"])) * 2**20
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (run / "summary.json").write_text(json.dumps({
            "final_test_acc": final_acc, "best_test_acc": final_acc, "epochs": EPOCHS, "wall_s": 6.0,
            "seed": seed, "weights_sha256": "ab" * 32, "train_flops": int(8e11), "dense_train_flops": int(1e12),
            "flops_saving": 0.2, "method": "mest", "sparsity": sparsity, "freeze_target": 0.2,
            "sieve_ratio": 0.2, "peak_mem_bytes": None, "mem_model_avg_bytes": 2.5 * 2**20,
            "mem_model_min_bytes": 2 * 2**20}))
    if full:
        save_forgetting_histogram(run, 2, {0: 60, 1: 15, 3: 5})
        save_forgetting_histogram(run, 4, [50, 20, 10])
        torch.manual_seed(seed)
        m = create_model("resnet20", num_classes=3, in_channels=1, width=0.25)
        g = torch.Generator().manual_seed(seed)
        for e in (0, 2, 3):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
            masks = {n: torch.rand(p.shape, generator=g) > sparsity for n, p in m.named_parameters()
                     if p.dim() == 4 and n != "stem.0.weight"}
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n in masks:
                        p.mul_(masks[n])
            save_snapshot(run, e, m, masks)
    return run


def _assert_png(path: Path) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


PER_RUN = ("lr", "density", "freezing", "sieve", "forgetting", "memory", "grad_norms", "structural_similarity",
           "cka")


def test_report_full_run_has_every_plot_and_links_them(tmp_path):
    run = make_fake_run(tmp_path, "spfde_run")
    probe = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = write_report([run], probe=probe)
    assert path == run / "report.md"
    md = path.read_text()
    expected = [run / "plots" / f"{n}.png" for n in ("accuracy", "loss", "flops_vs_accuracy")]
    expected += [run / "plots" / "spfde_run" / f"{n}.png" for n in PER_RUN]
    for p in expected:
        _assert_png(p)
        assert f"]({p.relative_to(run).as_posix()})" in md
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == sorted(p.relative_to(run).as_posix() for p in expected)
    assert "Skipped" not in md
    # the summary table shows summary.json's fields
    assert "| final_test_acc | 50.00 % |" in md
    assert "flops_saving" in md and "weights_sha256" in md


def test_report_skips_plots_without_data_and_compares_runs(tmp_path):
    a = make_fake_run(tmp_path, "full", final_acc=0.6)
    b = make_fake_run(tmp_path, "plain", full=False, final_acc=0.4, sparsity=0.5)
    out = tmp_path / "rep"
    path = write_report([a, b], out_dir=out, fmt="html", probe=torch.randn(8, 1, 8, 8))
    assert path == out / "report.html"
    text = path.read_text()
    for n in ("freezing", "sieve", "forgetting", "grad_norms", "structural_similarity", "cka"):
        assert not (out / "plots" / "plain" / f"{n}.png").exists()
        _assert_png(out / "plots" / "full" / f"{n}.png")
    assert "no block was frozen" in text and "no data sieving" in text and "analysis.snapshots=true" in text
    for src in re.findall(r'<img src="([^"]+)"', text):
        _assert_png(out / src)
    assert "Comparison" in text and "60.00 ± 0.00" in text


def test_report_cka_skipped_with_note_when_model_cannot_be_built(tmp_path):
    run = make_fake_run(tmp_path, "r", model="no_such_model")
    md = write_report([run], probe=torch.randn(4, 1, 8, 8)).read_text()
    assert "linear CKA (r) skipped" in md and "no_such_model" in md
    assert not (run / "plots" / "r" / "cka.png").exists()
    _assert_png(run / "plots" / "r" / "structural_similarity.png")


def test_report_errors_name_the_directory(tmp_path):
    with pytest.raises(SpfdeError, match="missing_dir"):
        write_report([tmp_path / "missing_dir"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpfdeError, match="empty"):
        write_report([tmp_path / "empty"])
    bad = make_fake_run(tmp_path, "bad", full=False)
    (bad / "metrics.jsonl").write_text('{"epoch": 0}\n{oops\n')
    with pytest.raises(SpfdeError, match="line 2"):
        write_report([bad])
    assert report_main([str(tmp_path / "missing_dir")]) == 1


def test_compare_groups_seeds_mean_std(tmp_path, capsys):
    accs = [0.5, 0.6, 0.8]
    seeds = [make_fake_run(tmp_path, f"mest_s{i}", seed=i, final_acc=acc, full=False)
             for i, acc in enumerate(accs)]
    other = make_fake_run(tmp_path, "mest90", seed=0, final_acc=0.3, sparsity=0.9, full=False)
    rows = compare_runs(seeds + [other])
    assert len(rows) == 2
    g = rows[0]
    mean = sum(accs) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in accs) / 2)
    assert g["n"] == 3 and sorted(g["seeds"]) == [0, 1, 2]
    assert g["acc_mean"] == pytest.approx(mean) and g["acc_std"] == pytest.approx(std)
    assert g["flops_saving"] == pytest.approx(0.2) and g["train_flops"] == pytest.approx(8e11)
    assert rows[1]["n"] == 1 and rows[1]["acc_std"] == 0.0 and rows[1]["sparsity"] == 0.9
    table = format_compare_table(rows)
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in table
    assert len(table.strip().splitlines()) == 4 and "FLOPs saving" in table
    assert compare_main([str(p) for p in seeds] + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["n"] == 3
    unfinished = make_fake_run(tmp_path, "running", summary=False, full=False)
    with pytest.raises(SpfdeError, match="running"):
        compare_runs([unfinished])


def test_tensorboard_scalars_and_logger():
    from spfde.report import TensorBoardLogger, metrics_to_scalars

    row = {"epoch": 3, "lr": 0.1, "test_acc": None, "layer_density": {"conv": 0.2}, "frozen_blocks": ["a", "b"],
           "sparsity_updated": True, "method": "mest"}
    assert metrics_to_scalars(row) == {"lr": 0.1, "layer_density/conv": 0.2, "frozen_blocks/count": 2.0,
                                       "sparsity_updated": 1.0}

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def flush(self):
            pass

    w = Writer()
    TensorBoardLogger("unused", writer=w).log_epoch(row)
    assert ("layer_density/conv", 0.2, 3) in w.calls and len(w.calls) == 4
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SpfdeError, match="pip install tensorboard"):
            TensorBoardLogger("unused")
