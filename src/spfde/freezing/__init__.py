"""Progressive layer freezing (paper Sections 3, 4.2, Algorithm 1, Appendix B).

Method card
-----------
What: split the model into N blocks of consecutive layers (a ResNet basic block, the stem, the
head) and, from epoch ``Tfrz`` on, freeze one more block every Δτ epochs, front to back, until the
predicted training FLOPs meet a target. A frozen block keeps its sparse structure and weights and
still runs forward, but needs no backward pass, no gradients, no saved activations and no optimizer
state, because every block before it is frozen as well.
Paper: Section 3 (front layers' sparse structure and representations converge early, at every
sparsity), Section 4.2 / Algorithm 1 (the planner), Section 4.2.1 (Tfrz from freezing 2/3 of the
blocks, freezing interval = the DST interval Δτ, block-wise cosine LR), Appendix B / Table A1 (the
single-shot, single-shot & resume, periodic and delayed periodic schemes; single-shot is best).
Hyper-parameters (``freezing.*``): ``target`` (training-FLOPs reduction from freezing, e.g. 0.2),
``tfrz`` (int or ``auto``), ``scheme``, ``blocks`` (override ``model.blocks()``),
``max_blocks_fraction`` (2/3), ``freeze_head`` (false), ``resume_epochs``, ``block_lr`` (true);
Δτ is ``train.interval``.
Expected effect: the training FLOPs fall by ``target`` with a negligible accuracy change (Table A1:
ResNet-32, CIFAR-100, 20% reduction from freezing alone: 71.30% vs 71.28% non-frozen at 90%
sparsity); training memory drops once blocks freeze (Section 5.2 / Fig. 4: the minimum memory is
42.2-43.9% below the DST methods' minimum).

Pieces: :func:`resolve_blocks` -> :func:`plan_freezing` (pure) -> :class:`Freezer` (stateful, at
epoch boundaries) plus :func:`split_param_groups_by_block` and :class:`BlockLR`; the frozen prefix's
output served per sample from :class:`ActivationCache` (``freezing.cache``, :mod:`spfde.freezing.cache`).
"""

from spfde.freezing.blocks import Block, block_of_params, resolve_blocks
from spfde.freezing.cache import ActivationCache
from spfde.freezing.freezer import Freezer
from spfde.freezing.lr import BlockLR, block_lr, split_param_groups_by_block
from spfde.freezing.planner import SCHEMES, FreezePlan, FreezingWarning, plan_freezing, plan_reduction

__all__ = [
    "SCHEMES",
    "ActivationCache",
    "Block",
    "BlockLR",
    "FreezePlan",
    "Freezer",
    "FreezingWarning",
    "block_lr",
    "block_of_params",
    "plan_freezing",
    "plan_reduction",
    "resolve_blocks",
    "split_param_groups_by_block",
]
