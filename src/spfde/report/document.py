"""``spfde report``: a Markdown (or HTML) report with PNG plots for one or more run directories.

Each figure answers one question, printed in bold above it (:mod:`spfde.report.plots`); a
figure without data, or whose answer is trivial (a dense run's density map), is replaced by a
one-line note saying why.

- all runs on one plot: accuracy and loss per epoch (train and test), test accuracy versus
  cumulative training FLOPs with the dense cost as reference (the paper's accuracy/cost
  trade-off, Tables 1-2), test accuracy versus training wall-clock;
- per run: learning rate per block (blocks sharing a schedule share a line), density per layer,
  the freezing timeline, the sieve's rotation (samples returned/removed per update, samples never
  trained on), forgetting events at every sieving update, memory per epoch, the per-layer
  gradient norms and their change (Fig. 3b), structural similarity to the final mask (Fig. 1a)
  and linear CKA to the final model (Fig. 1b) when snapshots exist.

The summary table shows every fraction as a percent; the ledger's FLOPs saving is followed by
wall-clock (measured against a dense run when the report holds one).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch

from spfde.analysis import (
    grad_norm_change,
    layer_cka_over_time,
    load_forgetting_histograms,
    load_snapshots,
    structural_similarity_over_time,
)
from spfde.errors import SpfdeError
from spfde.report import plots
from spfde.report.compare import COMPARE_COLUMNS, compare_footnotes, compare_row_cells, compare_runs
from spfde.report.kernels import kernel_blocks
from spfde.report.runs import Run, load_runs
from spfde.units import format_flops
from spfde.utils import atomic_write_text

SUMMARY_FIELDS = ("final_test_acc", "best_test_acc", "epochs", "wall_s", "samples_per_s", "time_to_final_acc_s",
                  "time_to_acc", "seed", "method", "model", "dataset", "train_size", "sparsity", "freeze_target",
                  "sieve_ratio", "train_flops", "dense_train_flops", "flops_saving", "peak_mem_bytes",
                  "mem_model_avg_bytes", "mem_model_min_bytes", "mem_model_unfrozen_avg_bytes", "mem_saving_avg",
                  "mem_saving_min", "threads", "weights_sha256")

# fractions in [0, 1], all shown as percent (never a fraction beside a percent); keys ending in one
# of _FRACTION_ENDINGS (freeze_reduction, freeze_backward_reduction, ...) are fractions too
_PERCENT = ("flops_saving", "sparsity", "freeze_target", "sieve_ratio", "mem_saving_avg", "mem_saving_min")
_FRACTION_ENDINGS = ("_reduction", "_saving", "_ratio", "_fraction")

# a report is a list of blocks rendered to Markdown or HTML:
# ("h", level, text) | ("p", text) | ("note", text) | ("img", relative path, caption, question)
# | ("table", header, rows)
Block = tuple


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _fmt_summary(key: str, v: Any) -> str:
    """One summary.json value with its unit: percent for every fraction, MiB, FLOPs with an SI prefix
    (:func:`spfde.units.format_flops`, as ``spfde train`` prints them), s."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if key == "time_to_acc" and isinstance(v, dict):
        return ", ".join(f"{100 * float(t):g}%: {'-' if s is None else f'{float(s):.1f} s'}" for t, s in v.items())
    if isinstance(v, (dict, list)):
        return f"`{v}`"
    if key.endswith("acc") or key in _PERCENT or key.endswith(_FRACTION_ENDINGS):
        return f"{100 * float(v):.2f} %"
    if key.endswith("bytes"):
        return f"{float(v) / 2**20:.1f} MiB"
    if "flops" in key and isinstance(v, (int, float)):  # train_flops, weight_forward_flops_per_sample, ...
        return format_flops(float(v)) + (" /sample" if key.endswith("_per_sample") else "")
    if key == "samples_per_s":
        return f"{float(v):.0f} /s"
    if key.endswith("_s"):
        return f"{float(v):.1f} s"
    if key == "weights_sha256":
        return f"`{str(v)[:12]}…`"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _summary_table(runs: list[Run]) -> Block:
    keys = [k for k in SUMMARY_FIELDS if any(k in (r.summary or {}) for r in runs)]
    extra = sorted({k for r in runs for k in (r.summary or {}) if k not in SUMMARY_FIELDS})
    rows = [[k] + [_fmt_summary(k, (r.summary or {}).get(k)) for r in runs] for k in keys + extra]
    return ("table", ["field"] + [r.label for r in runs], rows)


