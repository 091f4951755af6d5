"""`make demo`: the whole S2M2 pipeline on the Omniglot copy that ships in data_prep/demo/.

1. prepare   the official-zip-layout Omniglot (all 1623 characters, 28x28) -> a prepared folder (Vinyals split)
2. train     S2M2_R on the 1,200 base + val characters (as Prototypical Networks trained) within a
             wall-clock budget: a rotation phase, then Manifold Mixup + rotation (Conv-4, CPU;
             configs/omniglot/budget/s2m2_r.yaml)
3. features  of the 423 novel characters with the final checkpoint (best validation one if the config
             validates)
4. evaluate  5-way and 20-way, 1- and 5-shot episodes with the logistic-regression and nearest-class-mean
             heads, 95% CIs
5. report    a Markdown table (with provenance) and plots in the run folder; the training curves are there too

Every step is the same `s2m2` command a user runs; outputs go to checkpoints/demo/ (git-ignored). A
second run reuses the prepared data and the finished training run.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s2m2.cli import main as s2m2  # noqa: E402

# The targets on a 2-core CPU (published Prototypical Networks, Conv-4: 98.8 / 99.7 / 96.0 / 98.9).
TARGETS = {(5, 1): 96.0, (5, 5): 99.0, (20, 1): 88.0}
HEADS = ("logreg", "ncm")


def step(title: str, argv: list[str], commands: dict[str, str]) -> None:
    command = "s2m2 " + " ".join(argv)
    print(f"\n=== {title}\n$ {command}", flush=True)
    start = time.perf_counter()
    code = s2m2(argv)
    if code:
        raise SystemExit(f"demo: step '{title}' failed with exit code {code}")
    commands[title] = command
    print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "checkpoints" / "demo")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "omniglot" / "budget" / "s2m2_r.yaml")
    parser.add_argument("--budget-minutes", type=float, default=None, help="override the config's budget")
    parser.add_argument("--episodes", type=int, default=1000)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    data = args.out / "omniglot"
    run = args.out / "s2m2_r"
    features = args.out / "novel_features.pt"
    commands: dict[str, str] = {}

    if not (data / "meta.json").exists():
        step("prepare", ["prepare", "omniglot", "--source", str(REPO / "data_prep" / "demo"), "--out", str(data)],
             commands)
    else:
        print(f"\n=== prepare: reusing {data}")

    train_argv = ["train", "--config", str(args.config), "--out", str(run), "--set", f"data.root={data}"]
    if args.budget_minutes is not None:
        train_argv += ["--set", f"schedule.budget_minutes={args.budget_minutes}"]
    if (run / "last.pt").exists():
        train_argv += ["--resume", "auto"]  # finishes an interrupted run; a finished one returns at once
    step("train", train_argv, commands)

    checkpoint = run / "best.pt" if (run / "best.pt").exists() else run / "last.pt"
    step("features", ["features", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "novel",
                      "--out", str(features)], commands)
    records = {}
    # Two heads: logistic regression (the paper's protocol) and nearest class mean (NCM: what Prototypical
    # Networks, the published Omniglot baseline, do at test time). 20-way 5-shot logistic regression solves a
    # (19 x 65)-unknown Newton system per episode (0.14-0.25 s each on 2 cores), so it gets a twentieth of the
    # episodes (CI about +-0.5 instead of +-0.1; it is not one of the targets): 100 episodes took 24.8 s of a
    # 298-s demo on 2026-12-02, which left no margin under 5 minutes. NCM costs nothing and gets them all.
    for head in HEADS:
        for ways, shots, episodes in ((5, ["1", "5"], args.episodes), (20, ["1"], args.episodes),
                                      (20, ["5"], args.episodes if head == "ncm" else max(1, args.episodes // 20))):
            record = args.out / f"results_{ways}way_{'_'.join(shots)}shot_{head}.json"
            title = f"evaluate {ways}-way {'/'.join(shots)}-shot {head}"
            step(title, ["evaluate", "--features", str(features), "--ways", str(ways), "--shots", *shots,
                         "--queries", "15", "--episodes", str(episodes), "--seed", "0", "--head", head,
                         "--no-progress", "--out", str(record)], commands)
            records[record] = commands.pop(title)

    from s2m2.report import add_provenance, hardware_info, load_record
    for record, evaluate in records.items():
        add_provenance(record, method="s2m2_r", run_dir=str(run), section="Omniglot demo (`make demo`, novel classes)",
                       checkpoint_used=checkpoint.name, commands={**commands, "evaluate": evaluate},
                       hardware=hardware_info(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       added_by="scripts/demo.py")
    step("report", ["report", *map(str, records), "--out", str(args.out / "report.md"),
                    "--plots-dir", str(args.out)], commands)

    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s. Table and plots: {args.out / 'report.md'}; "
          f"training curves: {run}/curves_*.png\n")
    table: dict[tuple[int, int], dict[str, dict]] = {}
    for record in records:
        loaded = load_record(record)
        for r in loaded["results"]:
            table.setdefault((r["ways"], r["shots"]), {})[loaded["head"]["name"]] = r
    print(f"{'ways':>4} {'shots':>5}  " + "  ".join(f"{head + ' accuracy (%)':<19}" for head in HEADS) + "  target")
    for (ways, shots), by_head in table.items():
        cells = [f"{by_head[h]['mean']:6.2f} +- {by_head[h]['ci95']:.2f}" if h in by_head else "-" for h in HEADS]
        target = TARGETS.get((ways, shots))
        verdict = "" if target is None else f">= {target:.0f}: " + ", ".join(
            f"{h} {'met' if by_head[h]['mean'] >= target else 'NOT met'}" for h in HEADS if h in by_head)
        print(f"{ways:>4} {shots:>5}  " + "  ".join(f"{c:<19}" for c in cells) + f"  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
