"""Frozen-feature extraction with a cache, and the ``s2m2 features`` command.

    s2m2 features --checkpoint CKPT --data DIR --split novel --out FILE [--resize 92 --crop 80]
                  [--views centre|flip|ten_crop]

Features are computed in eval mode, without gradients, on uint8 batches read straight from the prepared
split's memmap; the test transform (:class:`s2m2.data.transforms.EvalTransform`) runs on the whole batch on
the compute device. ``--views`` (default ``centre``, the release's single centre crop) averages each
image's features over its mirrored or ten-crop views (test-time augmentation, recorded with the transform).
``--precision`` (default ``auto``: bf16 autocast on CUDA, fp32 elsewhere; ``fp32``
restores full precision on CUDA) is recorded in the file and part of the cache key. On CUDA the backbone
runs with channels_last memory format.

The features file is a ``torch.save`` dict (see :func:`save_features`) and carries a ``cache_key`` =
sha256 of (checkpoint fingerprint, split fingerprint, transform key, precision unless fp32). A second call with the same
checkpoint, data and transform finds the file with the same key and does no work.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from s2m2.data.prepared import PreparedDataError, PreparedSplit, open_split
from s2m2.cli import (CommandParser, describe_error, device_arg, int_at_least, interrupt_point, output_file,
                      same_file)
from s2m2.data.transforms import VIEWS, EvalTransform
from s2m2.utils import atomic_torch_save

FEATURES_FORMAT = "s2m2-features"
FEATURES_FORMAT_VERSION = 1


#: what ``precision`` may be: the CLI offers the first three, the trainer's validator may also pass fp16
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FeaturesError(RuntimeError):
    """A features file is missing, unreadable, or not an s2m2 features file."""


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; other values are returned as they are (checked)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def _autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision. fp32 *disables* autocast, so fp32 means fp32 even
    inside a caller's autocast (e.g. a training loop running in bf16)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, split: PreparedSplit, transform: EvalTransform,
                     batch_size: int = 256, device: str | torch.device = "cpu",
                     progress: bool = True, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of ``split``, in row order: the mean over ``transform``'s views.

    ``precision``: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32", "bf16" or "fp16" (autocast
    dtypes); see :func:`resolve_precision`.

    Returns:
        features: FloatTensor (N, D) on the CPU (float32 even when computed in bf16).
        labels: LongTensor (N,), the split's labels.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    was_training = backbone.training
    backbone.eval().to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        backbone.to(memory_format=torch.channels_last)
    num = len(split)
    chunks = []
    starts = range(0, num, batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"features {split.meta.get('dataset', '?')}/{split.split}", unit="batch",
                      total=(num + batch_size - 1) // batch_size, file=sys.stderr)
    try:
        for start in starts:
            # Contiguous slice of the memmap: one sequential read, uint8 until on the device.
            batch = torch.from_numpy(split.images[start:start + batch_size].copy()).to(device, non_blocking=True)
            views = transform.view_batches(batch)
            out = None
            for x in views:  # one view at a time: peak memory as for one crop
                if on_cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(precision, device):
                    feats = backbone(x).float()
                out = feats if out is None else out.add_(feats)
            chunks.append(out.div_(len(views)).cpu())  # / 1 is exact: one view keeps its features
            interrupt_point("features")
    finally:
        backbone.train(was_training)
    features = torch.cat(chunks) if chunks else torch.empty(0, getattr(backbone, "feature_dim", 0))
    return features, torch.from_numpy(split.labels.copy()).long()


def cache_key(checkpoint_fingerprint: str, split_fingerprint: str, transform: EvalTransform,
              precision: str = "fp32") -> str:
    """16 hex chars identifying (checkpoint, split contents, transform, resolved precision): equal keys =
    identical features. fp32 adds nothing to the text, so caches written before precision was a choice
    (fp32 on CPU) keep their keys; a bf16 file from before is recomputed once."""
    text = (f"{FEATURES_FORMAT}-v{FEATURES_FORMAT_VERSION}|{checkpoint_fingerprint}|{split_fingerprint}"
            f"|{transform.key()}" + ("" if precision == "fp32" else f"|{precision}"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_features(path: str | os.PathLike, features: torch.Tensor, labels: torch.Tensor, *, split: PreparedSplit,
                  transform: EvalTransform, checkpoint: dict[str, Any], key: str, seconds: float,
                  default_transform: bool = False, precision: str = "fp32") -> None:
    """Write a features file atomically.

    Contents: format/format_version, cache_key, features (N, D) float32, labels (N,) int64, class_names,
    dataset {name, split, fingerprint, root}, transform {resize, crop, views, key, default: resize and crop
    chosen from the checkpoint rather than given}, precision (resolved: fp32, bf16 or fp16), checkpoint {path, source,
    fingerprint, backbone, epoch, config}, seconds (extraction wall time).
    """
    atomic_torch_save({
        "format": FEATURES_FORMAT,
        "format_version": FEATURES_FORMAT_VERSION,
        "cache_key": key,
        "features": features.float().contiguous(),
        "labels": labels.long(),
        "class_names": list(split.class_names),
        "dataset": {"name": split.meta.get("dataset"), "split": split.split, "fingerprint": split.fingerprint(),
                    "root": str(split.root)},
        "transform": {"resize": transform.resize, "crop": transform.crop, "views": transform.views,
                      "key": transform.key(),
                      "default": default_transform},
        "precision": precision,
        "checkpoint": checkpoint,
        "seconds": seconds,
    }, path)


def load_features(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a features file written by :func:`save_features`."""
    path = Path(path)
    if not path.is_file():
        raise FeaturesError(f"{path}: features file not found; create it with "
                            f"`s2m2 features --checkpoint CKPT --data DIR --split novel --out {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated / not a torch file / pickled objects we refuse to load
        raise FeaturesError(f"{path}: cannot read features file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FEATURES_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise FeaturesError(f"{path}: not an s2m2 features file (format {found!r}, expected {FEATURES_FORMAT!r})")
    if payload.get("format_version") != FEATURES_FORMAT_VERSION:
        raise FeaturesError(f"{path}: features format version {payload.get('format_version')} is not supported "
                            f"(expected {FEATURES_FORMAT_VERSION}); extract the features again")
    for key in ("features", "labels", "cache_key", "class_names", "dataset", "transform", "checkpoint"):
        if key not in payload:
            raise FeaturesError(f"{path}: missing key {key!r}")
    feats, labels = payload["features"], payload["labels"]
    if feats.dim() != 2 or labels.dim() != 1 or len(feats) != len(labels):
        raise FeaturesError(f"{path}: 'features' {tuple(feats.shape)} and 'labels' {tuple(labels.shape)} "
                            f"do not form (N, D) and (N,)")
    if not torch.isfinite(feats).all():
        raise FeaturesError(f"{path}: 'features' contains NaN or inf")
    return payload


def default_transform(info: dict[str, Any]) -> EvalTransform:
    """The test transform for a checkpoint: from our training config when present, else 92 -> 80.

    Our config's ``data.eval_resize`` / ``data.eval_crop``, else ``data.crop_size`` (e.g. 36 -> 32 for
    CIFAR-FS); the release's checkpoints carry no config, and its test transform for mini/tiered/CUB is 92 -> 80.
    """
    data_cfg = (info.get("config") or {}).get("data") or {}
    if "crop_size" in data_cfg:
        crop = int(data_cfg["crop_size"])
        resize = int(data_cfg.get("eval_resize", round(crop * 92 / 80)))
        return EvalTransform(resize, int(data_cfg.get("eval_crop") or crop))
    return EvalTransform(92, 80)


def features_for_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, split_name: str,
                            out: str | os.PathLike, *, transform: EvalTransform | None = None,
                            batch_size: int = 256, device: str = "cpu", progress: bool = True,
                            log=print, precision: str = "auto", views: str = "centre") -> dict[str, Any]:
    """Extract (or reuse cached) features of ``data/split_name`` with ``checkpoint``; return the payload.

    ``views`` applies to the checkpoint's default transform (``transform=None``); a given ``transform``
    carries its own.

    Cache: ``out`` is reused when it holds features with the same key (checkpoint file fingerprint, split
    fingerprint, transform, resolved ``precision``). With ``transform=None`` (the checkpoint's default) a
    cached file made from the same checkpoint and split with its default transform is reused without
    loading the model.
    """
    from s2m2.checkpoint import file_fingerprint, load_backbone  # engineer B's module

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    precision = resolve_precision(precision, device)
    split = open_split(data, split_name)
    ckpt_fp, split_fp = file_fingerprint(checkpoint), split.fingerprint()
    out = Path(out)
    cached = None
    if out.is_file():
        try:
            cached = load_features(out)
        except FeaturesError as err:
            log(f"features: ignoring unreadable cache {out} ({err})")
    if cached is not None and transform is None and cached.get("transform", {}).get("default", False):
        recorded = EvalTransform(cached["transform"]["resize"], cached["transform"]["crop"], views=views)
        if cached["cache_key"] == cache_key(ckpt_fp, split_fp, recorded, precision):
            transform = recorded  # the default recorded for this very checkpoint
    backbone = info = None
    is_default = transform is None
    if transform is None:
        backbone, info = load_backbone(checkpoint, map_location="cpu")
        transform = dataclasses.replace(default_transform(info), views=views)
    key = cache_key(ckpt_fp, split_fp, transform, precision)
    if cached is not None:
        if cached["cache_key"] == key:
            log(f"features: cache hit {out} (key {key} = sha256 of checkpoint {ckpt_fp}, split {split_fp}, "
                f"{transform.key()}, {precision})")
            return cached
        log(f"features: {out} holds other features (key {cached['cache_key']} != {key}); recomputing")
    if backbone is None:
        backbone, info = load_backbone(checkpoint, map_location="cpu")
    start = time.perf_counter()
    feats, labels = extract_features(backbone, split, transform, batch_size=batch_size, device=device,
                                     progress=progress, precision=precision)
    seconds = time.perf_counter() - start
    ckpt_info = {"path": str(checkpoint.absolute()), "source": info.get("source"), "fingerprint": ckpt_fp,
                 "backbone": info.get("backbone"), "epoch": info.get("epoch"), "config": info.get("config"),
                 "weights": info.get("weights")}
    save_features(out, feats, labels, split=split, transform=transform, checkpoint=ckpt_info, key=key,
                  seconds=seconds, default_transform=is_default, precision=precision)
    log(f"features: wrote {out} ({tuple(feats.shape)}, {precision}, {seconds:.1f}s, key {key})")
    return load_features(out)


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    """Transform, batch size and precision flags, shared with ``s2m2 cross-domain``."""
    p.add_argument("--resize", type=int_at_least(1), help="test-time resize (default: from the checkpoint's "
                   "config, else 92)")
    p.add_argument("--crop", type=int_at_least(1), help="test-time centre crop (default: from the config, else 80)")
    p.add_argument("--views", choices=VIEWS, default="centre",
                   help="test views averaged per image: centre = the release's centre crop (default); flip = "
                        "+ its mirror; ten_crop = 4 corners + centre, each mirrored (recorded in the file)")
    p.add_argument("--batch-size", type=int_at_least(1), default=256)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="backbone precision: auto = bf16 autocast on CUDA, fp32 on CPU; fp32 = full precision "
                        "everywhere (recorded in the features file and part of its cache key)")


