"""Training objectives: rotation, exemplar and Manifold Mixup losses, and one step function per method.

Every method's step has the same shape::

    stats = STEPS[method](ctx, images_uint8 (B, H, W, C), labels (B,))

It draws its random numbers from ``ctx.generator`` (a CPU ``torch.Generator`` seeded from
(seed, epoch, step, rank) by the trainer), runs the forward pass(es) under ``ctx.autocast()``, calls
``ctx.backward(loss)`` once per pass, and returns detached loss terms. The optimizer step, gradient
zeroing and the finite-loss check belong to the trainer, so S2M2's two backward passes feed ONE
optimizer step.

Methods (spec §3-§5):

- ``baseline``: linear head + CE.           ``baseline++``: cosine head + CE.
- ``rotation``: every image expanded to its 4 rotations (B -> 4B), ``(1-w)*CE_class + w*CE_rot`` with
  w = ``method.ss_weight`` = 0.5 (rotated copies keep their class label).
- ``exemplar``: ``method.exemplar_views`` (4) random augmentations of each image, ``(1-w)*CE_class``
  over all views + ``w*L_exemplar`` (paper Eq. 14), w = 0.5 -- the same weighting as rotation, which is
  our choice: the paper gives Eq. 14 but not how it is combined with the classification loss.
- ``manifold_mixup``: one mixup point per batch (uniform over the backbone's points), lam ~ Beta(2, 2),
  one permutation; ``lam*CE(y) + (1-lam)*CE(y[perm])``.
- ``s2m2_r`` / ``s2m2_e``: the mixup loss on the B augmented images (backward), then a random
  ``max(1, floor(B * f))`` subset of the un-mixed batch expanded to 4 rotations (or exemplar views) gives
  ``(1-w)*CE_class + w*CE_ss`` (backward); one optimizer step. f = ``method.ss_fraction`` = 1/4, the
  release's B/4 (budget recipes take less: the 4 copies make that pass as costly as the mixup pass).
  ``max(1, .)``: the release computes B/4 and crashes on a final batch smaller than 4.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2m2.models.base import MixSpec


# ------------------------------------------------------------------------------------------------
# The model being trained: backbone + classifier (+ self-supervised head)
# ------------------------------------------------------------------------------------------------
class TrainModel(nn.Module):
    """``forward(x (B, 3, H, W), mix_spec=None, ss=False) -> (features (B, D), logits (B, C), ss_logits)``.

    ``ss_logits`` is ``ss_head(features)`` (B, 4) when ``ss`` is true and the model has an ``ss_head``,
    else None. One module so DDP wraps (and all-reduces) backbone and heads together.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, ss_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.ss_head = ss_head

    def forward(self, x: torch.Tensor, mix_spec: MixSpec | None = None, ss: bool = False):
        features = self.backbone(x, mix_spec)
        logits = self.classifier(features)
        ss_logits = self.ss_head(features) if (ss and self.ss_head is not None) else None
        return features, logits, ss_logits


# ------------------------------------------------------------------------------------------------
# Losses and their building blocks
# ------------------------------------------------------------------------------------------------
def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (4B, C, H, W) rotated by 0/90/180/270 degrees (rotation-major), labels (4B,) in 0..3.

    Row ``k * B + i`` is image i rotated by k * 90 degrees counter-clockwise.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(x.shape[-2:])}")
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, alpha), reproducible from ``generator``.

    ``torch.distributions.Beta`` cannot take a generator, so a 63-bit seed drawn from it seeds NumPy's
    Beta sampler.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def sample_mix(num_points: int, batch: int, alpha: float, generator: torch.Generator,
               device: torch.device | str = "cpu") -> MixSpec:
    """One Manifold Mixup draw per batch: point uniform in 0..num_points-1, lam ~ Beta(alpha, alpha)."""
    layer = int(torch.randint(0, num_points, (1,), generator=generator))
    lam = sample_beta(alpha, generator)
    perm = torch.randperm(batch, generator=generator).to(device)
    return MixSpec(layer=layer, lam=lam, perm=perm)


def mixup_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, spec: MixSpec) -> torch.Tensor:
    """``lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])`` (mean over the batch)."""
    return (spec.lam * F.cross_entropy(logits, labels)
            + (1.0 - spec.lam) * F.cross_entropy(logits, labels[spec.perm]))


