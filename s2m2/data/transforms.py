"""Batched evaluation transform on uint8 image tensors (the release's test transform).

The release resizes every test image to 92x92 (ignoring aspect ratio), centre-crops 80x80 and
normalises with the ImageNet mean/std; for 32x32 CIFAR-FS images it is 36 -> 32. Here the same
transform runs on whole batches of uint8 (B, H, W, C) tensors, on CPU or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) with C in {1, 3} -> float32 (B, 3, H, W) in [0, 1] (grey repeated to RGB)."""
    if images.dim() != 4:
        raise ValueError(f"expected (B, H, W, C) images, got shape {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) float -> normalised with per-channel mean/std."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class EvalTransform:
    """Resize to ``resize`` x ``resize`` (aspect-distorting, as the release), centre-crop ``crop``.

    ``EvalTransform(92, 80)`` for mini-ImageNet / tiered / CUB, ``EvalTransform(36, 32)`` for CIFAR-FS.
    """

    resize: int = 92
    crop: int = 80
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float32 (B, 3, crop, crop), normalised."""
        x = to_float_nchw(images)
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        top = (self.resize - self.crop) // 2
        x = x[:, :, top:top + self.crop, top:top + self.crop]
        return normalize(x, self.mean, self.std)

    def key(self) -> str:
        """Stable description, used in feature-cache keys."""
        return f"resize{self.resize}-crop{self.crop}-mean{list(self.mean)}-std{list(self.std)}"
