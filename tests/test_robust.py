"""Issue 15: nothing a user types or a disk does gives a traceback, a silent wrong run or code
execution; issue 16 items 3 (every problem of a config at once) and 4 (on/off words).

One test (or parametrized group) per item of the issue, in its order. The property-based fuzz
test over the demo config is tests/test_fuzz_config.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import error_lines, run_main
from spfde.checkpoint import FORMAT, read_checkpoint
from spfde.config import load_config
from spfde.errors import ConfigError, NonFiniteLossError, SpfdeError
from spfde.train import Trainer, load_checkpoint, resume, train
from spfde.utils import file_sha256, write_sha256
from test_train import SPFDE, TINY, tiny_cfg

DEMO = ["-c", "fmnist-demo", "--set", "data.subset=256", "--set", "data.test_subset=64"]


def sets(*overrides: str) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


def tiny_yaml(tmp_path: Path) -> list[str]:
    (tmp_path / "tiny.yaml").write_text("seed: 0\n")
    return ["-c", str(tmp_path / "tiny.yaml"), *sets(*TINY)]


def assert_one_error(code: int, err: str, expected: int, *words: str) -> str:
    lines = error_lines(err)
    assert code == expected, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def interrupt_after(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Raise KeyboardInterrupt right after epoch ``epoch``'s checkpoint (a kill at that point)."""
    original = Trainer.checkpoint

    def checkpoint(self: Trainer, e: int) -> None:
        original(self, e)
        if e == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "checkpoint", checkpoint)


def killed_after_first_epoch(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-epoch tiny run in ``run`` killed right after epoch 0's checkpoint."""
    interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg("train.epochs=2"), run, quiet=True)
    monkeypatch.undo()


def edit_config(run: Path, **changes: object) -> None:
    data = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------------------
# security


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_cannot_run_code(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("train.epochs=1"), run, quiet=True)
    last = run / "checkpoints" / "last.pt"
    marker = tmp_path / "code-ran"
    torch.save({"format": FORMAT, "epoch": 0, "payload": _Evil(marker)}, last)
    write_sha256(last, file_sha256(last))  # whoever crafts the file can write its checksum too
    with pytest.raises(SpfdeError, match="allow-list"):
        load_checkpoint(last)
    code, _, err = run_main("train", "--resume", str(run), "-q")
    assert_one_error(code, err, 1, "last.pt", "allow-list")
    assert not marker.exists()


def test_checkpoint_allow_list_is_explicit(tmp_path):
    """torch's weights_only loader accepts more than a checkpoint holds (torch.Size, devices, ...):
    the allow-list refuses any of it, naming where."""
    path = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "epoch": 0, "model": {"w": torch.zeros(2)}, "x": [torch.Size([2])]}, path)
    write_sha256(path, file_sha256(path))
    with pytest.raises(SpfdeError, match=r"holds a Size at 'x\[0\]'"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------------------
# silent wrong runs


def test_resume_refuses_an_edited_config(tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*SPFDE), run, quiet=True)
    monkeypatch.undo()
    edit_config(run, sieving__ratio=0.4, sparsity__target=0.7, train__epochs=6)
    for allow in (False, True):  # the flag does not make these changes safe
        with pytest.raises(ConfigError) as e:
            resume(run, quiet=True, allow_config_change=allow)
        msg = str(e.value)
        assert "sieving.ratio 0.25 -> 0.4" in msg and "sparsity.target 0.8 -> 0.7" in msg
        assert "train.epochs 4 -> 6" in msg
    code, _, err = run_main("train", "--resume", str(run), "-q")
    assert_one_error(code, err, 2, "sieving.ratio")
    assert not (run / "summary.json").exists()


SAFE = ["optim.schedule=constant", "sparsity.method=set", "sparsity.target=0.8", "sparsity.search_end=2",
        "sieving.method=circular", "sieving.ratio=0.25"]


