"""Test views (``s2m2 features --views``): which crops each view is, that features average over them, that
the choice is recorded and keyed in the cache, and that reports and the ablation keep them apart."""

from __future__ import annotations

import json

import pytest
import torch

from s2m2.data import open_split
from s2m2.data.transforms import EvalTransform
from s2m2.features import extract_features, features_for_checkpoint, load_features
from s2m2.models import create_backbone

from test_ablation import load_ablation_module, write_run_and_ncm_record
from test_features import write_checkpoint

PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # no normalisation: crops compare to the raw pixels


def position_images(side: int, batch: int = 2) -> torch.Tensor:
    """uint8 (B, side, side, 3): every pixel a different value, so each crop has its own content."""
    values = torch.arange(batch * side * side * 3) % 251
    return values.reshape(batch, side, side, 3).to(torch.uint8)


def test_views_are_the_centre_crop_its_mirror_and_the_four_corners():
    images = position_images(12)
    x = images.permute(0, 3, 1, 2).float() / 255  # 12 = the resize: no interpolation, crops of the pixels
    centre = EvalTransform(12, 8, **PLAIN)
    [only] = centre.view_batches(images)
    assert torch.equal(only, centre(images)) and torch.equal(only, x[..., 2:10, 2:10])

    flip = EvalTransform(12, 8, views="flip", **PLAIN).view_batches(images)
    assert len(flip) == 2 and torch.equal(flip[0], only) and torch.equal(flip[1], only.flip(-1))

    ten = EvalTransform(12, 8, views="ten_crop", **PLAIN).view_batches(images)
    crops = [x[..., 2:10, 2:10], x[..., 0:8, 0:8], x[..., 0:8, 4:12], x[..., 4:12, 0:8], x[..., 4:12, 4:12]]
    assert len(ten) == 10
    for got, want in zip(ten, crops + [c.flip(-1) for c in crops]):
        assert torch.equal(got, want)
    assert len({tuple(v.flatten().tolist()) for v in ten}) == 10  # ten different views


def test_views_are_part_of_the_cache_key_and_the_centre_key_is_unchanged():
    # The centre crop's key is the one written before views existed: old feature caches stay valid.
    assert EvalTransform(36, 32).key() == ("resize36-crop32-mean[0.485, 0.456, 0.406]-"
                                           "std[0.229, 0.224, 0.225]")
    keys = {EvalTransform(36, 32, views=v).key() for v in ("centre", "flip", "ten_crop")}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="test views must be one of centre, flip, ten_crop, got 'five'"):
        EvalTransform(36, 32, views="five")


def test_features_are_the_mean_over_the_views(make_prepared):
    root = make_prepared(splits={"novel": 3}, per_class=5, size=20)
    split = open_split(root, "novel")
    torch.manual_seed(0)
    backbone = create_backbone("conv4", width=8).eval()
    images = torch.from_numpy(split.images[:].copy())
    for views in ("flip", "ten_crop"):
        transform = EvalTransform(24, 20, views=views)
        feats, _ = extract_features(backbone, split, transform, batch_size=4, progress=False)
        with torch.no_grad():
            expected = torch.stack([backbone(v) for v in transform.view_batches(images)]).mean(0)
        torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
        centre, _ = extract_features(backbone, split, EvalTransform(24, 20), batch_size=4, progress=False)
        assert (feats - centre).abs().max() > 1e-3  # the extra views changed the features


def test_views_are_recorded_and_cached_apart(make_prepared, tmp_path, capsys):
    from s2m2.cli import main as cli

    root = make_prepared(splits={"base": 4, "novel": 5}, per_class=6, size=16)
    ckpt = tmp_path / "model.pt"
    write_checkpoint(ckpt, kwargs={"width": 8})
    out = tmp_path / "novel.pt"
    logs = []
    centre = features_for_checkpoint(ckpt, root, "novel", out, progress=False, log=logs.append)
    ten = features_for_checkpoint(ckpt, root, "novel", out, progress=False, log=logs.append, views="ten_crop")
    assert "recomputing" in logs[-2]  # the centre-crop cache is not reused for ten crops
    assert ten["transform"]["views"] == "ten_crop" and centre["transform"]["views"] == "centre"
    assert (ten["transform"]["resize"], ten["transform"]["crop"]) == (18, 16)  # still the checkpoint's default
    assert ten["cache_key"] != centre["cache_key"]
    again = features_for_checkpoint(ckpt, root, "novel", out, progress=False, log=logs.append, views="ten_crop")
    assert "cache hit" in logs[-1] and torch.equal(again["features"], ten["features"])

    flip_file = tmp_path / "flip.pt"
    assert cli(["features", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(flip_file),
                "--views", "flip", "--no-progress"]) == 0
    assert load_features(flip_file)["transform"]["views"] == "flip"
    assert "viewsflip" in capsys.readouterr().out


