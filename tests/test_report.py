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
    expected = [run / "plots" / f"{n}.png" for n in ("accuracy", "loss", "flops_vs_accuracy", "accuracy_vs_time")]
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
    # each plot is preceded by the one question it answers
    for p in expected:
        i = md.index(f"]({p.relative_to(run).as_posix()})")
        question = md[:i].rstrip().rsplit("\n\n", 2)[-2].strip()
        assert question.startswith("**") and question.endswith("?**"), (p.name, question)
    # the FLOPs saving never stands alone: wall-clock beside it, and what it does not measure
    assert "FLOPs 20.0% below dense (the ledger's count); wall-clock 6.0 s (no dense run" in md


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
    # a field the plots compute with, hand-edited to text: named, not a TypeError inside matplotlib
    (bad / "metrics.jsonl").write_text('{"epoch": 0, "test_acc": 0.5}\n{"epoch": 1, "test_acc": "x"}\n')
    with pytest.raises(SpfdeError, match="line 2: field 'test_acc' is 'x', expected a number"):
        write_report([bad])
    (bad / "metrics.jsonl").write_text('{"epoch": 0, "test_acc": 0.5}\n')
    _set_summary(bad, final_test_acc="high")
    with pytest.raises(SpfdeError, match="summary.json.*'final_test_acc' is 'high'"):
        write_report([bad])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SpfdeError, match="is a file, not a folder"):
        write_report([tmp_path / "afile"])
    assert report_main([str(tmp_path / "missing_dir")]) == 1


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "config.yaml"])
def test_report_and_compare_name_a_run_file_that_is_not_text(tmp_path, capsys, name):
    """A run file overwritten with binary bytes (another file's, a disk fault) is one error naming
    it, as a damaged JSON line is, not a UnicodeDecodeError traceback."""
    run = make_fake_run(tmp_path, "run")
    (run / name).write_bytes(b'{"epoch": 0, "x": "\x80\xff"}\n')
    want = rf"cannot read '.*{name}': it is not UTF-8 text \(byte 0x80 at offset 19\); is the file damaged\?"
    with pytest.raises(SpfdeError, match=want):
        write_report([run])
    assert report_main([str(run)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    if name == "summary.json":  # compare skips the run with that line, like any unfinished one
        notes: list[str] = []
        with pytest.raises(SpfdeError, match=want):
            compare_runs([run], notes=notes)


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


# --------------------------------------------------------------------------------------------
# each plot shows what it claims to (issue 16, item 9): data series and axis ranges


def _lines(drawn, ax=0):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in drawn.axes[ax].get_lines()}


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _rewrite(run: Path, rows: list[dict]) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lr_plot_groups_shared_schedules_and_says_block_wise_only_when_it_is(tmp_path):
    from spfde.report import load_run
    from spfde.report.plots import plot_lr

    run = make_fake_run(tmp_path, "r")
    rows = _rows(run)
    for r in rows:  # eleven blocks: two freeze, nine share the global cosine
        lr = r["lr"]
        r["block_lr"] = {f"b{i}": lr for i in range(11)}
        r["block_lr"]["b0"] = lr / 4
        r["block_lr"]["b1"] = lr / 2
        r["frozen_blocks"] = ["b0"] if r["epoch"] >= 2 else []
    _rewrite(run, rows)
    drawn = plot_lr(load_run(run), tmp_path / "lr.png")
    lines = _lines(drawn)
    # no line hides under another: one per distinct curve, shared ones named together
    assert set(lines) == {"b0", "b1", "b2 … b10 (9 blocks)"}
    assert lines["b0"][0] == [0, 1]  # a block's line ends when it freezes
    assert lines["b1"][1] == pytest.approx([r["lr"] / 2 for r in rows])
    assert "block-wise" in drawn.axes[0].get_title() and drawn.axes[0].get_ylim()[0] == 0
    assert "froze" in drawn.question

    for r in rows:  # a dense run: every group on the one cosine, nothing frozen
        r["block_lr"] = {"all": r["lr"]}
        r["frozen_blocks"] = []
    _rewrite(run, rows)
    drawn = plot_lr(load_run(run), tmp_path / "lr.png")
    assert list(_lines(drawn)) == ["all param groups"] and "block-wise" not in drawn.axes[0].get_title()


def test_density_plot_keeps_dense_layers_apart_and_skips_a_dense_run(tmp_path):
    from spfde.report import load_run
    from spfde.report.plots import plot_density

    run = make_fake_run(tmp_path, "r", sparsity=0.85)
    drawn = plot_density(load_run(run), tmp_path / "d.png")
    heat = drawn.axes[0].get_images()
    sparse_img, dense_img = heat[0], heat[1]
    # the colour scale spans the masked layers only (15%), the dense stem is its own grey layer
    assert sparse_img.get_clim() == pytest.approx((14.0, 16.0))
    assert bool(sparse_img.get_array().mask[0].all()) and not dense_img.get_array().mask[0].any()
    assert bool(dense_img.get_array().mask[1:].all())
    assert "grey: dense" in drawn.axes[0].get_title()
    rows = _rows(run)
    for r in rows:
        r["layer_density"] = {k: 1.0 for k in r["layer_density"]}
        r["density"] = 1.0
    _rewrite(run, rows)
    note = plot_density(load_run(run), tmp_path / "d2.png")
    assert isinstance(note, str) and "dense run" in note and not (tmp_path / "d2.png").exists()


def test_sieve_plot_shows_rotation_and_never_seen(tmp_path):
    from spfde.report import load_run
    from spfde.report.plots import plot_sieve

    run = make_fake_run(tmp_path, "r")
    rows = _rows(run)
    for r, never in zip(rows, [20, 12, 4, 0], strict=True):  # a constant partial set that rotates
        r["active_samples"] = 80
        r["returned"] = r["removed_this_update"] = 8 if r["epoch"] else 0
        r["never_seen_count"] = never
    _rewrite(run, rows)
    drawn = plot_sieve(load_run(run), tmp_path / "s.png")
    bars = drawn.axes[0].containers
    assert [[p.get_height() for p in c] for c in bars] == [[0, 8, 8, 8], [0, 8, 8, 8]]
    assert [c.get_label() for c in bars][0].startswith("returned")
    assert _lines(drawn, 1)["never trained on yet (never_seen_count)"][1] == [20, 12, 4, 0]
    assert drawn.axes[1].get_ylim()[0] == 0 and "rotate" in drawn.question


def test_forgetting_plot_shows_every_update_as_honest_shares(tmp_path):
    from spfde.report import load_run
    from spfde.report.plots import FORGETTING_BINS, plot_forgetting

    run = make_fake_run(tmp_path, "r", full=False)
    hists = [(e, {-1: 10 + e, 0: 50, 1: 5, 4: e}) for e in range(1, 10)]  # nine updates
    drawn = plot_forgetting(load_run(run), hists, tmp_path / "f.png")
    a = drawn.axes[0]
    assert a.get_yscale() == "linear" and a.get_ylim() == (0.0, 100.0)
    stacks = a.containers
    assert len(stacks) == len(FORGETTING_BINS)
    assert [p.get_x() + p.get_width() / 2 for p in stacks[0]] == list(range(1, 10))  # all nine updates
    for j, (_, h) in enumerate(hists):
        heights = [c[j].get_height() for c in stacks]
        total = sum(h.values())
        assert heights == pytest.approx([100 * (10 + j + 1) / total, 100 * 50 / total, 100 * 5 / total, 0.0,
                                         100 * (j + 1) / total])
        assert sum(heights) == pytest.approx(100.0)


def test_memory_axis_starts_at_zero(tmp_path):
    from spfde.report import load_run
    from spfde.report.plots import plot_memory

    run = make_fake_run(tmp_path, "r")
    rows = _rows(run)
    for r, mib in zip(rows, [159, 150, 130, 121], strict=True):
        r["mem_model_bytes"], r["mem_model_unfrozen_bytes"] = mib * 2**20, 159 * 2**20
    _rewrite(run, rows)
    drawn = plot_memory(load_run(run), tmp_path / "m.png")
    lo, hi = drawn.axes[0].get_ylim()
    assert lo == 0 and hi >= 159
    assert _lines(drawn)["modelled training memory (mem_model_bytes)"][1] == pytest.approx([159, 150, 130, 121])


def test_flops_vs_accuracy_has_a_dense_reference(tmp_path):
    from spfde.report import load_runs
    from spfde.report.plots import plot_flops_vs_accuracy

    a = make_fake_run(tmp_path, "sparse")
    drawn = plot_flops_vs_accuracy(load_runs([a]), tmp_path / "fa.png")
    ref = _lines(drawn)["dense training, same epochs (sparse)"]
    assert ref[0] == [1.0, 1.0]  # dense_train_flops = 1e12: where a dense run of the same epochs ends
    assert drawn.axes[0].get_xlim()[0] == 0 and drawn.axes[0].get_xlim()[1] > 1.0
    # with a dense run among the runs, that run is the reference
    dense = make_fake_run(tmp_path, "dense", full=False, sparsity=0.0)
    cfg = yaml.safe_load((dense / "config.yaml").read_text())
    cfg["sparsity"] = {"method": "dense", "target": 0.0}
    (dense / "config.yaml").write_text(yaml.safe_dump(cfg))
    summ = json.loads((dense / "summary.json").read_text())
    (dense / "summary.json").write_text(json.dumps({**summ, "method": "dense", "sparsity": 0.0,
                                                    "freeze_target": 0.0, "sieve_ratio": 0.0}))
    labels = set(_lines(plot_flops_vs_accuracy(load_runs([a, dense]), tmp_path / "fb.png")))
    assert labels == {"sparse", "dense (dense run)"}


def test_summary_table_shows_every_fraction_as_percent(tmp_path):
    run = make_fake_run(tmp_path, "r")
    summ = json.loads((run / "summary.json").read_text())
    summ.update(mem_saving_avg=0.4147, mem_saving_min=0.6786, samples_per_s=393.2,
                time_to_acc={"0.50": 13.94, "0.80": None}, time_to_final_acc_s=25.6)
    (run / "summary.json").write_text(json.dumps(summ))
    md = write_report([run], probe=torch.randn(4, 1, 8, 8)).read_text()
    for row in ("| mem_saving_avg | 41.47 % |", "| mem_saving_min | 67.86 % |", "| flops_saving | 20.00 % |",
                "| sparsity | 80.00 % |", "| samples_per_s | 393 /s |", "| time_to_final_acc_s | 25.6 s |",
                "| time_to_acc | 50%: 13.9 s, 80%: - |"):
        assert row in md, row


def test_summary_table_shows_every_fraction_as_percent_and_flops_with_si_prefixes(tmp_path):
    """Audit M1: the fields outside the fixed list (freeze_reduction, the forward FLOPs per sample)
    were shown as raw fractions and integers, and FLOPs as x1e12."""
    run = make_fake_run(tmp_path, "r")
    summ = json.loads((run / "summary.json").read_text())
    summ.update(freeze_reduction=0.1234, freeze_backward_reduction=0.0987, weight_forward_flops_per_sample=40_960_000,
                attention_forward_flops_per_sample=0, dense_train_flops=int(1.13e15))
    (run / "summary.json").write_text(json.dumps(summ))
    md = write_report([run], probe=torch.randn(4, 1, 8, 8)).read_text()
    for row in ("| freeze_reduction | 12.34 % |", "| freeze_backward_reduction | 9.87 % |",
                "| train_flops | 800 GFLOPs |", "| dense_train_flops | 1.13 PFLOPs |",
                "| weight_forward_flops_per_sample | 41.0 MFLOPs /sample |",
                "| attention_forward_flops_per_sample | 0.00 FLOPs /sample |", "| flops_saving | 20.00 % |"):
        assert row in md, row
    assert "×1e12" not in md.split("## Summary")[1].split("\n## ")[0]  # the summary section


# --------------------------------------------------------------------------------------------
# compare: wall-clock beside FLOPs, time to accuracy, runs/* with strays, different data


def _set_summary(run: Path, **kw) -> None:
    s = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**s, **kw}))


