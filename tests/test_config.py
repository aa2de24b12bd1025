"""Config loading and validation: every bad value is caught before work starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spfde.config import field_docs, from_dict, list_presets, load_config, parse_override
from spfde.errors import ConfigError


def test_defaults_follow_table_a3():
    cfg = from_dict({})
    assert cfg.optim.lr == 0.15 and cfg.optim.end_lr == 4e-8 and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 1e-4 and cfg.train.epochs == 160 and cfg.train.interval == 5
    assert cfg.search_end == 120  # 3/4 of 160
    assert cfg.sparsity.method == "mest" and cfg.sieving.update_ratio == 0.3


def test_presets_load_and_contract_keys():
    assert {"fmnist-demo", "cifar100-resnet32x2"} <= set(list_presets())
    cfg = load_config("cifar100-resnet32x2")
    assert cfg.model.name == "resnet32" and cfg.model.width == 2.0 and cfg.data.batch_size == 32
    assert cfg.sparsity.search_end == 0.75 and cfg.search_end == 120  # a fraction: 120 of 160 (Table A3)
    for key in ["seed", "data.name", "data.root", "data.subset", "data.batch_size", "model.name", "model.width",
                "optim.lr", "train.epochs", "train.interval", "sparsity.method", "sparsity.target",
                "sparsity.distribution", "sparsity.dense_first_layer", "sparsity.search_end", "freezing.target",
                "freezing.tfrz", "freezing.scheme", "freezing.blocks", "sieving.method", "sieving.ratio",
                "sieving.update_ratio", "logging.tensorboard", "analysis.snapshots"]:
        assert key in {k for k, _, _ in field_docs()}, key


def test_epoch_valued_keys_take_a_fraction_of_training():
    """An int is an epoch, a float in (0, 1] a fraction of train.epochs (floor), resolved in one place."""
    assert from_dict({"train": {"epochs": 24}, "sparsity": {"search_end": 0.75}}).search_end == 18
    assert from_dict({"train": {"epochs": 10}, "sparsity": {"search_end": 0.75}}).search_end == 7
    assert from_dict({"train": {"epochs": 10}, "sparsity": {"search_end": 7}}).search_end == 7
    assert from_dict({"train": {"epochs": 4}, "sparsity": {"search_end": 1.0}}).search_end == 4
    assert from_dict({"train": {"epochs": 24}}).search_end == 18  # the default is 0.75
    demo = load_config("fmnist-demo", ["train.epochs=4"])  # the preset keeps its shape at any length
    assert demo.search_end == 3 and demo.resolve_epochs()["sparsity.search_end"] == 3
    for bad in ("1.5", "0.0"):
        with pytest.raises(ConfigError, match="sparsity.search_end.*fraction"):
            load_config("fmnist-demo", [f"sparsity.search_end={bad}"])


def test_overrides_are_typed():
    cfg = load_config("fmnist-demo", ["optim.lr=0.05", "freezing.tfrz=3", "data.subset=null",
                                      "freezing.blocks=[stem, layer1]"])
    assert cfg.optim.lr == 0.05 and cfg.freezing.tfrz == 3 and cfg.data.subset is None
    assert cfg.freezing.blocks == ["stem", "layer1"]
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)


@pytest.mark.parametrize("override, field, words", [
    (["optim.lrr=0.1"], "optim.lrr", "allowed keys"),
    (["optim.lr=fast"], "optim.lr", "must be a number"),
    (["optim.lr=-1"], "optim.lr", "out of range"),
    (["sparsity.target=1.0"], "sparsity.target", "out of range"),
    (["sparsity.method=magic"], "sparsity.method", "one of"),
    (["train.epochs=2.5"], "train.epochs", "integer"),
    (["freezing.tfrz=soon"], "freezing.tfrz", "auto"),
    (["freezing.tfrz=100"], "freezing.tfrz", "0 < tfrz"),
    (["sieving.update_ratio=0"], "sieving.update_ratio", "out of range"),
    (["data.batch_size=true"], "data.batch_size", "integer"),
    (["sparsity.method=dense", "sparsity.target=0.9"], "sparsity.target", "sparse method"),
])
def test_bad_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as e:
        load_config("fmnist-demo", override)
    assert field in str(e.value) and words in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "spfde.cli", "train", "--config", "fmnist-demo",
                        "--set", "optim.momentum=2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.momentum" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_docs_config_md_is_current():
    from pathlib import Path

    from spfde.config import config_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), "regenerate: python -m spfde.config > docs/config.md"


@pytest.mark.parametrize("overrides, words", [
    (["sieving.method=none", "sieving.ratio=0.2"], "sieving.ratio = 0.2 is ignored: sieving.method is 'none'"),
    (["freezing.cache=on", "freezing.target=0"], "freezing.cache = 'on' has nothing to cache: freezing.target is 0"),
    (["optim.warmup_epochs=3", "train.epochs=3"], "optim.warmup_epochs = 3 is not below train.epochs = 3"),
    (["optim.warmup_epochs=5", "train.epochs=3"], "never reaches its peak"),
    (["optim.warmup_epochs=2", "optim.schedule=constant"], "optim.warmup_epochs = 2 is ignored: optim.schedule is "
                                                           "'constant'"),
], ids=["sieving-none-ratio", "cache-on-no-freezing", "warmup-all-epochs", "warmup-past-epochs", "warmup-constant"])
def test_contradictory_but_harmless_settings_give_one_warning(overrides, words):
    from spfde.config import config_warnings

    cfg = load_config(None, overrides)  # loading alone says nothing: the run's setup does
    [message] = config_warnings(cfg)
    assert words in message


@pytest.mark.parametrize("overrides", [
    [], ["sieving.method=none"], ["sieving.method=none", "sieving.ratio=0"], ["sieving.method=circular"],
    ["sieving.method=static", "sieving.ratio=0"], ["freezing.target=0"], ["freezing.cache=off", "freezing.target=0"],
    ["freezing.cache=on", "freezing.target=0.2"], ["optim.warmup_epochs=2", "train.epochs=3"],
], ids=str)
def test_the_usual_ways_of_switching_off_say_nothing(overrides):
    from spfde.config import config_warnings

    assert config_warnings(load_config(None, overrides)) == []


@pytest.mark.parametrize("preset", ["cifar100-resnet32x2", "fmnist-demo", "fmnist-vit"])
def test_presets_as_shipped_say_nothing(preset):
    from spfde.config import config_warnings

    assert config_warnings(load_config(preset)) == []
    # the dense spelling docs/results.md gives for a preset
    assert config_warnings(load_config(preset, ["sieving.method=none", "sieving.ratio=0", "freezing.target=0"])) == []


def test_run_setup_says_each_warning_once_and_runs_on(tmp_path, monkeypatch):
    from helpers import error_lines, run_main

    (tmp_path / "c.yaml").write_text("seed: 0\n")
    tiny = ["data.name=synthetic", "data.synthetic_size=64", "data.image_size=8", "model.width=0.25",
            "train.epochs=2", "freezing.target=0", "sieving.method=none", "sieving.ratio=0.3",
            "optim.warmup_epochs=2"]
    code, out, err = run_main("flops", "-c", str(tmp_path / "c.yaml"), *[a for o in tiny for a in ("--set", o)])
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and not error_lines(err) and "train_flops" in out, err
    assert len(warnings) == 2, err
    assert "sieving.ratio = 0.3 is ignored" in warnings[0] and "optim.warmup_epochs = 2" in warnings[1]
    monkeypatch.setenv("RANK", "1")  # under torchrun rank 0 speaks for the run
    code, _, err = run_main("flops", "-c", str(tmp_path / "c.yaml"), *[a for o in tiny for a in ("--set", o)])
    assert code == 0 and "warning:" not in err, err


def test_a_block_that_freezes_within_the_warmup_is_named_at_run_setup(tmp_path):
    from helpers import error_lines, run_main

    (tmp_path / "c.yaml").write_text("seed: 0\n")
    tiny = ["data.name=synthetic", "data.synthetic_size=64", "data.image_size=8", "model.width=0.25",
            "train.epochs=6", "train.interval=1", "freezing.target=0.05", "freezing.tfrz=2", "sieving.method=none",
            "optim.warmup_epochs=3"]
    args = ["plan", "-c", str(tmp_path / "c.yaml"), "--json"]
    code, out, err = run_main(*args, *[a for o in tiny for a in ("--set", o)])
    assert code == 0 and not error_lines(err), err
    early = [b for b in json.loads(out)["blocks"] if b["freeze_epoch"] is not None and b["freeze_epoch"] <= 3]
    assert early, out  # the setting freezes a block inside the warmup
    [warning] = [line for line in err.splitlines() if line.startswith("warning:")]
    assert f"{len(early)} block(s) freeze before optim.warmup_epochs = 3 ends ({early[0]['name']!r} at epoch " \
           f"{early[0]['freeze_epoch']}" in warning and "lower optim.warmup_epochs" in warning
    # the same plan with the warmup over before the first freeze says nothing
    code, _, err = run_main(*args, *[a for o in tiny for a in ("--set", o)], "--set", "optim.warmup_epochs=1")
    assert code == 0 and "warning:" not in err, err
