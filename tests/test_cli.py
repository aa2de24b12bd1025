"""The command line: flops, plan, models, reproduce, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spfde.reproduce import TABLES, grid, run_dir, write_table


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spfde.cli", *args], capture_output=True, text=True)


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
    assert plan["predicted_reduction"] >= 0.2
    epochs = [b["freeze_epoch"] for b in plan["blocks"]]
    assert epochs == sorted(epochs) and epochs[0] == plan["tfrz"]
    assert all(e - plan["tfrz"] == 5 * i for i, e in enumerate(epochs))  # Δτ = 5 apart
    assert plan["blocks"][0]["name"] == "stem"


def test_plan_unreachable_target_is_a_clear_error():
    r = cli("plan", "--config", "cifar100-resnet32x2", "--set", "freezing.target=0.9")
    # a config error (issue 15): exit 2
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr


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
    r = cli("train", "--config", "fmnist-demo", "--set", "data.name=imagefolder", "--out", str(old), "--force")
    assert r.returncode == 2 and "data.root" in r.stderr and (old / "summary.json").exists()
    r = cli("train", "--config", "fmnist-demo", "--set", "data.name=cifar10", "--set",
            f"data.root={tmp_path / 'nowhere'}", "--out", str(old), "--force")  # fails inside the trainer
    assert r.returncode == 1 and (old / "summary.json").exists() and "Traceback" not in r.stderr
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
