"""DDP: a 2-process gloo run (``python -m torch.distributed.run --nproc_per_node 2`` on CPU) matches a
single-process run with the same global batch.

Why the comparison is meaningful: under DDP each rank computes the mean loss of its half of the global
batch and DDP averages the gradients, which equals the gradient of the global batch's mean loss -- as long
as every sample's loss depends on that sample alone. BatchNorm breaks that (per-rank batch statistics;
SyncBatchNorm is CUDA-only) and so do per-rank random draws (augmentation, mixup permutations). So the test
trains the ``rotation`` method (classifier + rotation head, no random draws) with augmentation off on a
BatchNorm-free backbone registered by a small launcher script, and compares all parameters after 6 steps.
It then resumes the DDP run into S2M2_R phase 2 (per-rank mixup; not comparable, but it must run: the
mixup pass leaves the rotation head unused, which DDP must tolerate).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

LAUNCHER = textwrap.dedent('''
    import sys
    from torch import nn
    from s2m2.models import register_backbone
    from s2m2.models.base import Backbone


    class NoNormNet(Backbone):
        """conv / ReLU / avg-pool stages, no BatchNorm: every sample's output depends on it alone."""

        def __init__(self, width: int = 8):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.stages = nn.ModuleList(
                [nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.AvgPool2d(2)) for _ in range(2)])
            self.tail = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.feature_dim = width


    register_backbone("test_nonorm")(NoNormNet)

    from s2m2.train import main
    sys.exit(main(sys.argv[1:]))
''')

CONFIG = textwrap.dedent('''
    data: {{root: {root}, crop_size: 16, eval_resize: 16, augment: false}}
    model: {{backbone: test_nonorm, backbone_kwargs: {{width: 8}}}}
    method: {{name: s2m2_r}}
    schedule: {{phase1_epochs: 2, epochs: 1, batch_size: 32, seed: 3}}
    validation: {{queries: 5, episodes: 20, head: ncm}}
    runtime: {{progress: false, tensorboard: false, log_every: 1}}
''')


def _run(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_two_process_gloo_ddp_matches_single_process(make_prepared, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    root = make_prepared(splits={"base": 6, "val": 5}, per_class=16, size=16)  # 96 images = 3 global batches
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    config = tmp_path / "ddp.yaml"
    config.write_text(CONFIG.format(root=root))
    common = [str(launcher), "--config", str(config), "--set", "schedule.max_steps=6"]

    _run([sys.executable, *common, "--out", str(tmp_path / "single")], tmp_path)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*ddp, *common, "--out", str(tmp_path / "ddp")], tmp_path)

    single = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    multi = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert single["step"] == multi["step"] == 6 and single["epoch"] == multi["epoch"] == 2
    assert set(single["state"]) == {"backbone", "classifier", "ss_head"}
    for part, state in single["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(multi["state"][part][key], value, atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"{part}.{key}: {m}")
    # losses of the global batch: the epoch means agree; validation ran identically on both ranks
    for a, b in zip(single["history"], multi["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert abs(a["val_acc"] - b["val_acc"]) < 1.0
    # only rank 0 logs: one "start" record
    log = (tmp_path / "ddp" / "log.jsonl").read_text()
    assert log.count('"type": "start"') == 1

    # resume the DDP run into phase 2 (S2M2_R: mixup pass + rotation pass, unused-parameter handling)
    _run([*ddp, str(launcher), "--config", str(config), "--resume", "auto", "--out", str(tmp_path / "ddp")], tmp_path)
    final = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert final["phase"] == "phase2" and final["epoch"] == 3 and final["step"] == 9
    assert all(torch.isfinite(v).all() for v in final["state"]["ss_head"].values())
