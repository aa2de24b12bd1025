"""Tests for the model registry (spfde.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from spfde.errors import SpfdeError
from spfde.models import create_model, list_models, model_info, register_model, shortcut_a

SMALL = ["resnet20", "resnet32", "resnet56", "vgg_small"]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def forward_block_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Block names in the order their forward actually runs (pre-hooks on each block)."""
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [
        modules[b].register_forward_pre_hook(lambda _m, _i, b=b: order.append(b)) for b in model.blocks()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def assert_blocks_partition(model: nn.Module) -> None:
    blocks = model.blocks()
    modules = dict(model.named_modules())
    assert len(blocks) == len(set(blocks)) >= 2
    for b in blocks:
        assert b in modules, f"block {b!r} is not a module name"
    for name, _ in model.named_parameters():
        owners = [b for b in blocks if name.startswith(b + ".")]
        assert len(owners) == 1, f"parameter {name} belongs to {owners}"


def analytic_flops(model: nn.Module, x: torch.Tensor) -> int:
    """2 * multiply-adds of every conv and linear, from the shapes seen in a forward."""
    total = 0

    def conv_hook(m: nn.Conv2d, _i, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += 2 * out.numel() * (m.in_channels // m.groups) * k

    def lin_hook(m: nn.Linear, _i, out):
        nonlocal total
        total += 2 * out.numel() * m.in_features

    hs = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hs.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hs.append(m.register_forward_hook(lin_hook))
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total


def test_registry_lists_models_and_info():
    names = list_models()
    assert names == sorted(names)
    assert {"resnet20", "resnet32", "resnet56", "resnet50", "vgg_small"} <= set(names)
    for n in names:
        info = model_info(n)
        assert info["description"] and "\n" not in info["description"]
        assert len(info["input_size"]) == 3
    assert model_info("resnet50")["input_size"] == [3, 224, 224]


def test_unknown_name_lists_available():
    with pytest.raises(SpfdeError) as e:
        create_model("resnet_nope")
    msg = str(e.value)
    assert "resnet_nope" in msg
    for n in list_models():
        assert n in msg
    with pytest.raises(SpfdeError):
        model_info("resnet_nope")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}, {"width": 0.0}, {"width": -1.0}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(SpfdeError):
        create_model("resnet20", **kwargs)


def test_register_model_decorator_and_duplicate():
    @register_model("_test_tiny_net")
    def _tiny(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
        """A tiny test net."""
        return nn.Linear(in_channels, num_classes)

    assert "_test_tiny_net" in list_models()
    assert model_info("_test_tiny_net")["description"] == "A tiny test net."
    assert create_model("_test_tiny_net", num_classes=4, in_channels=2).out_features == 4
    with pytest.raises(ValueError):
        register_model("_test_tiny_net")(_tiny)


@pytest.mark.parametrize(
    "name,expected", [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6)]
)
def test_cifar_resnet_param_counts(name, expected):
    assert abs(n_params(create_model(name)) - expected) / expected < 0.01


def test_cifar_resnet_option_a_shortcut_is_parameter_free():
    m = create_model("resnet32")
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 31  # 6n+1 convs for n=5; the head makes 32 layers, no shortcut convs
    assert all(c.bias is None for c in convs)
    assert n_params(m) > 0


def test_resnet32_2x_widths_and_flops():
    m = create_model("resnet32", num_classes=100, width=2.0).eval()
    assert m.stem[0].out_channels == 32 and m.head.in_features == 128 and m.head.out_features == 100
    # ~4x the params of width 1 (convs scale quadratically; only the stem's input side does not)
    ratio = n_params(m) / n_params(create_model("resnet32", num_classes=100))
    assert 3.8 < ratio < 4.0
    x = torch.zeros(1, 3, 32, 32)
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            m(x)
    flops = fc.get_total_flops()
    assert flops == analytic_flops(m, x)
    assert abs(flops - 551e6) / 551e6 < 0.01  # the figure the FLOPs ledger relies on


def test_width_rounds_channels():
    m = create_model("resnet20", width=0.3)
    assert m.stem[0].out_channels == round(16 * 0.3)
    assert m.head.in_features == round(64 * 0.3)
    v = create_model("vgg_small", width=1.5)
    assert v.head.in_features == 192


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("in_channels,num_classes,hw", [(3, 10, 32), (1, 10, 28), (1, 7, 8), (4, 100, 20)])
def test_output_shapes(name, in_channels, num_classes, hw):
    torch.manual_seed(0)
    m = create_model(name, num_classes=num_classes, in_channels=in_channels, width=0.5)
    y = m(torch.randn(2, in_channels, hw, hw))
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()


def test_shortcut_a_odd_sizes_and_zero_padding():
    x = torch.randn(2, 4, 7, 7)
    y = shortcut_a(x, 8, 2)
    assert y.shape == (2, 8, 4, 4)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 6:].abs().sum() == 0
    assert torch.equal(shortcut_a(x, 4, 1), x)


@pytest.mark.parametrize("name", SMALL)
def test_blocks_partition_parameters_in_forward_order(name):
    m = create_model(name, width=0.5)
    assert_blocks_partition(m)
    assert forward_block_order(m, torch.zeros(1, 3, 32, 32)) == m.blocks()
    assert m.blocks()[-1] == "head" and isinstance(m.head, nn.Linear)


def test_cifar_resnet_block_names():
    for depth, n in [(20, 3), (32, 5), (56, 9)]:
        m = create_model(f"resnet{depth}")
        expected = ["stem"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(n)] + ["head"]
        assert m.blocks() == expected
        assert isinstance(dict(m.named_modules())["stem.0"], nn.Conv2d)


def test_resnet50_params_blocks_and_small_forward():
    torch.manual_seed(0)
    m = create_model("resnet50", num_classes=1000)
    assert abs(n_params(m) - 25.6e6) / 25.6e6 < 0.01
    expected = ["stem"] + [f"layer{s}.{i}" for s, d in enumerate((3, 4, 6, 3), start=1) for i in range(d)]
    assert m.blocks() == expected + ["head"]
    assert_blocks_partition(m)
    # v1.5: the stride of a downsampling bottleneck sits on its 3x3 conv
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)
    m.eval()
    x = torch.randn(1, 3, 64, 64)
    assert forward_block_order(m, x) == m.blocks()
    with torch.no_grad():
        assert m(x).shape == (1, 1000)


