"""Feature extraction and its cache, the features file format and its errors, and `s2m2 evaluate`."""

from __future__ import annotations

import json

import pytest
import torch

from s2m2.data import open_split
from s2m2.data.transforms import EvalTransform
from s2m2.features import FeaturesError, extract_features, features_for_checkpoint, load_features
from s2m2.models import create_backbone
from s2m2.utils import atomic_torch_save


def write_checkpoint(path, backbone_name="conv4", kwargs=None, train_splits=("base",), crop=16, resize=18, seed=0):
    """A minimal checkpoint in our format (the keys `s2m2.checkpoint.load_backbone` reads), random weights."""
    torch.manual_seed(seed)
    backbone = create_backbone(backbone_name, **(kwargs or {}))
    atomic_torch_save({
        "format": "s2m2-checkpoint", "format_version": 1,
        "backbone": {"name": backbone_name, "kwargs": kwargs or {}},
        "heads": {}, "state": {"backbone": backbone.state_dict()},
        "method": "baseline", "phase": "train", "epoch": 3, "step": 30,
        "config": {"data": {"train_splits": list(train_splits), "crop_size": crop, "eval_resize": resize}},
    }, path)
    return backbone


def write_features(path, classes=6, per_class=12, dim=8, seed=0):
    """A valid features file (the keys `load_features` checks), class-separable random features."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = torch.rand(classes, dim, generator=gen)[labels] + 0.3 * torch.rand(len(labels), dim, generator=gen)
    atomic_torch_save({"format": "s2m2-features", "format_version": 1, "cache_key": f"synthetic{seed}",
                       "features": feats, "labels": labels, "class_names": [f"c{c}" for c in range(classes)],
                       "dataset": {"name": "synthetic", "split": "novel", "fingerprint": "x", "root": "."},
                       "transform": {"resize": 18, "crop": 16, "key": "k", "default": True}, "precision": "fp32",
                       "checkpoint": {"fingerprint": "f"}}, path)
    return path


def test_extract_features_is_eval_mode_batched_and_exact(make_prepared):
    root = make_prepared(splits={"novel": 5}, per_class=9, size=20)
    split = open_split(root, "novel")
    torch.manual_seed(0)
    backbone = create_backbone("conv4", width=16)
    backbone.train()
    transform = EvalTransform(24, 20)
    feats, labels = extract_features(backbone, split, transform, batch_size=7, progress=False)
    assert feats.shape == (45, 16) and feats.dtype == torch.float32
    assert torch.equal(labels, torch.from_numpy(split.labels))
    assert backbone.training  # restored afterwards
    with torch.no_grad():
        expected = backbone.eval()(transform(torch.from_numpy(split.images[:].copy())))
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)  # batch size does not matter (eval BN)


def test_features_are_cached_by_checkpoint_split_and_transform(make_prepared, tmp_path):
    root = make_prepared(splits={"base": 4, "novel": 5}, per_class=6, size=16)
    ckpt = tmp_path / "model.pt"
    write_checkpoint(ckpt, kwargs={"width": 8})
    out = tmp_path / "feats" / "novel.pt"
    logs = []
    first = features_for_checkpoint(ckpt, root, "novel", out, progress=False, log=logs.append)
    assert first["features"].shape == (30, 8)
    assert first["transform"]["resize"] == 18 and first["transform"]["crop"] == 16  # from the checkpoint config
    assert first["dataset"]["split"] == "novel" and first["class_names"] == [f"novel_{c}" for c in range(5)]
    assert first["checkpoint"]["source"] == "s2m2" and len(first["checkpoint"]["fingerprint"]) == 16
    stamp = out.stat().st_mtime_ns

    import s2m2.checkpoint as checkpoint_module

    def no_model(*args, **kwargs):
        raise AssertionError("cache hit must not load the model")

    original = checkpoint_module.load_backbone
    checkpoint_module.load_backbone = no_model
    try:
        again = features_for_checkpoint(ckpt, root, "novel", out, progress=False, log=logs.append)
    finally:
        checkpoint_module.load_backbone = original
    assert "cache hit" in logs[-1] and out.stat().st_mtime_ns == stamp
    assert torch.equal(again["features"], first["features"])
    # Another transform, another split or other weights -> another key, recomputed.
    other = features_for_checkpoint(ckpt, root, "novel", out, transform=EvalTransform(16, 16), progress=False,
                                    log=logs.append)
    assert other["cache_key"] != first["cache_key"] and "recomputing" in logs[-2]
    write_checkpoint(ckpt, kwargs={"width": 8}, seed=1)
    retrained = features_for_checkpoint(ckpt, root, "novel", out, progress=False, log=logs.append)
    assert retrained["cache_key"] not in (first["cache_key"], other["cache_key"])
    assert not torch.equal(retrained["features"], first["features"])
    assert not list(out.parent.glob("*.tmp"))  # atomic writes leave no temporaries


def test_bad_features_files_give_clear_errors(tmp_path):
    with pytest.raises(FeaturesError, match="missing.pt: features file not found"):
        load_features(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"truncated, not a torch file")
    with pytest.raises(FeaturesError, match="corrupt.pt: cannot read features file"):
        load_features(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"state": {}}, other)
    with pytest.raises(FeaturesError, match="other.pt: not an s2m2 features file"):
        load_features(other)
    bad = tmp_path / "bad.pt"
    torch.save({"format": "s2m2-features", "format_version": 1, "cache_key": "x", "features": torch.zeros(4, 3),
                "labels": torch.zeros(5, dtype=torch.long), "class_names": [], "dataset": {}, "transform": {},
                "checkpoint": {}}, bad)
    with pytest.raises(FeaturesError, match="bad.pt: 'features' .4, 3. and 'labels' .5,. do not form"):
        load_features(bad)


def test_features_and_evaluate_commands_end_to_end(make_prepared, tmp_path, capsys):
    from s2m2.cli import main as cli

    root = make_prepared(splits={"base": 4, "novel": 6}, per_class=12, size=16)
    ckpt = tmp_path / "model.pt"
    write_checkpoint(ckpt, kwargs={"width": 8})
    feats = tmp_path / "novel.pt"
    assert cli(["features", "--checkpoint", str(ckpt), "--data", str(root), "--split", "novel", "--out", str(feats),
                "--no-progress"]) == 0
    assert cli(["features", "--checkpoint", str(ckpt), "--data", str(root), "--split", "base",
                "--out", str(tmp_path / "base.pt"), "--no-progress"]) == 0
    out = tmp_path / "results.json"
    assert cli(["evaluate", "--features", str(feats), "--ways", "5", "--shots", "1", "5", "--queries", "4",
                "--episodes", "50", "--seed", "3", "--head", "logreg", "--C", "0.5", "--center",
                "--base-features", str(tmp_path / "base.pt"), "--l2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "+-" in printed and "logreg accuracy" in printed
    record = json.loads(out.read_text())
    assert record["head"] == {"name": "logreg", "options": {"C": 0.5, "max_iter": 50, "tol": 1e-6}}
    assert record["feature_transform"]["center"] and record["feature_transform"]["l2"]
    assert record["features"]["checkpoint"]["fingerprint"] == load_features(feats)["checkpoint"]["fingerprint"]
    assert [r["shots"] for r in record["results"]] == [1, 5]
    r = record["results"][0]
    assert (r["ways"], r["queries"], r["episodes"], r["seed"]) == (5, 4, 50, 3) and len(r["accuracies"]) == 50
    assert r["mean"] == pytest.approx(100 * sum(r["accuracies"]) / 50)
    # Impossible protocol and missing files: a clear message and exit code 2, no traceback.
    assert cli(["evaluate", "--features", str(feats), "--shots", "5", "--queries", "10", "--episodes", "5"]) == 2
    assert "need 15 images per class" in capsys.readouterr().err
    assert cli(["evaluate", "--features", str(tmp_path / "nope.pt")]) == 2
    assert "features file not found" in capsys.readouterr().err
    assert cli(["features", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(root), "--out", str(feats)]) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().err


def test_precision_choice_reaches_extraction_and_the_cache(make_prepared, tmp_path, capsys):
    """Issue 9: extraction was always bf16 on CUDA. auto = bf16 on CUDA / fp32 on CPU; fp32 means fp32 even
    inside a caller's bf16 autocast (the trainer's validator); the precision is recorded and keyed."""
    from s2m2.cli import main as cli
    from s2m2.features import resolve_precision

    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp64", "cpu")
    root = make_prepared(splits={"novel": 5}, per_class=4, size=16)
    split = open_split(root, "novel")
    torch.manual_seed(0)
    backbone = create_backbone("conv4", width=8)
    transform = EvalTransform(18, 16)
    fp32, _ = extract_features(backbone, split, transform, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer's validator calls it
        inside, _ = extract_features(backbone, split, transform, progress=False, precision="fp32")
        default, _ = extract_features(backbone, split, transform, progress=False)  # positional API unchanged
    bf16, _ = extract_features(backbone, split, transform, progress=False, precision="bf16")
    assert torch.equal(inside, fp32)
    assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, rtol=0.05, atol=0.05)
    assert default.shape == fp32.shape

    ckpt = tmp_path / "model.pt"
    write_checkpoint(ckpt, kwargs={"width": 8})
    out = tmp_path / "novel.pt"
    base = ["features", "--checkpoint", str(ckpt), "--data", str(root), "--out", str(out), "--no-progress"]
    assert cli(base) == 0
    first = load_features(out)
    assert first["precision"] == "fp32"  # auto on CPU
    assert cli(base + ["--precision", "bf16"]) == 0
    second = load_features(out)
    assert second["precision"] == "bf16" and second["cache_key"] != first["cache_key"]
    assert "recomputing" in capsys.readouterr().out


def test_evaluate_warns_and_records_unconverged_logreg_episodes(tmp_path, capsys):
    """Issue 9: logreg stopping at --max-iter is counted, warned about on stderr and kept in the JSON."""
    from s2m2.cli import main as cli

    feats = write_features(tmp_path / "feats.pt", classes=6, per_class=12, dim=8)
    out = tmp_path / "r.json"
    args = ["evaluate", "--features", str(feats), "--shots", "1", "5", "--queries", "4", "--episodes", "30",
            "--no-progress", "--out", str(out)]
    assert cli(args + ["--max-iter", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: logreg: ") for line in err)
    assert "of 30 5-way 1-shot episodes stopped at --max-iter 1 without converging" in err[0]
    record = json.loads(out.read_text())
    counts = [r["info"]["not_converged"] for r in record["results"]]
    assert all(count > 0 for count in counts) and f"warning: logreg: {counts[0]} of 30" in err[0]
    assert record["warnings"] == err
    assert cli(args) == 0  # the default cap: converged, silent
    assert capsys.readouterr().err == ""
    assert [r["info"]["not_converged"] for r in json.loads(out.read_text())["results"]] == [0, 0]


def test_heads_use_one_thread_by_default_and_restore(tmp_path, capsys):
    """Issue 10: on a loaded 2-core machine 2 threads made the heads 4-19x slower (docs/evaluation.md)."""
    from s2m2.cli import main as cli
    from s2m2.evaluate import DEFAULT_HEAD_THREADS, head_threads

    before = torch.get_num_threads()
    with head_threads(None, "cpu") as threads:
        assert threads == DEFAULT_HEAD_THREADS == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with head_threads(3, "cpu") as threads:
        assert threads == 3 == torch.get_num_threads()
    feats = write_features(tmp_path / "feats.pt")
    out = tmp_path / "r.json"
    assert cli(["evaluate", "--features", str(feats), "--queries", "4", "--episodes", "10", "--no-progress",
                "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["threads"] == 1 and "1 thread(s) on cpu" in capsys.readouterr().out
    assert record["features"]["precision"] == "fp32"  # the features' provenance reaches the record
    assert torch.get_num_threads() == before
