"""Sparse kernels (issue 13): equality with the masked dense layer, dynamic masks, auto's choice,
fallbacks, determinism, state replay and the failed-build path."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import controller_epochs
from spfde.config import from_dict, load_config
from spfde.controller import SpFDE
from spfde.errors import ConfigError
from spfde.sparsity import build_sparsity
from spfde.sparsity.engine import SparseEngine
from spfde.sparsity.kernels import KernelWarning, SparseExecution, attention, execution, native
from spfde.sparsity.kernels import common as kernel_common
from spfde.sparsity.kernels.attention import NATIVE_MAX_LEN, sparse_mha
from spfde.sparsity.kernels.conv import make_conv_plan, sparse_conv2d
from spfde.sparsity.kernels.linear import LinearPlan, SparseLinearFunction, sparse_linear
from spfde.sparsity.masks import PrunableLayer
from spfde.sparsity.schedule import Schedule

NATIVE = native.status()
needs_native = pytest.mark.skipif(not NATIVE["available"], reason=f"native kernel not built: {NATIVE['error']}")


def _mask(shape, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, g))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _like_masked_dense(sparse: torch.Tensor, dense: torch.Tensor, xs: torch.Tensor, xd: torch.Tensor,
                       lin: nn.Linear, mask: torch.Tensor) -> None:
    """A sparse Linear's output and its input, weight and bias gradients are the masked dense layer's
    (``dense`` computed from ``xd``, ``sparse`` from ``xs``); the weight gradient is exactly 0 where pruned."""
    _close(sparse, dense)
    params = [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    gd, gs = _grads(dense, [xd, *params]), _grads(sparse, [xs, *params])
    _close(gs[0], gd[0])
    _close(gs[1], gd[1] * mask)
    assert torch.all(gs[1][~mask] == 0)
    if lin.bias is not None:
        _close(gs[2], gd[2])


# ----------------------------------------------------------------------------- conv: masked-dense equality

CONVS = [  # (in, out, kernel, stride, padding, spatial)
    (5, 6, 3, 1, 1, 9),
    (5, 6, 3, 2, 1, 9),
    (6, 4, 1, 2, 0, 8),
    (4, 7, 3, 1, 0, 7),
    (3, 5, (3, 1), (2, 1), (1, 0), 10),
    (4, 3, 5, 3, 2, 11),
]


@needs_native
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 7, 8, 33])
@pytest.mark.parametrize("spec", CONVS, ids=lambda s: f"{s[0]}-{s[1]}k{s[2]}s{s[3]}p{s[4]}")
def test_sparse_conv_matches_masked_dense(spec, batch, channels_last):
    cin, cout, k, s, p, size = spec
    torch.manual_seed(batch)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=True)
    mask = _mask(conv.weight.shape, 0.3, seed=batch)
    x = torch.randn(batch, cin, size, size)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        mask = mask.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.mul_(mask)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense = F.conv2d(xd, conv.weight, conv.bias, s, p)
    sparse = sparse_conv2d(conv, xs, make_conv_plan(conv, mask))
    _close(sparse, dense)
    assert sparse.stride() == dense.stride()  # the memory format follows PyTorch's
    gd = _grads(dense, [xd, conv.weight, conv.bias])
    gs = _grads(sparse, [xs, conv.weight, conv.bias])
    _close(gs[0], gd[0])
    assert gs[0].stride() == xs.stride()
    _close(gs[1], gd[1] * mask)
    assert torch.all(gs[1][~mask] == 0)  # exact zeros at pruned positions
    _close(gs[2], gd[2])


@needs_native
def test_sparse_conv_batch_128_and_all_zero_rows():
    conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
    mask = _mask(conv.weight.shape, 0.1)
    mask[2] = False  # an output channel with no nonzero at all
    mask[:, 3] = False  # an input channel no weight reads
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(128, 8, 6, 6, requires_grad=True)
    xs = x.detach().clone().requires_grad_()
    dense, sparse = conv(x), sparse_conv2d(conv, xs, make_conv_plan(conv, mask))
    _close(sparse, dense)
    assert torch.all(sparse[:, 2] == 0)
    (gxd, gwd), (gxs, gws) = _grads(dense, [x, conv.weight]), _grads(sparse, [xs, conv.weight])
    _close(gxs, gxd)
    assert torch.all(gxs[:, 3] == 0)
    _close(gws, gwd * mask)
    # a gradient with stride-0 (expanded) layout: y.sum()
    (g_sum,) = torch.autograd.grad(sparse_conv2d(conv, xs, make_conv_plan(conv, mask)).sum(), [xs])
    (g_ref,) = torch.autograd.grad(conv(x).sum(), [x])
    _close(g_sum, g_ref)


@needs_native
def test_dense_weight_gradient_variant_for_rigl():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).to(memory_format=torch.channels_last)
    mask = _mask(conv.weight.shape, 0.3)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(9, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    gd = _grads(conv(xd), [xd, conv.weight])
    gs = _grads(sparse_conv2d(conv, xs, make_conv_plan(conv, mask), dense_weight_grad=True), [xs, conv.weight])
    _close(gs[0], gd[0])
    _close(gs[1], gd[1])  # dense: nonzero at pruned positions too
    assert torch.count_nonzero(gs[1][~mask]) > 0


@needs_native
def test_sparse_conv_bit_identical_for_any_thread_count():
    conv = nn.Conv2d(16, 12, 3, stride=2, padding=1)
    mask = _mask(conv.weight.shape, 0.2)
    x = torch.randn(40, 16, 12, 12)
    plan = make_conv_plan(conv, mask)
    _assert_same_for_any_thread_count(lambda xs: sparse_conv2d(conv, xs, plan), x, conv.weight)


def _assert_same_for_any_thread_count(fn, x: torch.Tensor, weight: torch.Tensor, *more: torch.Tensor) -> None:
    """``fn(x)``'s output and its input, weight (and ``more``: bias) gradients are bit-identical on 1, 2
    and 3 threads."""
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xs = x.clone().requires_grad_()
            y = fn(xs)
            outs.append([y, *_grads(y, [xs, weight, *more])])
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


# ----------------------------------------------------------------------------- linear and attention


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (33, 3, 24), (128, 24)], ids=str)
def test_sparse_linear_matches_masked_dense(shape, bias):
    torch.manual_seed(len(shape))
    lin = nn.Linear(24, 20, bias=bias)
    mask = _mask(lin.weight.shape, 0.2)
    with torch.no_grad():
        lin.weight.mul_(mask)
    x = torch.randn(*shape)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense = lin(xd)
    sparse = sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight))
    _like_masked_dense(sparse, dense, xs, xd, lin, mask)


class _LibSpy:
    """Wraps the native library and records which entry points ran."""

    def __init__(self, lib) -> None:
        self.lib, self.calls = lib, []

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)
        if name.endswith("_floats"):  # a size query, not a kernel
            return fn

        def call(*args):
            self.calls.append(name)
            return fn(*args)
        return call


@pytest.fixture
def native_spy(monkeypatch) -> _LibSpy:
    spy = _LibSpy(native.load())
    monkeypatch.setattr(native, "load", lambda build=True, quiet=False: spy)
    return spy


def _linear_case(fin: int, fout: int, bias: bool, density: float = 0.2, seed: int = 0):
    torch.manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias)
    mask = _mask(lin.weight.shape, density, seed=seed)
    mask[3] = False  # an output feature without nonzeros
    mask[:, 5] = False  # an input feature no weight reads
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


def _check_linear(lin: nn.Linear, mask: torch.Tensor, x: torch.Tensor) -> None:
    """Sparse vs masked dense: output, input gradient, weight gradient (exact zeros where pruned), bias."""
    xd, xs = x.detach().requires_grad_(), x.detach().requires_grad_()  # views: x's strides, not a clone's
    dense = lin(xd)
    sparse = sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight))
    assert sparse.shape == dense.shape
    _close(sparse, dense)
    params = [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    gd, gs = _grads(dense, [xd, *params]), _grads(sparse, [xs, *params])
    assert gs[0].shape == x.shape
    _close(gs[0], gd[0])
    _close(gs[1], gd[1] * mask)
    assert torch.all(gs[1][~mask] == 0)
    assert torch.all(gs[0][..., 5] == 0)
    if lin.bias is not None:
        _close(gs[2], gd[2])


@needs_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (16,), (33,), (128,), (300,), (33, 3), (4, 65)], ids=str)
def test_native_sparse_linear_matches_masked_dense(shape, bias, native_spy):
    """Batch sizes around the 16-row vectors and 128-row tiles (300 rows: three tiles, the weight
    gradient carried across them), 3-D inputs, feature counts that are not multiples of 16."""
    lin, mask = _linear_case(40, 37, bias, seed=len(shape) + shape[0])
    _check_linear(lin, mask, torch.randn(*shape, 40))
    assert native_spy.calls == ["spfde_linear_forward", "spfde_linear_backward"]


@needs_native
def test_native_sparse_linear_strided_inputs_and_gradients(native_spy):
    lin, mask = _linear_case(24, 20, True, density=0.3)
    _check_linear(lin, mask, torch.randn(9, 48)[:, ::2])  # column stride 2: a copy
    _check_linear(lin, mask, torch.randn(19, 30)[:, 3:27])  # row stride 30: read in place
    _check_linear(lin, mask, torch.randn(5, 7, 24).transpose(0, 1))  # 3-D, non-contiguous
    _check_linear(lin, mask, torch.randn(1, 24).expand(6, 24))  # row stride 0
    x = torch.randn(3, 5, 24, requires_grad=True)
    xs = x.detach().clone().requires_grad_()
    # y.sum(): an expanded (all strides 0) output gradient
    (g_ref,) = torch.autograd.grad(lin(x).sum(), [x])
    (g_sum,) = torch.autograd.grad(sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight)).sum(), [xs])
    _close(g_sum, g_ref)
    assert native_spy.calls.count("spfde_linear_forward") == 5
    # a weight stored transposed (column-major): the gradient keeps its layout, zero where pruned
    with torch.no_grad():
        lin.weight = nn.Parameter(lin.weight.t().contiguous().t())
    assert lin.weight.stride() == (1, 20)
    _check_linear(lin, mask, torch.randn(17, 24))
    xs = torch.randn(17, 24)
    (gw,) = _grads(sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight)), [lin.weight])
    assert gw.stride() == lin.weight.stride()


@needs_native
def test_native_sparse_linear_dense_weight_gradient_for_rigl(native_spy):
    lin, mask = _linear_case(30, 26, True, density=0.3)
    x = torch.randn(21, 30)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    gd = _grads(lin(xd), [xd, lin.weight])
    gs = _grads(sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight), dense_weight_grad=True),
                [xs, lin.weight])
    _close(gs[0], gd[0])
    _close(gs[1], gd[1])  # dense: nonzero at pruned positions too
    assert torch.count_nonzero(gs[1][~mask]) > 0
    assert "spfde_linear_backward" in native_spy.calls


@needs_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1,), (7,), (33,), (300,), (4, 65)], ids=str)
def test_native_fused_gelu_matches_gelu_of_the_masked_dense_layer(shape, bias, native_spy):
    """``sparse_linear(..., gelu=True)``: one forward and one backward kernel call (no GELU op of its
    own in the graph) that match ``F.gelu`` of the masked dense layer in the output and all three
    gradients, across row tiles, short vectors and 3-D inputs; a no-grad call (a frozen layer)
    gives the same output bit for bit."""
    lin, mask = _linear_case(40, 37, bias, seed=shape[0])
    with torch.no_grad():
        lin.weight.mul_(4)  # pre-activations over GELU's curved range, both tails included
    plan = LinearPlan(mask, lin.weight)
    x = torch.randn(*shape, 40)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense = F.gelu(lin(xd))
    fused = sparse_linear(xs, lin.weight, lin.bias, plan, gelu=True)
    assert native_spy.calls == ["spfde_linear_forward"]
    assert type(fused.grad_fn).__name__ == "SparseLinearFunctionBackward"  # the GELU is inside
    _like_masked_dense(fused, dense, xs, xd, lin, mask)
    assert native_spy.calls == ["spfde_linear_forward", "spfde_linear_backward"]
    with torch.no_grad():
        assert torch.equal(sparse_linear(x, lin.weight, lin.bias, plan, gelu=True), fused.detach())


@needs_native
def test_fused_gelu_is_gelu_after_the_kernel_where_it_cannot_fuse(monkeypatch):
    """RigL's dense weight gradient is computed from the output gradient outside the kernel, and a
    call whose only gradient is the bias's runs no kernel: both take ``F.gelu`` after the sparse
    Linear (same gradients as the masked dense layer), as does the pure-PyTorch path."""
    lin, mask = _linear_case(30, 26, True, density=0.3)
    plan = LinearPlan(mask, lin.weight)
    x = torch.randn(21, 30)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = sparse_linear(xs, lin.weight, lin.bias, plan, dense_weight_grad=True, gelu=True)
    assert type(out.grad_fn).__name__ == "GeluBackward0"
    gd, gs = _grads(F.gelu(lin(xd)), [xd, lin.weight]), _grads(out, [xs, lin.weight])
    _close(gs[0], gd[0])
    _close(gs[1], gd[1])  # dense: the pruned positions too
    lin.weight.requires_grad_(False)
    out = sparse_linear(x, lin.weight, lin.bias, plan, gelu=True)
    assert type(out.grad_fn).__name__ == "GeluBackward0"
    _close(_grads(out, [lin.bias])[0], _grads(F.gelu(lin(x)), [lin.bias])[0])
    lin.weight.requires_grad_(True)
    monkeypatch.setattr(native, "load", lambda build=True, quiet=False: None)
    xs = x.clone().requires_grad_()
    out = sparse_linear(xs, lin.weight, lin.bias, plan, gelu=True)
    assert type(out.grad_fn).__name__ == "GeluBackward0"
    _close(out, F.gelu(lin(x)))


def _graph_ops(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@needs_native
def test_vit_mlp_fuses_its_gelu_only_when_fc1_runs_sparse_and_is_not_hooked():
    """The ViT's MLP (``linear_act``): without sparse execution, and under ``dense`` kernels, exactly
    ``fc2(act(fc1(x)))`` (bit-identical, the GELU module called); under ``sparse`` the GELU is in
    fc1's kernel and the model matches its dense twin in output and gradients; a forward hook on
    fc1 (which would see the GELU's output) or on the activation, a backward hook on either, a
    keyword-seeing pre-hook on fc1 and FX tracing turn the fusion off."""
    from spfde.models.vit import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny(num_classes=10, in_channels=1)
    twin = copy.deepcopy(model)
    mlp = model.layers[0].mlp
    x = torch.randn(5, 1, 28, 28)
    h = torch.randn(5, 17, 64)
    assert torch.equal(mlp(h), mlp.fc2(mlp.act(mlp.fc1(h))))
    layers = {f"layers.{i}.mlp.fc{j}": f"layers.{i}.mlp.fc{j}.weight" for i in range(4) for j in (1, 2)}
    engine = _engine(model, layers, density=0.2)
    with torch.no_grad():
        for name, m in engine.masks.items():
            dict(twin.named_parameters())[name].mul_(m)
    exe = SparseExecution(model, engine, mode="sparse")
    out, ref = model(x), twin(x)
    assert "GeluBackward0" in _graph_ops(ref) and "GeluBackward0" not in _graph_ops(out)
    _close(out, ref)
    g = torch.randn_like(out)
    params = [n for n, p in model.named_parameters() if "mlp.fc1" in n]
    got = torch.autograd.grad(out, [dict(model.named_parameters())[n] for n in params], g)
    want = torch.autograd.grad(ref, [dict(twin.named_parameters())[n] for n in params], g)
    for n, a, b in zip(params, got, want, strict=True):
        _close(a, b * engine.masks[n] if n in engine.masks else b)
    seen = []
    handle = mlp.fc1.register_forward_hook(lambda _m, _i, o: seen.append(o))
    assert "GeluBackward0" in _graph_ops(mlp(h.requires_grad_()))
    handle.remove()
    handle = mlp.act.register_forward_hook(lambda _m, _i, o: seen.append(o))
    assert "GeluBackward0" in _graph_ops(mlp(h))
    handle.remove()
    assert len(seen) == 2 and seen[0].shape == (5, 17, 128)
    # a backward hook on either module would see the GELU's gradient as fc1's (or never fire)
    for m in (mlp.fc1, mlp.act):
        handle = m.register_full_backward_hook(lambda _m, gi, go: seen.append(go[0]))
        assert "GeluBackward0" in _graph_ops(mlp(h))
        handle.remove()
    # a forward pre-hook that sees keyword arguments would see the fused call's own keyword
    handle = mlp.fc1.register_forward_pre_hook(lambda _m, a, kw: None, with_kwargs=True)
    assert "GeluBackward0" in _graph_ops(mlp(h))
    handle.remove()
    assert "GeluBackward0" not in _graph_ops(mlp(h))
    # FX records the module calls as written: no epilogue keyword in the graph
    graph = torch.fx.symbolic_trace(mlp).graph
    assert all("spfde_epilogue" not in n.kwargs for n in graph.nodes)
    assert any(n.op == "call_module" and n.target == "act" for n in graph.nodes)
    exe.remove()
    assert torch.equal(mlp(h), mlp.fc2(mlp.act(mlp.fc1(h))))


def _mlp_case(bias: bool, seed: int = 0, dim: int = 40, hidden: int = 72):
    """fc1 (dim -> hidden) and fc2 (hidden -> dim), masked (with an empty row and an unread column
    each), and their plans."""
    fc1, m1 = _linear_case(dim, hidden, bias, density=0.25, seed=seed)
    fc2, m2 = _linear_case(hidden, dim, bias, density=0.25, seed=seed + 1)
    with torch.no_grad():
        fc1.weight.mul_(4)  # pre-activations over GELU's curved range
    return fc1, m1, fc2, m2, LinearPlan(m1, fc1.weight), LinearPlan(m2, fc2.weight)


def _unfused_mlp(x, fc1, fc2, p1, p2):
    return sparse_linear(sparse_linear(x, fc1.weight, fc1.bias, p1, gelu=True), fc2.weight, fc2.bias, p2)


@needs_native
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1,), (17,), (129,), (300,), (5, 61)], ids=str)
def test_native_sparse_mlp_is_the_two_sparse_linears_bit_for_bit(shape, bias, native_spy):
    """``sparse_mlp``: one forward and one backward kernel call whose output and five gradients are
    those of fc1 (GELU fused) and fc2 as two sparse Linear calls, bit for bit on 1, 2 and 3 threads,
    and match the masked dense MLP; a no-grad call (a frozen MLP) gives the same output."""
    from spfde.sparsity.kernels.mlp import sparse_mlp

    fc1, m1, fc2, m2, p1, p2 = _mlp_case(bias, seed=shape[0])
    x = torch.randn(*shape, 40)
    params = [p for m in (fc1, fc2) for p in m.parameters()]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xf, xu = x.clone().requires_grad_(), x.clone().requires_grad_()
            fused, unfused = sparse_mlp(xf, fc1, fc2, p1, p2), _unfused_mlp(xu, fc1, fc2, p1, p2)
            assert torch.equal(fused, unfused)
            for a, b in zip(_grads(fused, [xf, *params]), _grads(unfused, [xu, *params]), strict=True):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
    assert native_spy.calls.count("spfde_mlp_forward") == 3 and native_spy.calls.count("spfde_mlp_backward") == 3
    xd, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense = F.linear(F.gelu(F.linear(xd, fc1.weight * m1, fc1.bias)), fc2.weight * m2, fc2.bias)
    fused = sparse_mlp(xf, fc1, fc2, p1, p2)
    _close(fused, dense)
    for got, want in zip(_grads(fused, [xf, *params]), _grads(dense, [xd, *params]), strict=True):
        _close(got, want * m1 if got.shape == m1.shape else want * m2 if got.shape == m2.shape else want)
    with torch.no_grad():
        assert torch.equal(sparse_mlp(x, fc1, fc2, p1, p2), fused.detach())


@needs_native
def test_native_sparse_mlp_gradients_for_every_mix_of_what_needs_one():
    """A frozen fc1 under a trainable fc2, an input that needs no gradient, biases alone, and weights
    stored transposed (the kernel writes their gradients through the storage offsets): the same
    gradients as the two sparse Linear calls, bit for bit, and none for what needs none."""
    from spfde.sparsity.kernels.mlp import sparse_mlp

    fc1, _, fc2, _, _, _ = _mlp_case(True, seed=3)
    for m in (fc1, fc2):  # column-major storage: weight.stride() == (1, out)
        m.weight = nn.Parameter(m.weight.detach().t().contiguous().t())
    p1, p2 = LinearPlan(fc1.weight != 0, fc1.weight), LinearPlan(fc2.weight != 0, fc2.weight)
    x = torch.randn(150, 40)
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    for x_grad, needs in [(True, (0, 0, 1, 1)), (False, (1, 1, 1, 1)), (False, (0, 1, 0, 1)), (True, (0, 0, 0, 0)),
                          (False, (0, 0, 1, 0))]:
        for p, need in zip(params, needs, strict=True):
            p.requires_grad_(bool(need))
        inputs = [p for p, need in zip(params, needs, strict=True) if need]
        xf, xu = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
        fused, unfused = sparse_mlp(xf, fc1, fc2, p1, p2), _unfused_mlp(xu, fc1, fc2, p1, p2)
        assert torch.equal(fused, unfused)
        got = _grads(fused, ([xf] if x_grad else []) + inputs)
        want = _grads(unfused, ([xu] if x_grad else []) + inputs)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@needs_native
def _no_prenorm_fusion(monkeypatch) -> None:
    """The ViT's pre-norms outside the fused calls (bit-identity tests of the fusions themselves)."""
    from spfde.sparsity.kernels import linear as linear_mod
    from spfde.sparsity.kernels import mlp as mlp_mod

    for mod in (linear_mod, mlp_mod, execution):  # every module that decides it
        monkeypatch.setattr(mod, "norm_fusable", lambda *a: False)


def test_vit_mlp_is_one_fused_call_only_when_both_linears_run_sparse(native_spy, monkeypatch):
    """The ViT's MLP (``mlp_act``) under ``sparse`` kernels: one ``spfde_mlp_*`` call pair per block,
    the model's output and gradients those of the unfused model bit for bit (which matches its
    masked dense twin: the GELU test above); a hook on fc2, a RigL dense-gradient step, or fc2
    not masked run the Linears one by one; under ``auto`` the pair is timed as one (the fused call
    against the dense pair) and fuses from its first call, fc2 taking fc1's decision, and a pair
    decided dense runs dense."""
    _no_prenorm_fusion(monkeypatch)
    from spfde.models.vit import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny(num_classes=10, in_channels=1)
    layers = {f"layers.{i}.mlp.fc{j}": f"layers.{i}.mlp.fc{j}.weight" for i in range(4) for j in (1, 2)}
    engine = _engine(model, layers, density=0.2)
    exe = SparseExecution(model, engine, mode="sparse")
    x = torch.randn(6, 1, 28, 28)
    names = [n for n, _ in model.named_parameters()]

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        native_spy.calls.clear()
        out = model(x)
        return out, _grads(out, list(model.parameters()))

    out, grads = run()
    assert native_spy.calls.count("spfde_mlp_forward") == 4 and native_spy.calls.count("spfde_mlp_backward") == 4
    assert "spfde_linear_forward" not in native_spy.calls
    assert exe.choices() == dict.fromkeys(layers, "sparse")
    monkeypatch.setattr(kernel_common, "FUSED_MAX_BYTES", -1)  # every call too large to fuse: one by one
    ref, ref_grads = run()
    assert "spfde_mlp_forward" not in native_spy.calls and native_spy.calls.count("spfde_linear_forward") == 8
    assert torch.equal(out, ref)
    for n, a, b in zip(names, grads, ref_grads, strict=True):
        assert torch.equal(a, b), n
    monkeypatch.undo()
    monkeypatch.setattr(native, "load", lambda build=True, quiet=False: native_spy)
    handle = model.layers[1].mlp.fc2.register_forward_hook(lambda *_: None)
    run()
    assert native_spy.calls.count("spfde_mlp_forward") == 3
    handle.remove()
    monkeypatch.setattr(SparseExecution, "dense_weight_grad", property(lambda self: True))
    run()
    assert "spfde_mlp_forward" not in native_spy.calls
    monkeypatch.undo()
    monkeypatch.setattr(native, "load", lambda build=True, quiet=False: native_spy)
    exe.remove()

    # auto: the pair is timed as one (fused against dense) and fc2 takes fc1's decision
    torch.manual_seed(0)
    model = vit_tiny(num_classes=10, in_channels=1)
    exe = SparseExecution(model, _engine(model, layers, density=0.2), "auto", "off")
    monkeypatch.setattr(execution, "TINY_MACS", 0)
    raced = _spy_race(native_spy, 2.0, 1.0)  # sparse wins
    monkeypatch.setattr(execution, "race", raced)
    run()
    assert native_spy.calls.count("spfde_mlp_forward") == 4  # fused from the first call
    assert "spfde_linear_forward" not in native_spy.calls
    # one timing for the four blocks (one key in the run's store): the fused call against the dense pair
    assert raced.ran == [([], ["spfde_mlp_forward", "spfde_mlp_backward"])]
    assert exe.choices() == dict.fromkeys(layers, "sparse") and len(exe.speedups()) == 8
    for name in ("layers.2.mlp.fc1", "layers.2.mlp.fc2"):  # as if the pair's timing had said dense
        slow = exe.layers[name]
        slow.decisions = dict.fromkeys(slow.decisions, "dense")
    run()
    assert native_spy.calls.count("spfde_mlp_forward") == 3  # the other blocks fuse
    assert exe.choices()["layers.2.mlp.fc2"] == "dense" and exe.layers["layers.2.mlp.fc2"].used == "dense"


@needs_native
@pytest.mark.parametrize("rows", [300, 1100])
def test_native_sparse_linear_bit_identical_for_any_thread_count(native_spy, rows):
    # 300 rows: three row tiles (threads share tile x feature units beyond one thread); 1100: nine
    # (each thread takes whole tiles on 1, 2 and 3 threads); several weight-gradient chunks
    lin, mask = _linear_case(70, 90, True, density=0.3)
    plan = LinearPlan(mask, lin.weight)
    x = torch.randn(rows, 70)
    _assert_same_for_any_thread_count(lambda xs: sparse_linear(xs, lin.weight, lin.bias, plan), x, lin.weight,
                                      *([lin.bias] if lin.bias is not None else []))
    assert native_spy.calls.count("spfde_linear_backward") == 3


@needs_native
@pytest.mark.parametrize("rows", [7, 300, 1100])
def test_native_sparse_linear_weight_gradient_from_the_forwards_packed_input(native_spy, rows):
    """The forward keeps x's packed tiles and the weight gradient reads them (the backward does not
    pack x again): bit-identical to a backward that packs x itself, on 1 and 2 threads (1100 rows:
    each thread packs whole tiles in the forward); the gradient is of the forward's x even when x
    changes in place before the backward; for a frozen weight (input gradient only) nothing of x is
    kept."""
    lin, mask = _linear_case(70, 90, True, density=0.3)
    plan = LinearPlan(mask, lin.weight)
    x = torch.randn(rows, 70)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = []
            for keep in (True, False):
                xs = x.clone().requires_grad_()
                y = SparseLinearFunction.apply(xs, lin.weight, lin.bias, plan, False, keep)
                kept = y.grad_fn.saved_tensors[0]
                assert kept.dim() == (1 if keep else 2) and kept.numel() >= x.numel()
                got.append([y, *_grads(y, [xs, lin.weight, lin.bias])])
            assert all(torch.equal(a, b) for a, b in zip(*got, strict=True))
    finally:
        torch.set_num_threads(threads)
    (g_ref,) = _grads(sparse_linear(x.clone(), lin.weight, lin.bias, plan), [lin.weight])
    xs = x.clone()
    y = sparse_linear(xs, lin.weight, lin.bias, plan)
    xs.add_(1.0)  # x is not saved: autograd does not object, and the gradient is the forward's
    (g_after,) = _grads(y, [lin.weight])
    assert torch.equal(g_after, g_ref)
    lin.weight.requires_grad_(False)
    xs = x.clone().requires_grad_()
    y = sparse_linear(xs, lin.weight, lin.bias, plan)
    assert y.grad_fn.saved_tensors[0] is None
    _close(_grads(y, [xs])[0], _grads(lin(xs), [xs])[0])


@needs_native
def test_native_sparse_linear_large_input_packs_in_tile_groups(native_spy):
    """Past 64 MiB of packed rows the backward packs its tiles in groups (a barrier per group): the
    same values as masked dense and as one thread (which goes tile by tile). With the forward's
    packed x only gy is packed (one group here); a backward that packs x too needs two."""
    lin, mask = _linear_case(1024, 1024, True, density=0.02)
    x = torch.randn(65 * 128 + 7, 1024)  # 66 tiles > the 64 that fit 64 MiB at 2048 packed features
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense, sparse = lin(xd), sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight))
    _close(sparse, dense)
    gd, gs = _grads(dense, [xd, lin.weight, lin.bias]), _grads(sparse, [xs, lin.weight, lin.bias])
    _close(gs[0], gd[0])
    # a sum over 8,327 rows: fp32 rounding of the two summation orders differs by ~1e-6 relative
    torch.testing.assert_close(gs[1], gd[1] * mask, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gs[2], gd[2], rtol=1e-4, atol=1e-3)  # the bias, summed across tile groups
    assert torch.all(gs[1][~mask] == 0)
    _assert_same_for_any_thread_count(lambda xs: sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight)),
                                      x, lin.weight, lin.bias)
    # a backward that packs x itself (not the forward's packed x) needs both packed inputs: tile groups
    plan = LinearPlan(mask, lin.weight)
    repacking = lambda xs: SparseLinearFunction.apply(xs, lin.weight, lin.bias, plan, False, False)  # noqa: E731
    _assert_same_for_any_thread_count(repacking, x, lin.weight, lin.bias)
    assert "spfde_linear_backward" in native_spy.calls