def test_resnet50_width_and_channels():
    m = create_model("resnet50", num_classes=5, in_channels=1, width=0.25)
    assert m.head.in_features == 512  # 512 * 4 * 0.25
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", SMALL + ["resnet50"])
def test_init_deterministic_under_seed(name):
    kw = {"width": 0.25} if name == "resnet50" else {}
    torch.manual_seed(123)
    a = create_model(name, **kw).state_dict()
    torch.manual_seed(123)
    b = create_model(name, **kw).state_dict()
    torch.manual_seed(124)
    c = create_model(name, **kw).state_dict()
    assert same_state(a, b)
    assert not same_state(a, c)


def test_init_scheme():
    m = create_model("resnet20")
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    w = m.layer3[1].conv1.weight  # kaiming normal, fan_out: std = sqrt(2 / (C_out * 9))
    expected_std = (2.0 / (w.shape[0] * 9)) ** 0.5
    assert abs(w.std().item() - expected_std) / expected_std < 0.05
    assert abs(w.mean().item()) < 0.1 * expected_std


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_matches_and_backward_reaches_all_params(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=5, width=0.5)
    x = torch.randn(2, 3, 16, 16)
    y = m(x)
    y.sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
    m.eval()
    with torch.no_grad():
        ref = m(x)
        mc = m.to(memory_format=torch.channels_last)
        out = mc(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_flop_counter_matches_analytic_on_28x28():
    m = create_model("resnet20", in_channels=1).eval()
    x = torch.zeros(1, 1, 28, 28)
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            m(x)
    assert fc.get_total_flops() == analytic_flops(m, x) > 0


# --------------------------------------------------------------------------------------------
# your own model: model.name = "package.module:callable" (+ model.kwargs)

USER_MODELS = '''
import torch
from torch import nn


def make_net(num_classes, in_channels, hidden=8):
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))


class Net(nn.Module):
    def __init__(self, num_classes, width=1.0, depth=1):
        super().__init__()
        self.width, self.depth = width, depth
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def no_args():
    return nn.Linear(3, 2)


def not_a_module(num_classes):
    return [num_classes]


def broken(num_classes):
    raise RuntimeError("boom")


def passes_on(num_classes, **extra):
    return nn.Linear(3, num_classes, **extra)


from os import system as reexported  # noqa: E402  (a user module re-exporting a stdlib callable)

CALLED = []


class NotAModule:
    def __init__(self, num_classes):
        CALLED.append("NotAModule")


def annotated_int(num_classes) -> int:
    CALLED.append("annotated_int")
    return num_classes
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_pkg.models"
    import sys

    for name in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[name]


def test_an_import_path_builds_the_users_model_with_what_its_signature_takes(user_pkg):
    m = create_model(f"{user_pkg}:make_net", num_classes=7, in_channels=2, width=3.0, hidden=5)
    assert m[0].in_channels == 2 and m[0].out_channels == 5 and m[-1].out_features == 7
    net = create_model(f"{user_pkg}:Net", num_classes=4, in_channels=2, width=0.5, depth=3)
    assert (net.fc.out_features, net.width, net.depth) == (4, 0.5, 3)  # no in_channels in Net's signature
    assert isinstance(create_model(f"{user_pkg}:no_args", num_classes=4), nn.Linear)
    from spfde.errors import ConfigError
    from spfde.models import resolve_model

    with pytest.raises(ConfigError, match=r"'model.kwargs.in_channels'.*from the dataset"):
        resolve_model(f"{user_pkg}:make_net", {"in_channels": 3})


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("no_such_pkg.models:make_net", {}, r"cannot import module 'no_such_pkg.models'.*PYTHONPATH"),
    ("{pkg}:nope", {}, r"has no attribute 'nope'"),
    ("{pkg}:torch", {}, r"is a module, not a function or class"),
    ("{pkg}:not_a_module", {}, r"returned an object of type list, not a torch.nn.Module"),
    ("{pkg}:broken", {}, r"failed \(RuntimeError: boom\)"),
    ("{pkg}:make_net", {"hiden": 3}, r"'model.kwargs.hiden': model.name = .* has no argument 'hiden'; it accepts: "
                                     r"hidden$"),
    ("{pkg}:passes_on", {"foo": 1}, r"passes_on\(num_classes=10, foo=1\) failed \(TypeError: .*foo.*model.kwargs"),
    (":make_net", {}, r"not an import path"),
])
def test_a_bad_import_path_is_a_config_error_naming_model_name(user_pkg, name, kwargs, match):
    from spfde.errors import ConfigError

    with pytest.raises(ConfigError, match=match) as e:
        create_model(name.format(pkg=user_pkg), **kwargs)
    assert "model.name" in str(e.value)


def test_model_kwargs_is_a_config_field():
    from spfde.config import load_config

    cfg = load_config(None, ["model.name=my_pkg.models:make_net", "model.kwargs.hidden=16",
                             "model.kwargs.act=gelu"])
    assert cfg.model.kwargs == {"hidden": 16, "act": "gelu"}
    assert load_config(None, []).model.kwargs == {}


# ---- audit H2: model.kwargs a model does not take is one config error, before any data loads


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny", "vgg_small"])
def test_registry_model_kwargs_it_does_not_take_are_a_config_error(name):
    from spfde.errors import ConfigError
    from spfde.models import resolve_model

    for call in (lambda: resolve_model(name, {"foo": 1}), lambda: create_model(name, foo=1)):
        with pytest.raises(ConfigError, match=r"^config field 'model.kwargs.foo': model.name = .* has no argument "
                                              r"'foo'; it accepts none") as e:
            call()
        assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_registered_model_kwargs_are_checked_against_its_factory():
    from spfde.errors import ConfigError
    from spfde.models import resolve_model
    from spfde.models.registry import _REGISTRY

    @register_model("_test_kw_model")
    def _factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, depth: int = 1,
                 act: str = "relu") -> nn.Module:
        return nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)], nn.Linear(4, num_classes))

    try:
        assert len(create_model("_test_kw_model", num_classes=3, depth=2)) == 3
        with pytest.raises(ConfigError, match=r"'model.kwargs.dept'.*has no argument 'dept' \(also 'x'\); it accepts: "
                                              r"depth, act$"):
            resolve_model("_test_kw_model", {"dept": 2, "x": 0})
        with pytest.raises(ConfigError, match=r"'model.kwargs': model.name = '_test_kw_model' refused depth='2' "
                                              r"\(.*\); it accepts: act, depth"):
            create_model("_test_kw_model", depth="2")  # the factory's own TypeError on a wrong-typed value
    finally:
        del _REGISTRY["_test_kw_model"]


def test_cli_model_kwargs_a_registry_model_does_not_take_exit_2(tmp_path):
    from helpers import error_lines, run_main

    code, _, err = run_main("train", "-c", "fmnist-demo", "--set", "data.subset=64", "--set", "model.kwargs.foo=1",
                            "-o", str(tmp_path / "r"), "-q")
    assert code == 2 and "Traceback" not in err, err
    [line] = error_lines(err)
    assert "model.kwargs.foo" in line and "resnet20" in line and "accepts" in line
    assert not (tmp_path / "r").exists()


# ---- audit M2: a config names callables, so stdlib ones and non-modules are refused before a call


@pytest.mark.parametrize("name", ["os:system", "os.path:join", "subprocess:run", "builtins:eval", "shutil:rmtree",
                                  "posix:system"])
def test_stdlib_and_builtin_callables_are_refused_before_they_are_called(name, monkeypatch):
    import os

    from spfde.errors import ConfigError

    calls: list[tuple] = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    with pytest.raises(ConfigError, match=r"standard library or builtins") as e:
        create_model(name, num_classes=2)
    assert "model.name" in str(e.value) and e.value.exit_code == 2 and not calls


def test_a_reexported_stdlib_callable_is_refused(user_pkg):
    from spfde.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'posix' is part of Python's standard library"):
        create_model(f"{user_pkg}:reexported", num_classes=2)


@pytest.mark.parametrize(("attr", "match"), [
    ("NotAModule", r"the class NotAModule, not a torch.nn.Module subclass"),
    ("annotated_int", r"annotated to return int, not a torch.nn.Module"),
])
def test_a_callable_that_cannot_return_a_module_is_refused_before_the_call(user_pkg, attr, match):
    import importlib

    from spfde.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        create_model(f"{user_pkg}:{attr}", num_classes=2)
    assert importlib.import_module(user_pkg).CALLED == []


def test_third_party_callables_still_work():
    # torch is no stdlib: a torch module class is a fine model (and its kwargs are checked)
    assert isinstance(create_model("torch.nn:Identity"), nn.Identity)
