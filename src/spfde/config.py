"""The configuration schema, YAML loading, dotted overrides and validation.

Every key a run can take is a field below, with its default and its allowed values. Loading is
strict: an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError` naming
the dotted field and what is allowed, before any work starts (the CLI exits with code 2).

Defaults follow the paper's CIFAR setting (Table A3) unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from spfde.errors import ConfigError, warn

# Presets live in the repository's configs/ folder; an installed copy also looks in ./configs.
CONFIG_DIRS = (Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs")


def _f(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, hi_open: bool = False, doc: str = "", default_factory: Any = None) -> Any:
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder", "digits", "synthetic"] = _f(
        "fashion_mnist", doc="dataset")
    root: str | None = _f(None, doc="dataset folder; default: $SPFDE_DATA or the dataset's usual place")
    subset: int | None = _f(None, lo=1, doc="train on N samples: class-stratified, drawn from the seed; more than "
                                             "the training split holds is an error")
    test_subset: int | None = _f(None, lo=1, doc="test on N samples: class-stratified, drawn from the seed; "
                                                   "more than the test split holds is an error")
    batch_size: int = _f(128, lo=1, hi=2**20)
    eval_batch_size: int = _f(1000, lo=1, hi=2**20)
    augment: bool = _f(True, doc="random crop with padding + horizontal flip")
    crop_padding: int = _f(4, lo=0, hi=128)
    flip: bool = _f(True)
    pad_to_32: bool = _f(False, doc="to 32x32: Fashion-MNIST zero-pads 28->32, digits upsamples 8->32")
    channels: int | None = _f(None, lo=1, hi=3, doc="repeat grey images to this many channels")
    image_size: int = _f(32, lo=8, hi=1024, doc="imagefolder/synthetic: side length")
    loader: Literal["tensor", "torch"] = _f("tensor", doc="tensor-resident loader or torch DataLoader")
    num_workers: int = _f(0, lo=0, hi=256)
    synthetic_size: int = _f(512, lo=1, hi=10**6)
    synthetic_classes: int = _f(10, lo=2, hi=10**5)


@dataclass
class ModelConfig:
    name: str = _f("resnet20", doc="a name from `spfde models`, or your own model as 'package.module:callable'")
    width: float = _f(1.0, lo=0.0, hi=64.0, lo_open=True, doc="width multiplier (ResNet-32 2x: 2.0)")
    kwargs: dict[str, Any] = _f(default_factory=dict, doc="keyword arguments for model.name's callable")


@dataclass
class OptimConfig:
    lr: float = _f(0.15, lo=0.0, hi=1e3, lo_open=True)
    end_lr: float = _f(4e-8, lo=0.0, hi=1e3)
    momentum: float = _f(0.9, lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = _f(1e-4, lo=0.0, hi=1.0)
    nesterov: bool = _f(False)
    label_smoothing: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)
    schedule: Literal["cosine", "constant"] = _f("cosine")
    warmup_epochs: int = _f(0, lo=0, hi=10**4)


@dataclass
class TrainConfig:
    epochs: int = _f(160, lo=1, hi=10**4)
    interval: int = _f(5, lo=1, hi=10**4, doc="Δτ: epochs between structure/data/freezing updates")
    device: str = _f("auto", doc="auto, cpu, cuda, cuda:N")
    channels_last: Literal["auto", "on", "off"] = _f("auto")
    amp: Literal["auto", "on", "off"] = _f("auto", doc="mixed precision on CUDA")
    eval_every: int = _f(1, lo=1, hi=10**4)
    threads: int | None = _f(None, lo=1, hi=1024,
                             doc="torch CPU threads; null: the free cores at start (README, Threads)")
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop", doc="a NaN/inf training loss: stop (exit 3, last checkpoint kept) or skip that step")


@dataclass
class SparsityConfig:
    method: Literal["mest", "set", "rigl", "static", "dense"] = _f("mest")
    target: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="fraction of zero weights per layer")
    distribution: Literal["uniform", "erk"] = _f("uniform")
    dense_first_layer: bool = _f(True)
    dense_last_layer: bool = _f(True, doc="keep the last prunable layer in forward order (the classifier) dense")
    search_end: int | float | None = _f(None, lo=0, hi=10**4, doc="last epoch of structure search: an epoch (int) "
                                                            "or a fraction of train.epochs (float in (0, 1]); "
                                                            "default 0.75")
    layer_overrides: dict[str, float] = _f(default_factory=dict, lo=0.0, hi=1.0, hi_open=True,
                                           doc="{layer name: sparsity}")
    include: list[str] | None = _f(None, doc="prunable parameter or module names, whole dotted components (default: "
                                             "every conv/linear weight and attention projection)")
    exclude: list[str] = _f(default_factory=list, doc="parameter or module names never pruned")
    mest_lambda: float = _f(0.0, lo=0.0, hi=1e6, doc="λ in MEST importance |w| + λ|g| (0: |w| only, as MEST's code)")
    grow_early: float = _f(0.05, lo=0.0, hi=1.0, doc="grow to s - grow_early before the switch")
    grow_late: float = _f(0.025, lo=0.0, hi=1.0, doc="grow to s - grow_late after the switch")
    grow_switch: float = _f(0.75, lo=0.0, hi=1.0, doc="fraction of the search where grow_late starts")
    drop_fraction: float = _f(0.3, lo=0.0, hi=1.0, doc="SET/RigL initial drop fraction")
    grow_exclude_dropped: bool = _f(False, doc="never regrow a weight dropped in the same update (false: each "
                                               "method's own code, which may)")
    update_unit: Literal["epoch", "step"] = _f("epoch", doc="rigl/set: update at epoch starts every train.interval "
                                                            "epochs, or every update_interval_steps steps")
    update_interval_steps: int = _f(100, lo=1, doc="ΔT in optimizer steps for update_unit: step (RigL: 100)")
    static_init: Literal["random", "snip"] = _f("random")
    kernels: Literal["auto", "dense", "sparse"] = _f(
        "auto", doc="kernels of masked layers: auto (sparse where measured faster), dense, sparse (docs/kernels.md)")
    kernels_calibration: str = _f(
        "auto", doc="where kernels: auto stores its timed decisions for later runs (same machine + same file: "
                    "bit-identical fresh runs): auto (calibration.json in the native kernel cache, "
                    "$SPFDE_KERNEL_CACHE), off (time every run), or a file path")


@dataclass
class FreezingConfig:
    target: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="training-FLOPs reduction from freezing")
    tfrz: int | float | Literal["auto"] = _f("auto", doc="epoch to freeze the first block (on the Δτ grid), a "
                                                         "fraction of train.epochs (snapped to the grid), or auto")
    scheme: Literal["single_shot", "single_shot_resume", "periodic", "delayed_periodic"] = _f("single_shot")
    blocks: list[str] | None = _f(None, doc="override the model's blocks, in forward order: module names, parameter "
                                            "names (cls_token) or globs (features.*)")
    max_blocks_fraction: float = _f(2 / 3, lo=0.0, hi=1.0, lo_open=True)
    freeze_head: bool = _f(False)
    resume_epochs: int | None = _f(None, lo=0, hi=10**4, doc="single_shot_resume: defrost for the last t epochs")
    block_lr: bool = _f(True, doc="block-wise cosine LR over each block's active epochs")
    prune_on_freeze: bool = _f(True, doc="MEST: a layer's last structure update before it freezes prunes it to "
                                         "its target sparsity and grows nothing")
    planner: Literal["algorithm1", "exact"] = _f("algorithm1", doc="algorithm1: the paper's arithmetic; exact: "
                                                 "re-plan until the exact FLOPs ledger meets the target")
    unreachable: Literal["error", "reduce"] = _f(
        "error", doc="a target the schedule cannot reach (e.g. a shortened train.epochs): error, or reduce: freeze "
                     "as much as the schedule allows, with one warning line (docs/freezing.md)")
    cache: Literal["auto", "off", "on"] = _f(
        "auto", doc="serve the frozen blocks' output from a per-sample cache (no forward for them): auto where "
                    "exact (no augmentation, dropout or batch statistics in the frozen blocks, not distributed) "
                    "and within cache_max_bytes; on: an error where it cannot be exact or exceeds an explicit "
                    "cache_max_bytes")
    cache_max_bytes: int | None = _f(None, lo=0, doc="largest cache; auto's default a quarter of the device's free "
                                                     "memory at start")


@dataclass
class SievingConfig:
    method: Literal["circular", "random", "static", "none"] = _f("circular")
    ratio: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="p: fraction of the training set removed")
    update_ratio: float = _f(0.3, lo=0.0, hi=1.0, lo_open=True, doc="share of the removed queue returned per update")
    static_warmup: int | None = _f(None, lo=0, hi=10**4, doc="static: epochs before the one-shot removal (default Δτ)")
    carry_status: bool = _f(False, doc="false: forgetting events only within each Δτ interval (the paper); true: "
                                       "a sample's first sighting in an interval is compared with its last one before")
    criterion: Literal["forgetting", "loss"] = _f(
        "forgetting", doc="sample difficulty: forgetting events (single-label classification) or the last "
                          "per-sample training loss (any model; the loop passes losses to after_step)")


@dataclass
class AccountingConfig:
    backward: Literal["paper", "exact"] = _f(
        "paper", doc="paper: backward = 2x forward; exact: no input gradient for the first active layer")


@dataclass
class AnalysisConfig:
    snapshots: bool = _f(False, doc="save checkpoints at each Δτ for the similarity analyses")
    grad_norms: bool = _f(False, doc="record per-layer gradient norms each epoch")
    probe_size: int = _f(256, lo=1, hi=2**20)


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(False)
    progress: bool = _f(True)


@dataclass
class Config:
    seed: int = _f(0, lo=0, hi=2**63 - 1)
    data: DataConfig = _f(default_factory=DataConfig)
    model: ModelConfig = _f(default_factory=ModelConfig)
    optim: OptimConfig = _f(default_factory=OptimConfig)
    train: TrainConfig = _f(default_factory=TrainConfig)
    sparsity: SparsityConfig = _f(default_factory=SparsityConfig)
    freezing: FreezingConfig = _f(default_factory=FreezingConfig)
    sieving: SievingConfig = _f(default_factory=SievingConfig)
    accounting: AccountingConfig = _f(default_factory=AccountingConfig)
    analysis: AnalysisConfig = _f(default_factory=AnalysisConfig)
    logging: LoggingConfig = _f(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Epoch-valued keys the paper gives as a share of training (Table A3: search 120 of 160 epochs;
    # Table A4: Tfrz 60 of 160) take an int (an epoch) or a float in (0, 1] (that fraction of
    # train.epochs), so a preset keeps its schedule's shape when train.epochs changes. Resolved here only.
    def epoch_of(self, key: str, value: int | float) -> int:
        """The epoch an epoch-valued key names: an int as is, a float ``f`` in (0, 1] as ``floor(f·T)``."""
        if isinstance(value, float):
            if not 0.0 < value <= 1.0:
                raise ConfigError(
                    f"config field '{key}' = {value!r}: a float is a fraction of train.epochs and must lie in "
                    f"(0, 1]; write an integer for an absolute epoch (e.g. {max(int(value), 1)})")
            return math.floor(value * self.train.epochs + 1e-9)
        return int(value)

    @property
    def search_end(self) -> int:
        """``sparsity.search_end`` as an epoch; default 3/4 of training (Table A3: 120 of 160)."""
        se = self.sparsity.search_end
        return self.epoch_of("sparsity.search_end", 0.75 if se is None else se)

    @property
    def tfrz(self) -> int | str:
        """``freezing.tfrz`` as an epoch (or ``"auto"``); a fraction snaps to the nearest multiple of Δτ
        (Algorithm 1 freezes only at ``epoch mod Δτ == 0``), at least Δτ."""
        t = self.freezing.tfrz
        if not isinstance(t, float):
            return t
        if not 0.0 < t < 1.0:
            raise ConfigError(f"config field 'freezing.tfrz' = {t!r}: a float is a fraction of train.epochs and must "
                              "lie in (0, 1); write an integer for an absolute epoch, or auto")
        iv = self.train.interval
        return max(iv, round(t * self.train.epochs / iv) * iv)

    def resolve_epochs(self) -> dict[str, Any]:
        """Every epoch-valued key resolved (raises :class:`ConfigError` for a bad fraction)."""
        return {"sparsity.search_end": self.search_end, "freezing.tfrz": self.tfrz}


# --------------------------------------------------------------------------------------------
# validation
#
# A config is checked as a whole: every problem (unknown key, wrong type, out-of-range value,
# cross-field rule) is collected and reported at once in one ConfigError (issue 16). One
# problem reads as before ("config field 'x' ..."); several as "N problems in the config:
# (1) ...; (2) ...", still one line.


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_describe(k)} to {_describe(v)}"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", Any: "any value"}
    return names.get(tp, str(tp))


# Values are shown in messages bounded in length and depth: a hostile file (a huge string, or
# YAML aliases nested into an exponentially large structure) must not make the message huge.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 6, 6


def _show(value: Any) -> str:
    return _REPR.repr(value)


_NO = object()
# YAML 1.1 reads on/off (and yes/no, true/false) as booleans; a field whose values are
# "auto"/"on"/"off" takes them back as the words docs/config.md spells (issue 16).
_BOOL_WORDS = {True: "on", False: "off"}


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or ``_NO`` when it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        args = typing.get_args(tp)
        if isinstance(value, bool):
            value = _BOOL_WORDS[value]
        return value if isinstance(value, str) and value in args else _NO
    if origin in (Union, types.UnionType):
        for a in typing.get_args(tp):
            out = _coerce(value, a)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float: the range check refuses it
                return math.inf
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO
        (inner,) = typing.get_args(tp)
        out = [_coerce(v, inner) for v in value]
        return _NO if any(o is _NO for o in out) else out
    if origin is dict:
        if not isinstance(value, dict):
            return _NO
        kt, vt = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if kt is str and isinstance(k, int) and not isinstance(k, bool):
                k = str(k)  # nn.Sequential layer names are digits, which YAML reads as integers
            out[_coerce(k, kt)] = _coerce(v, vt)
        return _NO if any(k is _NO or v is _NO for k, v in out.items()) else out
    return _NO


Problems = list[tuple[str, str]]  # (dotted key, message)


def _build(cls: type, data: Any, prefix: str, problems: Problems) -> Any:
    """``cls`` built from ``data``; a field with a problem keeps its default and the problem is
    appended to ``problems``, so one pass finds them all."""
    section = prefix.rstrip(".") or "<root>"
    if data is None:  # an empty section (`freezing:` with nothing under it) means its defaults
        data = {}
    if not isinstance(data, dict):
        problems.append((prefix.rstrip("."), f"config field '{section}' must be a mapping, got {_show(data)}"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted((k for k in data if k not in fields), key=str):
        problems.append((f"{prefix}{name}", f"unknown config key '{prefix}{name}'; allowed keys under "
                                            f"'{section}': {', '.join(sorted(fields))}"))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            continue
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".", problems)
            continue
        out = _coerce(value, tp)
        if out is _NO:
            problems.append((key, f"config field '{key}' must be {_describe(tp)}, got {_show(value)}"))
            continue
        msg = _check_range(key, out, fields[name].metadata)
        if msg:
            problems.append((key, msg))
            continue
        kwargs[name] = out
    return cls(**kwargs)


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    """The problem with ``value`` against the field's ``lo``/``hi`` bounds, or None."""
    lo, hi = meta.get("lo"), meta.get("hi")
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            return f"config field '{key}' = {v!r} must be a finite number"
        bad = (lo is not None and (v < lo or (meta.get("lo_open") and v == lo))) or (
            hi is not None and (v > hi or (meta.get("hi_open") and v == hi)))
        if bad:
            return f"config field '{key}' = {_show(v)} is out of range; allowed: {_range_text(meta)}"
    return None


