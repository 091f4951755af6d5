"""Classifier heads on top of a backbone's 1-D feature.

- ``CosineClassifier``: the release's "distLinear" (spec §3), the head of Baseline++, Manifold Mixup
  and S2M2: ``logits = scale * <x / (||x|| + 1e-5), g_c * v_c / ||v_c||>`` with a learnable per-class
  gain ``g_c`` (so it is *not* a pure cosine), no bias.
- ``LinearClassifier``: ``nn.Linear`` with bias, the softmax head of the Baseline method.
- ``RotationHead``: ``nn.Linear(in_dim, 4)`` predicting the rotation (0/90/180/270 degrees).

``create_head(name, in_dim, num_classes, **kwargs)`` builds them from config/checkpoint metadata
(``{"name": ..., "kwargs": ...}``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The release adds this to the feature norm before dividing (x / (||x|| + 1e-5)).
FEATURE_NORM_EPS = 1e-5


def default_cosine_scale(num_classes: int) -> float:
    """The release's rule: scale 2 for at most 200 outputs, else 10 (spec §3)."""
    return 2.0 if num_classes <= 200 else 10.0


class CosineClassifier(nn.Module):
    """Cosine classifier with weight-normalised classes and a learnable per-class gain.

    ``forward(x (B, in_dim)) -> logits (B, num_classes)``.

    Parameters ``weight_v`` (C, D) (direction) and ``weight_g`` (C, 1) (gain) carry the names the
    release's ``torch.nn.utils.weight_norm(nn.Linear(D, C, bias=False), dim=0)`` gives them, so its
    ``L.weight_v`` / ``L.weight_g`` import by name. We write the normalisation out explicitly instead of
    using the deprecated ``weight_norm`` hook (or its ``parametrizations`` successor, whose parameter
    names differ); the arithmetic is the same: ``w_c = g_c * v_c / ||v_c||`` with no epsilon.

    ``scale=None`` follows the release (2 if ``num_classes <= 200`` else 10). ``weight_v`` starts with
    ``nn.Linear``'s default initialisation and ``weight_g = ||v_c||``, so the initial ``w`` equals
    ``v`` exactly as in the release.
    """

    def __init__(self, in_dim: int, num_classes: int, scale: float | None = None):
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.scale = float(default_cosine_scale(num_classes) if scale is None else scale)
        self.weight_v = nn.Parameter(torch.empty(num_classes, in_dim))
        self.weight_g = nn.Parameter(torch.empty(num_classes, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in_dim), 1/sqrt(in_dim)).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=1, keepdim=True))

    def class_weights(self) -> torch.Tensor:
        """The effective class weights ``g_c * v_c / ||v_c||``, shape (C, D)."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = x / (x.norm(dim=1, keepdim=True) + FEATURE_NORM_EPS)
        return self.scale * F.linear(x_hat, self.class_weights())

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}, scale={self.scale:g}"


class LinearClassifier(nn.Linear):
    """Plain softmax head (linear + bias): ``forward(x (B, in_dim)) -> logits (B, num_classes)``."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__(in_dim, num_classes, bias=True)
        self.in_dim = in_dim
        self.num_classes = num_classes

    def reset_parameters(self) -> None:
        # The release's Baseline head: PyTorch's default weight init, bias filled with 0.
        super().reset_parameters()
        nn.init.zeros_(self.bias)


class RotationHead(nn.Linear):
    """Rotation prediction head: ``forward(x (B, in_dim)) -> logits (B, 4)`` over 0/90/180/270 degrees.

    The release stores it as ``nn.Sequential(nn.Linear(640, 4))`` (keys ``0.weight``/``0.bias``);
    ``s2m2.checkpoint`` maps those to our ``weight``/``bias``.
    """

    num_rotations = 4

    def __init__(self, in_dim: int):
        super().__init__(in_dim, self.num_rotations, bias=True)
        self.in_dim = in_dim


def head_spec(head: nn.Module) -> dict:
    """``{"name", "kwargs"}`` that ``create_head(name, **kwargs)`` turns back into ``head`` (for checkpoints)."""
    if isinstance(head, CosineClassifier):
        return {"name": "cosine", "kwargs": {"in_dim": head.in_dim, "num_classes": head.num_classes, "scale": head.scale}}
    if isinstance(head, RotationHead):
        return {"name": "rotation", "kwargs": {"in_dim": head.in_dim}}
    if isinstance(head, LinearClassifier):
        return {"name": "linear", "kwargs": {"in_dim": head.in_dim, "num_classes": head.num_classes}}
    raise TypeError(f"not one of our heads: {type(head).__name__}")


HEADS = {"cosine": CosineClassifier, "linear": LinearClassifier, "rotation": RotationHead}


def create_head(name: str, in_dim: int, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build a head by name: ``"cosine"`` (kwargs: ``scale``), ``"linear"`` or ``"rotation"``.

    ``num_classes`` is required for the classifiers; the rotation head always has 4 outputs and
    accepts ``num_classes`` only if it is None or 4.
    """
    if name not in HEADS:
        raise KeyError(f"unknown head {name!r}; available: {sorted(HEADS)}")
    if name == "rotation":
        if num_classes not in (None, RotationHead.num_rotations):
            raise ValueError(f"the rotation head has 4 outputs, got num_classes={num_classes}")
        if kwargs:
            raise TypeError(f"unexpected arguments for the rotation head: {sorted(kwargs)}")
        return RotationHead(in_dim)
    if num_classes is None:
        raise ValueError(f"head {name!r} needs num_classes")
    return HEADS[name](in_dim, num_classes, **kwargs)


__all__ = ["CosineClassifier", "LinearClassifier", "RotationHead", "create_head", "default_cosine_scale", "head_spec"]
