"""Transformers through the whole framework: prunable attention weights, every training FLOP counted,
blocks found for transformer layouts, the ViT preset, the loss criterion for sieving (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spfde import SpFDE
from spfde.accounting.flops import forward_flops_breakdown, layer_forward_flops
from spfde.accounting.trace import attention_unit, trace_forward
from spfde.cli import main
from spfde.config import from_dict
from spfde.distributed import StatusGatherer
from spfde.errors import ConfigError, SpfdeError
from spfde.freezing import FreezePlan, Freezer, resolve_blocks
from spfde.models import create_model
from spfde.sieving import LossTracker
from spfde.sparsity import build_sparsity, find_prunable, keep_count

E, T, H, FEAT, CLASSES = 8, 5, 2, 4, 3


# --------------------------------------------------------------------------------------- models
def _split(x: torch.Tensor, qkv: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, c = x.shape
    q, k, v = qkv(x).reshape(b, n, 3, H, c // H).permute(2, 0, 3, 1, 4)
    return q, k, v


class HandAttention(nn.Module):
    """QKᵀ and AV written as matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _split(x, self.qkv)
        a = (q @ k.transpose(-2, -1) / (E // H) ** 0.5).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(x.shape))


class SdpaAttention(HandAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _split(x, self.qkv)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape))


class MhaAttention(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Seq(nn.Module):
    """(batch, T, FEAT) -> embed -> attention (+ residual) -> mean over tokens -> head."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(FEAT, E)
        self.attn = attn
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean(1))


def seq_data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, FEAT, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def bert_layer() -> nn.Module:
    pytest.importorskip("transformers")
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    c = BertConfig(hidden_size=E, num_attention_heads=H, intermediate_size=2 * E, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    c._attn_implementation = "sdpa"
    return BertLayer(c)


def attention_flavour(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "bert":
        return Seq(bert_layer())
    return Seq({"hand": HandAttention, "sdpa": SdpaAttention, "mha": MhaAttention}[name]())


def analytic_forward(name: str) -> dict[str, int]:
    """Per-sample forward FLOPs by hand: a (m x k) @ (k x n) matmul is 2·m·k·n."""
    lin = lambda i, o, rows=T: 2 * rows * i * o  # noqa: E731
    attention = 2 * 2 * T * T * E  # QKᵀ and AV over H heads of E/H dims
    out = {"embed": lin(FEAT, E)}
    if name == "bert":
        pre = "attn.attention."
        for part in ("self.query", "self.key", "self.value"):
            out[pre + part] = lin(E, E)
        out["attn.attention.self.[attention]"] = attention
        out["attn.attention.output.dense"] = lin(E, E)
        out["attn.intermediate.dense"] = lin(E, 2 * E)
        out["attn.output.dense"] = lin(2 * E, E)
    elif name == "mha":
        out["attn.mha.in_proj_weight"] = lin(E, 3 * E)
        out["attn.mha.[attention]"] = attention
        out["attn.mha.out_proj"] = lin(E, E)
    else:
        out["attn.qkv"] = lin(E, 3 * E)
        out["attn.[attention]"] = attention
        out["attn.proj"] = lin(E, E)
    out["head"] = lin(E, CLASSES, rows=1)
    return out


def controller(model: nn.Module, x: torch.Tensor, **sections) -> SpFDE:
    cfg = {"train": {"epochs": 3, "interval": 1}, "data": {"batch_size": 4},
           "sparsity": {"method": "static", "target": 0.5, "dense_first_layer": False}, **sections}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return SpFDE(model, opt, cfg, train_size=len(x), example_input=x[:2])


def run_epoch(ctl: SpFDE, x: torch.Tensor, y: torch.Tensor, epoch: int, loss_fn=None) -> dict:
    ctl.start_epoch(epoch)
    ctl.model.train()
    for idx in torch.tensor(list(iter(ctl.sampler)), dtype=torch.int64).split(4):
        logits = ctl.model(x[idx])
        losses = F.cross_entropy(logits, y[idx], reduction="none") if loss_fn is None else loss_fn(logits, idx)
        ctl.optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        ctl.before_step()
        ctl.optimizer.step()
        ctl.after_step(logits, y[idx], idx, losses=losses.detach())
    return ctl.end_epoch()


# --------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name", ["hand", "sdpa", "mha", "bert"])
def test_ledger_matches_independent_count_per_attention_flavour(name: str) -> None:
    """Training FLOPs per epoch = 3 × Σ density·forward over the epoch's samples, counted by hand."""
    model = attention_flavour(name)
    x, y = seq_data()
    hand = analytic_forward(name)
    assert layer_forward_flops(model, x[:1]) == hand  # every unit, exactly, in forward order
    assert list(layer_forward_flops(model, x[:1])) == list(hand)
    ctl = controller(model, x)
    assert ctl.other_forward_flops == 0 and not ctl.notes
    params = dict(model.named_parameters())
    for epoch in range(2):
        m = run_epoch(ctl, x, y, epoch)
        # densities read off the masks themselves, not from the engine's bookkeeping
        dens = {}
        for unit in hand:
            pname = unit + ".weight" if unit + ".weight" in params else unit
            mask = ctl.sparsity.masks.get(pname)
            dens[unit] = 1.0 if mask is None else float(mask.sum()) / mask.numel()
        expected = 3 * m["samples_seen"] * sum(dens[u] * f for u, f in hand.items())
        assert m["train_flops"] == pytest.approx(expected, rel=0.01)
        assert m["train_flops"] == pytest.approx(expected, rel=1e-9)  # exact, in fact


def test_nn_multihead_attention_in_eval_mode_is_still_counted_as_training_runs() -> None:
    """Eval mode + no_grad would take the fused fast path that FlopCounterMode counts as zero."""
    model = attention_flavour("mha").eval()
    with torch.no_grad():
        flops = layer_forward_flops(model, seq_data()[0][:1])
    assert flops == analytic_forward("mha")
    assert not model.training and torch.backends.mha.get_fastpath_enabled()  # both left as they were


def test_measuring_changes_neither_buffers_nor_rng() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(1, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    forward_flops_breakdown(model, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unattributed_flops_reported_and_noted_at_start() -> None:
    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(FEAT, E)
            self.register_buffer("basis", torch.randn(E, E))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.fc(x) @ self.basis).mean(1)[:, :CLASSES]

    x, _ = seq_data()
    ctl = controller(WithBuffer(), x)
    assert ctl.other_forward_flops == 2 * T * E * E
    assert len(ctl.notes) == 1 and "other_forward_flops_per_sample" in ctl.notes[0]
    assert ctl.planned_flops()["other_forward_flops_per_sample"] == 2 * T * E * E
    assert "fc" in ctl.layer_flops and len(ctl.layer_flops) == 1  # the ledger charges only what it can attribute


def test_cross_attention_q_k_v_proj_weights_and_tied_head() -> None:
    class Cross(nn.Module):  # separate q/k/v projection weights (kdim != embed_dim)
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H, kdim=6, vdim=6, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mem = x[..., :6].contiguous()
            return self.mha(x, mem, mem, need_weights=False)[0]

    model = Seq(Cross())
    flops = layer_forward_flops(model, seq_data()[0][:1])
    assert flops["attn.mha.q_proj_weight"] == 2 * T * E * E
    assert flops["attn.mha.k_proj_weight"] == flops["attn.mha.v_proj_weight"] == 2 * T * 6 * E
    units = [lay.module for lay in find_prunable(model)]
    assert units == ["embed", "attn.mha.q_proj_weight", "attn.mha.k_proj_weight", "attn.mha.v_proj_weight",
                     "attn.mha.out_proj", "head"]


# --------------------------------------------------------------------------------------- sparsity
def test_prunable_parameters_default_include_exclude() -> None:
    model = attention_flavour("mha")
    model.norm = nn.LayerNorm(E)
    model.table = nn.Embedding(7, E)
    units = {lay.module: lay.param for lay in find_prunable(model)}
    # weights of linears and the fused projection; never embeddings, norms or biases
    assert units == {"embed": "embed.weight", "attn.mha.in_proj_weight": "attn.mha.in_proj_weight",
                     "attn.mha.out_proj": "attn.mha.out_proj.weight", "head": "head.weight"}
    assert [lay.module for lay in find_prunable(model, include=["attn.mha.in_proj_weight"])] == [
        "attn.mha.in_proj_weight"]
    assert [lay.module for lay in find_prunable(model, include=["attn"])] == [
        "attn.mha.in_proj_weight", "attn.mha.out_proj"]
    assert [lay.module for lay in find_prunable(model, include=["table"])] == ["table"]  # named itself
    assert [lay.module for lay in find_prunable(model, exclude=["attn.mha.in_proj_weight", "head"])] == [
        "embed", "attn.mha.out_proj"]
    for key, bad in (("include", "attn.mha.in_proj"), ("exclude", "hea"), ("include", "norm")):
        with pytest.raises(ConfigError, match=rf"sparsity\.{key}.*'{bad}'") as e:
            find_prunable(model, **{key: [bad]})
        assert "\n" not in str(e.value)


def test_fused_in_proj_gets_the_density_of_the_equivalent_qkv_linear() -> None:
    """uniform and ERK see in_proj_weight as one (3E, E) unit, exactly like timm's qkv Linear: q, k and v share
    one density."""
    mha, sdpa = create_model("vit_tiny", in_channels=1), create_model("vit_tiny_sdpa", in_channels=1)
    rename = {"attn.in_proj_weight": "attn.qkv", "attn.out_proj": "attn.proj"}
    x = torch.zeros(1, 1, 28, 28)
    for dist in ("uniform", "erk"):
        cfg = from_dict({"sparsity": {"method": "static", "target": 0.8, "distribution": dist}})
        a = build_sparsity(mha, cfg, x).layer_sparsity_target()
        b = build_sparsity(sdpa, cfg, x).layer_sparsity_target()
        renamed = {}
        for k, v in a.items():
            for old, new in rename.items():
                k = k.replace(old, new)
            renamed[k] = v
        assert renamed == pytest.approx(b)
        assert a["layers.0.attn.in_proj_weight"] > 0


def test_in_proj_weight_exact_count_and_momentum_never_revives() -> None:
    model = attention_flavour("mha")
    x, y = seq_data(16)
    target = 0.8
    ctl = controller(model, x, sparsity={"method": "mest", "target": target, "dense_first_layer": False,
                                         "search_end": 2}, train={"epochs": 4, "interval": 1})
    p = dict(model.named_parameters())["attn.mha.in_proj_weight"]
    assert "attn.mha.in_proj_weight" in ctl.sparsity.masks
    for epoch in range(4):
        run_epoch(ctl, x, y, epoch)
        for name, mask in ctl.sparsity.masks.items():
            w = dict(model.named_parameters())[name]
            assert bool((w[~mask] == 0).all()), (epoch, name)
            buf = ctl.optimizer.state[w]["momentum_buffer"]
            assert bool((buf[~mask] == 0).all()), (epoch, name)  # pruned positions carry no momentum
    mask = ctl.sparsity.masks["attn.mha.in_proj_weight"]
    assert int(mask.sum()) == keep_count(p.numel(), target) == int((p != 0).sum())
    assert ctl.sparsity.layer_density()["attn.mha.in_proj_weight"] == keep_count(p.numel(), target) / p.numel()


def test_no_prunable_parameter_is_a_config_error() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4))
    cfg = from_dict({"sparsity": {"method": "mest", "target": 0.5}})
    with pytest.raises(ConfigError, match="no prunable"):
        build_sparsity(model, cfg)


# --------------------------------------------------------------------------------------- blocks
class TimmStyle(nn.Module):
    """timm's VisionTransformer layout, head registered first, and no blocks() method."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(E, CLASSES)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, T + 1, E))
        self.patch_embed = nn.Linear(FEAT, E)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(E), nn.Linear(E, E)) for _ in range(2)))
        self.norm = nn.LayerNorm(E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(h))[:, 0])


class HFStyle(nn.Module):
    """bert.embeddings / bert.encoder.layer.N / bert.pooler / classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.Sequential(nn.Linear(FEAT, E), nn.LayerNorm(E))
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(nn.Linear(E, E) for _ in range(3))
        self.bert.pooler = nn.Linear(E, E)
        self.classifier = nn.Linear(E, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bert.embeddings(x)
        for layer in self.bert.encoder.layer:
            h = layer(h)
        return self.classifier(self.bert.pooler(h[:, 0]))


class GPTStyle(nn.Module):
    """transformer.wte / wpe / h.N / ln_f, lm_head tied to wte."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, E)
        self.transformer.wpe = nn.Embedding(T, E)
        self.transformer.h = nn.ModuleList(nn.Linear(E, E) for _ in range(2))
        self.transformer.ln_f = nn.LayerNorm(E)
        self.lm_head = nn.Linear(E, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
        for layer in t.h:
            h = layer(h)
        return self.lm_head(t.ln_f(h))


def test_blocks_found_for_timm_hf_and_gpt_layouts() -> None:
    x = seq_data()[0]
    timm = resolve_blocks(TimmStyle(), example_input=x)
    assert [b.name for b in timm] == ["patch_embed", "blocks.0", "blocks.1", "norm", "head"]  # forward order
    assert timm[0].param_names == ["cls_token", "pos_embed", "patch_embed.weight", "patch_embed.bias"]
    hf = resolve_blocks(HFStyle(), example_input=x)
    assert [b.name for b in hf] == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                                    "bert.encoder.layer.2", "bert.pooler", "classifier"]
    ids = torch.randint(0, 11, (2, T))
    gpt = resolve_blocks(GPTStyle(), example_input=ids)
    # wte's table is lm_head's weight: it belongs to the block of its last use
    assert [b.name for b in gpt] == ["transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.ln_f",
                                     "lm_head"]
    assert gpt[-1].param_names == ["transformer.wte.weight"]


def test_root_parameters_named_in_a_block_and_whole_name_matching() -> None:
    m = TimmStyle()
    x = seq_data()[0]
    blocks = resolve_blocks(m, ["patch_embed", "blocks.0", "blocks.1", ["norm", "cls_token"], "head"],
                            example_input=x)
    assert "cls_token" in blocks[3].param_names and "cls_token" in blocks[3].module_names
    assert "pos_embed" in blocks[0].param_names  # not named: joins the first block
    with pytest.raises(ConfigError, match=r"'block'.*similar: blocks"):  # no string-prefix match any more
        resolve_blocks(m, ["patch_embed", "block", "norm", "head"])
    globbed = resolve_blocks(m, ["patch_embed", "blocks.*", "norm", "head"], example_input=x)
    assert [b.name for b in globbed] == ["patch_embed", "blocks.*", "norm", "head"]
    assert "blocks.1.1.weight" in globbed[1].param_names
    for spec, msg in (([], "empty"), (["nosuchblock"], "nosuchblock"), (["patch_embed", "head"], "no freezing block"),
                      (["norm", "patch_embed", "blocks", "head"], "forward order")):
        with pytest.raises(ConfigError, match=msg) as e:
            resolve_blocks(m, spec, example_input=x)
        assert "\n" not in str(e.value)


def test_tied_weight_trains_until_its_last_block_freezes_and_the_ledger_follows() -> None:
    model = GPTStyle()
    ids = torch.randint(0, 11, (2, T))
    blocks = resolve_blocks(model, example_input=ids)
    flops = layer_forward_flops(model, ids[:1])
    assert flops["lm_head"] == 2 * T * E * 11  # the tied head's matmul is the head's work
    plan = FreezePlan(tfrz=1, scheme="single_shot", blocks=[(blocks[0].name, 1), (blocks[1].name, 2)],
                      predicted_reduction=0.0, epochs=4, interval=1)
    fz = Freezer(model, blocks, plan)
    fz.apply(2)
    wte = model.transformer.wte.weight
    assert not model.transformer.wpe.weight.requires_grad and wte.requires_grad
    from spfde.accounting.flops import per_sample_flops

    cost = per_sample_flops(flops, {}, fz.frozen_module_names())
    assert cost["backward"] == 2 * (flops["transformer.h.1"] + flops["lm_head"])
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert wte.grad is not None and model.transformer.h[0].weight.grad is None


class SharedLayers(nn.Module):
    """ALBERT-style: one encoder layer registered (and run) three times, ``layers = [shared] * 3``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEAT, E)
        shared = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True)
        self.layers = nn.ModuleList([shared] * 3)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def test_a_module_registered_under_several_names_is_pruned_as_one_layer() -> None:
    """Its weights have several names but one owner, so nothing else (an embedding table) would be pruned
    with them: they are pruned like any layer's; a weight two modules share (GPT-2's head) is not."""
    model = SharedLayers()
    units = [lay.module for lay in find_prunable(model)]
    assert units == ["embed", "layers.0.self_attn.in_proj_weight", "layers.0.self_attn.out_proj",
                     "layers.0.linear1", "layers.0.linear2", "head"]
    assert "lm_head" not in [lay.module for lay in find_prunable(GPTStyle())]  # tied to wte: never pruned
    x, y = seq_data(8)
    cfg = {"train": {"epochs": 2}, "sparsity": {"method": "static", "target": 0.75, "kernels": "dense"},
           "sieving": {"method": "none"}}
    ctl = SpFDE(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, train_size=8, example_input=x)
    shared = model.layers[0]
    assert ctl.sparsity.masks["layers.0.linear1.weight"].float().mean() == 0.25
    assert float((shared.linear1.weight == 0).float().mean()) >= 0.75
    # the ledger charges the layer's three calls at its density
    assert ctl.layer_flops["layers.0.linear1"] == 3 * 2 * T * E * 2 * E


