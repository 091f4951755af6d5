"""`make demo`: the whole S2M2 pipeline on the compact Omniglot copy that ships in data_prep/demo/.

1. prepare   the official-zip-layout Omniglot subset -> a prepared folder (Vinyals split, 28x28 grey)
2. train     S2M2_R on the base characters: a rotation phase, then Manifold Mixup + rotation (Conv-4, CPU)
3. features  of the novel characters with the best validation checkpoint (cached)
4. evaluate  5-way 1-shot and 5-shot episodes with the batched logistic-regression head

Every step is the same `s2m2` command a user runs; outputs go to checkpoints/demo/ (git-ignored). A
second run reuses the prepared data, the finished training run and the cached features.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s2m2.cli import main as s2m2  # noqa: E402


def step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ s2m2 {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = s2m2(argv)
    if code:
        raise SystemExit(f"demo: step '{title}' failed with exit code {code}")
    print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "checkpoints" / "demo")
    parser.add_argument("--phase1-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=1000)
    args = parser.parse_args(argv)

    data = args.out / "omniglot"
    run = args.out / "s2m2_r"
    features = args.out / "novel_features.pt"

    if not (data / "meta.json").exists():
        step("prepare", ["prepare", "omniglot", "--source", str(REPO / "data_prep" / "demo"), "--out", str(data)])
    else:
        print(f"\n=== prepare: reusing {data}")

    train_argv = ["train", "--config", str(REPO / "configs" / "omniglot" / "s2m2_r.yaml"), "--out", str(run),
                  "--set", f"data.root={data}",
                  "--set", f"schedule.phase1_epochs={args.phase1_epochs}",
                  "--set", f"schedule.epochs={args.epochs}"]
    if (run / "last.pt").exists():
        train_argv += ["--resume", "auto"]  # finishes an interrupted run; a finished one returns at once
    step("train", train_argv)

    checkpoint = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
    step("features", ["features", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "novel",
                      "--out", str(features)])
    step("evaluate", ["evaluate", "--features", str(features), "--ways", "5", "--shots", "1", "5",
                      "--queries", "15", "--episodes", str(args.episodes), "--seed", "0", "--head", "logreg",
                      "--out", str(args.out / "results.json")])
    print(f"\nDemo finished. Results: {args.out / 'results.json'}; training log and TensorBoard events: {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
