"""``vgg_small``: a small VGG-style CNN for quick experiments and tests.

Method card
-----------
What: three stages of two conv3x3-BN-ReLU units (32/32, 64/64, 128/128 channels times
``width``), a 2x2 max-pool after each stage, global average pooling and a linear head.
Paper: not in the SpFDE paper; a plain, residual-free network to exercise layer freezing
(Section 4.2) where each conv unit is its own block.
Hyper-parameters: ``width`` (channels rounded to the nearest int), ``num_classes``, ``in_channels``.
Expected effect: ~0.29M parameters at width 1; runs on any input of at least 8x8.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from spfde.models.common import BlockModel, scale_channels
from spfde.models.registry import register_model

VGG_SMALL_CFG: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64), (128, 128))


def conv_unit(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 (no bias: BN follows) -> BN -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VGGSmall(BlockModel):
    """Blocks: each conv unit ``stage{s}.{i}`` then ``head``; pools are parameter-free modules."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        cfg: tuple[tuple[int, ...], ...] = VGG_SMALL_CFG,
    ) -> None:
        super().__init__()
        names = []
        c_in = in_channels
        for s, widths in enumerate(cfg, start=1):
            units: list[nn.Module] = []
            for i, c in enumerate(widths):
                c_out = scale_channels(c, width)
                units.append(conv_unit(c_in, c_out))
                c_in = c_out
                names.append(f"stage{s}.{i}")
            units.append(nn.MaxPool2d(2))
            self.add_module(f"stage{s}", nn.Sequential(*units))
        self.num_stages = len(cfg)
        self._finish(c_in, num_classes, names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{s}")(x)
        return self.head(torch.flatten(self.pool(x), 1))


@register_model("vgg_small")
def vgg_small(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGGSmall:
    """Small VGG-style CNN (32-32-M-64-64-M-128-128-M, BN), ~0.29M params."""
    return VGGSmall(num_classes, in_channels, width)