def test_resume_allows_safe_changes_behind_the_flag(tmp_path):
    """More epochs where nothing depends on train.epochs (constant LR, no freezing plan, explicit
    search_end): the extended run is bit-identical to one planned that long."""
    ref = train(tiny_cfg(*SAFE, "train.epochs=4"), tmp_path / "ref", quiet=True)
    run = tmp_path / "run"
    train(tiny_cfg(*SAFE, "train.epochs=3"), run, quiet=True)
    edit_config(run, train__epochs=4, train__eval_every=2, logging__tensorboard=False)
    with pytest.raises(ConfigError, match="--allow-config-change"):
        resume(run, quiet=True)
    summary = resume(run, quiet=True, allow_config_change=True)
    assert summary["weights_sha256"] == ref["weights_sha256"] and summary["epochs"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    # harmless keys alone need no flag
    edit_config(run, train__threads=2, logging__progress=False)
    assert resume(run, quiet=True)["weights_sha256"] == ref["weights_sha256"]


def test_resume_refuses_more_epochs_under_a_cosine_schedule(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("train.epochs=2"), run, quiet=True)
    edit_config(run, train__epochs=3)
    with pytest.raises(ConfigError, match="cosine learning-rate schedule"):
        resume(run, quiet=True, allow_config_change=True)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, capsys):
    ref = train(tiny_cfg(*SPFDE), tmp_path / "ref", quiet=True)
    run = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*SPFDE), run, quiet=True)
    monkeypatch.undo()
    ckpts = run / "checkpoints"
    assert read_checkpoint(ckpts / "last.pt")["epoch"] == 2 and read_checkpoint(ckpts / "prev.pt")["epoch"] == 1
    assert (ckpts / "last.pt.sha256").read_text() == f"{file_sha256(ckpts / 'last.pt')}  last.pt\n"
    raw = bytearray((ckpts / "last.pt").read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])  # the damage
    (ckpts / "last.pt").write_bytes(bytes(raw))
    capsys.readouterr()
    summary = resume(run, quiet=True)
    err = capsys.readouterr().err
    assert "SHA-256" in err and "prev.pt" in err and "epoch 1" in err and len(err.strip().splitlines()) == 1
    assert summary["weights_sha256"] == ref["weights_sha256"]
    # the bad file was overwritten, not kept as the fallback
    assert read_checkpoint(ckpts / "last.pt")["epoch"] == 3 and read_checkpoint(ckpts / "prev.pt")["epoch"] == 2
    for name in ("last.pt", "prev.pt"):
        (ckpts / name).write_bytes(b"garbage")
    code, _, err = run_main("train", "--resume", str(run), "-q")
    assert_one_error(code, err, 1, "no intact checkpoint")


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The ``call``-th training loss (0-based, evaluation excluded) becomes NaN."""
    original = torch.nn.functional.cross_entropy
    count = {"n": 0}

    def cross_entropy(*args, **kwargs):
        loss = original(*args, **kwargs)
        if "label_smoothing" in kwargs:  # the trainer's training loss; evaluation sums instead
            if count["n"] == call:
                loss = loss * float("nan")
            count["n"] += 1
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)


STEPS = 8  # TINY: 256 samples, batches of 32


def test_nonfinite_loss_stops_the_run_with_exit_3(tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_loss_at(monkeypatch, STEPS + 3)  # epoch 1, step 3
    with pytest.raises(NonFiniteLossError) as e:
        train(tiny_cfg("train.epochs=3"), run, quiet=True)
    assert e.value.exit_code == 3 and "epoch 1, step 3" in str(e.value) and "is intact" in str(e.value)
    assert read_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 0  # the last good checkpoint
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 and not (run / "summary.json").exists()
    nan_loss_at(monkeypatch, STEPS + 3)
    code, _, err = run_main("train", *tiny_yaml(tmp_path), *sets("train.epochs=3"), "-o", str(tmp_path / "b"), "-q")
    assert_one_error(code, err, 3, "epoch 1, step 3", "train.on_nonfinite")


def test_nonfinite_loss_skip_mode(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, STEPS + 3)
    train(tiny_cfg("train.epochs=3", "train.on_nonfinite=skip"), tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 0]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    model = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


@pytest.mark.slow
def test_a_diverging_run_exits_3(tmp_path):
    code, _, err = run_main("train", *tiny_yaml(tmp_path), *sets("optim.lr=1000", "optim.schedule=constant",
                                                                 "train.epochs=3"), "-o", str(tmp_path / "r"), "-q")
    assert_one_error(code, err, 3, "the training loss is", "train.on_nonfinite")


# ------------------------------------------------------------------------------------------
# tracebacks -> one line, exit 2


@pytest.mark.parametrize("override, key", [
    ("train.device=cudax", "train.device"), ("train.device=cuda:abc", "train.device"),
    ("optim.weight_decay=1e300", "optim.weight_decay"), ("train.epochs=1000000000000", "train.epochs"),
    ("model.width=1e6", "model.width"), ("data.crop_padding=1000000", "data.crop_padding"),
    ("optim.lr=1e6", "optim.lr"), ("sparsity.layer_overrides.conv1=5", "sparsity.layer_overrides"),
])
def test_bad_values_are_one_line_exit_2(tmp_path, override, key):
    code, _, err = run_main("train", *DEMO, "--set", "data.augment=true", "--set", override,
                            "-o", str(tmp_path / "r"), "-q")
    assert_one_error(code, err, 2, key)
    assert not (tmp_path / "r").exists()


def test_allocation_failure_at_start_is_a_config_error(tmp_path):
    code, _, err = run_main("train", *tiny_yaml(tmp_path), *sets("data.synthetic_size=1000000", "data.image_size=1024"),
                            "-o", str(tmp_path / "r"), "-q")
    assert_one_error(code, err, 2, "not enough memory", "GiB")


@pytest.mark.parametrize("content, words", [
    (b"seed: 0\n1: 2\nx: 3\n", ["unknown config key '1'", "unknown config key 'x'"]),  # mixed-type keys
    (b"\xff\xfe", ["UTF-16"]),
    (b"seed: 0\nmodel: \xff\n", ["line 2 column 8", "not UTF-8"]),
    (b"seed: " + b"[" * 20000, ["line 1 column", "nested more than"]),
    (b"optim: [1, 2\n", ["line 2 column 1", "not valid YAML"]),
    (b"seed: 1\nseed: 2\n", ["line 2 column 1", "duplicate key 'seed'"]),
    (b"seed: 0\nmodel:\n  name: \x07\n", ["line 3 column 9", "control character #x0007"]),
], ids=["int-key", "utf16", "not-utf8", "deep", "syntax", "duplicate", "control-char"])
def test_damaged_yaml_is_one_line_with_its_position(tmp_path, content, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    code, _, err = run_main("train", "-c", str(path), "-o", str(tmp_path / "r"))
    assert_one_error(code, err, 2, *words)


TORCH_WRITER_ERROR = ("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/3: "
                      "file write failed")  # what torch.save raises when its own writer cannot write a path


class _FillsUp:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.mark.parametrize("how", ["torch-writer", "oserror", "real-torch-save", "torch-writer-with-room"])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, how):
    import builtins

    import spfde.utils

    original = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):  # the second checkpoint fails half-way, as on a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04partial")
            if how == "oserror":
                raise OSError(28, "No space left on device")
            raise RuntimeError(TORCH_WRITER_ERROR)
        return original(obj, f, *args, **kwargs)

    def fills_up(file, mode="r", *args, **kwargs):  # the real torch.save into a file that fills up
        f = builtins.open(file, mode, *args, **kwargs)
        if "w" in mode and re.fullmatch(r"\.last\.pt\.\w+\.tmp", Path(file).name):
            calls["n"] += 1
            return _FillsUp(f, room=1000) if calls["n"] == 2 else f
        return f

    if how == "real-torch-save":
        monkeypatch.setattr(spfde.utils, "open", fills_up, raising=False)
    else:
        monkeypatch.setattr(torch, "save", save)
    if how == "torch-writer":  # torch's writer says only where it failed: the full disk tells
        usage = spfde.utils.shutil.disk_usage(tmp_path)
        monkeypatch.setattr(spfde.utils.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    run = tmp_path / "run"
    with pytest.raises(SpfdeError) as e:
        train(tiny_cfg("train.epochs=3"), run, quiet=True)
    message = str(e.value)
    last = run / "checkpoints" / "last.pt"
    assert "\n" not in message and "inline_container" not in message and "enforce" not in message, message
    if how == "torch-writer-with-room":
        assert message.startswith(f"could not write checkpoint '{last}': the write failed (PytorchStreamWriter "
                                  "failed writing file data/3: file write failed; "), message
        assert "MiB free on its disk)" in message
    else:
        assert message == (f"could not write checkpoint '{last}': no space left on device (free space or choose "
                           "another out dir); the previous version of the file is intact")
    assert read_checkpoint(last)["epoch"] == 0  # the previous checkpoint, in place and verified
    assert not list((run / "checkpoints").glob(".*.tmp")) and not (run / "checkpoints" / "prev.pt").exists()
    monkeypatch.undo()
    assert resume(run, quiet=True)["epochs"] == 3  # and the run goes on from there


def test_failed_output_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    # ENOSPC from the OS on any other output: one line naming the file, the old content intact
    import spfde.utils

    run2 = tmp_path / "run2"
    killed_after_first_epoch(run2, monkeypatch)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spfde.utils.os, "fsync", full)
    code, _, err = run_main("train", "--resume", str(run2), "-q")
    assert_one_error(code, err, 1, f"could not write '{run2 / 'metrics.jsonl'}': no space left on device (free "
                                   "space or choose another out dir); the previous version of the file is intact")
    assert len((run2 / "metrics.jsonl").read_text().splitlines()) == 1


def test_labels_out_of_range_are_refused_at_load(tmp_path):
    from spfde.config import DataConfig
    from spfde.data import load_datasets
    from spfde.data.datasets import FASHION_MNIST_FILES, check_labels
    from test_data import write_fmnist

    arrays = write_fmnist(tmp_path / "fm")
    arrays["train_labels"][3] = 10
    import gzip

    from test_data import idx_bytes

    labels = tmp_path / "fm" / FASHION_MNIST_FILES["train_labels"]
    labels.write_bytes(gzip.compress(idx_bytes(arrays["train_labels"])))
    with pytest.raises(SpfdeError, match=r"fashion_mnist train labels in .*1 label\(s\) out of range \(e.g. 10"):
        load_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")))
    code, _, err = run_main("train", "-c", "fmnist-demo", *sets(f"data.root={tmp_path / 'fm'}"),
                            "-o", str(tmp_path / "r"), "-q")
    assert_one_error(code, err, 1, "out of range")
    with pytest.raises(SpfdeError, match="expected 0..2"):
        check_labels(torch.tensor([0, -1, 2]), 3, "labels")


@pytest.mark.slow
def test_bad_image_in_a_worker_is_one_line(tmp_path):
    from PIL import Image

    from spfde.data import ImageFolderDataset, TorchLoader

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (10, 10), (200, 10 * i, 0)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = ImageFolderDataset(tmp_path, "train", image_size=8)
    with pytest.raises(SpfdeError) as e:
        for _ in TorchLoader(ds, batch_size=2, num_workers=1):
            pass
    msg = str(e.value)
    assert "\n" not in msg and "bad.png" in msg and msg.startswith("cannot read image")


# ------------------------------------------------------------------------------------------
# wrong exit codes and noisy messages


@pytest.mark.parametrize("overrides, words", [
    (["freezing.target=0.99", "freezing.unreachable=error"], ["unreachable"]),  # the demo itself says reduce
    (["train.interval=10", "freezing.unreachable=error"], ["train.interval"]),
    (["freezing.scheme=single_shot_resume", "freezing.resume_epochs=50"], ["freezing.resume_epochs"]),
    (["freezing.scheme=single_shot_resume", "freezing.resume_epochs=8"], ["freezing.resume_epochs"]),
    (["freezing.blocks=[nosuchblock]"], ["nosuchblock"]),
    (["freezing.blocks=[]"], ["freezing.blocks"]),
], ids=["unreachable", "interval", "resume-epochs-config", "resume-epochs-plan", "unknown-block", "no-blocks"])
def test_config_caused_errors_exit_2(tmp_path, overrides, words):
    code, _, err = run_main("train", *DEMO, *sets(*overrides), "-o", str(tmp_path / "r"), "-q")
    assert_one_error(code, err, 2, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("override", ["train.device=cuda", "train.device=cuda:1", "train.amp='on'"])
def test_gpu_settings_without_a_gpu_exit_2(tmp_path, override):
    code, _, err = run_main("train", *DEMO, "--set", override, "-o", str(tmp_path / "r"), "-q")
    assert_one_error(code, err, 2, override.split("=")[0])


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagefolder"])
def test_channels_an_rgb_dataset_cannot_make_exit_2_before_its_data_loads(tmp_path, name):
    # data.root points at nothing: were the data read first, this would be exit 1, "not found"
    for command in (["train", "-o", str(tmp_path / "r"), "-q"], ["plan"]):
        code, _, err = run_main(*command, *tiny_yaml(tmp_path), *sets(f"data.name={name}", "data.channels=2",
                                                                      f"data.root={tmp_path / 'none'}"))
        assert_one_error(code, err, 2, f"'data.channels' = 2 cannot be made from {name}'s 3-channel images",
                         "allowed: 1 (grey), 3 (RGB) or null")
    assert not (tmp_path / "r").exists()


def test_channels_the_data_can_make_load():
    from spfde.config import SOURCE_CHANNELS, channels_fit
    from spfde.data.datasets import set_channels
    from spfde.planning import _KNOWN

    for name in ("fashion_mnist", "digits", "synthetic"):  # grey images repeat to any count; synthetic is made so
        assert load_config(None, [f"data.name={name}", "data.channels=2"]).data.channels == 2
    for name in ("cifar10", "cifar100"):
        for channels in ("1", "3", "null"):
            load_config(None, [f"data.name={name}", f"data.channels={channels}"])
    assert all(SOURCE_CHANNELS[n] == shape.in_channels for n, shape in _KNOWN.items())  # the two tables agree
    # one rule: the config's check is the converter's
    for source in (1, 3):
        for channels in (None, 1, 2, 3):
            fits = channels_fit(source, channels)
            try:
                out = set_channels(torch.zeros(2, source, 4, 4, dtype=torch.uint8), channels)
            except SpfdeError:
                assert not fits
            else:
                assert fits and out.shape[1] == (channels or source)


def test_a_test_subset_larger_than_the_test_split_is_a_config_error(tmp_path):
    from spfde.config import DataConfig
    from spfde.data import load_datasets
    from test_data import write_fmnist

    write_fmnist(tmp_path / "fm", n_train=12, n_test=6)
    with pytest.raises(ConfigError, match=r"'data.test_subset' = 7 is larger than the fashion_mnist test split "
                                          r"\(6 images\); set data.test_subset to at most 6, or to null to test"):
        load_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), test_subset=7))
    assert len(load_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), test_subset=6))[1]) == 6
    # the CLI: exit 2, one line, before a run folder exists
    code, _, err = run_main("train", *tiny_yaml(tmp_path), *sets("data.test_subset=100000"), "-o",
                            str(tmp_path / "r"), "-q")
    assert_one_error(code, err, 2, "'data.test_subset' = 100000", "synthetic test split")
    assert not (tmp_path / "r").exists()


def test_a_subset_larger_than_the_training_split_is_a_config_error(tmp_path, monkeypatch):
    from spfde.config import DataConfig
    from spfde.data import load_datasets
    from test_data import write_fmnist

    write_fmnist(tmp_path / "fm", n_train=12)  # the user's own files: their size, not the published one
    with pytest.raises(ConfigError, match=r"'data.subset' = 13 is larger than the fashion_mnist training split "
                                          r"\(12 images\); set data.subset to at most 12, or to null"):
        load_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), subset=13))
    assert len(load_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), subset=12))[0]) == 12
    # the CLI: exit 2, one line, and no run folder left behind
    code, _, err = run_main("train", *tiny_yaml(tmp_path), *sets("data.subset=100000"), "-o", str(tmp_path / "r"),
                            "-q")
    size = load_config(None, TINY).data.synthetic_size
    assert_one_error(code, err, 2, "'data.subset' = 100000", f"synthetic training split ({size} images)")
    assert not (tmp_path / "r").exists()
    # plan and flops check the published size and read no data
    import spfde.data

    monkeypatch.setattr(spfde.data, "load_datasets", lambda *a, **k: pytest.fail("plan read the data"))
    for command in ("plan", "flops"):
        code, _, err = run_main(command, *DEMO, *sets("data.subset=60001"))
        assert_one_error(code, err, 2, "'data.subset' = 60001", "fashion_mnist training split (60000 images)")
    code, out, err = run_main("flops", *DEMO, *sets("data.subset=60000"), "--json")
    assert code == 0 and json.loads(out)["train_flops"] > 0, err


@pytest.mark.parametrize("damage", [b'{"final_test_acc": 0.5, "wall', b"[1, 2]", b'{"wall_s": "\x80"}',
                                    b'{"final_test_acc": "high"}'], ids=["torn", "list", "binary", "text"])
def test_resume_of_a_finished_run_rewrites_a_damaged_summary(tmp_path, damage):
    """A finished run whose summary.json is damaged: `--resume` writes it again from the last
    checkpoint (every field of it is there) instead of a JSONDecodeError/AttributeError traceback."""
    run = tmp_path / "run"
    cfg = tiny_cfg(*SPFDE, "train.epochs=2", "sparsity.search_end=1", "freezing.target=0.05")
    summary = train(cfg, run, quiet=True)
    (run / "summary.json").write_bytes(damage)
    code, _, err = run_main("train", "--resume", str(run))
    assert code == 0 and "Traceback" not in err, err
    again = json.loads((run / "summary.json").read_text())
    mutable = {"threads"}  # the only field a resume may set otherwise (README, "Threads")
    assert {k: v for k, v in again.items() if k not in mutable} == {
        k: v for k, v in summary.items() if k not in mutable}
    # an intact summary is returned as it is, without training anything again
    (run / "summary.json").write_text(json.dumps({**summary, "final_test_acc": 0.125}))
    assert resume(run, quiet=True)["final_test_acc"] == 0.125


def test_resume_of_a_folder_that_is_not_a_run_exits_2(tmp_path):
    (tmp_path / "folder").mkdir()
    for target in (tmp_path / "folder", tmp_path / "missing"):
        code, _, err = run_main("train", "--resume", str(target))
        assert_one_error(code, err, 2, "not a spfde run directory")


# The controller itself (not only the CLI boundary) raises ConfigError for these
@pytest.mark.parametrize("freezing", [{"target": 0.99}, {"target": 0.1, "blocks": ["nosuchblock"]}],
                         ids=["unreachable", "unknown-block"])
def test_controller_raises_config_errors(freezing):
    from torch import nn

    from spfde import SpFDE

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError):
        SpFDE(model, opt, {"train": {"epochs": 10, "interval": 1}, "freezing": freezing}, train_size=64,
              example_input=torch.zeros(1, 3, 12, 12))


_SIGTERM_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from spfde.cli import main
from spfde.train import Trainer
original = Trainer.checkpoint
def checkpoint(self, e):
    original(self, e)
    if e == 0:
        os.kill(os.getpid(), signal.SIGTERM)
Trainer.checkpoint = checkpoint
sys.exit(main({argv!r}))
"""


