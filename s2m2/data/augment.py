"""Batched training augmentation on uint8 image batches, on the training device.

The paper's training transform (spec §6) applied to a whole (B, H, W, C) uint8 batch at once:

1. RandomResizedCrop to ``crop_size`` from the stored image (area fraction in ``scale``, aspect ratio in
   ``ratio``, 10 tries then a centre fallback, as torchvision), done with per-sample affine grids and
   ONE ``F.grid_sample`` call, horizontal flip folded into the same grid (a negative x scale);
2. brightness, contrast and saturation factors each uniform in [1 - jitter, 1 + jitter] per image,
   applied in that fixed order with clamping to [0, 1] after each (the release's ImageJitter applies
   PIL's Brightness, Contrast and Color enhancers in this order);
3. ImageNet mean/std normalisation.

Every random number comes from the ``torch.Generator`` passed in (drawn on the CPU, so the draws are the
same whatever the device), which is what makes training reproducible and resumable.

Crops at source resolution (``TrainAugment(source_sized=True)``): a full-resolution source's training view
is the whole photo squashed to T x T plus its original (height, width). The crop boxes are then sampled in
the ORIGINAL photo's pixel coordinates, exactly as torchvision's ``RandomResizedCrop.get_params`` on the
full-resolution image (area and aspect relative to the real photo, not to a squashed square), and mapped
into the T x T view (x * T / W, y * T / H) to be resampled. The sizes travel inside the batch tensor (one
extra row per image, :func:`pack_source_sizes`) because step functions index image subsets
(``images[subset]``) before augmenting them: a size list kept beside the batch would lose track.

Differences from torchvision/PIL (documented deviations): the crop is resampled bilinearly without
antialiasing (torchvision's tensor resize antialiases when shrinking; with stored images of 84-92 px, or a
160-px training view, and 80 px crops the shrink factor is at most 2x, where bilinear sampling still
averages every input pixel); the crop is sampled from the whole image, so output pixels within
half an input pixel of the box edge blend in the pixels just outside the box (torchvision crops first and
clamps at the crop's edge); and PIL's enhancers work on rounded uint8 values while we stay
in float between steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from s2m2.data.transforms import IMAGENET_MEAN, IMAGENET_STD

_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, what PIL's convert("L") uses
_CROP_TRIES = 10
_SIZE_BYTES = 8  # (height, width) as two int32 in the header row of a packed batch


def pack_source_sizes(images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, T, C) training views + (B, 2) original (height, width) -> uint8 (B, T + 1, T, C).

    Row T of each image is a header whose first 8 bytes hold the two sizes as int32, so the sizes follow
    the images through indexing, ``.to(device)`` and pinning. Needs T * C >= 8.
    """
    batch, height, width, channels = images.shape
    if width * channels < _SIZE_BYTES:
        raise ValueError(f"images of width {width} x {channels} channels are too small to carry their sizes")
    header = torch.zeros(batch, 1, width, channels, dtype=torch.uint8)
    header.view(batch, -1)[:, :_SIZE_BYTES] = sizes.to(torch.int32).contiguous().view(torch.uint8)
    return torch.cat([images, header], dim=1)