# --------------------------------------------------------------------------------------- ViT
def test_vit_flavours_compute_the_same_function_and_flops() -> None:
    torch.manual_seed(0)
    mha = create_model("vit_tiny", in_channels=1)
    torch.manual_seed(0)
    sdpa = create_model("vit_tiny_sdpa", in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(mha(x), sdpa(x), atol=1e-6)
    fa, fb = trace_forward(mha, x[:1]), trace_forward(sdpa, x[:1])
    tokens, dim, depth = 17, 64, 4
    assert fa.attention == fb.attention == depth * 4 * tokens * tokens * dim
    assert fa.weights == fb.weights and fa.other == fb.other == 0
    assert fa.units[attention_unit("layers.0.attn")] == 4 * tokens * tokens * dim
    assert mha(torch.randn(2, 1, 32, 32)).shape == (2, 10)  # position grid resampled
    blocks = resolve_blocks(mha, example_input=x)
    assert [b.name for b in blocks][:2] == ["patch_embed", "layers.0"]
    assert {"cls_token", "pos_embed"} <= set(blocks[0].param_names)


@pytest.mark.parametrize("size", [(28, 28), (30, 33)])
def test_vit_patch_embedding_is_its_convolution(size) -> None:
    """PatchEmbed (a matmul of the patches) is the stride = kernel convolution it subclasses: output,
    all three gradients and the ledger's count; a remainder past the last whole patch is dropped."""
    torch.manual_seed(0)
    pe = create_model("vit_tiny", in_channels=3).patch_embed
    assert isinstance(pe, nn.Conv2d) and set(pe.state_dict()) == {"weight", "bias"}
    x = torch.randn(5, 3, *size, requires_grad=True)
    ref_conv = nn.Conv2d(3, 64, 7, stride=7)
    ref_conv.load_state_dict(pe.state_dict())
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        out, ref = pe(inp), ref_conv(inp)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, [x, pe.weight, pe.bias], g)
        want = torch.autograd.grad(ref, [x, ref_conv.weight, ref_conv.bias], g)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, atol=1e-4)
    assert trace_forward(pe, x[:1].detach()).units == trace_forward(ref_conv, x[:1].detach()).units


