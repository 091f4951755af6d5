"""Guards for the paper's recipe against INDEPENDENT references (issue 9, item 4).

Each test here compares s2m2's data pipeline with torchvision (v1 PIL transforms, v2 functional ops, or
``RandomResizedCrop.get_params``) or with published constants written out in the test, never with s2m2's
own code, so a wrong constant or a wrong formula in ``s2m2.data`` makes a test fail. Every test is seeded:
the statistical ones compare fixed samples with tolerances far outside sampling noise, so they cannot flake.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from s2m2.data.augment import AugmentParams, TrainAugment, color_jitter
from s2m2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, normalize, to_float_nchw

# The ImageNet statistics every torchvision classification model card publishes (and the release uses):
# https://pytorch.org/vision/stable/models.html -- written out here, not imported from s2m2.
PUBLISHED_MEAN = (0.485, 0.456, 0.406)
PUBLISHED_STD = (0.229, 0.224, 0.225)


def _uint8_images(batch, height, width, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, channels), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------- normalisation constants


def test_imagenet_mean_std_are_the_published_constants():
    assert IMAGENET_MEAN == PUBLISHED_MEAN and IMAGENET_STD == PUBLISHED_STD
    # ... and they are what both transforms use by default
    assert TrainAugment().mean == PUBLISHED_MEAN and TrainAugment().std == PUBLISHED_STD
    assert EvalTransform().mean == PUBLISHED_MEAN and EvalTransform().std == PUBLISHED_STD


def test_normalisation_equals_torchvision_normalize_with_published_constants():
    x = to_float_nchw(_uint8_images(3, 8, 8, seed=0))
    torch.testing.assert_close(normalize(x), TF.normalize(x, list(PUBLISHED_MEAN), list(PUBLISHED_STD)),
                               rtol=0, atol=1e-6)
    # in the input's precision (float64 features of a float64 pipeline keep float64 constants)
    x64 = x.double()
    assert torch.equal(normalize(x64), TF.normalize(x64, list(PUBLISHED_MEAN), list(PUBLISHED_STD)))


def test_to_float_nchw_repeats_grey_to_three_channels():
    grey = _uint8_images(2, 5, 7, seed=8, channels=1)
    x = to_float_nchw(grey)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert torch.equal(x, (grey.permute(0, 3, 1, 2).float() / 255).expand(-1, 3, -1, -1))
    rgb = _uint8_images(2, 5, 7, seed=8)
    torch.testing.assert_close(to_float_nchw(rgb), TF.to_dtype(rgb.permute(0, 3, 1, 2), torch.float32, scale=True),
                               rtol=0, atol=1e-7)


# -------------------------------------------------------------------------- evaluation transform


def test_eval_transform_is_bit_exact_with_torchvision_resize92_centercrop80():
    """The release's test transform, Resize((92, 92)) -> CenterCrop(80) -> ToTensor -> Normalize (torchvision
    v1 on PIL images), applied to full-resolution photos of any aspect ratio, equals EvalTransform(92, 80)
    applied to the stored 92x92 uint8 view of the same photos (what `s2m2 prepare` stores: PIL bilinear
    resize to 92x92), bit for bit."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(300, 200), (120, 160), (500, 375), (92, 92)]]
    release = T.Compose([T.Resize((92, 92)), T.CenterCrop(80), T.ToTensor(),
                         T.Normalize(PUBLISHED_MEAN, PUBLISHED_STD)])
    stored = torch.stack([torch.from_numpy(np.array(T.Resize((92, 92))(p))) for p in photos])  # (B, 92, 92, 3)
    ours = EvalTransform(92, 80)(stored)
    expected = torch.stack([release(p) for p in photos])
    assert ours.shape == expected.shape == (4, 3, 80, 80)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("height,width", [(84, 84), (120, 100)])
def test_eval_transform_of_other_sizes_equals_torchvision_functional_resize_and_crop(height, width):
    """Stored images that are not 92 px (Ravi's 84-px files, larger stored views) are resized in float,
    antialiased bilinear, exactly as torchvision's tensor resize does, then centre-cropped and normalised."""
    images = _uint8_images(3, height, width, seed=1)
    x = images.permute(0, 3, 1, 2).float() / 255
    expected = TF.normalize(TF.center_crop(TF.resize(x, [92, 92], antialias=True), [80, 80]),
                            list(PUBLISHED_MEAN), list(PUBLISHED_STD))
    assert torch.equal(EvalTransform(92, 80)(images), expected)


