"""data_prep.common and the `s2m2 prepare` command: decoding/conversion, bad-input detection, parallel
decoding, and the never-half-written guarantee of the CLI."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_prep import cli
from data_prep.common import (DEFAULT_TRAIN_RESOLUTION, DecodeSpec, ImageItem, PrepareError, check_not_html,
                              decode_image, decode_into, iter_tar_files, load_pickle, open_tar, open_zip, to_mode,
                              train_size_for)

HTML = b"<!DOCTYPE html>\n<html><head><title>Google Drive - Virus scan warning</title></head></html>"


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


# -- mode conversion ----------------------------------------------------------------------------------
def test_grayscale_is_repeated_to_rgb():
    grey = Image.new("L", (5, 4), 100)
    out = decode_image(encode(grey), "grey.png", DecodeSpec(5, 3))
    assert out.shape == (5, 5, 3) and out.dtype == np.uint8
    assert (out == 100).all()


def test_alpha_is_composited_on_white_and_palette_converted():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255            # top half opaque red-ish, bottom half fully transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")), "a.png", DecodeSpec(4, 3))
    assert (out[:2] == [200, 0, 0]).all()
    assert (out[2:] == 255).all()
    flat = Image.fromarray(np.full((4, 4, 3), (10, 20, 30), np.uint8))
    palette = flat.convert("P", palette=Image.Palette.ADAPTIVE)
    assert (decode_image(encode(palette), "p.png", DecodeSpec(4, 3)) == [10, 20, 30]).all()


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=100), "cmyk.jpg", DecodeSpec(8, 3))
    assert out.shape == (8, 8, 3)
    assert out[..., 0].min() > 240 and out[..., 1:].max() < 15


def test_sixteen_bit_grey_is_scaled_not_clipped():
    array = np.full((4, 4), 40000, dtype=np.uint16)
    array[0, 0] = 65535
    image = Image.fromarray(array)
    out = np.asarray(to_mode(image, 1))
    assert out[0, 0] == 255 and 150 < out[1, 1] < 160  # 40000/65535*255 = 155.6, not clipped to 255


def test_resize_is_bilinear_to_square_and_grey_keeps_one_channel():
    image = Image.fromarray(np.tile(np.arange(0, 250, 25, dtype=np.uint8), (6, 1)))  # 6x10 ramp
    out = decode_image(image_bytes := encode(image), "ramp.png", DecodeSpec(5, 1))
    expected = np.asarray(Image.open(io.BytesIO(image_bytes)).resize((5, 5), Image.Resampling.BILINEAR))
    assert out.shape == (5, 5, 1)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_undecodable_image_names_the_file():
    with pytest.raises(PrepareError, match=r"archive.tgz:images/broken.jpg: the image does not decode"):
        decode_image(b"\xff\xd8\xff\xe0 not really a jpeg", "archive.tgz:images/broken.jpg", DecodeSpec(8))


def test_truncated_jpeg_is_an_error():
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(PrepareError, match="cut.jpg"):
        decode_image(data[: len(data) // 2], "cut.jpg", DecodeSpec(8))


# -- parallel decoding ---------------------------------------------------------------------------------
@pytest.fixture
def always_pool(monkeypatch):
    """Use the process pool even for the few images of a unit test."""
    monkeypatch.setattr("data_prep.common.MIN_POOL_IMAGES", 0)


def test_decode_into_is_independent_of_workers_and_order(always_pool):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 9, 3), dtype=np.uint8) for _ in range(150)]
    items = [ImageItem(i, 0, f"img{i}", encode(Image.fromarray(a))) for i, a in enumerate(arrays)]
    serial = np.zeros((150, 8, 8, 3), np.uint8)
    parallel = np.zeros_like(serial)
    decode_into(serial, items, 150, DecodeSpec(8), workers=1, desc="t")
    decode_into(parallel, reversed(items), 150, DecodeSpec(8), workers=2, desc="t", batch_size=7)
    np.testing.assert_array_equal(serial, parallel)
    expected = np.asarray(Image.fromarray(arrays[37]).resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(serial[37], expected)


def test_training_view_is_decoded_alongside_in_the_pool_and_in_process(always_pool, tmp_path):
    """The training view (T x T) and original sizes come from the same decode, written by the workers into
    the memory-mapped files or by this process, identically; the stored view is unchanged."""
    from s2m2.data import PreparedWriter, open_split

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
              for h, w in rng.integers(5, 30, (40, 2))]
    items = [ImageItem(i, i % 2, f"img{i}", encode(Image.fromarray(a))) for i, a in enumerate(arrays)]
    spec = DecodeSpec(8, 3, train_size=12)
    with PreparedWriter(tmp_path / "p", dataset="t", source="t", source_layout="t", resolution=8,
                        train_resolution=12) as writer:
        out = writer.begin_split("base", num_images=40, height=8, width=8, channels=3, class_names=["a", "b"],
                                 train_size=12)
        decode_into(out.images, reversed(items), 40, spec, workers=2, desc="t", batch_size=3,
                    train_images=out.train_images, source_sizes=out.source_sizes)
        out.labels[:] = np.arange(40) % 2
        writer.end_split("base")
    pooled = open_split(tmp_path / "p", "base")
    images, train, sizes = (np.zeros((40, 8, 8, 3), np.uint8), np.zeros((40, 12, 12, 3), np.uint8),
                            np.zeros((40, 2), np.int32))
    decode_into(images, items, 40, spec, workers=1, desc="t", train_images=train, source_sizes=sizes)
    np.testing.assert_array_equal(pooled.images, images)
    np.testing.assert_array_equal(pooled.train_images, train)
    np.testing.assert_array_equal(pooled.source_sizes, sizes)
    assert sizes.tolist() == [list(a.shape[:2]) for a in arrays]
    for i in (0, 17):
        for size, got in ((8, images[i]), (12, train[i])):
            np.testing.assert_array_equal(got, np.asarray(Image.fromarray(arrays[i]).resize(
                (size, size), Image.Resampling.BILINEAR)))
    with pytest.raises(ValueError, match="train_size"):
        decode_into(images, items, 40, spec, workers=1, desc="t")


def test_train_resolution_rules():
    assert train_size_for(True, None) == DEFAULT_TRAIN_RESOLUTION == 160
    assert train_size_for(False, None) is None and train_size_for(True, 0) is None
    assert train_size_for(True, 224) == 224
    with pytest.raises(PrepareError, match="--train-resolution 5: expected 0"):
        train_size_for(True, 5)
    with pytest.raises(PrepareError, match="--train-resolution 96: this source is pre-shrunk"):
        train_size_for(False, 96)


def test_worker_error_propagates_with_the_name(always_pool):
    good = encode(Image.new("RGB", (4, 4)))
    items = [ImageItem(i, 0, f"ok{i}", good) for i in range(20)] + [ImageItem(20, 0, "bad-member.png", b"xx")]
    with pytest.raises(PrepareError, match="bad-member.png"):
        decode_into(np.zeros((21, 4, 4, 3), np.uint8), items, 21, DecodeSpec(4), workers=2, desc="t",
                    batch_size=4)


# -- sniffing archives and pickles -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mini-imagenet-cache-train.pkl", "cifar-100-python.tar.gz", "x.zip"])
def test_html_saved_under_a_data_name_is_recognised(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\n  " + HTML)
    with pytest.raises(PrepareError, match="this looks like an HTML page, probably a failed download"):
        check_not_html(path)
    opener = load_pickle if name.endswith(".pkl") else open_tar if ".tar" in name else open_zip
    with pytest.raises(PrepareError, match=f"{name}: this looks like an HTML page"):
        opener(path)


def test_truncated_pickle(tmp_path):
    path = tmp_path / "train_labels.pkl"
    data = pickle.dumps({"label_specific": np.arange(1000)}, protocol=2)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrepareError, match="train_labels.pkl: .*truncated"):
        load_pickle(path)


def test_truncated_tar_gz_is_reported_while_streaming(tmp_path):
    path = tmp_path / "data.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        payload = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
        for i in range(3):
            info = tarfile.TarInfo(f"d/file{i}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PrepareError, match="data.tar.gz: the archive is truncated or corrupt"):
        with open_tar(path) as tar:
            for _ in iter_tar_files(tar, path):
                pass


def test_truncated_zip(tmp_path):
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/b/c.png", b"x" * 5000)
    path.write_bytes(path.read_bytes()[:-60])  # central directory cut off
    with pytest.raises(PrepareError, match="images_background.zip: not a readable zip"):
        open_zip(path)


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_help_lists_every_dataset(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in ("mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100", "cub", "omniglot"):
        assert name in text


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli.main(["cub", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["omniglot", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no Omniglot source found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_fixes_the_dataset(tmp_path, capsys):
    from data_prep import omniglot

    assert omniglot.main(["--source", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no Omniglot source found" in capsys.readouterr().err


def test_out_may_not_replace_the_source(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    for out in (tmp_path / "src", tmp_path):
        with pytest.raises(cli.PrepareError, match="would replace the source"):
            cli.run("mini-imagenet", tmp_path / "src", out, overwrite=True)
    assert (tmp_path / "src" / "images").is_dir()
