"""CIFAR ResNet-20/32/56 (He et al. 2016, Section 4.2) with a width multiplier.

Method card
-----------
What: the 6n+2-layer CIFAR ResNet: a 3x3 stem conv (16 channels), three stages of ``n`` basic
blocks with 16/32/64 channels (times ``width``), stride 2 at the first block of stages 2 and 3,
global average pooling and a linear head. Shortcuts use option A (parameter-free: stride-2
subsampling plus zero-padded channels), which gives the paper's 0.27M (ResNet-20) and 0.46M
(ResNet-32) parameters at width 1.
Paper: SpFDE (Section 5, Tab. 2, Tab. A6, Appendix D) trains the "2x widened version of ResNet-32"
(``width=2.0``) on CIFAR-10/100, following MEST/RigL. Its freezing blocks are the stem, each
basic block and the head (Section 4.2: "a block consisting of several consecutive DNN layers").
Hyper-parameters: ``depth`` in {20, 32, 56} (n = (depth-2)/6), ``width`` (channels are rounded to
the nearest int), ``num_classes``, ``in_channels``.
Expected effect: ResNet-32 2x with 100 classes costs ~551 MFLOPs per 32x32 image forward
(FlopCounterMode, multiply-add = 2 FLOPs). Any input of at least 8x8 works (28x28 Fashion-MNIST
too), because the head pools globally.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from spfde.models.common import BlockModel, scale_channels
from spfde.models.registry import register_model


def shortcut_a(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Option-A identity shortcut: subsample spatially by ``stride``, zero-pad channels evenly.

    Subsampling with ``[::stride]`` yields ceil(H/stride), the same size as the 3x3 stride-2
    padding-1 conv on the residual path, so odd sizes (e.g. 7x7 from 28x28 inputs) line up.
    """
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    extra = out_channels - x.shape[1]
    if extra > 0:
        x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
    return x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the option-A shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option-A shortcuts can only widen the channel count")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut_a(x, self.out_channels, self.stride))


class CifarResNet(BlockModel):
    """ResNet-(6n+2) for 32x32-ish inputs; blocks: ``stem``, ``layer{s}.{i}``, ``head``."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        widths = [scale_channels(c, width) for c in (16, 32, 64)]
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        names = ["stem"]
        c_in = widths[0]
        for s, c_out in enumerate(widths, start=1):
            stage = []
            for i in range(n):
                stride = 2 if (s > 1 and i == 0) else 1
                stage.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
                names.append(f"layer{s}.{i}")
            self.add_module(f"layer{s}", nn.Sequential(*stage))
        self._finish(c_in, num_classes, names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(torch.flatten(self.pool(x), 1))


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016), option-A shortcuts, 0.27M params at width 1."""
    return CifarResNet(20, num_classes, in_channels, width)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-32 (He et al. 2016), 0.46M params at width 1; SpFDE uses width=2.0."""
    return CifarResNet(32, num_classes, in_channels, width)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-56 (He et al. 2016), option-A shortcuts, 0.85M params at width 1."""
    return CifarResNet(56, num_classes, in_channels, width)