def _range_text(meta: typing.Mapping[str, Any]) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


_DEVICE = re.compile(r"(auto|cpu|cuda(:\d{1,4})?)")

#: the channels of each dataset's images as they are read (an image folder is decoded as RGB); synthetic
#: data is made with data.channels channels, any count
SOURCE_CHANNELS = {"fashion_mnist": 1, "digits": 1, "cifar10": 3, "cifar100": 3, "imagefolder": 3}


def channels_fit(source: int, channels: int | None) -> bool:
    """Whether ``source``-channel images can be given ``data.channels``: grey images are repeated to any
    count, RGB ones made grey (1) or kept (3); null keeps what is read. The rule of
    :func:`spfde.data.datasets.set_channels`, checked here from the dataset's name before anything loads."""
    return channels is None or channels == source or source == 1 or (source == 3 and channels == 1)



def _cross_problems(cfg: Config) -> list[tuple[tuple[str, ...], str]]:
    """Rules between fields, each with the keys it reads (skipped when one of them had a problem)."""
    out: list[tuple[tuple[str, ...], str]] = []
    if cfg.sparsity.method == "dense" and cfg.sparsity.target > 0:
        out.append((("sparsity.method", "sparsity.target"),
                    f"config field 'sparsity.target' = {cfg.sparsity.target} needs a sparse method; "
                    "set sparsity.method to mest, set, rigl or static (or target to 0)"))
    try:
        cfg.resolve_epochs()
    except ConfigError as e:
        out.append((("sparsity.search_end", "freezing.tfrz", "train.epochs", "train.interval"), str(e)))
    if cfg.sparsity.search_end is not None and cfg.sparsity.search_end > cfg.train.epochs:
        out.append((("sparsity.search_end", "train.epochs"),
                    f"config field 'sparsity.search_end' = {cfg.sparsity.search_end} is after the last epoch; "
                    f"allowed: 0..train.epochs ({cfg.train.epochs})"))
    if isinstance(cfg.freezing.tfrz, int) and not 0 < cfg.freezing.tfrz < cfg.train.epochs:
        out.append((("freezing.tfrz", "train.epochs"),
                    f"config field 'freezing.tfrz' = {cfg.freezing.tfrz} must satisfy 0 < tfrz < train.epochs "
                    f"({cfg.train.epochs}), or be 'auto'"))
    if cfg.freezing.resume_epochs is not None and cfg.freezing.resume_epochs >= cfg.train.epochs:
        out.append((("freezing.resume_epochs", "train.epochs"),
                    f"config field 'freezing.resume_epochs' = {cfg.freezing.resume_epochs} must be smaller than "
                    f"train.epochs ({cfg.train.epochs})"))
    if cfg.optim.nesterov and cfg.optim.momentum == 0:
        out.append((("optim.nesterov", "optim.momentum"),
                    "config field 'optim.nesterov' = true needs a momentum; set optim.momentum > 0 "
                    "(e.g. 0.9) or optim.nesterov: false"))
    if cfg.freezing.blocks == []:
        out.append((("freezing.blocks",), "config field 'freezing.blocks' is an empty list; name the model's "
                                          "blocks in forward order, or leave it null for the model's own"))
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        out.append((("data.name", "data.root"),
                    "config field 'data.root' is needed with data.name = 'imagefolder': a folder with "
                    "train/<class>/ and val/<class>/ image folders"))
    if not cfg.sparsity.kernels_calibration.strip():
        out.append((("sparsity.kernels_calibration",), "config field 'sparsity.kernels_calibration' is empty; "
                                                       "allowed: auto, off, or a file path"))
    source = SOURCE_CHANNELS.get(cfg.data.name)
    if source is not None and not channels_fit(source, cfg.data.channels):
        out.append((("data.channels", "data.name"),
                    f"config field 'data.channels' = {cfg.data.channels} cannot be made from {cfg.data.name}'s "
                    f"{source}-channel images; allowed: 1 (grey), 3 (RGB) or null (as read)"))
    if not _DEVICE.fullmatch(cfg.train.device):
        out.append((("train.device",), f"config field 'train.device' = {_show(cfg.train.device)}; "
                                       "allowed: auto, cpu, cuda, cuda:N"))
    return out


