"""ResNet-12 (the few-shot standard) and ResNet-18 (adapted to small images).

Neither is part of the S2M2 release; they are smaller backbones for limited budgets and comparisons.

ResNet-12 (as in TADAM / MetaOptNet / FEAT, without DropBlock): four residual stages, each
``[conv3x3-BN-LeakyReLU(0.1)] x 2 -> conv3x3-BN``, plus a 1x1-conv+BN shortcut, LeakyReLU(0.1), then
2x2 max-pool; widths 64-160-320-640; global average pool -> 640-d. Mixup points: input, after each stage.

ResNet-18: torchvision's BasicBlock layout (post-activation, 2 blocks per stage, widths 64-128-256-512,
strides 1/2/2/2), with the stem adapted to small images as is usual for CIFAR: a 3x3 stride-1 conv and no
max-pool (torchvision's 7x7 stride-2 conv + max-pool would leave 1x1 maps at 28-32 px). Global average
pool -> 512-d. Mixup points: input, after each of the four stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s2m2.models import register_backbone
from s2m2.models.base import Backbone


def _conv_bn(in_planes: int, out_planes: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _init_resnet(model: nn.Module) -> None:
    """He (fan-out) init for convs, as torchvision's ResNet; BN weight 1, bias 0; linear left default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet12Block(nn.Module):
    """One ResNet-12 stage: (B, in, H, W) -> (B, out, H//2, W//2)."""

    def __init__(self, in_planes: int, out_planes: int, negative_slope: float = 0.1):
        super().__init__()
        self.conv1 = _conv_bn(in_planes, out_planes, 3)
        self.conv2 = _conv_bn(out_planes, out_planes, 3)
        self.conv3 = _conv_bn(out_planes, out_planes, 3)
        self.shortcut = _conv_bn(in_planes, out_planes, 1)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), self.negative_slope)
        out = F.leaky_relu(self.conv2(out), self.negative_slope)
        out = self.conv3(out)
        out = F.leaky_relu(out + self.shortcut(x), self.negative_slope)
        # ceil_mode keeps odd maps (28 px -> 14 -> 7 -> 4 -> 2) from collapsing to zero size.
        return F.max_pool2d(out, 2, ceil_mode=True)


class ResNet12(Backbone):
    """``forward(x (B, 3, H, W), mix_spec=None) -> (B, widths[-1])``; 4 stages, 5 mixup points."""

    def __init__(self, widths: tuple[int, ...] = (64, 160, 320, 640), negative_slope: float = 0.1):
        super().__init__()
        self.stem = nn.Identity()
        planes = [3, *widths]
        self.stages = nn.ModuleList([
            ResNet12Block(planes[i], planes[i + 1], negative_slope) for i in range(len(widths))
        ])
        self.tail = GlobalAvgPool()
        self.feature_dim = widths[-1]
        _init_resnet(self)


class ResNet18Block(nn.Module):
    """torchvision-style BasicBlock: conv-BN-ReLU-conv-BN + shortcut, ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(in_planes, out_planes, 3, stride)
        self.conv2 = _conv_bn(out_planes, out_planes, 3)
        self.shortcut = (
            _conv_bn(in_planes, out_planes, 1, stride)
            if stride != 1 or in_planes != out_planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        return F.relu(self.conv2(out) + self.shortcut(x))


class ResNet18(Backbone):
    """``forward(x (B, 3, H, W), mix_spec=None) -> (B, 512)``; stem 3x3 stride 1, no max-pool."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), blocks_per_stage: int = 2):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, widths[0], 3), nn.ReLU(inplace=True))
        stages = []
        in_planes = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [ResNet18Block(in_planes if b == 0 else width, width, stride if b == 0 else 1)
                      for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_planes = width
        self.stages = nn.ModuleList(stages)
        self.tail = GlobalAvgPool()
        self.feature_dim = widths[-1]
        _init_resnet(self)


@register_backbone("resnet12")
def resnet12(widths: tuple[int, ...] | list[int] = (64, 160, 320, 640), negative_slope: float = 0.1) -> ResNet12:
    return ResNet12(tuple(widths), negative_slope)


@register_backbone("resnet18")
def resnet18(widths: tuple[int, ...] | list[int] = (64, 128, 256, 512)) -> ResNet18:
    return ResNet18(tuple(widths))
