"""An independent, functional re-implementation of the S2M2 release's WRN forward pass (eval mode).

Written from the description in S2M2_SPEC.md §2-§3 (not from the release's code), it runs directly on a
release-format state dict (the names in ../shared/docs/*.tsv) with ``torch.nn.functional`` calls and
shares nothing with ``s2m2.models``. Tests compare our imported models against it: agreement is the
evidence that importing a released checkpoint is numerically faithful.

Also: helpers to parse the .tsv name/shape listings and to fill a release-format state dict with
random (but well-scaled) values, so tests need no real checkpoint.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

BN_EPS = 1e-5  # nn.BatchNorm2d's default, which the release uses


def release_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` components and the rotation model's ``feature.`` prefix."""
    out = {}
    for name, value in state.items():
        name = ".".join(part for part in name.split(".") if part != "module")
        out[name.removeprefix("feature.")] = value
    return out


def _batch_norm(state: dict[str, torch.Tensor], prefix: str, h: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(h, state[prefix + "running_mean"], state[prefix + "running_var"],
                        state[prefix + "weight"], state[prefix + "bias"], training=False, eps=BN_EPS)


def _mix(h: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    return lam * h + (1.0 - lam) * h[perm]


def release_wrn_features(state: dict[str, torch.Tensor], images: torch.Tensor,
                         mixup: tuple[int, float, torch.Tensor] | None = None) -> torch.Tensor:
    """Eval-mode features of the release's WRN: ``images (B, 3, H, W) -> (B, 64 * widen)``.

    conv1 -> three groups (strides 1, 2, 2) of pre-activation blocks -> BN -> ReLU -> global mean.
    A block: ``a = relu(bn1(x))``; ``out = conv2(relu(bn2(conv1(a, stride))))``; the shortcut is
    ``convShortcut(a)`` (1x1, stride) when the block has one, else ``x``; result ``shortcut + out``.

    ``mixup = (k, lam, perm)``: Manifold Mixup as the release's forward does it (spec §4):
    ``h <- lam * h + (1 - lam) * h[perm]`` on the input images (k = 0) or on the OUTPUT of block group k
    (k = 1, 2, 3; after group 3 means before the final BN/ReLU/pool).
    """
    state = release_names(state)
    if mixup is not None and mixup[0] == 0:
        images = _mix(images, mixup[1], mixup[2])
    h = F.conv2d(images, state["conv1.weight"], stride=1, padding=1)
    for group, group_stride in ((1, 1), (2, 2), (3, 2)):
        count = len({m.group(1) for name in state if (m := re.match(rf"block{group}\.layer\.(\d+)\.", name))})
        for index in range(count):
            p = f"block{group}.layer.{index}."
            stride = group_stride if index == 0 else 1
            activated = F.relu(_batch_norm(state, p + "bn1.", h))
            if p + "convShortcut.weight" in state:
                shortcut = F.conv2d(activated, state[p + "convShortcut.weight"], stride=stride)
            else:
                shortcut = h
            out = F.conv2d(activated, state[p + "conv1.weight"], stride=stride, padding=1)
            out = F.relu(_batch_norm(state, p + "bn2.", out))
            out = F.conv2d(out, state[p + "conv2.weight"], stride=1, padding=1)
            h = shortcut + out
        if mixup is not None and mixup[0] == group:
            h = _mix(h, mixup[1], mixup[2])
    h = F.relu(_batch_norm(state, "bn1.", h))
    return h.mean(dim=(2, 3))


def release_cosine_logits(weight_g: torch.Tensor, weight_v: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """distLinear: ``scale * <x / (||x|| + 1e-5), g_c v_c / ||v_c||>``, scale 2 if <= 200 classes else 10."""
    scale = 2.0 if weight_v.shape[0] <= 200 else 10.0
    rows = weight_g * weight_v / weight_v.norm(dim=1, keepdim=True)
    unit = features / (features.norm(dim=1, keepdim=True) + 1e-5)
    return scale * unit @ rows.t()


def parse_tsv(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` from a ../shared/docs/*.tsv listing (dtype defaults by name when absent)."""
    entries = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        name, shape_text = fields[0], fields[1]
        shape = tuple(int(v) for v in re.findall(r"\d+", shape_text))
        dtype = fields[2] if len(fields) > 2 else ("int64" if name.endswith("num_batches_tracked") else "float32")
        entries[name] = (shape, dtype)
    return entries


def release_wrn_entries(depth: int = 28, widen: int = 10, num_classes: int | None = 200) -> dict[str, tuple[tuple[int, ...], str]]:
    """The names/shapes of the release's WRN mixup-model state dict, generated from the spec's description.

    For WRN-28-10 with 200 classes this equals the official listing (a test checks it); other depths and
    widths give the release-format state dict of a smaller WRN for fast tests.
    """
    entries: dict[str, tuple[tuple[int, ...], str]] = {}

    def bn(prefix: str, channels: int) -> None:
        for stat in ("weight", "bias", "running_mean", "running_var"):
            entries[prefix + stat] = ((channels,), "float32")
        entries[prefix + "num_batches_tracked"] = ((), "int64")

    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    entries["conv1.weight"] = ((16, 3, 3, 3), "float32")
    for group in (1, 2, 3):
        for index in range((depth - 4) // 6):
            p = f"block{group}.layer.{index}."
            cin = widths[group - 1] if index == 0 else widths[group]
            cout = widths[group]
            bn(p + "bn1.", cin)
            entries[p + "conv1.weight"] = ((cout, cin, 3, 3), "float32")
            bn(p + "bn2.", cout)
            entries[p + "conv2.weight"] = ((cout, cout, 3, 3), "float32")
            if cin != cout:
                entries[p + "convShortcut.weight"] = ((cout, cin, 1, 1), "float32")
    bn("bn1.", widths[3])
    if num_classes is not None:
        entries["linear.L.weight_g"] = ((num_classes, 1), "float32")
        entries["linear.L.weight_v"] = ((num_classes, widths[3]), "float32")
    return entries


def random_release_state(entries: dict[str, tuple[tuple[int, ...], str]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A release-format state dict with the given names/shapes, filled with seeded random values.

    Convs follow the release's He (fan-out) init; BN affine and running statistics are randomised away
    from 1/0 so that a wrong BN wiring changes the output; distLinear's gain is randomised away from
    ``||v||`` so that ignoring it changes the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, dtype) in entries.items():
        if dtype == "int64":
            state[name] = torch.tensor(123, dtype=torch.int64).reshape(shape)
        elif name.endswith("weight") and len(shape) == 4:
            fan_out = shape[0] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_out)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("weight_g"):
            state[name] = 0.5 + 1.5 * torch.rand(shape, generator=gen)
        elif name.endswith("weight") or name.endswith("weight_v"):
            scale = 1.0 if len(shape) == 1 else 1.0 / math.sqrt(shape[-1])
            state[name] = (0.5 + torch.rand(shape, generator=gen)) if len(shape) == 1 else torch.randn(shape, generator=gen) * scale
        else:
            raise ValueError(f"no rule to fill {name} {shape}")
    return state
