"""Sparse kernels for masked layers, chosen per layer (``sparsity.kernels``; docs/kernels.md).

=====================  ================================================================================
``execution``          :class:`SparseExecution` (install, refresh, choose by measurement, state)
``calibration``        the per-machine store of ``auto``'s decisions (``sparsity.kernels_calibration``)
``linear``             sparse ``nn.Linear`` and its fused GELU (``linear_act``): native or CSR autograd
``mlp``                a transformer MLP ``fc2(GELU(fc1(x)))`` as one native call (``mlp_act``)
``attention``          packed q/k/v projection of ``nn.MultiheadAttention`` through the sparse Linear
``conv``               native direct sparse ``nn.Conv2d`` (``sparse_conv.cpp``)
``native``             build/load of the C++ library (``python -m spfde.sparsity.kernels.native``)
=====================  ================================================================================
"""

from spfde.sparsity.kernels.common import KernelWarning
from spfde.sparsity.kernels.conv import ConvPlan, SparseConv2dFunction, make_conv_plan, sparse_conv2d
from spfde.sparsity.kernels.execution import KERNEL_MODES, SparseExecution
from spfde.sparsity.kernels.linear import LinearPlan, SparseLinearFunction, linear_act, sparse_linear
from spfde.sparsity.kernels.mlp import SparseMlpFunction, mlp_act, sparse_mlp

__all__ = [
    "KERNEL_MODES",
    "ConvPlan",
    "KernelWarning",
    "LinearPlan",
    "SparseConv2dFunction",
    "SparseExecution",
    "SparseLinearFunction",
    "SparseMlpFunction",
    "linear_act",
    "make_conv_plan",
    "mlp_act",
    "sparse_conv2d",
    "sparse_linear",
    "sparse_mlp",
]
