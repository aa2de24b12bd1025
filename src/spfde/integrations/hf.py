"""Hugging Face ``transformers`` models through the SpFDE controller (``pip install 'spfde[hf]'``).

Nothing here is needed to train a ``transformers`` model: the controller handles one as it is.

* **Sparsity**: every ``nn.Linear`` and GPT-2 ``Conv1D`` weight is prunable by default; embedding
  tables, LayerNorms and biases stay dense; a tied weight (GPT-2's ``lm_head`` = ``wte``) is never
  pruned (:func:`spfde.sparsity.find_prunable`).
* **FLOPs**: counted per weight and per attention module in training mode, SDPA or eager
  attention alike (:mod:`spfde.accounting.trace`).
* **Blocks**: BERT-style ``embeddings`` / ``encoder.layer.N`` / ``pooler`` / ``classifier`` and
  GPT-style ``wpe`` / ``h.N`` / ``ln_f`` / ``lm_head`` are found without a spec; the tied ``wte``
  table trains with ``lm_head`` until the last block freezes (:mod:`spfde.freezing.blocks`).
* **Sieving**: a causal LM has no single correct class per sample, so use
  ``sieving.criterion: loss`` and pass per-sample losses (:func:`causal_lm_losses`; a padded batch:
  with ``attention_mask=``, so padding does not count) to ``after_step``; a sequence classifier works
  with the default forgetting criterion too.

Example (a causal LM)::

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, ...))          # random weights, nothing downloaded
    ctl = SpFDE(model, opt, {"sieving": {"method": "circular", "ratio": 0.2, "criterion": "loss"}, ...},
                train_size=len(ids), example_input=ids[:2])
    for ids_b, idx in loader:
        logits = model(ids_b).logits
        losses = causal_lm_losses(logits, ids_b)
        opt.zero_grad(); losses.mean().backward(); ctl.before_step(); opt.step()
        ctl.after_step(logits, ids_b, idx, losses=losses.detach())

Offline use: set ``HF_HUB_OFFLINE=1`` and build models from config objects (``from_config`` or the
class itself), never ``from_pretrained``, where the machine has no hub access.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_losses"]


def causal_lm_losses(logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = -100,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample next-token loss ``(batch,)``: token ``t`` predicts token ``t + 1``, averaged over each
    sequence's predicted tokens (those whose label is not ``ignore_index`` and, given the tokenizer's
    ``attention_mask``, not padding).

    A padded batch needs ``attention_mask`` (or labels with ``ignore_index`` at the padding): the
    pad tokens of ``input_ids`` are ordinary ids, and counting them would make short sequences look
    easy to ``sieving.criterion: loss``, which removes the lowest-loss samples first.
    """
    labels = input_ids[:, 1:]
    tok = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index,
                          reduction="none").view(labels.shape)
    keep = labels != ignore_index
    if attention_mask is not None:
        keep = keep & attention_mask[:, 1:].to(keep.device).bool()
    keep = keep.to(tok.dtype)
    return (tok * keep).sum(1) / keep.sum(1).clamp_min(1.0)