@pytest.mark.slow
def test_sigterm_is_handled_like_sigint(tmp_path):
    ref = train(tiny_cfg("train.epochs=3"), tmp_path / "ref", quiet=True)
    run = tmp_path / "run"
    argv = ["train", *tiny_yaml(tmp_path), *sets("train.epochs=3"), "-o", str(run), "-q"]
    child = _SIGTERM_CHILD.format(tests=str(Path(__file__).parent), argv=argv)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 143, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == f"terminated; resume with `spfde train --resume {run}`"
    assert "Traceback" not in r.stderr and -signal.SIGTERM != r.returncode
    code, _, err = run_main("train", "--resume", str(run), "-q")
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["weights_sha256"] == ref["weights_sha256"]


def test_sigint_message_says_resume_only_when_there_is_a_run(tmp_path, monkeypatch):
    def no_start(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "__init__", no_start)
    code, _, err = run_main("train", *tiny_yaml(tmp_path), "-o", str(tmp_path / "r"))
    assert code == 130 and "--resume" not in err and "nothing to resume" in err
    assert not (tmp_path / "r").exists()
    monkeypatch.undo()
    interrupt_after(monkeypatch, 0)
    code, _, err = run_main("train", *tiny_yaml(tmp_path), "-o", str(tmp_path / "r"), "-q")
    assert code == 130 and err.strip() == f"interrupted; resume with `spfde train --resume {tmp_path / 'r'}`"


