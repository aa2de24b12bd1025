"""Shared pieces of the model zoo: channel scaling, initialisation, the ``blocks()`` base."""

from __future__ import annotations

import torch.nn as nn


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest int (at least 1), the width multiplier rule."""
    return max(1, int(round(channels * width)))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU gain, He et al. 2015), BN weight 1 / bias 0.

    Linear layers keep PyTorch's default init. All draws come from the global torch RNG, so
    ``torch.manual_seed`` before construction makes the init reproducible bit for bit.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BlockModel(nn.Module):
    """Base class: subclasses set ``self._block_names`` (module names in forward order)."""

    _block_names: list[str]

    def blocks(self) -> list[str]:
        """Natural freezing blocks in forward order; every parameter lies in exactly one."""
        return list(self._block_names)

    def _finish(self, c_in: int, num_classes: int, names: list[str]) -> None:
        """Global-average-pool + linear ``head`` (the last block), then the shared initialisation."""
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)
        self._block_names = [*names, "head"]
        init_weights(self)