def test_compare_skips_non_runs_and_warns_about_different_data(tmp_path, capsys):
    a = make_fake_run(tmp_path, "a", full=False)
    b = make_fake_run(tmp_path, "b", full=False, sparsity=0.9)
    _set_summary(a, train_size=2000, dataset="fashion_mnist")
    _set_summary(b, train_size=20000, dataset="fashion_mnist")
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.txt").write_text("x")
    running = make_fake_run(tmp_path, "running", summary=False, full=False)
    notes: list[str] = []
    rows = compare_runs([a, b, tmp_path / "notes", tmp_path / "README.txt", running], notes=notes)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert sum("skipped" in n for n in notes) == 3 and any("running" in n and "not finished" in n for n in notes)
    assert any("different data" in n and "2000" in n and "20000" in n for n in notes)
    # the command line: same table on stdout, the notes on stderr
    assert compare_main([str(p) for p in (a, b, tmp_path / "notes")]) == 0
    out, err = capsys.readouterr()
    assert "note: skipped" in err and "different data" in err and "note:" not in out
    with pytest.raises(SpfdeError, match="no finished run"):
        compare_runs([tmp_path / "notes"])
    # one run named twice is one seed, not two with a spread of 0
    notes = []
    rows = compare_runs([a, tmp_path / "." / "a"], notes=notes)
    assert rows[0]["n"] == 1 and any("the same run as" in n for n in notes)
    # the report says what compare says about runs on different data
    assert "different data" in write_report([a, b], out_dir=tmp_path / "rep").read_text()