def test_eval_transform_grey_images_and_custom_statistics():
    """Grey (C = 1) images become 3 identical channels (torchvision's Grayscale(3) of the same pixels);
    mean/std given to the transform are the ones used."""
    grey = _uint8_images(2, 92, 92, seed=6, channels=1)
    release = T.Compose([T.Grayscale(num_output_channels=3), T.CenterCrop(80), T.ToTensor(),
                         T.Normalize(PUBLISHED_MEAN, PUBLISHED_STD)])
    expected = torch.stack([release(Image.fromarray(im[..., 0].numpy())) for im in grey])
    assert torch.equal(EvalTransform(92, 80)(grey), expected)
    plain = EvalTransform(92, 80, mean=(0.0, 0.0, 0.0), std=(0.5, 0.5, 0.5))(grey)
    torch.testing.assert_close(plain, (grey[:, 6:86, 6:86].permute(0, 3, 1, 2).float() / 255 / 0.5).expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"got shape \(92, 92, 1\)"):
        EvalTransform()(grey[0])


def test_cifar_eval_transform_matches_the_release_within_one_grey_level():
    """CIFAR-FS: Resize(36) -> CenterCrop(32) on 32x32 PIL images (the release). PIL rounds its resize to
    uint8 and we stay in float, so agreement is within one grey level (1/255 before normalisation)."""
    images = _uint8_images(4, 32, 32, seed=2)
    release = T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor(), T.Normalize(PUBLISHED_MEAN, PUBLISHED_STD)])
    expected = torch.stack([release(Image.fromarray(im.numpy())) for im in images])
    ours = EvalTransform(36, 32)(images)
    levels = (ours - expected) * torch.tensor(PUBLISHED_STD).view(1, 3, 1, 1) * 255
    assert ours.shape == (4, 3, 32, 32) and levels.abs().max() <= 1.01


