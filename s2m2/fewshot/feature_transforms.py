"""Optional transforms of frozen features before fitting a head (all off by default).

Applied in this order, each to the whole feature matrix once (not per episode):

1. power transform ``x -> (x + 1e-6) ** beta`` (PT+MAP, Hu et al. 2021; features are post-ReLU, so >= 0),
2. centring: subtract the mean feature of the *base* classes (EASY, Bendou et al. 2022), taken after step 1,
3. L2 normalisation of every feature.

The release evaluates raw features (its cosine head normalises internally); these are our additions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FeatureTransform:
    """Which transforms to apply; ``center`` needs the base-class features."""

    power: float | None = None
    center: bool = False
    l2: bool = False

    def is_identity(self) -> bool:
        return self.power is None and not self.center and not self.l2

    def describe(self) -> dict:
        return asdict(self)

    def _power(self, features: torch.Tensor) -> torch.Tensor:
        if self.power is None:
            return features
        if (features < 0).any():
            raise ValueError("the power transform needs non-negative features (post-ReLU); these have "
                             f"negative entries (min {float(features.min()):.3g})")
        return (features + 1e-6).pow(self.power)

    def base_mean(self, base_features: torch.Tensor) -> torch.Tensor:
        """Mean (D,) of the base features after the power transform, for centring."""
        return self._power(base_features.float()).mean(0)

    def __call__(self, features: torch.Tensor, base_mean: torch.Tensor | None = None) -> torch.Tensor:
        """float (N, D) -> transformed float (N, D)."""
        x = self._power(features.float())
        if self.center:
            if base_mean is None:
                raise ValueError("centring needs the base-class mean: pass base features (--base-features FILE)")
            if base_mean.shape != x.shape[1:]:
                raise ValueError(f"base mean has shape {tuple(base_mean.shape)}, features have dim {x.shape[1]}")
            x = x - base_mean
        if self.l2:
            x = F.normalize(x, dim=-1)
        return x
