"""Small helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def masked_sgd_steps(model: nn.Module, engine, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                     steps: int = 2) -> Iterator[None]:
    """Training steps with a sparse engine's two per-step calls around the optimizer; yields after each."""
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        engine.before_step()
        opt.step()
        engine.after_step(opt)
        yield