# --------------------------------------------------------------- RandomResizedCrop box distribution


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max distance between the empirical CDFs)."""
    a, b = a.sort().values, b.sort().values
    grid = torch.cat([a, b]).unique()
    cdf_a = torch.searchsorted(a, grid, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


@pytest.mark.parametrize("height,width,scale", [(60, 100, (0.08, 1.0)), (100, 60, (0.08, 1.0)), (92, 92, (0.08, 1.0)),
                                                (30, 90, (0.08, 1.0)), (84, 64, (0.25, 0.5)), (50, 60, (0.9, 1.0))])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width, scale):
    """Our batched box sampler draws (top, left, height, width) from the same distribution as torchvision's
    RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3)): 20,000 seeded boxes each, two-sample
    KS statistic per coordinate below 0.035 (the 1e-9 critical value at this size is 0.033; the seeded
    samples give < 0.01). Forcing the top (or left) offset to 0, or sampling it from the wrong range, gives
    a KS distance > 0.3. The shapes/scales exercise full-height and full-width boxes and (50x60 at scale
    0.9-1) the centre fallback of square-ish images."""
    n = 20_000
    p = TrainAugment(scale=scale).sample(n, height, width, torch.Generator().manual_seed(0))
    ours = torch.stack([p.top, p.left, p.height, p.width], 1).double()
    torch.manual_seed(0)  # get_params draws from the global generator
    blank = torch.zeros(1, height, width)
    reference = torch.tensor([RandomResizedCrop.get_params(blank, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
                             dtype=torch.float64)
    for column, name in enumerate(("top", "left", "height", "width")):
        assert _ks(ours[:, column], reference[:, column]) < 0.035, name
    # the offset relative to its free range (uniform on 0..H-h), and the box stays inside the image
    for column, size, extent in ((0, height, 2), (1, width, 3)):
        free = lambda boxes: boxes[:, column] / (size - boxes[:, extent]).clamp_min(1)  # noqa: E731
        assert _ks(free(ours), free(reference)) < 0.035
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    assert (ours >= 0).all()
    # boxes spanning the whole height / width (the edge of the "fits" test) are as frequent as torchvision's
    # (binomial sd < 0.0036 at n = 20,000)
    for column, size in ((2, height), (3, width)):
        assert abs(float((ours[:, column] == size).double().mean() - (reference[:, column] == size).double().mean())) < 0.015
    # top and left offsets are independent draws (the reference's correlation is ~0, sd 0.007)
    moving = (ours[:, 2] < height) & (ours[:, 3] < width)
    rel = torch.stack([ours[moving, 0] / (height - ours[moving, 2]), ours[moving, 1] / (width - ours[moving, 3])])
    assert abs(float(torch.corrcoef(rel)[0, 1])) < 0.05


@pytest.mark.parametrize("height,width", [(10, 300), (300, 10), (11, 301)])
def test_crop_fallback_is_torchvisions_centred_box(height, width):
    """When no try fits (very elongated images), torchvision's centre crop clamped to the ratio range."""
    p = TrainAugment().sample(64, height, width, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
    for i in range(64):  # compared as floats: a half-pixel offset is a different box
        assert (float(p.top[i]), float(p.left[i]), float(p.height[i]), float(p.width[i])) == expected


def test_mixed_fits_and_fallbacks_in_one_batch():
    """A 16x60 image: some tries fit, some images fall back; each image is decided on its own tries."""
    n = 20_000
    p = TrainAugment().sample(n, 16, 60, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    blank = torch.zeros(1, 16, 60)
    reference = torch.tensor([RandomResizedCrop.get_params(blank, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
                             dtype=torch.float64)
    ours = torch.stack([p.top, p.left, p.height, p.width], 1).double()
    fallback = (16, 21)  # torchvision's fallback box here: full height, width round(16 * 4/3)
    share = lambda boxes: float(((boxes[:, 2] == fallback[0]) & (boxes[:, 3] == fallback[1])).double().mean())  # noqa: E731
    assert 0.05 < share(reference) < 0.95 and abs(share(ours) - share(reference)) < 0.015
    for column in range(4):
        assert _ks(ours[:, column], reference[:, column]) < 0.035
    assert (ours[:, 0] + ours[:, 2] <= 16).all() and (ours[:, 1] + ours[:, 3] <= 60).all()


def test_train_augment_defaults_are_torchvision_random_resized_crop_and_the_papers_jitter():
    aug, rrc = TrainAugment(), RandomResizedCrop(80)
    assert aug.crop_size == 80 and aug.flip
    assert aug.scale == tuple(rrc.scale) and aug.ratio == pytest.approx(tuple(rrc.ratio))
    assert aug.jitter == 0.4  # factors uniform in [0.6, 1.4] (spec §6)


def test_no_flip_and_no_jitter_when_disabled():
    images = _uint8_images(64, 16, 16, seed=9)
    aug = TrainAugment(crop_size=16, flip=False, jitter=0.0)
    p = aug.sample(64, 16, 16, torch.Generator().manual_seed(0))
    assert p.flip.dtype == torch.bool and not p.flip.any()
    assert torch.equal(p.brightness, torch.ones(64)) and torch.equal(p.saturation, torch.ones(64))
    out = aug(images, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 16, 16)


def test_colour_factors_and_flips_are_uniform_per_image():
    p = TrainAugment().sample(20_000, 92, 92, torch.Generator().manual_seed(1))
    uniform = torch.empty(20_000, dtype=torch.float64).uniform_(0.6, 1.4, generator=torch.Generator().manual_seed(2))
    for factor in (p.brightness, p.contrast, p.saturation):
        assert _ks(factor.double(), uniform) < 0.035
        assert 0.6 <= float(factor.min()) and float(factor.max()) <= 1.4
    assert abs(float(p.flip.double().mean()) - 0.5) < 0.02  # 20,000 fair coins: sd 0.0035
    # the three factors are independent draws, not one factor reused
    assert not torch.equal(p.brightness, p.contrast) and not torch.equal(p.contrast, p.saturation)


# --------------------------------------------------------------- crop geometry and colour vs torchvision


def _params(boxes, flips, factors=None):
    b = len(boxes)
    t = torch.tensor(boxes, dtype=torch.float32)
    f = torch.ones(b, 3) if factors is None else torch.tensor(factors, dtype=torch.float32)
    return AugmentParams(t[:, 0], t[:, 1], t[:, 2], t[:, 3], torch.tensor(flips), f[:, 0], f[:, 1], f[:, 2])


def _inner(size, box, image_hw, flip):
    """Output region to compare with torchvision: all of it, except (when upsampling) the rows/columns within
    half an input pixel of a box edge that lies INSIDE the image (there we blend in the pixels beyond the
    box; at the image's own edge both clamp to the border pixel)."""
    top, left, h, w = box
    height, width = image_hw
    my = math.ceil(0.5 * size / h - 0.5) if h < size else 0
    mx = math.ceil(0.5 * size / w - 0.5) if w < size else 0
    rows = slice(my if top > 0 else 0, size - (my if top + h < height else 0))
    left_edge, right_edge = (mx if left > 0 else 0), (mx if left + w < width else 0)
    if flip:
        left_edge, right_edge = right_edge, left_edge
    return (slice(None), rows, slice(left_edge, size - right_edge))


def test_crop_resize_flip_equal_torchvision_resized_crop_away_from_the_box_edge():
    """Each image: torchvision's resized_crop (bilinear, no antialias, as documented in augment.py) then
    hflip, then Normalize. Equal except within half an input pixel of the box edge when upsampling (there
    we sample the neighbouring pixels of the whole image, torchvision clamps at the crop's edge)."""
    images = _uint8_images(6, 50, 70, seed=3)
    boxes = [(5, 12, 20, 20), (0, 0, 50, 70), (17, 30, 33, 40), (9, 3, 40, 64), (0, 0, 10, 12), (40, 50, 10, 20)]
    flips = [False, True, True, False, False, True]  # boxes are (top, left, h, w); the last two touch corners
    size = 32
    aug = TrainAugment(crop_size=size, jitter=0.0)
    ours = aug.apply(images, _params(boxes, flips))
    x = images.permute(0, 3, 1, 2).float() / 255
    for i, ((top, left, h, w), flip) in enumerate(zip(boxes, flips)):
        ref = TF.resized_crop(x[i], top, left, h, w, [size, size], antialias=False)
        ref = TF.normalize(TF.hflip(ref) if flip else ref, list(PUBLISHED_MEAN), list(PUBLISHED_STD))
        inner = _inner(size, (top, left, h, w), (50, 70), flip)
        torch.testing.assert_close(ours[i][inner], ref[inner], rtol=0, atol=1e-4, msg=f"box {i}")


def test_colour_jitter_equals_torchvision_adjust_brightness_contrast_saturation():
    """brightness -> contrast -> saturation (the release's ImageJitter order), each clamped, per image, against
    torchvision's functional ops; torchvision's grey uses 0.2989 for red where PIL (and we) use 0.299."""
    x = to_float_nchw(_uint8_images(4, 12, 12, seed=4))
    b = torch.tensor([0.6, 1.4, 1.0, 0.8])
    c = torch.tensor([1.3, 0.7, 0.6, 1.0])
    s = torch.tensor([0.65, 1.2, 1.4, 0.9])
    ours = color_jitter(x.clone(), b, c, s)
    for i in range(4):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i], float(b[i])), float(c[i])), float(s[i]))
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=2e-3)
    # on [0, 255] (how TrainAugment calls it) the result is the same up to the scale
    torch.testing.assert_close(color_jitter(x * 255, b, c, s, max_value=255.0) / 255, ours, rtol=0, atol=1e-5)