def test_pure_torch_linear_fallback_matches_masked_dense(monkeypatch):
    """Without the native library the CSR path in pure PyTorch runs (and stays correct)."""
    monkeypatch.setattr(native, "load", lambda build=True, quiet=False: None)
    for shape in [(1,), (33, 3), (130,)]:
        lin, mask = _linear_case(40, 37, True)
        _check_linear(lin, mask, torch.randn(*shape, 40))


@pytest.mark.parametrize("batch_first", [True, False])
def test_sparse_attention_projection_matches_dense(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    mask = _mask(mha.in_proj_weight.shape, 0.3)
    with torch.no_grad():
        mha.in_proj_weight.mul_(mask)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense, _ = mha(xd, xd, xd, need_weights=False)
    sparse, _ = sparse_mha(mha, xs, LinearPlan(mask, mha.in_proj_weight))
    _close(sparse, dense)
    params = [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight]
    gd, gs = _grads(dense, [xd, *params]), _grads(sparse, [xs, *params])
    _close(gs[0], gd[0])
    _close(gs[1], gd[1] * mask)
    _close(gs[2], gd[2])
    _close(gs[3], gd[3])


@needs_native
def test_sparse_attention_projection_runs_the_native_linear(native_spy):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    mask = _mask(mha.in_proj_weight.shape, 0.2)
    with torch.no_grad():
        mha.in_proj_weight.mul_(mask)
    x = torch.randn(3, 20, 32)
    xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense, _ = mha(xd, xd, xd, need_weights=False)
    sparse, _ = sparse_mha(mha, xs, LinearPlan(mask, mha.in_proj_weight))
    _close(sparse, dense)
    gd, gs = _grads(dense, [xd, mha.in_proj_weight]), _grads(sparse, [xs, mha.in_proj_weight])
    _close(gs[0], gd[0])
    _close(gs[1], gd[1] * mask)
    # 20 tokens: the core is the native short-attention kernel too
    assert native_spy.calls == ["spfde_linear_forward", "spfde_attention_forward", "spfde_attention_backward",
                                "spfde_linear_backward"]


@pytest.mark.parametrize("length", [17, attention.SHORT_MAX_LEN + 1])
@pytest.mark.parametrize("batch_first", [True, False])
def test_unmasked_attention_path_matches_the_modules_forward(batch_first, length, monkeypatch):
    """Under auto/sparse every plain self-attention MHA, masked or not, runs spfde's attention path
    (explicit core for short sequences, flash beyond SHORT_MAX_LEN); dense installs nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.MultiheadAttention(16, 4, batch_first=batch_first))
    ref = copy.deepcopy(model)
    exe = SparseExecution(model, _engine(model, {"0": "0.weight"}), "sparse")
    assert set(exe.attention) == {"1"} and "forward" in vars(model[1])
    cores = []
    real = attention.short_ok
    monkeypatch.setattr(attention, "short_ok", lambda m, qkv: cores.append(real(m, qkv)) or cores[-1])
    _engine(ref, {"0": "0.weight"})
    x = torch.randn(3, length, 16) if batch_first else torch.randn(length, 3, 16)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    hs, hd = model[0](xs), ref[0](xd)
    out, none = model[1](hs, hs, hs, need_weights=False)
    expect, _ = ref[1](hd, hd, hd, need_weights=False)
    assert none is None and cores == [length <= attention.SHORT_MAX_LEN]
    _close(out, expect)
    params = [model[1].in_proj_weight, model[1].out_proj.weight]
    gs = _grads(out, [xs, *params])
    gd = _grads(expect, [xd, ref[1].in_proj_weight, ref[1].out_proj.weight])
    for a, b in zip(gs, gd, strict=True):
        _close(a, b)
    # a call with weights or masks is the module's own forward
    w = model[1](hs, hs, hs)[1]
    assert w is not None and len(cores) == 1
    exe.remove()
    assert "forward" not in vars(model[1]) and not exe.attention
    dense = SparseExecution(model, _engine(model, {"0": "0.weight"}), "dense")
    assert not dense.attention and "forward" not in vars(model[1])


def _matmul_core(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The attention core as PyTorch ops (the reference for the native kernel)."""
    b, length, three_e = qkv.shape
    e = three_e // 3
    q, k, v = qkv.view(b, length, 3, heads, e // heads).permute(2, 0, 3, 1, 4).unbind(0)
    o = torch.softmax((q * (e // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
    return o.transpose(1, 2).reshape(b, length, e)


@needs_native
@pytest.mark.parametrize(("batch", "length", "dim", "heads"), [
    (1, 1, 8, 1), (3, 5, 24, 3), (17, 17, 64, 4), (40, 24, 128, 2), (16, 9, 48, 1)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "token-major"])
def test_native_short_attention_matches_the_matmul_core(batch, length, dim, heads, layout, native_spy):
    """The native core (16 samples per vector: a short last block, head widths below, at and above
    16 and not a multiple of it, any sample/token strides) against the float64 matmul core:
    output and the packed q/k/v gradient; the same values under no_grad; bit-identical on any
    number of threads."""
    torch.manual_seed(batch + length)
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    raw = torch.randn(batch, length, 3 * dim) * 2  # scores of several units: a peaked softmax too
    if layout == "token-major":  # as a batch_first=False module's projection reaches the core
        raw = raw.transpose(0, 1).contiguous().transpose(0, 1)
    qkv = raw.clone().requires_grad_()
    out = attention.attention_core(mha, qkv)
    assert native_spy.calls == ["spfde_attention_forward"]
    ref64 = raw.double().requires_grad_()
    expect = _matmul_core(ref64, heads)
    _close(out.double(), expect)
    g, g64 = _grads(out, [qkv])[0], _grads(expect, [ref64])[0]
    assert native_spy.calls[-1] == "spfde_attention_backward"
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4)  # gradients of size ~10
    with torch.no_grad():
        assert torch.equal(attention.attention_core(mha, raw), out)
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x = raw.clone().requires_grad_()
            y = attention.attention_core(mha, x)
            runs.append((y, _grads(y, [x])[0]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))


def test_attention_core_without_native_library_is_the_matmul_core(monkeypatch):
    """Without the library (or past NATIVE_MAX_LEN tokens) the core is PyTorch's matmuls and softmax."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    qkv = torch.randn(5, attention.NATIVE_MAX_LEN + 1, 96)
    assert torch.equal(attention.attention_core(mha, qkv), _matmul_core(qkv, 4))
    monkeypatch.setattr(native, "load", lambda build=True, quiet=False: None)
    qkv = torch.randn(5, 17, 96)
    assert torch.equal(attention.attention_core(mha, qkv), _matmul_core(qkv, 4))


def test_masked_attention_dense_choice_runs_the_same_core(monkeypatch):
    """auto's dense choice for a masked projection differs from sparse only in the projection."""
    monkeypatch.setattr(execution, "race", _fake_race(1.0, 2.0, []))  # sparse slower: dense chosen
    monkeypatch.setattr(execution, "TINY_MACS", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 4, batch_first=True))
    exe = SparseExecution(model, _engine(model, {"0.in_proj_weight": "0.in_proj_weight"}), "auto", "off")
    seen = []
    real = attention.attention_core
    monkeypatch.setattr(attention, "attention_core", lambda m, qkv: seen.append(qkv.shape) or real(m, qkv))
    x = torch.randn(2, 9, 16, requires_grad=True)
    ref = type(model[0]).forward(model[0], x, x, x, need_weights=False)[0]
    out = model[0](x, x, x, need_weights=False)[0]
    assert exe.choices() == {"0.in_proj_weight": "dense"} and seen == [(2, 9, 48)]
    _close(out, ref)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, batch_first: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


ATTN_LAYERS = {"attn.in_proj_weight": "attn.in_proj_weight", "attn.out_proj": "attn.out_proj.weight"}


def _attention_runs(model: nn.Module, x: torch.Tensor, fused: bool, monkeypatch) -> list[torch.Tensor]:
    """The output and the gradients of x and every parameter, the block fused or as three steps."""
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(attention, "fused_plan", lambda *a: None)
        xs = x.clone().requires_grad_()
        out = model(xs)
        return [out, *_grads(out, [xs, *model.parameters()])]


@needs_native
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("samples", [1, 5, 37, 128])
def test_fused_self_attention_is_the_three_steps(samples, batch_first, native_spy, monkeypatch):
    """A self-attention block with both projections sparse runs as one forward and one backward
    call: output and input gradient bit for bit those of the projection, core and out_proj one by
    one (the same sums), the weight and bias gradients within float rounding of them (summed over
    the rows in another order) and of the masked dense module; bit-identical on 1, 2 and 3
    threads; the output is a contiguous tensor of the module's shape (PyTorch's own is a transposed
    view), so that a consumer flattening its rows (the fused MLP after it) reads it in place."""
    torch.manual_seed(samples)
    model = _SelfAttention(batch_first=batch_first)
    exe = SparseExecution(model, _engine(model, ATTN_LAYERS, density=0.2), "sparse")
    x = torch.randn(samples, 17, 64) if batch_first else torch.randn(17, samples, 64)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            native_spy.calls.clear()
            runs.append(_attention_runs(model, x, True, monkeypatch))
            assert native_spy.calls == ["spfde_mha_forward", "spfde_mha_backward"]
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
    fused, steps = runs[0], _attention_runs(model, x, False, monkeypatch)
    assert "spfde_mha_forward" not in native_spy.calls[-4:]
    assert torch.equal(fused[0], steps[0]) and fused[0].shape == steps[0].shape and fused[0].is_contiguous()
    assert torch.equal(fused[1], steps[1])
    for a, b in zip(fused[2:], steps[2:], strict=True):
        _close(a, b)
    exe.remove()  # the module's own forward on the masked weights (the engine masked them)
    dense = _attention_runs(model, x, False, monkeypatch)
    masks = [p != 0 if p.dim() == 2 else torch.ones_like(p, dtype=torch.bool) for p in model.parameters()]
    _close(fused[0], dense[0])
    _close(fused[1], dense[1])
    for a, b, m in zip(fused[2:], dense[2:], masks, strict=True):
        _close(a, b * m)


@needs_native
def test_fused_self_attention_only_where_it_is_the_same_function(native_spy, monkeypatch):
    """The block stays three steps when out_proj is not masked, has a hook, or is decided dense
    (auto: decided by its own first call, which runs the steps), for dropout in training, more
    tokens than the native core takes, or a RigL dense-gradient step; and without gradients (a
    frozen block) it fuses with nothing kept."""
    torch.manual_seed(0)
    x = torch.randn(8, 17, 64)

    def fused_after(model: nn.Module, inp: torch.Tensor = x) -> bool:
        native_spy.calls.clear()
        model(inp.clone().requires_grad_()).sum().backward()
        return "spfde_mha_forward" in native_spy.calls

    model = _SelfAttention()
    exe = SparseExecution(model, _engine(model, {"attn.in_proj_weight": "attn.in_proj_weight"}), "sparse")
    assert not fused_after(model)
    exe.remove()
    model = _SelfAttention()
    exe = SparseExecution(model, _engine(model, ATTN_LAYERS), "sparse")
    assert fused_after(model)
    handle = model.attn.out_proj.register_forward_hook(lambda *_: None)
    assert not fused_after(model)
    handle.remove()
    assert not fused_after(model, torch.randn(8, NATIVE_MAX_LEN + 1, 64))
    with monkeypatch.context() as m:
        m.setattr(SparseExecution, "dense_weight_grad", property(lambda self: True))
        assert not fused_after(model)
    with torch.no_grad():
        native_spy.calls.clear()
        model(x)
        assert native_spy.calls == ["spfde_mha_forward"]
    exe.remove()
    model = _SelfAttention(dropout=0.1)
    exe = SparseExecution(model, _engine(model, ATTN_LAYERS), "sparse")
    assert not fused_after(model)
    model.eval()
    assert fused_after(model)
    exe.remove()
    # auto: the block is timed as one (the fused call against the dense steps) and fuses from its first
    # call, out_proj taking in_proj's decision; decided dense, both projections run dense
    model = _SelfAttention()
    monkeypatch.setattr(execution, "TINY_MACS", 0)
    raced = _spy_race(native_spy, 2.0, 1.0)
    monkeypatch.setattr(execution, "race", raced)
    exe = SparseExecution(model, _engine(model, ATTN_LAYERS), "auto", "off")
    assert fused_after(model) and fused_after(model)
    assert len(raced.ran) == 1 and raced.ran[0][1] == ["spfde_mha_forward", "spfde_mha_backward"]
    assert "spfde_mha_forward" not in raced.ran[0][0] and "spfde_linear_forward" not in raced.ran[0][0]
    assert exe.choices() == {"attn.in_proj_weight": "sparse", "attn.out_proj": "sparse"}
    for layer in exe.layers.values():  # as if the block's timing had said dense
        layer.decisions = dict.fromkeys(layer.decisions, "dense")
    assert not fused_after(model) and not [c for c in native_spy.calls if c.startswith("spfde_linear")]
    assert exe.choices() == {"attn.in_proj_weight": "dense", "attn.out_proj": "dense"}


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fused_calls(rows: int, ln: nn.LayerNorm) -> dict:
    """The fused MLP and attention block at the ViT preset's sizes, both weights 15% dense (seeded by
    ``rows``; ``ln``'s scale and shift, if any, drawn away from 1 and 0): ``{name: (call(x, norm=None,
    residual=False), input shape for about ``rows`` rows, the weights)}``."""
    from spfde.sparsity.kernels.mlp import sparse_mlp

    torch.manual_seed(rows)
    fc1, fc2 = nn.Linear(64, 128), nn.Linear(128, 64)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    if ln.elementwise_affine:
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    plans = []
    for w in (fc1.weight, fc2.weight, mha.in_proj_weight, mha.out_proj.weight):
        m = _mask(w.shape, 0.15, seed=len(plans))
        with torch.no_grad():
            w.mul_(m)
        plans.append(LinearPlan(m, w))
    return {"mlp": (lambda t, n=None, r=False: sparse_mlp(t, fc1, fc2, plans[0], plans[1], n, r), (rows, 64),
                    [fc1.weight, fc1.bias, fc2.weight, fc2.bias]),
            "attention": (lambda t, n=None, r=False: attention.fused_self_attention(mha, t, plans[2], plans[3], n, r),
                          (max(rows // 17, 1), 17, 64),
                          [mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias])}


@needs_native
def test_fused_calls_gather_the_weights_values_at_each_call():
    """The fused MLP and attention calls read the nonzero values from the dense weights inside the
    native call, forward and backward: after an in-place change of the weights (same masks) the next
    call's output and gradients are those of a fresh copy built with the new values."""
    ln = nn.LayerNorm(64)
    for name, (call, shape, weights) in _fused_calls(17, ln).items():
        _, _, fresh_weights = fresh = _fused_calls(17, ln)[name]  # the same seed: same masks and values
        x = torch.randn(shape)
        before = call(x).detach()
        for ws in (weights, fresh_weights):
            with torch.no_grad():
                for w in ws[::2]:  # the two weights (not the biases), scaled in place
                    w.mul_(1.5)
        outs = []
        for c, ws in ((call, weights), (fresh[0], fresh_weights)):
            xg = x.clone().requires_grad_()
            y = c(xg)
            y.backward(torch.ones_like(y))
            outs.append([y.detach(), xg.grad, *(w.grad for w in ws)])
        assert not torch.equal(before, outs[0][0]), name
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b), name


def test_carve_gives_disjoint_line_aligned_arrays():
    """One buffer for a fused call's kept arrays: each present array starts on a 64-byte line (16
    floats) after the end of the one before, an absent one (size 0) gets no address."""
    sizes = (5, 0, 17, 16, 1)
    total, offsets = kernel_common.carve(sizes)
    assert offsets[1] is None
    spans = [(o, o + n) for o, n in zip(offsets, sizes, strict=True) if n]
    assert all(o % 16 == 0 for o, _ in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] <= total
    buf = torch.empty(total)
    addrs = kernel_common.carved(buf, offsets)
    assert addrs[1] is None
    assert [a - buf.data_ptr() for a in addrs if a is not None] == [4 * o for o, _ in spans]
    assert kernel_common.carved(None, kernel_common.carve((0, 0))[1]) == [None, None]


@needs_native
@pytest.mark.parametrize(("rows", "affine"), [(5, True), (17, True), (100, True), (2176, True), (17, False)])
def test_prenorm_inside_the_fused_kernels_is_the_layer_norm_before_them(rows, affine):
    """A pre-norm run inside the fused MLP and attention kernels (forward where they pack the input,
    backward where they write its gradient) gives the layer norm's result before the fused call
    within float rounding, every gradient included (the norm's scale and shift too); its forward
    without grad is the forward with grad bit for bit, and every result is bit-identical for one
    and two threads."""
    ln = nn.LayerNorm(64, eps=1e-6, elementwise_affine=affine)
    for name, (call, shape, weights) in _fused_calls(rows, ln).items():
        x = (torch.randn(shape) * 3 + 1).requires_grad_()
        params = [x, *((ln.weight, ln.bias) if affine else ()), *weights]
        g = torch.randn(shape)
        runs = []
        for threads in (1, 2):
            with _threads(threads):
                out = call(x, ln)
                runs.append((out, torch.autograd.grad(out, params, g)))
        (out, grads), (out2, grads2) = runs
        assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
        ref = call(ln(x))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, torch.autograd.grad(ref, params, g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        with torch.no_grad():
            assert torch.equal(call(x, ln), out), name


@needs_native
@pytest.mark.parametrize(("rows", "normed"), [(5, True), (17, False), (100, True), (2176, True)])
def test_residual_inside_the_fused_kernels_is_the_add_after_them(rows, normed):
    """A pre-norm block's residual added inside the fused MLP and attention kernels (forward where they
    write each output row, backward where they write the input's gradient) is ``x +`` the fused call
    bit for bit: output and every gradient, with and without the pre-norm, for one and two threads,
    without grad, and with an input that needs no gradient."""
    ln = nn.LayerNorm(64, eps=1e-6)
    norm = ln if normed else None
    for name, (fused, shape, weights) in _fused_calls(rows, ln).items():
        def call(t, r, f=fused):
            return f(t, norm, r)

        x = (torch.randn(shape) * 3 + 1).requires_grad_()
        g = torch.randn(shape)
        for x_grad in (True, False):
            xi = x if x_grad else x.detach()
            params = [*([xi] if x_grad else []), *((ln.weight, ln.bias) if normed else ()), *weights]
            for threads in (1, 2):
                with _threads(threads):
                    out = call(xi, True)
                    ref = xi + call(xi, False)
                    assert torch.equal(out, ref), (name, threads)
                    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g),
                                    strict=True):
                        assert torch.equal(a, b), (name, threads, x_grad)
                    with torch.no_grad():
                        assert torch.equal(call(xi, True), out), name


@needs_native
def test_vit_prenorms_run_inside_the_fused_calls_unless_hooked(monkeypatch):
    """Under sparse kernels the ViT's pre-norms run inside its fused attention and MLP calls; a hook
    on a norm (or on the sublayer) keeps that norm a module call; the model's output and gradients
    match the model with every norm called as a module within float rounding."""
    from spfde.models.vit import vit_tiny
    from spfde.sparsity.kernels import mlp as mlp_mod

    torch.manual_seed(0)
    model = vit_tiny(num_classes=10, in_channels=1)
    layers = {}
    for i in range(4):
        for m, p in ((f"layers.{i}.mlp.fc1", "weight"), (f"layers.{i}.mlp.fc2", "weight"),
                     (f"layers.{i}.attn.in_proj_weight", None), (f"layers.{i}.attn.out_proj", "weight")):
            layers[m] = f"{m}.{p}" if p else m
    SparseExecution(model, _engine(model, layers, density=0.2), mode="sparse")
    seen, residuals = [], []
    for cls in (mlp_mod.SparseMlpFunction, attention.FusedSelfAttentionFunction):
        real = cls.apply
        # a[-2]: the norm's eps (None: no norm inside), a[-1]: the residual's add inside
        monkeypatch.setattr(cls, "apply", lambda *a, _r=real, _c=cls: seen.append((_c.__name__, a[-2] is not None))
                            or residuals.append(a[-1]) or _r(*a))
    x = torch.randn(6, 1, 28, 28)
    params = list(model.parameters())

    def run():
        seen.clear()
        residuals.clear()
        out = model(x)
        return out, _grads(out, params)

    out, grads = run()
    assert len(seen) == 8 and all(normed for _, normed in seen) and residuals == [True] * 8
    handle = model.layers[2].norm2.register_forward_hook(lambda *_: None)
    run()
    assert sorted(seen).count(("SparseMlpFunction", False)) == 1 and len(seen) == 8
    handle.remove()
    _no_prenorm_fusion(monkeypatch)
    ref, ref_grads = run()
    assert len(seen) == 8 and not any(normed for _, normed in seen)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_native
def test_prenorms_fuse_behind_a_cached_boundary_under_auto(monkeypatch):
    """A pre-norm block whose input needs no gradient (the first block behind the activation cache's
    boundary) is decided under the key of its calls on ``norm(x)``, which do need one: under ``auto``,
    once its attention and MLP were timed, both norms and residuals run inside the fused calls."""
    from spfde.models.vit import vit_tiny
    from spfde.sparsity.kernels import mlp as mlp_mod

    torch.manual_seed(0)
    model = vit_tiny(num_classes=10, in_channels=1)
    layers = {}
    for m, p in (("layers.0.mlp.fc1", "weight"), ("layers.0.mlp.fc2", "weight"),
                 ("layers.0.attn.in_proj_weight", None), ("layers.0.attn.out_proj", "weight")):
        layers[m] = f"{m}.{p}" if p else m
    SparseExecution(model, _engine(model, layers, density=0.2), "auto", "off")
    monkeypatch.setattr(execution, "TINY_MACS", 0)
    monkeypatch.setattr(execution, "race", _fake_race(2.0, 1.0, []))  # sparse wins every timing
    seen = []
    for cls in (mlp_mod.SparseMlpFunction, attention.FusedSelfAttentionFunction):
        real = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _r=real, _c=cls: seen.append((_c.__name__, a[-2] is not None,
                                                                                    a[-1])) or _r(*a))
    block = model.layers[0]
    x = torch.randn(6, 17, 64)  # a cached boundary's rows: no gradient
    for _ in range(3):  # the first calls time (and confirm) the pairs on norm(x)
        seen.clear()
        block(x).sum().backward()
    assert sorted(seen) == [("FusedSelfAttentionFunction", True, True), ("SparseMlpFunction", True, True)]
    assert block.norm1.weight.grad is not None and block.norm2.weight.grad is not None


@needs_native
def test_vit_training_with_fused_attention_matches_the_three_steps(monkeypatch, tmp_path):
    """A MEST ViT run with its attention blocks fused ends with the masks of the same run with the
    blocks as three steps and weights within float rounding of it; a second fused run is
    bit-identical."""
    _no_prenorm_fusion(monkeypatch)
    from spfde.train import Trainer

    cfg = load_config(None, ["data.name=fashion_mnist", "data.subset=256", "data.test_subset=64",
                             "data.batch_size=64", "data.augment=false", "data.channels=null", "model.name=vit_tiny",
                             "model.width=0.5", "optim.lr=0.02", "train.epochs=3", "train.interval=1",
                             "train.threads=2", "logging.progress=false", "sparsity.method=mest",
                             "sparsity.target=0.8", "sparsity.kernels=sparse", "sieving.method=circular",
                             "sieving.ratio=0.2"])
    fused_calls = []
    real = attention.FusedSelfAttentionFunction.apply
    monkeypatch.setattr(attention.FusedSelfAttentionFunction, "apply", lambda *a: fused_calls.append(1) or real(*a))
    states = []
    for fused in (True, False, True):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(attention, "fused_plan", lambda *a: None)
            fused_calls.clear()
            tr = Trainer(cfg, tmp_path / str(len(states)), quiet=True)
            for epoch in range(3):
                tr.train_epoch(epoch)
            assert bool(fused_calls) == fused
            masks = {k: v.clone() for k, v in tr.ctl.sparsity.masks.items()}
            states.append((copy.deepcopy(tr.model.state_dict()), masks))
    (w1, m1), (w2, m2), (w3, m3) = states
    assert all(torch.equal(m1[k], m2[k]) and torch.equal(m1[k], m3[k]) for k in m1)
    for k in w1:
        assert torch.equal(w1[k], w3[k])
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- SparseExecution


def _engine(model: nn.Module, layers: dict[str, str], density: float = 0.25, seed: int = 0) -> SparseEngine:
    params = dict(model.named_parameters())
    lays = [PrunableLayer(m, p, tuple(params[p].shape)) for m, p in layers.items()]
    engine = SparseEngine(model, lays, {m: 1 - density for m in layers}, Schedule(method="static"), seed=seed)
    engine.apply_masks()
    return engine


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.odd = nn.Conv2d(8, 8, 3, padding=2, dilation=2)  # dilation: dense fallback
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> torch.Tensor:
        x = F.relu(self.odd(F.relu(self.conv(x))))
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=need_weights)[0]
        return self.head(t.mean(1))


# unit name -> parameter: an attention projection's unit is its parameter's name (sparsity.masks.unit_name)
NET_LAYERS = {"conv": "conv.weight", "odd": "odd.weight", "attn.in_proj_weight": "attn.in_proj_weight",
              "head": "head.weight"}


def test_execution_replaces_forward_only_and_removes_cleanly():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    engine = _engine(model, NET_LAYERS)
    _engine(ref, NET_LAYERS)  # same seed: same masks
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    with pytest.warns(KernelWarning, match="'odd': dilation != 1"):
        exe = SparseExecution(model, engine, "sparse")
    assert set(exe.layers) == {"conv", "attn.in_proj_weight", "head"}
    assert exe.unsupported == {"odd": "dilation != 1"}
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    x = torch.randn(6, 4, 5, 5)
    _close(model(x), ref(x))
    torch.testing.assert_close(model(x, need_weights=True), ref(x, need_weights=True))  # dense fallback
    from spfde.accounting.flops import layer_forward_flops

    assert layer_forward_flops(model, x[:1]) == layer_forward_flops(ref, x[:1])  # FlopCounterMode sees dense
    copied = copy.deepcopy(model)  # a deep copy computes with its own weights
    with torch.no_grad():
        copied.head.weight.mul_(2)
    assert not torch.allclose(copied(x), model(x))
    exe.remove()
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(model(x), ref(x))


def test_dense_mode_installs_nothing_and_unsupported_calls_fall_back():
    model = Net()
    exe = SparseExecution(model, _engine(model, NET_LAYERS), "dense")
    assert not exe.layers and all("forward" not in vars(m) for m in model.modules())
    assert exe.choices() == {name: "dense" for name in NET_LAYERS}
    lin = nn.Sequential(nn.Linear(16, 16))
    ref = copy.deepcopy(lin)
    SparseExecution(lin, _engine(lin, {"0": "0.weight"}), "sparse")
    _engine(ref, {"0": "0.weight"})
    xb = torch.randn(4, 16).bfloat16()
    assert torch.equal(lin.bfloat16()(xb), ref.bfloat16()(xb))  # bf16: the module's own dense forward
    with pytest.raises(ConfigError, match="sparsity.kernels"):
        SparseExecution(lin, _engine(lin, {"0": "0.weight"}), "fast")
    from spfde.sparsity.kernels.conv import unsupported_conv

    assert unsupported_conv(nn.Conv2d(4, 4, 3, groups=2)) == "groups != 1"
    assert unsupported_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")) == "padding_mode 'reflect'"
    assert unsupported_conv(nn.Conv2d(4, 4, 3, padding="same")) == "padding 'same'"
    assert unsupported_conv(nn.Conv2d(4, 4, 3, padding="valid")) is None

    class StdConv(nn.Conv2d):  # its forward is nn.Conv2d's, which calls this with the weight
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, 2.0 * w, b)

    assert unsupported_conv(StdConv(4, 4, 3)) == "StdConv overrides _conv_forward"
    std = nn.Sequential(StdConv(4, 8, 3, padding=1))
    ref = copy.deepcopy(std)
    with pytest.warns(KernelWarning, match="StdConv overrides _conv_forward"):
        SparseExecution(std, _engine(std, {"0": "0.weight"}), "sparse")
    _engine(ref, {"0": "0.weight"})
    x = torch.randn(3, 4, 6, 6)
    assert torch.equal(std(x), ref(x))  # its own forward: the sparse kernel would drop the 2x
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    ref = copy.deepcopy(conv)
    SparseExecution(conv, _engine(conv, {"0": "0.weight"}), "sparse")
    _engine(ref, {"0": "0.weight"})
    xb = torch.randn(3, 4, 6, 6).bfloat16()
    assert torch.equal(conv.bfloat16()(xb), ref.bfloat16()(xb))  # bf16 conv: dense
    x = torch.randn(4, 6, 6)  # unbatched input: dense
    assert torch.equal(conv.float()(x), ref.float()(x))


