"""An independent cross-entropy baseline on a prepared CIFAR-FS folder, in plain PyTorch.

    python scripts/plain_ce_baseline.py --data data/cifar-fs --epochs 58 \
        --out docs/results/reference/plain_ce_baseline_cifarfs.json

Why it exists: our CIFAR-FS baseline trails the public easyfsl cross-entropy baseline at the same 30-minute
budget (docs/results.md). This script asks whether that gap is in our trainer. It uses none of the s2m2
data, model, training or evaluation code; only s2m2's helpers that label and write the record. Everything
is the textbook recipe easyfsl describes:

* Conv-4 (64 channels, BatchNorm, ReLU, 2x2 max-pool) flattened to 256-d features, with a linear head.
* SGD (momentum 0.9, weight decay 5e-4) with a per-step cosine learning rate over ``--epochs``.
* torchvision v2 per-image augmentation in a DataLoader worker: RandomResizedCrop(32,
  scale=(crop_min, 1)), ColorJitter(0.4, 0.4, 0.4), horizontal flip, and ImageNet normalisation.
* Evaluation: resize 36, centre-crop 32, features in eval mode, then the nearest class mean (Euclidean)
  on 5-way 1- and 5-shot episodes with 15 queries.

It writes an ``s2m2-reference`` record (rows with mean and 95% CI), so ``s2m2 report`` sets it beside our
runs and easyfsl's. Epochs, not minutes, bound the run: pick ``--epochs`` so it takes the budget on your
machine; the record states the time it took.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from s2m2.report import hardware_info, hardware_label  # label the record only
from s2m2.utils import atomic_write_json  # temporary file + rename: never a half-written record

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared split -> uint8 images (N, 3, H, W) and int64 labels (N,)."""
    folder = root / split
    for name in ("images.npy", "labels.npy"):
        if not (folder / name).is_file():
            raise SystemExit(f"plain_ce_baseline: {folder / name} is missing; prepare the dataset first "
                             f"(s2m2 prepare cifar-fs --source ... --out {root})")
    images = np.load(folder / "images.npy", mmap_mode="r")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise SystemExit(f"plain_ce_baseline: {folder / 'images.npy'} holds {images.dtype} {images.shape}, "
                         "expected uint8 (N, H, W, 3)")
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.load(folder / "labels.npy")).long()
    return x, y


