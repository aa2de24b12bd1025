"""Per-layer speed of the sparse kernels against the masked dense layer (issue 13, docs/kernels.md).

For each layer shape and sparsity (80/90/95/98% by default) and each thread count, forward +
backward (input and weight gradients, as in training) of the sparse kernel and of PyTorch's dense
kernel on the masked weight are timed in ONE process, interleaved repetition by repetition
(dense, sparse, sparse, dense, ...), and the ratio of the medians is reported (> 1: sparse is
faster). ``--forward`` adds the forward-only ratio (what a frozen layer runs).

Shapes: Linear 1024x1024 at batch 128; the 3x3 convolutions of ResNet-20 (= ResNet-32 at width 1)
and ResNet-32 2x on 32x32 CIFAR inputs at batch 128 (channels_last, the trainer's CPU layout);
ViT-tiny's linear layers (dim 192, MLP 768, 65 tokens, batch 32); the ViT preset's (dim 64, MLP 128,
17 tokens, batch 128).
Targets (benchmarks, not tests): sparse Linear at 90% >= 1.5x on 2 threads; conv at 95% >= 1.5x.

    python bench/kernels.py                     # Markdown table
    python bench/kernels.py --quick             # fewer shapes and repetitions (a smoke run)
    python bench/kernels.py --layers "vit preset" --threads 2   # only the layers whose name starts so
    python bench/kernels.py --json              # one JSON object: {"rows": [...], "targets": {...}}
    python bench/kernels.py --attention         # nn.MultiheadAttention's forward vs spfde's attention path

``--attention`` times, instead, a dense ``nn.MultiheadAttention`` self-attention call (forward +
backward) through the module's own forward (``F.multi_head_attention_forward``, flash attention)
against spfde's attention path (``sparsity/kernels/attention.py``: the native short-attention
kernel up to ``NATIVE_MAX_LEN`` tokens, matmuls and a softmax up to ``SHORT_MAX_LEN``, flash
beyond), over sequence lengths around those thresholds; and the same path with the matmul core in
place of the native kernel (``native ÷ matmul`` > 1: the native kernel is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spfde.sparsity.kernels import native
from spfde.sparsity.kernels.conv import make_conv_plan, sparse_conv2d
from spfde.sparsity.kernels.linear import LinearPlan, sparse_linear

# (name, kind, spec): linear spec = (batch rows, in, out); conv spec = (batch, in, out, stride, size)
SHAPES = [
    ("linear 1024x1024", "linear", (128, 1024, 1024)),
    ("resnet20 conv 16-16 32x32", "conv", (128, 16, 16, 1, 32)),
    ("resnet20 conv 16-32 s2 32x32", "conv", (128, 16, 32, 2, 32)),
    ("resnet20 conv 32-32 16x16", "conv", (128, 32, 32, 1, 16)),
    ("resnet20 conv 32-64 s2 16x16", "conv", (128, 32, 64, 2, 16)),
    ("resnet20 conv 64-64 8x8", "conv", (128, 64, 64, 1, 8)),
    ("resnet32x2 conv 32-32 32x32", "conv", (128, 32, 32, 1, 32)),
    ("resnet32x2 conv 64-64 16x16", "conv", (128, 64, 64, 1, 16)),
    ("resnet32x2 conv 128-128 8x8", "conv", (128, 128, 128, 1, 8)),
    ("vit-tiny qkv 192-576", "linear", (32 * 65, 192, 576)),
    ("vit-tiny proj 192-192", "linear", (32 * 65, 192, 192)),
    ("vit-tiny fc1 192-768", "linear", (32 * 65, 192, 768)),
    ("vit-tiny fc2 768-192", "linear", (32 * 65, 768, 192)),
    # the ViT preset's (configs/fmnist-vit.yaml) 64-wide layers: batch 128 x 17 tokens
    ("vit preset qkv 64-192", "linear", (128 * 17, 64, 192)),
    ("vit preset proj 64-64", "linear", (128 * 17, 64, 64)),
    ("vit preset fc1 64-128", "linear", (128 * 17, 64, 128)),
    ("vit preset fc2 128-64", "linear", (128 * 17, 128, 64)),
]
QUICK = {"linear 1024x1024", "resnet20 conv 16-16 32x32", "resnet20 conv 64-64 8x8", "vit-tiny fc1 192-768"}


def _layer(kind: str, spec: tuple, sparsity: float, gen: torch.Generator):
    """(dense fn, sparse fn) running forward (+ backward when ``backward``) on one fixed input."""
    if kind == "linear":
        rows, fin, fout = spec
        mod = nn.Linear(fin, fout)
        x = torch.randn(rows, fin, generator=gen)
    else:
        n, cin, cout, stride, size = spec
        mod = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).to(memory_format=torch.channels_last)
        x = torch.randn(n, cin, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(mod.weight.shape, generator=gen) >= sparsity
    with torch.no_grad():
        mod.weight.mul_(mask)
    if kind == "linear":
        plan = LinearPlan(mask, mod.weight)
        return mod, x, (lambda xx: F.linear(xx, mod.weight, mod.bias)), (
            lambda xx: sparse_linear(xx, mod.weight, mod.bias, plan))
    plan = make_conv_plan(mod, mask)
    return mod, x, (lambda xx: F.conv2d(xx, mod.weight, None, mod.stride, mod.padding)), (
        lambda xx: sparse_conv2d(mod, xx, plan))


def _runner(fn, mod: nn.Module, x: torch.Tensor, backward: bool):
    def run() -> None:
        if not backward:
            with torch.no_grad():
                fn(x)
            return
        xx = x.detach().requires_grad_()
        out = fn(xx)
        torch.autograd.grad(out, [xx, mod.weight], torch.ones_like(out))
    return run


def _ratio(dense, sparse, reps: int) -> tuple[float, float, float]:
    """(dense ms, sparse ms, dense / sparse) from medians of interleaved repetitions."""
    for _ in range(2):
        dense(), sparse()
    td, ts = [], []
    for i in range(reps):
        pair = ((td, dense), (ts, sparse)) if i % 2 == 0 else ((ts, sparse), (td, dense))
        for out, fn in pair:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    d, s = statistics.median(td), statistics.median(ts)
    return 1e3 * d, 1e3 * s, d / s


# (batch, tokens, dim, heads): the ViT preset at width 1 and 2 (and a short last batch), 24 tokens (the
# native core's limit), longer sequences, ViT-tiny/16 at 224 px
ATTENTION = [(128, 17, 64, 4), (17, 17, 64, 4), (128, 17, 128, 4), (128, 24, 64, 4), (128, 33, 64, 4),
             (128, 49, 64, 4), (128, 65, 64, 4), (32, 65, 192, 3), (32, 197, 192, 3)]


@contextlib.contextmanager
def matmul_core() -> Iterator[None]:
    """spfde's attention path with the matmul core instead of the native short-attention kernel (also
    ``bench/step_breakdown.py``'s ``matmul attention core``)."""
    from spfde.sparsity.kernels import attention

    saved = attention.NATIVE_MAX_LEN
    attention.NATIVE_MAX_LEN = 0
    try:
        yield
    finally:
        attention.NATIVE_MAX_LEN = saved


