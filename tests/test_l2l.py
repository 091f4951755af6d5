"""learn2learn adapter: a prepared split as a MetaDataset, tasks sampled with NWays/KShots/LoadData/RemapLabels."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("learn2learn")

from s2m2.data import open_split  # noqa: E402
from s2m2.l2l import labels_to_indices, meta_dataset, task_dataset  # noqa: E402


def test_meta_dataset_uses_precomputed_class_map(make_prepared, monkeypatch):
    root = make_prepared(splits={"novel": 6}, per_class=7, size=12)
    split = open_split(root, "novel")
    mapping = labels_to_indices(split)
    assert sorted(mapping) == list(range(6)) and all(len(rows) == 7 for rows in mapping.values())
    assert all(int(split.labels[r]) == c for c, rows in mapping.items() for r in rows)

    def no_item_access(self, index):
        raise AssertionError("MetaDataset must not iterate the memmap to build its class map")

    monkeypatch.setattr(type(split), "__getitem__", no_item_access)
    dataset = meta_dataset(split)
    assert dataset.labels_to_indices == mapping and len(dataset) == 42


def test_task_shapes_and_label_remapping(make_prepared):
    root = make_prepared(splits={"novel": 8}, per_class=10, size=12, channels=3)
    split = open_split(root, "novel")
    tasks = task_dataset(split, ways=5, shots=2, queries=3, num_tasks=20)
    images, labels = tasks.sample()
    assert images.shape == (25, 3, 12, 12) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == sorted(list(range(5)) * 5)  # remapped to 0..4, 5 images each
    # Each task label stands for one original class: the images of a remapped label share a class.
    rows = {tuple(split[i][0].flatten().tolist()[:20]): int(split.labels[i]) for i in range(len(split))}
    originals = {}
    for img, lab in zip(images, labels.tolist()):
        originals.setdefault(lab, set()).add(rows[tuple(img.flatten().tolist()[:20])])
    assert all(len(v) == 1 for v in originals.values()) and len({min(v) for v in originals.values()}) == 5


def test_example_script_runs(make_prepared, monkeypatch, capsys):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
    try:
        import learn2learn_tasks
    finally:
        sys.path.pop(0)
    root = make_prepared(splits={"novel": 6}, per_class=6, size=16)
    monkeypatch.setattr(sys, "argv", ["x", "--data", str(root), "--ways", "3", "--shots", "2", "--queries", "1",
                                      "--tasks", "2", "--resize", "18", "--crop", "16"])
    learn2learn_tasks.main()
    out = capsys.readouterr().out
    assert "task 1: support (6, 3, 16, 16) labels [0, 0, 1, 1, 2, 2], query (3, 3, 16, 16)" in out
