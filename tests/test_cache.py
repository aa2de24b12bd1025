"""The frozen-prefix activation cache (issue 13 item 4): exactness, guards, ledger, plan, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spfde import SpFDE
from spfde.accounting.flops import modules_forward_flops, per_sample_flops
from spfde.config import load_config
from spfde.errors import ConfigError
from spfde.freezing import cache as cache_mod
from spfde.freezing.blocks import resolve_blocks
from spfde.freezing.cache import (
    ActivationCache,
    Layout,
    build_cache,
    fill_chunks,
    fingerprint,
    mix_permutation,
    served_samples,
    static_reasons,
)
from spfde.sparsity.kernels import native
from spfde.train import Trainer
from spfde.utils import state_dict_sha256

# --------------------------------------------------------------------------------------- models


class Net(nn.Module):
    """stem -> (code between blocks: a row of ones appended, as a ViT appends a class token) -> mid
    -> mid2 -> head with dropout. ``skip``: the output also reads the stem's output (a long skip)."""

    def __init__(self, prefix_dropout: float = 0.0, skip: bool = False, batch_stats: bool = False,
                 noise: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=not batch_stats),
                                 nn.ReLU(), nn.Dropout(prefix_dropout))
        self.mid2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(8, 4))
        self.skip, self.noise = skip, noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        s = torch.cat([s, s.new_ones(s.shape[0], s.shape[1], 1, s.shape[3])], dim=2)
        if self.noise:
            s = s + 1e-3 * torch.rand_like(s)
        out = self.head(self.mid2(self.mid(s)))
        return out + s.mean((1, 2, 3))[:, None] if self.skip else out


BLOCKS = ["stem", "mid", "mid2", "head"]
N = 96


