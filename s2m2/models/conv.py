"""Conv-4: four ``conv3x3(64) - BN - ReLU - maxpool2`` blocks (the classic few-shot backbone).

Feature: by default global average pooling -> 64-d, which works at any input size. CloserLook (the
release's parent) *flattens* the last map instead (84 px -> 5x5x64 = 1600-d, 28 px -> 64-d); pass
``pool="flatten", input_size=S`` for that, and feed images of exactly ``S`` pixels.
Mixup points: input, after each of the four blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from s2m2.models import register_backbone
from s2m2.models.base import Backbone


class FlattenExact(nn.Module):
    """(B, C, side, side) -> (B, C * side * side), refusing other sizes (the feature size would change)."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.side, self.side):
            raise ValueError(f"Conv-4 with pool='flatten' was built for {self.side}x{self.side} final maps, "
                             f"got {tuple(x.shape[-2:])}: feed images of the input_size it was built for")
        return x.flatten(1)


def _conv_block(in_planes: int, out_planes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 3, padding=1),
        nn.BatchNorm2d(out_planes),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Conv4(Backbone):
    """``forward(x (B, 3, H, W), mix_spec=None) -> (B, feature_dim)``.

    ``width``: one channel count for every block (the classic Conv-4), or one per block, e.g.
    ``[64, 96, 128, 256]``: the 16x16 second block costs most of the FLOPs, so widening only the later,
    smaller maps buys capacity cheaply. With ``c`` the last block's width, ``pool="avg"``: feature_dim =
    ``c``; ``pool="flatten"``: feature_dim = ``c * s * s`` with ``s = input_size // 2**depth`` (floor-halvings),
    and inputs must be ``input_size`` pixels.
    """

    def __init__(self, width: int | Sequence[int] = 64, depth: int = 4, pool: str = "avg",
                 input_size: int | None = None):
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ValueError(f"Conv-4 pool must be 'avg' or 'flatten', got {pool!r}")
        widths = [int(width)] * depth if isinstance(width, int) else [int(w) for w in width]
        if len(widths) != depth or min(widths) < 1:
            raise ValueError(f"Conv-4 width must be a positive int or {depth} positive ints, got {width!r}")
        self.stem = nn.Identity()
        self.stages = nn.ModuleList([_conv_block(c_in, c_out) for c_in, c_out in zip([3] + widths[:-1], widths)])
        if pool == "avg":
            self.tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.feature_dim = widths[-1]
        else:
            if input_size is None:
                raise ValueError("Conv-4 with pool='flatten' needs input_size to know its feature size")
            side = input_size
            for _ in range(depth):
                side //= 2
            if side < 1:
                raise ValueError(f"input_size {input_size} is too small for {depth} max-pools")
            self.tail = FlattenExact(side)
            self.feature_dim = widths[-1] * side * side
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


@register_backbone("conv4")
def conv4(width: int | Sequence[int] = 64, pool: str = "avg", input_size: int | None = None) -> Conv4:
    return Conv4(width=width, depth=4, pool=pool, input_size=input_size)
