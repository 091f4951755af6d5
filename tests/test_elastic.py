"""Elastic restart and multi-node rendezvous under torchrun, on CPU with gloo.

One uninterrupted 2-process run (``torchrun --standalone --nproc_per_node 2``) is the reference; then

* elastic: the same command with ``--max-restarts 1``, where rank 1 SIGKILLs itself in the middle of the
  second epoch (phase 2, S2M2_R) of the first attempt (``tests/_elastic_worker.py``). torchrun restarts the
  group; the new workers see TORCHELASTIC_RESTART_COUNT=1 and resume from OUT/last.pt by themselves (no
  --resume on the command line). The final weights and Adam state must be bit-identical to the reference:
  every step's draws are functions of (seed, epoch, step, rank), so re-running the half-done epoch from its
  start reproduces it exactly.
* multi-node: the command of docs/training.md's multi-node section (two ``torchrun --nnodes 2`` launchers
  meeting at a c10d rendezvous on localhost:PORT), one process each, must give the reference's weights bit
  for bit too (same world size, same gloo all-reduce).

The run: Conv-4 (width 8, BatchNorm per rank, the same in both runs) on 16 px images, 96 images = 3
global batches of 32 per epoch, 1 rotation epoch + 1 S2M2_R epoch = 6 steps.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from _elastic_worker import THREADS_LINE

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_elastic_worker.py"

CONFIG = textwrap.dedent('''
    data: {{root: {root}, crop_size: 16, eval_resize: 16}}
    model: {{backbone: conv4, backbone_kwargs: {{width: 8}}}}
    method: {{name: s2m2_r}}
    schedule: {{phase1_epochs: 1, epochs: 1, batch_size: 32, seed: 5}}
    validation: {{enabled: false}}
    runtime: {{progress: false, tensorboard: false, log_every: 1, prefetch: false}}
''')

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this build")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "S2M2_TEST_"))}
    # The torchrun agent shares its rendezvous TCPStore with the workers by default and keeps it across
    # restarts, with no per-attempt key prefix: a restarted worker can read the dead attempt's gloo/NCCL
    # addresses and fail to connect ("Connection refused"), pytorch/pytorch#135712 / #167288. Opting out
    # gives every attempt a fresh store; docs/training.md tells users the same.
    env.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)
    return env


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run"]


def _check(result: subprocess.CompletedProcess | tuple, args) -> None:
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_state(reference: dict, other: dict) -> None:
    """Bit-exact: every parameter/buffer and every Adam moment ``torch.equal``."""
    assert (other["step"], other["epoch"], other["phase"]) == (reference["step"], reference["epoch"],
                                                               reference["phase"])
    for part, state in reference["state"].items():
        for key, value in state.items():
            assert torch.equal(other["state"][part][key], value), f"{part}.{key} differs"
    ref_opt, opt = reference["optimizer"]["state"], other["optimizer"]["state"]
    assert ref_opt.keys() == opt.keys()
    for index, moments in ref_opt.items():
        for name, value in moments.items():
            assert torch.equal(opt[index][name], value), f"Adam state {index}.{name} differs"


def _make_data(out: Path, classes: int = 6, per_class: int = 16, size: int = 16) -> Path:
    """A prepared ``base`` split of random uint8 images (module-scoped, so not conftest's ``make_prepared``)."""
    import numpy as np
    from s2m2.data import PreparedWriter

    rng = np.random.default_rng(0)
    n = classes * per_class
    with PreparedWriter(out, dataset="elastic", source="synthetic", source_layout="synthetic",
                        resolution=size) as writer:
        split = writer.begin_split("base", num_images=n, height=size, width=size, channels=3,
                                   class_names=[str(c) for c in range(classes)])
        split.images[:] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        split.labels[:] = np.arange(n) // per_class
        writer.end_split("base")
    return out


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a torchrun launcher in its own session: whatever happens (timeout, failure), the
    launcher's whole process group is killed afterwards, so no worker outlives the test."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            _kill_group(proc)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process run: (config path, its last.pt payload)."""
    tmp = tmp_path_factory.mktemp("elastic")
    root = _make_data(tmp / "data")
    config = tmp / "run.yaml"
    config.write_text(CONFIG.format(root=root))
    args = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "s2m2.cli", "train",
            "--config", str(config), "--out", str(tmp / "reference")]
    _check(_run(args, cwd=tmp, env=_env()), args)
    payload = torch.load(tmp / "reference" / "last.pt", weights_only=True)
    assert (payload["step"], payload["epoch"], payload["phase"]) == (6, 2, "phase2")
    return config, payload


