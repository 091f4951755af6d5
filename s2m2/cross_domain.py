"""``s2m2 cross-domain``: a backbone trained on mini-ImageNet, evaluated on the 50 CUB novel classes.

    s2m2 cross-domain --checkpoint CKPT --cub DIR [--variant auto|base64|all100] [--shots 1 5]
                      [--queries 15] [--episodes 600] [--seed 0] [--head logreg]

Two variants exist (spec §7): the backbone saw mini-ImageNet's 64 base classes (``base64``) or all 100
classes (``all100``, CloserLook's protocol). Which one S2M2 reported is not stated, so the command says
which one ran: for our checkpoints it is read from the training config (``data.train_splits``: ["base"] ->
base64; base + val + novel, or "all" -> all100); the release's checkpoints carry no config, so the variant
is unknown and reported as assumed (base64 unless ``--variant`` says otherwise).

The CUB novel features are extracted once and cached (see :mod:`s2m2.features`). Settings the data cannot
support (e.g. 5 shots + 15 queries from classes of 3 images) are reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from s2m2.cli import CommandParser, Interrupted, describe_error, output_file, same_file
from s2m2.data.prepared import PreparedDataError, open_split
from s2m2.data.transforms import EvalTransform
from s2m2.evaluate import (add_feature_transform_args, add_head_args, add_protocol_args, check_feature_transform_args,
                           evaluate_payload, format_table, write_record)
from s2m2.features import FeaturesError, add_extraction_args, features_for_checkpoint, transform_from_args

VARIANTS = ("base64", "all100")


def detect_variant(info: dict[str, Any]) -> tuple[str | None, str]:
    """(variant or None when unknown, explanation) from a checkpoint's info (``load_backbone``)."""
    config = info.get("config")
    if not config:
        return None, f"{info.get('source', 'this')} checkpoint has no training config: training classes unknown"
    splits = list((config.get("data") or {}).get("train_splits") or [])
    if set(splits) in ({"base", "val", "novel"}, {"all"}):
        return "all100", f"trained on data.train_splits={splits} (all 100 mini-ImageNet classes)"
    if splits == ["base"]:
        return "base64", "trained on data.train_splits=['base'] (the 64 base classes)"
    return None, f"trained on data.train_splits={splits}: neither the 64 base classes nor all 100"


def resolve_variant(requested: str, detected: str | None, why: str) -> tuple[str, str]:
    """The variant that runs and how it was decided; a contradiction with the checkpoint is an error."""
    if requested == "auto":
        if detected is None:
            return "base64", f"assumed base64 ({why}; pass --variant to state it)"
        return detected, f"detected: {why}"
    if detected is not None and detected != requested:
        raise ValueError(f"--variant {requested} contradicts the checkpoint, which was {why}")
    return requested, (f"as requested, confirmed by the checkpoint ({why})" if detected
                       else f"as stated by --variant ({why})")


def default_features_path(checkpoint: Path, cub: Path) -> Path:
    """Cache location for the CUB novel features of a checkpoint, beside the prepared CUB folder."""
    from s2m2.checkpoint import file_fingerprint

    split = open_split(cub, "novel")
    return cub.parent / f"{cub.name}-features" / f"{file_fingerprint(checkpoint)}-novel-{split.fingerprint()}.pt"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="s2m2 cross-domain", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="backbone trained on mini-ImageNet (ours or the release's)")
    p.add_argument("--cub", required=True, help="prepared CUB folder (`s2m2 prepare cub ...`)")
    p.add_argument("--variant", choices=("auto", *VARIANTS), default="auto")
    add_protocol_args(p, episodes=600)  # CUB: the release's 600 episodes
    p.add_argument("--features-out", type=output_file,
                   help="where to cache the CUB novel features (default: beside --cub)")
    add_extraction_args(p)
    add_head_args(p)
    add_feature_transform_args(p)
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, EvalTransform | None]:
    """Parse and validate every flag before any work; returns the args and the --resize/--crop transform."""
    parser = build_parser()
    args = parser.parse_args(argv)
    transform = transform_from_args(parser, args)
    check_feature_transform_args(parser, args)
    for out_flag, out in (("--out", args.out), ("--features-out", args.features_out)):
        for flag, path in (("--checkpoint", args.checkpoint), ("--base-features", args.base_features)):
            if same_file(out, path):
                parser.error(f"{out_flag} {out} is the {flag} file; writing there would destroy it")
    if same_file(args.out, args.features_out):
        parser.error("--out and --features-out name the same file; give the results their own file")
    return args, transform


def main(argv: list[str] | None = None) -> int:
    args, transform = parse_args(argv)
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint, cub = Path(args.checkpoint), Path(args.cub)
    features_path = payload = None
    try:
        from s2m2.checkpoint import load_backbone

        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
        open_split(cub, "novel")  # a wrong --cub is reported before the model is loaded
        _, info = load_backbone(checkpoint)
        variant, how = resolve_variant(args.variant, *detect_variant(info))
        print(f"cross-domain variant: {variant} — {how}")
        features_path = Path(args.features_out) if args.features_out else default_features_path(checkpoint, cub)
        if not args.features_out:
            try:  # the default cache location, checked before minutes of extraction like --features-out
                output_file(str(features_path))
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"cannot cache the CUB features beside --cub ({err}); pass --features-out "
                                 f"FILE") from None
        payload = features_for_checkpoint(checkpoint, cub, "novel", features_path, transform=transform,
                                          batch_size=args.batch_size, device=args.device,
                                          progress=not args.no_progress, precision=args.precision,
                                          views=args.views)
        results, head_options, transform_record, threads = evaluate_payload(payload, args, skip_impossible=True)
    except (OSError, PreparedDataError, FeaturesError, ValueError) as err:  # CheckpointError too
        print(f"s2m2 cross-domain: error: {describe_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if payload is not None:
            # The features cache is complete (written atomically) and saves the next run the extraction.
            raise Interrupted(f"kept the features cache {features_path}; no results written") from err
        raise
    num_classes = len(payload["class_names"])
    print(f"mini-ImageNet ({variant}) -> CUB novel: {num_classes} classes, {len(payload['labels'])} images, "
          f"features {features_path}")
    print(format_table(results, args.head))
    if args.out:
        try:
            write_record(args.out, "s2m2-cross-domain", args, payload, features_path, results, head_options,
                         transform_record, wall, threads=threads, variant=variant, variant_reason=how)
        except OSError as err:  # e.g. the disk filled up during the run: --out was checked before it
            print(f"s2m2 cross-domain: error: --out {args.out}: cannot write ({err.strerror or err}); the "
                  f"table above has the results", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
