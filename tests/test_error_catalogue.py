"""The error catalogue: every bad input a user can give a command -> exit code, first stderr line, and
nothing written or deleted anywhere under the test's folder.

One row per case, one line per row: ``(argv, exit code, substring of the first stderr line)``, optionally a
4th element with environment variables (e.g. the Ctrl-C test hook, see ``s2m2.cli.interrupt_point``).
``argv`` is a shell-like string whose ``{placeholders}`` are filled from :func:`places`:

    {root}      the module's scratch folder (everything under it is compared before/after)
    {feats}     a valid features file (6 classes x 12 images, D=8)
    {base}      a second valid features file (for --center --base-features)
    {corrupt}   a file that is not a torch file; {other}: a torch file that is not a features file
    {data}      a prepared dataset (splits base: 4 classes, novel: 6 classes, 12 images each, 16 px)
    {ckpt}      a Conv-4 checkpoint in our format (trained "on base", eval transform 18 -> 16)
    {out}       an existing folder holding keep.txt (rows write their outputs below it)
    {readonly}  a folder without write permission (rows using it are skipped as root)

Rows run in-process through ``s2m2.cli.main`` (fast); a few behaviours that only a real process shows
(Ctrl-C from outside, ``python -m s2m2.cli``, the console script) have subprocess tests at the end.
Docs: docs/troubleshooting.md lists every message, its cause and what to do.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from s2m2.cli import main as cli
from test_features import write_checkpoint, write_features

REPO = Path(__file__).resolve().parents[1]
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
SIGINT_AT = "S2M2_TEST_SIGINT"


def marked(mark, *row):
    """A row that only runs where ``mark`` allows (e.g. NOT_ROOT, NO_CUDA)."""
    return pytest.param(row, marks=mark)


EVALUATE = "evaluate --features {feats} --queries 4 --episodes 20 --no-progress"
FEATURES = "features --checkpoint {ckpt} --data {data} --split novel --no-progress"
CROSS = "cross-domain --checkpoint {ckpt} --cub {data} --queries 4 --episodes 20 --no-progress"
TRAIN = "train --config {repo}/configs/omniglot/baseline.yaml --set data.root={data} --out {out}/run"

ROWS = [
    # s2m2 (any command)
    ("frobnicate", 2, "s2m2: error: unknown command 'frobnicate'; commands: prepare, train"),
    ("evalute --features {feats}", 2, "unknown command 'evalute'; did you mean 'evaluate'?"),
    # s2m2 evaluate: flags (checked before the features are read)
    (EVALUATE + " --threads -1", 2, "s2m2 evaluate: error: argument --threads: must be >= 1, got -1"),
    (EVALUATE + " --threads 0", 2, "argument --threads: must be >= 1, got 0"),
    (EVALUATE + " --C -1", 2, "argument --C: must be a finite number > 0"),
    (EVALUATE + " --C 0", 2, "argument --C: must be a finite number > 0 (the inverse L2 strength"),
    (EVALUATE + " --C nan", 2, "argument --C: must be a finite number > 0"),
    (EVALUATE + " --max-iter 0", 2, "argument --max-iter: must be >= 1 (0 iterations leave the classifier"),
    (EVALUATE + " --tol -1", 2, "argument --tol: must be a finite number >= 0"),
    (EVALUATE + " --cosine-epochs 0", 2, "argument --cosine-epochs: must be >= 1, got 0"),
    (EVALUATE + " --ways 1", 2, "argument --ways: must be >= 2 (a 1-way episode is always 100% correct)"),
    (EVALUATE + " --ways 0", 2, "argument --ways: must be >= 2"),
    (EVALUATE + " --shots 1 0", 2, "argument --shots: must be >= 1, got 0"),
    (EVALUATE + " --queries 0", 2, "argument --queries: must be >= 1 (or 'all'), got 0"),
    (EVALUATE + " --queries some", 2, "argument --queries: must be a positive integer or 'all', got 'some'"),
    (EVALUATE + " --episodes 0", 2, "argument --episodes: must be >= 1, got 0"),
    (EVALUATE + " --max-chunk-mb 0", 2, "argument --max-chunk-mb: must be a finite number > 0"),
    (EVALUATE + " --power 0", 2, "argument --power: must be a finite number > 0"),
    (EVALUATE + " --head svm", 2, "argument --head: invalid choice: 'svm'"),
    marked(NO_CUDA, EVALUATE + " --device cuda", 2, "argument --device: cuda: no CUDA GPU is available"),
    (EVALUATE + " --device cuda:99", 2, "argument --device: cuda:99: "),
    (EVALUATE + " --device banana", 2, "argument --device: unknown device 'banana'"),
    (EVALUATE + " --out {out}", 2, "argument --out: {out} is a directory"),
    (EVALUATE + " --out {feats}/r.json", 2, "argument --out: {feats} is a file, not a folder"),
    marked(NOT_ROOT, EVALUATE + " --out {readonly}/r.json", 2, "argument --out: cannot write in"),
    (EVALUATE + " --out {feats}", 2, "--out {feats} is the --features file"),
    (EVALUATE + " --center", 2, "--center needs --base-features FILE"),
    (EVALUATE + " --base-features {base}", 2, "--base-features is only used with --center"),
    ("evaluate --ways 5", 2, "the following arguments are required: --features"),
    # s2m2 evaluate: inputs (read, then refused)
    ("evaluate --features {root}/nope.pt --out {out}/r.json", 2, "nope.pt: features file not found"),
    ("evaluate --features {corrupt} --out {out}/r.json", 2, "corrupt.pt: cannot read features file"),
    ("evaluate --features {other} --out {out}/r.json", 2, "other.pt: not an s2m2 features file"),
    (EVALUATE + " --shots 5 --queries 10 --out {out}/r.json", 2, "5 shots + 10 queries need 15 images per class"),
    (EVALUATE + " --ways 7 --out {out}/r.json", 2, "7-way episodes need at least 7 classes; the labels have 6"),
    (EVALUATE + " --center --base-features {root}/nope.pt --out {out}/r.json", 2, "nope.pt: features file not found"),
    (EVALUATE + " --out {out}/r.json", 130, "s2m2 evaluate: interrupted; nothing written", {SIGINT_AT: "heads"}),
    # s2m2 features
    (FEATURES + " --out {out}/f.pt --batch-size 0", 2, "argument --batch-size: must be >= 1, got 0"),
    (FEATURES + " --out {out}/f.pt --resize 18", 2, "s2m2 features: error: give both --resize and --crop"),
    (FEATURES + " --out {out}/f.pt --resize 18 --crop 20", 2, "--crop 20 is larger than --resize 18"),
    (FEATURES + " --out {out}/f.pt --precision fp64", 2, "argument --precision: invalid choice: 'fp64'"),
    (FEATURES + " --out {out}/f.pt --device cuda:99", 2, "argument --device: cuda:99: "),
    (FEATURES + " --out {out}", 2, "argument --out: {out} is a directory"),
    (FEATURES + " --out {ckpt}", 2, "--out {ckpt} is the --checkpoint file"),
    ("features --checkpoint {root}/none.pt --data {data} --out {out}/f.pt", 2, "none.pt: checkpoint not found"),
    ("features --checkpoint {ckpt} --data {root} --out {out}/f.pt", 2, "is not a prepared dataset folder"),
    ("features --checkpoint {ckpt} --data {data} --split train --out {out}/f.pt", 2, "no split 'train'"),
    ("features --checkpoint {corrupt} --data {data} --out {out}/f.pt", 2, "s2m2 features: error: "),
    (FEATURES + " --out {out}/f.pt", 130, "s2m2 features: interrupted; nothing written", {SIGINT_AT: "features"}),
    # s2m2 cross-domain (shares evaluate's protocol and head flags, and features' extraction flags)
    (CROSS + " --ways 1", 2, "s2m2 cross-domain: error: argument --ways: must be >= 2"),
    (CROSS + " --C 0", 2, "argument --C: must be a finite number > 0"),
    (CROSS + " --threads -1", 2, "argument --threads: must be >= 1"),
    (CROSS + " --max-iter 0", 2, "argument --max-iter: must be >= 1"),
    (CROSS + " --cosine-epochs 0", 2, "argument --cosine-epochs: must be >= 1"),
    (CROSS + " --out {out}", 2, "argument --out: {out} is a directory"),
    (CROSS + " --features-out {out}", 2, "argument --features-out: {out} is a directory"),
    (CROSS + " --features-out {ckpt}", 2, "--features-out {ckpt} is the --checkpoint file"),
    (CROSS + " --out {out}/x --features-out {out}/x", 2, "--out and --features-out name the same file"),
    (CROSS + " --resize 36", 2, "give both --resize and --crop, or neither"),
    (CROSS + " --precision half", 2, "argument --precision: invalid choice: 'half'"),
    ("cross-domain --checkpoint {root}/none.pt --cub {data}", 2, "none.pt: checkpoint not found"),
    (CROSS + " --variant all100", 2, "--variant all100 contradicts the checkpoint"),
    ("cross-domain --checkpoint {ckpt} --cub {root}/nocub", 2, "is not a prepared dataset folder"),
    (CROSS + " --features-out {out}/f.pt --out {out}/r.json", 130, "s2m2 cross-domain: interrupted; nothing written",
     {SIGINT_AT: "features"}),
    # s2m2 prepare (the rest of its cases, with real interrupts and pickles: tests/test_prepare_reliability*.py)
    ("prepare omniglot --source {repo}/data_prep/demo --out {out} --overwrite", 2,
     "error: {out} is not a prepared dataset (no s2m2 meta.json); --overwrite only replaces a folder made by"),
    ("prepare omniglot --source {repo}/data_prep/demo --out {feats} --overwrite", 2, "error: {feats} is not a folder"),
    ("prepare omniglot --source {repo}/data_prep/demo --out {feats}/sub", 2, "cannot write the prepared folder here"),
    ("prepare omniglot --source {repo}/data_prep/demo --out {out}/new --workers 0", 2,
     "error: --workers 0: expected at least 1 decoding process"),
    ("prepare nodata --source {root} --out {out}/new", 2, "s2m2 prepare: error: argument DATASET: invalid choice: 'nodata'"),
    ("prepare omniglot --source {root}", 2, "s2m2 prepare: error: the following arguments are required: --out"),
    ("prepare omniglot --source {repo}/data_prep/demo --out {out}/new --train-resolution 96", 2,
     "error: --train-resolution applies to full-resolution sources (mini-imagenet, tiered-imagenet, cub)"),
    ("prepare cub --source {root} --out {out}/new --train-resolution 16", 2,
     "error: --train-resolution 16: expected 0 (no training view) or a size between 32 and 1024 pixels"),
    ("prepare omniglot --source {root}/nosrc --out {out}/new", 2, "error: {root}/nosrc: no such file or folder (--source)"),
    ("prepare cifar-fs --source {corrupt} --out {out}/new", 2, "error: {corrupt}: not a readable tar archive"),
    # s2m2 train: every config value is checked before any data is read or any epoch runs
    (TRAIN + " --set schedule.epochs=null", 2, "s2m2 train: error: schedule.epochs (from --set schedule.epochs=null): must be set"),
    (TRAIN + " --set schedule.epochs=true", 2, "schedule.epochs (from --set schedule.epochs=true): expected a number, got True"),
    (TRAIN + " --set schedule.epochs=ten", 2, "schedule.epochs (from --set schedule.epochs=ten): expected an integer"),
    (TRAIN + " --set optim.lr=-1", 2, "s2m2 train: error: optim.lr must be > 0, got -1.0"),
    (TRAIN + " --set model.backbone=foo", 2, "model.backbone 'foo' is not one of"),
    (TRAIN + " --set validation.head=svm", 2, "validation.head 'svm' is not one of ['logreg', 'cosine', 'ncm']"),
    (TRAIN + " --set validation.ways=1", 2, "validation.ways must be >= 2"),
    (TRAIN + " --set optim.lrr=1", 2, "unknown key(s) ['optim.lrr']"),
    (TRAIN + " --set schedule.budget_minutes=-5", 2, "schedule.budget_minutes must be > 0"),
    (TRAIN + " --set data.train_splits=[base,val]", 2, "data.val_split='val' is also in data.train_splits"),
    (TRAIN + " --set data.eval_resize=20", 2, "data.eval_resize=20 is smaller than the evaluation crop 28 (data.eval_crop, else data.crop_size)"),
    ("train --out {out}/run", 2, "s2m2 train: error: the following arguments are required: --config (see s2m2 train --help)"),
    ("train --config {root}/none.yaml --out {out}/run", 2, "s2m2 train: error: config file {root}/none.yaml does not exist"),
    ("train --config {repo}/configs/omniglot/baseline.yaml --set data.root={root}/nodata --out {out}/run", 2,
     "s2m2 train: error: {root}/nodata is not a prepared dataset folder (no meta.json)"),
]


def _write_prepared(root: Path) -> Path:
    """A prepared dataset: base 4 classes, novel 6 classes, 12 images each, 16x16 RGB (class-coloured)."""
    from s2m2.data import PreparedWriter

    rng = np.random.default_rng(0)
    with PreparedWriter(root, dataset="synthetic", source="synthetic", source_layout="synthetic",
                        resolution=16) as writer:
        for split, classes in (("base", 4), ("novel", 6)):
            w = writer.begin_split(split, num_images=classes * 12, height=16, width=16, channels=3,
                                   class_names=[f"{split}_{c}" for c in range(classes)])
            for i in range(classes * 12):
                w.images[i] = np.clip(rng.normal(40 * (i // 12) + 20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                w.labels[i] = i // 12
            writer.end_split(split)
    return root


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("catalogue")
    write_features(root / "feats.pt", classes=6, per_class=12, dim=8)
    write_features(root / "base.pt", classes=4, per_class=12, dim=8, seed=1)
    (root / "corrupt.pt").write_bytes(b"truncated, not a torch file")
    torch.save({"state": {}}, root / "other.pt")
    write_checkpoint(root / "model.pt", kwargs={"width": 8}, crop=16, resize=18)
    data = _write_prepared(root / "data")
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("a user's file\n")
    (root / "readonly").mkdir(mode=0o555)
    return {"root": str(root), "feats": str(root / "feats.pt"), "base": str(root / "base.pt"),
            "corrupt": str(root / "corrupt.pt"), "other": str(root / "other.pt"), "ckpt": str(root / "model.pt"),
            "data": str(data), "out": str(root / "out"), "readonly": str(root / "readonly"), "repo": str(REPO)}


def snapshot(root: str) -> dict[str, tuple]:
    """Every path under ``root`` with (is_dir, size, mtime_ns): equal snapshots = nothing written/deleted."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (os.path.isdir(path), st.st_size if name in filenames else 0,
                                                st.st_mtime_ns if name in filenames else 0)
    return out


