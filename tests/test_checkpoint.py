"""Checkpoints: ours, the release's (import with numerical faithfulness), export, and clear errors."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from s2m2.checkpoint import (
    CheckpointError, checkpoint_filter_fn, export_release_checkpoint, load_backbone, load_checkpoint,
    load_model, release_state_dict,
)
from s2m2.models import create_backbone
from s2m2.models.heads import CosineClassifier, create_head, head_spec
from s2m2.utils import atomic_torch_save

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SHARED, shared_path  # noqa: E402
from release_reference import (  # noqa: E402
    parse_tsv, random_release_state, release_cosine_logits, release_wrn_entries, release_wrn_features,
)

MIXUP_TSV = ("docs", "official_wrn28_10_mixup_state_dict.tsv")
ROTATION_TSV = ("docs", "official_rotation_model_state_dict.tsv")


@pytest.fixture(scope="module")
def wrn28_10_with_heads():
    """WRN-28-10 + 200-way cosine head + rotation head, with randomised BN statistics (eval mode)."""
    torch.manual_seed(0)
    backbone = create_backbone("wrn28_10").eval()
    _randomise_bn(backbone)
    return backbone, CosineClassifier(640, 200), create_head("rotation", 640)


def _randomise_bn(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)


def _images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prefixed(state, prefix):
    return {prefix + name: value for name, value in state.items()}


# ------------------------------------------------------------------------------ release names and shapes


@pytest.mark.parametrize("kind,tsv", [("mixup", MIXUP_TSV), ("rotation", ROTATION_TSV)])
def test_export_produces_every_release_name_and_shape(kind, tsv, wrn28_10_with_heads):
    listing = parse_tsv(shared_path(*tsv))
    backbone, classifier, _ = wrn28_10_with_heads
    exported = release_state_dict(backbone, classifier, kind=kind)
    for name, (shape, dtype) in listing.items():
        assert name in exported, f"export lacks {name}"
        assert tuple(exported[name].shape) == shape, name
        assert str(exported[name].dtype) == f"torch.{dtype}", name
    extra = set(exported) - set(listing)
    # the rotation listing leaves out the classifier its header describes (classifier.L.*)
    assert extra == (set() if kind == "mixup" else {"classifier.L.weight_g", "classifier.L.weight_v"})
    assert list(release_state_dict(backbone, None, kind=kind)) == [n for n in listing if "L.weight" not in n]


def test_reference_listing_generator_matches_official_listings():
    """The reference's name generator (used for small WRNs below) reproduces both official listings."""
    assert release_wrn_entries(28, 10, 200) == parse_tsv(shared_path(*MIXUP_TSV))
    rotation = {name.removeprefix("feature."): v for name, v in parse_tsv(shared_path(*ROTATION_TSV)).items()}
    assert release_wrn_entries(28, 10, None) == rotation


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind,wrap", [("mixup", ""), ("mixup", "module."), ("rotation", ""),
                                       ("rotation", "module.")])