def test_compare_puts_wall_clock_beside_flops_and_time_to_a_common_accuracy(tmp_path):
    sparse = make_fake_run(tmp_path, "sparse", full=False, final_acc=0.8)
    dense = make_fake_run(tmp_path, "dense", full=False, final_acc=0.6, sparsity=0.0)
    _set_summary(sparse, wall_s=6.0)
    _set_summary(dense, wall_s=8.0, method="dense", sparsity=0.0, freeze_target=0.0, sieve_ratio=0.0,
                 flops_saving=0.0)
    rows = {r["name"]: r for r in compare_runs([sparse, dense])}
    assert rows["sparse"]["dense_ref"] == "dense" and rows["sparse"]["wall_saving"] == pytest.approx(0.25)
    assert rows["dense"]["wall_saving"] is None
    # accuracy 0.8·(e+1)/4 and 0.6·(e+1)/4 at wall 1.5·(e+1) (epoch 1 not evaluated): common = 60% - 0.5
    assert rows["sparse"]["common_acc"] == pytest.approx(0.595)
    assert rows["sparse"]["time_to_common_acc_s"] == pytest.approx(4.5)  # 0.8·3/4 = 0.6 at epoch 2
    assert rows["dense"]["time_to_common_acc_s"] == pytest.approx(6.0)
    assert rows["sparse"]["time_to_final_acc_s"] == pytest.approx(6.0)
    table = format_compare_table(list(rows.values()))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert header.index("wall-clock s") == header.index("FLOPs saving %") + 1
    assert cells[header.index("wall-clock saving %")] == "25.0"
    assert cells[header.index("s to common acc")] == "4.5"
    from spfde.report.compare import compare_footnotes

    assert "against the dense run `dense`" in " ".join(compare_footnotes(list(rows.values())))
    alone = compare_runs([sparse])
    assert alone[0]["wall_saving"] is None and "not measured" in compare_footnotes(alone)[0]
