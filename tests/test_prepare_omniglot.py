"""Omniglot preparation: the full official zips in ../shared (1028/172/423 characters x 20, 28x28x1), the
shipped demo copy (real zip layout, every character, identical pixels), and bad inputs."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from conftest import REPO, shared_path
from data_prep.cli import run
from data_prep.common import PrepareError
from s2m2.data import load_meta, open_split

DEMO = REPO / "data_prep" / "demo"


@pytest.fixture(scope="module")
def omniglot_full(tmp_path_factory):
    source = shared_path("data", "omniglot")
    out = tmp_path_factory.mktemp("omniglot") / "omniglot"
    run("omniglot", source, out, workers=2)
    return out


def test_full_omniglot_is_the_vinyals_split(omniglot_full):
    meta = load_meta(omniglot_full)
    assert meta["warnings"] == [] and meta["source_layout"] == "omniglot-zips"
    for split, n in (("base", 1028), ("val", 172), ("novel", 423)):
        data = open_split(omniglot_full, split)
        assert data.num_classes == n and len(data) == 20 * n and data.image_shape == (28, 28, 1)
        assert np.array_equal(np.bincount(data.labels), np.full(n, 20))
    novel = open_split(omniglot_full, "novel")
    assert novel.class_ids[0] == "Gurmukhi/character42"          # Gurmukhi is split between base and novel
    assert "Gurmukhi/character01" in open_split(omniglot_full, "base").class_ids
    # strokes are dark on a white background, as in the source
    assert np.median(novel.images) == 255 and novel.images.min() < 50


def test_demo_copy_is_the_whole_split_with_identical_pixels(omniglot_full, tmp_path):
    # make demo trains on it: every Vinyals character, at most 20 MB in the repo (issue 8).
    assert sum(p.stat().st_size for p in DEMO.glob("*.zip")) < 20_000_000
    run("omniglot", DEMO, tmp_path / "demo")
    meta = load_meta(tmp_path / "demo")
    assert meta["warnings"] == [] and meta["source_files"] == ["images_background.zip", "images_evaluation.zip"]
    for split in ("base", "val", "novel"):
        demo, full = open_split(tmp_path / "demo", split), open_split(omniglot_full, split)
        assert demo.class_ids == full.class_ids and len(demo) == 20 * demo.num_classes
        np.testing.assert_array_equal(demo.images, full.images)


def test_demo_zips_use_the_official_layout():
    with zipfile.ZipFile(DEMO / "images_evaluation.zip") as zf:
        names = zf.namelist()
    assert all(n.startswith("images_evaluation/") and n.count("/") == 3 and n.endswith(".png") for n in names)


def test_one_zip_is_a_subset_and_an_html_zip_is_an_error(tmp_path):
    (tmp_path / "images_background.zip").symlink_to(DEMO / "images_background.zip")
    with pytest.raises(PrepareError, match="none of the .* novel classes .* is present"):
        run("omniglot", tmp_path, tmp_path / "out")
    (tmp_path / "images_evaluation.zip").write_text("<!doctype html><html>404</html>")
    with pytest.raises(PrepareError, match="images_evaluation.zip: this looks like an HTML page"):
        run("omniglot", tmp_path / "images_background.zip", tmp_path / "out")


def test_unknown_character_folder_is_an_error(tmp_path):
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(DEMO / f"{name}.zip") as src, \
                zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as dst:
            for member in src.namelist():
                dst.writestr(member, src.read(member))
            if name == "images_evaluation":
                dst.writestr("images_evaluation/Klingon/character01/0001_01.png", src.read(member))
    with pytest.raises(PrepareError, match="not in the split definition .*Klingon/character01"):
        run("omniglot", tmp_path, tmp_path / "out")


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_extracted_folders_equal_the_zips(tmp_path):
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(DEMO / f"{name}.zip") as zf:
            zf.extractall(tmp_path / "src")
    run("omniglot", tmp_path / "src", tmp_path / "folders", resolution=20)
    run("omniglot", DEMO, tmp_path / "zips", resolution=20)
    assert load_meta(tmp_path / "folders")["source_layout"] == "omniglot-folders"
    for split in ("base", "val", "novel"):
        a, b = open_split(tmp_path / "folders", split), open_split(tmp_path / "zips", split)
        assert a.class_ids == b.class_ids and a.image_shape == (20, 20, 1)
        np.testing.assert_array_equal(a.images, b.images)


def test_cli_prints_the_summary_of_the_demo_copy(tmp_path, capsys):
    from data_prep.cli import main

    assert main(["omniglot", "--source", str(DEMO), "--out", str(tmp_path / "demo"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "novel   423 classes    8460 images 28x28x1\n" in captured.out
    assert "warning" not in captured.err
    assert main(["omniglot", "--source", str(DEMO), "--out", str(tmp_path / "demo")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
