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


def _ctx(model, backward=None, transform=None, **kw):
    g = torch.Generator().manual_seed(0)
    aug = TrainAugment(crop_size=16)
    return StepContext(model=model, num_mix_points=model.backbone.num_mix_points, transform=transform or aug,
                       view_augment=aug, generator=g, backward=backward or (lambda loss: loss.backward()), **kw)


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


# ------------------------------------------------------------------ hand-computed losses of the steps
# A deterministic "augmentation" (uint8 -> float, no randomness) makes every backbone input traceable to
# a stored image, so the label each input is scored against can be recovered from the pixels alone.


def _plain_transform(images, generator):
    return images.permute(0, 3, 1, 2).float() / 255.0


def _distinct_images(batch, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)


def _ce_by_hand(logits, targets):
    """Mean cross-entropy written out: -log softmax(logits)[target], one row at a time."""
    rows = [-(logits[r, int(t)] - torch.logsumexp(logits[r], 0)) for r, t in enumerate(targets)]
    return torch.stack(rows).mean()


def _identify(inputs, x):
    """For each row of ``inputs``: (image index i, quarter turns k) with inputs[r] == rot90(x[i], k)."""
    out = []
    for row in inputs:
        hits = [(i, k) for i in range(len(x)) for k in range(4) if torch.equal(row, torch.rot90(x[i], k, dims=(1, 2)))]
        assert len(hits) == 1, "every rotated input is exactly one image turned by one multiple of 90 degrees"
        out.append(hits[0])
    return out


def _recording_model(ss=True, classes=5):
    model = _model(ss=ss, classes=classes)
    inputs = []
    model.backbone.register_forward_hook(lambda m, inp, out: inputs.append(inp[0].detach().clone()))
    return model, inputs


def _forward_by_hand(model, x, spec=None):
    """backbone -> classifier / rotation head, called directly (not through TrainModel.forward)."""
    with torch.no_grad():  # train-mode BN on the same batch gives the same outputs as in the step
        features = model.backbone(x, spec)
        return features, model.classifier(features), (model.ss_head(features) if model.ss_head else None)


def _rotation_terms_by_hand(model, x4, identities, labels):
    """0.5 * CE(class logits, label of the source image) + 0.5 * CE(rotation logits, quarter turns)."""
    _, logits, rot_logits = _forward_by_hand(model, x4)
    ce_class = _ce_by_hand(logits, [labels[i] for i, _ in identities])
    ce_rot = _ce_by_hand(rot_logits, [k for _, k in identities])
    return ce_class, ce_rot


def test_rotation_step_pairs_every_rotated_copy_with_its_own_class_label():
    """Spec §5: each of the 4B rotated copies keeps the class label of the image it was made from and is
    scored against the rotation it received; both CE terms recomputed by hand from the inputs' pixels."""
    model, inputs = _recording_model()
    images = _distinct_images(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])  # not periodic in 4, so no layout mix-up can pass by luck
    ctx = _ctx(model, transform=_plain_transform)
    stats = STEPS["rotation"](ctx, images, labels)
    (x4,) = inputs
    identities = _identify(x4, _plain_transform(images, None))
    assert sorted(identities) == [(i, k) for i in range(6) for k in range(4)]  # every image at every rotation
    ce_class, ce_rot = _rotation_terms_by_hand(model, x4, identities, labels.tolist())
    torch.testing.assert_close(stats.terms["ce_class"], ce_class, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.terms["ce_rot"], ce_rot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.loss, 0.5 * ce_class + 0.5 * ce_rot, rtol=1e-5, atol=1e-6)


def test_rotate_batch_labels_are_the_quarter_turns_applied():
    x = torch.randn(5, 3, 6, 6)
    x4, rot = rotate_batch(x)
    identities = _identify(x4, x)
    assert rot.tolist() == [k for _, k in identities]


