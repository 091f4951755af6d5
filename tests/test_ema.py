"""The weights' moving average (s2m2/ema.py, ``optim.ema_decay``): its arithmetic, what the trainer validates
and saves, exact resume, the per-phase restart, and what ``load_model`` returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from s2m2.checkpoint import load_model
from s2m2.config import ConfigError, load_config
from s2m2.ema import ema_decay_at, make_ema, update_ema
from s2m2.trainer import Trainer

TINY = ["model.backbone=conv4", "model.backbone_kwargs={width: 8}", "data.crop_size=16", "data.eval_resize=18",
        "validation.queries=5", "validation.episodes=20", "validation.head=ncm", "runtime.progress=false",
        "runtime.tensorboard=false", "runtime.plots=false", "schedule.batch_size=32", "method.name=baseline++"]


@pytest.fixture
def tiny_data(make_prepared):
    return make_prepared(splits={"base": 6, "val": 5}, per_class=16, size=16)


def _trainer(root, out, *extra, resume=None) -> Trainer:
    return Trainer(load_config(None, TINY + [f"data.root={root}", f"runtime.out_dir={out}", *extra]), resume=resume)


def _load(path):
    return torch.load(path, weights_only=True)


def test_update_averages_parameters_and_batchnorm_statistics_and_copies_counters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = make_ema(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3, 6, 6))  # moves the running statistics and num_batches_tracked
    update_ema(ema, model, 0.75)
    after, now = ema.state_dict(), model.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(after[key], 0.75 * before[key] + 0.25 * now[key], atol=1e-6), key
        assert not torch.allclose(after[key], now[key]), key
    assert int(after["1.num_batches_tracked"]) == int(now["1.num_batches_tracked"]) == 1
    assert not any(p.requires_grad for p in ema.parameters())


def test_decay_warms_up_from_one_tenth_to_the_configured_value():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.999, 100_000) == 0.999
    assert ema_decay_at(0.5, 20) == 0.5   # (1 + 20) / 30 = 0.7 is above it


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1])
def test_config_rejects_decays_outside_the_open_unit_interval(value):
    with pytest.raises(ConfigError, match="optim.ema_decay"):
        load_config(None, [f"optim.ema_decay={value}"])


def test_one_step_average_is_one_tenth_initial_nine_tenths_trained(tiny_data, tmp_path):
    initial = _trainer(tiny_data, tmp_path / "init", "optim.ema_decay=0.99").model.state_dict()
    trainer = _trainer(tiny_data, tmp_path / "run", "optim.ema_decay=0.99", "schedule.max_steps=1")
    trainer.fit()
    payload = _load(tmp_path / "run" / "last.pt")
    assert payload["progress"]["ema_updates"] == 1
    trained, averaged = payload["state"]["backbone"], payload["ema_state"]["backbone"]
    for key, value in averaged.items():
        if value.is_floating_point():
            expected = 0.1 * initial[f"backbone.{key}"] + 0.9 * trained[key]
            assert torch.allclose(value, expected, atol=1e-6), key


def test_validation_and_load_model_use_the_average(tiny_data, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("s2m2.trainer.Validator.__call__", lambda self, backbone: (seen.append(backbone), (50.0, 1.0))[1])
    trainer = _trainer(tiny_data, tmp_path / "run", "optim.ema_decay=0.9", "schedule.epochs=2")
    trainer.fit()
    assert seen and all(b is trainer.ema.backbone for b in seen)
    payload = _load(tmp_path / "run" / "best.pt")
    averaged = load_model(tmp_path / "run" / "best.pt")
    trained = load_model(tmp_path / "run" / "best.pt", ema=False)
    assert averaged.info["weights"] == "ema" and trained.info["weights"] == "trained"
    for key, value in averaged.backbone.state_dict().items():
        assert torch.equal(value, payload["ema_state"]["backbone"][key])
        assert torch.equal(trained.backbone.state_dict()[key], payload["state"]["backbone"][key])
    assert any(not torch.equal(payload["ema_state"]["backbone"][k], payload["state"]["backbone"][k])
               for k in payload["state"]["backbone"])
    assert torch.equal(averaged.classifier.state_dict()["weight_v"], payload["ema_state"]["classifier"]["weight_v"])
    # s2m2 features extracts with the average and says so in the features file
    from s2m2.features import features_for_checkpoint
    feats = features_for_checkpoint(tmp_path / "run" / "best.pt", tiny_data, "val", tmp_path / "val.pt",
                                    progress=False, log=lambda *a: None)
    assert feats["checkpoint"]["weights"] == "ema"
    averaged.backbone.eval()
    first = torch.load(tmp_path / "val.pt", weights_only=True)["features"][:2]
    from s2m2.data import EvalTransform, open_split
    images = np.array(open_split(tiny_data, "val").images[:2])
    with torch.no_grad():
        # the tiny config's data.eval_resize and data.crop_size
        expected = averaged.backbone(EvalTransform(18, 16)(torch.from_numpy(images)))
    assert torch.allclose(first.float(), expected, atol=1e-5)


def test_checkpoints_without_an_average_load_their_trained_weights(tiny_data, tmp_path):
    _trainer(tiny_data, tmp_path / "run", "schedule.epochs=1").fit()
    payload = _load(tmp_path / "run" / "last.pt")
    assert "ema_state" not in payload
    loaded = load_model(tmp_path / "run" / "last.pt")
    assert loaded.info["weights"] == "trained"
    for key, value in loaded.backbone.state_dict().items():
        assert torch.equal(value, payload["state"]["backbone"][key])


def test_resume_mid_epoch_reproduces_the_average_exactly(tiny_data, tmp_path):
    common = ["optim.ema_decay=0.9", "schedule.epochs=2", "validation.enabled=false"]
    _trainer(tiny_data, tmp_path / "full", *common).fit()
    _trainer(tiny_data, tmp_path / "split", *common, "schedule.max_steps=2").fit()   # 3 steps per epoch
    _trainer(tiny_data, tmp_path / "split", *common, resume="auto").fit()
    full, resumed = _load(tmp_path / "full" / "last.pt"), _load(tmp_path / "split" / "last.pt")
    assert full["progress"]["ema_updates"] == resumed["progress"]["ema_updates"] == full["step"] == 6
    for part in full["ema_state"]:
        for key, value in full["ema_state"][part].items():
            assert torch.equal(value, resumed["ema_state"][part][key]), f"{part}.{key}"


def test_the_average_restarts_at_phase_two(tiny_data, tmp_path):
    _trainer(tiny_data, tmp_path / "run", "method.name=s2m2_r", "schedule.phase1_epochs=1", "schedule.epochs=1",
             "optim.ema_decay=0.9").fit()
    payload = _load(tmp_path / "run" / "last.pt")
    assert payload["step"] == 6 and payload["progress"]["ema_updates"] == 3   # phase 2's three steps only


def test_resume_accepts_a_checkpoint_written_before_a_config_key_existed(tiny_data, tmp_path):
    _trainer(tiny_data, tmp_path / "run", "schedule.epochs=1").fit()
    path = tmp_path / "run" / "last.pt"
    payload = _load(path)
    del payload["config"]["optim"]["ema_decay"]   # as written by s2m2 before optim.ema_decay
    torch.save(payload, path)
    trainer = _trainer(tiny_data, tmp_path / "run", "schedule.epochs=2", resume="auto")
    assert trainer.epoch == 1
    trainer.fit()
    assert _load(path)["epoch"] == 2