def test_plan_rebuilt_only_when_the_mask_changes():
    lin = nn.Sequential(nn.Linear(32, 16))
    engine = _engine(lin, {"0": "0.weight"})
    exe = SparseExecution(lin, engine, "sparse")
    layer = exe.layers["0"]
    x = torch.randn(9, 32)
    lin(x)
    plan = layer.plan
    lin(x)
    exe.refresh()
    assert layer.plan is plan  # same mask: nothing rebuilt
    new = _mask((16, 32), 0.5, seed=3)
    engine._set_mask("0.weight", new)  # what Prune&Grow does
    engine.apply_masks()
    xs = x.clone().requires_grad_()
    y = lin(xs)
    assert layer.plan is not plan and layer.plan.nnz == int(new.sum())
    _close(y, F.linear(x, lin[0].weight * new, lin[0].bias))
    (gw,) = torch.autograd.grad(y.sum(), [lin[0].weight])
    assert torch.all(gw[~new] == 0) and torch.any(gw[new] != 0)


def _spy_race(spy, dense_s: float, sparse_s: float):
    """A fake timing that runs each side once and keeps the native calls each made (``.ran``)."""
    def race(dense, sparse):
        saved = list(spy.calls)
        ran = []
        for fn in (dense, sparse):
            spy.calls.clear()
            fn()
            ran.append(list(spy.calls))
        spy.calls[:] = saved
        race.ran.append(tuple(ran))
        return dense_s, sparse_s
    race.ran = []
    return race


