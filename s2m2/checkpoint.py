"""Loading checkpoints: ours (``"format": "s2m2-checkpoint"``) and the S2M2 release's; exporting to the release.

Release checkpoints (spec §2) are ``torch.save({"epoch": E, "state": state_dict})``:

- mixup-phase models (``wrn_mixup_model``, e.g. the released mini-ImageNet ``470.tar``): backbone keys at
  the top level (``conv1.*``, ``block{1,2,3}.layer.N.*``, ``bn1.*``) plus the 200-way cosine classifier
  ``linear.L.weight_g`` / ``linear.L.weight_v``;
- rotation-phase models: the same keys under ``feature.``, the classifier under ``classifier.L.*``, and
  the rotation head ``nn.Sequential(nn.Linear(640, 4))`` saved separately under ``"rotate"``
  (``0.weight``, ``0.bias``);
- ``nn.DataParallel`` runs add ``module.`` path components anywhere in the names.

Importing is a renaming table (``RELEASE_TO_OURS``), applied by ``checkpoint_filter_fn`` (timm-style).
The release's architecture (depth and width) is read off the shapes, so smaller WRNs import too.

Both kinds of file are read with ``torch.load(weights_only=True)``: they hold only tensors, dicts,
lists, numbers and strings, so nothing in them can execute code on load.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from s2m2.models import Backbone, create_backbone
from s2m2.models.heads import CosineClassifier, LinearClassifier, RotationHead, create_head, default_cosine_scale
from s2m2.models.wrn import WideResNet
from s2m2.utils import atomic_torch_save

CHECKPOINT_FORMAT = "s2m2-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Keys a checkpoint must hold to resume training (the trainer's payload, see the interface doc).
RESUME_KEYS = ("backbone", "heads", "state", "method", "phase", "epoch", "step", "config", "data",
               "optimizer", "rng")

# The release's WRN names -> ours: a table on the first path component(s). Everything below a stage
# (``layer.N.bn1/conv1/bn2/conv2/convShortcut``) already has the release's names.
RELEASE_TO_OURS: dict[str, str] = {
    "conv1.": "stem.",
    "block1.": "stages.0.",
    "block2.": "stages.1.",
    "block3.": "stages.2.",
    "bn1.": "tail.bn1.",
}
OURS_TO_RELEASE: dict[str, str] = {ours: release for release, ours in RELEASE_TO_OURS.items()}

# Where the release keeps the cosine classifier: ``linear.L`` (mixup model), ``classifier.L`` (rotation).
# ``weight_norm`` stores g / v as ``weight_g`` / ``weight_v``; torch's newer ``parametrizations.weight_norm``
# stores them as ``parametrizations.weight.original0`` / ``original1`` (spec §3): both map to ours.
_RELEASE_COSINE_NAMES = {
    "weight_g": "weight_g",
    "weight_v": "weight_v",
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # legacy (pre-1.6) torch.save files start with a pickle PROTO opcode


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, of an unknown kind, or does not fit the model it describes."""


@dataclass
class LoadedModel:
    """What a checkpoint holds: the backbone, its heads (None when absent) and an ``info`` dict."""

    backbone: Backbone
    classifier: nn.Module | None
    ss_head: nn.Module | None
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Reading files


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex characters of the file's sha256 (identifies the exact weights in caches/records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def read_payload(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?)")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        stripped = head.lstrip().lower()
        hint = (" it looks like an HTML/XML page (a failed download?)"
                if stripped.startswith((b"<!doctype", b"<html", b"<?xml", b"<")) else "")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint;{hint or ' unrecognised file header'} "
                              f"(starts with {head[:16]!r})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors/containers/numbers/strings, so it is not "
            f"loaded (weights_only=True refuses to run code from a file): {detail}") from exc
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {first_line}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(payload).__name__}")
    return payload


