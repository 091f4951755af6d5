"""Wide ResNet (pre-activation), built exactly as the S2M2 release builds WRN-28-10 (spec §2).

Layout (depth = 6n + 4, widths ``16 * widen * (1, 2, 4)``)::

    stem:   conv3x3(3 -> 16), no bias                       (release: conv1)
    stage1: n BasicBlocks, width 16*widen, stride 1          (release: block1.layer.*)
    stage2: n BasicBlocks, width 32*widen, stride 2          (release: block2.layer.*)
    stage3: n BasicBlocks, width 64*widen, stride 2          (release: block3.layer.*)
    tail:   BN -> ReLU -> global average pool -> (B, 64*widen)   (release: bn1)

Manifold Mixup points: 0 = input, 1/2/3 = after stage 1/2/3 (the last before the final BN/ReLU/pool),
the release's {input, block1, block2, block3}.

Module names inside a stage (``layer.N.bn1/conv1/bn2/conv2/convShortcut``) are the release's, so
importing its state dict is the three-rule renaming table in ``s2m2.checkpoint``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from s2m2.models import register_backbone
from s2m2.models.base import Backbone


class BasicBlock(nn.Module):
    """Pre-activation block: ``BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3`` + shortcut.

    ``forward(x (B, in_planes, H, W)) -> (B, out_planes, H/stride, W/stride)``. When the widths
    differ, the 1x1 (stride) ``convShortcut`` is applied to the *activated* input ``relu(bn1(x))``;
    otherwise the shortcut is the raw input (identity), as in the release.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        # The release only builds a shortcut conv when the widths differ (never for a stride-2 block
        # of equal width, which cannot occur in a WRN).
        self.convShortcut = (
            None if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A stage: ``num_blocks`` BasicBlocks in ``self.layer``, the first one changing width/stride."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class PreActTail(nn.Module):
    """Final ``BN -> ReLU -> global average pool -> flatten``: (B, C, H, W) -> (B, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Global pool over whatever spatial size arrives (80 px -> 20x20, 32 px -> 8x8, 28 px -> 7x7).
        return F.relu(self.bn1(x)).mean(dim=(2, 3))


class WideResNet(Backbone):
    """Pre-activation Wide ResNet of depth ``6n + 4`` and width factor ``widen``.

    ``forward(x (B, 3, H, W), mix_spec=None) -> (B, 64 * widen)``. ``dropout`` is the in-block dropout
    probability (release: 0.5 at HEAD, 0.9 for CIFAR-FS; spec §2).
    """

    def __init__(self, depth: int = 28, widen: int = 10, dropout: float = 0.5):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.depth, self.widen, self.dropout = depth, widen, dropout
        num_blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.stages = nn.ModuleList([
            NetworkBlock(num_blocks, widths[i], widths[i + 1], stride, dropout)
            for i, stride in enumerate((1, 2, 2))
        ])
        self.tail = PreActTail(widths[3])
        self.feature_dim = widths[3]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init: convs ~ N(0, sqrt(2 / (k*k*out_channels))) (He, fan-out); BN 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, widen={self.widen}, dropout={self.dropout}"


@register_backbone("wrn")
def wrn(depth: int = 28, widen: int = 10, dropout: float = 0.5) -> WideResNet:
    """Generic WRN-depth-widen (depth = 6n + 4), e.g. ``wrn(depth=16, widen=4)`` for small budgets."""
    return WideResNet(depth=depth, widen=widen, dropout=dropout)


@register_backbone("wrn28_10")
def wrn28_10(dropout: float = 0.5) -> WideResNet:
    """The S2M2 backbone: WRN-28-10, 640-d features, ~36.5 M parameters."""
    return WideResNet(depth=28, widen=10, dropout=dropout)
