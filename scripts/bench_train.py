#!/usr/bin/env python
"""Training benchmarks on this machine (results go to docs/benchmarks.md).

    python scripts/bench_train.py                       # everything (WRN-28-10 parts take ~10-15 min on 2 cores)
    python scripts/bench_train.py --only pipeline small # input pipeline + small backbone only
    python scripts/bench_train.py --json out.json

Parts:
  pipeline  augmented 80x80 training images/s from a prepared uint8 dataset (memory-mapped, 84x84 stored),
            exactly the trainer's path: TrainData.gather (random rows of the epoch permutation) +
            TrainAugment on the device; anonymous RSS sampled over the epoch (flat = no growth).
  source    (not in the default set) the same with a full-resolution source's training view: T x T
            views (--train-resolution, default 160) + original sizes, crops sampled in source pixels.
  crops     (not in the default set) crop sides on real photos (--cub, the CUB sample): our boxes
            (TrainAugment.sample_sized on the original sizes, then mapped into the T x T view) vs
            torchvision's RandomResizedCrop(80).get_params on the original PIL image vs the old crops of the
            92x92 view; quantiles of the side in original pixels and fraction upsampled; disk per image.
  small     training images/s per method, a small backbone (conv4, width 64) at 32x32, batch 64.
  wrn       training images/s per method, WRN-28-10 at 80x80 (batch --wrn-batch, default 4).
  variants  (not in the default set) interleaved S2M2_R steps: fp32, fp32 + channels_last, bf16 autocast,
            and the bare-compute floor of the same step (see bench_s2m2r_variants).
  s2m2r     seconds per S2M2_R step of WRN-28-10 at 80x80, batch 16, fp32: mixup pass on 16 images +
            rotation pass on 4 images x 4 rotations, ONE Adam step (target <= 45 s on the 2-core CPU).

Images/s counts the input images of a step (B), not the expanded copies (a rotation step trains on 4B).
Every step includes the augmentation of its uint8 batch and the optimizer step. Warm-up steps come first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from s2m2.config import METHODS
from s2m2.data import PreparedWriter
from s2m2.data.augment import TrainAugment
from s2m2.models import create_backbone
from s2m2.models.heads import create_head
from s2m2.objectives import ROTATION_METHODS, STEPS, StepContext, TrainModel
from s2m2.trainer import TrainData, epoch_permutation


def anon_rss_mb() -> float:
    """Anonymous resident memory (MB): what the process allocated, excluding the memory-mapped file pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_dataset(root: Path, num_images: int, size: int, classes: int = 64, train_size: int | None = None) -> Path:
    """A synthetic prepared split; with ``train_size`` also a training view of photos of CUB-like sizes
    (500 x 300..500, either orientation)."""
    rng = np.random.default_rng(0)
    with PreparedWriter(root, dataset="bench", source="synthetic", source_layout="synthetic", resolution=size,
                        overwrite=True, train_resolution=train_size) as writer:
        split = writer.begin_split("base", num_images=num_images, height=size, width=size, channels=3,
                                   class_names=[str(c) for c in range(classes)], train_size=train_size)
        for start in range(0, num_images, 1000):
            n = min(1000, num_images - start)
            split.images[start:start + n] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
            split.labels[start:start + n] = np.arange(start, start + n) % classes
            if train_size:
                split.train_images[start:start + n] = rng.integers(0, 256, (n, train_size, train_size, 3),
                                                                   dtype=np.uint8)
                short = rng.integers(300, 501, n)
                tall = rng.random(n) < 0.3
                split.source_sizes[start:start + n] = np.stack([np.where(tall, 500, short),
                                                                np.where(tall, short, 500)], axis=1)
        writer.end_split("base")
    return root


