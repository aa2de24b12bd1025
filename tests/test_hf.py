"""Hugging Face ``transformers`` models (the ``spfde[hf]`` extra) through the controller with sparsity,
freezing and sieving on: a BERT sequence classifier and a GPT-2 causal LM built from configs (random
weights, nothing downloaded), on small synthetic data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spfde import SpFDE  # noqa: E402
from spfde.errors import ConfigError, SpfdeError  # noqa: E402
from spfde.integrations.hf import causal_lm_losses  # noqa: E402
from spfde.sparsity import keep_count  # noqa: E402

pytestmark = pytest.mark.slow
N, T, V = 32, 8, 30


def config(criterion: str) -> dict:
    return {"seed": 0, "train": {"epochs": 6, "interval": 1}, "data": {"batch_size": 8},
            "optim": {"lr": 0.05},
            "sparsity": {"method": "mest", "target": 0.5, "search_end": 3},
            "freezing": {"target": 0.1, "tfrz": "auto"},
            "sieving": {"method": "circular", "ratio": 0.25, "criterion": criterion}}


def train(model, ids: torch.Tensor, ctl: SpFDE, step) -> list[dict]:
    out = []
    for epoch in range(6):
        ctl.start_epoch(epoch)
        model.train()
        for idx in torch.tensor(list(iter(ctl.sampler)), dtype=torch.int64).split(8):
            logits, targets, losses = step(ids[idx], idx)
            ctl.optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            ctl.before_step()
            ctl.optimizer.step()
            ctl.after_step(logits, targets, idx, losses=losses.detach())
        out.append(ctl.end_epoch())
    return out


def check_common(ctl: SpFDE, metrics: list[dict]) -> None:
    # the ledger spends what the replay of the same run plans, epoch by epoch
    assert [m["train_flops"] for m in metrics] == ctl.planned_flops()["epoch_flops"]
    assert ctl.planned_flops()["attention_forward_flops_per_sample"] > 0
    assert metrics[-1]["frozen_blocks"] and all(m["active_samples"] == N - N // 4 for m in metrics)
    assert any(m["removed_this_update"] for m in metrics)
    params = dict(ctl.net.named_parameters())
    for name, mask in ctl.sparsity.masks.items():  # search over: exactly at the target, zeros where pruned
        assert int(mask.sum()) == keep_count(mask.numel(), 0.5) == int((params[name] != 0).sum()), name


def test_bert_sequence_classification_sparse_frozen_sieved() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=T, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 0] % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = SpFDE(model, opt, config("forgetting"), train_size=N, example_input=ids[:2])
    assert [b.name for b in ctl.blocks] == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                                            "bert.pooler", "classifier"]
    assert "bert.encoder.layer.0.attention.self.[attention]" in ctl.layer_flops
    assert "bert.encoder.layer.1.attention.self.query.weight" in ctl.sparsity.masks
    assert not any("embeddings" in n or "LayerNorm" in n or n.endswith("bias") for n in ctl.sparsity.masks)

    def step(x, idx):
        logits = model(x).logits
        return logits, labels[idx], F.cross_entropy(logits, labels[idx], reduction="none")

    check_common(ctl, train(model, ids, ctl, step))


def test_gpt2_causal_lm_tied_head_loss_criterion() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False)
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = SpFDE(model, opt, config("loss"), train_size=N, example_input=ids[:2])
    assert [b.name for b in ctl.blocks] == ["transformer.wpe", "transformer.h.0", "transformer.h.1",
                                            "transformer.ln_f", "lm_head"]
    assert ctl.blocks[-1].param_names == ["transformer.wte.weight"]  # the tied table trains with the head
    assert ctl.layer_flops["lm_head"] == 2 * T * 16 * V
    assert "transformer.h.1.attn.c_attn.weight" in ctl.sparsity.masks  # GPT-2's Conv1D (h.0's: the dense first layer)
    assert "transformer.wte.weight" not in ctl.sparsity.masks

    def step(x, idx):
        logits = model(x).logits
        return logits, x, causal_lm_losses(logits, x)

    metrics = train(model, ids, ctl, step)
    check_common(ctl, metrics)
    assert model.transformer.wte.weight.requires_grad and not model.transformer.wpe.weight.requires_grad
    # the blocks the run froze are requires_grad=False now, so they are never pruned: a model left with no
    # trainable conv/linear weight is named as such (not "no conv/linear weight matched")
    with pytest.raises(ConfigError, match=r"every prunable weight of GPT2LMHeadModel has requires_grad=False"):
        SpFDE(model, torch.optim.SGD(model.parameters(), lr=0.1), {**config("forgetting"), "freezing": {}},
              train_size=N, example_input=ids[:2])
    model.requires_grad_(True)
    # the forgetting criterion cannot tell a correct sequence: a clear error, not a crash
    fz = SpFDE(model, torch.optim.SGD(model.parameters(), lr=0.1), {**config("forgetting"), "freezing": {}},
               train_size=N, example_input=ids[:2])
    fz.start_epoch(0)
    with pytest.raises(SpfdeError, match="criterion: loss"):
        fz.after_step(model(ids[:4]).logits, ids[:4], torch.arange(4))


def test_a_model_output_passed_as_logits_names_the_logits_tensor() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=T, num_labels=3))
    ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(0))
    ctl = SpFDE(model, torch.optim.SGD(model.parameters(), lr=0.1), {**config("forgetting"), "freezing": {}},
                train_size=N, example_input=ids[:2])
    ctl.start_epoch(0)
    out = model(ids)
    # the whole SequenceClassifierOutput, not out.logits: not a reason to switch to criterion: loss
    with pytest.raises(SpfdeError, match=r"got a SequenceClassifierOutput as logits; pass its logits tensor") as e:
        ctl.after_step(out, ids[:, 0] % 3, torch.arange(4))
    assert "criterion" not in str(e.value)
    ctl.after_step(out.logits, ids[:, 0] % 3, torch.arange(4))  # the tensor is accepted


def test_causal_lm_losses_leave_out_the_padding_of_the_attention_mask() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, V)
    ids = torch.randint(1, V, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0  # sequence 1 has 3 real tokens, then right padding
    padded = ids.clone()
    padded[1, 3:] = 0  # the tokenizer's pad id
    got = causal_lm_losses(logits, padded, attention_mask=mask)
    # each sequence's loss is that of its real tokens alone, whatever the pad positions hold
    assert torch.allclose(got[0], causal_lm_losses(logits[:1], ids[:1])[0])
    assert torch.allclose(got[1], causal_lm_losses(logits[1:, :3], ids[1:, :3])[0])
    assert torch.allclose(causal_lm_losses(logits, padded), causal_lm_losses(logits, padded, attention_mask=None))