def config_warnings(cfg: Config) -> list[str]:
    """Settings that contradict each other but harm nothing: the run goes on and ignores one of
    them. One line each, said once at run setup (:class:`spfde.controller.SpFDE`, which the trainer
    and ``spfde plan``/``flops`` build), not at every load: ``spfde report`` reads finished runs' configs.

    The usual ways of switching a feature off stay silent: sieving with ``sieving.ratio: 0`` (the
    default, whatever the method), ``freezing.cache: auto`` with ``freezing.target: 0``.
    """
    out: list[str] = []
    sv, fz, opt = cfg.sieving, cfg.freezing, cfg.optim
    if sv.method == "none" and sv.ratio > 0:
        out.append(f"sieving.ratio = {sv.ratio} is ignored: sieving.method is 'none', so every sample is trained on; "
                   "set sieving.ratio: 0 to say so, or a sieving.method (circular, random, static) to sieve")
    if fz.cache == "on" and fz.target == 0:
        out.append("freezing.cache = 'on' has nothing to cache: freezing.target is 0, so no block freezes; set "
                   "freezing.target > 0 to freeze, or freezing.cache: auto")
    if opt.warmup_epochs > 0 and opt.schedule == "constant":
        out.append(f"optim.warmup_epochs = {opt.warmup_epochs} is ignored: optim.schedule is 'constant', which "
                   "keeps the learning rate as it is set from the first step; set optim.warmup_epochs: 0, or "
                   "optim.schedule: cosine to warm up")
    elif opt.warmup_epochs >= cfg.train.epochs:
        # a warning, not an error: the run is sound (only slower to learn), and shortening a preset that
        # warms up (fmnist-vit: 1 epoch) to a 1-epoch smoke test is a normal thing to do
        out.append(f"optim.warmup_epochs = {opt.warmup_epochs} is not below train.epochs = {cfg.train.epochs}: "
                   "the learning rate rises for the whole run and never reaches its peak (optim.lr), and no "
                   "cosine decay follows; lower optim.warmup_epochs or raise train.epochs")
    return out