class AugmentedImages(torch.utils.data.Dataset):
    """(image, label) pairs with a fresh torchvision augmentation per access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def conv4(width: int = 64) -> nn.Sequential:
    """Four conv-BN-ReLU-maxpool blocks, flattened: (B, 3, 32, 32) -> (B, 4 * width)."""
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))
    return nn.Sequential(block(3, width), block(width, width), block(width, width), block(width, width),
                         nn.Flatten())


def ncm_accuracies(features: torch.Tensor, labels: torch.Tensor, ways: int, shots: int, queries: int,
                   episodes: int, generator: torch.Generator) -> np.ndarray:
    """Per-episode accuracy (%) of the nearest class mean (Euclidean), one episode at a time."""
    classes = labels.unique()
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    truth = torch.arange(ways).repeat_interleave(queries)
    accuracies = np.empty(episodes)
    for e in range(episodes):
        chosen = torch.randperm(len(classes), generator=generator)[:ways]
        prototypes, query = [], []
        for c in chosen:
            idx = by_class[c][torch.randperm(len(by_class[c]), generator=generator)[:shots + queries]]
            prototypes.append(features[idx[:shots]].mean(0))
            query.append(features[idx[shots:]])
        predicted = torch.cdist(torch.cat(query), torch.stack(prototypes)).argmin(1)
        accuracies[e] = 100.0 * (predicted == truth).float().mean().item()
    return accuracies


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/cifar-fs"), help="prepared CIFAR-FS folder")
    p.add_argument("--epochs", type=int, default=58)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--crop-min", type=float, default=0.35, help="RandomResizedCrop minimum area fraction")
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--seed", type=int, default=0, help="weights, data order, augmentation and episodes")
    p.add_argument("--out", type=Path, required=True, help="the s2m2-reference record to write")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    base_x, base_y = load_split(args.data, "base")
    novel_x, novel_y = load_split(args.data, "novel")
    base_y = torch.unique(base_y, return_inverse=True)[1]  # class indices 0..C-1 for the head
    num_classes = int(base_y.max()) + 1
    print(f"base {tuple(base_x.shape)} ({num_classes} classes), novel {tuple(novel_x.shape)}", flush=True)

    train_transform = v2.Compose([
        v2.RandomResizedCrop(32, scale=(args.crop_min, 1.0), antialias=True), v2.ColorJitter(0.4, 0.4, 0.4),
        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(AugmentedImages(base_x, base_y, train_transform), batch_size=args.batch,
                                         shuffle=True, drop_last=True, num_workers=1, persistent_workers=True)
    backbone = conv4()
    model = nn.Sequential(backbone, nn.Linear(256, num_classes)).to(memory_format=torch.channels_last)
    steps = args.epochs * len(loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

    start, seen = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        correct = 0
        for x, y in loader:
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise SystemExit(f"plain_ce_baseline: non-finite loss {loss.item()} in epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, train acc {100 * correct / (len(loader) * args.batch):.1f}%, "
              f"{seen / (time.time() - start):.0f} img/s", flush=True)
    train_minutes = (time.time() - start) / 60

    evaluate = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(MEAN, STD)])
    model.eval()
    with torch.no_grad():
        features = torch.cat([backbone(evaluate(novel_x[i:i + 500]).contiguous(memory_format=torch.channels_last))
                              for i in range(0, len(novel_x), 500)])
    generator = torch.Generator().manual_seed(args.seed)
    label = "plain PyTorch CE baseline, Conv-4 (scripts/plain_ce_baseline.py)"
    rows = []
    for shots in (1, 5):
        acc = ncm_accuracies(features, novel_y, 5, shots, args.queries, args.episodes, generator)
        mean, ci95 = float(acc.mean()), float(1.96 * acc.std() / math.sqrt(len(acc)))
        print(f"5-way {shots}-shot, nearest class mean: {mean:.2f} +- {ci95:.2f}", flush=True)
        rows.append({"label": label, "backbone": "Conv-4 (64 ch)", "head": "prototype", "ways": 5, "shots": shots,
                     "mean": round(mean, 2), "ci95": round(ci95, 2), "episodes": args.episodes,
                     "queries": args.queries, "seed": args.seed})

    record = {
        "format": "s2m2-reference", "format_version": 1,
        "label": "plain PyTorch cross-entropy baseline (independent of s2m2's trainer)",
        "dataset": "cifar-fs", "split": "novel",
        "provenance": {
            "measured_by": "python " + " ".join(shlex.quote(a) for a in ["scripts/plain_ce_baseline.py", *argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "note": "written without s2m2's data, model, training or evaluation code, to check our trainer",
        },
        "setup": {
            "backbone": "Conv-4 (64 channels, 32 px), flattened to 256-d",
            "training": (f"cross-entropy, SGD lr {args.lr} momentum 0.9 weight decay {args.weight_decay}, per-step "
                         f"cosine, batch {args.batch}, crop area ({args.crop_min}, 1), jitter 0.4, flip; "
                         f"{args.epochs} epochs, {seen / 1e6:.2f} M images, {train_minutes:.1f} min"),
            "hardware": hardware_label(hardware_info()),
            "evaluation": (f"nearest class mean (Euclidean), resize 36 -> centre crop 32, {args.episodes} episodes, "
                           f"{args.queries} queries, seed {args.seed}"),
        },
        "rows": rows,
    }
    atomic_write_json(args.out, record, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