def test_full_training_augmentation_equals_a_torchvision_pipeline_from_the_same_draws():
    """TrainAugment.__call__ = sample() + apply(); replayed per image with torchvision ops from the same
    draws: resized_crop -> hflip -> brightness -> contrast -> saturation -> Normalize(published)."""
    images = _uint8_images(8, 40, 56, seed=5)
    aug = TrainAugment(crop_size=24)
    out = aug(images, torch.Generator().manual_seed(7))
    p = aug.sample(8, 40, 56, torch.Generator().manual_seed(7))
    x = images.permute(0, 3, 1, 2).float() / 255
    for i in range(8):
        top, left, h, w = (int(v[i]) for v in (p.top, p.left, p.height, p.width))
        ref = TF.resized_crop(x[i], top, left, h, w, [24, 24], antialias=False)
        ref = TF.hflip(ref) if bool(p.flip[i]) else ref
        ref = TF.adjust_brightness(ref, float(p.brightness[i]))
        ref = TF.adjust_contrast(ref, float(p.contrast[i]))
        ref = TF.adjust_saturation(ref, float(p.saturation[i]))
        ref = TF.normalize(ref, list(PUBLISHED_MEAN), list(PUBLISHED_STD))
        inner = _inner(24, (top, left, h, w), (40, 56), bool(p.flip[i]))
        # contrast uses the mean grey of the whole crop (edge pixels included) and torchvision's grey weights
        # differ in the 4th digit: agreement to ~1e-3 here, so 0.01 (normalised units, ~0.6 grey levels)
        torch.testing.assert_close(out[i][inner], ref[inner], rtol=0, atol=0.01, msg=f"image {i}")