def warn_config(cfg: Config) -> None:
    """Say :func:`config_warnings`, one ``warning:`` line each."""
    for message in config_warnings(cfg):
        warn(message)


def _raise_problems(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise ConfigError(f"{len(problems)} problems in the config: {listed}", problems)


def from_dict(data: dict[str, Any] | None) -> Config:
    problems: Problems = []
    cfg = _build(Config, data or {}, "", problems)
    bad = [k for k, _ in problems]

    def touched(keys: tuple[str, ...]) -> bool:
        return any(k == b or k.startswith(b + ".") or not b for k in keys for b in bad)

    found = [m for _, m in problems] + [m for keys, m in _cross_problems(cfg) if not touched(keys)]
    _raise_problems(found)
    return cfg


# --------------------------------------------------------------------------------------------
# overrides (--set key=value)


def _split_override(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. --set optim.lr=0.1")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r} has an empty key part; write dotted keys like "
                          "--set optim.lr=0.1")
    return [p.strip() for p in parts], raw


def _yaml_value(raw: str) -> tuple[Any, str | None]:
    """``raw`` read as a YAML value, and the YAML problem when it is not valid YAML (the value
    is then the text itself)."""
    if not raw.strip():
        return None, None
    try:
        return yaml.load(raw, Loader=_Loader), None  # noqa: S506 - _Loader is a SafeLoader
    except (yaml.YAMLError, RecursionError) as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        return raw.strip(), str(problem)


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is parsed as YAML (without a schema:
    :func:`apply_overrides` reads it by the field's type)."""
    parts, raw = _split_override(text)
    value, _ = _yaml_value(raw)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return ".".join(parts), value


def _schema_path(parts: list[str]) -> tuple[list[str], Any]:
    """Split a dotted key by the schema: ``(path, field type)``. Once a dict-typed field is
    reached the rest of the key is one dict key (``sparsity.layer_overrides.layer1.0.conv1``).
    The type is None for a key the schema does not know (validation reports it)."""
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return parts, None
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        rest = parts[i + 1:]
        dict_tp = next((a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is dict), None)
        if rest and dict_tp is not None:
            return parts[:i + 1] + [".".join(rest)], typing.get_args(dict_tp)[1]
        return parts, (tp if not rest else None)
    return parts, None


def _typed_value(text: str, raw: str, tp: Any) -> Any:
    """The override's value as the field's type reads it: ``data.root=inf`` stays the string
    "inf", ``optim.lr=1e-3`` is a number, ``train.amp=on`` is "on"."""
    value, problem = _yaml_value(raw)
    if tp is None or _coerce(value, tp) is not _NO:
        return value
    for alt in (raw.strip(), _float_or_none(raw)):
        if alt is not None and _coerce(alt, tp) is not _NO:
            return alt
    if problem is not None:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})")
    return value  # does not fit: validation names the field and what it takes