def dataset(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def config(mode: str, sieving: dict | None = None, **freezing) -> dict:
    return {"seed": 0, "data": {"augment": False, "batch_size": 16}, "train": {"epochs": 6, "interval": 1},
            "optim": {"lr": 0.05},
            "sparsity": {"method": "mest", "target": 0.5, "search_end": 4},
            "freezing": {"target": 0.3, "tfrz": 2, "cache": mode, **freezing},
            "sieving": sieving or {"method": "circular", "ratio": 0.25, "update_ratio": 0.5}}


def user_loop(mode: str, provider: bool = False, make: Callable[[], nn.Module] = Net, noise: bool = False,
              sieving: dict | None = None, **freezing) -> tuple[str, list[dict], torch.Tensor, SpFDE]:
    """A user's own loop over the controller, the forward wrapped in ``ctl.cache.batch(x, idx)``.

    72 of 96 samples active per epoch in batches of 16: a short last batch of 8 every epoch, and
    the circular sieve returns samples at every update.
    """
    torch.manual_seed(0)
    model = make()
    x, y = dataset()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = SpFDE(model, opt, config(mode, sieving, **freezing), train_size=N, example_input=x[:2], blocks=BLOCKS)
    if provider:
        ctl.cache.inputs = lambda idx: x[idx]
    loader = DataLoader(TensorDataset(x, y, torch.arange(N)), batch_size=16, sampler=ctl.sampler)
    g = torch.Generator().manual_seed(2)
    rows = []
    for epoch in range(6):
        ctl.start_epoch(epoch)
        model.train()
        for xb, yb, ib in loader:
            if noise:  # a random transform the config does not know about
                xb = xb + 0.01 * torch.randn(xb.shape, generator=g)
            with ctl.cache.batch(xb, ib):
                logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ctl.before_step()
            opt.step()
            ctl.after_step(logits, yb, ib)
        rows.append(ctl.end_epoch())
    # sparse kernels install their own forward on masked layers (sparsity.kernels); the cache leaves none
    assert not any("forward" in m.__dict__ and "_spfde_kernel" not in m.__dict__ for m in model.modules()), \
        "a forward override was left behind"
    return state_dict_sha256(model.state_dict()), rows, torch.get_rng_state(), ctl


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference():
    return user_loop("off")


# --------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("provider", [False, True], ids=["filled-from-batches", "filled-at-freeze"])
def test_user_loop_cache_bit_identical(reference, provider):
    """Cache on/off give bit-identical weights and RNG streams (dropout in the head draws from the
    global RNG), with code between blocks, sieved samples returning and a short last batch."""
    sha, rows, rng, ctl = user_loop("on", provider=provider)
    ref_sha, ref_rows, ref_rng, _ = reference
    assert max(len(r["frozen_blocks"]) for r in rows) >= 2, "the plan must freeze and extend at least once"
    assert sha == ref_sha
    assert torch.equal(rng, ref_rng)
    served = [r["cache_served_steps"] for r in rows]
    assert sum(served) > 0 and all(r["cache_served_steps"] <= 4 for r in rows)  # the short batch runs for real
    if provider:  # every epoch with a frozen block is served whole (4 full batches), fills charged once
        assert all(s == 4 for s, r in zip(served, rows, strict=True) if r["frozen_blocks"])
    else:  # the first epoch after a freeze runs for real and fills the cache; returned samples run for real
        first = next(i for i, r in enumerate(rows) if r["frozen_blocks"])
        assert served[first] == 0 and sum(served[first + 1:]) > 0
    for r, ref in zip(rows, ref_rows, strict=True):
        assert r["bp_flops_saved"] == ref["bp_flops_saved"]  # freezing's own saving is unchanged
        saved = r["fwd_flops_saved"] - r["cache_fill_flops"]
        assert abs(ref["train_flops"] - r["train_flops"] - saved) <= 2, "the ledger took off what it says"
        assert (r["fwd_flops_saved"] > 0) == (r["cache_served_steps"] > 0)
        if r["cache_served_steps"]:
            assert r["cached_blocks"] == [b for b in ("stem", "mid", "mid2") if b in r["frozen_blocks"]]
    assert ref_rows[-1]["cache_status"].startswith("off: freezing.cache is off")


def test_trainer_cache_bit_identical_and_plan_exact(tmp_path):
    """The built-in trainer on Fashion-MNIST (channels_last, circular sieving, a short last batch):
    same weights_sha256 with the cache on and off; the ledger equals `planned_flops(with_cache=True)`."""
    common = ["data.name=fashion_mnist", "data.subset=400", "data.test_subset=100", "data.batch_size=64",
              "data.augment=false", "model.name=resnet20", "model.width=0.25", "optim.lr=0.05", "train.epochs=5",
              "train.interval=1", "train.threads=1", "logging.progress=false", "sparsity.method=mest",
              "sparsity.target=0.8", "sparsity.search_end=3", "freezing.target=0.1", "freezing.tfrz=1",
              "sieving.method=circular", "sieving.ratio=0.2"]
    out = {}
    for mode in ("off", "on"):
        cfg = load_config(None, [*common, f"freezing.cache={mode}"])
        tr = Trainer(cfg, tmp_path / mode, quiet=True)
        tr.out.mkdir()
        plan = tr.ctl.planned_flops(with_cache=mode == "on")
        summary = tr.run()
        out[mode] = summary, metrics(tmp_path / mode), plan
    (s_off, r_off, p_off), (s_on, r_on, p_on) = out["off"], out["on"]
    assert s_on["weights_sha256"] == s_off["weights_sha256"]
    assert s_on["final_test_acc"] == s_off["final_test_acc"]
    assert sum(r["cache_served_steps"] for r in r_on) > 0 and r_on[-1]["cached_blocks"]
    assert all(r["cache_served_steps"] == 0 for r in r_off)
    assert s_on["train_flops"] < s_off["train_flops"]
    assert not p_off["cache_assumed"] and p_on["cache_assumed"]
    assert [r["train_flops"] for r in r_on] == pytest.approx(p_on["epoch_flops"], rel=1e-9, abs=2)
    assert [r["train_flops"] for r in r_off] == pytest.approx(p_off["epoch_flops"], rel=1e-9, abs=2)


@pytest.mark.slow
def test_trainer_vit_cache_bit_identical(tmp_path):
    """The ViT preset (class token concatenated after patch_embed): same weights with the cache."""
    from spfde.models import list_models

    if "vit_tiny" not in list_models():
        pytest.skip("no vit_tiny model in this tree")
    common = ["data.name=fashion_mnist", "data.subset=256", "data.test_subset=64", "data.batch_size=64",
              "data.augment=false", "data.channels=null", "model.name=vit_tiny", "model.width=0.5",
              "optim.lr=0.01", "train.epochs=4", "train.interval=1", "train.threads=1", "logging.progress=false",
              "sparsity.method=mest", "sparsity.target=0.5", "sparsity.search_end=2", "freezing.target=0.05",
              "freezing.tfrz=1", "sieving.method=circular", "sieving.ratio=0.25"]
    out = {}
    for mode in ("off", "on"):
        tr = Trainer(load_config(None, [*common, f"freezing.cache={mode}"]), tmp_path / mode, quiet=True)
        tr.out.mkdir()
        out[mode] = tr.run(), metrics(tmp_path / mode)
    assert out["on"][0]["weights_sha256"] == out["off"][0]["weights_sha256"]
    assert sum(r["cache_served_steps"] for r in out["on"][1]) > 0


@pytest.mark.parametrize("scheme", ["single_shot_resume", "periodic"])
def test_defrost_drops_the_rows_and_stays_exact(reference, scheme):
    sha, rows, _, ctl = user_loop("on", provider=True, scheme=scheme, tfrz="auto", target=0.1)
    ref = user_loop("off", scheme=scheme, tfrz="auto", target=0.1)
    assert sha == ref[0]
    frozen = [len(r["frozen_blocks"]) for r in rows]
    assert any(a > b for a, b in zip(frozen, frozen[1:], strict=False)), "the scheme defrosts"
    assert sum(r["cache_served_steps"] for r in rows) > 0
    assert any("defrosted" in n for n in ctl.cache.notes)


# --------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize("kind, reason", [
    ("skip", "changes the model's output"),
    ("noise_in_model", "draws random numbers"),
    ("prefix_dropout", "Dropout(p=0.2)"),
    ("batch_stats", "track_running_stats=False"),
])
def test_auto_stays_off_where_not_exact(reference, kind, reason):
    """Each guard turns `auto` off with the reason (and the run equals the uncached one); `on` errors."""
    make = {"skip": lambda: Net(skip=True), "noise_in_model": lambda: Net(noise=True),
            "prefix_dropout": lambda: Net(prefix_dropout=0.2), "batch_stats": lambda: Net(batch_stats=True)}[kind]
    sha, rows, rng, _ = user_loop("auto", make=make)
    ref_sha, _, ref_rng, _ = user_loop("off", make=make)
    assert sha == ref_sha and torch.equal(rng, ref_rng)
    assert all(r["cache_served_steps"] == 0 and r["fwd_flops_saved"] == 0 for r in rows)
    assert any(reason in r["cache_status"] for r in rows), [r["cache_status"] for r in rows]
    with pytest.raises(ConfigError, match="freezing.cache' = 'on'"):
        user_loop("on", make=make)


