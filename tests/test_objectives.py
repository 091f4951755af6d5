"""Losses and step functions of s2m2.objectives: rotation, Manifold Mixup, exemplar, S2M2 steps."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from s2m2.data.augment import TrainAugment
from s2m2.models import MixSpec, create_backbone
from s2m2.models.heads import create_head
from s2m2.objectives import (STEPS, StepContext, TrainModel, exemplar_loss, mixup_cross_entropy, rotate_batch,
                             sample_beta, sample_mix)

BACKBONES = [("conv4", {"width": 8}), ("wrn", {"depth": 10, "widen": 1, "dropout": 0.0})]


def test_rotate_batch_layout_and_four_quarter_turns_are_identity():
    x = torch.randn(3, 2, 5, 5)
    x4, rot = rotate_batch(x)
    assert x4.shape == (12, 2, 5, 5)
    assert rot.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert torch.equal(x4[:3], x)
    # row k*B+i is image i turned k quarter turns; turning it (4-k) more returns the original
    for k in range(4):
        back = torch.rot90(x4[k * 3:(k + 1) * 3], 4 - k, dims=(2, 3))
        assert torch.equal(back, x)
    assert not torch.equal(x4[3:6], x)
    # 90 degrees counter-clockwise: the top row becomes the left column (read bottom-up)
    assert torch.equal(x4[3, :, :, 0], x[0, :, 0, :].flip(-1))
    y = x
    for _ in range(4):
        y = rotate_batch(y)[0][len(y):2 * len(y)]  # the 90-degree copy
    assert torch.equal(y, x)


@pytest.mark.parametrize("name,kwargs", BACKBONES)
def test_mixup_at_every_point(name, kwargs):
    torch.manual_seed(0)
    backbone = create_backbone(name, **kwargs).eval()  # eval: BN uses running stats, so rows are independent
    x = torch.randn(6, 3, 16, 16)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    with torch.no_grad():
        plain = backbone(x)
        for layer in range(backbone.num_mix_points):
            same = backbone(x, MixSpec(layer, 1.0, perm))
            torch.testing.assert_close(same, plain, atol=0, rtol=0)  # lam = 1 is no mixing
            swapped = backbone(x, MixSpec(layer, 0.0, perm))
            torch.testing.assert_close(swapped, plain[perm], atol=1e-5, rtol=1e-4)  # lam = 0: the partner
            half = backbone(x, MixSpec(layer, 0.5, perm))
            assert not torch.allclose(half, plain, atol=1e-4) and not torch.allclose(half, plain[perm], atol=1e-4)


def test_mixup_loss_mixes_the_labels():
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 1, 2, 3, 6])
    spec = MixSpec(0, 0.3, torch.tensor([4, 3, 2, 1, 0]))
    soft = 0.3 * F.one_hot(labels, 7).float() + 0.7 * F.one_hot(labels[spec.perm], 7).float()
    expected = -(soft * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(mixup_cross_entropy(logits, labels, spec), expected)
    assert torch.equal(mixup_cross_entropy(logits, labels, MixSpec(0, 1.0, spec.perm)), F.cross_entropy(logits, labels))


def test_mixup_draws_points_uniformly_and_lambda_from_beta_2_2():
    g = torch.Generator().manual_seed(0)
    specs = [sample_mix(4, 8, 2.0, g) for _ in range(2000)]
    counts = torch.bincount(torch.tensor([s.layer for s in specs]), minlength=4)
    assert counts.min() > 400  # ~500 each
    lam = torch.tensor([s.lam for s in specs])
    assert abs(float(lam.mean()) - 0.5) < 0.02 and abs(float(lam.var()) - 0.05) < 0.008  # Beta(2,2): var 1/20
    assert all(sorted(s.perm.tolist()) == list(range(8)) for s in specs[:20])
    # reproducible from the generator
    assert sample_beta(2.0, torch.Generator().manual_seed(5)) == sample_beta(2.0, torch.Generator().manual_seed(5))


def _brute_exemplar(features):
    views, batch, _ = features.shape
    terms = []
    for k, i in itertools.product(range(views), range(batch)):
        a = features[k, i]
        pos = max(float((a - features[p, i]).norm()) for p in range(views) if p != k)
        neg = min(float((a - features[p, j]).norm()) for p in range(views) for j in range(batch) if j != i)
        terms.append(F.softplus(torch.tensor(pos - neg)))
    return torch.stack(terms).mean()


def test_exemplar_loss_matches_eq14():
    f = torch.randn(4, 5, 6)
    torch.testing.assert_close(exemplar_loss(f), _brute_exemplar(f), atol=1e-5, rtol=1e-5)


def test_exemplar_loss_zero_gradient_when_positives_far_closer():
    centers = torch.randn(6, 8) * 100  # images far apart
    f = (centers[None] + 1e-3 * torch.randn(4, 6, 8)).requires_grad_(True)  # views tight around them
    loss = exemplar_loss(f)
    loss.backward()
    assert float(loss.detach()) < 1e-10
    assert float(f.grad.abs().max()) < 1e-10


def test_exemplar_loss_positive_with_gradient_when_negatives_are_closer():
    f = torch.randn(4, 6, 8).requires_grad_(True)  # views as spread as other images
    loss = exemplar_loss(f)
    loss.backward()
    assert float(loss.detach()) > 0.5
    assert float(f.grad.norm()) > 1e-3
    assert torch.isfinite(f.grad).all()


def _ctx(model, backward=None, **kw):
    g = torch.Generator().manual_seed(0)
    aug = TrainAugment(crop_size=16)
    return StepContext(model=model, num_mix_points=model.backbone.num_mix_points, transform=aug, view_augment=aug,
                       generator=g, backward=backward or (lambda loss: loss.backward()), **kw)


def _model(ss=True, classes=5):
    torch.manual_seed(0)
    backbone = create_backbone("conv4", width=8)
    ss_head = create_head("rotation", backbone.feature_dim) if ss else None
    return TrainModel(backbone, create_head("cosine", backbone.feature_dim, classes), ss_head)


@pytest.mark.parametrize("method", sorted(STEPS))
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_every_step_runs_on_small_batches(method, batch):
    """Including final batches smaller than 4 (the release's phase 2 crashes on them)."""
    model = _model(ss=method in ("rotation", "s2m2_r"))
    images = torch.randint(0, 256, (batch, 16, 16, 3), dtype=torch.uint8)
    labels = torch.randint(0, 5, (batch,))
    stats = STEPS[method](_ctx(model), images, labels)
    assert torch.isfinite(stats.loss) and stats.count > 0
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_s2m2_r_two_backwards_feed_one_step():
    """Mixup pass then rotation pass on max(1, B//4) images; both gradients accumulate."""
    model = _model()
    calls = []

    def backward(loss):
        calls.append(float(loss.detach()))
        loss.backward()
        calls.append(model.ss_head.weight.grad is not None)

    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    stats = STEPS["s2m2_r"](_ctx(model, backward), images, torch.arange(8) % 5)
    assert len(calls) == 4
    assert calls[1] is False and calls[3] is True  # the mixup pass does not touch the rotation head
    assert set(stats.terms) == {"mixup", "ce_class", "ce_rot"}
    torch.testing.assert_close(stats.loss, torch.tensor(calls[0] + calls[2]))
    torch.testing.assert_close(stats.loss, stats.terms["mixup"] + 0.5 * (stats.terms["ce_class"] + stats.terms["ce_rot"]))


def test_rotation_step_uses_4b_images_with_class_labels_kept():
    model = _model()
    seen = []
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    stats = STEPS["rotation"](_ctx(model), torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8),
                              torch.arange(6) % 5)
    assert seen == [24] and stats.count == 24
    torch.testing.assert_close(stats.loss, 0.5 * stats.terms["ce_class"] + 0.5 * stats.terms["ce_rot"])
