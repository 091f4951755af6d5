"""tiered-ImageNet preparation from test-made Ren et al. pickles (structure as published: a list of PNG
bytes as uint8 arrays, a labels dict with bytes keys from Python 2) and from an ILSVRC train tree."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import run
from data_prep.common import PrepareError
from data_prep.tiered_imagenet import load_ren_split
from s2m2.data import load_meta, open_split

SPLITS, WORDS, _ = load_ren_split()
FILE_SPLITS = {"base": "train", "val": "val", "novel": "test"}


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def write_ren_pickles(root, per_class=3, classes=3, seed=0, as_arrays=True):
    """Per split: ``classes`` classes (from the end of the CSV, so CSV order != sorted order), images of
    classes interleaved; returns {split: (sorted wnids, expected images in prepared order)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, name in FILE_SPLITS.items():
        wnids = list(SPLITS[split])[-classes:][::-1]
        specific = rng.permutation(np.repeat(np.arange(classes), per_class))
        images = rng.integers(0, 256, (len(specific), 84, 84, 3), dtype=np.uint8)
        encoded = [np.frombuffer(png(im), np.uint8) if as_arrays else png(im) for im in images]
        labels = {b"label_specific": specific, b"label_general": np.zeros_like(specific),
                  b"label_specific_str": [w.encode() for w in wnids], b"label_general_str": [b"n0"]}
        (root / f"{name}_images_png.pkl").write_bytes(pickle.dumps(encoded, protocol=2))
        (root / f"{name}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))
        order = sorted(range(classes), key=lambda k: wnids[k])
        expected[split] = ([wnids[k] for k in order],
                           np.concatenate([images[specific == k] for k in order]))
    return expected


@pytest.mark.parametrize("as_arrays", [True, False])
@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_ren_pickles(tmp_path, monkeypatch, as_arrays):
    monkeypatch.setattr("data_prep.common.MIN_POOL_IMAGES", 0)  # exercise the process pool too
    expected = write_ren_pickles(tmp_path, as_arrays=as_arrays)
    run("tiered-imagenet", tmp_path, tmp_path / "out", workers=2 if as_arrays else 1)
    meta = load_meta(tmp_path / "out")
    assert meta["source_layout"] == "ren-pickles" and meta["resolution"] == 84 and meta["train_resolution"] is None
    assert meta["splits"]["base"]["expected_classes"] == 351
    assert meta["splits"]["novel"]["expected_images"] == 206209
    for split, (wnids, images) in expected.items():
        data = open_split(tmp_path / "out", split)
        assert data.class_ids == wnids and data.class_names == [WORDS[w] for w in wnids]
        np.testing.assert_array_equal(data.images, images)
        np.testing.assert_array_equal(data.labels, np.repeat(np.arange(3), 3))
        assert meta["categories"][split] == {w: SPLITS[split][w] for w in wnids}


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_bad_ren_pickles(tmp_path):
    write_ren_pickles(tmp_path)
    labels = tmp_path / "val_labels.pkl"
    labels.write_bytes(pickle.dumps({b"label_general": np.zeros(9)}, protocol=2))
    with pytest.raises(PrepareError,
                       match=r"val_labels.pkl: keys \['label_specific', 'label_specific_str'\] missing"):
        run("tiered-imagenet", tmp_path, tmp_path / "out")
    write_ren_pickles(tmp_path)
    images = tmp_path / "test_images_png.pkl"
    images.write_bytes(b"<!DOCTYPE html><html><body>Google Drive can't scan this file</body></html>")
    with pytest.raises(PrepareError, match="test_images_png.pkl: this looks like an HTML page"):
        run("tiered-imagenet", tmp_path, tmp_path / "out")
    write_ren_pickles(tmp_path)
    train_labels = pickle.loads((tmp_path / "train_labels.pkl").read_bytes())
    train_labels[b"label_specific_str"][0] = list(SPLITS["novel"])[0].encode()  # a test class in train
    (tmp_path / "train_labels.pkl").write_bytes(pickle.dumps(train_labels))
    with pytest.raises(PrepareError, match="train_labels.pkl: 1 classes are not in the split definition"):
        run("tiered-imagenet", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_corrupt_png_in_pickle_names_the_index(tmp_path):
    write_ren_pickles(tmp_path)
    encoded = pickle.loads((tmp_path / "val_images_png.pkl").read_bytes())
    encoded[4] = encoded[4][:50]
    (tmp_path / "val_images_png.pkl").write_bytes(pickle.dumps(encoded))
    with pytest.raises(PrepareError, match="val_images_png.pkl: image 4: the image does not decode"):
        run("tiered-imagenet", tmp_path, tmp_path / "out")


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_ilsvrc_tree_uses_every_image_sorted_by_number(tmp_path):
    tree = tmp_path / "train"
    chosen = {split: sorted(SPLITS[split])[:2] for split in FILE_SPLITS}
    for wnids in chosen.values():
        for c, wnid in enumerate(wnids):
            (tree / wnid).mkdir(parents=True)
            for number in (10, 9, 100):  # numeric order 9, 10, 100 differs from name order
                image = np.full((50, 70, 3), (number, c, 0), np.uint8)
                (tree / wnid / f"{wnid}_{number}.JPEG").write_bytes(png(image))
    (tree / "n09999999").mkdir()  # ILSVRC classes outside tiered-ImageNet are ignored
    run("tiered-imagenet", tmp_path, tmp_path / "out", resolution=32)
    meta = load_meta(tmp_path / "out")
    assert meta["source_layout"] == "ilsvrc" and meta["resolution"] == 32 and meta["train_resolution"] == 160
    for split, wnids in chosen.items():
        data = open_split(tmp_path / "out", split)
        assert data.class_ids == wnids and data.image_shape == (32, 32, 3)
        assert data.images[:, 0, 0, 0].tolist() == [9, 10, 100, 9, 10, 100]
        assert data.images[:, 0, 0, 1].tolist() == [0, 0, 0, 1, 1, 1]
        # training view (default 160 for the ILSVRC tree) of the same photos, and their (height, width)
        assert data.train_images.shape == (6, 160, 160, 3) and data.source_sizes.tolist() == [[50, 70]] * 6
        assert data.train_images[:, 80, 80, 0].tolist() == [9, 10, 100, 9, 10, 100]