def test_a_changing_input_switches_the_cache_off(reference):
    """A random transform the config does not declare: each served batch's inputs are checked
    against the fingerprints of the cached rows, so the cache turns itself off before serving."""
    every = {"method": "none"}  # every batch full: the epoch after the fill tries to serve them all
    sha, rows, _, ctl = user_loop("auto", noise=True, provider=True, sieving=every)
    ref_sha = user_loop("off", noise=True, sieving=every)[0]
    assert sha == ref_sha
    assert all(r["cache_served_steps"] == 0 for r in rows)
    assert "input differs" in rows[-1]["cache_status"]
    assert any("not using the input provider" in n for n in ctl.cache.notes)
    with pytest.raises(ConfigError, match="input differs"):
        user_loop("on", noise=True, sieving=every)
    # the same loop without the noise is served from the epoch after the fill on
    rows = user_loop("on", sieving=every)[1]
    first = next(i for i, r in enumerate(rows) if r["frozen_blocks"])
    assert rows[first]["cache_served_steps"] == 0 and rows[first + 1]["cache_served_steps"] == 6


def test_memory_limit_and_static_reasons():
    x, _ = dataset()
    sha, rows, _, ctl = user_loop("auto", cache_max_bytes=1000)
    assert all(r["cache_served_steps"] == 0 for r in rows)
    assert "above freezing.cache_max_bytes" in rows[-1]["cache_status"]
    # `on` has no limit of its own, but one the user sets is kept: refused, not silently exceeded
    assert any(r["cache_served_steps"] for r in user_loop("on")[1])
    with pytest.raises(ConfigError, match="above freezing.cache_max_bytes"):
        user_loop("on", cache_max_bytes=1000)
    assert static_reasons(augment=False, world_size=1, compiled=False) == []
    assert "distributed" in static_reasons(augment=False, world_size=2, compiled=False)[0]
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = config("auto")
    cfg["data"]["augment"] = True
    ctl = SpFDE(model, opt, cfg, train_size=N, example_input=x[:2], blocks=BLOCKS)
    assert ctl.cache.status.startswith("off: data.augment is true")
    cfg["freezing"]["cache"] = "on"
    other = Net()
    with pytest.raises(ConfigError, match="data.augment is true"):
        SpFDE(other, torch.optim.SGD(other.parameters(), lr=0.1), cfg, train_size=N, example_input=x[:2],
              blocks=BLOCKS)
    cfg = load_config(None, ["freezing.cache=on", "data.augment=false"])
    with pytest.raises(ConfigError, match="distributed"):
        build_cache(model, model, ctl.blocks, ctl.plan, cfg, N, world_size=2)
    # `on` without freezing is allowed (nothing to serve) and the plan then assumes nothing
    none = load_config(None, ["freezing.cache=on", "data.augment=false"])
    assert build_cache(model, model, None, None, none, N, 1).status.startswith("off: no block freezes")


