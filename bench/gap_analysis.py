"""Where SpFDE's accuracy gap to MEST comes from (issue 14): per-block analyses at freeze time.

Reads three runs of the same seed trained with ``analysis.snapshots`` and ``analysis.grad_norms``
(MEST alone, freezing alone, freezing + sieving; ``docs/results.md``, "Why the gap is 0.38") and
prints, for every block the freezing run froze:

- its freeze epoch (the first epoch whose ``frozen_blocks`` lists it);
- whether the freezing run's block at that point is the MEST run's block (same seed: the runs
  should be identical until the first freeze), by the largest weight difference;
- how much MEST's same block still changed after that epoch: relative weight change
  ``||W_final - W_t|| / ||W_t||``, structural similarity of ``W_t`` to the final mask (Section 3.1)
  and linear CKA of the block's output at ``t`` against the final MEST model (Section 3.2);
- MEST's gradient norm of the block's layers at ``t`` and over the rest of training, against the
  layer's own norm at the start of training (how much learning freezing took away, Section 4.2.2);
- CKA of the frozen run's final block output against MEST's final block output;

and, for the sieving run, the rotation statistics of every update (metrics.jsonl) and the
forgetting histograms (``sieve/``).

Usage: ``python bench/gap_analysis.py MEST_RUN FREEZE_RUN BOTH_RUN``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from spfde.analysis import (
    capture_features,
    linear_cka,
    load_forgetting_histograms,
    load_snapshots,
    structural_similarity,
)
from spfde.config import from_dict
from spfde.data import load_datasets
from spfde.models import create_model


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _freeze_epochs(metrics: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in metrics:
        for b in row.get("frozen_blocks") or []:
            out.setdefault(b, int(row["epoch"]))
    return out


def _model(run: Path) -> torch.nn.Module:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    with torch.random.fork_rng(devices=[]):  # model init draws from the global RNG
        torch.manual_seed(0)
        return create_model(cfg["model"]["name"], num_classes=10, in_channels=1, width=float(cfg["model"]["width"]))


def _probe(run: Path, n: int = 512) -> torch.Tensor:
    import yaml

    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    _, test_set, _ = load_datasets(cfg.data, seed=cfg.seed)
    return torch.stack([test_set[i][0] for i in range(min(n, len(test_set)))]).float()


def _block_params(state: dict[str, torch.Tensor], block: str) -> list[str]:
    return [k for k in state if k.startswith(block + ".") and k.endswith("weight") and state[k].dim() >= 2]


def _block_norm(epoch_norms: dict[str, float | None], layers: list[str]) -> float:
    # the block's gradient norm: the L2 combination of its layers' mean norms
    return sum((epoch_norms.get(layer) or 0.0) ** 2 for layer in layers) ** 0.5


def _rel_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    num = sum(float((b[n] - a[n]).pow(2).sum()) for n in names)
    den = sum(float(a[n].pow(2).sum()) for n in names)
    return (num / den) ** 0.5 if den else float("nan")


def main(mest: Path, freeze: Path, both: Path) -> None:
    snaps_m = dict(load_snapshots(mest))
    snaps_f = dict(load_snapshots(freeze))
    final_m = snaps_m[max(snaps_m)]
    final_f = snaps_f[max(snaps_f)]
    met_m, met_f, met_b = _metrics(mest), _metrics(freeze), _metrics(both)
    fz = _freeze_epochs(met_f)
    print("freeze epochs (freeze-only run):", fz)
    print("freeze epochs (freeze+sieve run):", _freeze_epochs(met_b))
    first = min(fz.values())
    # same seed: the two runs should be the same run until the first block freezes
    pre = first - 1
    diff = max(float((snaps_m[pre]["model"][k].float() - snaps_f[pre]["model"][k].float()).abs().max())
               for k in snaps_m[pre]["model"] if snaps_m[pre]["model"][k].is_floating_point())
    print(f"max |W_mest - W_freeze| at epoch {pre} (before the first freeze): {diff:.3g}")

    model = _model(mest)
    probe = _probe(mest)
    blocks = list(fz)
    model.load_state_dict(final_m["model"])
    ref_m = capture_features(model, probe, blocks)
    model.load_state_dict(final_f["model"])
    feats_f_final = capture_features(model, probe, blocks)
    gn = [r.get("grad_norms") or {} for r in met_m]
    print("\nblock | frozen at | |W_M(T)-W_M(t)|/|W_M(t)| | S(W_M(t), M_final) | CKA_M(t vs T) | "
          "CKA(F final vs M final) | M grad norm at t / epoch 0 | M grad norm mean after t / at t")
    for b, t in sorted(fz.items(), key=lambda kv: kv[1]):
        # the block is frozen from epoch t on: its weights are the end-of-epoch-(t-1) weights
        snap_t = snaps_m[t - 1]
        names = _block_params(final_m["model"], b)
        rel = _rel_change(snap_t["model"], final_m["model"], names)
        sims = [structural_similarity(snap_t["model"][n], final_m["masks"].get(n, final_m["model"][n]), 0.5,
                                      snap_t["masks"].get(n)) for n in names]
        model.load_state_dict(snap_t["model"])
        cka_t = linear_cka(capture_features(model, probe, [b])[b], ref_m[b])
        cka_ff = linear_cka(feats_f_final[b], ref_m[b])
        layers = [n.rsplit(".", 1)[0] for n in names]
        block_gn = [_block_norm(h, layers) for h in gn]
        after = block_gn[t:]
        print(f"{b} | {t} | {rel:.3f} | {sum(sims) / len(sims):.3f} | {cka_t:.3f} | {cka_ff:.3f} | "
              f"{block_gn[t - 1] / block_gn[0]:.2f} | {sum(after) / len(after) / block_gn[t - 1]:.2f}")
    print("\nMEST per-block gradient norm by epoch (sum of the block's layer norms):")
    all_blocks = ["stem", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
                  "layer3.0", "layer3.1", "layer3.2", "head"]
    for b in all_blocks:
        layers = [k.rsplit(".", 1)[0] for k in _block_params(final_m["model"], b)]
        print(b, " ".join(f"{_block_norm(h, layers):.2f}" for h in gn))
    print("\ntrain accuracy by epoch  MEST:", " ".join(f"{100 * r['train_acc']:.1f}" for r in met_m))
    print("train accuracy by epoch  F   :", " ".join(f"{100 * r['train_acc']:.1f}" for r in met_f))
    print("train accuracy by epoch  F+S :", " ".join(f"{100 * r['train_acc']:.1f}" for r in met_b))
    print("\nsieve (freeze+sieve run): epoch active returned removed never_seen")
    for r in met_b:
        print(r["epoch"], r["active_samples"], r["returned"], r["removed_this_update"], r["never_seen_count"])
    for epoch, hist in load_forgetting_histograms(both):
        print("forgetting histogram", epoch, dict(sorted(hist.items())))


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:4]))
