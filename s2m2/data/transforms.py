"""Batched evaluation transform on uint8 image tensors (the release's test transform).

The release resizes every test image to 92x92 (ignoring aspect ratio), centre-crops 80x80 and
normalises with the ImageNet mean/std; for 32x32 CIFAR-FS images it is 36 -> 32. Here the same
transform runs on whole batches of uint8 (B, H, W, C) tensors, on CPU or GPU.

Test views (our addition; the release evaluates the centre crop only): ``views="flip"`` adds the centre
crop's mirror image, ``views="ten_crop"`` takes the four corner crops and the centre crop of the resized
image, each with its mirror (the 10-crop of ImageNet evaluation). :func:`s2m2.features.extract_features`
averages an image's features over its views, so each image still has one feature vector and no episode
sees another image: the protocol stays inductive. It is an evaluation change: compare results made with
the same views only (records carry them in ``features.transform``).
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


VIEWS = ("centre", "flip", "ten_crop")
"""Test views per image: the release's centre crop; + its mirror; the 4 corners + centre, each mirrored."""


@dataclass(frozen=True)
class EvalTransform:
    """Resize to ``resize`` x ``resize`` (aspect-distorting, as the release), centre-crop ``crop``.

    ``EvalTransform(92, 80)`` for mini-ImageNet / tiered / CUB, ``EvalTransform(36, 32)`` for CIFAR-FS.
    ``views``: one of :data:`VIEWS` (module docstring); ``__call__`` is always the centre crop, and
    :meth:`view_batches` gives every view.
    """

    resize: int = 92
    crop: int = 80
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    views: str = "centre"

    def __post_init__(self):
        if self.views not in VIEWS:
            raise ValueError(f"test views must be one of {', '.join(VIEWS)}, got {self.views!r}")
        if not 1 <= self.crop <= self.resize:
            raise ValueError(f"test crop {self.crop} must be between 1 and the resize {self.resize}")

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float_nchw(images)
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        return x

    def _crop(self, x: torch.Tensor, top: int, left: int) -> torch.Tensor:
        return normalize(x[:, :, top:top + self.crop, left:left + self.crop], self.mean, self.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float32 (B, 3, crop, crop), normalised: the centre crop."""
        centre = (self.resize - self.crop) // 2
        return self._crop(self._resized(images), centre, centre)

    def view_batches(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 (B, H, W, C) -> the V views of ``views``, each float32 (B, 3, crop, crop), normalised.

        V = 1 (centre), 2 (centre, mirrored centre) or 10 (centre, top-left, top-right, bottom-left,
        bottom-right, then the same five mirrored). The first view is always ``self(images)``.
        """
        x = self._resized(images)
        centre, far = (self.resize - self.crop) // 2, self.resize - self.crop
        corners = [(centre, centre)]
        if self.views == "ten_crop":
            corners += [(0, 0), (0, far), (far, 0), (far, far)]
        crops = [self._crop(x, top, left) for top, left in corners]
        if self.views != "centre":
            crops += [c.flip(-1) for c in crops]
        return crops

    def key(self) -> str:
        """Stable description, used in feature-cache keys (the centre view adds nothing, so caches written
        before views were a choice keep their keys)."""
        return (f"resize{self.resize}-crop{self.crop}-mean{list(self.mean)}-std{list(self.std)}"
                + ("" if self.views == "centre" else f"-views{self.views}"))