def test_report_names_the_views_in_the_head():
    from s2m2.report import head_label

    record = {"head": {"name": "ncm"}, "feature_transform": {},
              "features": {"transform": {"resize": 36, "crop": 32, "views": "ten_crop"}}}
    assert head_label(record) == "ncm (ten-crop views)"
    record["features"]["transform"]["views"] = "centre"
    assert head_label(record) == "ncm"
    del record["features"]["transform"]["views"]  # records written before views existed
    assert head_label(record) == "ncm"


def test_ablation_evaluates_other_views_into_files_of_their_own(tmp_path, monkeypatch):
    from s2m2.checkpoint import file_fingerprint

    ablation = load_ablation_module()
    run, out, centre_record = write_run_and_ncm_record(tmp_path, {"method": "manifold_mixup"},
                                                       {"transform": {"views": "centre"}})
    assert ablation.same_record(centre_record, file_fingerprint(run / "best.pt"), 10)
    assert not ablation.same_record(centre_record, file_fingerprint(run / "best.pt"), 10,
                                    ablation.EvalProtocol("ten_crop"))

    ran = []

    def fake_s2m2(argv, log=None):
        ran.append(argv)
        if argv[0] == "evaluate":
            with open(argv[argv.index("--out") + 1], "w") as f:
                json.dump({"format": "s2m2-evaluation", "results": [], "features": {}, "head": {"name": "ncm"}}, f)
        return ablation.Step(command=" ".join(argv), date="", exit=0, seconds=0.0)

    monkeypatch.setattr(ablation, "s2m2", fake_s2m2)
    records = ablation.evaluate_method("manifold_mixup", run, tmp_path / "data", out, 10, ["ncm"], {},
                                       tmp_path / "log", None, ablation.EvalProtocol("ten_crop"))
    assert records == [out / "records" / "manifold_mixup-ncm-ten_crop.json"]
    features, evaluate = ran
    assert features[features.index("--views") + 1] == "ten_crop"
    assert features[features.index("--out") + 1].endswith("features/manifold_mixup-novel-ten_crop.pt")
    assert evaluate[evaluate.index("--out") + 1] == str(records[0])
    assert json.loads(centre_record.read_text())["features"]["transform"]["views"] == "centre"  # untouched


def test_ablation_picks_the_cross_domain_backbone_from_records_of_the_same_views(tmp_path):
    ablation = load_ablation_module()
    scores = {"baseline-logreg.json": 70.0, "s2m2_r-logreg.json": 72.0,            # centre: s2m2_r leads
              "baseline-logreg-ten_crop.json": 75.0, "s2m2_r-logreg-ten_crop.json": 74.0}  # ten crops: baseline
    for name, mean in scores.items():
        (tmp_path / name).write_text(json.dumps({"results": [{"ways": 5, "shots": 5, "mean": mean}]}))
    assert ablation.best_method(tmp_path, ["baseline", "s2m2_r"]) == "s2m2_r"
    assert ablation.best_method(tmp_path, ["baseline", "s2m2_r"], ablation.EvalProtocol("ten_crop")) == "baseline"
    assert ablation.best_method(tmp_path, ["baseline", "s2m2_r"], ablation.EvalProtocol("flip")) is None  # none


def test_ablation_cross_domain_step_uses_the_same_views(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import s2m2.data

    ablation = load_ablation_module()
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"checkpoint")
    split = SimpleNamespace(labels=[0, 1, 2], class_names=["a", "b", "c"])
    monkeypatch.setattr(ablation, "prepare", lambda *args: None)
    monkeypatch.setattr(s2m2.data, "open_split", lambda root, name: split)
    ran = []

    def fake_s2m2(argv, log=None):
        ran.append(argv)
        with open(argv[argv.index("--out") + 1], "w") as f:
            json.dump({"format": "s2m2-cross-domain", "results": [], "features": {}, "head": {"name": "ncm"}}, f)
        return ablation.Step(command=" ".join(argv), date="", exit=0, seconds=0.0)

    monkeypatch.setattr(ablation, "s2m2", fake_s2m2)
    (tmp_path / "records").mkdir()
    records = ablation.cross_domain("s2m2_r", run, tmp_path / "src", tmp_path / "cub", tmp_path, 10, ["ncm"], {},
                                    "cifar-fs", tmp_path / "log", ablation.EvalProtocol("ten_crop"))
    assert records == [tmp_path / "records" / "cross-domain-s2m2_r-ncm-ten_crop.json"]
    [argv] = ran
    assert argv[0] == "cross-domain" and argv[argv.index("--views") + 1] == "ten_crop"
    assert argv[argv.index("--features-out") + 1].endswith("cub-s2m2_r-ten_crop.pt")
