"""Smoke run of the real `scripts/ablation.py` command: tiny data, tiny budget, two methods, few episodes.

Checks that one command trains, evaluates, runs the cross-domain step and writes records + the report, and
that it is resumable: a second run skips the methods that ended and resumes one whose run was interrupted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
# Tiny versions of the recipes (the same overrides as tests/test_trainer.py) plus a 3-step cap.
TINY = ["model.backbone=conv4", "model.backbone_kwargs={width: 8}", "data.crop_size=16", "data.eval_resize=18",
        "validation.queries=5", "validation.episodes=10", "validation.head=ncm", "runtime.progress=false",
        "runtime.tensorboard=false", "schedule.batch_size=32", "schedule.max_steps=3"]


def run_ablation(out: Path, data: Path, cub: Path, cross_domain: bool) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "scripts" / "ablation.py"), "--dataset", "cifar-fs", "--budget-minutes", "1",
            "--out", str(out), "--data", str(data), "--methods", "baseline", "rotation", "--heads", "logreg",
            "--episodes", "20", "--configs", str(REPO / "configs" / "cifar_fs"), "--cub-data", str(cub)]
    argv += [] if cross_domain else ["--no-cross-domain"]
    for item in TINY:
        argv += ["--set", item]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)


def train_commands(out: Path, method: str) -> list[str]:
    return [json.loads(line)["command"] for line in (out / "commands" / f"train-{method}.jsonl").read_text().splitlines()]


def test_ablation_smoke_records_report_and_resume(make_prepared, tmp_path):
    # CIFAR-like: 20 images per novel class allow 5 shots + 15 queries
    data = make_prepared(splits={"base": 6, "val": 5, "novel": 5}, per_class=20, size=16, name="cifar-fs")
    out, cub = tmp_path / "ablation", tmp_path / "cub-sample"
    cross_domain = (SHARED / "data" / "cub_sample" / "CUB_200_2011").is_dir()
    first = run_ablation(out, data, cub, cross_domain)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    for method in ("baseline", "rotation"):
        record = json.loads((out / "records" / f"{method}-logreg.json").read_text())
        assert [r["shots"] for r in record["results"]] == [1, 5]
        assert all(r["episodes"] == 20 and 0 <= r["mean"] <= 100 for r in record["results"])
        prov = record["provenance"]
        assert prov["method"] == method and prov["hardware"]["cores"] >= 1
        assert prov["checkpoint_used"].startswith(("best.pt", "last.pt"))
        assert prov["commands"]["train"][0]["command"].startswith("s2m2 train --config")
        assert "schedule.budget_minutes=1" in prov["commands"]["train"][0]["command"]
        assert json.loads((out / "runs" / method / "summary.json").read_text())["stopped"] == "max_steps"
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "| rotation |" in report
    assert "easyfsl baseline, Conv-4 (reference)" in report and "74.81 ± 0.19" in report
    assert (out / "report" / "cifar-fs-novel-classes_by_method.png").is_file()
    if cross_domain:
        cross = sorted((out / "records").glob("cross-domain-*-logreg.json"))
        assert len(cross) == 1
        results = json.loads(cross[0].read_text())["results"]
        assert "skipped" in results[1] and results[0]["queries"] == 2  # 3 images per class: 1-shot only
        assert "CUB sample (150 images, 50 classes), its novel split: 36 images, 12 classes" in report

    # Rerun: everything ended -> no training, no evaluation, only the report again.
    second = run_ablation(out, data, cub, cross_domain)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for method in ("baseline", "rotation"):
        assert f"train {method}: already ended (max_steps" in second.stdout
        assert f"evaluate {method} logreg: record of this checkpoint exists, skipped" in second.stdout
        assert len(train_commands(out, method)) == 1
    assert "s2m2 features" not in second.stdout and "s2m2 evaluate" not in second.stdout


def load_ablation_module():
    spec = importlib.util.spec_from_file_location("ablation_script", REPO / "scripts" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ablation_train_skips_ended_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch, capsys):
    ablation = load_ablation_module()
    calls = []
    monkeypatch.setattr(ablation, "s2m2", lambda argv, log=None: calls.append(argv) or ablation.Step(
        command=" ".join(argv), date="now", exit=0, seconds=0.0))
    config, run = tmp_path / "rotation.yaml", tmp_path / "run"
    config.write_text("method: {name: rotation}\n")
    run.mkdir()

    def train():
        calls.clear()
        ablation.train("rotation", config, run, tmp_path / "data", 30.0, ["a.b=1"], tmp_path / "log.jsonl")
        return calls

    assert train()[0][:3] == ["train", "--config", str(config)]          # fresh start
    assert "--resume" not in train()[0] and "schedule.budget_minutes=30" in train()[0]
    (run / "last.pt").write_bytes(b"x")                                   # interrupted: no summary.json
    assert train()[0][-2:] == ["--resume", "auto"]
    (run / "summary.json").write_text(json.dumps({"stopped": "error", "epochs": 1}))
    assert train()[0][-2:] == ["--resume", "auto"]                        # crashed: resumed as well
    for stopped in ("finished", "early_stop", "budget", "max_steps", "diverged"):
        (run / "summary.json").write_text(json.dumps({"stopped": stopped, "epochs": 3, "budget_minutes": 30.0}))
        assert train() == []                                              # ended: skipped
    (run / "summary.json").write_text(json.dumps({"stopped": "budget", "epochs": 3, "budget_minutes": 10.0}))
    assert train() == [] and "WARNING: trained with a 10.0-min budget, not 30.0" in capsys.readouterr().out


def test_ablation_refuses_an_ended_run_trained_with_another_recipe(tmp_path, monkeypatch):
    import pytest
    import yaml

    from s2m2.config import load_config

    ablation = load_ablation_module()
    calls = []
    monkeypatch.setattr(ablation, "s2m2", lambda argv, log=None: calls.append(argv) or ablation.Step(
        command=" ".join(argv), date="now", exit=0, seconds=0.0))
    config, run, data = tmp_path / "s2m2_r.yaml", tmp_path / "run", tmp_path / "data"
    config.write_text("method: {name: s2m2_r, mixup_alpha: 2.0}\n")
    run.mkdir()
    # What the trainer saved: the recipe as it was, another data path and out_dir (those may differ).
    saved = load_config(config, ["data.root=/elsewhere/cifar-fs", "schedule.budget_minutes=30",
                                 "runtime.out_dir=/elsewhere/run"]).to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "summary.json").write_text(json.dumps({"stopped": "budget", "epochs": 3, "budget_minutes": 30.0}))

    def train(overrides=()):
        calls.clear()
        return ablation.train("s2m2_r", config, run, data, 30.0, list(overrides), tmp_path / "log.jsonl")

    assert train() == "budget" and calls == []                           # same recipe: skipped
    config.write_text("method: {name: s2m2_r, mixup_alpha: 0.5}\n")         # the recipe changed since
    with pytest.raises(ablation.AblationError, match=r"differs in method\.mixup_alpha.*move the folder away"):
        train()
    config.write_text("method: {name: s2m2_r, mixup_alpha: 2.0}\n")
    with pytest.raises(ablation.AblationError, match=r"differs in optim\.lr"):
        train(["optim.lr=0.5"])                                          # an override changes it too
    assert calls == []
    del saved["data"]["eval_crop"], saved["optim"]["ema_decay"]           # a run saved before these keys existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert train() == "budget" and calls == []                           # read as their defaults: the same recipe
    with pytest.raises(ablation.AblationError, match=r"differs in data\.eval_crop"):
        train(["data.eval_crop=32"])                                     # but a recipe that sets one differs


def write_run_and_ncm_record(root: Path, provenance: dict, features: dict | None = None) -> tuple[Path, Path, Path]:
    """A run folder with a best.pt and an ablation output folder holding an ncm record (10 episodes) of
    exactly that checkpoint: ``(run, out, record)``."""
    from s2m2.checkpoint import file_fingerprint

    run, out = root / "run", root / "out"
    run.mkdir()
    (run / "best.pt").write_bytes(b"checkpoint")
    record = out / "records" / f"{provenance['method']}-ncm.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({
        "format": "s2m2-evaluation", "head": {"name": "ncm"}, "results": [{"episodes": 10}],
        "features": {"checkpoint": {"fingerprint": file_fingerprint(run / "best.pt")}, **(features or {})},
        "provenance": provenance}))
    return run, out, record


def test_ablation_variant_label_reaches_records_that_already_exist(tmp_path, monkeypatch):
    """`--variant` on a rerun relabels the records it skips (same checkpoint, same protocol), evaluating nothing."""
    ablation = load_ablation_module()
    monkeypatch.setattr(ablation, "s2m2", lambda argv, log=None: pytest_fail(argv))
    run, out, record = write_run_and_ncm_record(tmp_path, {"method": "s2m2_r", "date": "D"})
    for variant in ("crop_scale 0.35-1", None):
        assert ablation.evaluate_method("s2m2_r", run, tmp_path / "data", out, 10, ["ncm"], {}, tmp_path / "log",
                                        variant) == [record]
        assert json.loads(record.read_text())["provenance"] == {"method": "s2m2_r", "date": "D", "variant": variant}


def pytest_fail(argv):
    raise AssertionError(f"nothing should run, got {argv}")
