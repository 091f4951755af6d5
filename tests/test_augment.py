"""Batched training augmentation (s2m2.data.augment): geometry, colour, determinism."""

from __future__ import annotations

import math

import torch

from s2m2.data.augment import AugmentParams, TrainAugment, color_jitter, grey
from s2m2.data.transforms import normalize, to_float_nchw


def _images(batch=4, size=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, channels), generator=g, dtype=torch.uint8)


def _params(batch, top, left, h, w, flip=False, b=1.0, c=1.0, s=1.0):
    full = lambda v: torch.full((batch,), float(v))  # noqa: E731
    return AugmentParams(full(top), full(left), full(h), full(w), torch.full((batch,), flip), full(b), full(c), full(s))


def test_identity_params_give_the_normalised_image():
    x = _images()
    out = TrainAugment(crop_size=16, jitter=0.0).apply(x, _params(4, 0, 0, 16, 16))
    torch.testing.assert_close(out, normalize(to_float_nchw(x)), atol=1e-5, rtol=0)


def test_crop_box_of_output_size_is_an_exact_slice_and_flip_mirrors():
    x = _images(size=16)
    aug = TrainAugment(crop_size=8, jitter=0.0)
    out = aug.apply(x, _params(4, top=2, left=5, h=8, w=8))
    expected = normalize(to_float_nchw(x[:, 2:10, 5:13]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    flipped = aug.apply(x, _params(4, top=2, left=5, h=8, w=8, flip=True))
    torch.testing.assert_close(flipped, expected.flip(-1), atol=1e-5, rtol=0)


def test_upscaled_crop_covers_the_box_only():
    # A box over a constant region gives that constant when upsampled 4x, except within half an input
    # pixel of the box edge (2 output pixels), where bilinear sampling of the whole image blends in the
    # neighbouring pixels (torchvision crops first, then resizes with edge clamping).
    x = torch.zeros(1, 16, 16, 3, dtype=torch.uint8)
    x[:, 4:8, 8:12] = 200
    out = TrainAugment(crop_size=16, jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1)).apply(x, _params(1, 4, 8, 4, 4))
    inner = out[..., 2:-2, 2:-2]
    torch.testing.assert_close(inner, torch.full_like(inner, 200 / 255), atol=1e-5, rtol=0)
    assert out[..., 0, 0].max() < 200 / 255


def test_sampled_boxes_respect_scale_ratio_and_bounds():
    aug = TrainAugment(crop_size=8)
    p = aug.sample(4000, 20, 30, torch.Generator().manual_seed(1))
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= 20).all() and (p.left + p.width <= 30).all()
    area = p.height * p.width / (20 * 30)
    assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0  # rounding to whole pixels
    ratio = p.width / p.height
    assert ratio.min() >= 0.75 * 0.8 and ratio.max() <= (4 / 3) * 1.25
    assert 0.45 < p.flip.float().mean() < 0.55
    for f in (p.brightness, p.contrast, p.saturation):
        assert f.min() >= 0.6 and f.max() <= 1.4 and abs(float(f.mean()) - 1.0) < 0.02
    # log-ratio uniform: about half the boxes are wider than tall
    assert 0.4 < float((ratio > 1).float().mean()) < 0.6


def test_same_generator_seed_same_batch_and_different_seed_differs():
    x = _images(8, 16)
    aug = TrainAugment(crop_size=12)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 12, 12) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_color_jitter_factors():
    x = to_float_nchw(_images(2, 8))
    one = torch.ones(2)
    torch.testing.assert_close(color_jitter(x, one, one, one), x)
    torch.testing.assert_close(color_jitter(x, torch.full((2,), 0.5), one, one), x * 0.5)
    flat = color_jitter(x, one, torch.zeros(2), one)  # contrast 0 -> the image's mean grey everywhere
    torch.testing.assert_close(flat, grey(x).mean(dim=(2, 3), keepdim=True).expand_as(x))
    desat = color_jitter(x, one, one, torch.zeros(2))  # saturation 0 -> grey image
    torch.testing.assert_close(desat, grey(x).expand_as(x))
    assert color_jitter(x, torch.full((2,), 1.4), torch.full((2,), 1.4), torch.full((2,), 1.4)).max() <= 1.0


def test_grey_input_becomes_three_channels():
    x = _images(3, 16, channels=1)
    out = TrainAugment(crop_size=8)(x, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 8, 8)
    assert math.isfinite(float(out.sum()))
