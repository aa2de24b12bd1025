"""Sparse ``nn.Linear`` (and fused attention projections): a CSR autograd function in pure PyTorch.

* forward: ``y = W_csr @ x^T`` (CSR ``addmm``, the bias fused), transposed back;
* input gradient: ``gx = W^T_csr @ gy^T`` with the transposed CSR built once per mask;
* weight gradient at the nonzeros only: ``torch.sparse.sampled_addmm`` on the mask's pattern,
  scattered into a dense tensor that is zero at every pruned position.

fp32 on CPU; inputs of any rank (``(..., in_features)``). Other dtypes, devices and autocast run
the module's dense forward.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from spfde.sparsity.kernels.common import NonzeroIndex, index_counts, is_dense_storage

_quiet = [False]


def _csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if _quiet[0]:
        return torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)
    # torch warns once per process that CSR tensors are a beta feature; the ops used here are stable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        out = torch.sparse_csr_tensor(crow, col, vals, shape, check_invariants=False)
    _quiet[0] = True
    return out


def unsupported_linear(module: nn.Module) -> str | None:
    """Why ``module`` cannot use the sparse Linear path (None when it can)."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return "not a plain nn.Linear"
    return None


class LinearPlan:
    """CSR and transposed-CSR index structures of one masked ``(out, in)`` weight."""

    def __init__(self, mask: torch.Tensor, weight: torch.Tensor) -> None:
        self.index = NonzeroIndex(mask.cpu(), weight.stride())
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        rows, cols = self.index.coords
        self.crow = index_counts(rows, self.shape[0])
        self.col = cols.to(torch.int32)
        self.perm = torch.sort(cols, stable=True).indices  # CSR order -> order of W^T's CSR
        self.tcrow = index_counts(cols, self.shape[1])
        self.tcol = rows[self.perm].to(torch.int32)

    @property
    def nnz(self) -> int:
        return self.index.nnz

    def matrix(self, vals: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.col, vals, self.shape)

    def transposed(self, vals: torch.Tensor) -> torch.Tensor:
        return _csr(self.tcrow, self.tcol, vals[self.perm], self.shape[::-1])


class SparseLinearFunction(torch.autograd.Function):
    """``y = x @ (weight * mask)^T + bias`` with work proportional to the mask's nonzeros."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan,
                dense_weight_grad: bool) -> torch.Tensor:
        out_f, in_f = plan.shape
        x2 = x.reshape(-1, in_f)
        vals = plan.index.gather(weight.detach())
        a = plan.matrix(vals)
        if bias is not None:
            yt = torch.addmm(bias.detach().unsqueeze(1), a, x2.t())
        else:
            yt = torch.sparse.mm(a, x2.t())
        ctx.plan, ctx.dense_weight_grad, ctx.x_shape = plan, dense_weight_grad, x.shape
        ctx.save_for_backward(x2, vals, weight)
        return yt.t().contiguous().view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        plan: LinearPlan = ctx.plan
        x2, vals, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = gy.reshape(-1, plan.shape[0]).float()
        gx = gw = gb = None
        if need_x:
            # a row-major gy^T: MKL's CSR x dense is 2-3x faster on it for long batches (ViT tokens)
            gx = torch.sparse.mm(plan.transposed(vals), g2.t().contiguous()).t().contiguous().view(ctx.x_shape)
        if need_w and ctx.dense_weight_grad:  # RigL's update reads the dense weight gradient
            gw = g2.t() @ x2
        elif need_w:
            gvals = torch.sparse.sampled_addmm(plan.matrix(vals), g2.t(), x2, beta=0.0).values()
            gw = plan.index.scatter(gvals, weight)
        if need_b:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


def linear_input_ok(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """True when this call can run sparse (else the module's dense forward runs)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0 or x.dim() < 1:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    return x.shape[-1] == weight.shape[1] and is_dense_storage(weight)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: LinearPlan,
                  dense_weight_grad: bool = False) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` through the CSR path (call :func:`linear_input_ok` first)."""
    return SparseLinearFunction.apply(x, weight, bias, plan, dense_weight_grad)