def _float_or_none(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for text in overrides or []:
        parts, raw = _split_override(text)
        parts, tp = _schema_path(parts)
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[parts[-1]] = _typed_value(text, raw, tp)
    return data


# --------------------------------------------------------------------------------------------
# YAML files

MAX_YAML_DEPTH = 32  # no config nests deeper than 3; this stops hostile nesting before recursion does


class _Loader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, unhashable keys and deep nesting, each with
    the line and column of the offending node."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not a {type(key).__name__}",
                    key_node.start_mark) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_show(key)} (first at line {first.line + 1}); "
                                "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _where(path: Path, line: int, column: int) -> str:
    return f"config file {str(path)!r} line {line + 1} column {column + 1}"


def _decode(path: Path, raw: bytes) -> str:
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ConfigError(f"config file {str(path)!r} is UTF-16 text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise ConfigError(f"{_where(path, line, column)}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                          "save it as UTF-8") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "invalid YAML"
        context = ""
        if e.context and e.problem and e.context_mark is not None:
            context = f" ({e.context} at line {e.context_mark.line + 1} column {e.context_mark.column + 1})"
        where = _where(path, mark.line, mark.column) if mark is not None else f"config file {str(path)!r}"
        raise ConfigError(f"{where}: not valid YAML: {what}{context}") from None
    except yaml.reader.ReaderError as e:  # a control character: only a position, no mark
        line = text.count("\n", 0, e.position)
        column = e.position - (text.rfind("\n", 0, e.position) + 1)
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise ConfigError(f"{_where(path, line, column)}: not valid YAML: the control character {char} "
                          "is not allowed in YAML text") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0][:200]}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    data = _parse_yaml(path, _decode(path, raw))
    if data is None:
        d = Config()
        warn(f"config file {str(path)!r} is empty: every key takes its default "
             f"(model.name={d.model.name}, data.name={d.data.name}, train.epochs={d.train.epochs}, "
             f"sparsity.target={d.sparsity.target}); see docs/config.md")
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def resolve_config_path(name: str | Path) -> Path:
    """A path, or the name of a bundled preset (``fmnist-demo``)."""
    p = Path(name)
    if p.exists():
        return p
    for d in CONFIG_DIRS:
        cand = d / f"{name}.yaml"
        if cand.exists():
            return cand
    presets = ", ".join(list_presets()) or "none found"
    raise ConfigError(f"config file {str(name)!r} not found; pass a YAML path or a preset: {presets}")