def transform_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EvalTransform | None:
    """The --resize/--crop/--views transform, None for the checkpoint's default resize and crop (its views
    then go to :func:`features_for_checkpoint` as ``views``); a one-line error when they clash."""
    if (args.resize is None) != (args.crop is None):
        parser.error("give both --resize and --crop, or neither")
    if args.resize is None:
        return None
    if args.crop > args.resize:
        parser.error(f"--crop {args.crop} is larger than --resize {args.resize}; the crop is taken inside "
                     f"the resized image")
    return EvalTransform(args.resize, args.crop, views=args.views)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="s2m2 features", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="our checkpoint or the release's (.tar/.pt)")
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--split", default="novel", help="split to extract (default: novel)")
    p.add_argument("--out", type=output_file, required=True,
                   help="features file to write (reused when its cache key matches)")
    add_extraction_args(p)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    transform = transform_from_args(parser, args)
    if same_file(args.out, args.checkpoint):
        parser.error(f"--out {args.out} is the --checkpoint file; writing features there would destroy it")
    try:
        payload = features_for_checkpoint(args.checkpoint, args.data, args.split, args.out, transform=transform,
                                          batch_size=args.batch_size, device=args.device,
                                          progress=not args.no_progress, precision=args.precision,
                                          views=args.views)
    except (OSError, PreparedDataError, FeaturesError, ValueError) as err:  # CheckpointError too
        print(f"s2m2 features: error: {describe_error(err)}", file=sys.stderr)
        return 2
    print(f"{args.out}: {tuple(payload['features'].shape)} features of {payload['dataset']['name']}/"
          f"{payload['dataset']['split']}, transform {payload['transform']['key']}, "
          f"{payload.get('precision', 'fp32')}, key {payload['cache_key']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
