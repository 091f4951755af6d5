"""mini-ImageNet preparation: the real Ravi-layout sample in ../shared, test-made pickles and ILSVRC tree
(index rule), and bad inputs (extra classes, mismatching CSVs, undecodable images, failed runs)."""

from __future__ import annotations

import csv
import io
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from data_prep.cli import run
from data_prep.common import PrepareError
from data_prep.mini_imagenet import load_ravi_split
from s2m2.data import load_meta, open_split

RAVI = load_ravi_split()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def solid(number: int, h: int = 6, w: int = 8) -> np.ndarray:
    """A solid image whose colour encodes ``number`` exactly (R = low byte, G = high byte)."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = number % 256, number // 256, 7
    return image


def decoded_number(image: np.ndarray) -> int:
    return int(image[..., 0].mean().round()) + 256 * int(image[..., 1].mean().round())


# -- the real Ravi-layout sample ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_sample(tmp_path_factory):
    source = shared_path("data", "mini_imagenet_sample")
    out = tmp_path_factory.mktemp("mini") / "prepared"
    with pytest.warns(UserWarning, match="subset"):
        run("mini-imagenet", source, out, workers=2)
    return source, out


def test_sample_prepares_with_ravi_class_assignment(mini_sample):
    source, out = mini_sample
    meta = load_meta(out)
    assert meta["source_layout"] == "ravi" and meta["resolution"] == 84
    assert meta["train_resolution"] is None  # 84 px at source: images.npy is all there is, no training view
    assert not (out / "base" / "train_images.npy").exists() and open_split(out, "base").train_images is None
    for split, csv_name, n_classes in (("base", "train", 64), ("val", "val", 16), ("novel", "test", 20)):
        data = open_split(out, split)
        assert data.num_classes == n_classes and len(data) == 8 * n_classes
        assert data.image_shape == (84, 84, 3)
        with open(source / f"{csv_name}.csv") as f:
            wnids = sorted({row["label"] for row in csv.DictReader(f)})
        assert data.class_ids == wnids                       # label order = sorted wnids
        assert np.array_equal(data.labels, np.repeat(np.arange(n_classes), 8))
        assert not meta["splits"][split]["complete"]
        assert meta["splits"][split]["expected_images"] == 600 * n_classes
    assert len(meta["warnings"]) == 3 and "expected 64 classes / 38400 images" in meta["warnings"][0]
    assert meta["split_files"]["novel"]["file"] == "mini_imagenet/ravi/test.csv"
    assert len(meta["split_files"]["novel"]["sha256"]) == 64


def test_sample_pixels_and_readable_names(mini_sample):
    source, out = mini_sample
    novel = open_split(out, "novel")
    first = sorted(p.name for p in (source / "images").glob(f"{novel.class_ids[0]}*"))[0]
    expected = np.asarray(Image.open(source / "images" / first).convert("RGB"))
    np.testing.assert_array_equal(novel.images[0], expected)
    base = open_split(out, "base")
    assert base.class_names[base.class_ids.index("n01532829")].startswith("house finch")


def test_csv_that_disagrees_with_the_ravi_split(tmp_path):
    source = shared_path("data", "mini_imagenet_sample")
    copy = tmp_path / "mini"
    shutil.copytree(source, copy)
    rows = (copy / "val.csv").read_text().splitlines()
    moved = rows[1]
    (copy / "val.csv").write_text("\n".join(rows[:1] + rows[2:]) + "\n")
    (copy / "test.csv").write_text((copy / "test.csv").read_text() + moved + "\n")
    with pytest.raises(PrepareError, match=r"test.csv: row .* is in val of the Ravi split.*does not match"):
        run("mini-imagenet", copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extra_class_and_corrupt_image_in_ravi_folder(tmp_path):
    source = shared_path("data", "mini_imagenet_sample")
    copy = tmp_path / "mini"
    shutil.copytree(source, copy)
    (copy / "images" / "n0000000100000001.jpg").write_bytes(png(solid(1)))
    with pytest.raises(PrepareError, match=r"1 classes are not in the split definition.*n00000001"):
        run("mini-imagenet", copy, tmp_path / "out")
    (copy / "images" / "n0000000100000001.jpg").unlink()
    victim = sorted((copy / "images").iterdir())[-1]
    victim.write_bytes(b"<html>not an image</html>")
    with pytest.raises(PrepareError, match=f"{victim.name}: the image does not decode"):
        run("mini-imagenet", copy, tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # temporary folder removed


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_failed_overwrite_leaves_the_existing_folder_untouched(tmp_path, mini_sample):
    _, good = mini_sample
    out = tmp_path / "prepared"
    shutil.copytree(good, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    copy = tmp_path / "mini"
    shutil.copytree(shared_path("data", "mini_imagenet_sample"), copy)
    novel_image = RAVI.rows["novel"][0][0]
    (copy / "images" / novel_image).write_bytes(b"garbage")  # fails in the last split written
    with pytest.raises(PrepareError, match=novel_image):
        run("mini-imagenet", copy, out, overwrite=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini", "prepared"]
    with pytest.raises(PrepareError, match="already exists; pass --overwrite"):
        run("mini-imagenet", copy, out)


# -- pickles (test-made, same structure as mini-imagenet-cache-*.pkl) ---------------------------------
def write_mini_pickles(root, per_class=3, classes_per_split=2, seed=0):
    rng = np.random.default_rng(seed)
    expected = {}
    for split, name in (("base", "train"), ("val", "validation"), ("novel", "test")):
        wnids = RAVI.classes[split][-classes_per_split:][::-1]  # deliberately not sorted in the pickle
        images = rng.integers(0, 256, (per_class * len(wnids), 84, 84, 3), dtype=np.uint8)
        order = rng.permutation(len(images))                     # classes interleaved in image_data
        class_dict = {w: sorted(order[i * per_class:(i + 1) * per_class].tolist())
                      for i, w in enumerate(wnids)}
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        expected[split] = (sorted(wnids), np.concatenate([images[class_dict[w]] for w in sorted(wnids)]))
    return expected


def test_pickles_prepare_in_sorted_class_order(tmp_path):
    expected = write_mini_pickles(tmp_path)
    with pytest.warns(UserWarning, match="subset"):
        run("mini-imagenet", tmp_path / "mini-imagenet-cache-train.pkl", tmp_path / "out")
    assert load_meta(tmp_path / "out")["source_layout"] == "pickle"
    assert load_meta(tmp_path / "out")["train_resolution"] is None
    for split, (wnids, images) in expected.items():
        data = open_split(tmp_path / "out", split)
        assert data.class_ids == wnids
        np.testing.assert_array_equal(data.images, images)
        np.testing.assert_array_equal(data.labels, np.repeat([0, 1], 3))


def test_pickles_at_another_resolution(tmp_path):
    expected = write_mini_pickles(tmp_path, per_class=2)
    with pytest.warns(UserWarning):
        run("mini-imagenet", tmp_path, tmp_path / "out", resolution=40, workers=2)
    data = open_split(tmp_path / "out", "val")
    assert data.image_shape == (40, 40, 3)
    resized = np.asarray(Image.fromarray(expected["val"][1][1]).resize((40, 40), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(data.images[1], resized)


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_bad_pickles(tmp_path):
    write_mini_pickles(tmp_path)
    path = tmp_path / "mini-imagenet-cache-validation.pkl"
    path.write_bytes(b"<!DOCTYPE html><html>quota exceeded</html>")
    with pytest.raises(PrepareError, match="validation.pkl: this looks like an HTML page, probably a failed"):
        run("mini-imagenet", tmp_path, tmp_path / "out")
    write_mini_pickles(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(PrepareError, match="validation.pkl: .*truncated"):
        run("mini-imagenet", tmp_path, tmp_path / "out")
    with open(path, "wb") as f:  # a test class in the validation pickle
        pickle.dump({"image_data": np.zeros((1, 84, 84, 3), np.uint8),
                     "class_dict": {RAVI.classes["novel"][0]: [0]}}, f)
    with pytest.raises(PrepareError, match=f"{RAVI.classes['novel'][0]}.*do not match"):
        run("mini-imagenet", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- ILSVRC train tree + Ravi CSVs (index rule) --------------------------------------------------------
def rows_of(split: str, wnid: str) -> list[str]:
    return sorted(name for name, w in RAVI.rows[split] if w == wnid)


@pytest.fixture(scope="module")
def ilsvrc_tree(tmp_path_factory):
    """One class per split with as many train images as its largest Ravi index, numbered with gaps so
    that sorting by number differs from sorting by name; plus a class that mini-ImageNet does not use."""
    root = tmp_path_factory.mktemp("ilsvrc") / "train"
    rng = np.random.default_rng(0)
    chosen = {}
    for split in ("base", "val", "novel"):
        wnid = min(RAVI.classes[split], key=lambda w: max(int(r[9:17]) for r in rows_of(split, w)))
        count = max(int(r[9:17]) for r in rows_of(split, wnid))
        numbers = np.sort(rng.choice(np.arange(1, 20 * count), size=count, replace=False))
        folder = root / wnid
        folder.mkdir(parents=True)
        for number in rng.permutation(numbers):
            # PNG bytes under a .JPEG name: ILSVRC really contains such files
            (folder / f"{wnid}_{number}.JPEG").write_bytes(png(solid(int(number))))
        chosen[split] = (wnid, numbers)
    (root / "n99999999").mkdir()
    (root / "n99999999" / "n99999999_1.JPEG").write_bytes(png(solid(1)))
    return root, chosen


def test_ilsvrc_tree_uses_the_index_rule(tmp_path, ilsvrc_tree):
    root, chosen = ilsvrc_tree
    with pytest.warns(UserWarning, match="subset"):
        run("mini-imagenet", root.parent, tmp_path / "out", workers=2)
    meta = load_meta(tmp_path / "out")
    assert meta["source_layout"] == "ilsvrc" and meta["resolution"] == 92 and meta["train_resolution"] == 160
    for split, (wnid, numbers) in chosen.items():
        data = open_split(tmp_path / "out", split)
        assert data.class_ids == [wnid] and len(data) == 600 and data.image_shape == (92, 92, 3)
        wanted = [int(numbers[int(r[9:17]) - 1]) for r in rows_of(split, wnid)]
        got = [decoded_number(data.images[i]) for i in range(len(data))]
        assert got == wanted
        # the training view of the same photos, and their original sizes
        assert data.train_images.shape == (600, 160, 160, 3)
        assert [decoded_number(data.train_images[i]) for i in range(len(data))] == wanted
        assert (data.source_sizes == solid(1).shape[:2]).all()


def test_train_resolution_only_for_the_ilsvrc_tree(tmp_path):
    from data_prep import mini_imagenet

    write_mini_pickles(tmp_path, per_class=2)
    with pytest.raises(PrepareError, match="--train-resolution 128: this source is pre-shrunk"):
        mini_imagenet.prepare(tmp_path, tmp_path / "out", train_resolution=128)


def test_incomplete_ilsvrc_class_is_an_error(tmp_path, ilsvrc_tree):
    root, chosen = ilsvrc_tree
    tree = tmp_path / "train"
    shutil.copytree(root, tree)
    wnid = chosen["val"][0]
    for name in sorted((tree / wnid).iterdir())[100:]:
        name.unlink()
    with pytest.raises(PrepareError, match=rf"{wnid}: the Ravi split refers to image #\d+ .* holds 100"):
        run("mini-imagenet", tree, tmp_path / "out")
