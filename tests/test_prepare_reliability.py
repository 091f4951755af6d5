"""`s2m2 prepare` reliability (issue 10): restricted unpickling, --overwrite that never deletes a user's
folder, stale temporary folders, folder modes, the real images_per_class minimum, CUB images.txt, the Ravi
train/val/test/<wnid>/ layout, an in-process Ctrl-C of the decoding pool, and one-line errors with exit 2.
(Interrupting a real `s2m2 prepare` subprocess: test_prepare_reliability_interrupt.py.)"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from data_prep import cli
from data_prep.common import (DecodeSpec, ImageItem, PrepareError, RefusedPickleError, decode_into,
                              load_pickle, restricted_loads)
from data_prep.mini_imagenet import load_ravi_split
from s2m2.data import PreparedWriter, load_meta, open_split
from test_prepare_cub import ALL_CLASSES, make_cub, make_tgz

RAVI = load_ravi_split()


def write_dataset(out, per_class=(3, 5), overwrite=False):
    """A tiny prepared folder written through PreparedWriter (one split, classes of the given sizes)."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    with PreparedWriter(out, dataset="t", source="t", source_layout="t", resolution=4,
                        overwrite=overwrite) as writer:
        split = writer.begin_split("base", num_images=len(labels), height=4, width=4, channels=1,
                                   class_names=[f"c{i}" for i in range(len(per_class))])
        split.images[:] = 7
        split.labels[:] = labels
        writer.end_split("base")
    return out


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def run_cli(argv, capsys):
    """-> (exit status, stderr lines) of data_prep.cli.main."""
    status = cli.main(argv)
    return status, capsys.readouterr().err.strip().splitlines()


# -- restricted unpickler ------------------------------------------------------------------------------
class Evil:
    """Unpickling this runs ``os.system(command)``: what a malicious mirror would ship."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvilEval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("make_evil, refused", [(Evil, r"posix\.system"), (EvilEval, r"(builtins|__builtin__)\.eval")])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, make_evil, refused, protocol):
    marker = tmp_path / "pwned"
    payload = (f"touch {marker}" if make_evil is Evil
               else f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": make_evil(payload), "class_dict": {}}, protocol=protocol))
    with pytest.raises(RefusedPickleError, match=rf"{path}: refused to load: the pickle asks for {refused}"):
        load_pickle(path)
    assert not marker.exists()


def test_malicious_cifar_batch_is_refused_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8)}, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps(Evil(f"touch {marker}"), protocol=2))
    status, err = run_cli(["cifar-fs", "--source", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"error: {folder}/meta: refused to load") and "posix.system" in err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def legitimate_data():
    return {"image_data": np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3) % 251,
            "class_dict": {"n01532829": [np.int64(0), 1], b"n01558993": list(range(3))},
            "labels": np.array([1.5, -2.0]), "png": [b"\x89PNG...", np.frombuffer(b"abc", np.uint8)],
            "objects": np.array([b"x", "y", None], dtype=object), "meta": ("t", 3, 2.5, None, True)}


def assert_same(a, b):
    if isinstance(a, dict):
        assert sorted(map(repr, a)) == sorted(map(repr, b))
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy2_pickles_still_load(protocol):
    data = legitimate_data()
    assert_same(restricted_loads(pickle.dumps(data, protocol=protocol), "x.pkl"), data)


@pytest.mark.parametrize("protocol", [0, 2])
def test_numpy1_era_pickles_referencing_numpy_core_still_load(protocol):
    """The real mirrors' pickles were written by NumPy 1.x: their globals are ``numpy.core.multiarray``."""
    data = legitimate_data()
    raw = pickle.dumps(data, protocol=protocol)
    assert b"numpy._core.multiarray" in raw
    old = raw.replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray\n_reconstruct" in old
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # and no NumPy-2 numpy.core deprecation noise
        assert_same(restricted_loads(old, "old.pkl"), data)