def _fake_race(dense_s: float, sparse_s: float, calls: list):
    def race(dense, sparse):
        calls.append((dense, sparse))
        return dense_s, sparse_s
    return race


@pytest.mark.parametrize(("sparse_s", "expect"), [(0.5, "sparse"), (0.97, "dense")])
def test_auto_keeps_sparse_only_when_faster_by_the_margin(monkeypatch, sparse_s, expect):
    calls: list = []
    monkeypatch.setattr(execution, "race", _fake_race(1.0, sparse_s, calls))
    lin = nn.Sequential(nn.Linear(512, 512))
    exe = SparseExecution(lin, _engine(lin, {"0": "0.weight"}), "auto")
    x = torch.randn(64, 512)  # 16.8M multiply-adds: timed
    for _ in range(3):
        lin(x).sum().backward()
    assert len(calls) == 1  # decided once for this shape and gradient need
    assert exe.choices() == {"0": expect} and exe.speedups() == {"0": round(1.0 / sparse_s, 3)}
    with torch.no_grad():
        lin(x)  # a forward-only call is a different key: timed separately
    assert len(calls) == 2
    lin(torch.randn(2, 512))  # tiny: dense, untimed
    assert len(calls) == 2 and exe.layers["0"].decisions[(False, True, False, (2, 512))] == "dense"
    lin(torch.randn(20, 512)).sum().backward()  # a short last batch reuses the batch-64 decision
    assert len(calls) == 2 and exe.layers["0"].decisions[(False, True, False, (20, 512))] == expect
    lin(torch.randn(2, 512, requires_grad=True)).sum().backward()  # tiny, dense: must not decide for batch 64
    lin(torch.randn(64, 512, requires_grad=True)).sum().backward()
    assert len(calls) == 3


