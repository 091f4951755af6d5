"""The trainer (s2m2.trainer / `s2m2 train`): every method learns, exact resume, early stopping, NaN stop,
config handling, multi-split data, checkpoint payload; plus the shipped configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s2m2 import objectives
from s2m2.config import METHODS, ConfigError, load_config
from s2m2.train import main as train_main
from s2m2.trainer import Trainer, TrainingDiverged, epoch_permutation, step_indices

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=conv4", "model.backbone_kwargs={width: 8}", "data.crop_size=16", "data.eval_resize=18",
        "validation.queries=5", "validation.episodes=20", "validation.head=ncm", "runtime.progress=false",
        "runtime.tensorboard=false", "runtime.log_every=1", "schedule.batch_size=32"]


@pytest.fixture
def tiny_data(make_prepared):
    return make_prepared(splits={"base": 6, "val": 5}, per_class=16, size=16)


def _config(root, out, *extra):
    config = load_config(None, TINY + [f"data.root={root}", f"runtime.out_dir={out}", *extra])
    return config


def _train(root, out, *extra, resume=None):
    trainer = Trainer(_config(root, out, *extra), resume=resume)
    return trainer, trainer.fit()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_its_loss_falls(tiny_data, tmp_path, method):
    _, summary = _train(tiny_data, tmp_path / method, f"method.name={method}", "schedule.epochs=4",
                        "validation.every=4")
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[2:]) < losses[0], losses
    assert summary["history"][-1]["val_acc"] > 20.0  # 5-way chance; the synthetic classes are easy
    records = [json.loads(line) for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("epoch") == 4
    assert sum(r["type"] == "step" for r in records) == summary["steps"]
    assert records[0]["type"] == "start" and records[0]["flush_denormal"] == "on"  # conftest sets it first


# A fresh interpreter per case: whether intra-op worker threads flush depends on whether the pool existed
# before the trainer set the mode, which a pytest process cannot undo.
_FLUSH_PROBE = """
import json, sys, torch
from s2m2.config import load_config
from s2m2.trainer import setup_runtime
torch.set_num_threads(2)
if sys.argv[2] == "late":
    torch.full((1 << 20,), 2.0).mul(3.0)  # a parallel operation: the worker threads exist from here on
