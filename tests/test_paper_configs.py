"""The shipped configs pin the paper's recipe: one table, one row per (dataset, method, setting).

Every expected value below comes from ``../shared/docs/S2M2_SPEC.md`` (the section is cited in the row) or,
where the spec is silent, is marked ``ours`` with the reason; it is NOT read from the configs. A row that
fails means a config drifted from the paper (or the spec changed): fix the config, or the row together with
its citation.

Rows marked PENDING are values being changed right now (issue 9); the row holds the target value and an
``xfail(strict=True)`` mark, so the row starts failing (XPASS) once the config is changed: then delete the
mark.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from s2m2.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PAPER_DATASETS = ("mini_imagenet", "tiered_imagenet", "cub", "cifar_fs")
METHODS = ("baseline", "baseline++", "rotation", "exemplar", "manifold_mixup", "s2m2_r", "s2m2_e")
SELF_SUPERVISED = ("rotation", "exemplar", "s2m2_r", "s2m2_e")
MIXUP = ("manifold_mixup", "s2m2_r", "s2m2_e")
TWO_PHASE = ("s2m2_r", "s2m2_e")
BASE_CLASSES = {"mini_imagenet": 64, "tiered_imagenet": 351, "cub": 100, "cifar_fs": 64}  # spec §7

# Per dataset, from the spec: (input crop, eval resize) §2/§6, dropout §2, cosine width §3 (None = the number
# of training classes), (phase-1 / rotation epochs, S2M2 phase-2 epochs) §6.
DATASET = {
    "mini_imagenet": dict(crop=80, resize=92, dropout=0.5, width=200, epochs=(400, 100),
                          width_cite="§3: the release always builds 200 outputs",
                          epochs_cite="§6: mini 400 rotation + 100 S2M2_R"),
    "cub": dict(crop=80, resize=92, dropout=0.5, width=200, epochs=(200, 100),
                width_cite="§3: the release always builds 200 outputs (CUB labels 0,2,...,198)",
                epochs_cite="§6: CUB 200 + 100"),
    "tiered_imagenet": dict(crop=80, resize=92, dropout=0.5, width=None, epochs=(100, 50),
                            width_cite="§3: 351 classes cannot fit 200 outputs; width = classes, scale 10",
                            epochs_cite="§6: tiered 100 + 50"),
    "cifar_fs": dict(crop=32, resize=36, dropout=0.9, width=64, epochs=(400, 100),
                     width_cite="issue 9 (5): the release's train_cifar.py builds 64 outputs",
                     epochs_cite="ours: §6 says CIFAR-FS epochs are unknown; mini's schedule"),
}

# Values being changed by the lead right now: (dataset, setting) -> reason. Delete an entry once its
# config has changed (the row then XPASSes, which strict xfail reports as a failure).
PENDING: dict[tuple[str, str], str] = {
    # e.g. ("cifar_fs", "model.classifier_width"): "CIFAR-FS classifier width 200 -> 64 (issue 9 item 5)",
}


def _rows():
    rows = []

    def row(dataset, method, key, expected, cite):
        rows.append((dataset, method, key, expected, cite))

    for dataset in PAPER_DATASETS:
        d = DATASET[dataset]
        for method in METHODS:
            # architecture (§2, §3)
            row(dataset, method, "model.backbone", "wrn28_10", "§2: WRN-28-10")
            row(dataset, method, "model.backbone_kwargs.dropout", d["dropout"],
                "§2: dropout 0.5 at HEAD, 0.9 for CIFAR-FS")
            classifier = "linear" if method == "baseline" else "cosine"
            row(dataset, method, "classifier", classifier,
                "§1/§3: cosine classifier (distLinear); Baseline is the linear softmax head")
            if classifier == "cosine":
                row(dataset, method, "model.classifier_width", d["width"], d["width_cite"])
                width = d["width"] or BASE_CLASSES[dataset]
                row(dataset, method, "effective_scale", _release_scale(width),
                    "§3: scale 2 for <= 200 outputs, else 10")
            # data and augmentation (§6)
            row(dataset, method, "data.crop_size", d["crop"], "§2: input 80x80 (32x32 for CIFAR-FS)")
            row(dataset, method, "data.eval_resize", d["resize"], "§6: test resize 92 -> crop 80; CIFAR 36 -> 32")
            row(dataset, method, "data.augment", True, "§6: augmentation always on for the paper")
            row(dataset, method, "data.crop_scale", (0.08, 1.0), "§6: RandomResizedCrop (torchvision's scale)")
            row(dataset, method, "data.jitter", 0.4, "§6: brightness/contrast/saturation uniform in [0.6, 1.4]")
            row(dataset, method, "data.flip", True, "§6: horizontal flip")
            row(dataset, method, "data.train_splits", ["base"], "§1: trained on the base classes")
            # optimisation (§6)
            row(dataset, method, "optim.name", "adam", "§6: Adam")
            row(dataset, method, "optim.lr", 1e-3, "§6: lr 1e-3")
            row(dataset, method, "optim.weight_decay", 0.0, "§6: no weight decay")
            row(dataset, method, "schedule.lr_schedule", "constant", "§6: no schedule")
            batch = 64 if method in SELF_SUPERVISED else 256
            row(dataset, method, "schedule.batch_size", batch,
                "§6: batch 64 for rotation (and S2M2, README), 256 otherwise (issue #21)")
            # epochs (§6)
            phase1, phase2 = d["epochs"]
            if method in TWO_PHASE:
                row(dataset, method, "schedule.phase1_epochs", phase1, d["epochs_cite"])
                row(dataset, method, "schedule.epochs", phase2, d["epochs_cite"])
                row(dataset, method, "schedule.phase2_init", "last",
                    "§6 / Algorithm 1: phase 2 continues from the phase-1 weights (last, as the release)")
                row(dataset, method, "method.ss_fraction", 0.25, "§5: the self-supervised term on B/4 images")
            else:
                row(dataset, method, "schedule.phase1_epochs", 0, "single-phase method")
                row(dataset, method, "schedule.epochs", phase1,
                    d["epochs_cite"] + ("" if method == "rotation" else " (ours: the rotation phase's length)"))
            # losses (§4, §5)
            if method in MIXUP:
                row(dataset, method, "method.mixup_alpha", 2.0, "§4: lam ~ Beta(2, 2)")
            if method in SELF_SUPERVISED:
                row(dataset, method, "method.ss_weight", 0.5, "§1/§5: 0.5 * CE_class + 0.5 * CE_ss")
            if method in ("exemplar", "s2m2_e"):
                row(dataset, method, "method.exemplar_views", 4, "§5: 4 random augmentations per image")
            # validation protocol (§6) and early stopping (Algorithm 1)
            row(dataset, method, "validation.enabled", True, "§6: validation every epoch")
            row(dataset, method, "validation.val_split", "val", "§6: on the val classes")
            for key, value in (("ways", 5), ("shots", 1), ("queries", 15), ("episodes", 100), ("every", 1)):
                row(dataset, method, f"validation.{key}", value,
                    "§6: 100 fixed 5-way 1-shot episodes, 15 queries, each epoch")
            row(dataset, method, "validation.patience", 10 if dataset == "tiered_imagenet" else 20,
                "ours: §6 asks for a patience setting (Algorithm 1) without a value; 10 for tiered's short schedule")
            if method in TWO_PHASE:
                row(dataset, method, "validation.phase1_patience", None,
                    "§1 / Algorithm 1: early stopping applies to the Manifold Mixup phase only; phase 1 runs "
                    "its full epochs (issue 9 item 2)")
    return rows


_MISSING = object()


def _release_scale(width: int) -> float:
    """§3, written out here: scale 2 when there are at most 200 outputs, else 10."""
    return 2.0 if width <= 200 else 10.0


def _value(config, key, dataset):
    if key == "classifier":
        return config.classifier_name()
    if key == "effective_scale":  # width None = one output per training class
        width = config.model.classifier_width or BASE_CLASSES[dataset]
        return config.model.classifier_scale or _release_scale(width)
    if key == "data.val_split" or key == "validation.val_split":
        return config.data.val_split
    obj = config
    for part in key.split("."):
        obj = obj.get(part, _MISSING) if isinstance(obj, dict) else getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _params():
    params = []
    for dataset, method, key, expected, cite in _rows():
        marks = ()
        reason = PENDING.get((dataset, key))
        if reason:
            marks = (pytest.mark.xfail(strict=True, reason=f"PENDING: {reason}"),)
        params.append(pytest.param(dataset, method, key, expected, cite, marks=marks,
                                   id=f"{dataset}/{method}/{key}"))
    return params


_CACHE: dict = {}


def _config(dataset, method):
    if (dataset, method) not in _CACHE:
        _CACHE[(dataset, method)] = load_config(CONFIGS / dataset / f"{method}.yaml")
    return _CACHE[(dataset, method)]


@pytest.mark.parametrize("dataset,method,key,expected,cite", _params())
def test_shipped_config_has_the_paper_value(dataset, method, key, expected, cite):
    actual = _value(_config(dataset, method), key, dataset)
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        assert actual == pytest.approx(expected), f"configs/{dataset}/{method}.yaml {key} = {actual!r}; {cite}"
    else:
        if isinstance(expected, tuple) and isinstance(actual, (list, tuple)):
            actual = tuple(actual)
        assert actual == expected, f"configs/{dataset}/{method}.yaml {key} = {actual!r}, expected {expected!r}; {cite}"


def test_the_table_covers_every_shipped_paper_config():
    shipped = {(p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml") if not p.stem.startswith("_")}
    tabled = {(d, m) for d, m, *_ in _rows()}
    assert {(d, m) for d, m in shipped if d in PAPER_DATASETS} == tabled
