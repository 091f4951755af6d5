"""Wall-clock budgets, the cosine learning-rate schedule, and the trainer's reliability tail: config errors
before any data is read, no validation on training classes, a summary that never says "finished" after a
crash, a torn log line, no doubled phase record on resume, stale temporaries removed.

Budget tests drive the trainer with a fake clock (every ``time.perf_counter()`` call advances it by a fixed
tick), so they are deterministic and take no real time to "spend" a budget.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import s2m2.trainer as trainer_module
from s2m2.config import ConfigError, load_config
from s2m2.train import main as train_main
from test_trainer import REPO, TINY, _train


@pytest.fixture
def tiny_data(make_prepared):
    return make_prepared(splits={"base": 6, "val": 5}, per_class=16, size=16)


class FakeClock:
    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_budget_stops_the_run_at_the_budget_with_a_resumable_checkpoint(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.time, "perf_counter", FakeClock(0.5))
    run = tmp_path / "run"
    _, summary = _train(tiny_data, run, "method.name=baseline++", "schedule.epochs=1000",
                        "schedule.budget_minutes=1.0")
    assert summary["stopped"] == "budget"
    assert 1 <= summary["epochs"] < 1000
    # Stops within a few fake-clock ticks (each perf_counter call is one) of 60 s (it leaves room for the closing validation, which counts).
    assert abs(summary["elapsed_seconds"] - 60.0) <= 5.0, summary["elapsed_seconds"]
    assert summary["budget_minutes"] == 1.0
    assert summary["images_seen"] == summary["steps"] * 32   # 96 rows: full batches of 32
    assert any(r["type"] == "budget" for r in _records(run))
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["progress"]["elapsed"] == pytest.approx(summary["elapsed_seconds"], abs=2.0)

    # Resuming with the budget spent does no more work; a larger budget continues from the checkpoint.
    _, again = _train(tiny_data, run, "method.name=baseline++", "schedule.epochs=1000",
                      "schedule.budget_minutes=1.0", resume="auto")
    assert again["steps"] == summary["steps"] and again["stopped"] == "budget"
    _, more = _train(tiny_data, run, "method.name=baseline++", "schedule.epochs=1000",
                     "schedule.budget_minutes=2.0", resume="auto")
    assert more["steps"] > summary["steps"] and more["stopped"] == "budget"
    assert abs(more["elapsed_seconds"] - 120.0) <= 5.0


def test_a_budget_stop_left_for_a_slow_validation_still_ends_as_budget(tiny_data, tmp_path, monkeypatch):
    # Validation takes 10 s here: the step loop stops while 10 s are still left, and the run must end
    # there ("budget"), not start another epoch or report "finished".
    clock = FakeClock(0.5)
    monkeypatch.setattr(trainer_module.time, "perf_counter", clock)

    def slow_validation(self, backbone):
        clock.now += 10.0
        return 50.0, 1.0

    monkeypatch.setattr("s2m2.trainer.Validator.__call__", slow_validation)
    run = tmp_path / "run"
    _, summary = _train(tiny_data, run, "method.name=baseline++", "schedule.epochs=1000",
                        "schedule.budget_minutes=1.0")
    assert summary["stopped"] == "budget"
    assert summary["elapsed_seconds"] <= 60.0 + 5.0
    _, again = _train(tiny_data, run, "method.name=baseline++", "schedule.epochs=1000",
                      "schedule.budget_minutes=1.0", resume="auto")
    assert again["steps"] == summary["steps"] and again["stopped"] == "budget"


def test_budget_of_a_two_phase_run_is_split_by_phase1_fraction(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.time, "perf_counter", FakeClock(0.5))
    run = tmp_path / "run"
    _, summary = _train(tiny_data, run, "method.name=s2m2_r", "schedule.phase1_epochs=1000",
                        "schedule.epochs=1000", "schedule.budget_minutes=1.0", "schedule.phase1_fraction=0.25")
    phases = [h["phase"] for h in summary["history"]]
    assert "phase1" in phases and "phase2" in phases and summary["stopped"] == "budget"
    records = _records(run)
    budget_phases = [r["phase"] for r in records if r["type"] == "budget"]
    assert budget_phases == ["phase1", "phase2"]
    phase1_epochs, phase2_epochs = phases.count("phase1"), phases.count("phase2")
    # phase 1 had a quarter of the time: about a third as many epochs as phase 2 (same step cost here)
    assert phase1_epochs < phase2_epochs


def test_cosine_schedule_decays_the_learning_rate_to_zero(tiny_data, tmp_path):
    _, summary = _train(tiny_data, tmp_path / "run", "method.name=baseline++", "schedule.epochs=4",
                        "schedule.lr_schedule=cosine", "optim.lr=0.01")
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.01
    # last step of the last epoch: done = 11/12 of the schedule
    assert lrs[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 11 / 12)), rel=1e-6)
    _, constant = _train(tiny_data, tmp_path / "const", "method.name=baseline++", "schedule.epochs=2",
                         "optim.lr=0.01")
    assert [h["lr"] for h in constant["history"]] == [0.01, 0.01]


def test_cosine_schedule_over_a_budget_follows_elapsed_time(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.time, "perf_counter", FakeClock(0.5))
    _, summary = _train(tiny_data, tmp_path / "run", "method.name=baseline++", "schedule.epochs=1000",
                        "schedule.budget_minutes=1.0", "schedule.lr_schedule=cosine", "optim.lr=0.01")
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[-1] < 0.01 * 0.02   # close to 0 at the budget


def test_validation_on_a_training_split_is_refused_unless_another_source_is_named(tiny_data, make_prepared):
    with pytest.raises(ConfigError, match=r"data.val_split='val' is also in data.train_splits.*validation.root"):
        load_config(None, TINY + [f"data.root={tiny_data}", "data.train_splits=[base, val]"])
    other = make_prepared(splits={"val": 5}, per_class=16, size=16, name="other")
    config = load_config(None, TINY + [f"data.root={tiny_data}", "data.train_splits=[base, val]",
                                       f"validation.root={other}"])
    trainer = trainer_module.Trainer(config, out_dir=str(other.parent / "run"))
    assert trainer.validator.split.root == other


@pytest.mark.parametrize("override, key", [
    ("schedule.epochs=null", "schedule.epochs"),
    ("schedule.epochs=true", "schedule.epochs"),
    ("optim.lr=-1", "optim.lr"),
    ("model.backbone=foo", "model.backbone"),
    ("validation.head=svm", "validation.head"),
    ("validation.ways=1", "validation.ways"),
    ("schedule.budget_minutes=0", "schedule.budget_minutes"),
    ("schedule.lr_schedule=linear", "schedule.lr_schedule"),
    ("schedule.phase1_fraction=1.5", "schedule.phase1_fraction"),
    ("method.ss_fraction=0", "method.ss_fraction"),
    ("method.ss_fraction=1.5", "method.ss_fraction"),
])
def test_bad_config_values_exit_2_with_one_line_before_reading_data(tmp_path, capsys, override, key):
    out = tmp_path / "run"
    code = train_main(["--config", str(REPO / "configs/omniglot/baseline.yaml"), "--set", "data.root=/nonexistent/data",
                       "--set", override, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0], err
    assert "nonexistent" not in err[0]   # the config is checked before the data
    assert not out.exists()


def test_a_crash_writes_a_summary_that_says_so(tiny_data, tmp_path, monkeypatch):
    def broken(self, backbone):
        raise RuntimeError("validator exploded")
    monkeypatch.setattr("s2m2.trainer.Validator.__call__", broken)
    with pytest.raises(RuntimeError):
        _train(tiny_data, tmp_path / "run", "method.name=baseline++", "schedule.epochs=2")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"] == "error" and "validator exploded" in summary["error"]


def test_resume_survives_a_torn_last_log_line_and_stale_temporaries(tiny_data, tmp_path):
    run = tmp_path / "run"
    _train(tiny_data, run, "method.name=baseline++", "schedule.epochs=2")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"type": "step", "st')           # power loss mid-write
    stale = run / ".last.pt.x1y2z3.tmp"
    stale.write_bytes(b"partial checkpoint")
    _, summary = _train(tiny_data, run, "method.name=baseline++", "schedule.epochs=3", resume="auto")
    assert summary["epochs"] == 3
    records = _records(run)   # every line parses
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]
    assert not stale.exists()


def test_resume_at_the_phase_boundary_writes_the_phase_record_once(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = trainer_module.Trainer._run_epoch

    def killed_in_phase_2(self, phase, log):
        if phase.name == "phase2":
            raise KeyboardInterrupt   # stands for a kill right after the hand-off
        return real(self, phase, log)

    monkeypatch.setattr(trainer_module.Trainer, "_run_epoch", killed_in_phase_2)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_data, run, "method.name=s2m2_r", "schedule.phase1_epochs=2", "schedule.epochs=1")
    assert json.loads((run / "summary.json").read_text())["stopped"] == "interrupted"
    monkeypatch.setattr(trainer_module.Trainer, "_run_epoch", real)
    _, summary = _train(tiny_data, run, "method.name=s2m2_r", "schedule.phase1_epochs=2", "schedule.epochs=1",
                        resume="auto")
    assert summary["stopped"] == "finished" and summary["epochs"] == 3
    phases = [r["phase"] for r in _records(run) if r["type"] == "phase"]
    assert phases == ["phase1", "phase2"]


def test_ctrl_c_during_training_exits_130_and_says_what_was_kept(tiny_data, tmp_path, monkeypatch, capsys):
    from s2m2.cli import main as cli

    real = trainer_module.Trainer._run_epoch

    def interrupted_in_epoch_2(self, phase, log):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return real(self, phase, log)

    monkeypatch.setattr(trainer_module.Trainer, "_run_epoch", interrupted_in_epoch_2)
    out = tmp_path / "run"
    code = cli(["train", "--config", str(REPO / "configs/omniglot/baseline.yaml"), "--out", str(out),
                *[a for o in TINY + [f"data.root={tiny_data}", "schedule.epochs=3", "method.name=baseline++"]
                  for a in ("--set", o)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err[-1] == f"s2m2 train: interrupted; kept {out / 'last.pt'} (the last complete epoch); " \
                      f"continue with --resume auto --out {out}"
    assert json.loads((out / "summary.json").read_text())["stopped"] == "interrupted"