def checkpoint_source(payload: Mapping) -> str:
    """``"s2m2"``, ``"release-mixup"`` or ``"release-rotation"``; raises CheckpointError otherwise."""
    if payload.get("format") == CHECKPOINT_FORMAT:
        return "s2m2"
    state = _release_state(payload)
    if state is None:
        raise CheckpointError(f"neither an s2m2 checkpoint (no format={CHECKPOINT_FORMAT!r}) nor a release "
                              f"checkpoint (no 'state' dict of tensors); top-level keys: {sorted(map(str, payload))[:20]}")
    names = _strip_module(state)
    # The rotation-phase model (BaselineTrain) nests the backbone under ``feature.``; a 'rotate' entry
    # alone does not decide it (an exported mixup model may carry one too).
    if any(name.startswith("feature.") for name in names):
        return "release-rotation"
    return "release-mixup"


def _release_state(payload: Mapping) -> dict[str, torch.Tensor] | None:
    """The release's state dict: ``payload['state']``, or the payload itself if it is a bare state dict."""
    state = payload.get("state", payload)
    if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return dict(state)
    return None


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` path components added by ``nn.DataParallel`` (at any depth)."""
    return {".".join(part for part in name.split(".") if part != "module"): value for name, value in state.items()}


# ---------------------------------------------------------------------------------------------------
# Release -> ours


def _rename_prefix(name: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name  # unknown: kept, so that loading reports it as unexpected


def split_release_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Release state dict -> (backbone part, classifier part), both still in the release's names.

    ``module.`` components and the ``feature.`` prefix are removed; the classifier part is whatever
    was under ``linear.`` or ``classifier.`` (prefix removed).
    """
    backbone, classifier = {}, {}
    for name, value in _strip_module(state).items():
        if name.startswith(("linear.", "classifier.")):
            classifier[name.split(".", 1)[1]] = value
        else:
            backbone[name.removeprefix("feature.")] = value
    return backbone, classifier


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's WRN state dict (any of its variants) -> our ``WideResNet`` state dict names.

    Strips ``module.`` and ``feature.``, drops the classifier (``linear.*`` / ``classifier.*``) and
    renames with ``RELEASE_TO_OURS``. Names it does not know pass through unchanged.
    """
    backbone, _ = split_release_state(state_dict)
    return {_rename_prefix(name, RELEASE_TO_OURS): value for name, value in backbone.items()}


def release_backbone_spec(state_dict: Mapping[str, torch.Tensor], dropout: float = 0.5) -> dict:
    """Read the WRN's depth and width off a release state dict: ``{"name": ..., "kwargs": ...}``.

    Dropout is not stored in a state dict; the release's default (0.5) is recorded (it has no effect
    in eval mode).
    """
    backbone, _ = split_release_state(state_dict)
    first_conv = backbone.get("block1.layer.0.conv1.weight")
    if first_conv is None or first_conv.ndim != 4:
        raise CheckpointError("not a release WRN state dict: no 4-d 'block1.layer.0.conv1.weight' "
                              f"(first names: {sorted(backbone)[:5]})")
    blocks = {int(m.group(1)) for name in backbone if (m := re.match(r"block1\.layer\.(\d+)\.", name))}
    depth = 6 * len(blocks) + 4
    widen, remainder = divmod(first_conv.shape[0], 16)
    if remainder or widen < 1:
        raise CheckpointError(f"block1 width {first_conv.shape[0]} is not a multiple of 16: not a release WRN")
    if (depth, widen) == (28, 10):
        return {"name": "wrn28_10", "kwargs": {"dropout": dropout}}
    return {"name": "wrn", "kwargs": {"depth": depth, "widen": widen, "dropout": dropout}}


def release_classifier_filter_fn(classifier_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's classifier part (``L.weight_g``/``L.weight_v``, or a plain ``weight``/``bias``) -> ours."""
    out = {}
    for name, value in classifier_state.items():
        inner = name.removeprefix("L.")
        out[_RELEASE_COSINE_NAMES.get(inner, inner) if name.startswith("L.") else name] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Loading into modules


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                      rename_back: Mapping[str, str] | None = None) -> None:
    """``module.load_state_dict(state)`` that raises CheckpointError listing every missing, unexpected
    and wrong-shape key (in the file's own names when ``rename_back`` maps ours -> theirs)."""
    expected = module.state_dict()
    back = (lambda name: _rename_prefix(name, rename_back)) if rename_back else (lambda name: name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{back(name)}: file {tuple(state[name].shape)}, model {tuple(expected[name].shape)}"
                   for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"{what}: the checkpoint does not fit the model"]
        for title, names in (("missing", sorted(map(back, missing))), ("unexpected", sorted(map(back, unexpected))),
                             ("wrong shape", sorted(wrong_shape))):
            if names:
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=True)


def _validate_ours(payload: Mapping, path: Path, require: tuple[str, ...] = ()) -> None:
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: s2m2 checkpoint format_version {version!r}; this code reads version "
                              f"{CHECKPOINT_FORMAT_VERSION} (a newer s2m2 wrote it?)")
    missing = [key for key in ("backbone", "state", *require) if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: s2m2 checkpoint lacks keys: {', '.join(missing)}")
    spec = payload["backbone"]
    if not (isinstance(spec, Mapping) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs", {}), Mapping)):
        raise CheckpointError(f"{path}: 'backbone' must be {{'name': str, 'kwargs': dict}}, got {spec!r}")
    if not isinstance(payload["state"], Mapping) or "backbone" not in payload["state"]:
        raise CheckpointError(f"{path}: 'state' must be a dict with a 'backbone' state dict")


def _build_backbone(spec: Mapping, path: Path) -> Backbone:
    try:
        return create_backbone(spec["name"], **dict(spec.get("kwargs", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build backbone {spec!r}: {exc}") from exc


def _build_our_head(role: str, spec: Mapping, state: Mapping[str, torch.Tensor], in_dim: int, path: Path) -> nn.Module:
    kwargs = dict(spec.get("kwargs", {}))
    in_dim = kwargs.pop("in_dim", in_dim)
    if spec.get("name") in ("cosine", "linear") and "num_classes" not in kwargs:
        rows = state.get("weight_v", state.get("weight"))
        if rows is None:
            raise CheckpointError(f"{path}: {role} head {spec!r} has no num_classes and no weights to infer it from")
        kwargs["num_classes"] = rows.shape[0]
    try:
        head = create_head(spec["name"], in_dim, **kwargs)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build {role} head {spec!r}: {exc}") from exc
    load_state_strict(head, state, f"{path} [{role}]")
    return head


def _load_ours(payload: dict, path: Path, with_heads: bool, ema: bool = True) -> LoadedModel:
    _validate_ours(payload, path)
    weights = "ema" if ema and "ema_state" in payload else "trained"
    states = payload["ema_state" if weights == "ema" else "state"]   # "state" was checked by _validate_ours
    if weights == "ema" and (not isinstance(states, Mapping) or "backbone" not in states):
        raise CheckpointError(f"{path}: 'ema_state' must be a dict with a 'backbone' state dict")
    backbone = _build_backbone(payload["backbone"], path)
    load_state_strict(backbone, states["backbone"], f"{path} [{'EMA ' if weights == 'ema' else ''}backbone]")
    classifier = ss_head = None
    if with_heads:
        heads = payload.get("heads") or {}
        for role in ("classifier", "ss_head"):
            if role in heads and heads[role] is not None:
                if role not in states:
                    raise CheckpointError(f"{path}: heads.{role} is described but state.{role} is missing")
                head = _build_our_head(role, heads[role], states[role], backbone.feature_dim, path)
                classifier, ss_head = (head, ss_head) if role == "classifier" else (classifier, head)
    info = {"source": "s2m2", "backbone": _plain_spec(payload["backbone"]), "epoch": payload.get("epoch"),
            "config": payload.get("config"), "method": payload.get("method"), "phase": payload.get("phase"),
            "weights": weights}
    return LoadedModel(backbone, classifier, ss_head, info)


def _load_release(payload: dict, path: Path, source: str, with_heads: bool) -> LoadedModel:
    state = _release_state(payload)
    spec = release_backbone_spec(state)
    backbone = _build_backbone(spec, path)
    load_state_strict(backbone, checkpoint_filter_fn(state), f"{path} [release backbone]", rename_back=OURS_TO_RELEASE)
    classifier = ss_head = None
    if with_heads:
        _, classifier_state = split_release_state(state)
        if classifier_state:
            classifier_state = release_classifier_filter_fn(classifier_state)
            if "weight_v" in classifier_state:
                rows, dim = classifier_state["weight_v"].shape
                classifier = CosineClassifier(dim, rows)  # the release's scale rule (2 if <= 200 outputs)
            elif "weight" in classifier_state:  # CloserLook's Baseline: nn.Linear with bias
                rows, dim = classifier_state["weight"].shape
                classifier = LinearClassifier(dim, rows)
            else:
                raise CheckpointError(f"{path}: unrecognised release classifier keys {sorted(classifier_state)}")
            load_state_strict(classifier, classifier_state, f"{path} [release classifier]")
        rotate = payload.get("rotate")
        if rotate is not None:
            if not isinstance(rotate, Mapping):
                raise CheckpointError(f"{path}: 'rotate' should be a state dict, got {type(rotate).__name__}")
            rotate = {re.sub(r"^0\.", "", name): value for name, value in _strip_module(rotate).items()}
            ss_head = RotationHead(backbone.feature_dim)
            load_state_strict(ss_head, rotate, f"{path} [release rotation head]")
    epoch = payload.get("epoch")
    epoch = epoch if isinstance(epoch, int) else None  # absent from a bare state dict
    info = {"source": source, "backbone": spec, "epoch": epoch, "config": None}
    return LoadedModel(backbone, classifier, ss_head, info)


def _plain_spec(spec: Mapping) -> dict:
    return {"name": spec["name"], "kwargs": dict(spec.get("kwargs", {}))}


def load_model(path: str | os.PathLike, map_location: Any = "cpu", with_heads: bool = True,
               ema: bool = True) -> LoadedModel:
    """Backbone (+ classifier / self-supervised head when present) from our or the release's checkpoint.

    ``info``: ``source`` ("s2m2" | "release-mixup" | "release-rotation"), ``backbone`` ({"name",
    "kwargs"}, enough for ``create_backbone``), ``epoch``, ``config`` (ours: the training config, else
    None), ``fingerprint`` (16 hex chars of the file's sha256) and ``path``. The modules are built on
    the CPU in eval mode (``map_location`` only steers ``torch.load``); move them with ``.to(device)``.
    A run trained with ``optim.ema_decay`` stores the weights' moving average beside them: ``ema=True``
    loads the average (what the run validated; ``info["weights"] == "ema"``), ``ema=False`` the trained
    weights (``"trained"``, also every checkpoint without an average). A bare release state dict (no ``{"epoch", "state"}`` wrapper) loads too, with ``epoch`` None.
    """
    path = Path(path)
    payload = read_payload(path, map_location)
    try:
        source = checkpoint_source(payload)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    loaded = (_load_ours(payload, path, with_heads, ema) if source == "s2m2"
              else _load_release(payload, path, source, with_heads))
    loaded.info.update(fingerprint=file_fingerprint(path), path=str(path))
    for module in (loaded.backbone, loaded.classifier, loaded.ss_head):
        if module is not None:
            module.eval()
    return loaded


def load_backbone(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[Backbone, dict]:
    """``(backbone in eval mode, info)`` from our checkpoint or the release's (see ``load_model``)."""
    loaded = load_model(path, map_location, with_heads=False)
    return loaded.backbone, loaded.info


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    require: tuple[str, ...] = RESUME_KEYS) -> dict:
    """Our full checkpoint payload (to resume training), validated: format, version and ``require`` keys.

    Adds ``payload["fingerprint"]``. Release checkpoints are rejected (they cannot be resumed; use
    ``load_model`` to start from their weights).
    """
    path = Path(path)
    payload = read_payload(path, map_location)
    if payload.get("format") != CHECKPOINT_FORMAT:
        kind = "a release checkpoint" if _release_state(payload) is not None else "not an s2m2 checkpoint"
        raise CheckpointError(f"{path}: {kind}; only s2m2 checkpoints hold what resuming needs "
                              f"(load its weights with s2m2.checkpoint.load_model instead)")
    _validate_ours(payload, path, require)
    payload["fingerprint"] = file_fingerprint(path)
    return payload


# ---------------------------------------------------------------------------------------------------
# Ours -> release


def release_state_dict(backbone: WideResNet, classifier: CosineClassifier | None = None,
                       kind: str = "mixup") -> dict[str, torch.Tensor]:
    """Our WRN (+ cosine classifier) as the release's ``'state'`` dict of a ``kind`` checkpoint.

    ``kind="mixup"``: top-level backbone names + ``linear.L.weight_{g,v}``; ``kind="rotation"``:
    ``feature.``-prefixed names + ``classifier.L.weight_{g,v}``. Tensors are detached CPU copies.
    """
    if kind not in ("mixup", "rotation"):
        raise ValueError(f"kind must be 'mixup' or 'rotation', got {kind!r}")
    if not isinstance(backbone, WideResNet):
        raise TypeError(f"the release format holds a WideResNet, got {type(backbone).__name__}")
    prefix, head_prefix = ("", "linear.L.") if kind == "mixup" else ("feature.", "classifier.L.")
    state = {prefix + _rename_prefix(name, OURS_TO_RELEASE): value.detach().cpu().clone()
             for name, value in backbone.state_dict().items()}
    if classifier is not None:
        if not isinstance(classifier, CosineClassifier):
            raise TypeError(f"the release's classifier is a cosine classifier (distLinear), got {type(classifier).__name__}")
        if classifier.scale != default_cosine_scale(classifier.num_classes):
            # distLinear fixes the scale from its width; another scale would silently change the logits.
            raise ValueError(f"classifier scale {classifier.scale} differs from the release's fixed rule "
                             f"({default_cosine_scale(classifier.num_classes)} for {classifier.num_classes} classes)")
        for name, value in classifier.state_dict().items():
            state[head_prefix + name] = value.detach().cpu().clone()
    return state


def export_release_checkpoint(backbone: WideResNet, path: str | os.PathLike, *, classifier: CosineClassifier | None = None,
                              ss_head: RotationHead | None = None, kind: str = "mixup", epoch: int = 0) -> Path:
    """Write our model as the release's checkpoint ``{"epoch", "state"[, "rotate"]}`` (atomically).

    The rotation head, when given, is saved under ``"rotate"`` as ``nn.Sequential(nn.Linear(d, 4))``
    keys (``0.weight``, ``0.bias``).
    """
    payload: dict[str, Any] = {"epoch": int(epoch), "state": release_state_dict(backbone, classifier, kind)}
    if ss_head is not None:
        if not isinstance(ss_head, RotationHead):
            raise TypeError(f"the release's self-supervised head is a rotation head, got {type(ss_head).__name__}")
        payload["rotate"] = {f"0.{name}": value.detach().cpu().clone() for name, value in ss_head.state_dict().items()}
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


__all__ = [
    "CheckpointError", "LoadedModel", "RELEASE_TO_OURS", "checkpoint_filter_fn", "checkpoint_source",
    "export_release_checkpoint", "file_fingerprint", "load_backbone", "load_checkpoint", "load_model",
    "load_state_strict", "read_payload", "release_backbone_spec", "release_state_dict",
]