def exemplar_loss(features: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 14 on (V, B, D) features: V augmented views of each of B images.

    For every anchor (view k of image i) with Euclidean distances D: hardest positive
    ``max_p D(x_k^i, x_p^i)`` (other views of the same image) and hardest negative
    ``min_{p, j != i} D(x_k^i, x_p^j)`` (any view of another image); the loss is
    ``softplus(hardest positive - hardest negative)`` averaged over the V*B anchors.
    Needs B >= 2 (otherwise there is no negative); returns 0 (with a graph) for B == 1.
    """
    views, batch, dim = features.shape
    if batch < 2:
        return features.sum() * 0.0
    flat = features.reshape(views * batch, dim).float()
    # Squared distances via differences, not the |a|^2+|b|^2-2ab trick, so near-duplicates stay exact;
    # the clamp keeps sqrt's gradient finite on the (masked) zero diagonal.
    sq = (flat[:, None, :] - flat[None, :, :]).pow(2).sum(-1)
    dist = sq.clamp_min(1e-12).sqrt()
    image = torch.arange(batch, device=features.device).repeat(views)  # image index of each row
    same = image[:, None] == image[None, :]
    eye = torch.eye(views * batch, dtype=torch.bool, device=features.device)
    hardest_pos = dist.masked_fill(~same | eye, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    return F.softplus(hardest_pos - hardest_neg).mean()


# ------------------------------------------------------------------------------------------------
# Step functions
# ------------------------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What a step function needs from the trainer.

    model: TrainModel or its DDP wrapper.   num_mix_points: the backbone's mixup points.
    mixup_points: the points a batch may be mixed at (``method.mixup_points``); None: all of them.
    transform: uint8 (B, H, W, C) + generator -> float (B, 3, S, S) (the training augmentation, or the
        evaluation transform when augmentation is off).
    view_augment: the random augmentation used for exemplar views (always random: the views define the
        exemplar loss).
    """

    model: nn.Module
    num_mix_points: int
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    view_augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    generator: torch.Generator
    backward: Callable[[torch.Tensor], None]
    mixup_alpha: float = 2.0
    ss_weight: float = 0.5
    exemplar_views: int = 4
    ss_fraction: float = 0.25
    mixup_points: tuple[int, ...] | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    channels_last: bool = False

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class StepStats:
    """Detached results of one step. ``terms``: named loss terms; ``loss``: their weighted total."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    correct: torch.Tensor | float = 0.0   # (soft) number of correctly classified training images
    count: int = 0                        # images the accuracy is over


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) == labels).sum().float()


def step_classification(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
    """baseline / baseline++: CE of the classifier (linear or cosine, set by the model)."""
    x = ctx.prepare(ctx.transform(images, ctx.generator))
    with ctx.autocast():
        _, logits, _ = ctx.model(x)
    loss = F.cross_entropy(logits.float(), labels)
    ctx.backward(loss)
    return StepStats(loss.detach(), {"ce": loss.detach()}, _correct(logits, labels), len(labels))


def _rotation_terms(ctx: StepContext, x: torch.Tensor, labels: torch.Tensor):
    """(1-w)*CE_class + w*CE_rot on the 4 rotations of ``x`` (B, 3, S, S)."""
    x4, rot_labels = rotate_batch(x)
    with ctx.autocast():
        _, logits, rot_logits = ctx.model(ctx.prepare(x4), ss=True)
    if rot_logits is None:
        raise RuntimeError("the rotation loss needs a model with a rotation head (ss_head)")
    labels4 = labels.repeat(4)
    ce_class = F.cross_entropy(logits.float(), labels4)
    ce_rot = F.cross_entropy(rot_logits.float(), rot_labels)
    loss = (1.0 - ctx.ss_weight) * ce_class + ctx.ss_weight * ce_rot
    return loss, ce_class, ce_rot, _correct(logits, labels4), len(labels4)


def _exemplar_terms(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor):
    """(1-w)*CE_class over V random views of each image + w*L_exemplar (Eq. 14)."""
    views = torch.cat([ctx.view_augment(images, ctx.generator) for _ in range(ctx.exemplar_views)])
    with ctx.autocast():
        features, logits, _ = ctx.model(ctx.prepare(views))
    labels_v = labels.repeat(ctx.exemplar_views)
    ce_class = F.cross_entropy(logits.float(), labels_v)
    ex = exemplar_loss(features.float().view(ctx.exemplar_views, len(labels), -1))
    loss = (1.0 - ctx.ss_weight) * ce_class + ctx.ss_weight * ex
    return loss, ce_class, ex, _correct(logits, labels_v), len(labels_v)


def step_rotation(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
    x = ctx.transform(images, ctx.generator)
    loss, ce_class, ce_rot, correct, count = _rotation_terms(ctx, x, labels)
    ctx.backward(loss)
    return StepStats(loss.detach(), {"ce_class": ce_class.detach(), "ce_rot": ce_rot.detach()}, correct, count)


def step_exemplar(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
    loss, ce_class, ex, correct, count = _exemplar_terms(ctx, images, labels)
    ctx.backward(loss)
    return StepStats(loss.detach(), {"ce_class": ce_class.detach(), "exemplar": ex.detach()}, correct, count)


def _mixup_pass(ctx: StepContext, x: torch.Tensor, labels: torch.Tensor):
    points = ctx.mixup_points
    spec = sample_mix(ctx.num_mix_points if points is None else len(points), len(labels), ctx.mixup_alpha,
                      ctx.generator, labels.device)
    if points is not None:  # the draw picked a position in the allowed list
        spec = MixSpec(layer=points[spec.layer], lam=spec.lam, perm=spec.perm)
    with ctx.autocast():
        _, logits, _ = ctx.model(ctx.prepare(x), mix_spec=spec)
    loss = mixup_cross_entropy(logits.float(), labels, spec)
    pred = logits.detach().argmax(dim=1)
    correct = (spec.lam * (pred == labels).float() + (1 - spec.lam) * (pred == labels[spec.perm]).float()).sum()
    return loss, correct


def step_manifold_mixup(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
    x = ctx.transform(images, ctx.generator)
    loss, correct = _mixup_pass(ctx, x, labels)
    ctx.backward(loss)
    return StepStats(loss.detach(), {"mixup": loss.detach()}, correct, len(labels))


def _ss_subset(ctx: StepContext, batch: int, device) -> torch.Tensor:
    # max(1, .): a final batch smaller than 4 still gets a self-supervised term (the release crashes).
    size = max(1, int(batch * ctx.ss_fraction))
    return torch.randperm(batch, generator=ctx.generator)[:size].to(device)


def _s2m2_step(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, ss: str) -> StepStats:
    """Phase 2: mixup loss on the B augmented images (backward), then the self-supervised loss ``ss``
    ("rotation" or "exemplar") on a random ``ctx.ss_fraction`` of the un-mixed batch (the release's B/4)
    (backward); one optimizer step."""
    x = ctx.transform(images, ctx.generator)
    loss_mm, correct = _mixup_pass(ctx, x, labels)
    ctx.backward(loss_mm)
    subset = _ss_subset(ctx, len(labels), labels.device)
    if ss == "rotation":  # rotations of the augmented images
        loss_ss, ce_class, ce_ss, _, _ = _rotation_terms(ctx, x[subset], labels[subset])
    else:  # exemplar views are fresh augmentations of the stored images
        loss_ss, ce_class, ce_ss, _, _ = _exemplar_terms(ctx, images[subset], labels[subset])
    ctx.backward(loss_ss)
    terms = {"mixup": loss_mm.detach(), "ce_class": ce_class.detach(),
             ("ce_rot" if ss == "rotation" else "exemplar"): ce_ss.detach()}
    return StepStats((loss_mm + loss_ss).detach(), terms, correct, len(labels))


def step_s2m2_r(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
    return _s2m2_step(ctx, images, labels, "rotation")


def step_s2m2_e(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
    return _s2m2_step(ctx, images, labels, "exemplar")


STEPS: dict[str, Callable[[StepContext, torch.Tensor, torch.Tensor], StepStats]] = {
    "baseline": step_classification,
    "baseline++": step_classification,
    "rotation": step_rotation,
    "exemplar": step_exemplar,
    "manifold_mixup": step_manifold_mixup,
    "s2m2_r": step_s2m2_r,
    "s2m2_e": step_s2m2_e,
}

# Methods whose model carries a rotation head.
ROTATION_METHODS = ("rotation", "s2m2_r")
