"""``s2m2 evaluate``: N-way K-shot episodes on cached features, with 95% confidence intervals.

    s2m2 evaluate --features FILE --ways 5 --shots 1 5 --queries 15 --episodes 10000 --seed 0 --head logreg

Prints one row per (ways, shots): mean accuracy +- 1.96 * std / sqrt(episodes), in %. With ``--out`` writes
a JSON record (atomically) holding the full protocol, the head and its options, the feature transforms,
the features' provenance (checkpoint and split fingerprints), every per-episode accuracy and wall times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from s2m2.features import FeaturesError, load_features
from s2m2.fewshot.episodes import EpisodeError, sample_episodes
from s2m2.fewshot.feature_transforms import FeatureTransform
from s2m2.fewshot.heads import HEADS, CosineOptions, evaluate_episodes_detailed
from s2m2.fewshot.stats import mean_ci95
from s2m2.utils import atomic_write_json

RESULTS_FORMAT = "s2m2-evaluation"


def parse_queries(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--queries must be a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--queries must be >= 1, got {value}")
    return value


def head_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Options passed to the head (recorded in the JSON)."""
    if args.head == "logreg":
        return {"C": args.C, "max_iter": args.max_iter, "tol": args.tol}
    if args.head == "cosine":
        # Every hyperparameter of the release's protocol goes into the record, not only the ones we vary.
        return {**asdict(CosineOptions(epochs=args.cosine_epochs)), "seed": args.seed}
    return {}


def run_protocol(features: torch.Tensor, labels: torch.Tensor, *, ways: int, shots_list: list[int],
                 queries: int | str, episodes: int, seed: int, head: str, head_options: dict[str, Any],
                 device: str = "cpu", max_chunk_bytes: int | None = None, progress: bool = False,
                 skip_impossible: bool = False, log=print) -> list[dict[str, Any]]:
    """Evaluate every shot count; one result dict per (ways, shots).

    With ``skip_impossible`` a setting the data cannot support (e.g. 5 shots + 15 queries from classes of
    3 images) is reported as {"skipped": reason} instead of raising :class:`EpisodeError`.
    """
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
            "transform": payload["transform"], "checkpoint": ckpt, "shape": list(payload["features"].shape)}


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
    g.add_argument("--power", type=float, metavar="BETA", help="power transform (x + 1e-6) ** BETA")
    g.add_argument("--center", action="store_true", help="subtract the base-class mean (needs --base-features)")
    g.add_argument("--base-features", metavar="FILE", help="features file of the base split, for --center")
    g.add_argument("--l2", action="store_true", help="L2-normalise every feature")


def add_head_args(p: argparse.ArgumentParser, default_head: str = "logreg") -> None:
    g = p.add_argument_group("head")
    g.add_argument("--head", choices=HEADS, default=default_head)
    g.add_argument("--C", type=float, default=1.0, help="logreg: inverse L2 strength, as scikit-learn's C")
    g.add_argument("--max-iter", type=int, default=50, help="logreg: Newton iterations at most")
    g.add_argument("--tol", type=float, default=1e-6, help="logreg: gradient tolerance (relative to C * n)")
    g.add_argument("--cosine-epochs", type=int, default=301, help="cosine: epochs over the support set")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--max-chunk-mb", type=float, help="cap on the working memory of one chunk of episodes")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a CPU shared with other "
                   "jobs, 1 is several times faster: the heads run many small batched ops, and idle-waiting "
                   "worker threads stall when cores are oversubscribed (docs/benchmarks.md)")
    g.add_argument("--no-progress", action="store_true")


def evaluate_payload(payload: dict[str, Any], args: argparse.Namespace, *, skip_impossible: bool = False):
    """Apply the feature-transform flags and run every (ways, shots) protocol the head flags ask for.

    Returns ``(results, head_options, transform_record)``; shared by ``s2m2 evaluate`` and ``s2m2 cross-domain``.
    """
    transform = FeatureTransform(power=args.power, center=args.center, l2=args.l2)
    features, transform_record = apply_feature_transform(transform, payload["features"], args.base_features)
    head_options = head_options_from_args(args)
    max_chunk = int(args.max_chunk_mb * 2**20) if args.max_chunk_mb else None
    results = run_protocol(features, payload["labels"], ways=args.ways, shots_list=args.shots,
                           queries=args.queries, episodes=args.episodes, seed=args.seed, head=args.head,
                           head_options=head_options, device=args.device, max_chunk_bytes=max_chunk,
                           progress=not args.no_progress, skip_impossible=skip_impossible)
    return results, head_options, transform_record


def write_record(path: str | os.PathLike, record_format: str, args: argparse.Namespace, payload: dict[str, Any],
                 features_path: str | os.PathLike, results: list[dict[str, Any]], head_options: dict[str, Any],
                 transform_record: dict[str, Any], wall_start: float, **extra: Any) -> None:
    """The JSON record of an evaluation (atomic): protocol, features provenance, per-episode results."""
    atomic_write_json(path, {
        "format": record_format, "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
        "features": features_provenance(payload, features_path),
        "head": {"name": args.head, "options": head_options},
        "feature_transform": transform_record,
        "device": str(args.device), "torch": torch.__version__,
        "results": results, "wall_seconds": time.perf_counter() - wall_start,
    }, indent=None)


def add_protocol_args(p: argparse.ArgumentParser, episodes: int) -> None:
    """The episode protocol (ways, shots, queries, episodes, seed) and the JSON record path."""
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--queries", type=parse_queries, default=15, help="per class, or 'all' (every other image)")
    p.add_argument("--episodes", type=int, default=episodes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON record to write")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2m2 evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="features file from `s2m2 features`")
    add_protocol_args(p, episodes=10000)
    add_head_args(p)
    add_feature_transform_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        payload = load_features(args.features)
        results, head_options, transform_record = evaluate_payload(payload, args)
    except (FeaturesError, EpisodeError, ValueError) as err:
        print(f"s2m2 evaluate: error: {err}", file=sys.stderr)
        return 2
    ds = payload["dataset"]
    print(f"{ds['name']}/{ds['split']} features {args.features} (key {payload['cache_key']}), "
          f"feature transform {transform_record}")
    print(format_table(results, args.head))
    if args.out:
        write_record(args.out, RESULTS_FORMAT, args, payload, args.features, results, head_options,
                     transform_record, wall)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
