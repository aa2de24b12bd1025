"""Wall-clock savings of the frozen-prefix activation cache, next to the FLOPs the ledger says it saves.

The same sparse model (ResNet-20, MEST at 90%, Fashion-MNIST, no augmentation) is trained without
freezing, with freezing alone (``freezing.target``, default 20%) and with freezing plus circular
sieving (``sieving.ratio``, default 20%), the last two each with ``freezing.cache`` off and auto,
all five in lock-step in one process (``bench/lockstep.py``). For each variant: the ledger's
training-FLOPs reduction and the measured wall-clock reduction against the no-freezing baseline,
and, for the cached variants, the wall-clock of cache auto over cache off (below 1: the cache pays).
The final weights of each cached variant are checked against its uncached twin (bit-identical).

    python bench/cache.py --quick           # 12 epochs x 2,000 images: a few minutes on 2 cores
    python bench/cache.py --json            # 24 epochs x 4,000 images; one JSON object:
            # {"rows": [{"variant", "flops_reduction", "wall_reduction", "cache_over_off", "same_weights"}, ...]}
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lockstep import add_args, base_overrides, emit, make_config, reductions, run_lockstep  # noqa: E402
from spfde.utils import state_dict_sha256  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(ap)
    ap.add_argument("--freeze", type=float, default=0.2, help="freezing.target")
    ap.add_argument("--sieve", type=float, default=0.2, help="sieving.ratio of the SpFDE variants")
    args = ap.parse_args()
    base = base_overrides(args)
    freeze = [f"freezing.target={args.freeze}"]
    sieve = ["sieving.method=circular", f"sieving.ratio={args.sieve}"]
    configs = {"baseline": make_config(base)}
    for name, extra in (("freeze", freeze), ("spfde", freeze + sieve)):
        for cache in ("off", "auto"):
            configs[f"{name}-{cache}"] = make_config(base + extra + [f"freezing.cache={cache}"])
    res = run_lockstep(configs)
    rows = []
    for name in ("freeze", "spfde"):
        off, auto = res[f"{name}-off"], res[f"{name}-auto"]
        same = (state_dict_sha256(off["trainer"].model.state_dict())
                == state_dict_sha256(auto["trainer"].model.state_dict()))
        for cache, r in (("off", off), ("auto", auto)):
            red = reductions(res["baseline"], r)
            rows.append({"variant": f"{name}/{cache}", "flops_reduction": red["flops_reduction"],
                         "wall_reduction": red["wall_reduction"], "efficiency": red["efficiency"],
                         "cache_over_off": round(auto["wall_s"] / off["wall_s"], 3) if cache == "auto" else None,
                         "same_weights": same if cache == "auto" else None, "wall_s": red["wall_s"],
                         "baseline_wall_s": red["baseline_wall_s"]})
    emit(args, rows, configs["baseline"],
         [("variant", "variant", "str"), ("FLOPs red.", "flops_reduction", "pct"),
          ("wall red.", "wall_reduction", "pct"), ("wall/FLOPs", "efficiency", "ratio"),
          ("auto/off wall", "cache_over_off", "ratio"), ("same weights", "same_weights", "str")],
         "cache auto below cache off in wall-clock, same weights", freeze_target=args.freeze,
         sieve_ratio=args.sieve)


if __name__ == "__main__":
    main()