def run_in_process(argv: list[str]) -> int:
    """``s2m2 ARGV`` in this process: the exit status, whether returned or raised by argparse."""
    try:
        return cli(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # escaped the command (a bug): fail this row, not the whole pytest session
        return -int(signal.SIGINT)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row[0].split(" --no-progress")[-1].strip() or row[0])
def test_catalogue(row, places, capsys, monkeypatch):
    argv_text, code, first_line, env = (*row, {})[:4]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = shlex.split(argv_text.format(**places))
    before = snapshot(places["root"])
    got = run_in_process(argv)
    printed = capsys.readouterr()
    err = printed.err
    lines = err.splitlines()
    assert got == code, err
    assert lines and first_line.format(**places) in lines[0], err
    if code in (2, 130):
        assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    if code == 2:  # refused before any result was computed (and then lost): nothing on stdout either
        assert printed.out == "", printed.out
    assert snapshot(places["root"]) == before, "the command wrote or deleted something"


# ------------------------------------------------------------------------------------------------
# Real processes: Ctrl-C from outside, python -m s2m2.cli, the console script
# ------------------------------------------------------------------------------------------------
def test_ctrl_c_from_outside_gives_one_line_and_exit_130(places, tmp_path):
    """Like a terminal's Ctrl-C: SIGINT to the process group of ``python -m s2m2.cli evaluate`` while its
    heads run (the test hook parks it there and says so; no sleep race), then: one line, 130, no output."""
    ready = tmp_path / "ready"
    env = {**os.environ, SIGINT_AT: "heads:wait", "S2M2_TEST_READY": str(ready)}
    out = Path(places["out"]) / "r.json"
    before = snapshot(places["root"])
    proc = subprocess.Popen([sys.executable, "-m", "s2m2.cli", *shlex.split(EVALUATE.format(**places)),
                             "--out", str(out)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never reached its heads"
            time.sleep(0.05)
        assert int(ready.read_text()) == proc.pid
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert stderr == "s2m2 evaluate: interrupted; nothing written\n"
    assert snapshot(places["root"]) == before


def test_console_script_bad_flag_is_one_line(places):
    script = Path(sys.executable).with_name("s2m2")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run([str(script), *shlex.split(EVALUATE.format(**places)), "--C", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "s2m2 evaluate: error: argument --C: must be a finite number > 0 (the inverse L2 strength: C=0 ignores "
        "the data, chance accuracy), got 0 (see s2m2 evaluate --help)"]
