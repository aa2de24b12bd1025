"""ImageNet ResNet-50 (He et al. 2016, bottleneck v1.5) with a width multiplier.

Method card
-----------
What: 7x7/2 stem conv + BN + ReLU + 3x3/2 max-pool, four stages of 3/4/6/3 bottleneck blocks
(1x1 reduce, 3x3, 1x1 expand x4) with 64/128/256/512 bottleneck channels, global average pooling
and a linear head. "v1.5": the stage's stride sits on the 3x3 conv, not the first 1x1. Projection
shortcuts (1x1 conv + BN) where the shape changes. 25.6M parameters at ``num_classes=1000``.
Paper: SpFDE's ImageNet experiments (Section 5, Tab. 3, Tab. A5, Tab. A7) use ResNet-50; its
freezing blocks are the stem, every bottleneck and the head (Section 4.2: "a block consisting of
several consecutive DNN layers, such as a bottleneck block in the ResNet").
Hyper-parameters: ``width`` scales every channel count (stem, bottleneck and expansion alike),
rounded to the nearest int; ``num_classes``; ``in_channels``.
Expected effect: ~4.1 GMACs (~8.2 GFLOPs) per 224x224 image at width 1. Inputs of 32x32 and up
work (the head pools globally), which keeps tests cheap.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from spfde.models.common import BlockModel, scale_channels
from spfde.models.registry import register_model

EXPANSION = 4
STAGE_DEPTHS_50 = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 x4, BN after each conv, projection shortcut if needed."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(BlockModel):
    """Bottleneck ResNet; blocks: ``stem``, ``layer{s}.{i}``, ``head``."""

    def __init__(
        self,
        stage_depths: tuple[int, ...] = STAGE_DEPTHS_50,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        stem_c = scale_channels(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_c, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_c),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        names = ["stem"]
        c_in = stem_c
        for s, depth in enumerate(stage_depths, start=1):
            mid = scale_channels(64 * 2 ** (s - 1), width)
            c_out = mid * EXPANSION
            stage = []
            for i in range(depth):
                stride = 2 if (s > 1 and i == 0) else 1
                stage.append(Bottleneck(c_in, mid, c_out, stride))
                c_in = c_out
                names.append(f"layer{s}.{i}")
            self.add_module(f"layer{s}", nn.Sequential(*stage))
        self.num_stages = len(stage_depths)
        self._finish(c_in, num_classes, names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.head(torch.flatten(self.pool(x), 1))


@register_model("resnet50", input_size=(3, 224, 224))
def resnet50(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-50 (bottleneck v1.5), 25.6M params at 1000 classes."""
    return ResNet(STAGE_DEPTHS_50, num_classes, in_channels, width)