def test_wrn28_10_release_round_trip_is_identical(kind, wrap, wrn28_10_with_heads, tmp_path):
    backbone, classifier, rotation = wrn28_10_with_heads
    path = tmp_path / f"{kind}.tar"
    if not wrap:
        export_release_checkpoint(backbone, path, classifier=classifier, ss_head=rotation, kind=kind, epoch=470)
    else:  # DataParallel-style names, written the way the release's torch.save writes them
        torch.save({"epoch": 470, "state": _prefixed(release_state_dict(backbone, classifier, kind), wrap),
                    "rotate": _prefixed({"0.weight": rotation.weight, "0.bias": rotation.bias}, wrap)}, path)
    model = load_model(path)
    info = model.info
    assert info["source"] == f"release-{kind}" and info["epoch"] == 470 and info["config"] is None
    assert info["backbone"] == {"name": "wrn28_10", "kwargs": {"dropout": 0.5}}
    assert info["fingerprint"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert not model.backbone.training
    x = _images()
    with torch.no_grad():
        assert torch.equal(model.backbone(x), backbone(x))
    assert torch.equal(model.classifier.weight_g, classifier.weight_g)
    assert torch.equal(model.classifier.weight_v, classifier.weight_v) and model.classifier.scale == 2.0
    assert torch.equal(model.ss_head.weight, rotation.weight) and torch.equal(model.ss_head.bias, rotation.bias)
    if kind == "mixup" and not wrap:
        loaded, backbone_info = load_backbone(path)
        assert backbone_info == info
        with torch.no_grad():
            assert torch.equal(loaded(x), backbone(x))


def test_release_rotate_head_uses_sequential_names(tmp_path):
    backbone = create_backbone("wrn", depth=10, widen=1).eval()
    path = export_release_checkpoint(backbone, tmp_path / "r.tar", ss_head=create_head("rotation", 64), kind="rotation")
    payload = torch.load(path, weights_only=True)
    assert sorted(payload["rotate"]) == ["0.bias", "0.weight"] and payload["rotate"]["0.weight"].shape == (4, 64)
    assert all(name.startswith("feature.") for name in payload["state"])


# ------------------------------------------------------------------------------ numerical faithfulness


def test_wrn28_10_import_matches_independent_reference(tmp_path):
    """A release-format checkpoint filled from the official listing (not from our export) loads into our
    model, whose features / logits equal the functional re-implementation of the release's forward."""
    tsv = SHARED.joinpath(*MIXUP_TSV)
    # the official listing when ../shared is present; else the generated one (equal to it, tested above)
    listing = parse_tsv(tsv) if tsv.is_file() else release_wrn_entries(28, 10, 200)
    state = random_release_state(listing, seed=3)
    path = tmp_path / "470.tar"
    torch.save({"epoch": 470, "state": state}, path)
    model = load_model(path)
    x = _images(2, 32, seed=4)
    with torch.no_grad():
        ours = model.backbone(x)
        reference = release_wrn_features(state, x)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
        assert reference.abs().mean() > 1e-2  # not a degenerate (all-zero) comparison
        torch.testing.assert_close(model.classifier(ours),
                                   release_cosine_logits(state["linear.L.weight_g"], state["linear.L.weight_v"], ours))


# How the release's files name things: (backbone prefix, classifier prefix) per layout.
RELEASE_LAYOUTS = {
    "mixup": ("", "linear."),                                  # wrn_mixup_model
    "module.": ("module.", "module.linear."),                  # ... trained under nn.DataParallel
    "rotation": ("feature.", "classifier."),                   # BaselineTrain (rotation phase)
    "module.feature.": ("module.feature.", "module.classifier."),
    "feature.module.": ("feature.module.", "classifier."),     # only the backbone wrapped
}


@pytest.mark.parametrize("depth,widen,size", [(10, 2, 28), (16, 2, 80)])
@pytest.mark.parametrize("layout", list(RELEASE_LAYOUTS))
def test_small_wrn_import_matches_reference(depth, widen, size, layout, tmp_path):
    entries = release_wrn_entries(depth, widen, num_classes=64)
    state = random_release_state(entries, seed=depth + widen)
    backbone_prefix, classifier_prefix = RELEASE_LAYOUTS[layout]
    state = {(classifier_prefix + name.removeprefix("linear.")) if name.startswith("linear.") else backbone_prefix + name:
             value for name, value in state.items()}
    path = tmp_path / "small.tar"
    torch.save({"epoch": 5, "state": state}, path)
    model = load_model(path)
    assert model.info["backbone"] == {"name": "wrn", "kwargs": {"depth": depth, "widen": widen, "dropout": 0.5}}
    assert model.info["source"] == ("release-rotation" if RELEASE_LAYOUTS[layout][0].count("feature") else "release-mixup")
    x = _images(3, size, seed=size)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), release_wrn_features(state, x), rtol=1e-4, atol=1e-5)
    assert model.classifier.num_classes == 64


