"""Conv-4: four ``conv3x3(64) - BN - ReLU - maxpool2`` blocks (the classic few-shot backbone).

``pool_first=True`` orders each block ``conv3x3 - maxpool2 - BN - ReLU`` (our budget-recipe variant, not
the release's): max-pooling commutes with ReLU and with any per-channel affine map of positive scale, so
the blocks compute the same family of functions, but BatchNorm and ReLU (forward and backward) run on a
quarter of the elements. Their memory traffic, not the convolutions' FLOPs, dominates a small Conv-4 on
a CPU: an Adam step is 1.9x faster for the Omniglot demo's Conv-4 and 1.2-1.3x for the CIFAR-FS pyramids
(``scripts/bench_models.py --only conv4-order``, docs/benchmarks.md).
What differs: BatchNorm's batch statistics are those of the pooled maps.

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


def _conv_block(in_planes: int, out_planes: int, pool_first: bool = False) -> nn.Sequential:
    conv, norm = nn.Conv2d(in_planes, out_planes, 3, padding=1), nn.BatchNorm2d(out_planes)
    if pool_first:
        return nn.Sequential(conv, nn.MaxPool2d(2), norm, nn.ReLU(inplace=True))
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True), nn.MaxPool2d(2))


class Conv4(Backbone):
    """``forward(x (B, 3, H, W), mix_spec=None) -> (B, feature_dim)``.

    ``width``: one channel count for every block (the classic Conv-4), or one per block, e.g.
    ``[64, 96, 128, 256]``: the 16x16 second block costs most of the FLOPs, so widening only the later,
    smaller maps buys capacity cheaply. With ``c`` the last block's width, ``pool="avg"``: feature_dim =
    ``c``; ``pool="flatten"``: feature_dim = ``c * s * s`` with ``s = input_size // 2**depth`` (floor-halvings),
    and inputs must be ``input_size`` pixels. ``pool_first``: blocks ``conv - maxpool - BN - ReLU`` (module
    docstring; the parameter names then differ from the classic block's, so neither loads the other's
    weights by mistake).
    """

    def __init__(self, width: int | Sequence[int] = 64, depth: int = 4, pool: str = "avg",
                 input_size: int | None = None, pool_first: bool = False):
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ValueError(f"Conv-4 pool must be 'avg' or 'flatten', got {pool!r}")
        if not isinstance(pool_first, bool):  # YAML "false" in quotes would otherwise read as true
            raise ValueError(f"Conv-4 pool_first must be true or false, got {pool_first!r}")
        widths = [int(width)] * depth if isinstance(width, int) else [int(w) for w in width]
        if len(widths) != depth or min(widths) < 1:
            raise ValueError(f"Conv-4 width must be a positive int or {depth} positive ints, got {width!r}")
        self.stem = nn.Identity()
        self.stages = nn.ModuleList([_conv_block(c_in, c_out, pool_first)
                                     for c_in, c_out in zip([3] + widths[:-1], widths)])
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
def conv4(width: int | Sequence[int] = 64, pool: str = "avg", input_size: int | None = None,
          pool_first: bool = False) -> Conv4:
    return Conv4(width=width, depth=4, pool=pool, input_size=input_size, pool_first=pool_first)