# --------------------------------------------------------------------------------------- pure core
def test_fingerprint_exact_and_batch_independent():
    x = torch.randn(33, 3, 7, 5)
    fp = fingerprint(x)
    assert fp.shape == (33, 2) and fp.dtype == torch.int64
    assert torch.equal(fingerprint(x[5:9]), fp[5:9])                  # another batch, same rows
    assert torch.equal(fingerprint(x.contiguous(memory_format=torch.channels_last)), fp)  # layout-free
    assert torch.equal(fingerprint(x, budget_bytes=1), fp)             # chunked: same numbers
    y = x.clone()
    y[3, 1, 2, 2] = torch.nextafter(y[3, 1, 2, 2], torch.tensor(float("inf")))  # one ulp
    changed = (fingerprint(y) != fp).any(1)
    assert changed.tolist() == [i == 3 for i in range(33)]
    assert not (fingerprint(x.flip(3)) == fp).all(1).any()            # a flip changes every sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.uint8])
def test_native_fingerprint_is_the_pytorch_sums(monkeypatch, dtype):
    """The native library's sums (when it built) are the pure-PyTorch path's, bit for bit: fingerprints
    taken with and without it may be compared (odd byte counts, a sliced batch, channels_last)."""
    if native.load(quiet=True) is None:
        pytest.skip("native library not built")
    x = (torch.randint(0, 256, (17, 3, 5, 5), dtype=torch.uint8) if dtype == torch.uint8
         else torch.randn(17, 3, 5, 5).to(dtype) * 1e3)
    x[0] = x[1]  # equal samples, equal fingerprints
    views = [x, x[3:11], x.contiguous(memory_format=torch.channels_last), x[:, 1:]]
    calls = []
    real = cache_mod._native
    monkeypatch.setattr(cache_mod, "_native", lambda: calls.append(1) or real())
    got = [fingerprint(v) for v in views]
    assert len(calls) == len(views)  # the native path ran
    monkeypatch.setattr(cache_mod, "_native", lambda: None)
    for v, fp in zip(views, got, strict=True):
        assert torch.equal(fp, fingerprint(v)) and torch.equal(fp, fingerprint(v, budget_bytes=1))
    assert torch.equal(got[0][0], got[0][1]) and not torch.equal(got[0][1], got[0][2])


