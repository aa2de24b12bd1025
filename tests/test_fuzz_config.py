"""Property-based fuzzing of configs/fmnist-demo.yaml through ``spfde train`` (issue 15, "Done when").

Every mutation (types, ranges, unknown and duplicate keys, YAML damage, ``--set`` syntax) must
end with exit 0 or 2, no traceback, at most one ``error:`` line (exactly one on exit 2), and a
mutation built to be valid must start. "Start" is everything ``spfde train`` does before the
first epoch, run in this process: the config is read, the data loaded, the model, optimizer and
controller built (the freezing plan included) and ``Trainer.run`` called, which is replaced by a
stub here, so an example costs a data load and a plan (~1 s) instead of a training run.

The demo's ``data.subset`` is lowered to 256 in the text the mutations start from (a start then
costs the same whatever the mutation). Valid values come from a table of values that keep a
start that cheap: a valid value at a range's far end (a 64x wide model, 10^4 epochs) is slow to
build, not a different code path; the bounds themselves are unit-tested in test_config.py and
test_robust.py. ``SPFDE_FUZZ_EXAMPLES=N`` runs N examples per property instead of the default.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import error_lines, run_main
from spfde.config import field_docs
from spfde.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEXT = (ROOT / "configs" / "fmnist-demo.yaml").read_text().replace("subset: 20000", "subset: 256")
assert "subset: 256" in DEMO_TEXT
DEMO = yaml.safe_load(DEMO_TEXT)
# data.root is left alone: a folder that does not exist is missing data, exit 1 like any missing
# file (tests/test_cli.py), not a config error
KEYS = [k for k, _, _ in field_docs() if k != "data.root"]
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})


def fuzz_settings(examples: int):
    n = int(os.environ.get("SPFDE_FUZZ_EXAMPLES", examples))
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def start(text: str | bytes, overrides: list[str]) -> tuple[int, str, bool]:
    """``spfde train -c <text> -o <tmp> --set ...`` stopped after start-up: (code, stderr, started)."""
    started: list[bool] = []

    def run(self: Trainer) -> dict[str, Any]:
        started.append(True)
        return {"final_test_acc": None, "dense_train_flops": 0, "wall_s": 0.0}

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d, mock.patch.object(Trainer, "run", run):
        path = Path(d) / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        argv = ["train", "-c", str(path), "-o", str(Path(d) / "run"), "-q"]
        try:
            code, _, err = run_main(*argv, *[a for o in overrides for a in ("--set", o)])
        finally:
            torch.set_num_threads(threads)  # a mutated train.threads must not slow the rest of the suite
    return code, err, bool(started)


def check_contract(code: int, err: str, started: bool) -> None:
    errors = error_lines(err)
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    assert len(errors) <= 1, err
    if code == 2:
        assert len(errors) == 1 and not started, err
    else:
        assert started and not errors, err


# ------------------------------------------------------------------------------------------
# values

def _floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


# Valid values that keep a start cheap and independent of each other (no rule between two of
# them can fail): e.g. train.epochs >= 10 keeps every integer search_end and static_warmup below
# before the last epoch and train.interval <= 3 leaves a Δτ grid; freezing.tfrz is auto or a
# fraction (an integer would have to sit on the Δτ grid that train.interval moves); amp stays off
# on CPU; sparsity.method is never "dense" (target is 0.9); freezing.cache is never "on" (an error
# with data.augment); freezing.unreachable stays the demo's "reduce" (the freezing keys here can
# make its 15% unreachable, which "error" refuses on purpose); sparsity.update_unit "step" needs
# set/rigl and is drawn with one in JOINT below.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "seed": st.integers(0, 2**63 - 1),
    "data.name": st.sampled_from(["fashion_mnist", "digits", "synthetic"]),
    "data.subset": st.integers(32, 512),
    "data.test_subset": st.none() | st.integers(1, 512),
    "data.batch_size": st.integers(1, 2**20),
    "data.eval_batch_size": st.integers(1, 2**20),
    "data.augment": st.booleans(), "data.flip": st.booleans(), "data.pad_to_32": st.booleans(),
    "data.crop_padding": st.integers(0, 128),
    "data.channels": st.sampled_from([None, 1, 3]),
    "data.loader": st.sampled_from(["tensor", "torch"]),
    "data.num_workers": st.integers(0, 256),
    "data.synthetic_size": st.integers(512, 600),  # at least any data.subset above (more is an error)
    "data.synthetic_classes": st.integers(2, 10),
    "data.image_size": st.integers(8, 32),
    "model.name": st.sampled_from(["resnet20", "resnet32"]),
    "model.width": _floats(0.25, 2.0),
    "model.kwargs": st.just({}),  # the registry's models take none (a key they do not take: tests/test_models.py)
    "optim.lr": _floats(1e-4, 1e3), "optim.end_lr": _floats(0.0, 1e-2), "optim.momentum": _floats(0.0, 0.99),
    "optim.weight_decay": _floats(0.0, 1.0), "optim.nesterov": st.booleans(),
    "optim.label_smoothing": _floats(0.0, 0.5), "optim.schedule": st.sampled_from(["cosine", "constant"]),
    "optim.warmup_epochs": st.integers(0, 5),
    "train.epochs": st.integers(10, 40),
    "train.device": st.sampled_from(["auto", "cpu"]),
    "train.channels_last": st.sampled_from(["auto", "on", "off", True, False]),
    "train.amp": st.sampled_from(["auto", "off", False]),
    "train.eval_every": st.integers(1, 10**4),
    "train.threads": st.sampled_from([None, 1]),
    "train.on_nonfinite": st.sampled_from(["stop", "skip"]),
    "train.interval": st.integers(1, 3),
    "sparsity.method": st.sampled_from(["mest", "set", "rigl", "static"]),
    "sparsity.target": _floats(0.5, 0.95),
    "sparsity.distribution": st.sampled_from(["uniform", "erk"]),
    "sparsity.dense_first_layer": st.booleans(), "sparsity.dense_last_layer": st.booleans(),
    "sparsity.search_end": st.none() | st.integers(1, 10) | _floats(0.3, 1.0),
    # the first and last prunable layers stay stem and head (dense by default: erk's budget holds at
    # s = 0.95), and none of layer_overrides' layers is excluded (valid_mutations skips them with include)
    "sparsity.include": st.sampled_from([None, ["stem", "layer2", "layer3", "head"]]),
    "sparsity.exclude": st.sampled_from([[], ["layer1.1"], ["layer3.0.conv1"]]),
    "sparsity.grow_early": _floats(0.0, 0.1), "sparsity.grow_late": _floats(0.0, 0.05),
    "sparsity.grow_switch": _floats(0.0, 1.0), "sparsity.grow_exclude_dropped": st.booleans(),
    "sparsity.update_unit": st.just("epoch"),
    "sparsity.update_interval_steps": st.integers(1, 500),
    "sparsity.kernels": st.sampled_from(["auto", "dense", "sparse"]),
    "sparsity.kernels_calibration": st.sampled_from(["auto", "off"]),
    "sparsity.mest_lambda": _floats(0.0, 10.0),
    "sparsity.drop_fraction": _floats(0.0, 1.0),
    "sparsity.static_init": st.sampled_from(["random", "snip"]),
    "freezing.target": _floats(0.0, 0.15),
    "freezing.block_lr": st.booleans(), "freezing.prune_on_freeze": st.booleans(),
    "freezing.tfrz": st.just("auto") | _floats(0.1, 0.6),
    "freezing.scheme": st.sampled_from(["single_shot", "single_shot_resume", "periodic", "delayed_periodic"]),
    "freezing.blocks": st.sampled_from([None, ["stem", "layer1", "layer2", "layer3", "head"],
                                        ["stem", "layer1.*", "layer2.*", "layer3.*", "head"]]),
    "freezing.max_blocks_fraction": _floats(0.3, 1.0),
    "freezing.freeze_head": st.booleans(),
    "freezing.resume_epochs": st.sampled_from([None, 0]),
    "freezing.planner": st.sampled_from(["algorithm1", "exact"]),
    "freezing.unreachable": st.just("reduce"),
    "freezing.cache": st.sampled_from(["auto", "off", False]),
    "freezing.cache_max_bytes": st.none() | st.integers(0, 2**30),
    "sieving.method": st.sampled_from(["circular", "random", "static", "none"]),
    "sieving.ratio": _floats(0.0, 0.5),
    "sieving.update_ratio": _floats(0.01, 1.0),
    "sieving.carry_status": st.booleans(),
    "sieving.static_warmup": st.sampled_from([None, 0, 1, 2]),
    "sieving.criterion": st.sampled_from(["forgetting", "loss"]),
    "accounting.backward": st.sampled_from(["paper", "exact"]),
    "analysis.snapshots": st.booleans(), "analysis.grad_norms": st.booleans(),
    "analysis.probe_size": st.integers(1, 1000),
    "logging.progress": st.booleans(),
    # true needs the tensorboard package (without it: a one-line error, exit 1, tests/test_report.py)
    "logging.tensorboard": st.sampled_from([False] + ([True] if importlib.util.find_spec("tensorboard") else [])),
}
assert set(VALID) <= set(KEYS)
# every key but these is drawn (data.root: see KEYS; sparsity.layer_overrides: its dotted module names
# are drawn in valid_mutations), so a key added to the config without a value here fails this line
assert set(KEYS) - set(VALID) == {"sparsity.layer_overrides"}, sorted(set(KEYS) - set(VALID))

# Values valid only together: drawn as one group, after VALID's keys (they override those)
JOINT: list[st.SearchStrategy[dict[str, Any]]] = [
    st.builds(lambda m, n: {"sparsity.method": m, "sparsity.update_unit": "step", "sparsity.update_interval_steps": n},
              st.sampled_from(["set", "rigl"]), st.integers(1, 50)),
    st.builds(lambda t: {"freezing.tfrz": t, "train.interval": 1}, st.integers(1, 9)),  # an integer epoch, on the grid
    st.builds(lambda c: {"freezing.cache": c, "data.augment": False}, st.sampled_from(["on", True])),
    st.builds(lambda f: {"freezing.unreachable": "error", "freezing.target": f, "freezing.tfrz": "auto",
                         "freezing.scheme": "single_shot", "freezing.max_blocks_fraction": 2 / 3, "train.interval": 1,
                         "train.epochs": 10, "freezing.blocks": None, "freezing.freeze_head": False,
                         "freezing.planner": "algorithm1"}, _floats(0.0, 0.1)),
]

JUNK = st.one_of(
    st.sampled_from([-1, 0, 10**30, -(10**30), 2**63, float("nan"), float("inf"), -float("inf"), 1e300, -1e-300,
                     True, False, None, "", "x", "auto", "on", "cuda:abc", "cudax", [], [1, "a"], {}, {"a": 1},
                     {1: 2}, [[[]]]]),
    st.integers(), st.floats(), st.text(max_size=12), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def flow(value: Any) -> str:
    """A value as a YAML flow scalar, for ``--set``."""
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if not isinstance(value, str) else value


def put(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------
# valid mutations: they must start


@st.composite
def valid_mutations(draw) -> tuple[str, list[str]]:
    cfg = yaml.safe_load(DEMO_TEXT)
    overrides: list[str] = []
    values = {key: draw(VALID[key]) for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=6, unique=True))}
    if draw(st.booleans()):
        values.update(draw(st.one_of(JOINT)))
    for key, value in values.items():
        if draw(st.booleans()):
            put(cfg, key, value)
        else:
            overrides.append(f"{key}={flow(value)}")
    if values.get("sparsity.include") is None and draw(st.booleans()):  # dotted module names into the mapping field
        layer = draw(st.sampled_from(["layer1.0.conv1", "layer2.1.conv2", "layer3.2.conv1"]))
        overrides.append(f"sparsity.layer_overrides.{layer}={draw(_floats(0.0, 0.95))!r}")
    text = dump(cfg)
    for section in draw(st.lists(st.sampled_from(["accounting", "analysis", "logging"]), max_size=2, unique=True)):
        if section not in cfg:
            text += f"{section}:\n"  # an empty section means its defaults
    if draw(st.booleans()):  # YAML's other spellings of booleans: on/off, yes/no
        on, off = draw(st.sampled_from([("on", "off"), ("yes", "no"), ("True", "False")]))
        text = text.replace(": true\n", f": {on}\n").replace(": false\n", f": {off}\n")
    if draw(st.booleans()):
        text = "# a comment\n" + text.replace("\n", "  # trailing comment\n", 1)
    return text, overrides


@pytest.mark.slow
@fuzz_settings(40)
@given(valid_mutations())
def test_valid_mutations_start(case):
    text, overrides = case
    code, err, started = start(text, overrides)
    assert code == 0 and started, (err, text, overrides)
    check_contract(code, err, started)


# ------------------------------------------------------------------------------------------
# any mutation: exit 0 or 2, one line, no traceback

ANY_KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS),
                    st.builds(lambda s, t: f"{s}.{t}", st.sampled_from(SECTIONS), st.text("abcxyz_", min_size=1,
                                                                                          max_size=6)),
                    st.text("abc._", min_size=1, max_size=8))
NOT_DIGITS = st.characters(blacklist_categories=["Nd"])  # inserted digits only make numbers larger


@st.composite
def mutations(draw) -> tuple[str | bytes, list[str]]:
    cfg: Any = yaml.safe_load(DEMO_TEXT)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["set", "valid", "delete", "section", "odd-key"]))
        key = draw(st.sampled_from(KEYS))
        if op == "set":
            put(cfg, draw(ANY_KEY), draw(JUNK))
        elif op == "valid" and key in VALID:
            put(cfg, key, draw(VALID[key]))
        elif op == "delete":
            section, _, name = key.rpartition(".")
            node = cfg.get(section) if section else cfg
            if isinstance(node, dict):
                node.pop(name, None)
        elif op == "section":
            cfg[draw(st.sampled_from(SECTIONS))] = draw(st.sampled_from([None, [], 3, "x", [1, 2], {"": 1}]))
        elif op == "odd-key":
            target = cfg if draw(st.booleans()) else cfg.setdefault(draw(st.sampled_from(SECTIONS)), {})
            if isinstance(target, dict):
                target[draw(st.sampled_from([1, 2.5, True, None, "", " ", "a.b"]))] = draw(JUNK)
    text: str | bytes = dump(cfg)
    for _ in range(draw(st.integers(0, 2))):
        damage = draw(st.sampled_from(["insert", "delete", "truncate", "duplicate", "bytes", "nest", "tab", "bom"]))
        if isinstance(text, bytes):
            break
        at = draw(st.integers(0, len(text)))
        if damage == "insert":
            text = text[:at] + draw(st.text(NOT_DIGITS, min_size=1, max_size=3)) + text[at:]
        elif damage == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        elif damage == "truncate":
            text = text[:at]
        elif damage == "duplicate":  # a section or a field given twice
            lines = text.splitlines(keepends=True)
            line = lines[draw(st.integers(0, max(len(lines) - 1, 0)))] if lines else "seed: 0\n"
            text = text + line if not line.startswith(" ") else text.replace(line, line + line, 1)
        elif damage == "bytes":
            text = text.encode()[:at] + draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\x00", b"\x1b"]))
        elif damage == "nest":
            text += f"x: {'[' * draw(st.integers(10, 5000))}\n"
        elif damage == "tab":
            text = text.replace("  ", "\t", 1)
        elif damage == "bom":
            text = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe"])) + text.encode()
    overrides = draw(st.lists(st.one_of(
        st.builds(lambda k, v: f"{k}={flow(v)}", ANY_KEY, JUNK),
        st.builds(lambda k, v: f"{k}={v}", ANY_KEY, st.text(max_size=10)),
        st.text(max_size=12),
        st.sampled_from(["=1", "optim.lr", "optim..lr=1", "sparsity.layer_overrides.a.b=0.5",
                         "sparsity.layer_overrides=[1]", "seed.x=1", "train=3", "model.name=inf", "train.amp=on"])),
        max_size=3))
    return text, overrides


@pytest.mark.slow
@fuzz_settings(300)
@given(mutations())
def test_any_mutation_exits_0_or_2_with_one_line(case):
    text, overrides = case
    check_contract(*start(text, overrides))