# -- images_per_class, modes -------------------------------------------------------------------------
def test_images_per_class_min_is_the_real_minimum(tmp_path):
    out = write_dataset(tmp_path / "d", per_class=(3, 5, 4))
    assert load_meta(out)["splits"]["base"]["images_per_class"] == {"min": 3, "max": 5}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_prepared_folder_modes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = write_dataset(tmp_path / "d")
    finally:
        os.umask(previous)
    for path in [out, *out.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, path
    assert not (out / ".owner").exists()


# -- --overwrite ---------------------------------------------------------------------------------------
def test_overwrite_refuses_a_users_folder(tmp_path, capsys):
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "notes.txt").write_text("precious")
    (tmp_path / "src").mkdir()
    status, err = run_cli(["omniglot", "--source", str(tmp_path / "src"), "--out", str(user), "--overwrite"],
                          capsys)
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"error: {user} is not a prepared dataset")
    with pytest.raises(Exception, match="is not a prepared dataset"):  # the writer itself refuses too
        write_dataset(user, overwrite=True)
    (user / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(Exception, match="is not a prepared dataset"):
        write_dataset(user, overwrite=True)
    assert (user / "sub" / "notes.txt").read_text() == "precious"
    assert listing(tmp_path) == ["mine", "src"]


def test_overwrite_refuses_a_regular_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("data")
    status, err = run_cli(["omniglot", "--source", str(tmp_path), "--out", str(target), "--overwrite"], capsys)
    assert status == 2 and err == [f"error: {target} is not a folder; --overwrite only replaces a folder made "
                                   f"by `s2m2 prepare`; choose another --out"]
    with pytest.raises(Exception, match="is not a folder"):
        write_dataset(target, overwrite=True)
    assert target.read_text() == "data" and listing(tmp_path) == ["file"]


def test_overwrite_replaces_a_prepared_folder_and_leaves_nothing_behind(tmp_path):
    out = write_dataset(tmp_path / "d", per_class=(3, 5))
    write_dataset(out, per_class=(2, 2, 2), overwrite=True)
    assert load_meta(out)["splits"]["base"]["num_classes"] == 3
    assert listing(tmp_path) == ["d"]


# -- leftovers of killed runs ----------------------------------------------------------------------------
def test_leftovers_of_killed_runs_are_removed_or_reported(tmp_path):
    out = tmp_path / "d"
    host = os.uname().nodename
    dead = tmp_path / f".d.tmp-{dead_pid()}-abc"
    (dead / "base").mkdir(parents=True)
    (dead / ".owner").write_text(f"{host} {dead_pid()}\n")
    running = tmp_path / f".d.tmp-{os.getpid()}-xyz"
    running.mkdir()
    (running / ".owner").write_text(f"{host} {os.getpid()}\n")
    unknown = tmp_path / ".d.tmp-k2j3h4"  # made by a version that did not record its owner
    unknown.mkdir()
    moved_aside = tmp_path / f".d.old-{dead_pid()}"  # killed between the two renames: the only copy
    write_dataset(moved_aside)
    with pytest.warns(UserWarning) as record:
        write_dataset(out)
    messages = [str(w.message) for w in record]
    assert any(m.startswith(f"{dead}: removed the temporary folder of a killed run") for m in messages)
    assert any(m.startswith(f"{running}: temporary folder of another `s2m2 prepare` (pid {os.getpid()}")
               for m in messages)
    assert any(m.startswith(f"{unknown}: temporary folder of another `s2m2 prepare` (unknown run)")
               for m in messages)
    assert any(m.startswith(f"{moved_aside}: the dataset a killed --overwrite run had moved aside")
               for m in messages)
    assert not dead.exists() and running.is_dir() and unknown.is_dir() and moved_aside.is_dir()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        write_dataset(out, overwrite=True)  # now that d exists, the moved-aside copy is stale
    assert any(str(w.message).startswith(f"{moved_aside}: removed the temporary folder of a killed run")
               for w in record)
    assert not moved_aside.exists()


# -- unwritable --out ----------------------------------------------------------------------------------
def test_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    cub = make_cub(tmp_path / "src")
    (tmp_path / "afile").write_text("x")
    status, err = run_cli(["cub", "--source", str(cub), "--out", str(tmp_path / "afile" / "o")], capsys)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {tmp_path / 'afile'}: cannot write the prepared folder here")


def test_unwritable_out_parent_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr("tempfile.mkdtemp", denied)  # root ignores a read-only mode, so simulate EACCES
    cub = make_cub(tmp_path / "src")
    status, err = run_cli(["cub", "--source", str(cub), "--out", str(tmp_path / "ro" / "o")], capsys)
    assert status == 2 and err == [f"error: {tmp_path / 'ro'}: cannot write the prepared folder here "
                                   f"(Permission denied); choose an --out in a writable folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_out_parent_is_one_line(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    status, err = run_cli(["cub", "--source", str(make_cub(tmp_path / "src")), "--out", str(parent / "o")],
                          capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {parent}: cannot write")


# -- CUB images.txt ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:split:UserWarning")
@pytest.mark.parametrize("as_tgz", [False, True])
def test_cub_prepares_only_the_images_listed(tmp_path, as_tgz):
    cub = make_cub(tmp_path / "src")
    original = sorted((cub / "images" / ALL_CLASSES[0]).iterdir())[0]
    shutil.copy(original, original.with_name(original.stem + "_rgb.jpg"))  # a near-duplicate, unlisted
    source = make_tgz(cub, tmp_path / "CUB_200_2011.tgz") if as_tgz else cub
    with pytest.warns(UserWarning, match=r"1 image file\(s\) in images/ are not listed in images.txt"):
        cli.run("cub", source, tmp_path / "out", resolution=16)
    base = open_split(tmp_path / "out", "base")
    assert len(base) == 3 * 2  # 3 base classes x the 2 listed images each
    assert any("not listed in images.txt" in w and "_rgb.jpg" in w for w in load_meta(tmp_path / "out")["warnings"])


@pytest.mark.parametrize("as_tgz", [False, True])
def test_cub_missing_listed_image_is_an_error_even_when_an_extra_file_hides_it(tmp_path, as_tgz):
    cub = make_cub(tmp_path / "src")
    missing = sorted((cub / "images" / ALL_CLASSES[2]).iterdir())[1]
    shutil.move(missing, missing.with_name("renamed.jpg"))  # same count, one listed file gone
    source = make_tgz(cub, tmp_path / "CUB_200_2011.tgz") if as_tgz else cub
    rel = f"{ALL_CLASSES[2]}/{missing.name}"
    where = f"{source}:CUB_200_2011/images/{rel}" if as_tgz else str(missing)
    with pytest.raises(PrepareError, match=rf"{where}: listed in .*images.txt but missing"):
        cli.run("cub", source, tmp_path / "out", resolution=16)
    assert listing(tmp_path) == (["CUB_200_2011.tgz", "src"] if as_tgz else ["src"])


def test_cub_without_images_txt_is_an_error(tmp_path):
    cub = make_cub(tmp_path / "src")
    (cub / "images.txt").unlink()
    with pytest.raises(PrepareError, match=f"{cub / 'images.txt'}: missing"):
        cli.run("cub", cub, tmp_path / "out")


# -- mini-ImageNet train/val/test/<wnid>/ of Ravi-named JPEGs ---------------------------------------------
def make_ravi_sources(root, classes_per_split=2, per_class=3):
    """The same generated images as a flat Ravi images/ folder and as train|val|test/<wnid>/ folders."""
    rng = np.random.default_rng(0)
    folder_of = {"base": "train", "val": "val", "novel": "test"}
    for split, rows in RAVI.rows.items():
        for wnid in RAVI.classes[split][:classes_per_split]:
            names = [name for name, w in rows if w == wnid][:per_class]
            for name in names:
                data = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(data, "JPEG")
                for path in (root / "flat" / "images" / name, root / "tree" / folder_of[split] / wnid / name):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data.getvalue())
    return root / "flat", root / "tree"


@pytest.mark.filterwarnings("ignore:split:UserWarning")
def test_ravi_named_images_in_split_folders_prepare_like_the_flat_layout(tmp_path):
    flat, tree = make_ravi_sources(tmp_path)
    cli.run("mini-imagenet", flat, tmp_path / "a", workers=1)
    cli.run("mini-imagenet", tree, tmp_path / "b", workers=1)
    assert load_meta(tmp_path / "b")["source_layout"] == "ravi-folders"
    for split in ("base", "val", "novel"):
        a, b = open_split(tmp_path / "a", split), open_split(tmp_path / "b", split)
        assert a.class_ids == b.class_ids == RAVI.classes[split][:2] and len(b) == 6
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_ravi_named_image_in_the_wrong_split_folder_is_an_error(tmp_path):
    _, tree = make_ravi_sources(tmp_path)
    wnid = RAVI.classes["novel"][0]
    (tree / "test" / wnid).rename(tree / "val" / wnid)
    with pytest.raises(PrepareError, match=rf"val/{wnid}/{wnid}\d{{8}}\.jpg: the Ravi split puts this image "
                                           rf"in test/{wnid}/"):
        cli.run("mini-imagenet", tree, tmp_path / "out", workers=1)


def test_unknown_names_in_an_ilsvrc_tree_hint_at_the_ravi_layouts(tmp_path):
    for split in ("base", "val", "novel"):
        folder = tmp_path / "train" / RAVI.classes[split][0]
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "photo.jpg")
    with pytest.raises(PrepareError, match="not an ILSVRC train image name.*for Ravi-named images"):
        cli.run("mini-imagenet", tmp_path, tmp_path / "out", workers=1)