def list_presets() -> list[str]:
    return sorted({q.stem for d in CONFIG_DIRS if d.is_dir() for q in d.glob("*.yaml")})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_yaml(resolve_config_path(path)) if path is not None else {}
    return from_dict(apply_overrides(data, overrides))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def field_docs() -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field, for `docs/config.md` and `--help`."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            allowed = _describe(tp)
            if f.metadata.get("lo") is not None or f.metadata.get("hi") is not None:
                allowed += f" in {_range_text(f.metadata)}"
            rows.append((prefix + f.name, repr(default), f"{doc}; {allowed}" if doc else allowed))

    walk(Config, "")
    return rows


def config_markdown() -> str:
    """The body of docs/config.md (regenerate with ``python -m spfde.config > docs/config.md``)."""
    lines = ["# Configuration keys", "",
             "Generated from `src/spfde/config.py` by `python -m spfde.config > docs/config.md`.",
             "Set any key in a YAML file or with `--set key=value`.", "",
             "How a config is read:", "",
             "- Every problem of a config (unknown keys, wrong types, values out of range, rules between "
             "fields) is reported at once, on one line: `error: 3 problems in the config: (1) ...; (2) ...; "
             "(3) ...`; exit code 2.",
             "- `on`/`off` (YAML booleans, like `yes`/`no`, `true`/`false`) are accepted for the "
             "`'auto'`/`'on'`/`'off'` fields and read as `'on'`/`'off'`.",
             "- `--set` values are read by the field's type: `--set data.root=inf` stays a string, "
             "`--set optim.lr=1e-3` is a number. Past a mapping field the rest of the key is one mapping key: "
             "`--set sparsity.layer_overrides.layer1.0.conv1=0.5`. Integer keys of such a mapping (the layer "
             "names of an `nn.Sequential`) are read as strings.",
             "- An empty section (`freezing:` with nothing under it) takes that section's defaults. An empty or "
             "comment-only file trains with every default and says so in one `warning:` line.",
             "- Refused with the file, line and column: YAML syntax errors, duplicate keys, text that is not "
             f"UTF-8, nesting deeper than {MAX_YAML_DEPTH} levels.",
             "- Numbers must be finite; the ranges below are sanity bounds (a value outside is refused before "
             "any work starts).",
             "- Settings that contradict each other but harm nothing are run, with one `warning:` line each when "
             "the run is set up (`spfde train`, `plan`, `flops`; the controller in your own loop): "
             "`sieving.method: none` with a nonzero `sieving.ratio` (the ratio is ignored; `sieving.ratio: 0` "
             "is the silent way to switch sieving off, whatever the method), `freezing.cache: on` with "
             "`freezing.target: 0` (nothing freezes, nothing is cached), `optim.warmup_epochs` with "
             "`optim.schedule: constant` (no warmup) or not below `train.epochs` (the learning rate never "
             "reaches `optim.lr`; a warning, not an error, so a preset shortened to a smoke test still runs).",
             "",
             "| key | default | meaning / allowed |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {doc} |" for k, d, doc in field_docs()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_markdown(), end="")
