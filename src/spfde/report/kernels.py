"""The report's per-layer kernel table: which kernel each masked layer ran (metrics ``kernels``).

Self-contained so ``spfde report`` gains one block without touching the plots: for every layer in
the last epoch's ``kernels`` field, the kernel it ran then, in how many epochs it ran the sparse
kernel, and the speedup ``sparsity.kernels: auto`` last measured for it (``kernel_speedup``).
"""

from __future__ import annotations

from typing import Any


def kernel_blocks(metrics: list[dict[str, Any]], label: str) -> list[tuple]:
    """Report blocks (heading + table), or nothing for runs that predate the field or mask nothing."""
    rows = [r for r in metrics if isinstance(r.get("kernels"), dict)]
    if not rows or not rows[-1]["kernels"]:
        return []
    speed: dict[str, float] = {}
    for r in rows:
        speed.update(r.get("kernel_speedup") or {})
    table = []
    for layer, kernel in rows[-1]["kernels"].items():
        sparse_epochs = sum(1 for r in rows if r["kernels"].get(layer) == "sparse")
        s = speed.get(layer)
        table.append([f"`{layer}`", kernel, f"{sparse_epochs}/{len(rows)}", "-" if s is None else f"{s:.2f}x"])
    return [("h", 3, f"Kernels per layer ({label})"),
            ("table", ["layer", "kernel (last epoch)", "epochs sparse", "measured speedup (auto)"], table)]