# ------------------------------------------------------------------------------------------
# valid input refused; odd but silent


def test_overrides_are_read_by_the_field_type():
    cfg = load_config("fmnist-demo", ["data.root=inf", "model.name=1e3", "optim.lr=1e-3", "train.amp=off",
                                      "sparsity.layer_overrides.layer1.0.conv1=0.5",
                                      "sparsity.layer_overrides.fc=0.25"])
    assert cfg.data.root == "inf" and cfg.model.name == "1e3" and cfg.optim.lr == 1e-3 and cfg.train.amp == "off"
    assert cfg.sparsity.layer_overrides == {"layer1.0.conv1": 0.5, "fc": 0.25}
    assert load_config("fmnist-demo", ["data.root=123"]).data.root == "123"
    assert load_config("fmnist-demo", ["data.root=null"]).data.root is None
    for bad in ("optim.lr", "=3", "optim..lr=1", "optim.lr.=1"):
        with pytest.raises(ConfigError, match="override"):
            load_config("fmnist-demo", [bad])


def test_empty_sections_and_integer_layer_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: resnet20\nfreezing:\nsieving: {}\nsparsity:\n  layer_overrides: {0: 0.5}\n")
    cfg = load_config(path)
    assert cfg.freezing.target == 0.0 and cfg.sieving.method == "circular"
    assert cfg.sparsity.layer_overrides == {"0": 0.5}  # nn.Sequential names are digits


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "---\n"])
def test_empty_config_warns_in_one_line(tmp_path, capsys, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.train.epochs == 160
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "empty" in err[0] and "train.epochs=160" in err[0]


def test_duplicate_keys_are_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 4 column 3: .*duplicate key 'lr' \(first at line 2\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(None, ["sparsity.layer_overrides={a: 0.5, a: 0.6}"])


# ------------------------------------------------------------------------------------------
# issue 16, items 3 and 4


def test_every_problem_of_a_config_is_reported_at_once(tmp_path):
    bad = ["train.epochs=0", "optim.lr=fast", "optim.lrr=1", "train.device=gpu", "sparsity.target=1.5"]
    with pytest.raises(ConfigError) as e:
        load_config("fmnist-demo", bad)
    assert len(e.value.problems) == 5 and str(e.value).startswith("5 problems in the config: (1) ")
    for key in ("train.epochs", "optim.lr", "optim.lrr", "train.device", "sparsity.target"):
        assert key in str(e.value)
    code, _, err = run_main("train", *DEMO, *sets(*bad), "-o", str(tmp_path / "r"))
    assert_one_error(code, err, 2, "5 problems")
    assert len(err.strip().splitlines()) == 1
    # a cross-field rule is checked when its fields are valid, and reported with the rest
    with pytest.raises(ConfigError) as e:
        load_config("fmnist-demo", ["train.epochs=5", "sparsity.search_end=7", "optim.momentum=2"])
    assert len(e.value.problems) == 2 and "search_end" in str(e.value)
    with pytest.raises(ConfigError) as e:  # epochs itself is bad: no second, derived complaint
        load_config("fmnist-demo", ["train.epochs=-5", "sparsity.search_end=7"])
    assert len(e.value.problems) == 1


def test_on_off_words_for_auto_on_off_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  channels_last: on\n  amp: off\n")
    cfg = load_config(path)
    assert (cfg.train.channels_last, cfg.train.amp) == ("on", "off")
    cfg = load_config(path, ["train.channels_last=off", "train.amp=yes"])
    assert (cfg.train.channels_last, cfg.train.amp) == ("off", "on")
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(path, ["train.amp=maybe"])


def test_nesterov_without_momentum_is_a_config_error():
    """Found by the fuzz test: SGD(nesterov=True, momentum=0) raised a ValueError from torch at start."""
    from spfde.config import from_dict

    with pytest.raises(ConfigError, match="optim.nesterov"):
        from_dict({"optim": {"nesterov": True, "momentum": 0.0}})
    assert from_dict({"optim": {"nesterov": True, "momentum": 0.9}}).optim.nesterov


def test_resume_accepts_cache_and_kernel_changes_behind_the_flag():
    """freezing.cache gives the same weights (it changes the ledger's forward FLOPs), the kernels the
    same function: e.g. a `freezing.cache: on` refused mid-run resumes with `auto`."""
    from spfde.checkpoint import check_resume_config

    old = load_config(None, ["freezing.cache=on"]).to_dict()
    for change in (["freezing.cache=auto"], ["freezing.cache_max_bytes=1000000"], ["sparsity.kernels=dense"],
                   ["sparsity.kernels_calibration=off"]):
        new = load_config(None, ["freezing.cache=on", *change]).to_dict()
        with pytest.raises(ConfigError, match="--allow-config-change"):
            check_resume_config(old, new, allow_change=False, run="r")
        accepted = check_resume_config(old, new, allow_change=True, run="r")
        assert len(accepted) == 1 and accepted[0].startswith(change[0].split("=")[0])


@pytest.mark.parametrize("case", ["two inputs", "wrong width", "lazy"])
def test_controller_setup_errors_name_the_model_and_its_input(case):
    from torch import nn

    from spfde import SpFDE

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x, pad_mask):
            return self.b(self.a(x * pad_mask))

    model = {"two inputs": TwoInputs(), "wrong width": nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2)),
             "lazy": nn.Sequential(nn.LazyLinear(16), nn.Linear(16, 2))}[case]
    x = torch.randn(4, 9 if case == "wrong width" else 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SpfdeError) as e:
        SpFDE(model, opt, {"sparsity": {"method": "mest", "target": 0.5}}, train_size=8, example_input=x)
    msg = str(e.value)
    if case == "lazy":
        assert "uninitialized lazy parameter" in msg and "'0.weight'" in msg and "forward pass" in msg
    else:
        width = 9 if case == "wrong width" else 8
        assert f"the model's forward failed on example_input (per-sample shape ({width},))" in msg
        assert "only argument" in msg
        assert ("pad_mask" if case == "two inputs" else "cannot be multiplied") in msg


