"""Per-layer GPU speed of torch's sparse kernels against the dense layer (issue 13, GPU route).

spfde's own sparse kernels are CPU kernels; on CUDA every layer runs dense (docs/kernels.md). This
bench measures what the GPU routes torch ships would buy, so that nothing is claimed unmeasured:

* **2:4 semi-structured** (``torch.sparse.to_sparse_semi_structured``, cuSPARSELt and CUTLASS
  backends), fp16 and bf16, at its one sparsity (50%):
  - ``fwd``: forward with a weight compressed once (a frozen layer, inference);
  - ``train``: a training step's three products with the weight compressed every step, as dynamic
    masks and changing weights need: ``y = x W^T`` and ``dx = dy W`` on 2:4 operands (the mask is
    2:4 along both dimensions, so ``W^T`` is 2:4 too), ``dW = dy^T x`` dense and masked; against
    the same three products dense.
* **CSR** (cuSPARSE through ``torch.sparse.mm``), fp32, forward at 80/90/95/98% unstructured
  (what spfde's masks are), weight converted once, against dense fp32 (TF32 off, torch's default).

Timing: CUDA events around a loop of repetitions, dense and sparse alternating, median of the
rounds; ``speedup`` > 1 means the sparse kernel is faster. ``rel_err``: the largest ``||out - ref||
/ ||ref||`` over the outputs, against the masked dense product in float64 on the same inputs.

    python bench/gpu_kernels.py                 # Markdown table (needs a CUDA device)
    python bench/gpu_kernels.py --json out.json # and every row as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (name, tokens = batch rows, in_features, out_features)
SHAPES = [
    ("vit preset qkv 64-192", 128 * 17, 64, 192),
    ("vit preset fc1 64-128", 128 * 17, 64, 128),
    ("vit-tiny fc1 192-768", 32 * 65, 192, 768),
    ("vit-tiny fc2 768-192", 32 * 65, 768, 192),
    ("linear 1024x1024 b128", 128, 1024, 1024),
    ("linear 1024x1024 b8192", 8192, 1024, 1024),
    ("vit-b fc1 768-3072", 64 * 197, 768, 3072),
    ("vit-b fc2 3072-768", 64 * 197, 3072, 768),
    ("linear 4096x4096 b8192", 8192, 4096, 4096),
]
CSR_SPARSITIES = (0.8, 0.9, 0.95, 0.98)


def cuda_time(fns: list[Callable[[], object]], reps: int, rounds: int) -> list[float]:
    """Median seconds per call of each fn, the fns alternating round by round."""
    for fn in fns:  # warm: library handles, autotuning, allocator
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns))) if r % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fns[i]()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / 1e3 / reps)
    return [statistics.median(t) for t in times]


def doubly_24_mask(rows: int, cols: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random mask that is 2:4 along rows and along columns: in each 4x4 tile, a random pair of rows
    keeps a random pair of columns and the other two rows keep the other two columns."""
    assert rows % 4 == 0 and cols % 4 == 0
    pairs = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                         dtype=torch.bool)
    tiles = (rows // 4) * (cols // 4)
    row_pair = pairs[torch.randint(0, 6, (tiles,), generator=gen)]  # which rows take the first column pair
    col_pair = pairs[torch.randint(0, 6, (tiles,), generator=gen)]
    tile = torch.where(row_pair[:, :, None], col_pair[:, None, :], ~col_pair[:, None, :])  # (tiles, 4, 4)
    mask = tile.view(rows // 4, cols // 4, 4, 4).permute(0, 2, 1, 3).reshape(rows, cols)
    return mask.to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def semi_structured_rows(name: str, n: int, k: int, m: int, dtype: torch.dtype, backend: str,
                         reps: int, rounds: int) -> list[dict]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    mask = doubly_24_mask(m, k, gen, dev)
    w = (torch.randn(m, k, generator=gen) / k ** 0.5).to(dev, dtype) * mask
    x = torch.randn(n, k, generator=gen).to(dev, dtype)
    gy = torch.randn(n, m, generator=gen).to(dev, dtype)
    base = {"layer": name, "tokens": n, "in": k, "out": m, "dtype": str(dtype).removeprefix("torch."),
            "kernel": f"2:4 {backend}", "sparsity": 0.5}
    rows = []
    try:
        ws = to_sparse_semi_structured(w)
        wts = to_sparse_semi_structured(w.t().contiguous())
        y, dx = F.linear(x, ws), F.linear(gy, wts)
        wd, xd, gyd = w.double(), x.double(), gy.double()
        err = max(rel_err(y, xd @ wd.t()), rel_err(dx, gyd @ wd))
        dense_fwd, sparse_fwd = cuda_time([lambda: F.linear(x, w), lambda: F.linear(x, ws)], reps, rounds)
        rows.append({**base, "pass": "fwd", "dense_ms": dense_fwd * 1e3, "sparse_ms": sparse_fwd * 1e3,
                     "speedup": dense_fwd / sparse_fwd, "rel_err": err})

        def dense_step() -> None:
            F.linear(x, w)
            gy @ w
            gy.t() @ x

        def sparse_step() -> None:
            s, st = to_sparse_semi_structured(w), to_sparse_semi_structured(w.t().contiguous())
            F.linear(x, s)
            F.linear(gy, st)
            (gy.t() @ x).mul_(mask)

        dense_t, sparse_t = cuda_time([dense_step, sparse_step], reps, rounds)
        err = max(err, rel_err((gy.t() @ x).mul_(mask), (gyd.t() @ xd) * mask))  # the step's dW too
        rows.append({**base, "pass": "train", "dense_ms": dense_t * 1e3, "sparse_ms": sparse_t * 1e3,
                     "speedup": dense_t / sparse_t, "rel_err": err})
    except Exception as e:  # a shape or dtype the backend refuses: say so in the table
        rows.append({**base, "pass": "train" if rows else "fwd",
                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
    return rows


def csr_rows(name: str, n: int, k: int, m: int, reps: int, rounds: int) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, k, generator=gen).to(dev)
    xt = x.t().contiguous()
    rows = []
    for s in CSR_SPARSITIES:
        base = {"layer": name, "tokens": n, "in": k, "out": m, "dtype": "float32", "kernel": "csr cusparse",
                "sparsity": s, "pass": "fwd"}
        try:
            mask = torch.rand(m, k, generator=gen) >= s
            w = (torch.randn(m, k, generator=gen) / k ** 0.5 * mask).to(dev)
            wc = w.to_sparse_csr()
            y = torch.sparse.mm(wc, xt).t()
            err = rel_err(y, x.double() @ w.double().t())
            dense_t, sparse_t = cuda_time([lambda w=w: F.linear(x, w), lambda wc=wc: torch.sparse.mm(wc, xt)],
                                          reps, rounds)
            rows.append({**base, "dense_ms": dense_t * 1e3, "sparse_ms": sparse_t * 1e3,
                         "speedup": dense_t / sparse_t, "rel_err": err})
        except Exception as e:
            rows.append({**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write every row as JSON to PATH")
    ap.add_argument("--reps", type=int, default=20, help="calls per timed round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", default="", help="only the layers whose name starts so")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py needs a CUDA device (bench/kernels.py measures the CPU kernels)")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows: list[dict] = []
    for name, n, k, m in SHAPES:
        if not name.startswith(args.layers):
            continue
        for dtype in (torch.float16, torch.bfloat16):
            for backend in ("cusparselt", "cutlass"):
                rows += semi_structured_rows(name, n, k, m, dtype, backend, args.reps, args.rounds)
        rows += csr_rows(name, n, k, m, args.reps, args.rounds)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, **meta}, f)
    print(f"{meta['device']}, torch {meta['torch']}; speedup = dense time / sparse time (> 1: sparse faster)\n")
    print("| layer | tokens | dtype | kernel | sparsity | pass | dense ms | sparse ms | speedup | rel. err |")
    print("|---|---:|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        head = (f"| {r['layer']} | {r['tokens']} | {r['dtype']} | {r['kernel']} | {100 * r['sparsity']:.0f}% "
                f"| {r['pass']} |")
        if "error" in r:
            print(head + f" - | - | - | {r['error']} |")
        else:
            print(head + f" {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | {r['speedup']:.2f} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