@pytest.mark.parametrize("batch", [3, 8, 12])
def test_s2m2_r_rotation_term_uses_a_random_quarter_of_the_unmixed_batch(batch, monkeypatch):
    """Spec §5 phase 2: the mixup pass sees the B augmented images, then max(1, B // 4) of those same
    (un-mixed) images -- a random subset, not the whole batch -- are expanded to 4 rotations and give
    0.5 * (CE_class + CE_rot) with each copy's own labels. Losses recomputed by hand."""
    import s2m2.objectives as objectives

    spec = MixSpec(layer=2, lam=0.3, perm=torch.roll(torch.arange(batch), 1))
    monkeypatch.setattr(objectives, "sample_mix", lambda *args, **kwargs: spec)
    model, inputs = _recording_model()
    images = _distinct_images(batch, seed=batch)
    labels = torch.arange(batch) % 5
    ctx = _ctx(model, transform=_plain_transform)
    stats = STEPS["s2m2_r"](ctx, images, labels)
    x = _plain_transform(images, None)
    assert len(inputs) == 2
    mixed_input, rotated = inputs
    assert torch.equal(mixed_input, x)  # the backbone mixes inside; its input is the augmented batch
    subset = max(1, batch // 4)
    assert rotated.shape[0] == 4 * subset
    identities = _identify(rotated, x)
    sources = sorted({i for i, _ in identities})
    assert len(sources) == subset and sorted(identities) == [(i, k) for i in sources for k in range(4)]
    # the mixup term, by hand: lam * CE(y) + (1 - lam) * CE(y[perm]) on logits of the mixed forward
    _, logits, _ = _forward_by_hand(model, x, spec)
    mixup = 0.3 * _ce_by_hand(logits, labels.tolist()) + 0.7 * _ce_by_hand(logits, labels[spec.perm].tolist())
    torch.testing.assert_close(stats.terms["mixup"], mixup, rtol=1e-5, atol=1e-6)
    ce_class, ce_rot = _rotation_terms_by_hand(model, rotated, identities, labels.tolist())
    torch.testing.assert_close(stats.terms["ce_class"], ce_class, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.terms["ce_rot"], ce_rot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.loss, mixup + 0.5 * ce_class + 0.5 * ce_rot, rtol=1e-5, atol=1e-6)
    pred = logits.argmax(1)  # soft accuracy of the mixup pass
    correct = (0.3 * (pred == labels).float() + 0.7 * (pred == labels[spec.perm]).float()).sum()
    torch.testing.assert_close(torch.as_tensor(stats.correct, dtype=torch.float32), correct)
    assert stats.count == batch


def test_s2m2_subset_is_random_across_steps():
    """The B/4 subset is drawn at random (seeded), not always the first images of the batch."""
    model, inputs = _recording_model()
    images = _distinct_images(8, seed=1)
    x = _plain_transform(images, None)
    chosen = set()
    for seed in range(6):
        inputs.clear()
        ctx = _ctx(model, transform=_plain_transform)
        ctx.generator.manual_seed(seed)
        STEPS["s2m2_r"](ctx, images, torch.arange(8) % 5)
        chosen.add(tuple(sorted({i for i, _ in _identify(inputs[1], x)})))
    assert len(chosen) > 1 and all(len(c) == 2 for c in chosen)


def test_s2m2_e_exemplar_term_uses_a_quarter_of_the_batch():
    model, inputs = _recording_model(ss=False)
    images = _distinct_images(12, seed=2)
    stats = STEPS["s2m2_e"](_ctx(model), images, torch.arange(12) % 5)
    assert [len(i) for i in inputs] == [12, 4 * 3]  # mixup on B, then 4 views of B // 4 images
    assert set(stats.terms) == {"mixup", "ce_class", "exemplar"}


@pytest.mark.parametrize("method", ["s2m2_r", "s2m2_e"])
@pytest.mark.parametrize("fraction, batch, subset", [(0.25, 16, 4), (0.125, 16, 2), (0.0625, 16, 1),
                                                     (0.0625, 8, 1), (1.0, 6, 6)])
def test_s2m2_ss_fraction_sets_the_self_supervised_subset(method, fraction, batch, subset):
    """method.ss_fraction: the self-supervised pass sees 4 copies of max(1, floor(B * fraction)) images
    (the release's B/4 at 0.25); the mixup pass still sees the whole batch."""
    model, inputs = _recording_model(ss=method == "s2m2_r")
    images = _distinct_images(batch, seed=3)
    STEPS[method](_ctx(model, transform=_plain_transform, ss_fraction=fraction), images, torch.arange(batch) % 5)
    assert [len(i) for i in inputs] == [batch, 4 * subset]
    if method == "s2m2_r":
        assert len({i for i, _ in _identify(inputs[1], _plain_transform(images, None))}) == subset


def test_manifold_mixup_step_loss_by_hand(monkeypatch):
    """One mixing point, one lam and one permutation per batch; lam * CE(y) + (1 - lam) * CE(y[perm])."""
    import s2m2.objectives as objectives

    spec = MixSpec(layer=1, lam=0.7, perm=torch.tensor([3, 2, 5, 0, 1, 4]))
    monkeypatch.setattr(objectives, "sample_mix", lambda *args, **kwargs: spec)
    model, inputs = _recording_model(ss=False)
    images = _distinct_images(6, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    stats = STEPS["manifold_mixup"](_ctx(model, transform=_plain_transform), images, labels)
    assert set(stats.terms) == {"mixup"} and torch.equal(stats.terms["mixup"], stats.loss)
    _, logits, _ = _forward_by_hand(model, _plain_transform(images, None), spec)
    expected = 0.7 * _ce_by_hand(logits, labels.tolist()) + 0.3 * _ce_by_hand(logits, labels[spec.perm].tolist())
    torch.testing.assert_close(stats.loss, expected, rtol=1e-5, atol=1e-6)
    pred = logits.argmax(1)
    correct = (0.7 * (pred == labels).float() + 0.3 * (pred == labels[spec.perm]).float()).sum()
    torch.testing.assert_close(torch.as_tensor(stats.correct, dtype=torch.float32), correct)
    assert stats.count == 6


def test_mixup_draw_uses_the_configured_alpha_and_every_point(monkeypatch):
    """The step asks for lam ~ Beta(ctx.mixup_alpha) over all ctx.num_mix_points points, one batch-sized perm."""
    import s2m2.objectives as objectives

    calls = []
    real = objectives.sample_mix

    def spy(num_points, batch, alpha, generator, device="cpu"):
        calls.append((num_points, batch, alpha))
        return real(num_points, batch, alpha, generator, device)

    monkeypatch.setattr(objectives, "sample_mix", spy)
    model = _model()
    STEPS["s2m2_r"](_ctx(model, mixup_alpha=2.0), _distinct_images(8), torch.arange(8) % 5)
    assert calls == [(model.backbone.num_mix_points, 8, 2.0)]


def test_mixup_points_restrict_where_batches_are_mixed():
    """method.mixup_points: every draw lands on an allowed point, each allowed point is drawn; None: all."""
    model = _model(ss=False)
    layers = []
    model.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: layers.append(kwargs.get("mix_spec", args[1] if len(args) > 1 else None).layer),
        with_kwargs=True)
    for step in range(40):
        ctx = _ctx(model, mixup_points=(0, 2))
        ctx.generator.manual_seed(step)
        STEPS["manifold_mixup"](ctx, _distinct_images(8), torch.arange(8) % 5)
    assert set(layers) == {0, 2}
    layers.clear()
    for step in range(40):
        ctx = _ctx(model)
        ctx.generator.manual_seed(step)
        STEPS["manifold_mixup"](ctx, _distinct_images(8), torch.arange(8) % 5)
    assert set(layers) == set(range(model.backbone.num_mix_points))


@pytest.mark.parametrize("points", ["[]", "[1, 1]", "[-1]", "3", "[true]"])
def test_config_rejects_malformed_mixup_points(points):
    from s2m2.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="method.mixup_points"):
        load_config(None, [f"method.mixup_points={points}"])