def test_modern_weight_norm_names_import(tmp_path):
    """torch.nn.utils.parametrizations.weight_norm names (original0 = g, original1 = v) map to ours too."""
    backbone = create_backbone("wrn", depth=10, widen=1).eval()
    head = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(64, 10, bias=False), dim=0)
    state = release_state_dict(backbone)
    state.update(_prefixed(head.state_dict(), "linear.L."))
    torch.save({"epoch": 1, "state": state}, tmp_path / "m.tar")
    loaded = load_model(tmp_path / "m.tar")
    features = torch.randn(5, 64)
    unit = features / (features.norm(dim=1, keepdim=True) + 1e-5)
    torch.testing.assert_close(loaded.classifier(features), 2.0 * head(unit))


def test_filter_fn_is_a_name_table():
    state = {"module.feature.conv1.weight": 1, "feature.block2.layer.3.bn1.weight": 2, "bn1.bias": 3,
             "linear.L.weight_g": 4, "block3.layer.0.convShortcut.weight": 5}
    assert checkpoint_filter_fn(state) == {"stem.weight": 1, "stages.1.layer.3.bn1.weight": 2, "tail.bn1.bias": 3,
                                           "stages.2.layer.0.convShortcut.weight": 5}


def test_legacy_serialization_loads(tmp_path):
    """Release checkpoints predate torch's zip format; the legacy format loads with weights_only too."""
    backbone = create_backbone("wrn", depth=10, widen=1).eval()
    torch.save({"epoch": 9, "state": release_state_dict(backbone)}, tmp_path / "old.tar",
               _use_new_zipfile_serialization=False)
    loaded, info = load_backbone(tmp_path / "old.tar")
    x = _images(2, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), backbone(x))
    assert info["epoch"] == 9
    torch.save(release_state_dict(backbone), tmp_path / "bare.pt")  # no {"epoch", "state"} wrapper
    loaded, info = load_backbone(tmp_path / "bare.pt")
    assert info["epoch"] is None and info["source"] == "release-mixup"
    with torch.no_grad():
        assert torch.equal(loaded(x), backbone(x))


# ------------------------------------------------------------------------------ our checkpoints


def _our_payload(model, classifier, ss_head=None, **extra):
    """Our checkpoint payload as the trainer writes it (interface doc); ``extra`` overrides top-level keys."""
    payload = {
        "format": "s2m2-checkpoint", "format_version": 1,
        "backbone": {"name": "wrn", "kwargs": {"depth": 10, "widen": 1, "dropout": 0.0}},
        "heads": {"classifier": head_spec(classifier)},
        "state": {"backbone": model.state_dict(), "classifier": classifier.state_dict()},
        "method": "s2m2_r", "phase": "mixup", "epoch": 4, "step": 40, "config": {"model": {"backbone": "wrn"}},
        "data": {"root": "/x", "splits": ["base"], "fingerprint": "abc", "num_classes": 10},
        "optimizer": {"state": {}, "param_groups": []}, "scaler": None, "rng": {"torch": torch.get_rng_state()},
        "history": [], "best": None,
    }
    if ss_head is not None:
        payload["heads"]["ss_head"] = head_spec(ss_head)
        payload["state"]["ss_head"] = ss_head.state_dict()
    payload.update(extra)
    return payload


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("wrn", depth=10, widen=1, dropout=0.0).eval()
    _randomise_bn(backbone)
    classifier, rotation = create_head("cosine", 64, 10, scale=5), create_head("rotation", 64)
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(_our_payload(backbone, classifier, rotation), path)
    loaded, info = load_backbone(path)
    assert info["source"] == "s2m2" and info["epoch"] == 4 and info["config"] == {"model": {"backbone": "wrn"}}
    assert info["backbone"] == {"name": "wrn", "kwargs": {"depth": 10, "widen": 1, "dropout": 0.0}}
    assert info["fingerprint"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    x = _images(2, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), backbone(x))
    model = load_model(path)
    assert model.classifier.scale == 5 and torch.equal(model.classifier.weight_g, classifier.weight_g)
    assert torch.equal(model.ss_head.weight, rotation.weight)
    payload = load_checkpoint(path)
    assert payload["step"] == 40 and payload["fingerprint"] == info["fingerprint"]


