"""The command line: flops, plan, models, reproduce, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spfde.reproduce import TABLES, grid, run_dir, write_table


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spfde.cli", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("s, paper", [(0.9, 1.32e15), (0.95, 0.66e15), (0.98, 0.26e15)])
def test_flops_reproduces_table2_set(s, paper):
    r = cli("flops", "--config", "cifar100-resnet32x2", "--json", "--set", "sparsity.method=set",
            "--set", f"sparsity.target={s}", "--set", "sparsity.dense_first_layer=false",
            "--set", "freezing.target=0", "--set", "sieving.ratio=0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ["train_flops", "dense_train_flops", "dense_forward_flops_per_sample"]:
        assert key in out
    assert abs(out["dense_forward_flops_per_sample"] - 551e6) / 551e6 < 0.01
    # Table 2 prints two decimals (x 1e15): agree to those
    assert round(out["train_flops"] / 1e15, 2) == round(paper / 1e15, 2)


def test_flops_counts_freezing_and_sieving():
    base = ["flops", "--config", "cifar100-resnet32x2", "--json"]
    plain = json.loads(cli(*base, "--set", "freezing.target=0", "--set", "sieving.ratio=0").stdout)
    spfde = json.loads(cli(*base).stdout)  # 20% freezing + 20% sieving
    saving = 1 - spfde["train_flops"] / plain["train_flops"]
    # (1 - 0.2) * (1 - 0.2) = 0.64 -> about 36% (Table A10's "36% (20%+20%)")
    assert 0.33 < saving < 0.40, saving


def test_plan_json_contract():
    r = cli("plan", "--config", "cifar100-resnet32x2", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert {"tfrz", "blocks", "predicted_reduction"} <= set(plan)
    # the default planner is Algorithm 1 as written (Table A4: Tfrz 60 for 20%); the exact ledger's
    # total and backward-only reductions are reported beside its arithmetic
    assert plan["planner"] == "algorithm1" and plan["tfrz"] == 60 and plan["algorithm1_reduction"] >= 0.2
    assert 0.15 < plan["backward_reduction"] < plan["predicted_reduction"] < 0.2
    r = cli("plan", "--config", "cifar100-resnet32x2", "--json", "--set", "freezing.planner=exact")
    exact = json.loads(r.stdout)
    assert exact["planner"] == "exact" and exact["predicted_reduction"] >= 0.2 and exact["tfrz"] < 60
    epochs = [b["freeze_epoch"] for b in plan["blocks"]]
    assert epochs == sorted(epochs) and epochs[0] == plan["tfrz"]
    assert all(e - plan["tfrz"] == 5 * i for i, e in enumerate(epochs))  # Δτ = 5 apart
    assert plan["blocks"][0]["name"] == "stem"


def test_plan_unreachable_target_is_a_clear_error():
    # the preset says freezing.unreachable: reduce; a user's `error` refuses the target
    r = cli("plan", "--config", "cifar100-resnet32x2", "--set", "freezing.target=0.9",
            "--set", "freezing.unreachable=error")
    # a config error (issue 15): exit 2
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr


def test_a_shortened_preset_plans_what_it_can_with_one_warning_line():
    """Audit H6 / issue 16 item 3: `--set train.epochs=4` on the demo used to stop on an unreachable
    freezing target; the presets set freezing.unreachable: reduce."""
    r = cli("plan", "--config", "fmnist-demo", "--set", "train.epochs=4", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    plan = json.loads(r.stdout)
    assert plan["reduced"] is True and plan["blocks"] and 0 < plan["predicted_reduction"] < 0.15
    [warning] = [line for line in r.stderr.splitlines() if "FreezingWarning" in line]
    assert "freezing.target = 15.00% is unreachable in train.epochs = 4" in warning
    assert f"{100 * plan['predicted_reduction']:.2f}% by the exact ledger" in warning


@pytest.mark.parametrize("preset", ["cifar100-resnet32x2", "fmnist-demo", "fmnist-vit"])
def test_every_preset_plans_when_shortened(preset):
    """Audit H6: every shipped preset plans at any short train.epochs (freezing.unreachable: reduce):
    the target where the schedule reaches it, else as much as it allows, flagged."""
    import warnings

    from spfde.config import list_presets, load_config
    from spfde.freezing import FreezingWarning
    from spfde.planning import planned_run

    assert preset in list_presets() and len(list_presets()) == 3  # a new preset: add it above
    for epochs in (2, 3, 4, 6):
        cfg = load_config(preset, [f"train.epochs={epochs}", "data.subset=256"])
        assert cfg.freezing.unreachable == "reduce"
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always", FreezingWarning)
            plan = planned_run(cfg)["plan"]
        reduced = plan.get("reduced", False)
        assert reduced == any(issubclass(w.category, FreezingWarning) for w in rec)
        assert reduced or plan["algorithm1_reduction"] >= cfg.freezing.target - 1e-9, (epochs, plan)


def test_models_lists_registry():
    r = cli("models")
    assert r.returncode == 0 and "resnet32" in r.stdout and "resnet50" in r.stdout


def test_unknown_model_and_missing_data_errors(tmp_path):
    r = cli("train", "--config", "fmnist-demo", "--set", "model.name=resnet1000", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "resnet1000" in r.stderr and "resnet20" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists()  # a run that cannot start leaves nothing behind
    r = cli("train", "--config", "fmnist-demo", "--set", "data.name=cifar10", "--set",
            f"data.root={tmp_path / 'nowhere'}", "--out", str(tmp_path / "b"))
    assert r.returncode == 1 and "cifar" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (tmp_path / "b").exists()
    # an explicit data.root is the only place looked at: no silent fallback to another copy
    r = cli("train", "--config", "fmnist-demo", "--set", f"data.root={tmp_path / 'nowhere'}", "--out",
            str(tmp_path / "c"))
    assert r.returncode == 1 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    # --force does not delete the old run when the new one cannot start
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text("{}")
    (old / "config.yaml").write_text("seed: 0\n")  # a run folder: the only kind --force overwrites
    r = cli("train", "--config", "fmnist-demo", "--set", "data.name=imagefolder", "--out", str(old), "--force")
    assert r.returncode == 2 and "data.root" in r.stderr and (old / "summary.json").exists()
    r = cli("train", "--config", "fmnist-demo", "--set", "data.name=cifar10", "--set",
            f"data.root={tmp_path / 'nowhere'}", "--out", str(old), "--force")  # fails inside the trainer
    assert r.returncode == 1 and (old / "summary.json").exists() and "Traceback" not in r.stderr
    # --force never deletes a folder that is not a run, nor the current folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    r = cli("train", "--config", "fmnist-demo", "--out", str(mine), "--force")
    assert r.returncode == 1 and "not a spfde run" in r.stderr and "notes.txt" in r.stderr
    assert (mine / "notes.txt").read_text() == "keep" and "--resume" not in r.stderr
    (mine / "config.yaml").write_text("seed: 0\n")
    r = cli("train", "--config", "fmnist-demo", "--out", ".", "--force", cwd=mine)
    assert r.returncode == 1 and "current folder" in r.stderr and (mine / "notes.txt").exists()
    for bad in ("optim.lr=nan", "seed=99999999999999999999"):
        r = cli("train", "--config", "fmnist-demo", "--set", bad, "--out", str(tmp_path / "d"))
        assert r.returncode == 2 and bad.split("=")[0] in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "file").write_text("x")
    r = cli("train", "--config", "fmnist-demo", "--out", str(tmp_path / "file" / "sub"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "error:" in r.stderr


def test_reproduce_grids_and_resume(tmp_path):
    for name in TABLES:
        runs = grid(name, "cpu", 2)
        ids = [f"{spec.run_id}_seed{seed}" for spec, seed, _ in runs]
        assert len(ids) == len(set(ids)), name
    with pytest.raises(Exception, match="unknown table"):
        grid("table9", "cpu", 1)
    # a finished run is skipped: fake one finished run and check the dry run's count and the table
    spec, seed, ov = grid("tableA2", "cpu", 1)[0]
    run = run_dir(tmp_path, "cpu", ov)
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"final_test_acc": 0.8, "train_flops": 2e12, "flops_saving": 0.9,
                                                  "wall_s": 10.0}))
    r = cli("reproduce", "tableA2", "--seeds", "1", "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 0 and "1 already finished, 3 to go" in r.stdout
    table = write_table("tableA2", "cpu", 1, tmp_path).read_text()
    assert "80.00" in table and "70.69" in table  # ours beside the paper's
    # runs are shared between tables: Table 2's SpFDE 20%+20% at 90% is Table A2's 30% update ratio
    t2 = {spec.run_id: run_dir(tmp_path, "cpu", ov) for spec, _, ov in grid("table2", "cpu", 1)}
    a2 = {spec.run_id: run_dir(tmp_path, "cpu", ov) for spec, _, ov in grid("tableA2", "cpu", 1)}
    assert t2["spfde20_s90"] == a2["update30"] and len(set(t2.values())) == len(t2)
    # and a setting spelled out at its default is the same run as one left out
    assert run_dir(tmp_path, "cpu", ov + ["freezing.scheme=single_shot"]) == run_dir(tmp_path, "cpu", ov)
    r = cli("reproduce", "tableA2", "--seeds", "1", "--out", str(tmp_path), "--dry-run", "--only", "update(10|20)")
    assert r.returncode == 0 and "2 distinct runs" in r.stdout
    r = cli("reproduce", "tableA2", "--only", "nope", "--dry-run", "--out", str(tmp_path))
    assert r.returncode == 1 and "update30" in r.stderr and "Traceback" not in r.stderr  # ours beside the paper's


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_reproduce_refuses_jobs_below_one_instead_of_waiting_forever(tmp_path, jobs):
    """--jobs 0 started no run and polled an empty list forever (dry run or not)."""
    for dry in ([], ["--dry-run"]):
        r = cli("reproduce", "tableA2", "--seeds", "1", "--jobs", jobs, "--out", str(tmp_path), *dry, timeout=60)
        assert r.returncode == 1 and f"error: --jobs must be at least 1, got {jobs}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "runs-cpu").exists()


def test_reproduce_treats_a_damaged_summary_as_unfinished(tmp_path):
    """A summary.json that does not read (torn, binary, a list) or lacks a field: the table is still
    written (the run's cell shows what is there) and the run is counted as not finished, so the
    sweep resumes it (which writes the summary again), instead of a traceback in the table code."""
    runs = [run_dir(tmp_path, "cpu", ov) for _, _, ov in grid("tableA2", "cpu", 1)]
    good = {"final_test_acc": 0.8, "train_flops": 2e12, "flops_saving": 0.9, "wall_s": 10.0}
    for run, text in zip(runs, ['{"final_test_acc": 0.8, "train_fl', "[1]", json.dumps(good),
                                json.dumps({"final_test_acc": 0.7})], strict=True):
        run.mkdir(parents=True)
        (run / "summary.json").write_text(text)
    r = cli("reproduce", "tableA2", "--seeds", "1", "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 0 and "2 already finished, 2 to go" in r.stdout, r.stdout + r.stderr
    assert str(runs[0]) in r.stdout and str(runs[1]) in r.stdout and str(runs[2]) not in r.stdout
    rows = {row["run_id"]: row for row in json.loads(
        write_table("tableA2", "cpu", 1, tmp_path).with_name("table.json").read_text())}
    ids = [spec.run_id for spec, _, _ in grid("tableA2", "cpu", 1)]
    assert [rows[i]["n"] for i in ids] == [0, 0, 1, 1]
    assert rows[ids[2]]["train_flops"] == 2e12 and rows[ids[3]]["train_flops"] is None
    assert abs(rows[ids[3]]["acc_mean"] - 70.0) < 1e-9


# --------------------------------------------------------------------------------------------
# small things a newcomer meets first


def test_version_and_help_on_every_option():
    import argparse

    import spfde
    from spfde.cli import _build_parser
    from spfde.reproduce import TABLE_HELP

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"spfde {spfde.__version__}"
    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "demo", "report", "compare", "reproduce", "flops", "plan", "data"):
        for action in sub.choices[name]._actions:
            assert action.help, f"spfde {name} {action.option_strings or action.dest} has no help text"
    assert set(TABLE_HELP) == set(TABLES)
    r = cli("reproduce", "--help")
    for table in TABLES:
        assert f"  {table} " in r.stdout, table


@pytest.mark.slow
def test_flops_prints_human_units_unless_json():
    from spfde.config import load_config
    from spfde.planning import planned_run
    from spfde.units import format_flops

    exact = planned_run(load_config("fmnist-demo"))["flops"]  # what --json prints
    r = cli("flops", "--config", "fmnist-demo")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert f"{format_flops(exact['train_flops'])}  ({exact['train_flops']:.3e})" in lines["train_flops"]
    assert "TFLOPs" in lines["train_flops"] and "MFLOPs" in lines["dense_forward_flops_per_sample"]
    assert lines["flops_saving"].endswith(f"{100 * exact['flops_saving']:.2f}%")


@pytest.mark.slow
def test_your_own_model_from_the_cli(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes, in_channels, hidden=8):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)\n"
        "        self.head = nn.Linear(hidden, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.head(self.conv(x).relu().mean((2, 3)))\n\n"
        "    def blocks(self):\n"
        "        return ['conv', 'head']\n")
    data = ["--set", "data.name=synthetic", "--set", "data.synthetic_size=64", "--set", "data.image_size=8",
            "--set", "train.epochs=4", "--set", "train.interval=1", "--set", "train.threads=1",
            "--set", "logging.progress=false", "--set", "model.name=my_models:Net", "--set", "model.kwargs.hidden=6",
            "--set", "sparsity.target=0.5"]
    (tmp_path / "base.yaml").write_text("{}\n")
    base = ["-c", str(tmp_path / "base.yaml")]
    # the console script, run from the folder holding the module: unlike `python -m`, it does not
    # put that folder on sys.path, so this checks the current-folder fallback
    script = Path(sys.executable).with_name("spfde")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "spfde.cli"]
    r = subprocess.run([*cmd, "train", *base, "--out", str(tmp_path / "run"), *data, "--set", "freezing.target=0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "my_models:Net" in cfg and "hidden: 6" in cfg
    r = cli("flops", *base, *data, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # this model (a conv of 6 channels on 8x8 images), not the default ResNet-20
    assert json.loads(r.stdout)["dense_forward_flops_per_sample"] < 1e5
    r = cli("plan", *base, *data, "--set", "freezing.target=0.2", "--set", "freezing.tfrz=1",
            "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [b["name"] for b in json.loads(r.stdout)["blocks"]] == ["conv"]
    r = cli("train", *base, "--out", str(tmp_path / "bad"), *data, "--set", "model.kwargs.hidde=3",
            cwd=tmp_path)
    assert r.returncode == 2 and "model.name" in r.stderr and "hidde" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_the_summary_line_puts_wall_clock_beside_the_flops_saving(capsys):
    from spfde.cli import _print_summary

    summary = {"final_test_acc": 0.76, "train_flops": 2.67e11, "dense_train_flops": 2.96e12, "flops_saving": 0.91,
               "wall_s": 87.0, "samples_per_s": 393.0}
    _print_summary(summary, "runs/a")
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "training FLOPs 267 GFLOPs, 91.0% below dense (the ledger's count)"
    assert out[2].startswith("wall-clock 87.0s (1m27s) at 393 samples/s; no dense run measured")
    _print_summary({**summary, "train_flops": 2.96e12, "flops_saving": 0.0, "wall_s": 9.0}, "runs/d")
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "wall-clock 9.0s at 393 samples/s"  # a dense run: nothing to compare with itself


def test_human_units():
    from spfde.units import format_duration, format_flops

    assert [format_flops(x) for x in (1.13e15, 3.7e13, 2.67e11, 9.996e12, 5e5)] == [
        "1.13 PFLOPs", "37.0 TFLOPs", "267 GFLOPs", "10.0 TFLOPs", "500 kFLOPs"]
    assert [format_duration(s) for s in (0.4, 45.2, 185, 3725)] == ["0s", "45s", "3m05s", "1h02m"]


def test_packaging_metadata_has_no_deprecated_license_table():
    """setuptools >= 77 prints a deprecation banner for `license = {text = ...}` at every build."""
    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in meta["build-system"]["requires"])
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]  # one place: __version__


def test_the_model_is_checked_on_one_image_before_training(tmp_path):
    """Logits of the wrong shape are refused at set-up (not an IndexError inside the loss), and lazy
    modules get their shapes from the same forward, so a LazyLinear model trains from the CLI."""
    import torch
    from torch import nn

    from spfde.errors import SpfdeError
    from spfde.train import check_model_output

    x = torch.rand(1, 1, 8, 8)
    for model, got in ((nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), r"shape \(1, 5\)"),
                       (nn.Sequential(nn.Flatten(0), nn.Linear(64, 10)), r"shape \(10,\)"),
                       (nn.Sequential(nn.Flatten(), nn.Linear(63, 10)), "forward failed on one digits image")):
        with pytest.raises(SpfdeError, match=got):
            check_model_output(model, x, 10, "digits")
    with pytest.raises(SpfdeError, match=r"the model \(Flatten\) has no parameters, so there is nothing to train"):
        check_model_output(nn.Flatten(), x, 64, "digits")  # a traceback from torch.optim.SGD before
    lazy = nn.Sequential(nn.Flatten(), nn.LazyLinear(10)).train()
    check_model_output(lazy, x, 10, "digits")
    assert lazy[1].weight.shape == (10, 64) and lazy.training
    (tmp_path / "lazy_models.py").write_text(
        "from torch import nn\n\n"
        "def net(num_classes, in_channels):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(32),\n"
        "                         nn.ReLU(), nn.Linear(32, num_classes))\n")
    (tmp_path / "base.yaml").write_text("{}\n")
    sets = [f"--set={kv}" for kv in ("data.name=synthetic", "data.synthetic_size=64", "data.image_size=8",
                                     "train.epochs=1", "train.threads=1", "logging.progress=false",
                                     "model.name=lazy_models:net", "sparsity.target=0.5", "freezing.target=0")]
    (tmp_path / "lazy_models.py").write_text((tmp_path / "lazy_models.py").read_text() + (
        "\nclass Plain(nn.Module):\n"
        "    def __init__(self, num_classes, in_channels):\n"
        "        super().__init__()\n"
        "        self.layers = [nn.Linear(in_channels * 64, num_classes)]  # a plain list: not registered\n\n"
        "    def forward(self, x):\n"
        "        return self.layers[0](x.flatten(1))\n"))
    r = cli("train", "-c", str(tmp_path / "base.yaml"), "--out", str(tmp_path / "plain"), *sets,
            "--set=model.name=lazy_models:Plain", "--set=sparsity.target=0", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Plain) has no parameters" in r.stderr, r.stderr
    r = cli("train", "-c", str(tmp_path / "base.yaml"), "--out", str(tmp_path / "run"), *sets, cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