def test_elastic_restart_after_sigkill_resumes_bit_exact(reference, tmp_path):
    config, expected = reference
    out, marker = tmp_path / "elastic", tmp_path / "killed"
    # Kill rank 1 before global step 5: the middle of epoch 2 (steps 4-6); last.pt then holds epoch 1.
    env = _env(S2M2_TEST_KILL_AT_STEP="5", S2M2_TEST_KILL_RANK="1", S2M2_TEST_KILL_MARKER=str(marker))
    args = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "--monitor-interval",
            "0.2", str(WORKER), "--config", str(config), "--out", str(out)]
    result = _run(args, cwd=tmp_path, env=env)
    _check(result, args)
    # The restarted workers freed their process group inside s2m2.train.main: no gloo thread is left to
    # race the interpreter's shutdown (which aborted finished workers before; s2m2.train._end_distributed).
    thread_lines = [line.split(THREADS_LINE, 1)[1] for line in result.stderr.splitlines() if THREADS_LINE in line]
    if sys.platform.startswith("linux"):
        assert len(thread_lines) == 2, f"expected one thread report per restarted worker:\n{result.stderr[-3000:]}"
        for names in thread_lines:
            assert "gloo" not in names, f"gloo threads still alive after s2m2.train.main returned: {names}"

    assert marker.read_text().startswith("rank 1 killed before step 5"), "the worker was not killed"
    assert "resuming from OUT/last.pt (as --resume auto)" in result.stderr
    # The log is that of ONE run continued: a start, then a resume at the end of epoch 1 (step 3); the
    # killed attempt's records after step 3 were dropped on resume.
    records = [line for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    kinds = [re.search(r'"type": "(\w+)"', line).group(1) for line in records]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1
    resume = next(line for line in records if '"type": "resume"' in line)
    assert '"step": 3' in resume
    assert [int(re.search(r'"step": (\d+)', r).group(1)) for r in records if '"type": "step"' in r] == \
        [1, 2, 3, 4, 5, 6]

    _assert_same_state(expected, torch.load(out / "last.pt", weights_only=True))


def _docs_multinode_command() -> str:
    """The multi-node torchrun command of docs/training.md (the block after the marker comment)."""
    text = (REPO / "docs" / "training.md").read_text()
    block = re.search(r"<!-- tested: tests/test_elastic.py multi-node -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "docs/training.md lost its tested multi-node command block"
    lines = [line.split("#", 1)[0].rstrip() for line in block.group(1).splitlines()]
    command = " ".join(line.rstrip("\\").strip() for line in lines if line.strip())
    assert "torchrun " in command, command
    return command


def _launch_two_nodes(command: str, config, out, tmp_path) -> list[tuple[int, str, str]]:
    """The docs' multi-node command as two launchers on localhost (1 process each): [(rc, stdout, stderr)]."""
    # The docs' command, with this machine's values: both "nodes" are launchers on localhost, 1 process each.
    port, run_id = _free_port(), f"s2m2-test-{uuid.uuid4().hex[:8]}"
    values = {"--nproc_per_node": "1", "--rdzv_endpoint": f"localhost:{port}", "--rdzv_id": run_id,
              "--config": str(config), "--out": str(out)}
    args = shlex.split(command)
    env = _env()
    while "=" in args[0]:  # leading VAR=value assignments of the documented command
        name, value = args.pop(0).split("=", 1)
        env[name] = value
    for i, arg in enumerate(args[:-1]):
        if arg in values:
            args[i + 1] = values.pop(arg)
    assert not values, f"the docs' command has no {sorted(values)}"
    assert args[:3] == ["torchrun", "--nnodes", "2"] and "--rdzv_backend" in args and \
        args[args.index("--rdzv_backend") + 1] == "c10d"
    args = [*_torchrun(), *args[1:]]
    launchers = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True) for _ in range(2)]
    results = []
    try:
        for p in launchers:
            try:
                stdout, stderr = p.communicate(timeout=150)
            except subprocess.TimeoutExpired:
                stdout, stderr = "", "(launcher timed out)"
            results.append((p.returncode, stdout, stderr))
    finally:
        for p in launchers:
            _kill_group(p)
    return results


def test_two_launcher_rendezvous_matches_single_node(reference, tmp_path):
    config, expected = reference
    command = _docs_multinode_command()
    out = tmp_path / "multinode"
    results = _launch_two_nodes(command, config, out, tmp_path)
    for rc, stdout, stderr in results:
        assert rc == 0, f"{command} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    log = (out / "log.jsonl").read_text()
    assert '"world_size": 2' in log and log.count('"type": "start"') == 1

    _assert_same_state(expected, torch.load(out / "last.pt", weights_only=True))
