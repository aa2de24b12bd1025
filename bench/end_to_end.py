"""End-to-end training wall-clock against dense, next to the ledger's FLOPs saving (issue 13).

Every variant is a real :class:`spfde.train.Trainer` and all of them advance one epoch at a time
in rotating order in ONE process (``bench/lockstep.py``), so load on the shared machine hits all
alike. Per model:

* ``dense``: no sparsity, freezing or sieving, ``sparsity.kernels: auto`` (the reference: with no
  masked layer, auto only puts spfde's attention path on ``nn.MultiheadAttention``, so the ViT's
  dense reference and its sparse variants share one attention core);
* ``dense/pytorch``: the same with ``sparsity.kernels: dense`` (every module's own forward);
* ``mest/<kernels>``: MEST at the sparsity of the setting, kernels ``dense`` and ``auto``;
* ``spfde/<kernels>/<cache>``: MEST + progressive freezing + circular sieving, kernels ``dense``
  and ``auto`` times ``freezing.cache`` ``off`` and ``auto``.

Models: ResNet-20 on Fashion-MNIST (MEST 90%, freezing 20%, sieving 20%, no augmentation, as
``bench/freeze.py``) and the ViT preset's model, data and schedule (``configs/fmnist-vit.yaml``) with
the issue's variants: MEST 90% on the attention and MLP linears, SpFDE 90% + freezing 20% + sieving
20% (``--vit-setting preset``: the preset's own 80%, 15%, 20%). For each variant: the ledger's training-FLOPs saving
against dense, the measured training wall-clock saving against dense (sum of training epochs,
no evaluation), wall-clock over dense, and the ratio of the two savings; for the ``auto`` variants
also ``auto`` over its ``dense``-kernels twin (goal: never above 1.03) and how many masked layers
``auto`` ran sparse at the end.

Targets (issue 13): ResNet-20 SpFDE with kernels and cache on auto <= 0.5x dense wall-clock; ViT
preset <= 0.4x; auto never slower than dense kernels by more than 3%.

    python bench/end_to_end.py --quick          # 2,000 images: a few minutes per model on 2 cores
    python bench/end_to_end.py --json           # 4,000 images; one JSON object {"models": {...}}
    python bench/end_to_end.py --models resnet20 --epochs 6 --subset 1000
    python bench/end_to_end.py --models vit --set model.width=2   # extra overrides for every variant
    python bench/end_to_end.py --models vit --vit-setting preset  # the preset's own 80% / 15% / 20%
    python bench/end_to_end.py --models vit --repeats 5           # medians of 5 lock-step runs
    python bench/end_to_end.py --merge runs.jsonl                 # medians of separate --json runs

On a machine with a GPU, ``train.device: auto`` puts every variant on it (``bench/gpu_session.sh``);
the table then adds each variant's peak device memory over its training epochs, and ``auto`` runs
every layer dense there (docs/kernels.md), so the ``auto`` rows repeat their dense twins.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from lockstep import BASE, make_config, run_lockstep  # noqa: E402
from spfde.config import Config, load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = ["sparsity.method=dense", "sparsity.target=0", "freezing.target=0", "sieving.method=none",
         "sieving.ratio=0"]


def settings(model: str, epochs: int, subset: int, batch: int,
             vit_setting: str = "issue") -> tuple[list[str], list[str], str | None]:
    """(overrides shared by every variant, SpFDE's freezing + sieving overrides, config file)."""
    common = [f"train.epochs={epochs}", f"data.subset={subset}", f"data.batch_size={batch}",
              f"train.eval_every={epochs}", "logging.progress=false", "train.interval=1",
              "sparsity.search_end=0.75",
              # every auto variant times its own layers, as a first run on a new machine does (a later run
              # on the same machine takes the decisions from the calibration file, untimed)
              "sparsity.kernels_calibration=off"]
    if model == "resnet20":
        base = [o for o in BASE if not o.startswith(("sparsity.kernels", "freezing.cache"))]
        spfde = ["freezing.target=0.2", "sieving.method=circular", "sieving.ratio=0.2"]
        return base + common, spfde, None
    if model == "vit":
        path = os.path.join(REPO, "configs", "fmnist-vit.yaml")
        if vit_setting == "preset":  # the preset's own sparsity, freezing and sieving (80%, 15%, 20%)
            preset = load_config(path)
            sparsity = f"sparsity.target={preset.sparsity.target}"
            spfde = [f"freezing.target={preset.freezing.target}", "sieving.method=circular",
                     f"sieving.ratio={preset.sieving.ratio}"]
        else:  # the variants on the preset's model, data and schedule: MEST 90%, SpFDE 90 + 20 + 20
            sparsity = "sparsity.target=0.9"
            spfde = ["freezing.target=0.2", "sieving.method=circular", "sieving.ratio=0.2"]
        return [sparsity, "freezing.target=0", "sieving.method=none", "sieving.ratio=0"] + common, spfde, path
    raise SystemExit(f"unknown model {model!r}; choose resnet20 or vit")


def variants(common: list[str], spfde: list[str], path: str | None) -> dict[str, Config]:
    def cfg(extra: list[str]) -> Config:
        return load_config(path, common + extra) if path else make_config(common + extra)

    out = {"dense": cfg(DENSE + ["sparsity.kernels=auto", "freezing.cache=off"]),
           "dense/pytorch": cfg(DENSE + ["sparsity.kernels=dense", "freezing.cache=off"])}
    for k in ("dense", "auto"):
        out[f"mest/{k}"] = cfg([f"sparsity.kernels={k}", "freezing.cache=off"])
    for k in ("dense", "auto"):
        for c in ("off", "auto"):
            out[f"spfde/{k}/{c}"] = cfg(spfde + [f"sparsity.kernels={k}", f"freezing.cache={c}"])
    return out


def rows_for(res: dict[str, dict[str, Any]], configs: dict[str, Config]) -> list[dict[str, Any]]:
    dense = res["dense"]
    rows = []
    for name, r in res.items():
        flops_saving = 1.0 - r["train_flops"] / dense["train_flops"]
        wall_over = r["wall_s"] / dense["wall_s"]
        row = {"variant": name, "sparsity": configs[name].sparsity.target,
               "flops_saving": round(flops_saving, 4), "wall_saving": round(1.0 - wall_over, 4),
               "wall_over_dense": round(wall_over, 3),
               "wall_over_flops_saving": round((1.0 - wall_over) / flops_saving, 3) if flops_saving > 0 else None,
               "wall_s": round(r["wall_s"], 2)}
        if r["peak_mem_bytes"] is not None:  # CUDA: the variant's peak device memory over its training epochs
            row["peak_mem_mib"] = round(r["peak_mem_bytes"] / 2**20, 1)
        parts = name.split("/")
        if len(parts) > 1 and parts[1] == "auto":
            twin = "/".join([parts[0], "dense"] + parts[2:])
            row["auto_over_dense_kernels"] = round(r["wall_s"] / res[twin]["wall_s"], 3)
            choices = r["trainer"].ctl.kernels.choices()
            row["sparse_layers"] = f"{sum(c == 'sparse' for c in choices.values())}/{len(choices)}"
        rows.append(row)
    return rows


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One table from repeated lock-step runs: the wall-clock columns are medians over the repeats of
    each run's own ratios (each repeat compares its variants with its own dense run); the ledger's
    FLOPs are the same in every repeat; ``wall_over_dense_runs`` lists the repeats' values."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for i, last in enumerate(runs[-1]):
        row = dict(last)
        same = [r[i] for r in runs]
        over = statistics.median(r["wall_over_dense"] for r in same)
        row.update(wall_over_dense=round(over, 3), wall_saving=round(1.0 - over, 4),
                   wall_s=round(statistics.median(r["wall_s"] for r in same), 2),
                   wall_over_dense_runs=[r["wall_over_dense"] for r in same])
        if row["flops_saving"] > 0:
            row["wall_over_flops_saving"] = round((1.0 - over) / row["flops_saving"], 3)
        if "auto_over_dense_kernels" in row:
            row["auto_over_dense_kernels"] = round(statistics.median(r["auto_over_dense_kernels"] for r in same), 3)
        if "peak_mem_mib" in row:
            row["peak_mem_mib"] = max(r["peak_mem_mib"] for r in same)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,vit", help="comma-separated: resnet20, vit")
    ap.add_argument("--quick", action="store_true", help="2,000 images (default 4,000)")
    ap.add_argument("--epochs", type=int, default=None, help="default 12 (ResNet-20) and 10 (ViT)")
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="train.threads (default: the load-aware rule)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra config override for every variant (e.g. model.width=2)")
    ap.add_argument("--vit-setting", choices=("issue", "preset"), default="issue",
                    help="ViT variants: the issue's (MEST 90%%; SpFDE 90%% + freezing 20%% + sieving 20%%, the "
                         "ResNet-20 setting) or the preset's own (80%%, 15%%, 20%%) on the same model and data")
    ap.add_argument("--repeats", type=int, default=1,
                    help="lock-step runs per model; the table gives medians of each run's ratios (this machine's "
                         "noise moves one ViT run's ratios by about 0.05)")
    ap.add_argument("--json", action="store_true", help="print exactly one JSON object")
    ap.add_argument("--merge", nargs="+", metavar="FILE",
                    help="run nothing: print the median table of earlier --json runs (one JSON object per line in "
                         "each FILE; other lines are skipped), as --repeats would, for repeats run as separate "
                         "processes (bench/gpu_session.sh does, so that a run cut short keeps the others)")
    args = ap.parse_args()
    out: dict[str, Any] = {"models": {}}
    if args.merge:
        for model, (meta, runs) in merged(args.merge).items():
            out["models"][model] = table(model, runs, meta, args.json)
    for model in [] if args.merge else [m.strip() for m in args.models.split(",") if m.strip()]:
        epochs = args.epochs or (12 if model == "resnet20" else 10)
        subset = args.subset or (2000 if args.quick else 4000)
        batch = 64 if model == "resnet20" else 128
        common, spfde, path = settings(model, epochs, subset, batch, args.vit_setting)
        if args.threads:
            common.append(f"train.threads={args.threads}")
        common += args.overrides
        configs = variants(common, spfde, path)
        runs = [rows_for(run_lockstep(configs), configs) for _ in range(max(args.repeats, 1))]
        gpu = "peak_mem_mib" in runs[0][0]  # the trainers ran on CUDA (train.device auto or cuda)
        meta = {"epochs": epochs, "subset": subset, "batch_size": batch,
                "setting": args.vit_setting if model == "vit" else "issue", "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if gpu else "cpu"}
        out["models"][model] = table(model, runs, meta, args.json)
    if args.json:
        print(json.dumps(out))
    else:
        print("\ngoals: ResNet-20 spfde/auto/auto wall/dense <= 0.5, ViT <= 0.4; auto/dense kernels <= 1.03")


def merged(paths: list[str]) -> dict[str, tuple[dict[str, Any], list[list[dict[str, Any]]]]]:
    """{model: (the runs' settings, [each run's rows])} from files of --json lines; runs of one model
    must share their settings (epochs, images, batch, device, ...)."""
    out: dict[str, tuple[dict[str, Any], list[list[dict[str, Any]]]]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                try:
                    models = json.loads(line)["models"] if line.startswith('{"models"') else None
                except json.JSONDecodeError:  # a run killed while it printed
                    models = None
                for model, entry in (models or {}).items():
                    if entry.get("repeats", 1) != 1:
                        raise SystemExit(f"{path}: {model} holds a median of {entry['repeats']} runs; --merge takes "
                                         "single runs (--repeats 1)")
                    meta = {k: v for k, v in entry.items() if k not in ("rows", "dense_wall_s", "repeats")}
                    first, runs = out.setdefault(model, (meta, []))
                    diff = sorted(k for k in first.keys() | meta.keys() if first.get(k) != meta.get(k))
                    if diff == ["threads"]:  # the load-aware default can choose differently per process
                        print(f"note: {path}: a {model} run on {meta['threads']} threads, the first on "
                              f"{first['threads']} (pin them with --threads)", file=sys.stderr)
                    elif diff:
                        raise SystemExit(f"{path}: a {model} run whose settings differ from the first one's "
                                         f"({', '.join(diff)}); merge runs of one setting")
                    runs.append(entry["rows"])
    if not out:
        raise SystemExit(f"--merge: no JSON line of bench/end_to_end.py --json in {', '.join(paths)}")
    return out


def table(model: str, runs: list[list[dict[str, Any]]], meta: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """The JSON entry of one model (medians over ``runs``), printed as a table unless ``quiet``."""
    rows = median_rows(runs)
    dense_wall = next(r["wall_s"] for r in rows if r["variant"] == "dense")
    entry = {"rows": rows, **meta, "dense_wall_s": round(dense_wall, 2), "repeats": len(runs)}
    if quiet:
        return entry
    gpu = "peak_mem_mib" in rows[0]
    where = meta["device"] if gpu else f"{meta['threads']} threads"
    print(f"\n{model}: {meta['subset']} images, {meta['epochs']} epochs, batch {meta['batch_size']}, {where}; "
          f"dense {dense_wall:.1f}s of training" + (f" (median of {len(runs)} runs)" if len(runs) > 1 else ""))
    print(f"{'variant':<20}{'FLOPs saved':>12}{'wall saved':>12}{'wall/dense':>12}{'wall/FLOPs':>12}"
          f"{'auto/dense k.':>14}{'sparse':>8}" + (f"{'peak MiB':>10}" if gpu else ""))
    for r in rows:
        ratio = "-" if r["wall_over_flops_saving"] is None else f"{r['wall_over_flops_saving']:.3f}"
        auto = f"{r['auto_over_dense_kernels']:.3f}" if "auto_over_dense_kernels" in r else "-"
        print(f"{r['variant']:<20}{100 * r['flops_saving']:>11.2f}%{100 * r['wall_saving']:>11.2f}%"
              f"{r['wall_over_dense']:>12.3f}{ratio:>12}{auto:>14}{r.get('sparse_layers', '-'):>8}"
              + (f"{r['peak_mem_mib']:>10.1f}" if gpu else ""))
    if len(runs) > 1:
        print("wall/dense of each run:")
        for r in rows:
            print(f"  {r['variant']:<18}" + " ".join(f"{v:.3f}" for v in r["wall_over_dense_runs"]))
    return entry


if __name__ == "__main__":
    main()
