"""The configuration schema, YAML loading, dotted overrides and validation.

Every key a run can take is a field below, with its default and its allowed values. Loading is
strict: an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError` naming
the dotted field and what is allowed, before any work starts (the CLI exits with code 2).

Defaults follow the paper's CIFAR setting (Table A3) unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from spfde.errors import ConfigError

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
    subset: int | None = _f(None, lo=1, doc="train on N samples: class-stratified, drawn from the seed")
    test_subset: int | None = _f(None, lo=1, doc="test on N samples: class-stratified, drawn from the seed")
    batch_size: int = _f(128, lo=1)
    eval_batch_size: int = _f(1000, lo=1)
    augment: bool = _f(True, doc="random crop with padding + horizontal flip")
    crop_padding: int = _f(4, lo=0)
    flip: bool = _f(True)
    pad_to_32: bool = _f(False, doc="to 32x32: Fashion-MNIST zero-pads 28->32, digits upsamples 8->32")
    channels: int | None = _f(None, lo=1, hi=3, doc="repeat grey images to this many channels")
    image_size: int = _f(32, lo=8, doc="imagefolder/synthetic: side length")
    loader: Literal["tensor", "torch"] = _f("tensor", doc="tensor-resident loader or torch DataLoader")
    num_workers: int = _f(0, lo=0)
    synthetic_size: int = _f(512, lo=1)
    synthetic_classes: int = _f(10, lo=2)


@dataclass
class ModelConfig:
    name: str = _f("resnet20", doc="a name from `spfde models`, or your own model as 'package.module:callable'")
    width: float = _f(1.0, lo=0.0, lo_open=True, doc="width multiplier (ResNet-32 2x: 2.0)")
    kwargs: dict[str, Any] = _f(default_factory=dict, doc="keyword arguments for model.name's callable")


@dataclass
class OptimConfig:
    lr: float = _f(0.15, lo=0.0, lo_open=True)
    end_lr: float = _f(4e-8, lo=0.0)
    momentum: float = _f(0.9, lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = _f(1e-4, lo=0.0)
    nesterov: bool = _f(False)
    label_smoothing: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)
    schedule: Literal["cosine", "constant"] = _f("cosine")
    warmup_epochs: int = _f(0, lo=0)


@dataclass
class TrainConfig:
    epochs: int = _f(160, lo=1)
    interval: int = _f(5, lo=1, doc="Δτ: epochs between structure/data/freezing updates")
    device: str = _f("auto", doc="auto, cpu, cuda, cuda:N")
    channels_last: Literal["auto", "on", "off"] = _f("auto")
    amp: Literal["auto", "on", "off"] = _f("auto", doc="mixed precision on CUDA")
    eval_every: int = _f(1, lo=1)
    threads: int | None = _f(None, lo=1, doc="torch CPU threads; null: the free cores at start (README, Threads)")


@dataclass
class SparsityConfig:
    method: Literal["mest", "set", "rigl", "static", "dense"] = _f("mest")
    target: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="fraction of zero weights per layer")
    distribution: Literal["uniform", "erk"] = _f("uniform")
    dense_first_layer: bool = _f(True)
    dense_last_layer: bool = _f(True, doc="keep the last prunable layer in forward order (the classifier) dense")
    search_end: int | float | None = _f(None, lo=0, doc="last epoch of structure search: an epoch (int) or a "
                                                "fraction of train.epochs (float in (0, 1]); default 0.75")
    layer_overrides: dict[str, float] = _f(default_factory=dict, doc="{layer name: sparsity}")
    include: list[str] | None = _f(None, doc="prunable parameter or module names, whole dotted components (default: "
                                             "every conv/linear weight and attention projection)")
    exclude: list[str] = _f(default_factory=list, doc="parameter or module names never pruned")
    mest_lambda: float = _f(0.0, lo=0.0, doc="λ in MEST importance |w| + λ|g| (0: |w| only, as MEST's code)")
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
    resume_epochs: int | None = _f(None, lo=0, doc="single_shot_resume: defrost for the last t epochs")
    block_lr: bool = _f(True, doc="block-wise cosine LR over each block's active epochs")
    prune_on_freeze: bool = _f(True, doc="MEST: a layer's last structure update before it freezes prunes it to "
                                         "its target sparsity and grows nothing")
    planner: Literal["algorithm1", "exact"] = _f("algorithm1", doc="algorithm1: the paper's arithmetic; exact: "
                                                 "re-plan until the exact FLOPs ledger meets the target")
    cache: Literal["auto", "off", "on"] = _f(
        "auto", doc="serve the frozen blocks' output from a per-sample cache (no forward for them): auto where "
                    "exact (no augmentation, dropout or batch statistics in the frozen blocks, not distributed) "
                    "and within cache_max_bytes; on: an error where it cannot be exact")
    cache_max_bytes: int | None = _f(None, lo=0, doc="auto: largest cache; default a quarter of the device's free "
                                                     "memory at start")


@dataclass
class SievingConfig:
    method: Literal["circular", "random", "static", "none"] = _f("circular")
    ratio: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, doc="p: fraction of the training set removed")
    update_ratio: float = _f(0.3, lo=0.0, hi=1.0, lo_open=True, doc="share of the removed queue returned per update")
    static_warmup: int | None = _f(None, lo=0, doc="static: epochs before the one-shot removal (default Δτ)")
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
    probe_size: int = _f(256, lo=1)


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


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or ``_NO`` when it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(tp)):
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        return value if value in typing.get_args(tp) and not isinstance(value, bool) or (
            isinstance(value, bool) and value in typing.get_args(tp)) else _NO
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
            return float(value)
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
        out = {_coerce(k, kt): _coerce(v, vt) for k, v in value.items()}
        return _NO if any(k is _NO or v is _NO for k, v in out.items()) else out
    return _NO


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys under "
            f"'{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
            continue
        out = _coerce(value, tp)
        if out is _NO:
            raise ConfigError(f"config field '{key}' must be {_describe(tp)}, got {value!r}")
        _check_range(key, out, fields[name].metadata)
        kwargs[name] = out
    return cls(**kwargs)


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config field '{key}' = {v!r} must be a finite number")
        bad = (lo is not None and (v < lo or (meta.get("lo_open") and v == lo))) or (
            hi is not None and (v > hi or (meta.get("hi_open") and v == hi)))
        if bad:
            left = "(" if meta.get("lo_open") else "["
            right = ")" if meta.get("hi_open") else "]"
            rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ConfigError(f"config field '{key}' = {v!r} is out of range; allowed: {rng}")


def _cross_check(cfg: Config) -> None:
    if cfg.sparsity.method != "dense" and cfg.sparsity.target == 0.0 and cfg.sparsity.method != "mest":
        pass  # a sparse method at target 0 is a dense run; allowed for baselines
    if cfg.sparsity.method == "dense" and cfg.sparsity.target > 0:
        raise ConfigError(
            f"config field 'sparsity.target' = {cfg.sparsity.target} needs a sparse method; "
            "set sparsity.method to mest, set, rigl or static (or target to 0)")
    cfg.resolve_epochs()
    if cfg.sparsity.search_end is not None and cfg.sparsity.search_end > cfg.train.epochs:
        raise ConfigError(
            f"config field 'sparsity.search_end' = {cfg.sparsity.search_end} is after the last epoch; "
            f"allowed: 0..train.epochs ({cfg.train.epochs})")
    if isinstance(cfg.freezing.tfrz, int) and not 0 < cfg.freezing.tfrz < cfg.train.epochs:
        raise ConfigError(
            f"config field 'freezing.tfrz' = {cfg.freezing.tfrz} must satisfy 0 < tfrz < train.epochs "
            f"({cfg.train.epochs}), or be 'auto'")
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise ConfigError("config field 'data.root' is needed with data.name = 'imagefolder': a folder with "
                          "train/<class>/ and val/<class>/ image folders")
    if cfg.train.device not in ("auto", "cpu") and not cfg.train.device.startswith("cuda"):
        raise ConfigError(f"config field 'train.device' = {cfg.train.device!r}; allowed: auto, cpu, cuda, cuda:N")


def from_dict(data: dict[str, Any] | None) -> Config:
    cfg = _build(Config, data or {}, "")
    _cross_check(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. --set optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for text in overrides or []:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
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
            rows.append((prefix + f.name, repr(default), f"{doc}; {_describe(tp)}" if doc else _describe(tp)))

    walk(Config, "")
    return rows


def config_markdown() -> str:
    """The body of docs/config.md (regenerate with ``python -m spfde.config > docs/config.md``)."""
    lines = ["# Configuration keys", "",
             "Generated from `src/spfde/config.py` by `python -m spfde.config > docs/config.md`.",
             "Set any key in a YAML file or with `--set key=value`.", "",
             "| key | default | meaning / allowed |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {doc} |" for k, d, doc in field_docs()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_markdown(), end="")
