"""The prepared-dataset format: one folder per dataset, one sub-folder per split.

Layout (all paths relative, so a prepared folder can be moved or copied anywhere)::

    DIR/meta.json                 format version, source, resolution, counts, provenance, checksums
    DIR/<split>/images.npy        uint8 (N, H, W, C), C in {1, 3}; opened with mmap, never read whole
    DIR/<split>/labels.npy        int64 (N,), split-local labels 0..num_classes-1
    DIR/<split>/classes.json      {"names": [...], "ids": [...]} in label order
    DIR/<split>/train_images.npy  uint8 (N, T, T, C): full-resolution sources only (ILSVRC tree, CUB): the
                                  whole photo resized (squashed) to T x T, what training crops are cut from
    DIR/<split>/source_sizes.npy  int32 (N, 2): (height, width) of each original photo, with train_images.npy

``images.npy`` is the evaluation view (the release's test ``Resize((92, 92))`` for full-resolution
sources). Training crops are sampled in the original photo's pixel coordinates (``source_sizes``) and cut
from ``train_images`` (see :mod:`s2m2.data.augment`), so their area and aspect are relative to the real
photo, as the release's ``RandomResizedCrop`` on the full-resolution JPEG.

Splits are named ``base`` / ``val`` / ``novel`` (few-shot training, validation and test classes) or
``all`` (every class, e.g. mini-ImageNet's 100 classes for the cross-domain protocol).

Writing goes through :class:`PreparedWriter`, which builds the folder under a temporary name next to the
destination and renames it into place only when every split is complete, so a failed or interrupted
preparation never leaves a half-written dataset and never half-overwrites an existing one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2m2.utils import atomic_write_json

FORMAT_NAME = "s2m2-prepared"
#: 2: full-resolution sources carry a training view (train_images.npy + source_sizes.npy)
FORMAT_VERSION = 2
#: versions this code opens; version-1 folders of full-resolution sources are refused for training only
#: (their evaluation view is unchanged), see :func:`check_trainable`
READABLE_VERSIONS = (1, 2)
SPLIT_NAMES = ("base", "val", "novel", "all")
#: source layouts whose photos are larger than the stored evaluation view (data_prep's names): the ones a
#: training view is made for
FULL_RESOLUTION_LAYOUTS = ("ilsvrc", "cub-folder", "cub-tgz")
TRAIN_FILES = ("train_images.npy", "source_sizes.npy")


class PreparedDataError(RuntimeError):
    """A prepared folder is missing, malformed, or from an incompatible format version."""


class OutputError(RuntimeError):
    """``out_dir`` cannot be written or may not be replaced (the message names the path and what to do)."""


#: file inside a temporary folder naming the run that owns it ("host pid"), so a later run can tell a
#: folder left by a killed run from one still being written; removed before the folder is renamed
_OWNER_FILE = ".owner"


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C for the duration (main thread only): a second Ctrl-C must not interrupt the cleanup
    of the first one (half-removed temporary folders, surviving worker processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def is_prepared_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose ``meta.json`` carries the prepared-format marker (any version):
    the only kind of folder ``--overwrite`` may replace."""
    meta_path = Path(path) / "meta.json"
    try:
        return Path(path).is_dir() and json.loads(meta_path.read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Raise OutputError unless writing ``out_dir`` is allowed: it does not exist, or it is a prepared
    folder and ``overwrite`` is set. Anything else (a user's folder, a file) is never replaced."""
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise OutputError(f"{out_dir} already exists; pass --overwrite to replace it (the old folder is "
                          f"kept until the new one is complete)")
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise OutputError(f"{out_dir} is not a folder; --overwrite only replaces a folder made by "
                          f"`s2m2 prepare`; choose another --out")
    if not is_prepared_folder(out_dir):
        raise OutputError(f"{out_dir} is not a prepared dataset (no s2m2 meta.json); --overwrite only "
                          f"replaces a folder made by `s2m2 prepare`; choose another --out or remove it "
                          f"yourself")


def _umask() -> int:
    # os.umask can only be read by setting it; restored at once (preparation is single-threaded here)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_default_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain mkdir/open would have (0o777 / 0o666 minus the
    umask): mkdtemp (0700) and mkstemp (0600) modes must not reach the shared prepared folder."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftover_owner(path: Path) -> tuple[str, int] | None:
    """(host, pid) of the run that made a ``.NAME.tmp-*`` / ``.NAME.old-*`` folder, or None if unknown."""
    try:
        host, pid = (path / _OWNER_FILE).read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        pass
    match = re.search(r"\.old-(\d+)$", path.name)  # .NAME.old-<pid>: the old dataset, renamed by this host
    return (socket.gethostname(), int(match.group(1))) if match else None


def clean_leftovers(out_dir: Path) -> list[str]:
    """Deal with ``.NAME.tmp-*`` / ``.NAME.old-*`` folders next to ``out_dir`` left by a killed run.

    Removed: a folder whose owning process (recorded in it, or in the ``.old-<pid>`` name) is dead on this
    host -- except a ``.old-*`` folder while ``out_dir`` is missing (the run was killed between its two
    renames: that folder is the only copy of the old dataset). Everything else (owner alive, another host,
    unknown owner) is left alone. Returns one message per folder found, for the caller to show.
    """
    messages = []
    prefixes = {f".{out_dir.name}.tmp-": "tmp", f".{out_dir.name}.old-": "old"}
    for path in sorted(out_dir.parent.iterdir()):
        kind = next((k for prefix, k in prefixes.items() if path.name.startswith(prefix)), None)
        if kind is None or path.is_symlink() or not path.is_dir():
            continue
        owner = _leftover_owner(path)
        if owner is None or owner[0] != socket.gethostname() or _pid_alive(owner[1]):
            who = "unknown run" if owner is None else f"pid {owner[1]} on {owner[0]}"
            messages.append(f"{path}: temporary folder of another `s2m2 prepare` ({who}) left alone; if no "
                            f"such run is going on, remove it")
        elif kind == "old" and not os.path.lexists(out_dir):
            messages.append(f"{path}: the dataset a killed --overwrite run had moved aside; rename it to "
                            f"{out_dir} to keep it, or remove it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            messages.append(f"{path}: removed the temporary folder of a killed run (pid {owner[1]})")
    return messages


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class SplitWriter:
    """Pre-allocated, memory-mapped arrays of one split being written.

    Fill ``images[i]`` (uint8 (H, W, C)) and ``labels[i]`` for every i in range(num_images), and, when the
    split has a training view, ``train_images[i]`` (uint8 (T, T, C)) and ``source_sizes[i]`` ((height,
    width) of the original photo).
    """

    name: str
    images: np.memmap  # (N, H, W, C) uint8
    labels: np.memmap  # (N,) int64
    class_names: list[str]
    class_ids: list[str]
    train_images: np.memmap | None = None  # (N, T, T, C) uint8
    source_sizes: np.memmap | None = None  # (N, 2) int32


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
    ``out_dir``. On an exception (Ctrl-C included) the temporary folder is deleted and ``out_dir`` is
    untouched. An existing ``out_dir`` is replaced only with ``overwrite=True``, only when it is a prepared
    folder (never a user's folder or file), and only after the new one is complete. The temporary folder is
    ``.NAME.tmp-<pid>-*`` and records its owner, so the next run removes it if this one is killed.
    Raises OutputError (naming the path) when ``out_dir`` may not be replaced or cannot be written.
    """

    def __init__(self, out_dir: str | os.PathLike, *, dataset: str, source: str | os.PathLike,
                 source_layout: str, resolution: int | None, overwrite: bool = False,
                 extra_meta: dict[str, Any] | None = None, train_resolution: int | None = None):
        self.out_dir = Path(out_dir).absolute()
        check_replaceable(self.out_dir, overwrite)
        self._overwrite = overwrite
        self.meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "source": os.path.basename(os.path.normpath(str(source))),
            "source_layout": source_layout,
            "resolution": resolution,
            "train_resolution": train_resolution,
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
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for message in clean_leftovers(self.out_dir):
                warnings.warn(message, stacklevel=2)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-{os.getpid()}-", dir=parent))
            (self._tmp / _OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        except OSError as err:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
            raise OutputError(f"{_existing_ancestor(parent)}: cannot write the prepared folder here "
                              f"({err.strerror or err}); choose an --out in a writable folder") from err
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None
        try:
            if exc_type is None:
                self._finish()
        finally:
            self._open.clear()
            with sigint_ignored():  # a second Ctrl-C must not leave a half-removed folder
                if self._tmp.exists():
                    shutil.rmtree(self._tmp, ignore_errors=True)

    # -- writing -----------------------------------------------------------------------------------
    def begin_split(self, name: str, *, num_images: int, height: int, width: int, channels: int,
                    class_names: list[str], class_ids: list[str] | None = None,
                    train_size: int | None = None) -> SplitWriter:
        """Allocate a split; ``train_size`` T also allocates its training view (T x T) and source sizes."""
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
        train_images = source_sizes = None
        if train_size:
            train_images = np.lib.format.open_memmap(split_dir / "train_images.npy", mode="w+", dtype=np.uint8,
                                                     shape=(num_images, train_size, train_size, channels))
            source_sizes = np.lib.format.open_memmap(split_dir / "source_sizes.npy", mode="w+", dtype=np.int32,
                                                     shape=(num_images, 2))
            source_sizes[:] = 0  # an unfilled slot is detected at end_split
        writer = SplitWriter(name, images, labels, list(class_names),
                             list(class_ids) if class_ids is not None else list(class_names),
                             train_images, source_sizes)
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
        if writer.source_sizes is not None and (np.asarray(writer.source_sizes) <= 0).any():
            raise RuntimeError(f"split {name!r}: source sizes of the training view were never written")
        per_class = np.bincount(labels, minlength=num_classes)
        writer.images.flush()
        writer.labels.flush()
        if writer.train_images is not None:
            writer.train_images.flush()
            writer.source_sizes.flush()
        atomic_write_json(self._tmp / name / "classes.json",
                           {"names": writer.class_names, "ids": writer.class_ids})
        complete = ((expected_classes is None or expected_classes == num_classes)
                    and (expected_images is None or expected_images == len(labels)))
        self.meta["splits"][name] = {
            "num_classes": num_classes,
            "num_images": int(len(labels)),
            # the real minimum (min(initial=0) was always 0); 0 only for a split without classes
            "images_per_class": {"min": int(per_class.min()) if num_classes else 0,
                                 "max": int(per_class.max()) if num_classes else 0},
            "shape": list(writer.images.shape[1:]),
            "train_shape": list(writer.train_images.shape[1:]) if writer.train_images is not None else None,
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
            for fname in ("images.npy", "labels.npy", *TRAIN_FILES):
                if (self._tmp / name / fname).is_file():
                    self.meta["checksums"][f"{name}/{fname}"] = _sha256(self._tmp / name / fname)
        atomic_write_json(self._tmp / "meta.json", self.meta)
        (self._tmp / _OWNER_FILE).unlink()
        _apply_default_modes(self._tmp)
        check_replaceable(self.out_dir, self._overwrite)  # again: --out may have appeared meanwhile
        old: Path | None = None
        with sigint_ignored():  # between the two renames the dataset exists only as .NAME.old-<pid>
            if os.path.lexists(self.out_dir):
                old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
                os.replace(self.out_dir, old)
            os.replace(self._tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            if os.path.lexists(old):
                warnings.warn(f"{old}: the replaced dataset could not be removed completely; remove it",
                              stacklevel=2)


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing folder at or above ``path`` (where a permission error actually is)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise PreparedDataError(f"{meta_path}: format version {meta.get('format_version')} is not supported "
                                f"(this s2m2 reads versions {READABLE_VERSIONS}); prepare the dataset again")
    return meta


def check_trainable(meta: dict[str, Any], root: str | os.PathLike) -> None:
    """Refuse to train on a folder prepared before the training view existed (format version 1) from a
    full-resolution source: its only images are the 92x92 squashed copies, and crops cut from them are
    mostly upsampled and aspect-distorted. Pre-shrunk sources (84-px Ravi / pickles, CIFAR, Omniglot) store
    the same bytes in both versions and are accepted."""
    if meta.get("format_version", FORMAT_VERSION) < 2 and meta.get("source_layout") in FULL_RESOLUTION_LAYOUTS:
        raise PreparedDataError(
            f"{root}: prepared by an older s2m2 (format version {meta.get('format_version')}) without the "
            f"full-resolution training view; prepare it again: s2m2 prepare {meta.get('dataset')} --source "
            f"<the original {meta.get('source')}> --out {root} --overwrite")


class PreparedSplit(torch.utils.data.Dataset):
    """One split of a prepared dataset, opened lazily (memory-mapped).

    ``dataset[i]`` returns ``(image, label)`` with image a uint8 tensor (C, H, W) and label an int.
    Training code should prefer whole-batch access: ``torch.from_numpy(split.images[idx])`` gives
    (B, H, W, C) uint8 without per-item Python overhead.

    Attributes:
        images: np.memmap uint8 (N, H, W, C), the evaluation view.
        train_images: np.memmap uint8 (N, T, T, C), the training view of a full-resolution source (the whole
            photo squashed to T x T), or None.
        source_sizes: np.ndarray int32 (N, 2), (height, width) of each original photo, or None (with
            train_images).
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
        self.train_images: np.ndarray | None = None
        self.source_sizes: np.ndarray | None = None
        if (split_dir / "train_images.npy").is_file():
            try:
                self.train_images = np.load(split_dir / "train_images.npy", mmap_mode="r")
                self.source_sizes = np.load(split_dir / "source_sizes.npy")
            except (OSError, ValueError) as err:
                raise PreparedDataError(f"{split_dir}: cannot read the training view ({err}); the prepared "
                                        f"folder is incomplete") from err
            if (self.train_images.ndim != 4 or self.train_images.dtype != np.uint8
                    or len(self.train_images) != len(self.labels) or self.source_sizes.shape != (len(self.labels), 2)):
                raise PreparedDataError(f"{split_dir}: training view {self.train_images.dtype} "
                                        f"{self.train_images.shape} / source sizes {self.source_sizes.shape} do "
                                        f"not match {len(self.labels)} images")
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
        files = ("images.npy", "labels.npy", *(TRAIN_FILES if self.train_images is not None else ()))
        text = "|".join(sums.get(f"{self.split}/{f}", "") for f in files)
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
