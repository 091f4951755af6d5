#!/usr/bin/env python
"""Preparation throughput (images/s) of ``s2m2 prepare`` on the reference data, with 1 and 2 workers.

Measures the whole command as a user runs it (reading the source, decoding/resizing, writing the
memory-mapped arrays, checksums, meta.json) for:

* CIFAR-FS from the full ``cifar-100-python.tar.gz`` (60,000 images; pixels are pickled arrays, no decoding),
* the mini-ImageNet Ravi-layout sample (800 84x84 JPEGs),
* Omniglot from the full official zips (32,460 105x105 PNGs -> 28x28),
* the CUB sample (150 full-resolution JPEGs -> 92x92),
* ``full-res-jpeg``: 3,600 generated 500x375 JPEGs (the typical ILSVRC/CUB size) in an ILSVRC train tree
  of tiered-ImageNet classes -> 92x92: the decoding-bound case where the second worker should pay off
  (made by this script in a temporary folder; content is smooth noise, only the size/format matter).

    python scripts/bench_prepare.py [--shared ../shared/data] [--repeat 2] [--only cifar-fs,omniglot]

Each configuration runs ``--repeat`` times and the best wall time is reported, with the CPU time (this
process + its decoding workers) of that run: on a shared machine the wall time depends on the other load,
images per CPU-second does not (it shows what the process pool costs or saves in work).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from data_prep.cli import run
from s2m2.data import load_meta

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name -> (dataset, source path under the shared data folder; None: generated)
    "cifar-fs": ("cifar-fs", "cifar100/cifar-100-python.tar.gz"),
    "mini-imagenet-sample": ("mini-imagenet", "mini_imagenet_sample"),
    "omniglot": ("omniglot", "omniglot"),
    "cub-sample": ("cub", "cub_sample"),
    "full-res-jpeg": ("tiered-imagenet", None),
}


def make_full_res_tree(root: Path, per_class: int = 600, classes_per_split: int = 2, seed: int = 0) -> Path:
    """An ILSVRC-like train tree of 500x375 JPEGs for a few tiered-ImageNet classes of each split."""
    import numpy as np
    from PIL import Image

    from data_prep.tiered_imagenet import load_ren_split

    rng = np.random.default_rng(seed)
    splits, _, _ = load_ren_split()
    for classes in splits.values():
        for wnid in sorted(classes)[:classes_per_split]:
            (root / wnid).mkdir(parents=True)
            for i in range(per_class):
                small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # smooth after upsampling
                image = Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC)
                image.save(root / wnid / f"{wnid}_{i + 1}.JPEG", quality=90)
    return root


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_prepare(dataset: str, source: Path, workers: int, repeat: int) -> tuple[float, float, int]:
    """(best wall seconds, CPU seconds of that run, images prepared) over ``repeat`` runs."""
    best, best_cpu, images = float("inf"), 0.0, 0
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
            out = Path(tmp) / "out"
            cpu_start, start = cpu_seconds(), time.perf_counter()
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")  # subset warnings of the samples; progress bars
                run(dataset, source, out, workers=workers)
            wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
            if wall < best:
                best, best_cpu = wall, cpu
            images = sum(s["num_images"] for s in load_meta(out)["splits"].values())
            shutil.rmtree(out)
    return best, best_cpu, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases: " + ", ".join(CASES))
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# load average before: {os.getloadavg()[0]:.1f}")
    print("| case | images | workers | wall s | images/s (wall) | CPU s | images per CPU-s |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    generated = tempfile.TemporaryDirectory(prefix="bench-prepare-src-")
    for name in args.only.split(","):
        dataset, rel = CASES[name]
        source = args.shared / rel if rel else make_full_res_tree(Path(generated.name) / "train")
        if not source.exists():
            print(f"| {name} | skipped: {source} not found | | | | | |")
            continue
        for workers in (int(w) for w in args.workers.split(",")):
            wall, cpu, images = time_prepare(dataset, source, workers, args.repeat)
            print(f"| {name} | {images} | {workers} | {wall:.2f} | {images / wall:,.0f} | {cpu:.2f} | "
                  f"{images / cpu:,.0f} |", flush=True)
    generated.cleanup()
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
