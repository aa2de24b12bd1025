"""The CUDA path of the built-in trainer (skipped without a GPU and SPFDE_TEST_CUDA=1: tests/conftest.py).

On CUDA every layer runs PyTorch's dense kernels (docs/kernels.md: torch's 2:4 and CSR kernels
measured slower than the dense fp16 layer the trainer runs under autocast, docs/benchmarks.md
"GPU"), the activation cache lives on the device, and each epoch logs its peak device memory.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from spfde.config import load_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a GPU, and SPFDE_TEST_CUDA=1 (the suite hides GPUs otherwise)")]

SPFDE = ["data.name=digits", "data.subset=256", "data.test_subset=64", "data.image_size=16", "data.batch_size=64",
         "data.augment=false", "model.name=resnet20", "model.width=0.5", "optim.lr=0.02", "train.epochs=3",
         "train.interval=1", "logging.progress=false", "sparsity.method=mest", "sparsity.target=0.8",
         "sparsity.search_end=2", "freezing.target=0.1", "freezing.tfrz=1", "freezing.unreachable=reduce",
         "freezing.cache=auto", "sieving.method=circular", "sieving.ratio=0.2", "sparsity.kernels=sparse",
         "train.device=cuda"]


def test_spfde_trains_on_cuda_with_dense_kernels_the_cache_and_peak_memory(tmp_path):
    from spfde.train import Trainer

    tr = Trainer(load_config(None, SPFDE), tmp_path, quiet=True)
    assert tr.device.type == "cuda" and tr.amp  # train.amp: auto is fp16 autocast on CUDA
    assert all(p.is_cuda for p in tr.model.parameters())
    summary = tr.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] > 0 for r in rows)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    kernels = rows[-1]["kernels"]
    assert kernels and set(kernels.values()) == {"dense"}  # kernels: sparse still runs dense on CUDA
    assert any(r["cached_blocks"] for r in rows)  # frozen blocks served from the cache on the device
    assert 0 < summary["freeze_reduction"] and summary["flops_saving"] > 0.5
