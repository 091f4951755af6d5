#!/usr/bin/env python
"""Sample image-level few-shot tasks from a prepared split with learn2learn.

    python examples/learn2learn_tasks.py --data DIR --split novel --ways 5 --shots 1 --queries 15 --tasks 3

Each task is loaded as uint8 images, turned into normalised float tensors with the evaluation transform,
and split into support / query sets per class, ready for a learn2learn meta-learner (MAML, ProtoNets...).
"""

from __future__ import annotations

import argparse

import torch

from s2m2.data import open_split
from s2m2.data.transforms import EvalTransform
from s2m2.l2l import task_dataset


def split_task(images: torch.Tensor, labels: torch.Tensor, shots: int):
    """Per class, the first ``shots`` images are the support set, the rest the queries."""
    order = torch.argsort(labels, stable=True)
    images, labels = images[order], labels[order]
    ways = int(labels.max()) + 1
    per_class = len(labels) // ways
    is_support = (torch.arange(len(labels)) % per_class) < shots
    return images[is_support], labels[is_support], images[~is_support], labels[~is_support]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="novel")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--resize", type=int, default=92)
    p.add_argument("--crop", type=int, default=80)
    args = p.parse_args()

    tasks = task_dataset(open_split(args.data, args.split), args.ways, args.shots, args.queries)
    transform = EvalTransform(args.resize, args.crop)
    for t in range(args.tasks):
        images, labels = tasks.sample()  # uint8 (ways*(shots+queries), C, H, W), labels 0..ways-1
        x = transform(images.permute(0, 2, 3, 1))  # EvalTransform takes (B, H, W, C) uint8
        xs, ys, xq, yq = split_task(x, labels, args.shots)
        print(f"task {t}: support {tuple(xs.shape)} labels {ys.tolist()}, query {tuple(xq.shape)}")


if __name__ == "__main__":
    main()
