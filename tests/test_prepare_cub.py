"""CUB-200-2011 preparation: the real sample in ../shared (CloserLook class assignment, grayscale images),
a test-made CUB_200_2011 folder and .tgz (identical results, mode conversion), and bad inputs."""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from data_prep.cli import run
from data_prep.common import PrepareError
from data_prep.cub import closerlook_split
from s2m2.data import load_meta, open_split

SPLITS, _ = closerlook_split()
ALL_CLASSES = sorted(c for classes in SPLITS.values() for c in classes)


def test_shipped_lists_follow_the_closerlook_rule():
    assert len(ALL_CLASSES) == 200
    for i, name in enumerate(ALL_CLASSES):
        split = "base" if i % 2 == 0 else "val" if i % 4 == 1 else "novel"
        assert name in SPLITS[split]


@pytest.fixture(scope="module")
def cub_sample(tmp_path_factory):
    source = shared_path("data", "cub_sample", "CUB_200_2011")
    out = tmp_path_factory.mktemp("cub") / "cub"
    with pytest.warns(UserWarning, match="subset"):
        run("cub", source.parent, out, workers=2)
    return source, out


def test_sample_classes_land_in_closerlook_splits(cub_sample):
    _, out = cub_sample
    base, val, novel = (open_split(out, s) for s in ("base", "val", "novel"))
    assert base.class_ids[:3] == ["001.Black_footed_Albatross", "003.Sooty_Albatross", "005.Crested_Auklet"]
    assert val.class_ids[:2] == ["002.Laysan_Albatross", "006.Least_Auklet"]
    assert novel.class_ids[:2] == ["004.Groove_billed_Ani", "008.Rhinoceros_Auklet"]
    assert "048.European_Goldfinch" in novel.class_ids and "050.Eared_Grebe" in val.class_ids
    assert "049.Boat_tailed_Grackle" in base.class_ids
    assert (base.num_classes, val.num_classes, novel.num_classes) == (25, 13, 12)
    assert novel.class_names[0] == "Groove billed Ani"
    for split in (base, val, novel):
        assert len(split) == 3 * split.num_classes and split.image_shape == (92, 92, 3)
    meta = load_meta(out)
    assert meta["resolution"] == 92 and meta["splits"]["base"]["expected_images"] == 5885
    assert meta["format_version"] == 2 and meta["train_resolution"] == 160  # + the training view
    assert base.train_images.shape == (75, 160, 160, 3) and base.source_sizes.shape == (75, 2)
    assert all("subset" in w for w in meta["warnings"]) and len(meta["warnings"]) == 3


def test_sample_grayscale_image_becomes_rgb_and_whole_image_is_resized(cub_sample):
    source, out = cub_sample
    base = open_split(out, "base")  # 009.Brewer_Blackbird (index 8: base) holds a grayscale JPEG
    label = base.class_ids.index("009.Brewer_Blackbird")
    files = sorted((source / "images" / "009.Brewer_Blackbird").iterdir())
    grey_slot = [f.name for f in files].index("Brewer_Blackbird_0028_2682.jpg")
    image = base.images[np.flatnonzero(base.labels == label)[grey_slot]]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    expected = Image.open(files[grey_slot]).convert("RGB").resize((92, 92), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(image, np.asarray(expected))


# -- test-made CUB folder and .tgz ---------------------------------------------------------------------
def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def make_cub(root, classes=ALL_CLASSES[:6], per_class=2):
    """CUB_200_2011/ with the official classes.txt and odd image modes (grey, CMYK) among RGB JPEGs."""
    cub = root / "CUB_200_2011"
    (cub / "images").mkdir(parents=True)
    (cub / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(ALL_CLASSES)))
    rng = np.random.default_rng(0)
    listed = []
    for c, name in enumerate(classes):
        (cub / "images" / name).mkdir()
        for i in range(per_class):
            rgb = Image.fromarray(rng.integers(0, 256, (30 + c, 40, 3), dtype=np.uint8))
            image = rgb.convert("L") if (c, i) == (0, 1) else rgb.convert("CMYK") if (c, i) == (1, 0) else rgb
            listed.append(f"{name}/{name.split('.')[1]}_{i:04d}_{c}.jpg")
            (cub / "images" / listed[-1]).write_bytes(jpeg(image))
    write_images_txt(cub, listed[::-1])  # any order: the list decides which files, not their order
    (cub / "attributes").mkdir()
    return cub


def write_images_txt(cub, listed):
    (cub / "images.txt").write_text("".join(f"{i + 1} {rel}\n" for i, rel in enumerate(listed)))


def make_tgz(cub, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(cub, arcname="CUB_200_2011")
    return path


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_tgz_equals_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("data_prep.common.MIN_POOL_IMAGES", 0)  # stream the archive into the process pool
    cub = make_cub(tmp_path / "src")
    tgz = make_tgz(cub, tmp_path / "CUB_200_2011.tgz")
    run("cub", cub, tmp_path / "folder", resolution=48)
    run("cub", tgz, tmp_path / "tgz", resolution=48, workers=2)
    assert load_meta(tmp_path / "tgz")["source_layout"] == "cub-tgz"
    for split in ("base", "val", "novel"):
        a, b = open_split(tmp_path / "folder", split), open_split(tmp_path / "tgz", split)
        assert a.class_ids == b.class_ids and a.image_shape == (48, 48, 3)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.train_images, b.train_images)  # written by the workers for the tgz
        np.testing.assert_array_equal(a.source_sizes, b.source_sizes)
    assert open_split(tmp_path / "tgz", "base").class_ids == [ALL_CLASSES[0], ALL_CLASSES[2], ALL_CLASSES[4]]


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_bad_cub_inputs(tmp_path):
    cub = make_cub(tmp_path / "src")
    victim = sorted((cub / "images" / ALL_CLASSES[3]).iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:40])
    tgz = make_tgz(cub, tmp_path / "CUB_200_2011.tgz")
    with pytest.raises(PrepareError, match=f"CUB_200_2011.tgz:CUB_200_2011/images/{ALL_CLASSES[3]}/"
                                           f"{victim.name}: the image does not decode"):
        run("cub", tgz, tmp_path / "out")
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(tgz.read_bytes()[: tgz.stat().st_size * 2 // 3])
    with pytest.raises(PrepareError, match="cut.tgz: the archive is truncated"):
        run("cub", cut, tmp_path / "out")
    (cub / "images" / "201.Dodo").mkdir()
    shutil.copy(victim, cub / "images" / "201.Dodo" / "dodo.jpg")
    listed = (cub / "images.txt").read_text()
    (cub / "images.txt").write_text(listed + "9999 201.Dodo/dodo.jpg\n")
    with pytest.raises(PrepareError, match="1 classes are not in the split definition.*201.Dodo"):
        run("cub", cub, tmp_path / "out")
    shutil.rmtree(cub / "images" / "201.Dodo")
    (cub / "images.txt").write_text(listed)
    (cub / "classes.txt").write_text("1 001.Black_footed_Albatross\n")
    with pytest.raises(PrepareError, match="classes.txt: lists 1 classes that do not match"):
        run("cub", cub, tmp_path / "out")
    assert not (tmp_path / "out").exists()