@pytest.mark.parametrize("words", [True, False])
def test_fingerprint_of_odd_byte_counts_and_the_byte_wise_path(monkeypatch, words):
    """uint8 images with an odd byte count (a zero byte pads the last word), and samples too long for
    the word-wise sums (summed byte by byte): still batch-independent, and one changed byte shows."""
    if not words:
        monkeypatch.setattr(cache_mod, "_MAX_WORDS", 4)
    x = torch.randint(0, 256, (9, 3, 5, 5), dtype=torch.uint8)  # 75 bytes per sample
    fp = fingerprint(x)
    assert torch.equal(fingerprint(x[2:5]), fp[2:5]) and torch.equal(fingerprint(x, budget_bytes=1), fp)
    y = x.clone()
    y[4, 2, 4, 4] ^= 1  # the last byte: the one beside the pad
    assert ((fingerprint(y) != fp).any(1)).tolist() == [i == 4 for i in range(9)]


def test_chunks_permutation_and_served_samples():
    chunks = list(fill_chunks(torch.arange(10), 4))
    assert [c.tolist() for c, _ in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 8, 8]]
    assert [n for _, n in chunks] == [4, 4, 2]
    for b in (2, 3, 8, 9):
        perm = mix_permutation(b)
        assert perm.numel() == b and (perm != torch.arange(b)).any()
    assert served_samples(72, 16, 16) == 64 and served_samples(64, 16, 16) == 64
    assert served_samples(10, 16, 10) == 10 and served_samples(20, 16, 10) == 0


