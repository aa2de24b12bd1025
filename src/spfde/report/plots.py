"""The report's figures: matplotlib's object API on the Agg canvas (no pyplot, no display, no
global backend switch), one PNG per figure.

Every function either writes ``path`` and returns ``None``, or writes nothing and returns a
one-line note saying why the figure was skipped (no data), so the report never shows an empty plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from spfde.report.runs import Run

MIB = 2**20
DPI = 110


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.5, 4.2), **kw: Any):
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")


def _pct(values: Sequence[float]) -> list[float]:
    return [100.0 * float(v) for v in values]


def _legend(ax: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 6:  # many runs or blocks: beside the axes, never over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    elif handles:
        ax.legend(fontsize=8, loc="best")


def _epoch_axis(ax: Any) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


# ------------------------------------------------------------------ several runs on one figure


def plot_accuracy(runs: Sequence[Run], path: Path) -> str | None:
    if not any(r.series("test_acc")[0] or r.series("train_acc")[0] for r in runs):
        return "accuracy: no train_acc/test_acc in metrics.jsonl"
    fig, ax = _figure()
    a = ax[0, 0]
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        x, y = r.series("test_acc")
        if x:
            a.plot(x, _pct(y), color=color, marker="o" if len(x) < 30 else None, ms=3, label=f"{r.label} test")
        x, y = r.series("train_acc")
        if x:
            a.plot(x, _pct(y), color=color, ls="--", label=f"{r.label} train")
    a.set_title("Accuracy per epoch (solid: test, dashed: train)")
    a.set_ylabel("accuracy (%)")
    _epoch_axis(a)
    _legend(a)
    _save(fig, path)
    return None


def plot_loss(runs: Sequence[Run], path: Path) -> str | None:
    if not any(r.series("test_loss")[0] or r.series("train_loss")[0] for r in runs):
        return "loss: no train_loss/test_loss in metrics.jsonl"
    fig, ax = _figure()
    a = ax[0, 0]
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        x, y = r.series("test_loss")
        if x:
            a.plot(x, y, color=color, marker="o" if len(x) < 30 else None, ms=3, label=f"{r.label} test")
        x, y = r.series("train_loss")
        if x:
            a.plot(x, y, color=color, ls="--", label=f"{r.label} train")
    a.set_title("Cross-entropy loss per epoch (solid: test, dashed: train)")
    a.set_ylabel("loss (nats per sample)")
    _epoch_axis(a)
    _legend(a)
    _save(fig, path)
    return None


def plot_flops_vs_accuracy(runs: Sequence[Run], path: Path) -> str | None:
    lines = []
    for r in runs:
        pts = [(row["cum_train_flops"] / 1e12, 100.0 * row["test_acc"]) for row in r.metrics
               if row.get("cum_train_flops") is not None and row.get("test_acc") is not None]
        if pts:
            lines.append((r.label, pts))
    if not lines:
        return "FLOPs vs accuracy: no epoch has both cum_train_flops and test_acc"
    fig, ax = _figure()
    a = ax[0, 0]
    for i, (label, pts) in enumerate(lines):
        xs, ys = zip(*pts, strict=False)
        a.plot(xs, ys, color=f"C{i % 10}", marker="o" if len(xs) < 30 else None, ms=3, label=label)
    a.set_title("Test accuracy versus cumulative training FLOPs")
    a.set_xlabel("cumulative training FLOPs (×1e12)")
    a.set_ylabel("test accuracy (%)")
    a.grid(True, alpha=0.3)
    _legend(a)
    _save(fig, path)
    return None


# ------------------------------------------------------------------ one run


def plot_lr(run: Run, path: Path) -> str | None:
    rows = [(int(r.get("epoch", i)), r["block_lr"]) for i, r in enumerate(run.metrics)
            if isinstance(r.get("block_lr"), dict) and r["block_lr"]]
    fig, ax = _figure()
    a = ax[0, 0]
    if rows:
        blocks: list[str] = []
        for _, d in rows:
            blocks += [b for b in d if b not in blocks]
        for j, b in enumerate(blocks):
            pts = [(e, d[b]) for e, d in rows if d.get(b) is not None]
            if pts:
                xs, ys = zip(*pts, strict=False)
                a.plot(xs, ys, color=colormaps["tab20"](j % 20), linestyle=("-", "--", ":")[(j // 20) % 3],
                       label=b)
        a.set_title(f"{run.label}: learning rate per block (block-wise cosine, Section 4.2.1)")
        a.set_xlabel("epoch (learning rate at the epoch's end)")
    else:
        x, y = run.series("lr")
        if not x:
            return f"learning rate ({run.label}): no lr/block_lr in metrics.jsonl"
        a.plot(x, y, color="C0", label="lr")
        a.set_title(f"{run.label}: learning rate")
    a.set_ylabel("learning rate")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.grid(True, alpha=0.3)
    if not a.get_xlabel():
        a.set_xlabel("epoch")
    if len(a.get_lines()) <= 40:
        _legend(a)
    _save(fig, path)
    return None


def _heatmap(fig: Figure, a: Any, matrix: np.ndarray, ylabels: Sequence[str], epochs: Sequence[int],
             cbar_label: str, cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None) -> None:
    masked = np.ma.masked_invalid(matrix)
    im = a.imshow(masked, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax,
                  origin="upper")
    n = len(ylabels)
    step = max(1, math.ceil(n / 32))
    a.set_yticks(range(0, n, step))
    a.set_yticklabels(list(ylabels)[::step], fontsize=7 if n > 12 else 8)
    m = len(epochs)
    xstep = max(1, math.ceil(m / 12))
    a.set_xticks(range(0, m, xstep))
    a.set_xticklabels([str(e) for e in list(epochs)[::xstep]], fontsize=8)
    a.set_xlabel("epoch")
    cb = fig.colorbar(im, ax=a)
    cb.set_label(cbar_label)


def _matrix(series: dict[str, list[tuple[int, float | None]]]) -> tuple[list[str], list[int], np.ndarray]:
    layers = list(series)
    epochs = sorted({int(e) for pts in series.values() for e, _ in pts})
    col = {e: j for j, e in enumerate(epochs)}
    mat = np.full((len(layers), len(epochs)), np.nan)
    for i, name in enumerate(layers):
        for e, v in series[name]:
            if v is not None:
                mat[i, col[int(e)]] = float(v)
    return layers, epochs, mat


def _height(n_layers: int) -> float:
    return min(14.0, max(3.2, 1.2 + 0.22 * n_layers))


def plot_density(run: Run, path: Path) -> str | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for i, row in enumerate(run.metrics):
        for layer, v in (row.get("layer_density") or {}).items():
            series.setdefault(layer, []).append((int(row.get("epoch", i)), 100.0 * float(v)))
    if not series:
        return f"density per layer ({run.label}): no layer_density in metrics.jsonl (dense run?)"
    layers, epochs, mat = _matrix(series)
    fig, ax = _figure(2, 1, size=(8.0, _height(len(layers)) + 2.6), gridspec_kw={"height_ratios": [3, 1]})
    # colours span the masked layers' densities (dense layers, at 100%, show as the top colour):
    # a 0-100 scale would paint every layer between 10% and 15% the same
    sparse = mat[np.isfinite(mat) & (mat < 100.0)]
    lo, hi = (float(sparse.min()), float(sparse.max())) if sparse.size else (0.0, 100.0)
    if hi - lo < 1e-9:
        lo, hi = max(0.0, lo - 1.0), hi + 1.0
    _heatmap(fig, ax[0, 0], np.minimum(mat, hi), layers, epochs,
             f"density (% nonzero weights; dense layers shown at {hi:.1f})", vmin=lo, vmax=hi)
    ax[0, 0].set_title(f"{run.label}: density per layer")
    x, y = run.series("density")
    b = ax[1, 0]
    if x:
        b.plot(x, _pct(y), color="C0", label="all prunable layers")
        _legend(b)
    b.set_ylabel("density (%)")
    b.set_title("overall density")
    _epoch_axis(b)
    _save(fig, path)
    return None


def plot_freezing(run: Run, path: Path) -> str | None:
    epochs = [int(r.get("epoch", i)) for i, r in enumerate(run.metrics)]
    frozen = [set(r.get("frozen_blocks") or []) for r in run.metrics]
    if not any(frozen):
        return f"freezing timeline ({run.label}): no block was frozen in this run"
    blocks: list[str] = []
    for r in run.metrics:  # block_lr lists every block in forward order, frozen or not
        blocks += [b for b in (r.get("block_lr") or {}) if b not in blocks]
    for f in frozen:
        blocks += sorted(b for b in f if b not in blocks)
    mat = np.array([[1.0 if b in f else 0.0 for f in frozen] for b in blocks])
    fig, ax = _figure(size=(8.0, _height(len(blocks))))
    a = ax[0, 0]
    a.imshow(mat, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0.0, vmax=1.2)
    a.set_yticks(range(len(blocks)))
    a.set_yticklabels(blocks, fontsize=7 if len(blocks) > 12 else 8)
    xstep = max(1, math.ceil(len(epochs) / 12))
    a.set_xticks(range(0, len(epochs), xstep))
    a.set_xticklabels([str(e) for e in epochs[::xstep]], fontsize=8)
    a.set_xlabel("epoch")
    a.set_ylabel("block (forward order)")
    a.set_title(f"{run.label}: progressive layer freezing timeline (Algorithm 1)")
    cmap = colormaps["Blues"]
    a.legend(handles=[Patch(color=cmap(1.0 / 1.2), label="frozen"), Patch(color=cmap(0.0), label="active")],
             fontsize=8, loc="lower right")
    _save(fig, path)
    return None


def plot_sieve(run: Run, path: Path) -> str | None:
    x, y = run.series("active_samples")
    if not x:
        return f"partial training set ({run.label}): no active_samples in metrics.jsonl"
    _, returned = run.series("returned")
    _, removed = run.series("removed_this_update")
    if len(set(y)) == 1 and not any(returned) and not any(removed):
        return f"partial training set ({run.label}): constant at {y[0]} samples (no data sieving)"
    fig, ax = _figure()
    a = ax[0, 0]
    a.step(x, y, where="post", color="C0", label="partial training set")
    xr, yr = run.series("returned")
    if xr and any(yr):
        a.bar(xr, yr, color="C2", alpha=0.5, label="returned at update")
    xm, ym = run.series("removed_this_update")
    if xm and any(ym):
        a.bar(xm, [-v for v in ym], color="C3", alpha=0.5, label="removed at update (negative)")
    a.set_title(f"{run.label}: circular data sieving, partial training set size (Section 4.3)")
    a.set_ylabel("samples")
    _epoch_axis(a)
    _legend(a)
    _save(fig, path)
    return None


def plot_forgetting(run: Run, hists: Sequence[tuple[int, dict[int, int]]], path: Path) -> str | None:
    hists = [(e, h) for e, h in hists if h]
    if not hists:
        return f"forgetting histograms ({run.label}): no sieve/forgetting_epoch_XXXX.json files"
    if len(hists) > 6:  # keep the figure legible: six updates spread over training
        pick = sorted({round(i * (len(hists) - 1) / 5) for i in range(6)})
        hists = [hists[i] for i in pick]
    fig, ax = _figure()
    a = ax[0, 0]
    width = 0.8 / len(hists)
    for j, (epoch, h) in enumerate(hists):
        counts = sorted(h)
        a.bar([c - 0.4 + (j + 0.5) * width for c in counts], [h[c] for c in counts], width=width,
              color=f"C{j % 10}", label=f"update at epoch {epoch}")
    a.set_yscale("log")
    a.set_title(f"{run.label}: forgetting-event counts at each sieving update")
    a.set_xlabel("forgetting events per sample in the interval (-1: never classified correctly)")
    ticks = sorted({c for _, h in hists for c in h})
    a.set_xticks(ticks)
    a.set_xticklabels(["never\ncorrect" if c == -1 else str(c) for c in ticks], fontsize=8)
    a.set_ylabel("samples (log scale)")
    a.grid(True, alpha=0.3, axis="y")
    _legend(a)
    _save(fig, path)
    return None


def plot_memory(run: Run, path: Path) -> str | None:
    xm, ym = run.series("mem_model_bytes")
    xp, yp = run.series("peak_mem_bytes")
    if not xm and not xp:
        return f"memory ({run.label}): no mem_model_bytes/peak_mem_bytes in metrics.jsonl (peak is CUDA only)"
    fig, ax = _figure()
    a = ax[0, 0]
    if xm:
        a.plot(xm, [v / MIB for v in ym], color="C0", label="modelled training memory (mem_model_bytes)")
        xu, yu = run.series("mem_model_unfrozen_bytes")
        if xu and yu != ym:
            a.plot(xu, [v / MIB for v in yu], color="C2", ls=":", label="same masks, nothing frozen (model)")
    if xp:
        a.plot(xp, [v / MIB for v in yp], color="C1", ls="--", label="CUDA peak allocated (peak_mem_bytes)")
    a.set_title(f"{run.label}: memory per epoch")
    a.set_ylabel("memory (MiB)")
    _epoch_axis(a)
    _legend(a)
    _save(fig, path)
    return None


def plot_grad_norms(run: Run, change: dict[str, list[float]], path: Path) -> str | None:
    series: dict[str, list[tuple[int, float | None]]] = {}
    epochs_of = []
    for i, row in enumerate(run.metrics):
        g = row.get("grad_norms")
        if not isinstance(g, dict) or not g:
            continue
        e = int(row.get("epoch", i))
        epochs_of.append(e)
        for layer, v in g.items():
            series.setdefault(layer, []).append((e, None if v is None or v <= 0 else math.log10(v)))
    if not series:
        return f"gradient norms ({run.label}): no grad_norms in metrics.jsonl (set analysis.grad_norms=true)"
    layers, epochs, mat = _matrix(series)
    fig, ax = _figure(1, 2, size=(13.0, _height(len(layers))))
    _heatmap(fig, ax[0, 0], mat, layers, epochs, "log10 mean gradient L2 norm", cmap="magma")
    ax[0, 0].set_title("per-layer gradient norm (blank: frozen, no gradient)")
    # the change is shown on a linear scale: zero (a layer whose norm did not move) must stay visible
    ch = {k: [(e, v if v == v else None) for e, v in zip(epochs_of[1:], change.get(k, []), strict=False)]
          for k in layers}
    if any(ch.values()) and len(epochs_of) > 1:
        _, cep, cmat = _matrix(ch)
        _heatmap(fig, ax[0, 1], cmat, layers, cep, "|norm(e) - norm(e-1)|", cmap="magma", vmin=0.0)
        ax[0, 1].set_title("change of the gradient norm between epochs")
    else:
        ax[0, 1].set_axis_off()
        ax[0, 1].text(0.5, 0.5, "one epoch only: no change to show", ha="center", va="center")
    fig.suptitle(f"{run.label}: layer gradient norms (Fig. 3b, Section 4.2.2)")
    _save(fig, path)
    return None


def plot_layer_heatmap(run: Run, series: dict[str, list[tuple[int, float]]], path: Path, title: str,
                       cbar_label: str, percent: bool = True) -> str | None:
    """Layer x epoch heatmap of a per-layer similarity (structural similarity, CKA) in %."""
    if not series or not any(series.values()):
        return f"{title} ({run.label}): nothing to plot"
    scale = 100.0 if percent else 1.0
    layers, epochs, mat = _matrix({k: [(e, v * scale) for e, v in pts] for k, pts in series.items()})
    fig, ax = _figure(size=(8.0, _height(len(layers))))
    _heatmap(fig, ax[0, 0], mat, layers, epochs, cbar_label, vmin=0.0, vmax=scale)
    ax[0, 0].set_ylabel("layer (forward order)")
    ax[0, 0].set_title(f"{run.label}: {title}")
    _save(fig, path)
    return None
