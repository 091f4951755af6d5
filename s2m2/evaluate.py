"""``s2m2 evaluate``: N-way K-shot episodes on cached features, with 95% confidence intervals.

    s2m2 evaluate --features FILE --ways 5 --shots 1 5 --queries 15 --episodes 10000 --seed 0 --head logreg

Prints one row per (ways, shots): mean accuracy +- 1.96 * std / sqrt(episodes), in %. With ``--out`` writes
a JSON record (atomically) holding the full protocol, the head and its options, the feature transforms,
the features' provenance (checkpoint and split fingerprints), every per-episode accuracy and wall times.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from s2m2.cli import (CommandParser, device_arg, int_at_least, interrupt_point, output_file, positive_float,
                      same_file)
from s2m2.features import FeaturesError, load_features
from s2m2.fewshot.episodes import EpisodeError, sample_episodes
from s2m2.fewshot.feature_transforms import FeatureTransform
from s2m2.fewshot.heads import HEADS, CosineOptions, evaluate_episodes_detailed
from s2m2.fewshot.stats import mean_ci95
from s2m2.utils import atomic_write_json

RESULTS_FORMAT = "s2m2-evaluation"

#: torch CPU threads for the heads unless --threads says otherwise. Measured (docs/evaluation.md, "Threads"):
#: on the 2-core machine 2 threads were 0.82x the time of 1 when idle, but 4-16x *slower* as soon as any
#: other process competed for the cores (OpenMP workers spin-wait on each other for these small batched
#: ops). A 20 % best case against a 4-16x worst case: one thread.
DEFAULT_HEAD_THREADS = 1


def parse_queries(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 'all'), got {value}")
    return value


def head_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Options passed to the head (recorded in the JSON)."""
    if args.head == "logreg":
        return {"C": args.C, "max_iter": args.max_iter, "tol": args.tol}
    if args.head == "cosine":
        # Every hyperparameter of the release's protocol goes into the record, not only the ones we vary.
        return {**asdict(CosineOptions(epochs=args.cosine_epochs)), "seed": args.seed}
    return {}


def not_converged_warning(record: dict[str, Any], head_options: dict[str, Any]) -> str | None:
    """The warning for logreg episodes that stopped at ``max_iter`` without converging (None if none did)."""
    count = record["info"].get("not_converged", 0)
    if not count:
        return None
    return (f"warning: logreg: {count} of {record['episodes']} {record['ways']}-way {record['shots']}-shot "
            f"episodes stopped at --max-iter {head_options.get('max_iter')} without converging (largest "
            f"gradient {record['info'].get('max_grad', float('nan')):.2g}, tolerance --tol "
            f"{head_options.get('tol')}); their accuracies are of an unfinished fit: raise --max-iter")


def run_protocol(features: torch.Tensor, labels: torch.Tensor, *, ways: int, shots_list: list[int],
                 queries: int | str, episodes: int, seed: int, head: str, head_options: dict[str, Any],
                 device: str = "cpu", max_chunk_bytes: int | None = None, progress: bool = False,
                 skip_impossible: bool = False, log=print, warn=None) -> list[dict[str, Any]]:
    """Evaluate every shot count; one result dict per (ways, shots).

    With ``skip_impossible`` a setting the data cannot support (e.g. 5 shots + 15 queries from classes of
    3 images) is reported as {"skipped": reason} instead of raising :class:`EpisodeError`. Warnings (logreg
    episodes stopped at their iteration cap) go to ``warn`` (default: a line on stderr) and into the
    record's ``warnings`` list.
    """
    if warn is None:
        def warn(text: str) -> None:
            print(text, file=sys.stderr, flush=True)
    results = []
    for shots in shots_list:
        start = time.perf_counter()
        try:
            eps = sample_episodes(labels, ways, shots, queries, episodes, seed)
        except EpisodeError as err:
            if not skip_impossible:
                raise
            log(f"skipping {ways}-way {shots}-shot: {err}")
            results.append({"ways": ways, "shots": shots, "queries": queries, "episodes": episodes,
                            "seed": seed, "skipped": str(err)})
            continue
        sampled = time.perf_counter()
        interrupt_point("heads")
        out = evaluate_episodes_detailed(features, labels, eps, head, device=device,
                                         max_chunk_bytes=max_chunk_bytes, progress=progress, **head_options)
        mean, ci = mean_ci95(out.accuracy)
        done = time.perf_counter()
        record = {**eps.protocol(), "mean": mean, "ci95": ci,
                  "sampling_seconds": sampled - start, "head_seconds": done - sampled,
                  "info": out.info, "accuracies": out.accuracy.tolist()}
        if out.extra_accuracies:
            record["checkpoints"] = {name: {"mean": mean_ci95(acc)[0], "ci95": mean_ci95(acc)[1],
                                            "accuracies": acc.tolist()}
                                     for name, acc in out.extra_accuracies.items()}
        warning = not_converged_warning(record, head_options) if head == "logreg" else None
        if warning:
            warn(warning)
            record["warnings"] = [warning]
        results.append(record)
    return results


