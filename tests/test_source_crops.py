"""Training crops at source resolution: full-resolution sources (CUB, ILSVRC trees) carry a training view
(the photo squashed to T x T + its original size), and the training crop boxes are sampled in the photo's
own pixels as torchvision's RandomResizedCrop(80) on the full-resolution image (the release).

On the real CUB sample in ../shared (skipped, with the reason, when absent) and on a test-made CUB folder
of photos of assorted sizes and aspects (always run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from conftest import shared_path
from data_prep import cub
from data_prep.common import DEFAULT_TRAIN_RESOLUTION
from s2m2.config import load_config
from s2m2.data import PreparedDataError, load_meta, open_split
from s2m2.data.augment import TrainAugment, pack_source_sizes, to_view, unpack_source_sizes
from s2m2.trainer import TrainData, Trainer
from test_prepare_cub import ALL_CLASSES, jpeg, write_images_txt

SPLITS = ("base", "val", "novel")
#: (height, width) of the test-made photos: landscape, portrait, square, and aspects outside [3/4, 4/3]
#: (so the centre fallback of RandomResizedCrop is exercised)
PHOTO_SIZES = [(75, 100), (100, 75), (90, 90), (40, 160), (150, 48), (62, 83), (120, 97), (57, 57)]


def make_photos_cub(root, classes=ALL_CLASSES[:6], per_class=4):
    """CUB_200_2011/ with smooth RGB photos of the sizes in PHOTO_SIZES (one grey)."""
    folder = root / "CUB_200_2011"
    (folder / "images").mkdir(parents=True)
    (folder / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(ALL_CLASSES)))
    rng = np.random.default_rng(0)
    listed, k = [], 0
    for c, name in enumerate(classes):
        (folder / "images" / name).mkdir()
        for i in range(per_class):
            h, w = PHOTO_SIZES[k % len(PHOTO_SIZES)]
            k += 1
            yy, xx = np.mgrid[0:h, 0:w]  # smooth ramps + a class colour: a crop's position shows in its pixels
            rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * c)], axis=-1)
            rgb = rgb + rng.integers(0, 9, (h, w, 3))
            image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
            image = image.convert("L") if k == 3 else image
            listed.append(f"{name}/{name.split('.')[1]}_{i:04d}_{c}.jpg")
            (folder / "images" / listed[-1]).write_bytes(jpeg(image))
    write_images_txt(folder, listed)
    return folder


def photo_files(source, out) -> list:
    """The original file of every row of TrainData(out, SPLITS), in row order (classes in label order,
    files sorted by name within a class)."""
    return [path for split in SPLITS for cid in open_split(out, split).class_ids
            for path in sorted((source / "images" / cid).iterdir())]


@pytest.fixture(scope="module")
def real_cub(tmp_path_factory):
    source = shared_path("data", "cub_sample", "CUB_200_2011")
    out = tmp_path_factory.mktemp("real") / "cub"
    with pytest.warns(UserWarning, match="subset"):
        cub.prepare(source.parent, out, workers=1)
    return source, out


@pytest.fixture(scope="module")
def made_cub(tmp_path_factory):
    source = make_photos_cub(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("made") / "cub"
    with pytest.warns(UserWarning, match="subset"):
        cub.prepare(source, out, workers=1, resolution=18, train_resolution=40)
    return source, out


@pytest.fixture(params=["real", "made"])
def prepared_cub(request):
    return request.getfixturevalue(f"{request.param}_cub")


def test_train_view_is_the_pil_resize_of_the_original_and_sizes_are_the_photos(prepared_cub):
    source, out = prepared_cub
    meta = load_meta(out)
    size = meta["train_resolution"]
    assert meta["format_version"] == 2 and size == (DEFAULT_TRAIN_RESOLUTION if meta["resolution"] == 92 else 40)
    files = iter(photo_files(source, out))
    for split in SPLITS:
        data = open_split(out, split)
        assert data.train_images.shape == (len(data), size, size, 3)
        assert meta["splits"][split]["train_shape"] == [size, size, 3]
        for i in range(len(data)):
            photo = Image.open(next(files)).convert("RGB")
            assert tuple(data.source_sizes[i]) == (photo.height, photo.width)
            resized = photo.resize((size, size), Image.Resampling.BILINEAR)
            np.testing.assert_array_equal(data.train_images[i], np.asarray(resized))  # the same resize: exact
            # the evaluation view is untouched: the release's Resize((92, 92)) (here --resolution)
            evaluated = photo.resize((meta["resolution"],) * 2, Image.Resampling.BILINEAR)
            np.testing.assert_array_equal(data.images[i], np.asarray(evaluated))
    assert next(files, None) is None


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b)).max())


def test_training_crops_have_the_size_distribution_of_torchvision_on_the_original(prepared_cub):
    """Crop height and width in original pixels: ours (the trainer's batch -> TrainAugment's draws) vs
    torchvision RandomResizedCrop(80).get_params on each original PIL image, 100 boxes per photo each.

    Two-sample KS on 3,000-15,000 boxes per side; seeded, so it cannot flake. The bound is the 0.1 % KS
    critical value 1.95 * sqrt(2 / n); measured on the CUB sample: 0.007 (height) / 0.012 (width). Boxes
    sampled on the 92x92 squashed view (the old path) give 0.04 / 0.21, boxes with height and width
    swapped 0.055 / 0.052: both fail."""
    source, out = prepared_cub
    draws = 100
    data = TrainData(out, list(SPLITS))
    assert data.train_view
    _, sizes = unpack_source_sizes(data.gather(torch.arange(len(data))))
    params = TrainAugment(80).sample_sized(sizes.repeat_interleave(draws, 0), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    release = np.array([transforms.RandomResizedCrop.get_params(Image.open(path), (0.08, 1.0), (3 / 4, 4 / 3))[2:]
                        for path in photo_files(source, out) for _ in range(draws)], dtype=np.float64)
    bound = 1.95 * np.sqrt(2 / len(release))
    assert ks_statistic(params.height.numpy(), release[:, 0]) < bound
    assert ks_statistic(params.width.numpy(), release[:, 1]) < bound
    inside = (params.top + params.height <= sizes[:, 0].repeat_interleave(draws)) & \
             (params.left + params.width <= sizes[:, 1].repeat_interleave(draws))
    assert inside.all() and (params.top >= 0).all() and (params.left >= 0).all()


def test_a_crop_cut_from_the_view_shows_what_torchvision_cuts_from_the_original(real_cub):
    """Same box, two ways: our crop (box mapped into the 160x160 view, grid_sample) vs torchvision's
    resized_crop of the original photo to 80x80 (what our 160-px view loses shows as blur on the smallest,
    upsampled crops). Measured mean |difference| over the first 30 photos: 1.7 grey levels (the worst photo
    8.1); with the box mapped through swapped sizes: 40 (the best photo 16)."""
    source, out = real_cub
    data = TrainData(out, list(SPLITS))
    views, sizes = unpack_source_sizes(data.gather(torch.arange(30)))
    augment = TrainAugment(80, jitter=0.0, flip=False)
    params = augment.sample_sized(sizes, torch.Generator().manual_seed(1))
    ours = augment.apply(views, to_view(params, sizes, views.shape[1], views.shape[2]))
    std, mean = torch.tensor(augment.std).view(3, 1, 1), torch.tensor(augment.mean).view(3, 1, 1)
    errors = []
    for i, path in enumerate(photo_files(source, out)[:30]):
        box = [int(v[i]) for v in (params.top, params.left, params.height, params.width)]
        reference = np.asarray(TF.resized_crop(Image.open(path).convert("RGB"), *box, [80, 80]), np.float32)
        pixels = ((ours[i] * std + mean) * 255).permute(1, 2, 0).numpy()
        errors.append(np.abs(pixels - reference).mean())
    assert np.mean(errors) < 3.0 and max(errors) < 12.0, np.round(errors, 1)


def test_sizes_travel_with_the_images_through_indexing():
    """S2M2_E augments ``images[subset]``: the packed sizes must follow the rows (and a subset of the
    batch is augmented exactly as the same images packed alone)."""
    views = torch.randint(0, 256, (6, 12, 12, 3), dtype=torch.uint8)
    sizes = torch.tensor([[300, 500], [500, 300], [90, 90], [40, 160], [2000, 1500], [7, 9]])
    packed = pack_source_sizes(views, sizes)
    subset = torch.tensor([4, 1, 3])
    got_views, got_sizes = unpack_source_sizes(packed[subset])
    assert torch.equal(got_views, views[subset]) and torch.equal(got_sizes, sizes[subset])
    augment = TrainAugment(8, source_sized=True)
    a = augment(packed[subset], torch.Generator().manual_seed(3))
    b = augment(pack_source_sizes(views[subset], sizes[subset]), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _as_format_1(out, layout: str | None = None):
    """Turn a prepared folder into what s2m2 wrote before the training view (format version 1)."""
    meta = json.loads((out / "meta.json").read_text())
    meta["format_version"] = 1
    meta.pop("train_resolution")
    if layout:
        meta["source_layout"] = layout
    for split in meta["splits"]:
        meta["splits"][split].pop("train_shape")
        for name in ("train_images.npy", "source_sizes.npy"):
            (out / split / name).unlink()
            meta["checksums"].pop(f"{split}/{name}")
    (out / "meta.json").write_text(json.dumps(meta))


def test_a_format_1_folder_of_full_resolution_photos_is_refused_for_training(made_cub, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(made_cub[1], old)
    _as_format_1(old)
    assert open_split(old, "novel").images.shape[1:] == (18, 18, 3)  # still opens for evaluation
    with pytest.raises(PreparedDataError) as err:
        TrainData(old, ["base"])
    message = str(err.value)
    assert "\n" not in message and "format version 1" in message
    assert f"s2m2 prepare cub --source <the original CUB_200_2011> --out {old} --overwrite" in message
    # a format-1 folder of a pre-shrunk source (84-px Ravi images) holds the same bytes as format 2: trains
    _as_format_1(shutil.copytree(made_cub[1], tmp_path / "ravi"), layout="ravi")
    assert not TrainData(tmp_path / "ravi", ["base"]).train_view
    meta = json.loads((old / "meta.json").read_text())
    meta["format_version"] = 3
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PreparedDataError, match="format version 3 is not supported"):
        load_meta(old)


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_train_resolution_0_keeps_the_stored_view(tmp_path):
    source = make_photos_cub(tmp_path / "src", classes=ALL_CLASSES[:4], per_class=1)
    cub.prepare(source, tmp_path / "out", workers=1, resolution=18, train_resolution=0)
    assert load_meta(tmp_path / "out")["train_resolution"] is None
    assert not (tmp_path / "out" / "base" / "train_images.npy").exists()
    data = TrainData(tmp_path / "out", ["base"])
    assert not data.train_view and data.gather(torch.tensor([1, 0])).shape == (2, 18, 18, 3)


def test_the_cli_passes_train_resolution_through(tmp_path):
    from data_prep.cli import main

    source = make_photos_cub(tmp_path / "src", classes=ALL_CLASSES[:4], per_class=1)
    assert main(["cub", "--source", str(source), "--out", str(tmp_path / "out"), "--resolution", "18",
                 "--train-resolution", "40", "--workers", "1"]) == 0
    assert load_meta(tmp_path / "out")["train_resolution"] == 40
    assert np.load(tmp_path / "out" / "base" / "train_images.npy", mmap_mode="r").shape[1:3] == (40, 40)


class _Unreadable:
    """Stands for images.npy: any read fails the test (the trainer must read the training view)."""

    def __init__(self, shape):
        self.shape = shape

    def __getitem__(self, index):
        raise AssertionError("the trainer read images.npy instead of train_images.npy")


@pytest.mark.parametrize("method", ["s2m2_r", "s2m2_e"])
def test_trainer_trains_from_the_train_view(made_cub, tmp_path, monkeypatch, method):
    _, out = made_cub
    reads = []
    original = TrainData.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for split in self.splits:
            split.images = _Unreadable(split.images.shape)
            view = split.train_images

            class Recording:
                shape = view.shape

                def __getitem__(self, index, view=view):
                    reads.append(len(index))
                    return view[index]

            split.train_images = Recording()

    monkeypatch.setattr(TrainData, "__init__", init)
    config = load_config(None, [
        "model.backbone=conv4", "model.backbone_kwargs={width: 8}", "data.crop_size=16", "data.eval_resize=18",
        "runtime.progress=false", "runtime.tensorboard=false", "validation.enabled=false",
        "schedule.batch_size=8", "schedule.max_steps=2", "method.exemplar_views=2",
        f"method.name={method}", f"data.root={out}", f"runtime.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(config)
    assert trainer.data.train_view and trainer.augment.source_sized
    summary = trainer.fit()
    # base: 3 classes x 4 photos = one epoch of a batch of 8 and one of 4 (+ any prefetched batch)
    assert summary["steps"] == 2 and reads[:2] == [8, 4]
    assert all(np.isfinite(h["loss"]) for h in summary["history"])