def _cost_note(runs: list[Run], rows: list[dict[str, Any]] | None) -> list[Block]:
    """The ledger's FLOPs saving never stands alone: wall-clock beside it, measured or not."""
    if rows:
        return [("p", " ".join(compare_footnotes(rows)))]
    parts = []
    for r in runs:
        s = r.summary or {}
        if s.get("flops_saving") and s.get("wall_s") is not None:
            kernels = r.cfg("sparsity.kernels")  # absent in runs from before sparsity.kernels (dense then)
            ran = f"sparsity.kernels = {kernels}, " if kernels else ""
            parts.append(f"`{r.label}`: FLOPs {100 * s['flops_saving']:.1f}% below dense (the ledger's count); "
                         f"wall-clock {s['wall_s']:.1f} s (no dense run in this report: the wall-clock saving is "
                         "not measured; masked weights are counted as saved, and how much of that wall-clock "
                         f"realizes depends on the kernels that ran them: {ran}docs/kernels.md)")
    return [("p", "; ".join(parts) + ".")] if parts else []


def _infer_shapes(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(num_classes, in_channels) from a state_dict: the last 2-D weight's rows, the first conv's inputs."""
    weights = [v for k, v in state.items() if k.endswith("weight") and torch.is_tensor(v)]
    convs = [w for w in weights if w.dim() == 4]
    linears = [w for w in weights if w.dim() == 2]
    if not convs or not linears:
        raise SpfdeError("cannot infer num_classes/in_channels from the snapshot (needs a conv and a linear layer)")
    return int(linears[-1].shape[0]), int(convs[0].shape[1])


def _default_probe(run: Run) -> torch.Tensor:
    from spfde.config import from_dict
    from spfde.data import load_datasets

    cfg = from_dict(run.config)
    _, test_set, _ = load_datasets(cfg.data, seed=cfg.seed)
    n = min(cfg.analysis.probe_size, len(test_set))
    return torch.stack([test_set[i][0] for i in range(n)]).float()


def _cka(run: Run, snaps: list, probe: torch.Tensor | None) -> dict[str, list[tuple[int, float]]]:
    from spfde.models import create_model

    name, width = run.cfg("model.name"), run.cfg("model.width", 1.0)
    if not name:
        raise SpfdeError("config.yaml has no model.name")
    final = snaps[-1][1]
    num_classes, in_channels = _infer_shapes(final["model"])
    if probe is None:
        probe = _default_probe(run)
    gen = torch.random.fork_rng(devices=[])  # model init draws from the global RNG; leave it as it was
    with gen:
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, in_channels=in_channels, width=float(width),
                             **(run.cfg("model.kwargs") or {}))
    if torch.cuda.is_available():  # dozens of forward passes over the probe: use the GPU when there is one
        model = model.cuda()
    return layer_cka_over_time(model, snaps, final, probe)


def _run_section(run: Run, plot_dir: Path, out_dir: Path, probe: torch.Tensor | None) -> list[Block]:
    blocks: list[Block] = [("h", 2, f"Run `{run.label}`"), ("p", f"Directory: `{run.path}`")]
    if run.summary is None:
        blocks.append(("note", "no summary.json: the run has not finished (plots show the epochs so far)"))
    d = plot_dir / _slug(run.label)

    def add(result: plots.Drawn | str, path: Path, caption: str) -> None:
        blocks.append(_image(result, path, out_dir, caption))

    add(plots.plot_lr(run, d / "lr.png"), d / "lr.png", "Learning rate per block")
    add(plots.plot_density(run, d / "density.png"), d / "density.png", "Density per layer")
    add(plots.plot_freezing(run, d / "freezing.png"), d / "freezing.png", "Freezing timeline")
    add(plots.plot_sieve(run, d / "sieve.png"), d / "sieve.png", "Data sieving: the partial set's rotation")
    hists = load_forgetting_histograms(run.path)
    add(plots.plot_forgetting(run, hists, d / "forgetting.png"), d / "forgetting.png",
        "Forgetting events at each sieving update")
    add(plots.plot_memory(run, d / "memory.png"), d / "memory.png", "Memory per epoch")
    blocks += kernel_blocks(run.metrics, run.label)
    history = [r["grad_norms"] for r in run.metrics if isinstance(r.get("grad_norms"), dict) and r["grad_norms"]]
    add(plots.plot_grad_norms(run, grad_norm_change(history), d / "grad_norms.png"), d / "grad_norms.png",
        "Per-layer gradient norms and their change")

    snaps = load_snapshots(run.path)
    if not snaps:
        blocks.append(("note", f"similarity analyses ({run.label}): no snapshots/ (set analysis.snapshots=true)"))
        return blocks
    sim = structural_similarity_over_time(snaps, snaps[-1][1])
    add(plots.plot_layer_heatmap(run, sim, d / "structural_similarity.png",
                                 "structural similarity to the final mask (top-50% weights, Fig. 1a)",
                                 "structural similarity (%)",
                                 question="From which epoch does each layer's mask stop changing (Fig. 1a)?"),
        d / "structural_similarity.png", "Structural similarity")
    try:
        cka = _cka(run, snaps, probe)
    except Exception as e:  # noqa: BLE001 - CKA is optional: a missing dataset or model must not sink the report
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        blocks.append(("note", f"linear CKA ({run.label}) skipped: {msg}"))
    else:
        add(plots.plot_layer_heatmap(run, cka, d / "cka.png", "linear CKA to the final model (Fig. 1b)", "CKA (%)",
                                     question="From which epoch does each layer compute what it computes at the "
                                              "end (Fig. 1b)?"),
            d / "cka.png", "Linear CKA")
    return blocks


def _image(result: plots.Drawn | str, path: Path, out_dir: Path, caption: str) -> Block:
    if isinstance(result, str):
        return ("note", result)
    return ("img", os.path.relpath(path, out_dir), caption, result.question)


def build_report(runs: list[Run], out_dir: Path, probe: torch.Tensor | None = None) -> list[Block]:
    plot_dir = out_dir / "plots"
    blocks: list[Block] = [("h", 1, "SpFDE run report"),
                           ("p", "Runs: " + ", ".join(f"`{r.label}`" for r in runs)),
                           ("h", 2, "Summary (summary.json)")]
    if any(r.summary for r in runs):
        blocks.append(_summary_table(runs))
    else:
        blocks.append(("note", "no run has a summary.json yet"))
    finished = [r for r in runs if r.summary is not None]
    rows = None
    if len(finished) > 1:
        notes: list[str] = []  # e.g. runs on different data: said here as spfde compare says it
        rows = compare_runs([r.path for r in finished], notes)
        blocks += [("h", 2, "Comparison (seeds grouped, mean ± std)"),
                   ("table", list(COMPARE_COLUMNS), [compare_row_cells(r) for r in rows])]
        blocks += [("p", f"Note: {n}") for n in notes]
    blocks += _cost_note(finished, rows)
    blocks.append(("h", 2, "All runs"))
    for fn, name, caption in ((plots.plot_accuracy, "accuracy.png", "Accuracy per epoch"),
                              (plots.plot_loss, "loss.png", "Loss per epoch"),
                              (plots.plot_flops_vs_accuracy, "flops_vs_accuracy.png",
                               "Test accuracy versus cumulative training FLOPs"),
                              (plots.plot_accuracy_vs_time, "accuracy_vs_time.png",
                               "Test accuracy versus training wall-clock")):
        blocks.append(_image(fn(runs, plot_dir / name), plot_dir / name, out_dir, caption))
    for r in runs:
        blocks += _run_section(r, plot_dir, out_dir, probe)
    return blocks


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "note":
            out.append(f"*Skipped: {b[1]}*" if not b[1].startswith("no summary") else f"*{b[1]}*")
        elif kind == "img":
            out.append(f"**{b[3]}**\n\n![{b[2]}]({Path(b[1]).as_posix()})")
        elif kind == "table":
            header, rows = b[1], b[2]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def _md_inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def render_html(blocks: list[Block]) -> str:
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>SpFDE run report</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
           ".note{color:#666;font-style:italic}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{_md_inline(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_md_inline(b[1])}</p>")
        elif kind == "note":
            out.append(f"<p class=\"note\">Skipped: {_md_inline(b[1])}</p>")
        elif kind == "img":
            src = html.escape(Path(b[1]).as_posix())
            out.append(f"<figure><figcaption><b>{html.escape(b[3])}</b></figcaption>"
                       f"<img src=\"{src}\" alt=\"{html.escape(b[2])}\"></figure>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_md_inline(str(c))}</td>" for c in row) + "</tr>" for row in b[2]]
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dirs: list[Path], out_dir: Path | None = None, fmt: Literal["md", "html"] = "md",
                 probe: torch.Tensor | None = None) -> Path:
    """Write ``report.md`` (or ``report.html``) and ``plots/*.png`` to ``out_dir`` (default: the first run).

    ``probe`` is the batch used for linear CKA; by default the first ``analysis.probe_size`` test
    samples of the run's dataset. Returns the report's path. A missing or invalid run directory
    raises :class:`SpfdeError` naming it.
    """
    if fmt not in ("md", "html"):
        raise SpfdeError(f"report format must be 'md' or 'html', got {fmt!r}")
    runs = load_runs(list(run_dirs))
    out = Path(out_dir) if out_dir is not None else runs[0].path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpfdeError(f"cannot create report folder {str(out)!r}: {e.strerror}") from None
    blocks = build_report(runs, out, probe)
    path = out / f"report.{fmt}"
    atomic_write_text(path, render_markdown(blocks) if fmt == "md" else render_html(blocks))
    return path


def report_images(blocks: list[Block]) -> list[str]:
    """Relative paths of the images a report links (for tests and tooling)."""
    return [b[1] for b in blocks if b[0] == "img"]


__all__ = ["build_report", "render_html", "render_markdown", "report_images", "write_report"]
