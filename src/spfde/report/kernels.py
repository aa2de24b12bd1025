"""The report's per-layer kernel table: which kernel each masked layer ran (metrics ``kernels``).

Self-contained so ``spfde report`` gains one block without touching the plots: for every layer in
the last epoch's ``kernels`` field, the kernel it ran then, in how many epochs it ran the sparse
kernel, and the speedup ``sparsity.kernels: auto`` last measured for it (``kernel_speedup``), with
the layer's density then when that differs from the last epoch's.
"""

from __future__ import annotations

from typing import Any


def kernel_blocks(metrics: list[dict[str, Any]], label: str) -> list[tuple]:
    """Report blocks (heading + table), or nothing for runs that predate the field or mask nothing."""
    rows = [r for r in metrics if isinstance(r.get("kernels"), dict)]
    if not rows or not rows[-1]["kernels"]:
        return []
    # the latest measured speedup of each layer, with the layer's density when it was measured: auto
    # does not re-time a decision its earlier timings settle (a density step of MEST), so the last
    # measurement may predate the last epoch's density (kernel_speedup_density; runs before that
    # field: the density of the epoch that listed it)
    speed: dict[str, tuple[float, float | None]] = {}
    for r in rows:
        at = r.get("kernel_speedup_density") or r.get("layer_density") or {}
        for layer, s in (r.get("kernel_speedup") or {}).items():
            speed[layer] = (s, at.get(layer))
    now = rows[-1].get("layer_density") or {}
    table = []
    for layer, kernel in rows[-1]["kernels"].items():
        sparse_epochs = sum(1 for r in rows if r["kernels"].get(layer) == "sparse")
        cell = "-"
        if layer in speed:
            s, density = speed[layer]
            cell = f"{s:.2f}x"
            if density is not None and now.get(layer) is not None and abs(now[layer] - density) > 0.005:
                cell += f" (at density {density:.3f})"
        table.append([f"`{layer}`", kernel, f"{sparse_epochs}/{len(rows)}", cell])
    return [("h", 3, f"Kernels per layer ({label})"),
            ("table", ["layer", "kernel (last epoch)", "epochs sparse", "measured speedup (auto)"], table)]