def test_trainer_rejects_mixup_points_the_backbone_does_not_have(make_prepared, tmp_path):
    from s2m2.config import ConfigError, load_config
    from s2m2.trainer import Trainer
    root = make_prepared(splits={"base": 4}, per_class=4, size=16)
    config = load_config(None, ["model.backbone=conv4", "model.backbone_kwargs={width: 8}", f"data.root={root}",
                                "data.val_split=null", "method.mixup_points=[0, 5]"])
    with pytest.raises(ConfigError, match=r"mixup points 0\.\.4"):
        Trainer(config, out_dir=tmp_path / "run")


def test_classification_step_is_plain_cross_entropy():
    model, inputs = _recording_model(ss=False)
    images = _distinct_images(5, seed=4)
    labels = torch.tensor([4, 3, 2, 1, 0])
    stats = STEPS["baseline++"](_ctx(model, transform=_plain_transform), images, labels)
    _, logits, _ = _forward_by_hand(model, inputs[0])
    torch.testing.assert_close(stats.loss, _ce_by_hand(logits, labels.tolist()), rtol=1e-5, atol=1e-6)
    assert set(stats.terms) == {"ce"} and torch.equal(stats.terms["ce"], stats.loss)
    assert float(stats.correct) == float((logits.argmax(1) == labels).sum()) and stats.count == 5


