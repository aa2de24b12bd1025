"""The report's figures: matplotlib's object API on the Agg canvas (no pyplot, no display, no
global backend switch), one PNG per figure.

Each figure answers one question a user asks of a run, stated in the report beside it
(:attr:`Drawn.question`). Every function either writes ``path`` and returns a :class:`Drawn`
(the figure, so tests can read the series and axis ranges it shows, and its question), or writes
nothing and returns a one-line note saying why the figure was skipped, so the report never shows
an empty or meaningless plot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from spfde.report.runs import Run


@dataclass
class Drawn:
    """A figure written to disk and the one question it answers."""

    fig: Figure
    question: str

    @property
    def axes(self) -> list[Any]:
        return list(self.fig.axes)


MIB = 2**20
DPI = 110


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.5, 4.2), **kw: Any):
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: Path, question: str) -> Drawn:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return Drawn(fig, question)


def _pct(values: Sequence[float]) -> list[float]:
    return [100.0 * float(v) for v in values]


def _legend(ax: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 6:  # many runs or blocks: beside the axes, never over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    elif handles:
        ax.legend(fontsize=8, loc="best")


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _epoch_axis(ax: Any) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


# ------------------------------------------------------------------ several runs on one figure


def _two_lines(runs: Sequence[Run], path: Path, keys: tuple[str, str], ylabel: str, title: str, question: str,
               scale: float) -> Drawn | str:
    test_key, train_key = keys
    if not any(r.series(test_key)[0] or r.series(train_key)[0] for r in runs):
        return f"{ylabel.split(' (')[0]}: no {train_key}/{test_key} in metrics.jsonl"
    fig, ax = _figure()
    a = ax[0, 0]
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        x, y = r.series(test_key)
        if x:
            a.plot(x, [scale * v for v in y], color=color, marker="o" if len(x) < 30 else None, ms=3,
                   label=f"{r.label} test")
        x, y = r.series(train_key)
        if x:
            a.plot(x, [scale * v for v in y], color=color, ls="--", label=f"{r.label} train")
    a.set_title(title)
    a.set_ylabel(ylabel)
    _epoch_axis(a)
    _legend(a)
    return _save(fig, path, question)


def plot_accuracy(runs: Sequence[Run], path: Path) -> Drawn | str:
    return _two_lines(runs, path, ("test_acc", "train_acc"), "accuracy (%)",
                      "Accuracy per epoch (solid: test, dashed: train)",
                      "Which run is more accurate, epoch by epoch, and is any still improving at the end?", 100.0)


def plot_loss(runs: Sequence[Run], path: Path) -> Drawn | str:
    return _two_lines(runs, path, ("test_loss", "train_loss"), "loss (nats per sample)",
                      "Cross-entropy loss per epoch (solid: test, dashed: train)",
                      "Is training converging, and does the test loss part from the training loss (over-fitting)?",
                      1.0)


def _is_dense(run: Run) -> bool:
    s = run.summary or {}
    method = s.get("method", run.cfg("sparsity.method"))
    target = s.get("sparsity", run.cfg("sparsity.target"))
    freeze = s.get("freeze_target", run.cfg("freezing.target"))
    sieve = s.get("sieve_ratio", run.cfg("sieving.ratio") if run.cfg("sieving.method") != "none" else 0.0)
    return (method == "dense" or not target) and not freeze and not sieve


def plot_flops_vs_accuracy(runs: Sequence[Run], path: Path) -> Drawn | str:
    lines = []
    for r in runs:
        pts = [(row["cum_train_flops"] / 1e12, 100.0 * row["test_acc"]) for row in r.metrics
               if row.get("cum_train_flops") is not None and row.get("test_acc") is not None]
        if pts:
            lines.append((r, pts))
    if not lines:
        return "FLOPs vs accuracy: no epoch has both cum_train_flops and test_acc"
    fig, ax = _figure()
    a = ax[0, 0]
    dense_runs = [r for r, _ in lines if _is_dense(r)]
    for i, (r, pts) in enumerate(lines):
        xs, ys = zip(*pts, strict=False)
        color = f"C{i % 10}"
        dense = r in dense_runs
        a.plot(xs, ys, color=color, marker="o" if len(xs) < 30 else None, ms=3, ls="-" if not dense else "-.",
               label=f"{r.label} (dense run)" if dense else r.label)
        ref = (r.summary or {}).get("dense_train_flops")
        if not dense and not dense_runs and ref:
            # no dense run to compare with: where the same epochs would end, trained dense (the ledger)
            a.axvline(ref / 1e12, color=color, ls=":", lw=1.2, label=f"dense training, same epochs ({r.label})")
    a.set_title("Test accuracy versus cumulative training FLOPs")
    a.set_xlabel("cumulative training FLOPs (×1e12)")
    a.set_ylabel("test accuracy (%)")
    a.set_xlim(left=0)
    a.grid(True, alpha=0.3)
    _legend(a)
    return _save(fig, path, "How much accuracy does each training FLOP buy, against training dense?")


def plot_accuracy_vs_time(runs: Sequence[Run], path: Path) -> Drawn | str:
    lines = [(r, [(row["wall_s"], 100.0 * row["test_acc"]) for row in r.metrics
                  if row.get("wall_s") is not None and row.get("test_acc") is not None]) for r in runs]
    lines = [(r, pts) for r, pts in lines if pts]
    if not lines:
        return "accuracy vs wall-clock: no epoch has both wall_s and test_acc"
    fig, ax = _figure()
    a = ax[0, 0]
    for i, (r, pts) in enumerate(lines):
        xs, ys = zip(*pts, strict=False)
        a.plot(xs, ys, color=f"C{i % 10}", marker="o" if len(xs) < 30 else None, ms=3,
               ls="-." if _is_dense(r) else "-", label=f"{r.label} (dense run)" if _is_dense(r) else r.label)
    a.set_title("Test accuracy versus training wall-clock (evaluation excluded)")
    a.set_xlabel("cumulative training wall-clock (s)")
    a.set_ylabel("test accuracy (%)")
    a.set_xlim(left=0)
    a.grid(True, alpha=0.3)
    _legend(a)
    return _save(fig, path, "Which run reaches a given accuracy sooner, in seconds rather than FLOPs?")


# ------------------------------------------------------------------ one run


def _names(blocks: Sequence[str]) -> str:
    return ", ".join(blocks) if len(blocks) <= 3 else f"{blocks[0]} … {blocks[-1]} ({len(blocks)} blocks)"


def lr_groups(run: Run) -> list[tuple[list[str], list[tuple[int, float]]]]:
    """Blocks with identical learning-rate curves, each curve over the epochs the block trained.

    Drawing one line per block hides every line under the last one drawn when blocks share a
    schedule (all unfrozen blocks follow the global cosine), so blocks are grouped by curve.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for i, r in enumerate(run.metrics):
        d = r.get("block_lr")
        if not isinstance(d, dict):
            continue
        frozen = set(r.get("frozen_blocks") or [])
        for b, v in d.items():
            series.setdefault(b, [])
            if v is not None and b not in frozen:
                series[b].append((int(r.get("epoch", i)), float(v)))
    groups: dict[tuple, list[str]] = {}
    for b, pts in series.items():
        groups.setdefault(tuple((e, round(v, 12)) for e, v in pts), []).append(b)
    return [(blocks, list(key)) for key, blocks in groups.items() if key]


