"""`s2m2 train` runs every method end to end on the real prepared Omniglot and CIFAR-FS data (from
../shared) with a small backbone on CPU, and a CIFAR-FS-trained backbone goes through the cross-domain
evaluation on the real CUB sample. Skipped when ../shared is absent.

Each run is a short budget (`schedule.max_steps`); the two-phase methods start phase 2 from the
phase-1 checkpoint of a short rotation / exemplar run (`schedule.init_from`), as a user would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shared_path
from data_prep.cli import run as prepare
from s2m2.config import METHODS
from s2m2.cross_domain import main as cross_domain_main
from s2m2.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
# A small backbone for both datasets; the CIFAR-FS paper config's WRN dropout kwarg does not apply to it.
SMALL = ["model.backbone=conv4", "model.backbone_kwargs={width: 32}", "schedule.batch_size=32",
         "validation.enabled=false", "runtime.progress=false", "runtime.tensorboard=false", "runtime.log_every=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    cifar = prepare("cifar-fs", shared_path("data", "cifar100", "cifar-100-python.tar.gz"), root / "cifar_fs")
    omniglot = prepare("omniglot", shared_path("data", "omniglot"), root / "omniglot")
    return {"cifar_fs": cifar, "omniglot": omniglot}


def _train(config: Path, root: Path, out: Path, *extra: str) -> dict:
    argv = ["--config", str(config), "--out", str(out), "--set", f"data.root={root}"]
    for item in SMALL + [f"schedule.max_steps={STEPS}", *extra]:
        argv += ["--set", item]
    assert train_main(argv) == 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["type"] == "step"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    return torch.load(out / "last.pt", weights_only=True)


@pytest.mark.parametrize("dataset", ["cifar_fs", "omniglot"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_real_prepared_data(prepared, tmp_path, dataset, method):
    configs = REPO / "configs" / dataset
    extra: list[str] = []
    if method in ("s2m2_r", "s2m2_e"):
        phase1 = "rotation" if method == "s2m2_r" else "exemplar"
        _train(configs / f"{phase1}.yaml", prepared[dataset], tmp_path / phase1)
        extra = ["schedule.phase1_epochs=0", f"schedule.init_from={tmp_path / phase1 / 'last.pt'}"]
    checkpoint = _train(configs / f"{method}.yaml", prepared[dataset], tmp_path / method, *extra)
    assert checkpoint["method"] == method and checkpoint["step"] == STEPS
    assert checkpoint["data"]["num_classes"] == (64 if dataset == "cifar_fs" else 1028)


def test_cifar_fs_backbone_to_cub_sample_cross_domain(prepared, tmp_path, capsys):
    _train(REPO / "configs" / "cifar_fs" / "s2m2_r.yaml", prepared["cifar_fs"], tmp_path / "run",
           "schedule.phase1_epochs=0")
    with pytest.warns(UserWarning, match="subset of the full dataset"):  # 150 of CUB's 11,788 images
        cub = prepare("cub", shared_path("data", "cub_sample", "CUB_200_2011"), tmp_path / "cub")
    code = cross_domain_main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--cub", str(cub),
                              "--shots", "1", "5", "--queries", "2", "--episodes", "200",
                              "--features-out", str(tmp_path / "cub_features.pt"),
                              "--out", str(tmp_path / "cross_domain.json")])
    assert code == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "base64" in printed  # trained on the base split only: the variant is named
    record = json.loads((tmp_path / "cross_domain.json").read_text())
    assert record["variant"] == "base64"
    rows = {row["shots"]: row for row in record["results"]}
    assert 20.0 < rows[1]["mean"] <= 100.0  # above 5-way chance on real birds