@pytest.mark.parametrize("whole_macs, timed", [(0, 16), (400 * 256 * 256, 400)])
def test_auto_times_a_large_batch_on_a_slice_unless_the_call_is_small(monkeypatch, whole_macs, timed):
    """A batch above TIME_MAX_BATCH is timed on a slice, unless the whole call is at most
    TIME_WHOLE_MACS multiply-adds (then the slice would overstate the sparse path's fixed cost)."""
    def race(dense, sparse):  # run each once, then call dense the faster
        dense(), sparse()
        return 1.0, 2.0

    monkeypatch.setattr(execution, "race", race)
    monkeypatch.setattr(execution, "TIME_MAX_BATCH", 16)
    monkeypatch.setattr(execution, "TIME_WHOLE_MACS", whole_macs)
    model = nn.Sequential(nn.Linear(256, 256))
    exe = SparseExecution(model, _engine(model, {"0": "0.weight"}), "auto")
    shapes = []
    monkeypatch.setattr(exe.layers["0"], "sparse",
                        lambda xx, dw: shapes.append(xx.shape[0]) or xx @ model[0].weight.t())
    x = torch.randn(400, 256)
    with torch.no_grad():
        model(x)
    assert shapes == [timed] and exe.layers["0"].decisions == {(False, False, False, (400, 256)): "dense"}
    # the calibration key records what was timed: a decision timed on a slice is not reused for the whole
    layer, key = exe.layers["0"], (False, False, False, (400, 256))
    ckey = layer.calibration_key(key, x)
    monkeypatch.setattr(execution, "TIME_WHOLE_MACS", 400 * 256 * 256 - whole_macs)
    assert layer.calibration_key(key, x) != ckey


def test_auto_times_a_frozen_layer_forward_only(monkeypatch):
    lin = nn.Sequential(nn.Linear(512, 512))
    exe = SparseExecution(lin, _engine(lin, {"0": "0.weight"}), "auto")
    lin[0].weight.requires_grad_(False)
    lin[0].bias.requires_grad_(False)
    backward = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backward.append(1) or real_grad(*a, **k))
    lin(torch.randn(64, 512))
    (key,) = exe.layers["0"].decisions
    assert key[:3] == (False, False, False) and not backward


def test_auto_one_off_pass_decides_untimed_and_records_nothing(monkeypatch):
    """Inside ``one_off`` (the cache's probe and fill) a new call is predicted from the layer's timing of
    the same input shape, not timed and not recorded; outside, the same call is timed as before."""
    calls: list = []
    monkeypatch.setattr(execution, "race", _fake_race(1.0, 0.5, calls))
    lin = nn.Sequential(nn.Linear(512, 512))
    exe = SparseExecution(lin, _engine(lin, {"0": "0.weight"}), "auto", "off")
    x = torch.randn(64, 512)
    lin(x).sum().backward()  # the training call: timed, sparse at 2x
    assert len(calls) == 1
    used = []
    real = exe.layers["0"].sparse
    monkeypatch.setattr(exe.layers["0"], "sparse", lambda xx, dw, *more: used.append(1) or real(xx, dw, *more))
    with exe.one_off(), torch.no_grad():
        assert exe.in_one_off
        lin(x)
        lin(x)
    assert len(calls) == 1 and len(used) == 2 and not exe.in_one_off  # predicted sparse, untimed
    assert set(exe.layers["0"].decisions) == {(False, True, False, (64, 512))}
    with exe.one_off(), torch.no_grad():
        lin(torch.randn(48, 512))  # no timing of this shape to predict from: timed as usual
    assert len(calls) == 2
    with torch.no_grad():
        lin(x)  # a real forward-only call outside the pass: timed
    assert len(calls) == 3
    monkeypatch.setattr(execution, "race", _fake_race(1.0, 0.99, calls))
    slow = nn.Sequential(nn.Linear(512, 512))
    exe2 = SparseExecution(slow, _engine(slow, {"0": "0.weight"}), "auto", "off")
    slow(x).sum().backward()  # sparse within the margin of dense: dense, and so is its one-off prediction
    with exe2.one_off(), torch.no_grad():
        slow(x)
    assert exe2.layers["0"].used == "dense" and exe2.layers["0"].one_off_choice((False, False, False, (64, 512)), x) \
        == "dense"


@needs_native
def test_auto_one_off_pass_runs_the_fused_calls_untimed(native_spy, monkeypatch):
    """A one-off pass (the activation cache's fill of frozen blocks: forward only, no grad) runs a ViT
    block's MLP and attention as the fused native calls where the pairs' training calls run sparse,
    by the untimed one-off choice, bit for bit the unfused result; it times and records nothing.
    The memory model's probe (``probe=True``) still runs the calls one by one."""
    _no_prenorm_fusion(monkeypatch)
    from spfde.models.vit import vit_tiny

    torch.manual_seed(0)
    model = vit_tiny(num_classes=10, in_channels=1)
    layers = {}
    for i in range(4):
        layers.update({f"layers.{i}.mlp.fc1": f"layers.{i}.mlp.fc1.weight",
                       f"layers.{i}.mlp.fc2": f"layers.{i}.mlp.fc2.weight",
                       f"layers.{i}.attn.in_proj_weight": f"layers.{i}.attn.in_proj_weight",
                       f"layers.{i}.attn.out_proj": f"layers.{i}.attn.out_proj.weight"})
    exe = SparseExecution(model, _engine(model, layers, density=0.2), "auto", "off")
    monkeypatch.setattr(execution, "TINY_MACS", 0)
    raced = _spy_race(native_spy, 2.0, 1.0)  # sparse wins
    monkeypatch.setattr(execution, "race", raced)
    x = torch.randn(6, 1, 28, 28)
    model(x).sum().backward()  # the training calls: the pairs timed as one, sparse
    timed, decided = len(raced.ran), {n: dict(lay.decisions) for n, lay in exe.layers.items()}
    assert exe.choices() == dict.fromkeys(layers, "sparse")

    def pass_(probe: bool = False) -> torch.Tensor:
        native_spy.calls.clear()
        with exe.one_off(probe=probe), torch.no_grad():
            return model(x)

    out = pass_()
    assert native_spy.calls.count("spfde_mlp_forward") == 4 and native_spy.calls.count("spfde_mha_forward") == 4
    assert "spfde_linear_forward" not in native_spy.calls
    assert len(raced.ran) == timed and {n: lay.decisions for n, lay in exe.layers.items()} == decided
    assert exe.one_off_choices  # memoised for the pass
    pass_(probe=True)
    assert "spfde_mlp_forward" not in native_spy.calls and "spfde_mha_forward" not in native_spy.calls
    monkeypatch.setattr(kernel_common, "FUSED_MAX_BYTES", -1)  # nothing fuses: the calls one by one
    ref = pass_()
    assert "spfde_mlp_forward" not in native_spy.calls and "spfde_linear_forward" in native_spy.calls
    assert torch.equal(out, ref)
    assert len(raced.ran) == timed


