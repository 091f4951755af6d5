"""data.eval_crop (test and validate at another size than the training crop) and the ablation's --eval-size."""

from __future__ import annotations

import json

import pytest

from s2m2.config import ConfigError, load_config
from s2m2.features import default_transform
from s2m2.report import head_label
from s2m2.trainer import Trainer

from test_ablation import load_ablation_module, write_run_and_ncm_record
from test_ema import TINY

FLATTEN = "model.backbone_kwargs={width: 8, pool: flatten, input_size: 16}"  # 16 px -> a 1x1 final map


@pytest.fixture
def tiny_data(make_prepared):
    return make_prepared(splits={"base": 6, "val": 5}, per_class=16, size=16)


def _config(*extra):
    return load_config(None, TINY + list(extra))


def test_eval_crop_defaults_to_the_training_crop():
    assert _config().data.test_crop == 16
    assert _config("data.eval_resize=20", "data.eval_crop=20").data.test_crop == 20


@pytest.mark.parametrize("extra, message", [
    (["data.eval_crop=20"], "data.eval_resize=18 is smaller than the evaluation crop 20"),
    (["data.eval_crop=0"], "data.eval_crop must be > 0"),
    (["data.eval_resize=14"], "data.eval_resize=14 is smaller than the evaluation crop 16"),
])
def test_config_refuses_a_crop_outside_the_resized_image(extra, message):
    with pytest.raises(ConfigError, match=message):
        _config(*extra)


def test_validation_sees_images_of_the_eval_crop(tiny_data, tmp_path):
    trainer = Trainer(_config(f"data.root={tiny_data}", f"runtime.out_dir={tmp_path / 'run'}",
                              "data.eval_resize=20", "data.eval_crop=20"))
    sizes = []
    backbone = trainer.model.backbone
    handle = backbone.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        trainer.validator(backbone)
    finally:
        handle.remove()
    assert sizes and set(sizes) == {(20, 20)}


def test_trainer_refuses_an_eval_crop_the_backbone_cannot_take_before_training(tiny_data, tmp_path):
    # 18 px still reaches Conv-4's 1x1 final map (18 -> 9 -> 4 -> 2 -> 1); 32 px gives 2x2, which flatten refuses
    Trainer(_config(f"data.root={tiny_data}", f"runtime.out_dir={tmp_path / 'ok'}", FLATTEN, "data.eval_crop=18"))
    with pytest.raises(ConfigError, match="data.eval_crop=32: backbone conv4 cannot take 32-pixel images"):
        Trainer(_config(f"data.root={tiny_data}", f"runtime.out_dir={tmp_path / 'bad'}", FLATTEN,
                        "data.eval_resize=32", "data.eval_crop=32"))
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_features_default_to_the_checkpoint_configs_eval_crop():
    info = {"config": {"data": {"crop_size": 32, "eval_resize": 40, "eval_crop": 40}}}
    assert (default_transform(info).resize, default_transform(info).crop) == (40, 40)
    info["config"]["data"]["eval_crop"] = None  # a config that leaves it at the training crop
    assert (default_transform(info).resize, default_transform(info).crop) == (40, 32)
    del info["config"]["data"]["eval_crop"]     # checkpoints written before the key existed
    assert (default_transform(info).resize, default_transform(info).crop) == (40, 32)


def test_report_names_a_test_size_other_than_the_usual_ones():
    record = {"head": {"name": "ncm"}, "feature_transform": {},
              "features": {"transform": {"resize": 40, "crop": 40, "views": "centre"}}}
    assert head_label(record) == "ncm (whole image at 40 px)"
    record["features"]["transform"].update(resize=44, views="ten_crop")
    assert head_label(record) == "ncm (resize 44, crop 40, ten-crop views)"
    for usual in ((36, 32), (92, 80), (28, 28)):
        record["features"]["transform"].update(resize=usual[0], crop=usual[1], views="centre")
        assert head_label(record) == "ncm"


def _fake_s2m2_at_40px(ablation, fingerprint: str, ran: list):
    """Stands in for the ablation's `s2m2` subprocess: logs each argv in ``ran``; `evaluate` writes a 10-episode
    ncm record of the checkpoint ``fingerprint`` with features of the whole image at 40 px."""
    def fake_s2m2(argv, log=None):
        ran.append(argv)
        if argv[0] == "evaluate":
            with open(argv[argv.index("--out") + 1], "w") as f:
                json.dump({"format": "s2m2-evaluation", "results": [{"episodes": 10}], "head": {"name": "ncm"},
                           "features": {"checkpoint": {"fingerprint": fingerprint},
                                        "transform": {"resize": 40, "crop": 40, "default": False}}}, f)
        return ablation.Step(command=" ".join(argv), date="", exit=0, seconds=0.0)
    return fake_s2m2