def test_layout_keeps_channels_last_through_the_gather():
    rows = torch.randn(10, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    layout = Layout.of(rows)
    store = layout.empty(10).copy_(rows)
    out = layout.gather(store, torch.tensor([7, 2, 2]))
    assert out.stride() == rows[:3].stride() and torch.equal(out, rows[[7, 2, 2]])
    assert Layout.of(torch.randn(2, 4, 3, 3)) != layout
    assert layout.conform(torch.randn(2, 4, 3, 3)).is_contiguous(memory_format=torch.channels_last)


def test_ledger_charges_a_cached_block_no_forward():
    layers = {"a": 100, "b.conv": 50, "c": 10}
    density = {"a": 0.5}
    plain = per_sample_flops(layers, density, frozen={"a", "b"})
    cached = per_sample_flops(layers, density, frozen={"a", "b"}, cached={"a", "b"})
    assert plain["backward"] == cached["backward"] == 2 * 10
    assert plain["forward"] == 50 + 50 + 10 and cached["forward"] == 10
    assert modules_forward_flops(layers, density, {"a", "b"}) == 100


def test_cache_direct_use_without_a_controller():
    """The stateful object on its own: freeze by hand, serve, and the model is untouched after."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 2))
    x, _ = dataset(8)
    blocks = resolve_blocks(net, [["0"], ["2"], ["4"]], x[:1])
    for p in net[0].parameters():
        p.requires_grad_(False)
    cache = ActivationCache(net, blocks, "on", 8)
    cache.inputs = lambda idx: x[idx]
    cache.set_frozen(1)
    with torch.no_grad():
        want = net(x)
        with cache.batch(x, torch.arange(8)):
            got = net(x)
    assert torch.equal(got, want) and cache.step_modules() == frozenset({"0"})
    assert cache.pop_fills() == [(8, frozenset({"0"}))]
    assert cache.end_epoch()["cache_served_steps"] == 1
    assert "forward" not in net[0].__dict__


class TinyViT(nn.Module):
    """Patch embedding, a class token on the root module concatenated between blocks, two encoder
    layers, a head on the class token (the layout of a ViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def test_vit_layout_with_a_root_parameter_in_the_first_block():
    """A block that lists a root parameter (``cls_token``, as resolve_blocks records it) and code
    between blocks: served outputs equal the real model's at each boundary, extended from the rows."""
    from spfde.freezing.blocks import Block

    torch.manual_seed(0)
    net = TinyViT().train()
    mods = [n for n, _ in net.named_modules()]
    blocks = [Block(name, [name], [m for m in mods if m == name or m.startswith(name + ".")] + extra, [])
              for name, extra in (("patch_embed", ["cls_token"]), ("layers.0", []), ("layers.1", []),
                                  ("head", []))]
    x, _ = dataset(48)
    cache = ActivationCache(net, blocks, "on", 48)
    cache.inputs = lambda idx: x[idx]
    for k, frozen in ((1, [net.patch_embed, net.cls_token]), (2, [net.layers[0]])):
        for p in frozen:
            for q in (p.parameters() if isinstance(p, nn.Module) else [p]):
                q.requires_grad_(False)
        cache.set_frozen(k)
        for s in range(0, 48, 16):
            idx = torch.arange(s, s + 16)
            want = net(x[idx])
            with cache.batch(x[idx], idx):
                got = net(x[idx])
            assert torch.equal(got, want)
            assert "cls_token" in cache.step_modules()
        fills = cache.pop_fills()
        assert [n for n, _ in fills] == [48] and ("layers.0" in fills[0][1]) == (k == 2)
    assert cache.status.startswith("on: blocks 'patch_embed'..'layers.0'")


# --------------------------------------------------------------------------------------- config and resume
def test_bare_on_off_in_yaml_are_the_strings(tmp_path):
    """YAML 1.1 reads a bare `off` as false: `freezing.cache: off` and `train.amp=off` still work."""
    (tmp_path / "c.yaml").write_text("freezing:\n  cache: off\ntrain:\n  channels_last: on\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.amp=off"])
    assert (cfg.freezing.cache, cfg.train.channels_last, cfg.train.amp) == ("off", "on", "off")
    with pytest.raises(ConfigError, match="freezing.cache"):
        load_config(None, ["freezing.cache=maybe"])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spfde.cli", *args], capture_output=True, text=True)


def test_flops_plan_says_whether_it_assumes_the_cache():
    """`spfde flops` (planned_run) assumes the cache under `on` only, and then plans fewer FLOPs."""
    from spfde.planning import planned_run

    plans = {mode: planned_run(load_config(None, [*RESUME, f"freezing.cache={mode}"]))
             for mode in ("on", "auto", "off")}
    assert plans["on"]["flops"]["cache_assumed"] and not plans["auto"]["flops"]["cache_assumed"]
    assert plans["on"]["flops"]["train_flops"] < plans["auto"]["flops"]["train_flops"]
    assert plans["auto"]["flops"] == plans["off"]["flops"]
    assert plans["on"]["plan"] == plans["off"]["plan"], "the cache never changes the freezing plan"


RESUME = ["data.name=synthetic", "data.synthetic_size=256", "data.image_size=16", "data.channels=3",
          "data.batch_size=32", "data.eval_batch_size=256", "data.augment=false", "model.name=resnet20",
          "model.width=0.25", "optim.lr=0.05", "train.epochs=6", "train.interval=1", "train.threads=1",
          "logging.progress=false", "sparsity.method=mest", "sparsity.target=0.8", "sparsity.search_end=3",
          "freezing.target=0.15", "freezing.tfrz=1", "sieving.method=circular", "sieving.ratio=0.25",
          "freezing.cache=on"]


@pytest.mark.slow
def test_sigkill_and_resume_with_the_cache(tmp_path):
    """The cache is derived data: a run killed while it serves, resumed, rebuilds it and ends
    bit-identical to an uninterrupted run."""
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    args = ["--config", str(tmp_path / "c.yaml"), "--quiet"] + [a for kv in RESUME for a in ("--set", kv)]
    ref = cli("train", "--out", str(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr
    ref_sum = json.loads((tmp_path / "ref" / "summary.json").read_text())
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "spfde.cli", "train", "--out", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break  # epochs 0-2 done: the cache is serving blocks
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = cli("train", "--resume", str(run), "--quiet")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_sha256"] == ref_sum["weights_sha256"]
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == list(range(6))
    assert rows[-1]["cache_served_steps"] > 0 and rows[-1]["cached_blocks"]
    # the rebuild is charged: the epoch the run resumed in filled more rows than the same epoch uninterrupted
    ref_rows = metrics(tmp_path / "ref")
    assert any(a["cache_fill_flops"] > b["cache_fill_flops"] for a, b in zip(rows, ref_rows, strict=True))