def format_table(results: list[dict[str, Any]], head: str) -> str:
    lines = [f"{'ways':>4} {'shots':>5} {'queries':>7} {'episodes':>8}  {head + ' accuracy (%)':<22} {'seconds':>7}"]
    for r in results:
        if "skipped" in r:
            lines.append(f"{r['ways']:>4} {r['shots']:>5} {str(r['queries']):>7} {r['episodes']:>8}  "
                         f"skipped: {r['skipped']}")
            continue
        extra = ""
        if "checkpoints" in r:
            extra = "  (" + ", ".join(f"{k}: {v['mean']:.2f}" for k, v in r["checkpoints"].items()) + ")"
        lines.append(f"{r['ways']:>4} {r['shots']:>5} {str(r['queries']):>7} {r['episodes']:>8}  "
                     f"{r['mean']:6.2f} +- {r['ci95']:<12.2f} {r['head_seconds'] + r['sampling_seconds']:7.1f}"
                     f"{extra}")
    return "\n".join(lines)


def features_provenance(payload: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """What the JSON record says about the features: file, cache key, dataset, transform, checkpoint."""
    ckpt = dict(payload.get("checkpoint") or {})
    ckpt.pop("config", None)  # the full training config lives in the features file and the checkpoint
    return {"path": str(Path(path).absolute()), "cache_key": payload["cache_key"], "dataset": payload["dataset"],
            "transform": payload["transform"], "precision": payload.get("precision"), "checkpoint": ckpt,
            "shape": list(payload["features"].shape)}


def apply_feature_transform(transform: FeatureTransform, features: torch.Tensor,
                            base_features_path: str | None) -> tuple[torch.Tensor, dict[str, Any]]:
    base_mean, record = None, transform.describe()
    if transform.center:
        if not base_features_path:
            raise ValueError("--center needs --base-features FILE (features of the base classes)")
        base = load_features(base_features_path)
        base_mean = transform.base_mean(base["features"])
        record["base_features"] = {"path": str(Path(base_features_path).absolute()), "cache_key": base["cache_key"]}
    return transform(features, base_mean), record


def add_feature_transform_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature transforms (off by default; applied as power -> centre -> L2)")
    g.add_argument("--power", type=positive_float(" (0 maps every feature to 1)"), metavar="BETA",
                   help="power transform (x + 1e-6) ** BETA")
    g.add_argument("--center", action="store_true", help="subtract the base-class mean (needs --base-features)")
    g.add_argument("--base-features", metavar="FILE", help="features file of the base split, for --center")
    g.add_argument("--l2", action="store_true", help="L2-normalise every feature")


def add_head_args(p: argparse.ArgumentParser, default_head: str = "logreg") -> None:
    """Head flags; every value is checked by its type before any work (one-line error, exit 2)."""
    g = p.add_argument_group("head")
    g.add_argument("--head", choices=HEADS, default=default_head)
    g.add_argument("--C", type=positive_float(" (the inverse L2 strength: C=0 ignores the data, chance accuracy)"),
                   default=1.0, help="logreg: inverse L2 strength, as scikit-learn's C")
    g.add_argument("--max-iter", type=int_at_least(1, " (0 iterations leave the classifier at zero: chance "
                                                      "accuracy)"),
                   default=50, help="logreg: Newton iterations at most (episodes that reach it are counted "
                   "and reported)")
    g.add_argument("--tol", type=positive_float(allow_zero=True), default=1e-6,
                   help="logreg: gradient tolerance (relative to C * n)")
    g.add_argument("--cosine-epochs", type=int_at_least(1), default=301, help="cosine: epochs over the support set")
    g.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--max-chunk-mb", type=positive_float(), help="cap on the working memory of one chunk of "
                   "episodes")
    g.add_argument("--threads", type=int_at_least(1), help=f"torch CPU threads (default: {DEFAULT_HEAD_THREADS} "
                   "for the heads, torch's default elsewhere). The heads run many small batched ops: on a CPU "
                   "shared with other jobs 2 threads were 4-16x slower than 1, and at best 20%% faster on an "
                   "idle 2-core machine (docs/evaluation.md)")
    g.add_argument("--no-progress", action="store_true")