def test_ablation_evaluates_another_size_into_files_of_their_own(tmp_path, monkeypatch):
    from s2m2.checkpoint import file_fingerprint

    ablation = load_ablation_module()
    size = ablation.EvalProtocol(size=(40, 40))
    run, out, default_record = write_run_and_ncm_record(
        tmp_path, {"method": "manifold_mixup"}, {"transform": {"resize": 36, "crop": 32, "default": True}})
    fingerprint = file_fingerprint(run / "best.pt")
    assert ablation.same_record(default_record, fingerprint, 10)
    assert not ablation.same_record(default_record, fingerprint, 10, size)
    assert size.suffix == "-resize40-crop40"
    assert ablation.EvalProtocol("ten_crop", (40, 40)).suffix == "-resize40-crop40-ten_crop"

    ran = []
    monkeypatch.setattr(ablation, "s2m2", _fake_s2m2_at_40px(ablation, fingerprint, ran))
    records = ablation.evaluate_method("manifold_mixup", run, tmp_path / "data", out, 10, ["ncm"], {},
                                       tmp_path / "log", None, size)
    assert records == [out / "records" / "manifold_mixup-ncm-resize40-crop40.json"]
    features, _ = ran
    assert features[features.index("--resize") + 1:features.index("--resize") + 4] == ["40", "--crop", "40"]
    assert features[features.index("--out") + 1].endswith("features/manifold_mixup-novel-resize40-crop40.pt")
    assert ablation.same_record(records[0], fingerprint, 10, size)      # the next run skips it
    assert not ablation.same_record(records[0], fingerprint, 10)        # and it is not the default protocol's
    assert not ablation.same_record(records[0], fingerprint, 10, ablation.EvalProtocol(size=(44, 40)))


def test_ablation_refuses_a_crop_larger_than_the_resize(capsys):
    ablation = load_ablation_module()
    with pytest.raises(SystemExit):
        ablation.main(["--dataset", "cifar-fs", "--budget-minutes", "1", "--eval-size", "36", "40"])
    assert "--eval-size 36 40: the crop must be > 0 and at most the resize" in capsys.readouterr().err


def test_ablation_evaluates_last_pt_of_a_run_that_validated_into_files_of_their_own(tmp_path, monkeypatch):
    """--eval-checkpoint last: last.pt, not best.pt, into ``-last`` files, labelled so in the variant; the
    best checkpoint's record is neither overwritten nor taken for it."""
    from s2m2.checkpoint import file_fingerprint

    ablation = load_ablation_module()
    last = ablation.EvalProtocol(size=(40, 40), checkpoint="last")
    assert last.suffix == "-resize40-crop40-last"
    run, out, best_record = write_run_and_ncm_record(tmp_path, {"method": "manifold_mixup"})
    (run / "last.pt").write_bytes(b"the state at the end of the budget")
    assert ablation.checkpoint_of(run) == run / "best.pt"
    assert ablation.checkpoint_of(run, "last") == run / "last.pt"
    fingerprint = file_fingerprint(run / "last.pt")
    ran = []
    monkeypatch.setattr(ablation, "s2m2", _fake_s2m2_at_40px(ablation, fingerprint, ran))
    best_text = best_record.read_text()
    records = ablation.evaluate_method("manifold_mixup", run, tmp_path / "data", out, 10, ["ncm"], {},
                                       tmp_path / "log", "seed 1", last)
    assert records == [out / "records" / "manifold_mixup-ncm-resize40-crop40-last.json"]
    features, _ = ran
    assert features[features.index("--checkpoint") + 1] == str(run / "last.pt")
    provenance = json.loads(records[0].read_text())["provenance"]
    assert provenance["variant"] == "seed 1: last.pt" and provenance["checkpoint_used"] == "last.pt (last state)"
    assert best_record.read_text() == best_text
    assert ablation.same_record(records[0], fingerprint, 10, last)
    assert not ablation.same_record(best_record, fingerprint, 10, last)
    (run / "best.pt").unlink()
    (run / "last.pt").unlink()
    with pytest.raises(ablation.AblationError, match="no last.pt"):
        ablation.checkpoint_of(run, "last")
