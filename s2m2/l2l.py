"""The prepared datasets as learn2learn ``MetaDataset``s, for image-level task sampling.

    from s2m2.l2l import meta_dataset, task_dataset
    tasks = task_dataset(open_split("data/mini", "novel"), ways=5, shots=1, queries=15, num_tasks=1000)
    images, labels = tasks.sample()      # uint8 (ways*(shots+queries), C, H, W), labels 0..ways-1

learn2learn (and the unmaintained gym it pulls in, which prints a deprecation notice on import) is imported
here only, and only when these functions are called, so the rest of s2m2 never needs it.

The class -> rows map is taken from the split's label array (one vectorised pass), so wrapping a split
never iterates the memory-mapped images, which ``MetaDataset`` would otherwise do item by item.
Our own evaluation does not go through learn2learn: :mod:`s2m2.fewshot` samples thousands of episodes on
cached features at once; this adapter is for users who train meta-learners on images with learn2learn.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from s2m2.data.prepared import PreparedSplit


def _learn2learn():
    """Import learn2learn with gym's import-time deprecation banner silenced."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import learn2learn
    return learn2learn


def labels_to_indices(split: PreparedSplit) -> dict[int, list[int]]:
    """{label: [row, ...]} from the split's labels (rows in ascending order)."""
    labels = np.asarray(split.labels)
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {int(c): rows.tolist() for c, rows in zip(classes, groups)}


def meta_dataset(split: PreparedSplit):
    """``learn2learn.data.MetaDataset`` over a prepared split; items are (uint8 (C, H, W) tensor, int label)."""
    l2l = _learn2learn()
    mapping = labels_to_indices(split)
    indices = {row: label for label, rows in mapping.items() for row in rows}
    return l2l.data.MetaDataset(split, labels_to_indices=mapping, indices_to_labels=indices)


def task_dataset(split: PreparedSplit, ways: int, shots: int, queries: int, num_tasks: int = -1):
    """``learn2learn.data.TaskDataset`` (``Taskset`` in learn2learn >= 0.2) of image-level ``ways``-way tasks
    with ``shots + queries`` images per class.

    Transforms: NWays, KShots(shots + queries), LoadData, RemapLabels (labels 0..ways-1 per task). Split a
    sampled task into support / query per class yourself (see examples/learn2learn_tasks.py).
    """
    l2l = _learn2learn()
    dataset = meta_dataset(split)
    transforms = [
        l2l.data.transforms.NWays(dataset, ways),
        l2l.data.transforms.KShots(dataset, shots + queries),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
    ]
    # learn2learn 0.2 renamed TaskDataset to Taskset (the old name warns); same class, same arguments.
    taskset = getattr(l2l.data, "Taskset", None) or l2l.data.TaskDataset
    return taskset(dataset, task_transforms=transforms, num_tasks=num_tasks)