def test_exemplar_step_weights_and_views():
    """(1 - w) * CE_class over all V views (each with its image's label) + w * L_exemplar (Eq. 14)."""
    model, inputs = _recording_model(ss=False)
    images = _distinct_images(4, seed=5)
    labels = torch.tensor([1, 0, 3, 2])
    stats = STEPS["exemplar"](_ctx(model, ss_weight=0.25), images, labels)
    (views,) = inputs
    assert views.shape[0] == 16 and stats.count == 16
    assert set(stats.terms) == {"ce_class", "exemplar"}
    features, logits, _ = _forward_by_hand(model, views)
    assert float(stats.correct) == float((logits.argmax(1) == labels.repeat(4)).sum())
    ce = _ce_by_hand(logits, labels.repeat(4).tolist())
    ex = _brute_exemplar(features.view(4, 4, -1))
    torch.testing.assert_close(stats.terms["ce_class"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.terms["exemplar"], ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.loss, 0.75 * ce + 0.25 * ex, rtol=1e-4, atol=1e-5)


def test_rotation_step_reports_the_accuracy_over_all_rotated_copies():
    model, inputs = _recording_model()
    images = _distinct_images(4, seed=6)
    labels = torch.tensor([3, 1, 4, 0])
    stats = STEPS["rotation"](_ctx(model, transform=_plain_transform), images, labels)
    (x4,) = inputs
    identities = _identify(x4, _plain_transform(images, None))
    _, logits, _ = _forward_by_hand(model, x4)
    assert float(stats.correct) == float(sum(int(logits[r].argmax()) == int(labels[i]) for r, (i, _) in enumerate(identities)))
    assert set(stats.terms) == {"ce_class", "ce_rot"}


def test_train_model_returns_self_supervised_logits_only_when_asked():
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    features, logits, ss_logits = model(x)
    assert ss_logits is None and features.shape == (2, 8) and logits.shape == (2, 5)
    assert model(x, ss=True)[2].shape == (2, 4)
    assert _model(ss=False)(x, ss=True)[2] is None
    with pytest.raises(RuntimeError, match="rotation head"):
        STEPS["rotation"](_ctx(_model(ss=False)), _distinct_images(2), torch.tensor([0, 1]))


def test_rotate_batch_refuses_non_square_images():
    with pytest.raises(ValueError, match=r"square images, got \(5, 6\)"):
        rotate_batch(torch.zeros(2, 3, 5, 6))


@pytest.mark.parametrize("method", sorted(STEPS))
def test_every_step_draws_only_from_the_context_generator(method):
    """Same ctx.generator seed -> the same loss, whatever the global RNG does (reproducible, resumable runs)."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = _model(ss=method in ("rotation", "s2m2_r"))
        torch.manual_seed(100 + global_seed)  # any draw from the global RNG would now differ
        stats = STEPS[method](_ctx(model), _distinct_images(8, seed=7), torch.arange(8) % 5)
        results.append(float(stats.loss))
    assert results[0] == results[1]


def test_sample_mix_is_a_function_of_the_generator_only():
    draws = []
    for global_seed in (3, 4):
        torch.manual_seed(global_seed)
        spec = sample_mix(4, 16, 2.0, torch.Generator().manual_seed(9))
        draws.append((spec.layer, spec.lam, spec.perm.tolist()))
    assert draws[0] == draws[1]
    torch.manual_seed(5)
    a = sample_beta(2.0, torch.Generator().manual_seed(1))
    torch.manual_seed(6)
    assert sample_beta(2.0, torch.Generator().manual_seed(1)) == a


def test_step_context_prepare_switches_memory_format():
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    assert _ctx(model).prepare(x) is x
    prepared = _ctx(model, channels_last=True).prepare(x)
    assert prepared.is_contiguous(memory_format=torch.channels_last) and torch.equal(prepared, x)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_exemplar_loss_small_batches_and_small_distances(batch):
    """B = 1 has no negatives: 0 with a graph. B >= 2 (and distances below 1) follow Eq. 14 exactly."""
    f = (0.05 * torch.randn(4, batch, 6, generator=torch.Generator().manual_seed(batch))).requires_grad_(True)
    loss = exemplar_loss(f)
    if batch == 1:
        assert float(loss.detach()) == 0.0 and loss.requires_grad
    else:
        torch.testing.assert_close(loss, _brute_exemplar(f.detach()), atol=1e-6, rtol=1e-5)