def unpack_source_sizes(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, T + 1, T, C) -> (images uint8 (B, T, T, C) view, sizes int64 (B, 2) on the CPU)."""
    batch = packed.shape[0]
    # a fresh copy: viewing bytes as int32 needs a 4-byte-aligned start, which a slice may not have
    header = packed[:, -1].reshape(batch, -1)[:, :_SIZE_BYTES].cpu().clone(memory_format=torch.contiguous_format)
    return packed[:, :-1], header.view(torch.int32).long()


@dataclass
class AugmentParams:
    """Per-image random draws of one batch (all CPU tensors of length B)."""

    top: torch.Tensor       # float, crop top edge in pixels
    left: torch.Tensor      # float, crop left edge in pixels
    height: torch.Tensor    # float, crop height in pixels
    width: torch.Tensor     # float, crop width in pixels
    flip: torch.Tensor      # bool, mirror horizontally
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor


@dataclass(frozen=True)
class TrainAugment:
    """``augment(images uint8 (B, H, W, C), generator) -> float32 (B, 3, crop_size, crop_size)``."""

    crop_size: int = 80
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4
    flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source_sized: bool = False  # input: packed training views + original sizes, crops in original pixels

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> AugmentParams:
        """Draw the crop boxes, flips and colour factors of ``batch`` images of size height x width."""
        sizes = torch.tensor([[height, width]], dtype=torch.float32).expand(batch, 2)
        return self.sample_sized(sizes, generator)

    def sample_sized(self, sizes: torch.Tensor, generator: torch.Generator) -> AugmentParams:
        """Draws for images of per-image sizes ``sizes`` (B, 2) = (height, width): crop boxes in each
        image's own pixels, as torchvision's ``RandomResizedCrop.get_params`` on it (``_CROP_TRIES`` tries,
        then the whole image clamped to the ratio range, centred), then flips and colour factors."""
        g = generator
        batch = sizes.shape[0]
        height = sizes[:, 0].float()[:, None]  # (B, 1)
        width = sizes[:, 1].float()[:, None]
        area = height * width
        # RandomResizedCrop: _CROP_TRIES candidate boxes per image, keep the first that fits.
        target_area = area * torch.empty(batch, _CROP_TRIES).uniform_(self.scale[0], self.scale[1], generator=g)
        log_ratio = torch.empty(batch, _CROP_TRIES).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                             generator=g)
        aspect = torch.exp(log_ratio)
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.argmax(fits.int(), dim=1)  # index of the first fitting try (0 if none fits)
        any_fit = fits.any(dim=1)
        w = w.gather(1, first[:, None]).squeeze(1)
        h = h.gather(1, first[:, None]).squeeze(1)
        height, width = height.squeeze(1), width.squeeze(1)
        # Fallback (no try fitted): the whole image, clamped to the ratio range, centred.
        in_ratio = width / height
        fw = torch.where(in_ratio > self.ratio[1], torch.round(height * self.ratio[1]), width)
        fh = torch.where(in_ratio < self.ratio[0], torch.round(width / self.ratio[0]), height)
        w = torch.where(any_fit, w, fw)
        h = torch.where(any_fit, h, fh)
        u = torch.rand(batch, 2, generator=g)
        top = torch.floor(u[:, 0] * (height - h + 1))
        left = torch.floor(u[:, 1] * (width - w + 1))
        top = torch.where(any_fit, top, torch.div(height - fh, 2, rounding_mode="floor"))
        left = torch.where(any_fit, left, torch.div(width - fw, 2, rounding_mode="floor"))
        flip = (torch.rand(batch, generator=g) < 0.5) if self.flip else torch.zeros(batch, dtype=torch.bool)
        factors = torch.empty(batch, 3).uniform_(1.0 - self.jitter, 1.0 + self.jitter, generator=g)
        return AugmentParams(top, left, h, w, flip, factors[:, 0], factors[:, 1], factors[:, 2])

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """uint8 (B, H, W, C) on any device + params -> normalised float32 (B, 3, crop, crop)."""
        batch, height, width, _ = images.shape
        device = images.device
        size = self.crop_size
        x = images.permute(0, 3, 1, 2).float()  # (B, C, H, W) in [0, 255]; grey stays 1 channel here
        # Sampling grid in normalised coordinates (align_corners=False): output pixel centres in [-1, 1]
        # map affinely onto the crop box; a negative x scale mirrors. Separable, so built by broadcasting
        # (cheaper than F.affine_grid's batched matmul).
        sx = params.width / width
        sx = torch.where(params.flip, -sx, sx)
        sy = params.height / height
        cx = (2 * params.left + params.width) / width - 1
        cy = (2 * params.top + params.height) / height - 1
        lin = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # output pixel centres, (S,)
        gx = (sx[:, None] * lin + cx[:, None]).to(device)  # (B, S)
        gy = (sy[:, None] * lin + cy[:, None]).to(device)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, S, S, 2)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        if self.jitter > 0:
            x = color_jitter(x, params.brightness.to(device), params.contrast.to(device),
                             params.saturation.to(device), max_value=255.0)
        # normalise and rescale in one pass: (x / 255 - mean) / std
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        return torch.addcmul(-mean / std, x, 1.0 / (255.0 * std))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float32 (B, 3, crop, crop); with ``source_sized`` the input is a packed
        batch (B, T + 1, T, C) of training views and original sizes (:func:`pack_source_sizes`)."""
        if not self.source_sized:
            return self.apply(images, self.sample(images.shape[0], images.shape[1], images.shape[2], generator))
        views, sizes = unpack_source_sizes(images)
        return self.apply(views, to_view(self.sample_sized(sizes, generator), sizes, views.shape[1], views.shape[2]))


def to_view(params: AugmentParams, sizes: torch.Tensor, view_height: int, view_width: int) -> AugmentParams:
    """Crop boxes in original pixels (per-image ``sizes`` (B, 2) = (height, width)) -> the same boxes in
    the pixels of a view_height x view_width resize of each image (y * view_height / height, likewise x)."""
    sy = view_height / sizes[:, 0].float()
    sx = view_width / sizes[:, 1].float()
    return dataclasses.replace(params, top=params.top * sy, left=params.left * sx,
                               height=params.height * sy, width=params.width * sx)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) luma."""
    r, g, b = _GREY
    return (x[:, 0:1] * r).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Per-image brightness, contrast, saturation (each (B,)) on (B, 3, H, W) in [0, max_value], in that order.

    brightness: blend with black; contrast: blend with the image's mean grey level; saturation: blend
    with the per-pixel grey image; each result clamped to [0, max_value]. Factor 1 is the identity.
    Works in place on ``x`` where it can (one pass per operation).
    """
    view = (-1, 1, 1, 1)
    x = x.mul(brightness.view(view)).clamp_(0.0, max_value)
    weights = torch.tensor(_GREY, device=x.device, dtype=x.dtype)
    mean_grey = (x.mean(dim=(2, 3)) @ weights).view(view)  # mean of the grey image = grey of channel means
    x = torch.lerp(mean_grey.expand_as(x), x, contrast.view(view)).clamp_(0.0, max_value)
    x = torch.lerp(grey(x).expand_as(x), x, saturation.view(view)).clamp_(0.0, max_value)
    return x


__all__ = ["AugmentParams", "TrainAugment", "color_jitter", "grey", "pack_source_sizes", "to_view",
           "unpack_source_sizes"]