def test_our_checkpoint_validation(tmp_path):
    backbone = create_backbone("wrn", depth=10, widen=1)
    classifier = create_head("linear", 64, 10)
    path = tmp_path / "c.pt"
    payload = _our_payload(backbone, classifier)
    del payload["optimizer"], payload["rng"]
    atomic_torch_save(payload, path)
    load_backbone(path)  # enough for features
    with pytest.raises(CheckpointError, match=r"c\.pt: s2m2 checkpoint lacks keys: optimizer, rng"):
        load_checkpoint(path)
    atomic_torch_save(_our_payload(backbone, classifier, format_version=2), path)
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_backbone(path)
    atomic_torch_save(_our_payload(backbone, classifier, backbone={"name": "nope", "kwargs": {}}), path)
    with pytest.raises(CheckpointError, match="cannot build backbone"):
        load_backbone(path)
    release = tmp_path / "release.tar"
    export_release_checkpoint(backbone, release)
    with pytest.raises(CheckpointError, match="a release checkpoint"):
        load_checkpoint(release)


# ------------------------------------------------------------------------------ errors


def test_wrong_missing_unexpected_keys_are_listed(tmp_path):
    backbone = create_backbone("wrn", depth=10, widen=1)
    state = release_state_dict(backbone)
    del state["block2.layer.0.bn1.running_var"], state["bn1.weight"]
    state["block3.layer.0.conv1.weight"] = torch.zeros(64, 32, 5, 5)
    state["extra.weight"] = torch.zeros(2)
    torch.save({"epoch": 1, "state": state}, tmp_path / "bad.tar")
    with pytest.raises(CheckpointError) as err:
        load_backbone(tmp_path / "bad.tar")
    message = str(err.value)
    assert "bad.tar" in message
    assert "missing (2): block2.layer.0.bn1.running_var, bn1.weight" in message  # the file's own names
    assert "unexpected (1): extra.weight" in message
    assert "wrong shape (1): block3.layer.0.conv1.weight: file (64, 32, 5, 5), model (64, 32, 3, 3)" in message
    ours = _our_payload(backbone, create_head("linear", 64, 10))
    del ours["state"]["backbone"]["stem.weight"]
    atomic_torch_save(ours, tmp_path / "ours.pt")
    with pytest.raises(CheckpointError, match=r"missing \(1\): stem.weight"):
        load_backbone(tmp_path / "ours.pt")


@pytest.mark.parametrize("content,match", [
    (b"<!DOCTYPE html><html><body>Google Drive - virus scan warning</body></html>", "HTML"),
    (b"", "empty"),
    (b"\x00\x01garbage", "not a PyTorch checkpoint"),
])
def test_non_checkpoint_files(tmp_path, content, match):
    path = tmp_path / "470.tar"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        load_backbone(path)
    assert str(path) in str(err.value)


def test_truncated_unknown_and_unsafe_files(tmp_path):
    good = export_release_checkpoint(create_backbone("wrn", depth=10, widen=1), tmp_path / "good.tar")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.tar: unreadable PyTorch checkpoint"):
        load_backbone(truncated)
    torch.save({"model": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: neither an s2m2 checkpoint"):
        load_backbone(tmp_path / "other.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_backbone(tmp_path / "list.pt")
    torch.save({"state": {"w": torch.zeros(1)}, "obj": Path("/x")}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match=r"unsafe\.pt: holds Python objects"):
        load_backbone(tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_backbone(tmp_path / "absent.tar")


def test_export_refuses_what_the_release_cannot_hold(tmp_path):
    wrn = create_backbone("wrn", depth=10, widen=1)
    with pytest.raises(TypeError, match="WideResNet"):
        export_release_checkpoint(create_backbone("conv4"), tmp_path / "x.tar")
    with pytest.raises(TypeError, match="cosine"):
        export_release_checkpoint(wrn, tmp_path / "x.tar", classifier=create_head("linear", 64, 5))
    with pytest.raises(ValueError, match="scale"):
        export_release_checkpoint(wrn, tmp_path / "x.tar", classifier=create_head("cosine", 64, 5, scale=10))
    assert not (tmp_path / "x.tar").exists()