runtime = setup_runtime(load_config(None, [f"runtime.flush_denormal={sys.argv[1]}"]))
products = torch.full((1 << 20,), 1e-30) * 1e-10  # every product is a denormal (1e-40)
print(json.dumps([runtime.flush_denormal, int(products.count_nonzero())]))
"""


@pytest.mark.parametrize("setting, when, status, all_flushed", [
    ("true", "first", "on", True),                     # s2m2 train: set before any parallel operation
    ("false", "first", "off", False),                  # the IEEE default, kept on request
    ("true", "late", "main thread only", False),       # an existing pool keeps its mode: reported, not hidden
])
def test_training_runtime_flushes_denormals_on_every_cpu_thread(setting, when, status, all_flushed):
    out = subprocess.run([sys.executable, "-c", _FLUSH_PROBE, setting, when], capture_output=True, text=True,
                         cwd=REPO, check=True)
    reported, nonzero = json.loads(out.stdout.strip().splitlines()[-1])
    if reported == "unsupported":
        pytest.skip("this CPU has no flush-to-zero mode")
    assert reported == status
    assert (nonzero == 0) == all_flushed, out.stdout
    if status == "main thread only":
        assert "flushed on the main thread only" in out.stderr


def _assert_same_state(a: dict, b: dict):
    for part in a["state"]:
        for key, tensor in a["state"][part].items():
            assert torch.equal(tensor, b["state"][part][key]), f"{part}.{key} differs"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name in opt_a[k]:
            assert torch.equal(torch.as_tensor(opt_a[k][name]), torch.as_tensor(opt_b[k][name]))


@pytest.mark.parametrize("method", ["s2m2_r", "s2m2_e"])
def test_resume_reproduces_an_uninterrupted_run_exactly(tiny_data, tmp_path, method):
    """2 epochs straight vs 1 epoch + resume 1; also a mid-epoch stop (max_steps) + resume. WRN with dropout
    so the global RNG (dropout masks) matters too; s2m2_r runs both phases (rotation, then S2M2_R)."""
    common = [f"method.name={method}", "model.backbone=wrn", "model.backbone_kwargs={depth: 10, widen: 1, dropout: 0.3}",
              "schedule.batch_size=40", "validation.every=1"]
    if method == "s2m2_r":
        common += ["schedule.phase1_epochs=1"]
    total = ["schedule.epochs=2" if method == "s2m2_e" else "schedule.epochs=1"]
    _train(tiny_data, tmp_path / "full", *common, *total)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)

    _train(tiny_data, tmp_path / "split", *common, *total, "schedule.max_steps=2")  # stops mid-epoch 1
    mid = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert mid["step"] == 2 and mid["progress"]["step_in_epoch"] == 2 and mid["epoch"] == 0
    _train(tiny_data, tmp_path / "split", *common, *total, "schedule.max_steps=3", resume="auto")  # ends epoch 1
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1
    _, summary = _train(tiny_data, tmp_path / "split", *common, *total, resume="auto")
    resumed = torch.load(tmp_path / "split" / "last.pt", weights_only=True)

    assert resumed["epoch"] == full["epoch"] == 2 and resumed["step"] == full["step"]
    _assert_same_state(full, resumed)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert [h["val_acc"] for h in resumed["history"]] == [h["val_acc"] for h in full["history"]]


def test_resume_rejects_other_data_or_config(tiny_data, make_prepared, tmp_path):
    _train(tiny_data, tmp_path / "run", "method.name=baseline++", "schedule.epochs=1")
    other = make_prepared(splits={"base": 6, "val": 5}, per_class=16, size=16, seed=1, name="other")
    with pytest.raises(Exception, match="fingerprint"):
        _train(other, tmp_path / "run", "method.name=baseline++", "schedule.epochs=2", resume="auto")
    with pytest.raises(Exception, match="optim.lr"):
        _train(tiny_data, tmp_path / "run", "method.name=baseline++", "schedule.epochs=2", "optim.lr=0.1",
               resume="auto")
    # allowed: more epochs, other runtime settings
    _, summary = _train(tiny_data, tmp_path / "run", "method.name=baseline++", "schedule.epochs=2",
                        "runtime.log_every=5", resume="auto")
    assert summary["epochs"] == 2


def test_early_stopping_stops_after_patience_and_keeps_best(tiny_data, tmp_path, monkeypatch):
    scripted = iter([50.0, 60.0, 55.0, 59.0, 58.0, 90.0, 91.0])
    monkeypatch.setattr("s2m2.trainer.Validator.__call__", lambda self, backbone: (next(scripted), 1.0))
    _, summary = _train(tiny_data, tmp_path / "run", "method.name=baseline++", "schedule.epochs=7",
                        "validation.patience=3")
    assert summary["stopped"] == "early_stop" and summary["epochs"] == 5
    assert summary["best"]["epoch"] == 2 and summary["best"]["val_acc"] == 60.0
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["best"]["val_acc"] == 60.0
    assert [h["val_acc"] for h in summary["history"]] == [50.0, 60.0, 55.0, 59.0, 58.0]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "early_stop" for r in records)


def test_phase_1_is_not_cut_by_patience_by_default(tiny_data, tmp_path, monkeypatch):
    # Algorithm 1 early-stops the Manifold Mixup phase only: phase 1 trains all its epochs.
    scripted = iter([50.0, 40.0, 30.0, 20.0, 10.0, 60.0, 61.0])
    monkeypatch.setattr("s2m2.trainer.Validator.__call__", lambda self, backbone: (next(scripted), 1.0))
    _, summary = _train(tiny_data, tmp_path / "run", "method.name=s2m2_r", "schedule.phase1_epochs=5",
                        "schedule.epochs=2", "validation.patience=2")
    assert [(h["phase"], h["method"]) for h in summary["history"]] == [("phase1", "rotation")] * 5 + [("phase2", "s2m2_r")] * 2
    assert torch.load(tmp_path / "run" / "phase1_best.pt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 7


def test_phase1_patience_is_an_opt_in(tiny_data, tmp_path, monkeypatch):
    scripted = iter([50.0, 40.0, 30.0, 60.0, 61.0])
    monkeypatch.setattr("s2m2.trainer.Validator.__call__", lambda self, backbone: (next(scripted), 1.0))
    _, summary = _train(tiny_data, tmp_path / "run", "method.name=s2m2_r", "schedule.phase1_epochs=5",
                        "schedule.epochs=2", "validation.patience=2", "validation.phase1_patience=2")
    assert [(h["phase"], h["method"]) for h in summary["history"]] == [("phase1", "rotation")] * 3 + [("phase2", "s2m2_r")] * 2


@pytest.mark.parametrize("init", ["last", "best"])
def test_phase_2_starts_from_the_phase_1_weights_the_config_names(tiny_data, tmp_path, monkeypatch, init):
    scripted = iter([50.0, 70.0, 40.0])   # phase 1's best epoch is the 2nd of 3
    monkeypatch.setattr("s2m2.trainer.Validator.__call__", lambda self, backbone: (next(scripted), 1.0))
    # 3 phase-1 epochs of 3 steps; max_steps stops at the first step of phase 2, after the hand-off.
    _train(tiny_data, tmp_path / "run", "method.name=s2m2_r", "schedule.phase1_epochs=3", "schedule.epochs=2",
           f"schedule.phase2_init={init}", "schedule.max_steps=9")
    load = lambda name: torch.load(tmp_path / "run" / name, weights_only=True)["state"]["backbone"]
    start, best = load("last.pt"), load("phase1_best.pt")
    same_as_best = all(torch.equal(start[k], best[k]) for k in start)
    assert same_as_best == (init == "best")


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    real = objectives.STEPS["baseline++"]
    calls = {"n": 0}

    def poisoned(ctx, images, labels):
        stats = real(ctx, images, labels)
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch: the 2nd step of epoch 2
            stats.terms["ce"] = torch.tensor(float("nan"))
            stats.loss = torch.tensor(float("nan"))
        return stats

    monkeypatch.setitem(objectives.STEPS, "baseline++", poisoned)
    out = tmp_path / "run"
    _train(tiny_data, out, "method.name=baseline++", "schedule.epochs=1")
    good = torch.load(out / "last.pt", weights_only=True)
    calls["n"] = 0
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2 .*ce=nan"):
        _train(tiny_data, out, "method.name=baseline++", "schedule.epochs=3")
    kept = torch.load(out / "last.pt", weights_only=True)
    assert kept["epoch"] == 1
    # the CLI turns it into exit status 1 with the message
    calls["n"] = 0
    config = REPO / "configs" / "omniglot" / "baseline++.yaml"
    code = train_main(["--config", str(config), *sum((["--set", s] for s in TINY), []),
                       "--set", f"data.root={tiny_data}", "--set", "schedule.epochs=3", "--out", str(tmp_path / "cli")])
    assert code == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert torch.load(tmp_path / "cli" / "last.pt", weights_only=True)["epoch"] == 1
    assert good["format"] == "s2m2-checkpoint"


def test_checkpoint_payload_loads_with_the_checkpoint_module(tiny_data, tmp_path):
    from s2m2.checkpoint import load_backbone, load_checkpoint

    _train(tiny_data, tmp_path / "run", "method.name=s2m2_r", "schedule.phase1_epochs=1", "schedule.epochs=1")
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["method"] == "s2m2_r" and payload["phase"] == "phase2" and payload["epoch"] == 2
    assert payload["heads"]["classifier"]["name"] == "cosine" and payload["heads"]["ss_head"]["name"] == "rotation"
    assert payload["data"]["num_classes"] == 6 and len(payload["data"]["fingerprint"]) == 16
    backbone, info = load_backbone(tmp_path / "run" / "best.pt")
    assert info["source"] == "s2m2" and backbone.feature_dim == 8


def test_init_from_phase1_checkpoint_and_release_handoff(tiny_data, tmp_path):
    _train(tiny_data, tmp_path / "p1", "method.name=rotation", "schedule.epochs=1")
    p1 = torch.load(tmp_path / "p1" / "last.pt", weights_only=True)
    kept, _ = _train(tiny_data, tmp_path / "keep", "method.name=s2m2_r", "schedule.epochs=0",
                     f"schedule.init_from={tmp_path / 'p1' / 'last.pt'}")
    assert torch.equal(kept.model.ss_head.weight, p1["state"]["ss_head"]["weight"])
    assert len(kept.optimizer.state) == len(p1["optimizer"]["state"]) > 0  # Adam moments carried over
    reset, _ = _train(tiny_data, tmp_path / "release", "method.name=s2m2_r", "schedule.epochs=0",
                      "method.release_handoff=true", f"schedule.init_from={tmp_path / 'p1' / 'last.pt'}")
    assert not torch.equal(reset.model.ss_head.weight, p1["state"]["ss_head"]["weight"])
    for key, value in kept.model.backbone.state_dict().items():
        assert torch.equal(value, reset.model.backbone.state_dict()[key])  # both start from phase 1's backbone
    assert len(reset.optimizer.state) == 0  # fresh Adam


def test_several_train_splits_are_concatenated_with_offset_labels(make_prepared, tmp_path):
    root = make_prepared(splits={"base": 4, "val": 5, "novel": 3}, per_class=16, size=16)
    trainer = Trainer(_config(root, tmp_path / "run", "data.train_splits=[base, novel]", "method.name=baseline"))
    assert trainer.data.num_classes == 7 and len(trainer.data) == 7 * 16
    assert trainer.data.labels[:64].max() == 3 and trainer.data.labels[64:].min() == 4
    assert trainer.model.classifier.num_classes == 7
    rows = torch.tensor([70, 3, 64, 10])
    images = trainer.data.gather(rows)
    assert torch.equal(images[0], torch.from_numpy(trainer.data.splits[1].images[6].copy()))
    assert torch.equal(images[1], torch.from_numpy(trainer.data.splits[0].images[3].copy()))


def test_sample_order_is_a_function_of_seed_and_epoch_and_shards_partition_it():
    a, b = epoch_permutation(100, 0, 3), epoch_permutation(100, 0, 3)
    assert torch.equal(a, b) and not torch.equal(a, epoch_permutation(100, 0, 4))
    shards = [step_indices(a, 1, 32, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(shards), a[32:64])
    assert len(step_indices(a, 3, 32, 0, 4)) == 1  # final 4 rows over 4 ranks


def test_config_errors_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 0.1, momentun: 0.9}\n")
    with pytest.raises(ConfigError, match=r"optim\.momentun.*bad\.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"schedule\.epoch\b"):
        load_config(None, ["schedule.epoch=3"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(None, ["optimizer.lr=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["schedule.epochs=ten"])
    child = tmp_path / "child.yaml"
    (tmp_path / "parent.yaml").write_text("optim: {lr: 0.5}\nschedule: {epochs: 7}\n")
    child.write_text("defaults: parent.yaml\nschedule: {epochs: 9}\n")
    config = load_config(child, ["data.train_splits=[base, novel]"])
    assert config.optim.lr == 0.5 and config.schedule.epochs == 9 and config.data.train_splits == ["base", "novel"]


SHIPPED = sorted((REPO / "configs").glob("*/*.yaml"))


def test_shipped_configs_encode_the_paper_recipe():
    datasets = {"mini_imagenet", "tiered_imagenet", "cub", "cifar_fs", "omniglot"}
    found = {(p.parent.name, p.stem) for p in SHIPPED if not p.stem.startswith("_")}
    assert found == {(d, m) for d in datasets for m in METHODS}
    for path in SHIPPED:
        if path.stem.startswith("_"):
            continue
        c = load_config(path)
        assert c.method.name == path.stem, path
        assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("adam", 1e-3, 0.0), path
        assert c.data.augment, path
        if path.parent.name != "omniglot":
            assert c.model.backbone == "wrn28_10", path
            assert c.data.crop_size == (32 if path.parent.name == "cifar_fs" else 80), path
    s2m2r = {d: load_config(REPO / "configs" / d / "s2m2_r.yaml").schedule for d in datasets}
    assert (s2m2r["mini_imagenet"].phase1_epochs, s2m2r["mini_imagenet"].epochs) == (400, 100)
    assert (s2m2r["cub"].phase1_epochs, s2m2r["cub"].epochs) == (200, 100)
    assert (s2m2r["tiered_imagenet"].phase1_epochs, s2m2r["tiered_imagenet"].epochs) == (100, 50)
    assert load_config(REPO / "configs" / "mini_imagenet" / "rotation.yaml").schedule.batch_size == 64


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name == "omniglot" and not p.stem.startswith("_")],
                         ids=lambda p: p.stem)
def test_omniglot_configs_run_end_to_end_via_the_cli(path, make_prepared, tmp_path):
    root = make_prepared(splits={"base": 6, "val": 5}, per_class=16, size=28, channels=1)
    code = train_main(["--config", str(path), "--set", f"data.root={root}", "--set", "schedule.max_steps=2",
                       "--set", "runtime.progress=false", "--set", "validation.queries=5",
                       "--out", str(tmp_path / "run")])
    assert code == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2
    assert any((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))  # TensorBoard on by default


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mini_imagenet", "tiered_imagenet", "cub", "cifar_fs"])
def test_paper_configs_load_and_start_with_wrn28_10(dataset, make_prepared, tmp_path):
    """The WRN-28-10 paper config starts (2 steps of phase 1 on CPU) on synthetic data at its resolution."""
    size = 32 if dataset == "cifar_fs" else 84
    root = make_prepared(splits={"base": 4, "val": 5}, per_class=4, size=size)
    code = train_main(["--config", str(REPO / "configs" / dataset / "s2m2_r.yaml"), "--set", f"data.root={root}",
                       "--set", "schedule.max_steps=2", "--set", "schedule.batch_size=2",
                       "--set", "validation.enabled=false", "--set", "runtime.progress=false",
                       "--out", str(tmp_path / "run")])
    assert code == 0
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["backbone"]["name"] == "wrn28_10" and ckpt["phase"] == "phase1"


BUDGET = sorted(p for p in (REPO / "configs").glob("*/budget/**/*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("path", BUDGET, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_budget_recipes_load_and_build_their_model(path):
    """Every budget recipe (configs/<dataset>/budget/, and the best-recipe folders below it) loads through its
    `defaults` chain, names its method by its file name, ends at a wall-clock budget, and builds a model that
    takes an image of its crop size."""
    from s2m2.trainer import build_model

    config = load_config(path)
    assert config.method.name == path.stem
    assert config.schedule.budget_minutes and config.schedule.lr_schedule == "cosine"
    model, _ = build_model(config, num_classes=5, method=config.method.name)
    with torch.no_grad():  # grayscale datasets are fed as 3 channels too (s2m2.data)
        features = model.backbone.eval()(torch.zeros(2, 3, config.data.crop_size, config.data.crop_size))
    assert features.shape == (2, model.backbone.feature_dim)
