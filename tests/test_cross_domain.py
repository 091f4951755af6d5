"""Cross-domain mini-ImageNet -> CUB: variant detection and an end-to-end run on the real CUB sample."""

from __future__ import annotations

import json

import pytest

from conftest import shared_path
from s2m2.cross_domain import detect_variant, resolve_variant
from s2m2.features import load_features
from test_features import write_checkpoint


def test_variant_from_the_training_config():
    assert detect_variant({"config": {"data": {"train_splits": ["base"]}}})[0] == "base64"
    assert detect_variant({"config": {"data": {"train_splits": ["base", "val", "novel"]}}})[0] == "all100"
    assert detect_variant({"config": {"data": {"train_splits": ["all"]}}})[0] == "all100"
    unknown, why = detect_variant({"source": "release-mixup", "config": None})
    assert unknown is None and "release-mixup" in why
    assert resolve_variant("auto", None, why)[0] == "base64" and "assumed" in resolve_variant("auto", None, why)[1]
    assert resolve_variant("all100", None, why) == ("all100", f"as stated by --variant ({why})")
    with pytest.raises(ValueError, match="--variant all100 contradicts the checkpoint"):
        resolve_variant("all100", "base64", "trained on ['base']")


@pytest.fixture(scope="module")
def cub_prepared(tmp_path_factory):
    """The real CUB sample (3 images per class) prepared with engineer A's `s2m2 prepare cub`."""
    from data_prep.cli import run

    source = shared_path("data", "cub_sample", "CUB_200_2011")
    out = tmp_path_factory.mktemp("cub") / "cub"
    with pytest.warns(UserWarning, match="subset"):
        run("cub", source.parent, out, workers=2)
    return out


def test_cross_domain_runs_end_to_end_on_the_cub_sample(cub_prepared, tmp_path, capsys):
    """A randomly initialised Conv-4 "trained on all 100 classes" (per its config) applied to real CUB images.

    With 3 images per class, 1-shot works with 2 queries; 5-shot cannot and is skipped, not a crash.
    """
    from s2m2.cli import main as cli

    ckpt = tmp_path / "mini_all100.pt"
    write_checkpoint(ckpt, kwargs={"width": 16}, train_splits=("base", "val", "novel"), crop=32, resize=36)
    out = tmp_path / "cross.json"
    args = ["cross-domain", "--checkpoint", str(ckpt), "--cub", str(cub_prepared), "--shots", "1", "5",
            "--queries", "2", "--episodes", "60", "--seed", "0", "--head", "logreg", "--out", str(out),
            "--no-progress"]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "cross-domain variant: all100 — detected" in printed
    assert "skipped: 5 shots + 2 queries need 7 images per class" in printed
    record = json.loads(out.read_text())
    assert record["variant"] == "all100"
    one, five = record["results"]
    assert one["shots"] == 1 and len(one["accuracies"]) == 60 and 0 <= one["mean"] <= 100
    assert five["shots"] == 5 and "skipped" in five
    assert record["features"]["dataset"]["name"] == "cub" and record["features"]["dataset"]["split"] == "novel"
    # Second run: features come from the cache, results are identical (seeded).
    assert cli(args) == 0
    assert "cache hit" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][0]["accuracies"] == one["accuracies"]
    # The default 15 queries cannot be met by any row: both skipped, still exit 0 with the table.
    assert cli(args[:8] + ["--episodes", "10", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("skipped:") == 2


def test_cross_domain_rejects_a_contradicting_variant(cub_prepared, tmp_path, capsys):
    from s2m2.cli import main as cli

    ckpt = tmp_path / "mini_base.pt"
    write_checkpoint(ckpt, kwargs={"width": 8}, train_splits=("base",), crop=32, resize=36)
    assert cli(["cross-domain", "--checkpoint", str(ckpt), "--cub", str(cub_prepared), "--variant", "all100"]) == 2
    assert "contradicts the checkpoint" in capsys.readouterr().err


def test_release_checkpoint_variant_is_reported_as_assumed(cub_prepared, tmp_path, capsys):
    """A release-format checkpoint (exported from a small WRN with engineer B's exporter) has no config."""
    import torch

    from s2m2.checkpoint import export_release_checkpoint
    from s2m2.cli import main as cli
    from s2m2.models import create_backbone

    torch.manual_seed(0)
    ckpt = export_release_checkpoint(create_backbone("wrn", depth=10, widen=1), tmp_path / "release.tar")
    feats = tmp_path / "cub-novel.pt"
    assert cli(["cross-domain", "--checkpoint", str(ckpt), "--cub", str(cub_prepared), "--shots", "1",
                "--queries", "2", "--episodes", "20", "--head", "ncm", "--features-out", str(feats),
                "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "cross-domain variant: base64 — assumed base64 (release-mixup checkpoint has no training config" in printed
    payload = load_features(feats)
    assert (payload["transform"]["resize"], payload["transform"]["crop"]) == (92, 80)  # the release's transform
    assert payload["checkpoint"]["source"] == "release-mixup" and payload["features"].shape[1] == 64
    assert cli(["cross-domain", "--checkpoint", str(ckpt), "--cub", str(cub_prepared), "--variant", "all100",
                "--shots", "1", "--queries", "2", "--episodes", "20", "--head", "ncm", "--no-progress"]) == 0
    assert "cross-domain variant: all100 — as stated by --variant" in capsys.readouterr().out


def test_ctrl_c_after_extraction_says_the_features_cache_was_kept(make_prepared, tmp_path, capsys, monkeypatch):
    """Interrupted while the heads run: the (complete, atomically written) features cache stays and the one
    line says so; no results file."""
    from s2m2.cli import main as cli

    cub = make_prepared(splits={"novel": 6}, per_class=5, size=16, name="cub")
    ckpt = tmp_path / "mini.pt"
    write_checkpoint(ckpt, kwargs={"width": 8}, crop=16, resize=18)
    feats, out = tmp_path / "cub-novel.pt", tmp_path / "cross.json"
    monkeypatch.setenv("S2M2_TEST_SIGINT", "heads")
    assert cli(["cross-domain", "--checkpoint", str(ckpt), "--cub", str(cub), "--shots", "1", "--queries", "2",
                "--episodes", "10", "--features-out", str(feats), "--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err == (f"s2m2 cross-domain: interrupted; kept the features cache {feats}; "
                                       f"no results written\n")
    assert load_features(feats)["features"].shape == (30, 8) and not out.exists()


def test_interrupt_hook_fires_in_a_background_job_where_sigint_starts_ignored(monkeypatch):
    """`cmd &` / nohup start Python with SIGINT ignored; the test hook must still deliver a real Ctrl-C there
    (the Ctrl-C tests failed under nohup before)."""
    import signal

    import pytest

    from s2m2.cli import TEST_SIGINT_ENV, interrupt_point

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setenv(TEST_SIGINT_ENV, "heads")
        with pytest.raises(KeyboardInterrupt):
            interrupt_point("heads")
    finally:
        signal.signal(signal.SIGINT, previous)
