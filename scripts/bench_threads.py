"""Paired, alternating timing of the logreg head with 1 vs 2 (or more) torch threads, idle and under load.

    .venv/bin/python scripts/bench_threads.py --rounds 6 --busy 0 1 2

For each number of competing busy processes (pure-Python spin loops, one core each) the same batch of
episodes is solved with every thread count in turn, alternating the order each round so slow drift of the
machine hits both sides equally. Prints the median seconds per thread count and the paired ratio
(median of per-round t_N / t_1). The busy processes are started and stopped by this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from s2m2.fewshot.episodes import sample_episodes
from s2m2.fewshot.heads import evaluate_episodes


def synthetic(dim: int = 640, classes: int = 20, per_class: int = 600, seed: int = 0):
    """Features (N, D) non-negative like post-ReLU WRN features, labels (N,)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.rand(classes, dim, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = (centers[labels] + 0.8 * torch.rand(len(labels), dim, generator=gen)).relu()
    return feats, labels


def time_once(feats, labels, eps, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    evaluate_episodes(feats, labels, eps, "logreg")
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="competing busy processes")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--episodes", type=int, default=2000)
    p.add_argument("--shots", type=int, default=5)
    args = p.parse_args(argv)
    feats, labels = synthetic()
    eps = sample_episodes(labels, 5, args.shots, 15, args.episodes, seed=0)
    time_once(feats, labels, eps, 1)  # warm-up (allocator, first-call overheads)
    print(f"cores {os.cpu_count()}, torch {torch.__version__}, {args.episodes} episodes 5w{args.shots}s "
          f"15q, D=640, load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(0.5 if busy else 0)
            times = {t: [] for t in args.threads}
            for r in range(args.rounds):
                order = args.threads if r % 2 == 0 else args.threads[::-1]
                for t in order:
                    times[t].append(time_once(feats, labels, eps, t))
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait()
        base = times[args.threads[0]]
        parts = [f"{t} thr {statistics.median(v):6.2f} s" for t, v in times.items()]
        ratios = [f"{t}/{args.threads[0]} = {statistics.median(a / b for a, b in zip(v, base)):.2f}x"
                  for t, v in times.items() if t != args.threads[0]]
        print(f"busy {busy}: " + ", ".join(parts) + "; paired median ratio " + ", ".join(ratios)
              + f"  (all: { {t: [round(x, 2) for x in v] for t, v in times.items()} })")
    return 0


if __name__ == "__main__":
    sys.exit(main())
