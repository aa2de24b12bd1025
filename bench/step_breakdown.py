"""Where one training step's time goes, dense against MEST, and what weight sparsity cannot shrink (issue 13).

Two real :class:`spfde.train.Trainer` runs of the ViT preset's model and data
(``configs/fmnist-vit.yaml``, 4,000 images, batch 128, 2 threads), in ONE process: ``dense`` (no
masks) and ``mest`` (MEST at ``--sparsity``), both under ``sparsity.kernels: auto``, with no
freezing and no sieving: the phase before the first block freezes, where the sparse kernels alone
have to make the saving. After one epoch (every ``auto`` layer timed and decided), the same
batches are timed in interleaved rounds, every round running each (run, variant) pair on fresh
steps, so load on the machine hits all alike; the table gives medians per step:

* ``full``: the trainer's step (forward, loss, backward, controller hooks, optimizer step);
* ``matmul attention core``: the attention core as PyTorch's matmuls and softmax instead of the
  native short-attention kernel (what the step took before that kernel);
* ``no attention core``: the attention core (``sparsity/kernels/attention.py``) replaced by a view
  of the projection, so its cost is the difference to ``full``;
* ``no optimizer step``: forward and backward only (no controller hooks, no ``optimizer.step``);
* ``forward only``: the training forward and the loss alone (autograd records, no backward runs), so
  ``no optimizer step`` minus it is the backward;
* ``linears free`` (``mest`` only): every sparse Linear (the attention projections and the MLP)
  replaced by a stand-in that returns zeros of the right shape, forward and backward, the GELU
  after them as ``unfused GELU`` runs it: the step MEST would take if its sparse layers cost
  nothing, so ``linears free ÷ dense full`` is the
  floor that no sparse kernel can go below;
* ``batch 16``: the full step on 16 of the 128 samples: the part of a step that does not scale
  with the batch (Python, dispatch, autograd, per-parameter optimizer work);
* ``unfused GELU`` (``mest`` only): the MLP as ``fc2(act(fc1(x)))``, three calls, the GELU after
  the sparse kernel instead of fused into it (``linear_act``, docs/kernels.md): what the GELU
  epilogue and the fused MLP save together;
* ``unfused MLP`` (``mest`` only): the MLP as two sparse Linear calls, fc1's GELU fused into its
  kernel (``fc2(linear_act(fc1, act, x))``) instead of one fused MLP call (``mlp_act``,
  ``sparsity/kernels/mlp.py``): what the fused MLP saves;
* ``unfused attention`` (``mest`` only): the self-attention block as its three steps (the sparse
  packed projection, the native core, the sparse ``out_proj``) instead of one fused native call
  (``attention.fused_plan``): what the fused block saves.

Changing the timed runs (a stand-in returns zeros) does not change what the ops cost: they do the
same work on any values.

    python bench/step_breakdown.py                   # Markdown table (about a minute on 2 cores)
    python bench/step_breakdown.py --json            # one JSON object {"rows": [...], "ratios": {...}}
    python bench/step_breakdown.py --set model.width=2 --sparsity 0.8
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import spfde.models.vit as vit  # noqa: E402
import spfde.sparsity.kernels.attention as attention  # noqa: E402
from kernels import matmul_core  # noqa: E402
from spfde.config import load_config  # noqa: E402
from spfde.sparsity.kernels.linear import LinearPlan, SparseLinearFunction, linear_act  # noqa: E402
from spfde.train import Trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("full", "matmul attention core", "no attention core", "no optimizer step", "forward only", "linears free",
            "batch 16", "unfused GELU", "unfused MLP", "unfused attention")
MEST_ONLY = ("linears free", "unfused GELU", "unfused MLP", "unfused attention")


class _FreeLinear(torch.autograd.Function):
    """A sparse Linear that costs nothing: zeros of the output shape, zero gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan,
                dense_weight_grad: bool, sparse_weight_grad: bool | None = None, gelu: int = 0) -> torch.Tensor:
        ctx.x_shape, ctx.weight, ctx.has_bias = x.shape, weight, bias is not None
        return x.new_zeros(*x.shape[:-1], plan.shape[0])

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        gb = gy.new_zeros(gy.shape[-1]) if ctx.has_bias else None
        return gy.new_zeros(ctx.x_shape), torch.zeros_like(ctx.weight), gb, None, None, None, None


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Patch the kernels for one variant (and undo it)."""
    core, apply, mlp, fused = attention.attention_core, SparseLinearFunction.apply, vit.mlp_act, attention.fused_plan
    # the variants that change the core or the projections run the attention block as its three steps
    if name in ("unfused attention", "matmul attention core", "no attention core", "linears free"):
        attention.fused_plan = lambda module, x: None
    if name == "no attention core":
        attention.attention_core = lambda module, qkv: qkv[..., : qkv.shape[-1] // 3]
    if name == "linears free":
        SparseLinearFunction.apply = _FreeLinear.apply
    if name in ("unfused GELU", "linears free"):  # free linears: the GELU still costs what it costs
        vit.mlp_act = lambda fc1, activation, fc2, x: fc2(activation(fc1(x)))
    if name == "unfused MLP":
        vit.mlp_act = lambda fc1, activation, fc2, x: fc2(linear_act(fc1, activation, x))
    try:
        with matmul_core() if name == "matmul attention core" else contextlib.nullcontext():
            yield
    finally:
        attention.attention_core, SparseLinearFunction.apply = core, apply
        vit.mlp_act, attention.fused_plan = mlp, fused


def step(tr: Trainer, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, name: str) -> None:
    """One training step as :meth:`Trainer.train_epoch` takes it (``no optimizer step``: fwd + bwd)."""
    if name == "batch 16":
        x, y, idx = x[:16], y[:16], idx[:16]
    logits = tr.model(x)
    loss = F.cross_entropy(logits, y)
    if name == "forward only":
        return
    if name == "no optimizer step":
        tr.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return
    tr._backward_and_step(loss)
    tr.ctl.after_step(logits, y, idx)


def measure(runs: dict[str, Trainer], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    batches = {k: list(itertools.islice(tr.train_loader, steps + 2)) for k, tr in runs.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for run, tr in runs.items():
            for name in VARIANTS:
                if name in MEST_ONLY and run == "dense":
                    continue
                with variant(name):
                    for b in batches[run][:2]:  # warm: a first call after a patch allocates afresh
                        step(tr, *b, name)
                    t0 = time.perf_counter()
                    for b in batches[run][2:]:
                        step(tr, *b, name)
                    times.setdefault((run, name), []).append((time.perf_counter() - t0) / steps)
    out: dict[str, dict[str, float]] = {}
    for (run, name), ts in times.items():
        out.setdefault(run, {})[name] = statistics.median(ts) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.9, help="MEST's target sparsity (default 0.9, the issue's)")
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (medians over them)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per (run, variant) and round")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for both runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    common = [f"data.subset={args.subset}", "data.batch_size=128", "train.epochs=10", "train.eval_every=10",
              "logging.progress=false", f"train.threads={args.threads}", "train.interval=1",
              "sparsity.search_end=0.75", "sparsity.kernels=auto", "sparsity.kernels_calibration=off",
              "freezing.target=0", "sieving.method=none", "sieving.ratio=0", "freezing.cache=off", *args.set]
    path = os.path.join(REPO, "configs", "fmnist-vit.yaml")
    cfgs = {"dense": load_config(path, [*common, "sparsity.method=dense", "sparsity.target=0"]),
            "mest": load_config(path, [*common, f"sparsity.target={args.sparsity}"])}
    with tempfile.TemporaryDirectory() as d:
        runs = {k: Trainer(c, os.path.join(d, k), quiet=True) for k, c in cfgs.items()}
        for tr in runs.values():
            tr.train_epoch(0)
            tr.ctl.start_epoch(1)  # timed steps are steps of epoch 1 (no structure update among them)
        res = measure(runs, args.rounds, args.steps)
    dense_full = res["dense"]["full"]
    ratios = {"mest_full_over_dense_full": res["mest"]["full"] / dense_full,
              "mest_linears_free_over_dense_full": res["mest"]["linears free"] / dense_full,
              "dense_batch16_over_dense_full": res["dense"]["batch 16"] / dense_full,
              "mest_unfused_gelu_over_dense_full": res["mest"]["unfused GELU"] / dense_full,
              "mest_unfused_mlp_over_dense_full": res["mest"]["unfused MLP"] / dense_full,
              "mest_unfused_attention_over_dense_full": res["mest"]["unfused attention"] / dense_full,
              "mest_forward_over_dense_forward": res["mest"]["forward only"] / res["dense"]["forward only"]}
    rows = [{"variant": name, **{run: res[run].get(name) for run in res}} for name in VARIANTS]
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "sparsity": args.sparsity, "threads": args.threads,
                          "overrides": args.set}))
        return
    print(f"ViT preset step, ms (medians of {args.rounds} rounds x {args.steps} steps; MEST {args.sparsity:.0%}, "
          f"{args.threads} threads)\n")
    print("| variant | dense ms | mest ms |\n|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.2f}" if r.get(k) is not None else "—" for k in ("dense", "mest")]
        print(f"| {r['variant']} | {cells[0]} | {cells[1]} |")
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    sys.exit(main())
