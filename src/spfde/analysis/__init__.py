"""The paper's analyses of sparse training (Sections 3 and 4.2.2).

- :func:`structural_similarity`, :func:`structural_similarity_over_time`: overlap of the top-50%
  weights of an intermediate sparse layer with the final mask (Section 3.1, Fig. 1a).
- :func:`linear_cka`, :func:`layer_cka_over_time`: representational similarity of a layer to its
  final self on a fixed probe batch (Section 3.2, Fig. 1b, Appendix A Fig. A1).
- :class:`GradNormTracker`, :func:`grad_norm_change`: per-layer gradient norms per epoch and their
  change (Section 4.2.2, Fig. 3b).
- :func:`save_snapshot`, :func:`load_snapshots`, :func:`save_forgetting_histogram`,
  :func:`load_forgetting_histograms`: the run-directory artifacts these analyses and
  ``spfde report`` read (formats documented in :mod:`spfde.analysis.artifacts`).

Each analysis works on saved snapshots / state_dicts or on live models; none needs training.
"""

from spfde.analysis.artifacts import (
    load_forgetting_histograms,
    load_snapshot,
    load_snapshots,
    save_forgetting_histogram,
    save_snapshot,
)
from spfde.analysis.gradnorm import GradNormTracker, grad_norm_change
from spfde.analysis.similarity import (
    capture_features,
    default_cka_layers,
    layer_cka_over_time,
    linear_cka,
    structural_similarity,
    structural_similarity_over_time,
    top_fraction_positions,
)

__all__ = [
    "GradNormTracker",
    "capture_features",
    "default_cka_layers",
    "grad_norm_change",
    "layer_cka_over_time",
    "linear_cka",
    "load_forgetting_histograms",
    "load_snapshot",
    "load_snapshots",
    "save_forgetting_histogram",
    "save_snapshot",
    "structural_similarity",
    "structural_similarity_over_time",
    "top_fraction_positions",
]