@needs_native
def test_vit_training_with_fused_mlps_is_bit_identical_to_the_linears_one_by_one(monkeypatch, tmp_path):
    """A MEST ViT run with its MLP blocks fused (Prune&Grow, freezing, the activation cache and
    sieving included) ends with the weights and masks of the same run with every MLP as two sparse
    Linear calls, bit for bit."""
    _no_prenorm_fusion(monkeypatch)
    from spfde.sparsity.kernels import mlp as mlp_mod
    from spfde.train import Trainer

    cfg = load_config(None, ["data.name=fashion_mnist", "data.subset=256", "data.test_subset=64",
                             "data.batch_size=64", "data.augment=false", "data.channels=null", "model.name=vit_tiny",
                             "model.width=0.5", "train.epochs=3", "train.interval=1", "train.threads=2",
                             "logging.progress=false", "sparsity.method=mest", "sparsity.target=0.8",
                             "sparsity.kernels=sparse", "freezing.target=0.05", "freezing.tfrz=1",
                             "freezing.cache=auto", "sieving.method=circular", "sieving.ratio=0.2"])
    fused_calls = []
    monkeypatch.setattr(attention, "fused_plan", lambda *a: None)  # the MLPs alone switch (see the attention test)
    real = mlp_mod.SparseMlpFunction.apply
    monkeypatch.setattr(mlp_mod.SparseMlpFunction, "apply", lambda *a: fused_calls.append(1) or real(*a))
    states = []
    for limit in (kernel_common.FUSED_MAX_BYTES, -1):
        monkeypatch.setattr(kernel_common, "FUSED_MAX_BYTES", limit)
        fused_calls.clear()
        tr = Trainer(cfg, tmp_path / str(limit), quiet=True)
        for epoch in range(3):
            tr.train_epoch(epoch)
        assert bool(fused_calls) == (limit > 0)
        states.append((copy.deepcopy(tr.model.state_dict()), {k: v.clone() for k, v in tr.ctl.sparsity.masks.items()}))
    (w1, m1), (w2, m2) = states
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)


def test_controller_runs_the_cache_activation_as_a_one_off_pass(monkeypatch, tmp_path):
    """The cache's probe and fill run inside the kernels' one-off pass (so ``auto`` times no frozen layer there)."""
    from spfde.freezing.cache import ActivationCache

    seen = []
    real = ActivationCache._activate
    monkeypatch.setattr(ActivationCache, "_activate",
                        lambda self, *a: seen.append(self.one_off.__self__.in_one_off) or real(self, *a))
    from spfde.train import Trainer

    cfg = load_config(None, ["data.name=fashion_mnist", "data.subset=256", "data.test_subset=64",
                             "data.batch_size=64", "data.augment=false", "data.channels=null", "model.name=vit_tiny",
                             "model.width=0.5", "train.epochs=3", "train.interval=1", "train.threads=1",
                             "logging.progress=false", "sparsity.method=mest", "sparsity.target=0.5",
                             "freezing.target=0.05", "freezing.tfrz=1", "freezing.cache=on",
                             "sparsity.kernels_calibration=off"])
    tr = Trainer(cfg, tmp_path, quiet=True)
    assert tr.ctl.cache.one_off == tr.ctl.kernels.one_off
    for epoch in range(3):
        tr.train_epoch(epoch)
    assert seen and all(seen)


def test_auto_choices_replay_from_state_and_retime_when_the_density_moves(monkeypatch):
    calls: list = []
    monkeypatch.setattr(execution, "race", _fake_race(1.0, 0.5, calls))
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(512, 512))
    other = copy.deepcopy(lin)
    exe = SparseExecution(lin, _engine(lin, {"0": "0.weight"}), "auto")
    x = torch.randn(64, 512)
    lin(x).sum().backward()
    state = json.loads(json.dumps(exe.state_dict()))  # checkpoint-safe plain data

    engine2 = _engine(other, {"0": "0.weight"})  # the same seed draws the same mask
    exe2 = SparseExecution(other, engine2, "auto")
    exe2.load_state_dict(state)
    monkeypatch.setattr(execution, "race", _fake_race(0.5, 1.0, calls))  # timing would now say dense
    other(x).sum().backward()
    assert len(calls) == 1 and exe2.choices() == {"0": "sparse"}  # replayed, not re-timed
    swapped = engine2.masks["0.weight"].flatten()[torch.randperm(512 * 512)].view(512, 512)
    engine2._set_mask("0.weight", swapped)  # a Prune&Grow at the same density
    engine2.apply_masks()  # as Prune&Grow does: the weight fits the new mask
    other(x).sum().backward()
    assert len(calls) == 1 and exe2.layers["0"].plan.nnz == int(swapped.sum())  # rebuilt, not re-timed
    # the density moved 0.25 -> 0.5: the 2x timed at 0.25 predicts about 1x, too close to call
    engine2._set_mask("0.weight", _mask((512, 512), 0.5, seed=9))
    engine2.apply_masks()  # as Prune&Grow does: the weight fits the new mask
    other(x).sum().backward()
    assert len(calls) == 2 and exe2.choices() == {"0": "dense"}  # timed afresh


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, dropout=0.5, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_timing_leaves_the_global_rng_alone():
    model = _Attn().train()
    exe = SparseExecution(model, _engine(model, {"attn.in_proj_weight": "attn.in_proj_weight"}), "auto")
    x = torch.randn(8, 64, 64, requires_grad=True)
    state = torch.get_rng_state()
    exe.layers["attn.in_proj_weight"].time((True, True, False, tuple(x.shape)), x, (x, x, x), {"need_weights": False})
    assert torch.equal(torch.get_rng_state(), state)  # dropout ran inside the timing, on a forked RNG


def test_rigl_dense_gradient_epoch_keeps_the_dense_gradient():
    torch.manual_seed(0)
    cfg = {"train": {"epochs": 3, "interval": 1}, "sparsity": {"method": "rigl", "target": 0.8, "kernels": "sparse",
                                                               "dense_first_layer": False}}
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = SpFDE(model, opt, cfg, train_size=32, example_input=torch.randn(2, 64))
    x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))
    ctl.start_epoch(0)
    assert ctl.sparsity.needs_dense_grad(0) and ctl.kernels.dense_weight_grad
    logits = model(x)
    opt.zero_grad()
    F.cross_entropy(logits, y).backward()
    dense_grad = model[0].weight.grad.clone()
    ctl.before_step()
    mask = ctl.sparsity.masks["0.weight"]
    assert torch.count_nonzero(dense_grad[~mask]) > 0  # RigL sees the gradient at pruned positions
    assert torch.all(model[0].weight.grad[~mask] == 0)  # and the step still sees it masked
    opt.step()
    ctl.after_step(logits, y, torch.arange(32))  # the step is kept: its dense gradient is RigL's statistic
    _close(ctl.sparsity._grad_buf["0.weight"], dense_grad)


def test_config_rejects_an_unknown_kernel_mode():
    with pytest.raises(ConfigError, match="sparsity.kernels"):
        from_dict({"sparsity": {"kernels": "fast"}})


# ----------------------------------------------------------------------------- training runs

# lr 0.02: the sparse and dense trajectories stay within float rounding (2e-7) for the whole run. At
# lr 0.05 a ReLU input within rounding of zero can flip in one of the runs, the two runs then drift
# apart by 1e-4 within an epoch and MEST's ranking can flip a near tie: dynamics, not the kernels
# (the per-step gradients agree to 3e-6 from identical weights).
DIGITS = ["data.name=digits", "data.subset=256", "data.test_subset=64", "data.image_size=16", "data.batch_size=64",
          "data.augment=false", "model.name=resnet20", "model.width=0.5", "optim.lr=0.02", "train.epochs=4",
          "train.interval=1", "train.threads=1", "logging.progress=false", "sparsity.method=mest",
          "sparsity.target=0.8", "sparsity.search_end=3"]


@pytest.mark.slow
def test_mest_run_with_sparse_kernels_matches_dense_kernels(tmp_path):
    from spfde.config import load_config
    from spfde.train import train

    runs = {}
    for mode in ("dense", "sparse"):
        train(load_config(None, [*DIGITS, f"sparsity.kernels={mode}"]), tmp_path / mode, quiet=True)
        runs[mode] = torch.load(tmp_path / mode / "checkpoints" / "last.pt", weights_only=False)
        rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        want = "sparse" if mode == "sparse" and NATIVE["available"] else "dense"
        assert rows[-1]["kernels"]["layer1.0.conv1"] == want
        assert "head" not in rows[-1]["kernels"]  # the classifier stays dense (sparsity.dense_last_layer)
    masks = {m: r["controller"]["sparsity"]["masks"] for m, r in runs.items()}
    assert masks["dense"].keys() == masks["sparse"].keys()
    assert all(torch.equal(masks["dense"][n], masks["sparse"][n]) for n in masks["dense"])
    for name, w in runs["dense"]["model"].items():
        if w.is_floating_point():
            # float rounding of two kernels compounds over 16 steps (BN running variances move most);
            # per-step agreement is asserted to 1e-5 by the layer tests above
            torch.testing.assert_close(runs["sparse"]["model"][name], w, rtol=2e-3, atol=2e-3)
    # a fresh sparse run is bit-identical
    from spfde.utils import state_dict_sha256

    again = train(load_config(None, [*DIGITS, "sparsity.kernels=sparse"]), tmp_path / "again", quiet=True)
    assert again["weights_sha256"] == state_dict_sha256(runs["sparse"]["model"])


@needs_native
def test_trainer_skips_the_masking_the_kernels_made_redundant_bit_identically(monkeypatch, tmp_path):
    """The built-in trainer's MEST run with sparse kernels skips the per-step gradient masking of the
    gradients the kernels wrote masked, and the weight masking after its SGD steps (SparseEngine
    module doc): the run ends bit-identical to the same run that multiplies every step."""
    from spfde.sparsity import engine as engine_mod
    from spfde.train import train

    muls = []
    real_mul = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda ts, ms: muls.append(len(ts)) or real_mul(ts, ms))
    cfg = load_config(None, [*DIGITS, "sparsity.kernels=sparse"])
    skipped = train(cfg, tmp_path / "skip", quiet=True)
    n_skip = len(muls)
    muls.clear()
    monkeypatch.setattr(engine_mod.SparseEngine, "note_masked_grad", lambda *a: None)
    monkeypatch.setattr(engine_mod, "ZERO_KEEPING_OPTIMIZERS", ())
    full = train(cfg, tmp_path / "full", quiet=True)
    assert skipped["weights_sha256"] == full["weights_sha256"]
    assert n_skip < len(muls) / 2  # most steps multiplied nothing
    a = torch.load(tmp_path / "skip" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    for n, m in a["controller"]["sparsity"]["masks"].items():
        assert torch.equal(m, b["controller"]["sparsity"]["masks"][n])
        assert not a["model"][n][~m].any()  # pruned weights exactly zero


def test_engine_masks_what_it_cannot_prove_zero():
    """A noted kernel gradient that was modified in place, or is not the weight's ``.grad`` any more, is
    masked; the weights are re-masked after a step unless before_step saw them clean, the optimizer
    is a zero-keeping one with a masked state, and the engine was told the optimizer is its own."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)
    engine = _engine(nn.Sequential(lin), {"0": "0.weight"}, density=0.5)
    mask, pruned = engine.masks["0.weight"], ~engine.masks["0.weight"]
    muls = []
    real_mul = torch._foreach_mul_

    def step(grad: torch.Tensor, note: torch.Tensor | None, opt: torch.optim.Optimizer, touch=None) -> None:
        lin.weight.grad = grad
        if note is not None:
            engine.note_masked_grad("0.weight", mask, note)
        if touch is not None:
            touch()
        muls.clear()
        torch._foreach_mul_ = lambda ts, ms: muls.append(len(ts)) or real_mul(ts, ms)
        try:
            engine.before_step()
            opt.step()
            engine.after_step(opt)
        finally:
            torch._foreach_mul_ = real_mul

    sgd = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    masked = torch.randn(8, 8) * mask
    step(masked.clone(), None, sgd)
    assert muls == [1, 1]  # nothing noted, the optimizer not declared: both masked
    g = masked.clone()
    step(g, g, sgd)
    assert muls == [1]  # the noted gradient skipped; the weights still re-masked (not declared)
    engine.optimizer_keeps_zeros = True
    g = masked.clone()
    step(g, g, sgd)
    assert muls == []  # both skipped: pruned weights stay exactly zero
    assert not lin.weight.detach()[pruned].any()
    g = masked.clone()
    step(g, g, sgd, touch=lambda: g.add_(1.0))  # written after the kernel: masked
    assert muls == [1] and not lin.weight.grad[pruned].any()
    g = masked.clone()
    step(torch.ones(8, 8), g, sgd)  # another tensor than the one the kernel wrote: masked
    assert muls == [1] and not lin.weight.detach()[pruned].any()
    g = masked.clone()
    def edit() -> None:
        with torch.no_grad():
            lin.weight.add_(pruned.float())  # an in-place edit (a write through .data is invisible: doc)

    step(g, g, sgd, touch=edit)  # a weight edited since it was masked: re-masked
    assert muls == [1] and not lin.weight.detach()[pruned].any()
    g = masked.clone()
    step(g, g, torch.optim.RMSprop(lin.parameters(), lr=0.1))  # not a known zero-keeping step
    assert muls == [1]
    engine._state_dirty = True  # an update whose optimizer state is not masked yet
    g = masked.clone()
    step(g, g, sgd)
    assert muls == [1] and not engine._state_dirty


def _own_loop_with_accumulation_and_clipping(kernels: str, clip_first: bool) -> nn.Module:
    """Two micro-batches per AdamW step, gradient clipping, zero_grad(set_to_none=False), MEST updates."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
                      nn.Conv2d(16, 16, 1, stride=2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    cfg = {"train": {"epochs": 3, "interval": 1}, "sparsity": {"method": "mest", "target": 0.7, "kernels": kernels},
           "sieving": {"method": "none"}}
    ctl = SpFDE(m, opt, cfg, train_size=32, example_input=x)
    for epoch in range(3):
        ctl.start_epoch(epoch)
        for idx in torch.tensor(list(ctl.sampler)).split(16):
            opt.zero_grad(set_to_none=False)
            outs = []
            for part in idx.split(8):
                outs.append(m(x[part]))
                (F.cross_entropy(outs[-1], y[part]) / 2).backward()
            if clip_first:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)
            ctl.before_step()
            if not clip_first:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)
            opt.step()
            ctl.after_step(torch.cat(outs), y[idx], idx)
        assert ctl.end_epoch()["kernels"]["2"] == kernels
    return m


