"""CIFAR-FS / FC100 preparation: the full CIFAR-100 tarball in ../shared (64/16/20 x 600 at 32x32), a
test-made CIFAR-100 python layout (tarball and extracted folder, bytes keys like the shared copy), the R2D2
folder layout, and bad inputs."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from data_prep.cli import run
from data_prep.common import PrepareError, split_file
from s2m2.data import load_meta, open_split

CIFAR_FS_TEST = ["baby", "bed", "bicycle"]  # first names of splits/cifar_fs/test.txt


# -- the full tarball ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_fs_full(tmp_path_factory):
    tarball = shared_path("data", "cifar100", "cifar-100-python.tar.gz")
    out = tmp_path_factory.mktemp("cifar") / "cifar-fs"
    run("cifar-fs", tarball, out, workers=2)
    return tarball, out


def test_full_cifar_fs_is_64_16_20_by_600_at_32(cifar_fs_full):
    _, out = cifar_fs_full
    meta = load_meta(out)
    assert meta["warnings"] == [] and meta["source_layout"] == "cifar-python"
    for split, n in (("base", 64), ("val", 16), ("novel", 20)):
        data = open_split(out, split)
        assert data.num_classes == n and len(data) == 600 * n and data.image_shape == (32, 32, 3)
        assert np.array_equal(np.bincount(data.labels), np.full(n, 600))
        assert meta["splits"][split]["complete"]
    novel = open_split(out, "novel")
    assert novel.class_names[:3] == CIFAR_FS_TEST and novel.class_names == sorted(novel.class_names)
    assert "skyscraper" in open_split(out, "base").class_names
    assert "otter" in open_split(out, "val").class_names


def test_full_cifar_fs_pixels_match_the_pickles(cifar_fs_full):
    tarball, out = cifar_fs_full
    with tarfile.open(tarball) as tar:  # the small test pickle: records 500..599 of each class
        test = pickle.load(tar.extractfile("cifar-100-python/test"), encoding="bytes")
        meta = pickle.load(tar.extractfile("cifar-100-python/meta"), encoding="bytes")
    names = [n.decode() for n in meta[b"fine_label_names"]]
    fine = np.asarray(test[b"fine_labels"])
    novel = open_split(out, "novel")
    for label in (0, 7):  # baby, and another novel class
        rows = np.flatnonzero(fine == names.index(novel.class_names[label]))
        expected = test[b"data"][rows].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(novel.images[600 * label + 500:600 * (label + 1)], expected)


@pytest.mark.slow
def test_full_fc100(tmp_path):
    tarball = shared_path("data", "cifar100", "cifar-100-python.tar.gz")
    run("fc100", tarball, tmp_path / "fc100", workers=2)
    meta = load_meta(tmp_path / "fc100")
    assert [meta["splits"][s]["num_images"] for s in ("base", "val", "novel")] == [36000, 12000, 12000]
    assert meta["superclasses"]["novel"] == ["aquatic_mammals", "insects", "medium_mammals", "people"]


# -- a small CIFAR-100 python layout ------------------------------------------------------------------
def fake_cifar(root, per_class=(2, 1), seed=0, bytes_keys=True):
    """All 100 classes (real names/superclasses), ``per_class`` = (train, test) images each."""
    coarse_to_fine = {}  # the FC100 files list fine classes 5 per superclass, in superclass order
    for name in ("train", "val", "test"):
        fines = split_file("fc100", f"{name}.txt").lines()
        for i, coarse in enumerate(split_file("fc100", f"{name}_superclasses.txt").lines()):
            coarse_to_fine[coarse] = fines[5 * i:5 * i + 5]
    fine_names = sorted(f for fs in coarse_to_fine.values() for f in fs)
    coarse_names = sorted(coarse_to_fine)
    coarse_of = {f: coarse_names.index(c) for c, fs in coarse_to_fine.items() for f in fs}
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    records = {}
    for name, count in (("train", per_class[0]), ("test", per_class[1])):
        fine = np.tile(np.arange(100), count)[rng.permutation(100 * count)]
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        obj = {key("data"): data, key("fine_labels"): fine.tolist(),
               key("coarse_labels"): [coarse_of[fine_names[f]] for f in fine], key("filenames"): []}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
        records[name] = (data, fine)
    meta = {key("fine_label_names"): [key(n) for n in fine_names],
            key("coarse_label_names"): [key(n) for n in coarse_names]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    tarball = root / "cifar-100-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return folder, tarball, records, fine_names


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_small_tarball_and_folder_give_identical_datasets(tmp_path):
    folder, tarball, records, names = fake_cifar(tmp_path / "src")
    run("cifar-fs", tarball, tmp_path / "a")
    run("cifar-fs", folder, tmp_path / "b", workers=2)
    for split in ("base", "val", "novel"):
        a, b = open_split(tmp_path / "a", split), open_split(tmp_path / "b", split)
        np.testing.assert_array_equal(a.images, b.images)
        assert len(a) == 3 * a.num_classes
    novel = open_split(tmp_path / "a", "novel")
    train_data, train_fine = records["train"]
    test_data, test_fine = records["test"]
    baby = names.index("baby")
    expected = np.concatenate([train_data[train_fine == baby], test_data[test_fine == baby]])
    np.testing.assert_array_equal(novel.images[:3], expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert "subset" in load_meta(tmp_path / "a")["warnings"][0]


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_fc100_superclasses_and_resolution(tmp_path):
    _, tarball, _, _ = fake_cifar(tmp_path / "src", bytes_keys=False)
    run("fc100", tarball, tmp_path / "fc", resolution=40, workers=2)
    meta = load_meta(tmp_path / "fc")
    assert [meta["splits"][s]["num_classes"] for s in ("base", "val", "novel")] == [60, 20, 20]
    assert meta["superclasses"]["val"] == ["large_carnivores", "large_omnivores_and_herbivores",
                                           "non-insect_invertebrates", "small_mammals"]
    assert open_split(tmp_path / "fc", "base").image_shape == (40, 40, 3)
    assert meta["split_files"]["base"]["file"] == "fc100/train.txt"


def test_truncated_and_html_tarballs(tmp_path):
    _, tarball, _, _ = fake_cifar(tmp_path / "src")
    cut = tmp_path / "cifar-100-python.tar.gz"
    cut.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(PrepareError, match="cifar-100-python.tar.gz: the archive is truncated or corrupt"):
        run("cifar-fs", cut, tmp_path / "out")
    cut.write_bytes(b"<html><body>Please sign in</body></html>")
    with pytest.raises(PrepareError, match="this looks like an HTML page, probably a failed download"):
        run("cifar-fs", cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cifar10_is_not_cifar100(tmp_path):
    folder, _, _, _ = fake_cifar(tmp_path / "src")
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["cat"] * 10, "coarse_label_names": []}))
    with pytest.raises(PrepareError, match="meta: expected 100 fine_label_names, got 10"):
        run("cifar-fs", folder, tmp_path / "out")


# -- R2D2 folder layout -------------------------------------------------------------------------------
def r2d2(root, classes, per_class=2):
    for c, name in enumerate(classes):
        (root / "data" / name).mkdir(parents=True)
        for i in range(per_class):
            image = np.full((32, 32, 3), (c, i, 9), np.uint8)
            Image.fromarray(image).save(root / "data" / name / f"{name}_{i:03d}.png")
    return root


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_r2d2_layout(tmp_path):
    classes = ["skyscraper", "turtle", "otter", "baby", "bed"]
    root = r2d2(tmp_path / "CIFAR-FS", classes)
    (root / "splits" / "bertinetto").mkdir(parents=True)
    for name in ("train", "val", "test"):
        (root / "splits" / "bertinetto" / f"{name}.txt").write_text(
            split_file("cifar_fs", f"{name}.txt").path.read_text())
    run("cifar-fs", root, tmp_path / "out", workers=1)
    assert load_meta(tmp_path / "out")["source_layout"] == "r2d2"
    base, novel = open_split(tmp_path / "out", "base"), open_split(tmp_path / "out", "novel")
    assert base.class_names == ["skyscraper", "turtle"] and novel.class_names == ["baby", "bed"]
    assert novel.images[3, 0, 0].tolist() == [4, 1, 9]     # bed (class 4 in the fixture), image 1

    (root / "splits" / "bertinetto" / "val.txt").write_text("otter\nmotorcycle\n")
    with pytest.raises(PrepareError, match=r"bertinetto/val.txt: does not match the CIFAR-FS val split"):
        run("cifar-fs", root, tmp_path / "out2")


def test_r2d2_extra_class_folder(tmp_path):
    root = r2d2(tmp_path / "CIFAR-FS", ["skyscraper", "otter", "baby", "not_a_cifar_class"])
    with pytest.raises(PrepareError, match="1 classes are not in the split definition.*not_a_cifar_class"):
        run("cifar-fs", root, tmp_path / "out")


def test_split_class_missing_from_the_source_metadata(tmp_path):
    folder, _, _, names = fake_cifar(tmp_path / "src")
    renamed = [("infant" if n == "baby" else n) for n in names]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": renamed,
                                                "coarse_label_names": ["c"] * 20}, protocol=2))
    with pytest.raises(PrepareError, match=r"cifar_fs split files name classes that are not CIFAR-100 fine "
                                           r"labels of .*\['baby'\]; the split file does not match"):
        run("cifar-fs", folder, tmp_path / "out")