def plot_lr(run: Run, path: Path) -> Drawn | str:
    groups = lr_groups(run)
    fig, ax = _figure()
    a = ax[0, 0]
    freezes = any(r.get("frozen_blocks") for r in run.metrics)
    if groups:
        for j, (blocks, pts) in enumerate(groups):
            xs, ys = zip(*pts, strict=False)
            label = "all param groups" if blocks == ["all"] else _names(blocks)
            a.plot(xs, ys, color=colormaps["tab20"](j % 20), linestyle=("-", "--", ":")[(j // 20) % 3],
                   marker="o" if len(xs) < 30 else None, ms=3, label=label)
        if len(groups) > 1 or freezes:
            a.set_title(f"{run.label}: learning rate per block (block-wise cosine, Section 4.2.1)")
            a.set_xlabel("epoch (lr at the epoch's end; a line ends when its block freezes)")
        else:
            a.set_title(f"{run.label}: learning rate (one schedule for every block)")
    else:
        x, y = run.series("lr")
        if not x:
            return f"learning rate ({run.label}): no lr/block_lr in metrics.jsonl"
        a.plot(x, y, color="C0", marker="o" if len(x) < 30 else None, ms=3, label="lr")
        a.set_title(f"{run.label}: learning rate")
    a.set_ylabel("learning rate")
    a.set_ylim(bottom=0)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.grid(True, alpha=0.3)
    if not a.get_xlabel():
        a.set_xlabel("epoch (lr at the epoch's end)")
    _legend(a)
    if freezes:
        return _save(fig, path, "Which learning rate did each block train with, and did it decay to the end rate "
                                "by the epoch the block froze?")
    return _save(fig, path, "Which learning rate did the run train with?")


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


def plot_density(run: Run, path: Path) -> Drawn | str:
    series: dict[str, list[tuple[int, float]]] = {}
    for i, row in enumerate(run.metrics):
        for layer, v in (row.get("layer_density") or {}).items():
            series.setdefault(layer, []).append((int(row.get("epoch", i)), 100.0 * float(v)))
    if not series:
        return f"density per layer ({run.label}): no layer_density in metrics.jsonl"
    layers, epochs, mat = _matrix(series)
    dense = np.isfinite(mat) & (mat >= 100.0 - 1e-9)
    if dense[np.isfinite(mat)].all():
        return f"density per layer ({run.label}): a dense run, every layer at 100% in every epoch"
    fig, ax = _figure(2, 1, size=(8.0, _height(len(layers)) + 2.6), gridspec_kw={"height_ratios": [3, 1]})
    # colours span the masked layers' densities (a 0-100 scale would paint every layer between 10%
    # and 15% the same); dense layers are drawn apart in grey, never as the top of that range
    sparse = mat[np.isfinite(mat) & ~dense]
    lo, hi = float(sparse.min()), float(sparse.max())
    if hi - lo < 1e-9:
        lo, hi = max(0.0, lo - 1.0), hi + 1.0
    _heatmap(fig, ax[0, 0], np.where(dense, np.nan, mat), layers, epochs, "density of masked layers (% nonzero)",
             vmin=lo, vmax=hi)
    title = f"{run.label}: density per layer"
    if dense.any():
        ax[0, 0].imshow(np.ma.masked_where(~dense, np.ones_like(mat)), aspect="auto", interpolation="nearest",
                        cmap=ListedColormap(["0.8"]), vmin=0, vmax=1)
        title += " (grey: dense layer, 100%, not masked)"
    ax[0, 0].set_title(title)
    x, y = run.series("density")
    b = ax[1, 0]
    if x:
        b.plot(x, _pct(y), color="C0", marker="o" if len(x) < 30 else None, ms=3, label="all prunable layers")
        _legend(b)
    b.set_ylabel("density (%)")
    b.set_ylim(bottom=0)
    mest = (run.summary or {}).get("method", run.cfg("sparsity.method")) == "mest"
    b.set_title("overall density" + (" (MEST trains a little denser than the target until its search ends)"
                                     if mest else ""))
    _epoch_axis(b)
    return _save(fig, path, "How dense is each layer, and when did Prune&Grow change the masks?")


def plot_freezing(run: Run, path: Path) -> Drawn | str:
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
    return _save(fig, path, "Which blocks were frozen, from which epoch on (Algorithm 1)?")


def plot_sieve(run: Run, path: Path) -> Drawn | str:
    x, active = run.series("active_samples")
    if not x:
        return f"data sieving ({run.label}): no active_samples in metrics.jsonl"
    _, returned = run.series("returned")
    _, removed = run.series("removed_this_update")
    xn, never = run.series("never_seen_count")
    if len(set(active)) == 1 and not any(returned) and not any(removed) and not any(never):
        return f"data sieving ({run.label}): the partial set is the whole set, {active[0]} samples (no data sieving)"
    size = (run.summary or {}).get("train_size")
    fig, ax = _figure(2, 1, size=(7.5, 5.6), sharex=True)
    a = ax[0, 0]
    width = 0.4
    xr = [e for e, v in zip(x, returned, strict=False) if v] or []
    a.bar([e - width / 2 for e in x], returned, width=width, color="C2", label="returned from the removed queue")
    a.bar([e + width / 2 for e in x], removed, width=width, color="C3", label="removed (the easiest: least forgotten)")
    a.set_ylabel("samples per update")
    a.set_ylim(0, max(max(returned), max(removed), 1) * 1.45)  # room for the legend above the bars
    sizes = sorted(set(active))
    where = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    a.set_title(f"{run.label}: partial set of {where}{f' / {size}' if size else ''} samples, "
                f"{len(xr)} sieving updates")
    a.grid(True, alpha=0.3, axis="y")
    a.legend(fontsize=8, loc="upper left", ncols=2)
    b = ax[1, 0]
    if xn:
        b.plot(xn, never, color="C0", marker="o" if len(xn) < 30 else None, ms=3,
               label="never trained on yet (never_seen_count)")
        b.set_ylim(bottom=0, top=max(max(never), 1) * 1.15)
        done = next((e for e, v in zip(xn, never, strict=False) if v == 0), None)
        if done is not None and max(never) > 0:
            b.axvline(done, color="0.5", ls=":", lw=1)
            b.annotate(f"every sample trained on by epoch {done}", (done, max(never) * 0.6),
                       xytext=(6, 0), textcoords="offset points", fontsize=8, color="0.3")
        _legend(b)
    b.set_ylabel("samples")
    _epoch_axis(b)
    return _save(fig, path, "Does the circular sieve rotate the data: how many samples swap in and out at each "
                            "update, and how many have never been trained on?")


FORGETTING_BINS = ((-1, -1, "never correct"), (0, 0, "0: learned, never forgotten"), (1, 1, "1"), (2, 2, "2"),
                   (3, 10**9, "3 or more"))


def forgetting_shares(hist: dict[int, int]) -> list[float]:
    """Shares (%) of a forgetting histogram in :data:`FORGETTING_BINS`."""
    total = sum(hist.values()) or 1
    return [100.0 * sum(n for c, n in hist.items() if lo <= c <= hi) / total for lo, hi, _ in FORGETTING_BINS]


def plot_forgetting(run: Run, hists: Sequence[tuple[int, dict[int, int]]], path: Path) -> Drawn | str:
    hists = [(e, h) for e, h in hists if h]
    if not hists:
        return f"forgetting histograms ({run.label}): no sieve/forgetting_epoch_XXXX.json files"
    # every update, one stacked bar each, on a linear scale: the heights are the shares themselves
    shares = np.array([forgetting_shares(h) for _, h in hists])
    epochs = [e for e, _ in hists]
    fig, ax = _figure(size=(max(7.5, 0.35 * len(epochs) + 3.0), 4.2))
    a = ax[0, 0]
    bottom = np.zeros(len(epochs))
    colors = ["0.55", "C2", "C1", "C3", "C4"]
    for k, (_, _, label) in enumerate(FORGETTING_BINS):
        a.bar(epochs, shares[:, k], bottom=bottom, width=0.8, color=colors[k], label=label)
        bottom += shares[:, k]
    a.set_ylim(0, 100)
    a.set_ylabel("share of the partial set (%)")
    a.set_xlabel("sieving update at epoch (forgetting events counted over the interval before it)")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_title(f"{run.label}: forgetting events per sample at each of the {len(epochs)} sieving updates")
    _legend_outside(a)
    return _save(fig, path, "How hard is the partial set at each update: which share was never learned, learned "
                            "for good, or forgotten again (the sieve removes the easiest)?")


def plot_memory(run: Run, path: Path) -> Drawn | str:
    xm, ym = run.series("mem_model_bytes")
    xp, yp = run.series("peak_mem_bytes")
    if not xm and not xp:
        return f"memory ({run.label}): no mem_model_bytes/peak_mem_bytes in metrics.jsonl (peak is CUDA only)"
    fig, ax = _figure()
    a = ax[0, 0]
    top = 0.0
    if xm:
        a.plot(xm, [v / MIB for v in ym], color="C0", marker="o" if len(xm) < 30 else None, ms=3,
               label="modelled training memory (mem_model_bytes)")
        top = max(top, max(ym) / MIB)
        xu, yu = run.series("mem_model_unfrozen_bytes")
        if xu and yu != ym:
            a.plot(xu, [v / MIB for v in yu], color="C2", ls=":", label="same masks, nothing frozen (model)")
            top = max(top, max(yu) / MIB)
    if xp:
        a.plot(xp, [v / MIB for v in yp], color="C1", ls="--", label="CUDA peak allocated (peak_mem_bytes)")
        top = max(top, max(yp) / MIB)
    a.set_ylim(0, top * 1.1 or 1.0)  # from zero: a 159 -> 121 MiB step must not look like a collapse
    a.set_title(f"{run.label}: training memory per epoch")
    a.set_ylabel("memory (MiB)")
    _epoch_axis(a)
    _legend(a)
    return _save(fig, path, "How much training memory does the run need, epoch by epoch, and how much does "
                            "freezing save (Fig. 4)?")


def plot_grad_norms(run: Run, change: dict[str, list[float]], path: Path) -> Drawn | str:
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
    return _save(fig, path, "Which layers have stopped changing, so freezing them costs little (Fig. 3b)?")


def plot_layer_heatmap(run: Run, series: dict[str, list[tuple[int, float]]], path: Path, title: str,
                       cbar_label: str, percent: bool = True, question: str = "") -> Drawn | str:
    """Layer x epoch heatmap of a per-layer similarity (structural similarity, CKA) in %."""
    if not series or not any(series.values()):
        return f"{title} ({run.label}): nothing to plot"
    scale = 100.0 if percent else 1.0
    layers, epochs, mat = _matrix({k: [(e, v * scale) for e, v in pts] for k, pts in series.items()})
    fig, ax = _figure(size=(8.0, _height(len(layers))))
    _heatmap(fig, ax[0, 0], mat, layers, epochs, cbar_label, vmin=0.0, vmax=scale)
    ax[0, 0].set_ylabel("layer (forward order)")
    ax[0, 0].set_title(f"{run.label}: {title}")
    return _save(fig, path, question or f"How does each layer's {title} evolve?")