# -- Ctrl-C of the decoding pool (in-process), one-line errors -------------------------------------------------
def pid_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (None when gone; "Z" = exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_in_the_decoding_pool_ends_every_worker(tmp_path, monkeypatch):
    monkeypatch.setattr("data_prep.common.MIN_POOL_IMAGES", 0)
    monkeypatch.setenv("S2M2_PREPARE_TEST_SIGNAL", "INT@64")
    monkeypatch.setenv("S2M2_PREPARE_TEST_PIDFILE", str(tmp_path / "pids"))
    monkeypatch.setattr(os, "getpgrp", lambda: -1)  # never signal pytest's whole process group
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, "PNG")
    items = [ImageItem(i, 0, f"i{i}", png.getvalue()) for i in range(2000)]
    with pytest.raises(KeyboardInterrupt):
        decode_into(np.zeros((2000, 8, 8, 3), np.uint8), items, 2000, DecodeSpec(8), workers=2, desc="t",
                    batch_size=16)
    _, *workers = map(int, (tmp_path / "pids").read_text().split())
    assert len(workers) == 2
    assert all(pid_state(pid) in (None, "Z") for pid in workers)


def test_keyboard_interrupt_in_main_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    try:
        status, err = run_cli(["omniglot", "--source", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped data_prep.cli.main")
    assert status == 130 and err == [cli.INTERRUPTED]


def test_bad_workers_is_one_line(tmp_path, capsys):
    status, err = run_cli(["cub", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"],
                          capsys)
    assert status == 2 and err == ["error: --workers 0: expected at least 1 decoding process"]