@contextlib.contextmanager
def head_threads(threads: int | None, device: str):
    """Torch CPU threads while the heads run: ``threads`` if given, else :data:`DEFAULT_HEAD_THREADS` on CPU.

    Yields the thread count in effect; the previous count is restored afterwards (this also runs inside
    other processes, e.g. tests and notebooks, whose thread setting we should not change for good).
    """
    previous = torch.get_num_threads()
    wanted = threads or (DEFAULT_HEAD_THREADS if torch.device(device).type == "cpu" else previous)
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(previous)


def evaluate_payload(payload: dict[str, Any], args: argparse.Namespace, *, skip_impossible: bool = False):
    """Apply the feature-transform flags and run every (ways, shots) protocol the head flags ask for.

    Returns ``(results, head_options, transform_record, threads)``; shared by ``s2m2 evaluate`` and
    ``s2m2 cross-domain``.
    """
    transform = FeatureTransform(power=args.power, center=args.center, l2=args.l2)
    features, transform_record = apply_feature_transform(transform, payload["features"], args.base_features)
    head_options = head_options_from_args(args)
    max_chunk = int(args.max_chunk_mb * 2**20) if args.max_chunk_mb else None
    with head_threads(args.threads, args.device) as threads:
        results = run_protocol(features, payload["labels"], ways=args.ways, shots_list=args.shots,
                               queries=args.queries, episodes=args.episodes, seed=args.seed, head=args.head,
                               head_options=head_options, device=args.device, max_chunk_bytes=max_chunk,
                               progress=not args.no_progress, skip_impossible=skip_impossible)
    return results, head_options, transform_record, threads


def write_record(path: str | os.PathLike, record_format: str, args: argparse.Namespace, payload: dict[str, Any],
                 features_path: str | os.PathLike, results: list[dict[str, Any]], head_options: dict[str, Any],
                 transform_record: dict[str, Any], wall_start: float, threads: int | None = None,
                 **extra: Any) -> None:
    """The JSON record of an evaluation (atomic): protocol, features provenance, per-episode results."""
    warnings = [w for r in results for w in r.get("warnings", [])]
    atomic_write_json(path, {
        "format": record_format, "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
        "features": features_provenance(payload, features_path),
        "head": {"name": args.head, "options": head_options},
        "feature_transform": transform_record,
        "device": str(args.device), "threads": threads, "torch": torch.__version__,
        "results": results, "warnings": warnings, "wall_seconds": time.perf_counter() - wall_start,
    }, indent=None)


def add_protocol_args(p: argparse.ArgumentParser, episodes: int) -> None:
    """The episode protocol (ways, shots, queries, episodes, seed) and the JSON record path."""
    p.add_argument("--ways", type=int_at_least(2, " (a 1-way episode is always 100% correct)"), default=5)
    p.add_argument("--shots", type=int_at_least(1), nargs="+", default=[1, 5])
    p.add_argument("--queries", type=parse_queries, default=15, help="per class, or 'all' (every other image)")
    p.add_argument("--episodes", type=int_at_least(1), default=episodes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_file, help="JSON record to write (checked before any work)")


def check_feature_transform_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check alone; a one-line error (exit 2) before any work."""
    if args.center and not args.base_features:
        parser.error("--center needs --base-features FILE (features of the base classes)")
    if args.base_features and not args.center:
        parser.error("--base-features is only used with --center; add --center or drop --base-features")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="s2m2 evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="features file from `s2m2 features`")
    add_protocol_args(p, episodes=10000)
    add_head_args(p)
    add_feature_transform_args(p)
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate every flag (exit 2 with one line on a bad one) before anything is read."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_feature_transform_args(parser, args)
    for flag, path in (("--features", args.features), ("--base-features", args.base_features)):
        if same_file(args.out, path):
            parser.error(f"--out {args.out} is the {flag} file; writing the results there would destroy it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        payload = load_features(args.features)
        results, head_options, transform_record, threads = evaluate_payload(payload, args)
    except (FeaturesError, EpisodeError, ValueError) as err:
        print(f"s2m2 evaluate: error: {err}", file=sys.stderr)
        return 2
    ds = payload["dataset"]
    print(f"{ds['name']}/{ds['split']} features {args.features} (key {payload['cache_key']}), "
          f"feature transform {transform_record}, {threads} thread(s) on {args.device}")
    print(format_table(results, args.head))
    if args.out:
        try:
            write_record(args.out, RESULTS_FORMAT, args, payload, args.features, results, head_options,
                         transform_record, wall, threads=threads)
        except OSError as err:  # e.g. the disk filled up during the run: --out was checked before it
            print(f"s2m2 evaluate: error: --out {args.out}: cannot write ({err.strerror or err}); the table "
                  f"above has the results", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
