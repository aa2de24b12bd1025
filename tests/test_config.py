"""Config loading and validation: every bad value is caught before work starts."""

from __future__ import annotations

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