def bench_pipeline(root: Path, batch: int = 64, crop: int = 80) -> dict:
    data = TrainData(root, ["base"])
    augment = TrainAugment(crop, source_sized=data.train_view)
    order = epoch_permutation(len(data), 0, 0)
    steps = len(data) // batch
    # warm-up (and page the file in, as in any epoch after the first)
    for step in range(min(steps, 20)):
        augment(data.gather(order[step * batch:(step + 1) * batch]), torch.Generator().manual_seed(step))
    rss = [anon_rss_mb()]
    start = time.perf_counter()
    for step in range(steps):
        rows = order[step * batch:(step + 1) * batch]
        x = augment(data.gather(rows), torch.Generator().manual_seed(step))
        if step % max(1, steps // 8) == 0:
            rss.append(anon_rss_mb())
    seconds = time.perf_counter() - start
    rss.append(anon_rss_mb())
    assert x.shape == (batch, 3, crop, crop)
    return {"images": steps * batch, "seconds": seconds, "images_per_s": steps * batch / seconds,
            "rss_anon_mb": [round(r, 1) for r in rss], "stored": list(data.image_shape), "crop": crop,
            "batch": batch}


def crop_sides(cub: Path, train_size: int, stored: int = 92, crop: int = 80, draws: int = 200,
               seed: int = 0) -> dict:
    """Crop boxes on the real photos of a CUB folder, ``draws`` per photo, three ways:

    release: torchvision ``RandomResizedCrop(crop).get_params`` on the original PIL image;
    ours: ``TrainAugment.sample_sized`` on the original (height, width), mapped into the T x T view;
    old: ``TrainAugment.sample`` on the ``stored`` x ``stored`` squashed image (before the training view).
    Side = sqrt(box height x width) in original pixels; "upsampled" = the box is narrower or shorter than
    ``crop`` pixels where it is cut from (the original for the release, the view for ours / old).
    """
    from PIL import Image
    from torchvision import transforms

    paths = sorted((cub / "images").rglob("*.jpg"))
    sizes = torch.tensor([Image.open(p).size[::-1] for p in paths], dtype=torch.float32)  # (N, 2) (h, w)
    augment = TrainAugment(crop)
    torch.manual_seed(seed)
    release = []
    for path in paths:
        image = Image.open(path)
        for _ in range(draws):
            _, _, h, w = transforms.RandomResizedCrop.get_params(image, augment.scale, augment.ratio)
            release.append((h, w, h, w))  # (h, w) in original px, then in the pixels it is cut from
    g = torch.Generator().manual_seed(seed)
    many = sizes.repeat_interleave(draws, dim=0)
    p = augment.sample_sized(many, g)
    view = torch.stack([p.height * train_size / many[:, 0], p.width * train_size / many[:, 1]], 1)
    ours = torch.cat([torch.stack([p.height, p.width], 1), view], 1)
    q = augment.sample(len(many), stored, stored, g)
    old = torch.stack([q.height * many[:, 0] / stored, q.width * many[:, 1] / stored, q.height, q.width], 1)
    out = {"photos": len(paths), "draws_per_photo": draws, "train_resolution": train_size,
           "photo_sizes": {"height_median": float(sizes[:, 0].median()), "width_median": float(sizes[:, 1].median())},
           "bytes_per_image": {"images.npy": stored * stored * 3,
                               "train_images.npy + source_sizes.npy": train_size * train_size * 3 + 8}}
    for name, boxes in (("release", torch.tensor(release, dtype=torch.float32)), ("ours", ours), ("old_92", old)):
        side = torch.sqrt(boxes[:, 0] * boxes[:, 1])
        upsampled = (boxes[:, 2:] < crop).any(dim=1).float()
        scale = torch.maximum(crop / boxes[:, 2], crop / boxes[:, 3])
        out[name] = {"side_quantiles_original_px": {f"q{int(q * 100)}": round(float(side.quantile(q)), 1)
                                                    for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
                     "height_mean": round(float(boxes[:, 0].mean()), 1),
                     "width_mean": round(float(boxes[:, 1].mean()), 1),
                     "fraction_upsampled": round(float(upsampled.mean()), 4),
                     "max_upsampling": round(float(scale.max()), 2)}
    return out


def bench_methods(backbone_name: str, kwargs: dict, size: int, crop: int, batch: int, methods, warmup: int,
                  steps: int, classes: int = 64) -> dict:
    results = {}
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    labels = torch.arange(batch) % classes
    augment = TrainAugment(crop)
    for method in methods:
        torch.manual_seed(0)
        backbone = create_backbone(backbone_name, **kwargs)
        ss = create_head("rotation", backbone.feature_dim) if method in ROTATION_METHODS else None
        classifier = create_head("linear" if method == "baseline" else "cosine", backbone.feature_dim, classes)
        model = TrainModel(backbone, classifier, ss).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        times = []
        for i in range(warmup + steps):
            ctx = StepContext(model=model, num_mix_points=backbone.num_mix_points, transform=augment,
                              view_augment=augment, generator=torch.Generator().manual_seed(i),
                              backward=lambda loss: loss.backward())
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            STEPS[method](ctx, images, labels)
            optimizer.step()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
        per_step = float(np.median(times))
        results[method] = {"seconds_per_step": per_step, "images_per_s": batch / per_step,
                           "step_times": [round(t, 3) for t in times]}
        print(f"  {backbone_name} {crop}px batch {batch} {method:>15}: {per_step:.3f} s/step, "
              f"{batch / per_step:.1f} img/s", file=sys.stderr, flush=True)
    return {"backbone": backbone_name, "kwargs": kwargs, "crop": crop, "stored": size, "batch": batch,
            "warmup": warmup, "steps": steps, "methods": results}


def bench_s2m2r_variants(rounds: int = 2, batch: int = 16, classes: int = 64) -> dict:
    """Interleaved S2M2_R steps of WRN-28-10 at 80x80 (so machine load hits every variant alike).

    fp32: our step as the CPU default runs it.  fp32_channels_last: + channels_last.  bf16: + bf16 autocast
    (uses AMX where the CPU has it; informational, the target is fp32).  floor: the bare compute of the same
    step -- forward/backward of 16 pre-made float images, then of 4 x 4 rotated ones, one Adam step; no
    augmentation, no mixup -- i.e. the least any implementation (the release included) must spend.
    Round 1 is the warm-up; the reported time is the median of the later rounds.
    """
    import contextlib
    import torch.nn.functional as F

    from s2m2.objectives import rotate_batch

    images = torch.randint(0, 256, (batch, 84, 84, 3), dtype=torch.uint8)
    labels = torch.arange(batch) % classes
    augment = TrainAugment(80)

    def build(channels_last: bool):
        torch.manual_seed(0)
        backbone = create_backbone("wrn28_10", dropout=0.5)
        model = TrainModel(backbone, create_head("cosine", 640, classes), create_head("rotation", 640)).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def ours(channels_last=False, bf16=False):
        model, optimizer = build(channels_last)
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

        def step(i):
            ctx = StepContext(model=model, num_mix_points=model.backbone.num_mix_points, transform=augment,
                              view_augment=augment, generator=torch.Generator().manual_seed(i),
                              backward=lambda loss: loss.backward(), autocast=autocast, channels_last=channels_last)
            optimizer.zero_grad(set_to_none=True)
            STEPS["s2m2_r"](ctx, images, labels)
            optimizer.step()
        return step

    def floor():
        model, optimizer = build(False)
        x = torch.randn(batch, 3, 80, 80)

        def step(i):
            optimizer.zero_grad(set_to_none=True)
            _, logits, _ = model(x)
            F.cross_entropy(logits, labels).backward()
            x4, rot = rotate_batch(x[: batch // 4])
            _, logits4, rot_logits = model(x4, ss=True)
            (F.cross_entropy(logits4, labels[: batch // 4].repeat(4)) + F.cross_entropy(rot_logits, rot)).backward()
            optimizer.step()
        return step

    variants = {"fp32": ours(), "fp32_channels_last": ours(channels_last=True), "bf16": ours(bf16=True),
                "floor_fp32": floor()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            step(r)
            times[name].append(time.perf_counter() - start)
            print(f"  round {r + 1} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    return {name: {"seconds_per_step": float(np.median(t[1:] if len(t) > 1 else t)), "step_times": [round(v, 2) for v in t]}
            for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=["pipeline", "small", "wrn", "s2m2r"],
                        choices=["pipeline", "source", "crops", "small", "wrn", "s2m2r", "variants"])
    parser.add_argument("--train-resolution", type=int, nargs="*", default=[160],
                        help="training-view side(s) T for the source and crops parts")
    parser.add_argument("--cub", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "cub_sample" / "CUB_200_2011", help="CUB_200_2011 folder for the crops part")
    parser.add_argument("--pipeline-images", type=int, default=12800)
    parser.add_argument("--wrn-batch", type=int, default=4)
    parser.add_argument("--wrn-methods", nargs="*", default=list(METHODS))
    parser.add_argument("--s2m2r-steps", type=int, default=2)
    parser.add_argument("--variant-rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "load_average_at_start": os.getloadavg()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "pipeline" in args.only:
        threads = torch.get_num_threads()
        report["pipeline"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            root = make_dataset(Path(tmp) / "bench84", args.pipeline_images, 84)
            # 1 and all intra-op threads: on a shared (oversubscribed) 2-core machine small elementwise ops
            # can be much faster on one thread than with OpenMP threads fighting for busy cores.
            for n in sorted({1, threads}):
                torch.set_num_threads(n)
                p = report["pipeline"][f"threads_{n}"] = bench_pipeline(root)
                print(f"pipeline ({n} thread(s)): {p['images_per_s']:.0f} augmented 80x80 images/s; "
                      f"anon RSS MB {p['rss_anon_mb']}", file=sys.stderr, flush=True)
        torch.set_num_threads(threads)
    if "source" in args.only:
        threads = torch.get_num_threads()
        report["source"] = {}
        for t in args.train_resolution:
            with tempfile.TemporaryDirectory() as tmp:
                root = make_dataset(Path(tmp) / f"bench{t}", args.pipeline_images, 92, train_size=t)
                for n in sorted({1, threads}):
                    torch.set_num_threads(n)
                    p = report["source"][f"T{t}_threads_{n}"] = bench_pipeline(root)
                    print(f"source-resolution pipeline T={t} ({n} thread(s)): {p['images_per_s']:.0f} augmented "
                          f"80x80 images/s; anon RSS MB {p['rss_anon_mb']}", file=sys.stderr, flush=True)
        torch.set_num_threads(threads)
    if "crops" in args.only:
        report["crops"] = {f"T{t}": crop_sides(args.cub, t) for t in args.train_resolution}
    if "small" in args.only:
        report["small"] = bench_methods("conv4", {"width": 64}, 32, 32, 64, METHODS, warmup=2, steps=5)
    if "wrn" in args.only:
        report["wrn"] = bench_methods("wrn28_10", {"dropout": 0.5}, 84, 80, args.wrn_batch, args.wrn_methods,
                                      warmup=1, steps=1)
    if "s2m2r" in args.only:
        r = bench_methods("wrn28_10", {"dropout": 0.5}, 84, 80, 16, ["s2m2_r"], warmup=1, steps=args.s2m2r_steps)
        report["s2m2r_step"] = r["methods"]["s2m2_r"] | {"batch": 16, "crop": 80, "precision": "fp32"}
        print(f"S2M2_R step, WRN-28-10 80x80 batch 16 fp32: {report['s2m2r_step']['seconds_per_step']:.1f} s",
              file=sys.stderr)
    if "variants" in args.only:
        report["s2m2r_variants"] = bench_s2m2r_variants(rounds=args.variant_rounds)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
