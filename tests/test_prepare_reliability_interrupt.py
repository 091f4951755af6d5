"""Interrupting a real `python -m s2m2.cli prepare` with decoding workers (issue 10): Ctrl-C and SIGTERM end
it within seconds with one line, no temporary folder and no surviving worker; SIGKILL takes the workers
with it and the next run removes the temporary folder left behind.

The signal comes from the test hook S2M2_PREPARE_TEST_SIGNAL=SIG@N in data_prep.common.decode_into (sent
once N images are stored, i.e. mid-decode, with the worker pids written first): deterministic, no sleep
race. The source is a generated CUB_200_2011 folder whose 1,050-image base split goes through the process
pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import REPO
from data_prep.cli import INTERRUPTED
from data_prep.common import MIN_POOL_IMAGES
from s2m2.data import PreparedWriter
from test_prepare_cub import ALL_CLASSES, make_cub
from test_prepare_reliability import pid_state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, Linux signals")


@pytest.fixture(scope="module")
def cub_source(tmp_path_factory):
    """CUB_200_2011 with 3 base classes x 350 images: a split big enough for the process pool."""
    cub = make_cub(tmp_path_factory.mktemp("src"), classes=ALL_CLASSES[:6], per_class=350)
    assert 3 * 350 >= MIN_POOL_IMAGES
    return cub


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if pid_state(pid) not in (None, "Z")]


def prepare_with_signal(tmp_path: Path, source: Path,
                        signal_spec: str) -> tuple[subprocess.CompletedProcess, int, list[int]]:
    """Run `s2m2 prepare cub` (2 workers) in its own session with the test hook; -> (result, pid of the
    prepare process, pids of its workers)."""
    env = dict(os.environ, S2M2_PREPARE_TEST_SIGNAL=signal_spec,
               S2M2_PREPARE_TEST_PIDFILE=str(tmp_path / "pids"), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "s2m2.cli", "prepare", "cub", "--source", str(source),
               "--out", str(tmp_path / "out"), "--workers", "2"]
    # own session: the hook's SIGINT goes to the whole process group, like Ctrl-C in a terminal
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=90)  # a hang fails here (a normal run: ~10 s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        pytest.fail("`s2m2 prepare` hung after the signal")
    parent, *workers = map(int, (tmp_path / "pids").read_text().split())
    assert parent == process.pid and len(workers) == 2
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), parent, workers


@pytest.mark.parametrize("name, status", [("INT", 130), ("TERM", 143)])
def test_ctrl_c_and_sigterm_mid_decode(tmp_path, cub_source, name, status):
    result, _, workers = prepare_with_signal(tmp_path, cub_source, f"{name}@256")
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == INTERRUPTED
    assert alive(workers) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pids"]  # no out, no .out.tmp-*


def test_sigkill_takes_the_workers_and_the_next_run_cleans_up(tmp_path, cub_source):
    result, parent, workers = prepare_with_signal(tmp_path, cub_source, "KILL@256")
    assert result.returncode == -9
    deadline = time.monotonic() + 10
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(workers) == [], "worker processes outlived their killed parent"
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    assert [p.name.startswith(f".out.tmp-{parent}-") for p in leftovers] == [True]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with PreparedWriter(tmp_path / "out", dataset="t", source="t", source_layout="t", resolution=4) as w:
            w.begin_split("base", num_images=1, height=4, width=4, channels=1, class_names=["a"]).labels[:] = 0
            w.end_split("base")
    assert [str(r.message) for r in record] == [
        f"{leftovers[0]}: removed the temporary folder of a killed run (pid {parent})"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pids"]
