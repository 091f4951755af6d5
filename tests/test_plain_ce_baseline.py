"""scripts/plain_ce_baseline.py: the independent CE baseline runs end to end on a tiny prepared folder and
writes a reference record that `s2m2 report` puts in the CIFAR-FS table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from s2m2.report import build_report, load_record

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("plain_ce_baseline", REPO / "scripts" / "plain_ce_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_split(folder: Path, classes: range, per_class: int, rng: np.random.Generator) -> None:
    """Images whose mean colour names the class, so features of a trained net separate them."""
    folder.mkdir(parents=True)
    labels = np.repeat(np.array(list(classes)), per_class)
    colours = rng.integers(0, 256, size=(max(classes) + 1, 3))
    images = colours[labels][:, None, None, :] + rng.integers(-20, 21, size=(len(labels), 32, 32, 3))
    np.save(folder / "images.npy", np.clip(images, 0, 255).astype(np.uint8))
    np.save(folder / "labels.npy", labels.astype(np.int64))


def test_writes_a_reference_record_the_report_uses(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar-fs"
    make_split(data / "base", range(10, 16), 8, rng)
    make_split(data / "novel", range(80, 86), 20, rng)
    out = tmp_path / "plain.json"
    load_script().main(["--data", str(data), "--epochs", "1", "--batch", "8", "--episodes", "40",
                        "--queries", "5", "--out", str(out)])

    record = load_record(out)
    assert record["format"] == "s2m2-reference" and record["dataset"] == "cifar-fs"
    assert [(r["ways"], r["shots"], r["episodes"], r["queries"], r["seed"]) for r in record["rows"]] == [
        (5, 1, 40, 5, 0), (5, 5, 40, 5, 0)]
    for row in record["rows"]:
        assert 0.0 <= row["mean"] <= 100.0 and row["ci95"] >= 0.0
    # colour-coded classes: nearest class mean on any conv features beats chance (20%) by far
    assert record["rows"][1]["mean"] > 60.0
    assert "1 epochs, 0.00 M images" in record["setup"]["training"]
    assert "--epochs 1" in record["provenance"]["measured_by"]
    assert not list(tmp_path.glob("*.tmp"))

    markdown = build_report([out], tmp_path / "report.md", tmp_path / "plots").markdown
    assert "plain PyTorch CE baseline, Conv-4" in markdown and "## CIFAR-FS (novel classes)" in markdown


def test_missing_split_names_the_file(tmp_path):
    (tmp_path / "cifar-fs" / "base").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"base/images\.npy is missing"):
        load_script().main(["--data", str(tmp_path / "cifar-fs"), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
