"""The prepared-dataset format: one folder per dataset, one sub-folder per split.

Layout (all paths relative, so a prepared folder can be moved or copied anywhere)::

    DIR/meta.json                 format version, source, resolution, counts, provenance, checksums
    DIR/<split>/images.npy        uint8 (N, H, W, C), C in {1, 3}; opened with mmap, never read whole
    DIR/<split>/labels.npy        int64 (N,), split-local labels 0..num_classes-1
    DIR/<split>/classes.json      {"names": [...], "ids": [...]} in label order

Splits are named ``base`` / ``val`` / ``novel`` (few-shot training, validation and test classes) or
``all`` (every class, e.g. mini-ImageNet's 100 classes for the cross-domain protocol).

Writing goes through :class:`PreparedWriter`, which builds the folder under a temporary name next to the
destination and renames it into place only when every split is complete, so a failed or interrupted
preparation never leaves a half-written dataset and never half-overwrites an existing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2m2.utils import atomic_write_json

FORMAT_NAME = "s2m2-prepared"
FORMAT_VERSION = 1
SPLIT_NAMES = ("base", "val", "novel", "all")


class PreparedDataError(RuntimeError):
    """A prepared folder is missing, malformed, or from an incompatible format version."""


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class SplitWriter:
    """Pre-allocated, memory-mapped arrays of one split being written.

    Fill ``images[i]`` (uint8 (H, W, C)) and ``labels[i]`` for every i in range(num_images).
    """

    name: str
    images: np.memmap  # (N, H, W, C) uint8
    labels: np.memmap  # (N,) int64
    class_names: list[str]
    class_ids: list[str]


class PreparedWriter:
    """Context manager that writes a prepared dataset folder atomically.

    Example::

        with PreparedWriter(out_dir, dataset="cifar-fs", source=src, source_layout="cifar-python",
                            resolution=32) as writer:
            split = writer.begin_split("base", num_images=38400, height=32, width=32, channels=3,
                                       class_names=names, class_ids=names)
            for i, (image, label) in enumerate(records):
                split.images[i] = image
                split.labels[i] = label
            writer.end_split("base", expected_classes=64, expected_images=38400)
            writer.meta["split_files"] = {...}   # provenance of the split definition

    On a clean exit the checksums and ``meta.json`` are written and the temporary folder is renamed to
    ``out_dir``. On an exception the temporary folder is deleted and ``out_dir`` is untouched.
    An existing ``out_dir`` is replaced only with ``overwrite=True`` (and only after the new one is
    complete).
    """

    def __init__(self, out_dir: str | os.PathLike, *, dataset: str, source: str | os.PathLike,
                 source_layout: str, resolution: int | None, overwrite: bool = False,
                 extra_meta: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already exists; pass --overwrite to replace it (the old folder is "
                f"kept until the new one is complete)")
        self.meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "source": os.path.basename(os.path.normpath(str(source))),
            "source_layout": source_layout,
            "resolution": resolution,
            "splits": {},
            "split_files": {},
            "warnings": [],
            "checksums": {},
        }
        if extra_meta:
            self.meta.update(extra_meta)
        self._tmp: Path | None = None
        self._open: dict[str, SplitWriter] = {}

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "PreparedWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._open.clear()
            if self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)

    # -- writing -----------------------------------------------------------------------------------
    def begin_split(self, name: str, *, num_images: int, height: int, width: int, channels: int,
                    class_names: list[str], class_ids: list[str] | None = None) -> SplitWriter:
        if name not in SPLIT_NAMES:
            raise ValueError(f"split name {name!r} is not one of {SPLIT_NAMES}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        assert self._tmp is not None, "use PreparedWriter as a context manager"
        split_dir = self._tmp / name
        split_dir.mkdir()
        images = np.lib.format.open_memmap(split_dir / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(num_images, height, width, channels))
        labels = np.lib.format.open_memmap(split_dir / "labels.npy", mode="w+", dtype=np.int64,
                                           shape=(num_images,))
        labels[:] = -1  # so an unfilled slot is detected at end_split
        writer = SplitWriter(name, images, labels, list(class_names),
                             list(class_ids) if class_ids is not None else list(class_names))
        self._open[name] = writer
        return writer

    def end_split(self, name: str, *, expected_classes: int | None = None,
                  expected_images: int | None = None) -> None:
        """Validate and flush a split; record found vs expected counts (warn when a subset)."""
        writer = self._open.pop(name)
        labels = np.asarray(writer.labels)
        if (labels < 0).any():
            missing = int((labels < 0).sum())
            raise RuntimeError(f"split {name!r}: {missing} of {len(labels)} image slots were never written")
        num_classes = len(writer.class_names)
        if len(labels) and labels.max() >= num_classes:
            raise RuntimeError(f"split {name!r}: label {labels.max()} >= number of classes {num_classes}")
        per_class = np.bincount(labels, minlength=num_classes)
        writer.images.flush()
        writer.labels.flush()
        atomic_write_json(self._tmp / name / "classes.json",
                           {"names": writer.class_names, "ids": writer.class_ids})
        complete = ((expected_classes is None or expected_classes == num_classes)
                    and (expected_images is None or expected_images == len(labels)))
        self.meta["splits"][name] = {
            "num_classes": num_classes,
            "num_images": int(len(labels)),
            "images_per_class": {"min": int(per_class.min(initial=0)), "max": int(per_class.max(initial=0))},
            "shape": list(writer.images.shape[1:]),
            "expected_classes": expected_classes,
            "expected_images": expected_images,
            "complete": bool(complete),
        }
        if not complete:
            self.warn(f"split {name!r}: found {num_classes} classes / {len(labels)} images, expected "
                      f"{expected_classes} classes / {expected_images} images (a subset of the full dataset)")
        del writer

    def warn(self, message: str) -> None:
        """Record a warning in meta.json and show it to the user."""
        self.meta["warnings"].append(message)
        warnings.warn(message, stacklevel=2)

    def _finish(self) -> None:
        assert self._tmp is not None
        if self._open:
            raise RuntimeError(f"splits never ended: {sorted(self._open)}")
        if not self.meta["splits"]:
            raise RuntimeError("no split was written")
        for name in self.meta["splits"]:
            for fname in ("images.npy", "labels.npy"):
                self.meta["checksums"][f"{name}/{fname}"] = _sha256(self._tmp / name / fname)
        atomic_write_json(self._tmp / "meta.json", self.meta)
        old: Path | None = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, old)
        os.replace(self._tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def load_meta(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``meta.json`` of a prepared folder."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise PreparedDataError(f"{root} is not a prepared dataset folder (no meta.json); "
                                f"create one with `s2m2 prepare DATASET --source PATH --out {root}`")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PreparedDataError(f"{meta_path}: not valid JSON ({err})") from err
    if meta.get("format") != FORMAT_NAME:
        raise PreparedDataError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(f"{meta_path}: format version {meta.get('format_version')} is not supported "
                                f"(this s2m2 reads version {FORMAT_VERSION}); prepare the dataset again")
    return meta


class PreparedSplit(torch.utils.data.Dataset):
    """One split of a prepared dataset, opened lazily (memory-mapped).

    ``dataset[i]`` returns ``(image, label)`` with image a uint8 tensor (C, H, W) and label an int.
    Training code should prefer whole-batch access: ``torch.from_numpy(split.images[idx])`` gives
    (B, H, W, C) uint8 without per-item Python overhead.

    Attributes:
        images: np.memmap uint8 (N, H, W, C).
        labels: np.ndarray int64 (N,), split-local labels in 0..num_classes-1.
        class_names, class_ids: list[str] in label order.
        meta: the dataset's meta.json as a dict.
    """

    def __init__(self, root: str | os.PathLike, split: str):
        self.root = Path(root)
        self.split = split
        self.meta = load_meta(self.root)
        if split not in self.meta["splits"]:
            raise PreparedDataError(f"{self.root}: no split {split!r}; available: {sorted(self.meta['splits'])}")
        split_dir = self.root / split
        for fname in ("images.npy", "labels.npy", "classes.json"):
            if not (split_dir / fname).is_file():
                raise PreparedDataError(f"{split_dir / fname}: missing (the prepared folder is incomplete)")
        try:
            self.images = np.load(split_dir / "images.npy", mmap_mode="r")
            self.labels = np.load(split_dir / "labels.npy")
        except ValueError as err:
            raise PreparedDataError(f"{split_dir}: cannot read arrays ({err})") from err
        classes = json.loads((split_dir / "classes.json").read_text())
        self.class_names: list[str] = classes["names"]
        self.class_ids: list[str] = classes["ids"]
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise PreparedDataError(f"{split_dir / 'images.npy'}: expected uint8 (N, H, W, C), "
                                    f"got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise PreparedDataError(f"{split_dir}: {len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the stored images."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Short content hash of this split (from the checksums recorded at preparation)."""
        sums = self.meta.get("checksums", {})
        text = "|".join(sums.get(f"{self.split}/{f}", "") for f in ("images.npy", "labels.npy"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)  # copy: memmap is read-only
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        return (f"PreparedSplit({self.meta['dataset']}/{self.split}: {len(self)} images, "
                f"{self.num_classes} classes, {h}x{w}x{c})")


def open_split(root: str | os.PathLike, split: str) -> PreparedSplit:
    """Open one split of a prepared dataset folder (lazy, memory-mapped)."""
    return PreparedSplit(root, split)