# ------------------------------------------------------------------------------------------
# one process per run folder


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, monkeypatch):
    from spfde.utils import LOCK_NAME, RunLock

    run = tmp_path / "run"
    killed_after_first_epoch(run, monkeypatch)
    assert not (run / LOCK_NAME).exists()  # an interrupted run let go of its folder
    before = file_sha256(run / "checkpoints" / "last.pt")
    with RunLock(run):  # another spfde process's lock (a second open file conflicts within one process too)
        for argv in (["train", "--resume", str(run), "-q"],
                     ["train", *tiny_yaml(tmp_path), "-o", str(run), "--force", "-q"]):
            code, _, err = run_main(*argv)
            assert_one_error(code, err, 1, f"run folder '{run}' is in use by another spfde process "
                                           f"(pid {os.getpid()})", "wait for it to end")
        with RunLock(run, enabled=False):  # a torchrun rank other than 0 takes no lock: rank 0 holds the folder
            pass
    assert file_sha256(run / "checkpoints" / "last.pt") == before and (run / "config.yaml").is_file()
    assert resume(run, quiet=True)["epochs"] == 2  # the folder is free again
    assert not (run / LOCK_NAME).exists()
    # --force over a run: the lock is taken before the old run is deleted, and kept through it
    def held(self: Trainer) -> dict:
        probe = RunLock(run)
        try:
            probe.acquire()
        except SpfdeError:
            return {"held": True}
        probe.release()
        return {"held": False}

    monkeypatch.setattr(Trainer, "run", held)
    assert train(tiny_cfg("train.epochs=2"), run, force=True, quiet=True) == {"held": True}
    assert not (run / LOCK_NAME).exists() and not (run / "checkpoints").exists()


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_the_lock_of_a_killed_process_is_gone_with_it(tmp_path):
    from spfde.utils import LOCK_NAME, RunLock

    run = tmp_path / "run"
    run.mkdir()
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(SpfdeError, match=rf"is in use by another spfde process \(pid {child.pid}\)"):
            RunLock(run).acquire()
    finally:
        child.kill()
        child.wait()
    assert (run / LOCK_NAME).exists()  # what a crash leaves behind does not hold the folder
    with RunLock(run) as lock:
        assert lock.held and (run / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (run / LOCK_NAME).exists()
