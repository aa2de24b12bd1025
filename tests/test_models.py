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
    ("{pkg}:make_net", {"hiden": 3}, r"make_net\(num_classes=10, in_channels=3, hiden=3\) failed.*model.kwargs"),
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