def attention_rows(threads: list[int], reps: int, as_json: bool) -> list[dict]:
    """(module's forward ms, spfde path ms, ratio; the spfde path on the matmul core: ms, ratio) per
    shape and thread count, forward + backward."""
    from spfde.sparsity.kernels.attention import self_attention

    rows = []
    for b, n, e, h in ATTENTION:
        for t in threads:
            torch.set_num_threads(t)
            gen = torch.Generator().manual_seed(0)
            mha = nn.MultiheadAttention(e, h, batch_first=True)
            x = torch.randn(b, n, e, generator=gen)

            def run(path, x=x, mha=mha):
                def go() -> None:
                    xx = x.detach().requires_grad_()
                    out = path(xx)
                    torch.autograd.grad(out, [xx, mha.in_proj_weight], torch.ones_like(out))
                return go

            stock = run(lambda xx, m=mha: type(m).forward(m, xx, xx, xx, need_weights=False)[0])
            ours = run(lambda xx, m=mha: self_attention(m, xx)[0])
            d, sp, r = _ratio(stock, ours, reps)

            def matmul(xx, m=mha):
                with matmul_core():
                    return self_attention(m, xx)[0]
            mm, _, rn = _ratio(run(matmul), ours, reps)
            row = {"shape": f"{b}x{n} tokens, dim {e}, {h} heads", "threads": t, "module_ms": round(d, 3),
                   "spfde_ms": round(sp, 3), "speedup": round(r, 2), "matmul_core_ms": round(mm, 3),
                   "native_core_speedup": round(rn, 2)}
            rows.append(row)
            if not as_json:
                print(f"| {row['shape']} | {t} | {d:.2f} | {sp:.2f} | {r:.2f}x | {mm:.2f} | {rn:.2f}x |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions per variant")
    ap.add_argument("--quick", action="store_true", help="4 shapes, 5 repetitions")
    ap.add_argument("--forward", action="store_true", help="also time forward only (frozen layers)")
    ap.add_argument("--attention", action="store_true", help="nn.MultiheadAttention vs spfde's attention path")
    ap.add_argument("--layers", default=None, help="comma-separated name prefixes of the layers to time")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.attention:
        saved = torch.get_num_threads()
        if not args.json:
            print("| call | threads | module ms | spfde ms | speedup | matmul core ms | native ÷ matmul |\n"
                  "|---|---|---|---|---|---|---|")
        try:
            rows = attention_rows([int(t) for t in args.threads.split(",")], 5 if args.quick else args.reps, args.json)
        finally:
            torch.set_num_threads(saved)
        if args.json:
            print(json.dumps({"attention": rows}))
        return
    sparsities = [float(s) for s in args.sparsities.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    reps = 5 if args.quick else args.reps
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    if args.layers:
        prefixes = tuple(p.strip() for p in args.layers.split(",") if p.strip())
        shapes = [s for s in shapes if s[0].startswith(prefixes)]
        if not shapes:
            raise SystemExit(f"--layers {args.layers!r} matches no layer; names: {', '.join(s[0] for s in SHAPES)}")
    if not native.status()["available"]:
        shapes = [s for s in shapes if s[1] != "conv"]
        print(f"# native kernel unavailable ({native.status()['error']}): conv rows skipped")
    passes = [("fwd+bwd", True)] + ([("fwd", False)] if args.forward else [])
    rows = []
    saved = torch.get_num_threads()
    try:
        for name, kind, spec in shapes:
            for t in threads:
                torch.set_num_threads(t)
                for label, backward in passes:
                    row = {"layer": name, "threads": t, "pass": label, "speedup": {}, "dense_ms": {}, "sparse_ms": {}}
                    for s in sparsities:
                        gen = torch.Generator().manual_seed(0)
                        mod, x, dense, sparse = _layer(kind, spec, s, gen)
                        d, sp, r = _ratio(_runner(dense, mod, x, backward), _runner(sparse, mod, x, backward), reps)
                        key = f"{round(100 * s)}%"
                        row["speedup"][key], row["dense_ms"][key], row["sparse_ms"][key] = (
                            round(r, 2), round(d, 3), round(sp, 3))
                    rows.append(row)
                    if not args.json:
                        print(f"{name:30s} {t}t {label:8s} " + "  ".join(
                            f"{k}: {v:5.2f}x" for k, v in row["speedup"].items()) +
                            f"   (dense {statistics.median(row['dense_ms'].values()):.2f} ms)", flush=True)
    finally:
        torch.set_num_threads(saved)

    def pick(prefix: str, key: str) -> list[float]:
        return [r["speedup"].get(key, 0.0) for r in rows if r["layer"].startswith(prefix) and r["threads"] == 2
                and r["pass"] == "fwd+bwd"]

    lin, conv = pick("linear 1024", "90%"), [v for p in ("resnet20 conv", "resnet32x2 conv") for v in pick(p, "95%")]
    targets = {
        "linear_1024_90pct_2threads": {"goal": ">= 1.5", "value": min(lin) if lin else None},
        "conv_95pct_2threads_min": {"goal": ">= 1.5", "value": min(conv) if conv else None},
    }
    if args.json:
        print(json.dumps({"rows": rows, "targets": targets, "reps": reps}))
        return
    keys = [f"{round(100 * s)}%" for s in sparsities]
    print("\n| layer | threads | pass | " + " | ".join(keys) + " | dense ms |")
    print("|---|---|---|" + "---|" * len(keys) + "---|")
    for r in rows:
        print(f"| {r['layer']} | {r['threads']} | {r['pass']} | " + " | ".join(f"{r['speedup'][k]:.2f}x" for k in keys)
              + f" | {statistics.median(r['dense_ms'].values()):.2f} |")
    for name, t in targets.items():
        v = t["value"]
        print(f"target {name}: {t['goal']}x, measured {'-' if v is None else f'{v:.2f}x'}")


if __name__ == "__main__":
    main()