@needs_native
def test_own_loop_accumulation_and_clipping_after_before_step_match_across_kernels():
    """docs/design.md: clipped after before_step, a dense and a sparse run agree within float tolerance;
    clipped before it, the dense kernels' gradients at pruned positions enter the norm and they part."""
    dense, sparse = (_own_loop_with_accumulation_and_clipping(k, clip_first=False) for k in ("dense", "sparse"))
    for a, b in zip(dense.parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    dense, sparse = (_own_loop_with_accumulation_and_clipping(k, clip_first=True) for k in ("dense", "sparse"))
    assert max(float((a - b).abs().max()) for a, b in zip(dense.parameters(), sparse.parameters(), strict=True)) > 1e-4


def test_controller_logs_kernels_and_checkpoints_the_choices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = {"train": {"epochs": 2, "interval": 1}, "sparsity": {"method": "mest", "target": 0.8}}
    ctl = SpFDE(model, opt, cfg, train_size=16, example_input=torch.randn(2, 3, 8, 8))
    ctl.start_epoch(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    ctl.before_step()
    opt.step()
    ctl.after_step(logits, y, torch.arange(16))
    m = ctl.end_epoch()
    assert m["kernels"] == {"2": "dense"}  # tiny layers: dense, untimed (first and last layer unmasked)
    state = ctl.state_dict()
    assert state["kernels"]["mode"] == "auto" and set(state["kernels"]["layers"]) == {"2"}


# ----------------------------------------------------------------------------- native build


def test_failed_build_falls_back_to_dense_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("SPFDE_CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPFDE_KERNEL_CACHE", str(tmp_path / "cache"))
    native._reset_for_tests()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        ref = copy.deepcopy(model)
        exe = SparseExecution(model, _engine(model, {"0": "0.weight", "2": "2.weight"}), "sparse")
        _engine(ref, {"0": "0.weight", "2": "2.weight"})
        x = torch.randn(5, 4, 6, 6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not native.status()["available"]  # a quiet query does not use up the warning
            for _ in range(3):
                out = model(x)
                out.sum().backward()
        kernel_warnings = [w for w in caught if issubclass(w.category, KernelWarning)]
        assert len(kernel_warnings) == 1 and "unavailable" in str(kernel_warnings[0].message)
        assert torch.equal(out, ref(x))  # the dense path, bit for bit
        assert exe.choices() == {"0": "dense", "2": "dense"}
    finally:
        native._reset_for_tests()


@pytest.mark.slow
def test_cli_run_without_a_compiler_prints_one_warning_line(tmp_path):
    env = {**os.environ, "SPFDE_CXX": "/nonexistent/c++", "SPFDE_KERNEL_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    (tmp_path / "run.yaml").write_text("seed: 0\n")
    args = [a for kv in [*DIGITS, "train.epochs=1", "sparsity.search_end=1", "sparsity.kernels=sparse"]
            for a in ("--set", kv)]
    r = subprocess.run([sys.executable, "-m", "spfde.cli", "train", "--config", str(tmp_path / "run.yaml"),
                        "--out", str(tmp_path / "run"), "--quiet", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "KernelWarning" in lines[0] and "dense" in lines[0], r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kernels"]["layer1.0.conv1"] == "dense"


@pytest.mark.slow
def test_portable_build_without_avx512_is_correct(tmp_path, monkeypatch):
    if not NATIVE["available"]:
        pytest.skip("no working compiler")
    monkeypatch.setenv("SPFDE_CXXFLAGS", "-mno-avx512f")
    monkeypatch.setenv("SPFDE_KERNEL_CACHE", str(tmp_path))
    native._reset_for_tests()
    try:
        assert native.status()["available"], native.status()
        for cin, cout, k, s, p, size in CONVS[:3]:
            for batch, cl in ((7, False), (20, True)):
                conv = nn.Conv2d(cin, cout, k, stride=s, padding=p)
                mask = _mask(conv.weight.shape, 0.3)
                with torch.no_grad():
                    conv.weight.mul_(mask)
                x = torch.randn(batch, cin, size, size)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
                dense, sparse = conv(xd), sparse_conv2d(conv, xs, make_conv_plan(conv, mask))
                _close(sparse, dense)
                gd, gs = _grads(dense, [xd, conv.weight]), _grads(sparse, [xs, conv.weight])
                _close(gs[0], gd[0])
                _close(gs[1], gd[1] * mask)
        for rows in (7, 150):  # Linear: 4-vector tiles without AVX-512 (150 rows: three tiles)
            lin, mask = _linear_case(40, 37, True, density=0.3)
            _check_linear(lin, mask, torch.randn(rows, 40))
            x = torch.randn(rows, 40) * 3  # the fused GELU's generic vector code
            xd, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
            dense, fused = F.gelu(lin(xd)), sparse_linear(xs, lin.weight, lin.bias, LinearPlan(mask, lin.weight),
                                                          gelu=True)
            _close(fused, dense)
            gd, gs = _grads(dense, [xd, lin.weight]), _grads(fused, [xs, lin.weight])
            _close(gs[0], gd[0])
            _close(gs[1], gd[1] * mask)
        mha = nn.MultiheadAttention(24, 3, batch_first=True)  # the attention core's generic transposes
        raw = torch.randn(19, 9, 72)
        qkv, ref64 = raw.clone().requires_grad_(), raw.double().requires_grad_()
        out, expect = attention.attention_core(mha, qkv), _matmul_core(ref64, 3)
        _close(out.double(), expect)
        torch.testing.assert_close(_grads(out, [qkv])[0].double(), _grads(expect, [ref64])[0], rtol=1e-4, atol=1e-4)
    finally:
        native._reset_for_tests()


def test_build_sparsity_engine_drives_execution_end_to_end():
    """After a real MEST Prune&Grow the sparse layers compute with the new masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = from_dict({"train": {"epochs": 4, "interval": 1}, "sparsity": {"method": "mest", "target": 0.8}})
    engine = build_sparsity(model, cfg, example_input=torch.randn(2, 32))
    engine.apply_masks()
    ref = copy.deepcopy(model)
    exe = SparseExecution(model, engine, "sparse")
    model(torch.randn(3, 32))
    old = {n: m.clone() for n, m in engine.masks.items()}
    engine.update(1)  # Prune&Grow (no recorded gradient: magnitude only)
    exe.refresh()
    assert any(not torch.equal(old[n], engine.masks[n]) for n in old)
    with torch.no_grad():  # give the grown positions values, as training would
        for n, p in model.named_parameters():
            if n in engine.masks:
                p.copy_(torch.randn(p.shape) * engine.masks[n])
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.copy_(p)
    x = torch.randn(8, 32)
    _close(model(x), ref(x))


def test_report_shows_the_kernel_table(tmp_path):
    import yaml

    from spfde.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet20"}, "sparsity": {"kernels": "auto"}}))
    rows = [{"epoch": e, "train_loss": 1.0, "test_acc": 0.5, "kernels": {"layer1.0.conv1": k, "head": "dense"},
             **({"kernel_speedup": {"layer1.0.conv1": 1.8 + e}} if k == "sparse" else {})}
            for e, k in enumerate(["dense", "sparse", "sparse"])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report([run]).read_text()
    assert "### Kernels per layer (run)" in text
    assert "| `layer1.0.conv1` | sparse | 2/3 | 3.80x |" in text and "| `head` | dense | 0/3 | - |" in text
    # a speedup measured at another density than the last epoch's says the density it was measured at
    rows[1]["layer_density"] = {"layer1.0.conv1": 0.2, "head": 1.0}
    rows[2] = {**rows[2], "layer_density": {"layer1.0.conv1": 0.1, "head": 1.0}}
    del rows[2]["kernel_speedup"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report([run]).read_text()
    assert "| `layer1.0.conv1` | sparse | 2/3 | 2.80x (at density 0.200) |" in text
    # a measurement kept across a small density change: the density it was timed at is its own field
    rows[2].update(kernel_speedup={"layer1.0.conv1": 2.8}, kernel_speedup_density={"layer1.0.conv1": 0.2},
                   layer_density={"layer1.0.conv1": 0.19, "head": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "| `layer1.0.conv1` | sparse | 2/3 | 2.80x (at density 0.200) |" in write_report([run]).read_text()


@needs_native
@pytest.mark.slow
def test_auto_resume_replays_the_checkpointed_choices(tmp_path, monkeypatch):
    from spfde.config import dump_config, load_config
    from spfde.train import Trainer, resume, train

    cfg = load_config(None, [*DIGITS, "model.width=1.0", "train.epochs=3", "sparsity.search_end=1",
                             "sparsity.kernels=auto",  # width 1: layers above TINY_MACS
                             "sparsity.kernels_calibration=off"])  # the replay alone, not the stored choices
    monkeypatch.setattr(execution, "race", lambda dense, sparse: (1.0, 0.5))  # sparse measured faster
    full = train(cfg, tmp_path / "full", quiet=True)
    part = tmp_path / "part"
    part.mkdir()
    (part / "config.yaml").write_text(dump_config(cfg))
    tr = Trainer(cfg, part, quiet=True)
    for epoch in range(2):  # the density steps at epoch 1 (search_end): the last re-timing
        m = tr.train_epoch(epoch)
        tr.metrics.append({"epoch": epoch, **m, "test_acc": None, "wall_s": 0.0})
        tr.checkpoint(epoch)
    assert m["kernels"]["layer1.0.conv1"] == "sparse"
    first = tr.metrics[0]  # timed at the start: listed with the density it was measured at
    assert first["kernel_speedup"]["layer1.0.conv1"] == 2.0
    assert first["kernel_speedup_density"]["layer1.0.conv1"] == pytest.approx(
        first["layer_density"]["layer1.0.conv1"], abs=1e-3)
    timed_with_grad = []  # timing a training call now would pick dense
    monkeypatch.setattr(execution, "race",
                        lambda dense, sparse: timed_with_grad.append(torch.is_grad_enabled()) or (0.5, 1.0))
    resumed = resume(part, quiet=True)
    # the training calls replayed the checkpoint's choices (only the evaluation's forward-only calls,
    # never run in this process, were timed)
    assert not any(timed_with_grad)
    assert resumed["weights_sha256"] == full["weights_sha256"]
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kernels"]["layer1.0.conv1"] == "sparse"


def test_rigl_step_updates_get_their_dense_gradient_from_sparse_kernels():
    """update_unit: step: RigL grows where the dense gradient of the step before an update is large;
    sparse kernels must compute that step's weight gradient densely (mid-epoch), or growth is blind."""

    from spfde import SpFDE

    def run(kernels: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        cfg = {"train": {"epochs": 2, "interval": 1},
               "sparsity": {"method": "rigl", "target": 0.9, "update_unit": "step", "update_interval_steps": 3,
                            "kernels": kernels, "dense_first_layer": False}}
        ctl = SpFDE(model, opt, cfg, train_size=256, example_input=x[:2], blocks=["0", "2", "4"])
        controller_epochs(ctl, model, opt, x, y, batch=32, epochs=2)
        assert ctl.sparsity.step >= 3  # updates happened mid-epoch
        return {k: v.clone() for k, v in ctl.sparsity.masks.items()}

    dense, sparse = run("dense"), run("sparse")
    assert set(dense) == set(sparse) and dense
    for name in dense:
        assert torch.equal(dense[name], sparse[name]), name


@pytest.mark.parametrize("kind", ["linear", "conv", "attention"])
def test_a_double_backward_through_a_sparse_layer_raises_instead_of_dropping_gradients(kind) -> None:
    """create_graph=True (gradient penalties, MAML) cannot differentiate the native backward: it must
    raise, naming the fix, not leave the layer's and upstream weights without a gradient; a
    first-order backward with create_graph=True still works."""
    torch.manual_seed(0)
    if kind == "attention":
        from spfde.sparsity.kernels.attention import attention_core

        if not NATIVE["available"]:
            pytest.skip("the native attention core did not build")
        mha = nn.MultiheadAttention(16, 2, batch_first=True)
        x = torch.randn(3, 5, 48, requires_grad=True)
        y = attention_core(mha, x)
    elif kind == "linear":
        w = torch.randn(12, 10, requires_grad=True)
        x = torch.randn(5, 10, requires_grad=True)
        y = sparse_linear(x, w, None, LinearPlan(_mask(w.shape, 0.3), w))
    else:
        conv = nn.Conv2d(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        y = sparse_conv2d(conv, x, make_conv_plan(conv, _mask(conv.weight.shape, 0.3)))
    gx, = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
    assert gx.shape == x.shape and gx.requires_grad
    with pytest.raises(RuntimeError, match="first-order gradients only; set sparsity.kernels=dense"):
        gx.pow(2).sum().backward()


def test_sparse_linear_under_non_reentrant_activation_checkpointing_matches_dense() -> None:
    """torch.utils.checkpoint(use_reentrant=False) lets a backward unpack its saved tensors once."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    w = torch.randn(16, 8, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    mask = _mask(w.shape, 0.3)
    plan = LinearPlan(mask, w)
    x = torch.randn(9, 8, requires_grad=True)
    out = checkpoint(lambda t: sparse_linear(t, w, b, plan).relu(), x, use_reentrant=False)
    got = _grads(out, [x, w, b])
    want = _grads(F.linear(x, w * mask, b).relu(), [x, w, b])
    for g, r in zip(got, want, strict=True):  # w * mask: the dense weight gradient is zero where pruned too
        _close(g, r)


# ----------------------------------------------------------------------------- calls the kernels must not take
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


MLP_LAYERS = {"0": "0.weight", "2": "2.weight"}


def test_torch_func_transforms_run_dense_and_match_the_masked_model() -> None:
    """vmap, jacrev and grad over a model with the sparse path installed (the autograd functions have
    no vmap rule): the dense forward runs and the results are the masked model's."""
    torch.manual_seed(0)
    model = _mlp()
    ref = copy.deepcopy(model)
    exe = SparseExecution(model, _engine(model, MLP_LAYERS), "sparse")
    _engine(ref, MLP_LAYERS)  # the same masks
    x = torch.randn(5, 16)
    _close(torch.func.vmap(model)(x), torch.func.vmap(ref)(x))
    _close(torch.func.jacrev(model)(x[0]), torch.func.jacrev(ref)(x[0]))
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    want = torch.func.grad(lambda p: torch.func.functional_call(ref, p, (x,)).sum())(params)
    for k in want:
        _close(got[k], want[k])
    model(x).sum().backward()  # outside a transform the sparse kernels run again
    assert exe.choices() == {"0": "sparse", "2": "sparse"}


def test_calls_that_fall_back_are_reported_dense_with_one_warning_line(monkeypatch) -> None:
    from spfde.sparsity.kernels import common

    monkeypatch.setattr(common, "_WARNED", {})
    model = _mlp().double()
    exe = SparseExecution(model, _engine(model, MLP_LAYERS), "sparse")
    x = torch.randn(3, 16, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        model(x).sum().backward()
        model(x).sum().backward()
        with warnings.catch_warnings():  # a filter change empties the warnings registry: still once
            warnings.simplefilter("ignore", UserWarning)
        model(x).sum().backward()
    lines = sorted(str(w.message) for w in seen if issubclass(w.category, KernelWarning))
    assert len(lines) == 1 and "layer '0'" in lines[0]  # one per reason, naming the first layer
    assert all("torch.float64" in line and "fp32 only" in line for line in lines)
    assert exe.choices() == {"0": "dense", "2": "dense"}  # not the "sparse" it was set up for
    # under auto too, a layer whose latest training call could not run sparse is reported dense
    monkeypatch.setattr(execution, "TINY_MACS", 0)
    monkeypatch.setattr(execution, "race", lambda dense, sparse: (1.0, 0.5))  # sparse measured faster
    model = _mlp()
    exe = SparseExecution(model, _engine(model, MLP_LAYERS), "auto", "off")
    model(torch.randn(8, 16)).sum().backward()
    assert exe.choices() == {"0": "sparse", "2": "sparse"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(8, 16)).float().sum().backward()
    assert exe.choices() == {"0": "dense", "2": "dense"}

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, t: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
            return self.attn(t, t, t, key_padding_mask=pad, need_weights=False)[0]

    layers = {"attn.in_proj_weight": "attn.in_proj_weight", "attn.out_proj": "attn.out_proj.weight"}
    att = Attn()
    exe = SparseExecution(att, _engine(att, layers), "sparse")
    t = torch.randn(3, 5, 8)
    with pytest.warns(KernelWarning, match="an attention mask"):
        att(t, torch.zeros(3, 5, dtype=torch.bool)).sum().backward()
    # the module's own forward reads out_proj's weight itself: its kernel never ran either
    assert exe.choices() == {"attn.in_proj_weight": "dense", "attn.out_proj": "dense"}
    att(t).sum().backward()
    assert exe.choices() == {"attn.in_proj_weight": "sparse", "attn.out_proj": "sparse"}
    att(t, torch.zeros(3, 5, dtype=torch.bool)).sum().backward()  # after a sparse call: not stale
    assert exe.choices() == {"attn.in_proj_weight": "dense", "attn.out_proj": "dense"}
    exe.remove()
    # only out_proj masked: the attention path is spfde's (unmasked projection) or the module's own
    att = Attn()
    exe = SparseExecution(att, _engine(att, {"attn.out_proj": "attn.out_proj.weight"}), "sparse")
    att(t).sum().backward()
    assert exe.choices() == {"attn.out_proj": "sparse"}
    with pytest.warns(KernelWarning, match="'attn.out_proj' runs dense .*its attention module runs its own"):
        att(t, torch.zeros(3, 5, dtype=torch.bool)).sum().backward()
    assert exe.choices() == {"attn.out_proj": "dense"}


@pytest.mark.parametrize("kwargs,why", [(dict(add_bias_kv=True), "bias_k/bias_v or add_zero_attn"),
                                        (dict(add_zero_attn=True), "bias_k/bias_v or add_zero_attn"),
                                        (dict(kdim=6, vdim=6), "separate q/k/v projection weights")])
def test_out_proj_of_an_attention_that_runs_its_own_forward_is_unsupported_at_setup(kwargs, why) -> None:
    """Such an nn.MultiheadAttention always runs its own forward, which reads out_proj.weight itself: the
    masked out_proj can never run sparse. Set-up says so with the reason (one warning under sparse), not
    an epoch later as 'no training call went through spfde's kernels ... torch.compile'."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)
    model = nn.Sequential(mha)
    with pytest.warns(KernelWarning, match=r"run dense kernels"):
        exe = SparseExecution(model, _engine(model, {"0.out_proj": "0.out_proj.weight"}), "sparse")
    assert exe.unsupported == {"0.out_proj": f"the out_proj of an nn.MultiheadAttention that runs its own forward "
                                             f"({why}), which reads the weight directly"}
    assert not exe.layers and "forward" not in vars(mha.out_proj)
    exe.start_epoch()
    t, kv = torch.randn(3, 5, 8), torch.randn(3, 5, kwargs.get("kdim", 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second, misleading warning at the epoch's end
        mha(t, kv, kv, need_weights=False)[0].sum().backward()
        assert exe.choices() == {"0.out_proj": "dense"}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("length", [5, 30, 60])  # the native core, the matmul core, flash
def test_attention_path_returns_the_modules_own_layout(batch_first, length) -> None:
    """A dropout after the attention draws its mask in memory order and a view needs the strides:
    spfde's attention path must return what nn.MultiheadAttention returns, strides included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=batch_first))
    x = torch.randn((3, length, 16) if batch_first else (length, 3, 16))
    engine = _engine(model, {"0.in_proj_weight": "0.in_proj_weight"})
    ref = type(model[0]).forward(model[0], x, x, x, need_weights=False)[0]
    exe = SparseExecution(model, engine, "sparse")
    assert exe.layers
    out = model[0](x, x, x, need_weights=False)[0]
    _close(out, ref)
    assert out.stride() == ref.stride()


def test_auto_timing_inside_non_reentrant_checkpointing(monkeypatch) -> None:
    """auto times a layer's first call where it happens, here inside torch.utils.checkpoint
    (use_reentrant=False), whose saved-tensor hooks must not see the timing's graphs."""
    import torch.utils.checkpoint as cp

    monkeypatch.setattr(execution, "TINY_MACS", 0)
    torch.manual_seed(0)
    model = _mlp()
    plain = copy.deepcopy(model)
    engine = _engine(model, MLP_LAYERS)
    exe = SparseExecution(model, engine, "auto", "off")
    masks = {name: engine.masks[name] for name in MLP_LAYERS.values()}
    for name, p in plain.named_parameters():
        if name in masks:
            p.data.mul_(masks[name])
    x = torch.randn(8, 16)
    cp.checkpoint(model, x, use_reentrant=False).sum().backward()
    assert all(layer.decisions for layer in exe.layers.values())  # timed inside the checkpointed forward
    plain(x).sum().backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
        keep = masks.get(name, torch.ones_like(a, dtype=torch.bool))  # a dense choice's gradient is unmasked
        _close(a.grad * keep, b.grad * keep)


def test_a_compiled_model_is_reported_dense_with_one_warning_line(monkeypatch) -> None:
    """torch.compile runs the modules' own (dense) forward: the epoch's kernels field must say so."""
    from spfde.sparsity.kernels import common

    monkeypatch.setattr(common, "_WARNED", {})
    model = _mlp()
    exe = SparseExecution(model, _engine(model, MLP_LAYERS), "sparse")
    exe.start_epoch()
    model(torch.randn(8, 16)).sum().backward()
    assert exe.choices() == {"0": "sparse", "2": "sparse"}
    exe.start_epoch()
    compiled = torch.compile(model, backend="eager")
    with pytest.warns(KernelWarning, match="none of its training calls this epoch went through spfde's kernels"):
        compiled(torch.randn(8, 16)).sum().backward()
        assert exe.choices() == {"0": "dense", "2": "dense"}
    exe.start_epoch()
    model[0].weight.requires_grad_(False)  # a frozen layer with no call (the cache serves it) keeps its own
    model[2](torch.randn(8, 32)).sum().backward()
    assert exe.choices() == {"0": "sparse", "2": "sparse"}


def test_a_probe_pass_neither_times_nor_keeps_decisions(monkeypatch) -> None:
    """The memory model's one-sample forward (controller.memory_model) runs inside one_off(probe=True):
    its shapes must not take up a layer's decision keys, its checkpoint or timing."""
    monkeypatch.setattr(execution, "TINY_MACS", 0)
    timed = []
    monkeypatch.setattr(execution, "race", lambda dense, sparse: timed.append(1) or (1.0, 0.5))
    model = _mlp()
    exe = SparseExecution(model, _engine(model, MLP_LAYERS), "auto", "off")
    with exe.one_off(probe=True):
        model(torch.randn(1, 16))
    assert not timed and all(not layer.decisions for layer in exe.layers.values())
    model(torch.randn(8, 16)).sum().backward()  # a training call: timed, decided, reported
    assert timed and exe.choices() == {"0": "sparse", "2": "sparse"}
    with exe.one_off(probe=True):  # now the probe takes the layer's main decision
        model(torch.randn(1, 16)).sum().backward()
    assert all(len(layer.decisions) == 1 for layer in exe.layers.values())
    state = exe.state_dict()
    assert state["layers"]["0"]["used"] == "sparse"
    model2 = _mlp()
    exe2 = SparseExecution(model2, _engine(model2, MLP_LAYERS), "auto", "off")
    exe2.load_state_dict(state)  # a resumed run reports what the latest training call ran
    assert exe2.layers["0"].used == "sparse" and exe2.choices() == exe.choices()


def test_weights_written_outside_the_controller_run_dense_until_masked_again() -> None:
    """A dense checkpoint loaded after set-up: the sparse kernels, which read the nonzeros only, would
    compute another function than the dense layer until the engine masks the weights again."""
    torch.manual_seed(0)
    model = _mlp()
    engine = _engine(model, MLP_LAYERS)
    exe = SparseExecution(model, engine, "sparse")
    x = torch.randn(8, 16)
    model(x).sum().backward()
    assert exe.choices() == {"0": "sparse", "2": "sparse"}
    dense = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)
    plain = _mlp()
    plain.load_state_dict(dense)
    _close(model(x), plain(x))
    assert exe.choices() == {"0": "dense", "2": "dense"}
    engine.after_step()  # the controller's re-mask after the optimizer step
    _close(model(x), plain[4](F.relu(F.linear(F.relu(F.linear(x, plain[0].weight * engine.masks["0.weight"],
                                                                       plain[0].bias)),
                                                        plain[2].weight * engine.masks["2.weight"], plain[2].bias))))
    assert exe.choices() == {"0": "sparse", "2": "sparse"}
    with torch.no_grad():  # an in-place edit that keeps the pruned weights zero: checked once, sparse
        model[0].weight.mul_(0.5)
    model(x).sum().backward()
    assert exe.choices() == {"0": "sparse", "2": "sparse"} and engine.weight_issue("0.weight") is None
    # writes that bypass the version counter: a new storage (``.data =``, vector_to_parameters), a copy
    for write in (lambda m: setattr(m[0].weight, "data", dense["0.weight"].clone()),
                  lambda m: torch.nn.utils.vector_to_parameters(
                      torch.cat([dense[k].flatten() for k in m.state_dict()]), m.parameters())):
        engine.after_step()
        write(model)
        plain.load_state_dict(model.state_dict())
        _close(model(x), plain(x))
        assert exe.choices()["0"] == "dense"
    engine.after_step()
    twin = copy.deepcopy(model)  # the copy's weights are new tensors: checked, not trusted from the original's
    twin.load_state_dict(dense)
    _close(twin(x), plain(x))
