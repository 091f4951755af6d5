"""What every backbone is: a stem, a list of stages, and a pooling tail, with Manifold Mixup points.

Mixup points are numbered 0 (the input) .. len(stages) (after the last stage, before the final
norm/activation/pool), matching the release's WRN mixing points {input, block1, block2, block3}.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MixSpec:
    """One Manifold Mixup draw for a batch: mix at ``layer`` with weight ``lam`` against ``perm``.

    ``h <- lam * h + (1 - lam) * h[perm]`` at mixup point ``layer``.
    """

    layer: int
    lam: float
    perm: torch.Tensor  # (B,) int64, a permutation of the batch


def mix(h: torch.Tensor, spec: MixSpec) -> torch.Tensor:
    return spec.lam * h + (1.0 - spec.lam) * h[spec.perm]


class Backbone(nn.Module):
    """Feature extractor: ``forward(x (B, 3, H, W), mix=None) -> features (B, feature_dim)``.

    Subclasses build ``self.stem``, ``self.stages`` (nn.ModuleList) and ``self.tail`` (everything
    after the last stage up to a flat (B, feature_dim) tensor) and set ``self.feature_dim``.
    """

    feature_dim: int
    stem: nn.Module
    stages: nn.ModuleList
    tail: nn.Module

    @property
    def num_mix_points(self) -> int:
        """Number of Manifold Mixup points: the input plus one after each stage."""
        return len(self.stages) + 1

    def forward(self, x: torch.Tensor, mix_spec: MixSpec | None = None) -> torch.Tensor:
        if mix_spec is not None and not 0 <= mix_spec.layer < self.num_mix_points:
            raise ValueError(f"mixup layer {mix_spec.layer} outside 0..{self.num_mix_points - 1}")
        if mix_spec is not None and mix_spec.layer == 0:
            x = mix(x, mix_spec)
        h = self.stem(x)
        for index, stage in enumerate(self.stages, start=1):
            h = stage(h)
            if mix_spec is not None and mix_spec.layer == index:
                h = mix(h, mix_spec)
        return self.tail(h)