def test_flops_and_plan_report_attention_on_the_vit_preset(capsys) -> None:
    assert main(["flops", "--config", "fmnist-vit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attention_forward_flops_per_sample"] == 4 * 4 * 17 * 17 * 64
    assert out["other_forward_flops_per_sample"] == 0
    assert out["dense_forward_flops_per_sample"] == (out["weight_forward_flops_per_sample"]
                                                     + out["attention_forward_flops_per_sample"])
    assert main(["flops", "--config", "fmnist-vit"]) == 0
    assert "attention_forward_flops_per_sample" in capsys.readouterr().out
    assert main(["plan", "--config", "fmnist-vit"]) == 0
    assert "attention 2.9594e+05" in capsys.readouterr().out


@pytest.mark.parametrize("override, msg", [
    ("sparsity.include=[nosuch]", "'nosuch'"),
    ("sparsity.exclude=[patch_embed,layers,head]", "no prunable"),
    ("freezing.blocks=[patch_embed,head]", "no freezing block"),
    ("freezing.blocks=[]", "empty"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, override: str, msg: str) -> None:
    assert main(["flops", "--config", "fmnist-vit", "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------- sieving
def test_loss_tracker_last_sighting_unseen_and_state() -> None:
    t = LossTracker(5)
    t.record(torch.tensor([0, 1, 1, 3]), torch.tensor([0.5, 2.0, 0.1, float("nan")]))
    d = t.difficulty()
    assert d[0] == 0.5 and d[1] == pytest.approx(0.1)  # duplicates: the last in batch order
    assert torch.isinf(d[[2, 3, 4]]).all()  # unseen, or not finite: kept
    assert t.histogram() is None
    state = t.state_dict()
    u = LossTracker(5)
    u.load_state_dict(state)
    assert torch.equal(u.difficulty(), d)
    from spfde.sieving import ForgettingTracker

    with pytest.raises(SpfdeError, match="sieving.criterion"):
        ForgettingTracker(5).load_state_dict(state)
    t.reset_interval()
    assert torch.isinf(t.difficulty()).all()
    # across ranks the losses travel as integer patterns and come back exactly
    g = StatusGatherer()
    losses = torch.tensor([0.25, 1e-7, 3.5])
    g.add(torch.tensor([2, 0, 4]), LossTracker.encode(losses))
    g.flush(t)
    assert torch.equal(t.difficulty()[[2, 0, 4]], losses)


def test_loss_criterion_sieves_lowest_loss_and_handles_sequence_outputs() -> None:
    torch.manual_seed(0)
    x, y = seq_data(20)
    sieving = {"method": "circular", "ratio": 0.25, "update_ratio": 1.0, "criterion": "loss"}
    ctl = controller(Seq(SdpaAttention()), x, sieving=sieving)
    # a sequence-shaped output with per-sample losses: the user averages each sequence
    fixed = torch.arange(20, dtype=torch.float32)  # sample i has loss i

    def seq_losses(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return logits.sum(1) * 0 + fixed[idx]

    run_epoch(ctl, x, y, 0, loss_fn=seq_losses)
    active = ctl.sieve.active.clone()
    info = ctl.start_epoch(1)
    assert info["removed_this_update"] == 5
    assert sorted(ctl.sieve.removed.tolist()) == sorted(active[:5].tolist())  # the 5 lowest losses left
    # forgetting needs single-label outputs: a sequence model is told what to do instead
    fz = controller(Seq(SdpaAttention()), x, sieving={"method": "circular", "ratio": 0.25})
    fz.start_epoch(0)
    with pytest.raises(ConfigError, match="criterion: loss") as e:  # a config choice: exit 2 from the CLI
        fz.after_step(torch.zeros(4, T, CLASSES), torch.zeros(4, T, dtype=torch.long), torch.arange(4))
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_loss_tensor_of_the_wrong_shape_is_one_line_config_error() -> None:
    x, _ = seq_data()
    ctl = controller(Seq(SdpaAttention()), x, sieving={"method": "circular", "ratio": 0.25, "criterion": "loss"})
    ctl.start_epoch(0)
    logits = torch.zeros(4, CLASSES)
    for losses, msg in ((torch.zeros(4, T), r"shape \(4, 5\)"), (torch.zeros(3), r"shape \(3,\)"),
                        (None, "per-sample losses")):
        with pytest.raises(ConfigError, match=msg) as e:
            ctl.after_step(logits, torch.zeros(4, dtype=torch.long), torch.arange(4), losses=losses)
        assert "\n" not in str(e.value) and e.value.exit_code == 2


@pytest.mark.slow
def test_trainer_sieves_by_loss_and_the_vit_preset_trains_from_the_cli(tmp_path) -> None:
    """The built-in trainer passes per-sample losses with sieving.criterion: loss; the preset runs end to end."""
    from spfde.train import train

    cfg = from_dict({"data": {"name": "synthetic", "synthetic_size": 48, "image_size": 28, "channels": 1,
                              "batch_size": 16, "augment": False, "test_subset": 12},
                     "model": {"name": "vit_tiny_sdpa", "width": 0.5}, "train": {"epochs": 3, "interval": 1},
                     "sparsity": {"method": "mest", "target": 0.8},
                     "sieving": {"method": "circular", "ratio": 0.25, "criterion": "loss"}})
    summary = train(cfg, tmp_path / "loss", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "loss" / "metrics.jsonl").read_text().splitlines()]
    assert [r["removed_this_update"] for r in rows] == [0, 4, 4]  # ceil(0.3 · 12); without losses: an error
    assert not (tmp_path / "loss" / "sieve").exists()  # no forgetting histograms under the loss criterion
    assert summary["attention_forward_flops_per_sample"] > 0 and summary["other_forward_flops_per_sample"] == 0
    out = tmp_path / "vit"
    preset = Path(__file__).resolve().parents[1] / "configs" / "fmnist-vit.yaml"
    assert main(["train", "--config", str(preset), "--out", str(out), "-q", "--set", "data.subset=256",
                 "--set", "data.test_subset=128", "--set", "train.epochs=4", "--set", "freezing.target=0.1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["frozen_blocks"] and rows[-1]["active_samples"] == 256 - round(0.2 * 256)
    assert rows[-1]["layer_density"]["layers.1.attn.in_proj_weight"] == pytest.approx(0.2, abs=1e-3)
