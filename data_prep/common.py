"""Shared pieces of every dataset preparation: errors, input sniffing, archive/pickle reading, split files,
image decoding/conversion and parallel decoding into a :class:`~s2m2.data.PreparedWriter` split.

Every dataset module builds a list of :class:`ImageItem` per split (where each image comes from and which
slot/label it gets), then calls :func:`write_split`, which decodes the images in a process pool and fills
the memory-mapped arrays. Writing, atomic rename, counts and checksums are the ``PreparedWriter``'s job.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import io
import mmap
import os
import pickle
import re
import signal
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from s2m2.data import PreparedWriter
from s2m2.data.prepared import sigint_ignored

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
#: few-shot split names of the prepared format, in the order they are written
FEWSHOT_SPLITS = ("base", "val", "novel")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PrepareError(RuntimeError):
    """A source file is missing, malformed, or does not match the split definition (message names it)."""


def default_workers() -> int:
    """Decoding processes used by default: both cores of a small machine, never more than 2 by default."""
    return max(1, min(2, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------------
# Sniffing and reading source files
# ------------------------------------------------------------------------------------------------
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")


def check_not_html(path: str | os.PathLike) -> None:
    """Raise when ``path`` is an HTML page saved under a data-file name (the classic failed download)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1024).lstrip().lower()
    if any(head.startswith(marker) for marker in _HTML_MARKERS) or b"<html" in head:
        raise PrepareError(f"{path}: this looks like an HTML page, probably a failed download "
                           f"(a web page saved under the data file's name); download the file again")


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    """Case-insensitive file-extension test (ILSVRC uses .JPEG, CUB .jpg)."""
    return name.lower().endswith(extensions)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise PrepareError(f"{path}: missing ({what})")
    return path


class _ProgressFile:
    """A binary file whose reads advance a progress bar (multi-GB pickles take minutes to load)."""

    def __init__(self, f: io.BufferedReader, bar: tqdm):
        self._f, self._bar = f, bar

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._bar.update(len(data))
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self._f.readline(size)
        self._bar.update(len(data))
        return data

    def readinto(self, buffer) -> int:
        count = self._f.readinto(buffer)
        self._bar.update(count or 0)
        return count


#: the only globals a published data pickle (mini-ImageNet caches, tiered-ImageNet pickles, CIFAR batches)
#: refers to: NumPy array / dtype / scalar reconstruction (``numpy.core`` in NumPy-1 files, ``numpy._core``
#: in NumPy-2 files) and ``_codecs.encode`` (how Python 3 writes bytes at protocol 2). Dicts, lists,
#: tuples, strings, bytes, numbers and None need no global at all.
SAFE_PICKLE_GLOBALS = frozenset({
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
      for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class RefusedPickleError(PrepareError):
    """A pickle asked for a global outside :data:`SAFE_PICKLE_GLOBALS` (it could run code if loaded)."""


class _DataUnpickler(pickle.Unpickler):
    """An Unpickler that builds only plain data and NumPy arrays; any other global raises
    RefusedPickleError before it is imported, so a malicious file cannot run code."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="latin1")  # latin1: Python-2 numpy arrays load
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise RefusedPickleError(
                f"{self.where}: refused to load: the pickle asks for {module}.{name}, which no published "
                f"dataset pickle contains (a pickle can run code when loaded); download the file again "
                f"from the official source")
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core." + module[len("numpy.core."):]  # NumPy 2 warns on numpy.core imports
        return getattr(importlib.import_module(module), name)


def restricted_load(file, where: str) -> Any:
    """``pickle.load`` admitting only plain data and NumPy arrays; ``where`` names the file in errors."""
    return _DataUnpickler(file, where).load()


def restricted_loads(data: bytes, where: str) -> Any:
    """:func:`restricted_load` from bytes (e.g. a CIFAR batch read from a tar member)."""
    return restricted_load(io.BytesIO(data), where)


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a data file written by Python 2 or 3 with :func:`restricted_load`.

    Raises PrepareError naming the file for an HTML page, a truncated file, something not a pickle, or a
    pickle asking for anything but plain data and NumPy arrays.
    """
    path = Path(path)
    require_file(path, "expected a pickle file")
    check_not_html(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, tqdm(total=size, desc=f"reading {path.name}", unit="B", unit_scale=True,
                                         leave=False, disable=size < (256 << 20)) as bar:
            return restricted_load(_ProgressFile(f, bar), str(path))
    except EOFError as err:
        raise PrepareError(f"{path}: the pickle ends early: the file is truncated (incomplete "
                           f"download?)") from err
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, MemoryError) as err:
        raise PrepareError(f"{path}: not a readable pickle ({type(err).__name__}: {err}); the file is "
                           f"corrupt or truncated") from err


def as_text(value: Any) -> Any:
    """bytes -> str (pickles written under Python 2, or re-pickled with ``encoding='bytes'``, hold bytes)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def text_keys(obj: dict) -> dict:
    """A pickled dict with its bytes keys decoded to str (both spellings appear in the wild)."""
    return {as_text(key): value for key, value in obj.items()}


def open_tar(path: str | os.PathLike) -> tarfile.TarFile:
    """Open a (compressed) tar archive, with clear errors for HTML pages and non-archives."""
    path = Path(path)
    require_file(path, "expected a tar archive")
    check_not_html(path)
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as err:
        reason = str(err).splitlines()[0].rstrip(":")   # tarfile lists every codec it tried, one per line
        raise PrepareError(f"{path}: not a readable tar archive ({reason}); the file is corrupt or "
                           f"truncated") from err


def iter_tar_members(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """Members of an open tar in archive order; a truncated archive (the usual interrupted download) is
    reported naming the archive."""
    try:
        yield from tar
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise PrepareError(f"{path}: the archive is truncated or corrupt ({type(err).__name__}: {err}); "
                           f"download it again") from err


def iter_tar_files(tar: tarfile.TarFile, path: Path) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """Stream (member, bytes) of the regular files of an open tar in archive order."""
    for member in iter_tar_members(tar, path):
        if not member.isfile():
            continue
        try:
            handle = tar.extractfile(member)
            assert handle is not None
            data = handle.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise PrepareError(f"{path}: the archive is truncated or corrupt at {member.name} "
                               f"({type(err).__name__}: {err}); download it again") from err
        yield member, data


def open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """Open a zip archive; HTML pages, truncated and non-zip files raise PrepareError naming the file."""
    path = Path(path)
    require_file(path, "expected a zip archive")
    check_not_html(path)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise PrepareError(f"{path}: not a readable zip archive ({err}); the file is corrupt or "
                           f"truncated (incomplete download?)") from err


def read_zip_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise PrepareError(f"{path}: member {name}: cannot be read ({err}); the archive is corrupt or "
                           f"truncated") from err


# ------------------------------------------------------------------------------------------------
# Split files shipped in data_prep/splits
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitFile:
    """A shipped split file: its path and the provenance recorded in meta.json."""

    path: Path

    @property
    def provenance(self) -> dict[str, str]:
        return {"file": self.path.relative_to(SPLITS_DIR).as_posix(),
                "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}

    def lines(self) -> list[str]:
        """Non-empty stripped lines."""
        return [line.strip() for line in self.path.read_text().splitlines() if line.strip()]


def split_file(*parts: str) -> SplitFile:
    path = SPLITS_DIR.joinpath(*parts)
    if not path.is_file():
        raise PrepareError(f"{path}: shipped split file missing (broken installation of data_prep)")
    return SplitFile(path)


def record_split_files(writer: PreparedWriter, files: dict[str, SplitFile]) -> None:
    """Store {split: {"file", "sha256"}} provenance of the split definition in meta.json."""
    writer.meta["split_files"] = {name: f.provenance for name, f in files.items()}


# ------------------------------------------------------------------------------------------------
# Image decoding
# ------------------------------------------------------------------------------------------------
#: an image payload: a file path (str), encoded bytes, or a decoded uint8 array (H, W[, C])
Payload = str | bytes | np.ndarray


@dataclass
class ImageItem:
    """One image to write: its slot in the split, its label, a name for errors, and where its pixels are."""

    index: int
    label: int
    name: str
    payload: Payload = field(repr=False)


@dataclass(frozen=True)
class DecodeSpec:
    """Target of decoding: ``size`` x ``size`` pixels with ``channels`` (1 grey, 3 RGB); with ``train_size``
    T also a training view (the whole image squashed to T x T) and the original (height, width)."""

    size: int
    channels: int = 3
    train_size: int | None = None


#: default side T of the training view of full-resolution sources (ILSVRC tree, CUB): RandomResizedCrop(80)
#: boxes of the original photo are cut from it. At 160 a crop is shrunk at most 2x (bilinear sampling then
#: averages 2x2 pixels, no aliasing) and ~20 % of crops are upsampled (at most 2x) instead of ~85 % from
#: the 92x92 view; 77 KB per image. Measured: docs/benchmarks.md, "Training crops at source resolution".
DEFAULT_TRAIN_RESOLUTION = 160


def train_size_for(layout_is_full_resolution: bool, train_resolution: int | None) -> int | None:
    """Side of the training view to store: ``train_resolution`` (0 = none), default
    :data:`DEFAULT_TRAIN_RESOLUTION` for full-resolution sources and none for pre-shrunk ones (an 84-px
    Ravi image or pickle has nothing more to give than images.npy)."""
    if train_resolution is None:
        return DEFAULT_TRAIN_RESOLUTION if layout_is_full_resolution else None
    if train_resolution == 0:
        return None
    if not 8 <= train_resolution <= 1024:
        raise PrepareError(f"--train-resolution {train_resolution}: expected 0 (none) or a size between 8 and "
                           f"1024 pixels")
    if not layout_is_full_resolution:
        raise PrepareError(f"--train-resolution {train_resolution}: this source is pre-shrunk (84 px or less); "
                           f"a training view is only made from full-resolution photos (ILSVRC tree, CUB)")
    return train_resolution


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to RGB (channels=3) or L (channels=1).

    Grayscale, CMYK, palette and alpha images are converted, not rejected. Transparent pixels are
    composited on white (for palette/alpha images the colour under a transparent pixel is arbitrary).
    """
    target = "RGB" if channels == 3 else "L"
    if image.mode == target:
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping (PIL's convert("L") clips at 255)
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray(np.round(array * (255.0 / peak)).astype(np.uint8), mode="L")
    return image.convert(target)


@dataclass
class Decoded:
    """One decoded image: the stored view uint8 (size, size, C), the training view uint8 (T, T, C) or None,
    and the original (height, width)."""

    image: np.ndarray
    train_image: np.ndarray | None
    source_size: tuple[int, int]


def decode_views(payload: Payload, name: str, spec: DecodeSpec) -> Decoded:
    """Decode one image once into its stored view and (``spec.train_size``) its training view, each resized
    from the original (PIL bilinear, aspect-distorting) only if its size differs.

    Raises PrepareError naming the image when it does not decode.
    """
    try:
        if isinstance(payload, np.ndarray):
            image = Image.fromarray(payload.squeeze(-1) if payload.ndim == 3 and payload.shape[-1] == 1
                                    else payload)
        else:
            image = Image.open(payload if isinstance(payload, str) else io.BytesIO(payload))
            image.load()
        image = to_mode(image, spec.channels)
        width, height = image.size
        views = []
        for size in (spec.size, spec.train_size):
            if size is None:
                views.append(None)
            elif image.size != (size, size):
                views.append(image.resize((size, size), Image.Resampling.BILINEAR))
            else:
                views.append(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise PrepareError(f"{name}: the image does not decode ({type(err).__name__}: {err})") from err
    arrays = [None if view is None else _as_hwc(np.asarray(view, dtype=np.uint8)) for view in views]
    return Decoded(arrays[0], arrays[1], (height, width))


def _as_hwc(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def decode_image(payload: Payload, name: str, spec: DecodeSpec) -> np.ndarray:
    """Decode one image to uint8 (size, size, channels), resizing (bilinear, aspect-distorting) if needed.

    Raises PrepareError naming the image when it does not decode.
    """
    return decode_views(payload, name, DecodeSpec(spec.size, spec.channels)).image


#: in a pool worker: the split's (images.npy, train_images.npy, source_sizes.npy) opened by _worker_init
#: (the last two None without a training view), that the worker decodes into
_TARGETS: tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None = None


@dataclass
class DecodedBatch:
    """Decoded pixels of a batch, in batch order: uint8 (B, size, size, C); training view uint8
    (B, T, T, C) and source sizes int32 (B, 2), or None without a training view."""

    images: np.ndarray
    train_images: np.ndarray | None
    source_sizes: np.ndarray | None


def _decode_batch(batch: list[tuple[int, str, Payload]],
                  spec: DecodeSpec) -> tuple[list[int], DecodedBatch | None]:
    """Decode a batch -> (slot indices, its DecodedBatch); in a worker with target files the pixels go
    straight into them and only the indices come back (None instead of the pixels)."""
    n, c, t = len(batch), spec.channels, spec.train_size
    out = DecodedBatch(np.empty((n, spec.size, spec.size, c), dtype=np.uint8),
                       np.empty((n, t, t, c), dtype=np.uint8) if t else None,
                       np.empty((n, 2), dtype=np.int32) if t else None)
    for row, (_, name, payload) in enumerate(batch):
        decoded = decode_views(payload, name, spec)
        out.images[row] = decoded.image
        if t:
            out.train_images[row] = decoded.train_image
            out.source_sizes[row] = decoded.source_size
    indices = [index for index, _, _ in batch]
    if _TARGETS is None:
        return indices, out
    _store(_TARGETS, indices, out)
    return indices, None


def _store(targets: tuple[np.ndarray, np.ndarray | None, np.ndarray | None], indices: list[int],
           decoded: DecodedBatch) -> None:
    """Write a decoded batch into its slots of (images, train_images, source_sizes)."""
    images, train_images, source_sizes = targets
    images[indices] = decoded.images
    if train_images is not None:
        train_images[indices] = decoded.train_images
        source_sizes[indices] = decoded.source_sizes


def _batches(items: Iterable[ImageItem], batch_size: int) -> Iterator[list[tuple[int, str, Payload]]]:
    batch: list[tuple[int, str, Payload]] = []
    for item in items:
        batch.append((item.index, item.name, item.payload))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


#: below this many images a split is decoded in-process: starting workers and shipping bytes costs more
#: than it saves (measured on the 800-image mini-ImageNet sample, see docs/benchmarks/prepare.md)
MIN_POOL_IMAGES = 1000


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """Thread body: end this worker once its parent is gone (fallback where PR_SET_PDEATHSIG is missing)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_init(parent: int, targets: tuple[str, str | None, str | None] | None) -> None:
    """Pool initializer: a worker never outlives the preparing process, leaves Ctrl-C to it, and writes its
    results into ``targets`` (the split's images.npy, train_images.npy, source_sizes.npy) when given.

    Why write into the file: a result message then holds only slot indices, well under PIPE_BUF, so it is
    written atomically; a worker terminated while sending a megabyte of pixels would leave a half-written
    message on which the pool's manager thread blocks forever (and the interpreter's exit with it).

    Ctrl-C in a terminal reaches the whole process group; a worker that died of it would break the pool
    (and, before 3.12, hang its shutdown), so workers ignore SIGINT and the parent terminates them.
    SIGTERM gets its default action back: a forked worker inherits the parent's SIGTERM handler.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    global _TARGETS
    if targets is not None:
        _TARGETS = tuple(None if path is None else np.load(path, mmap_mode="r+")  # type: ignore[assignment]
                         for path in targets)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """End ``pool`` now (Ctrl-C, SIGTERM, a decode error): drop queued batches and terminate the workers.

    Never ``shutdown(wait=True)`` here: it waits for every batch in flight, and never ``Future.cancel()``
    by hand: a cancelled future that the pool later marks broken raises InvalidStateError in its manager
    thread, which then never stops the other workers (the atexit join hangs forever).
    """
    workers = list((pool._processes or {}).values())  # the executor has no public way to kill its workers
    manager = pool._executor_manager_thread
    with sigint_ignored():
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()
        for process in workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        if manager is not None:
            manager.join(timeout=5)


def _test_signal(done: int, pool: ProcessPoolExecutor) -> None:
    """Test hook for the interrupt tests: with ``S2M2_PREPARE_TEST_SIGNAL=INT@N`` (or ``KILL@N``, ``TERM@N``)
    send that signal to this process once N images are stored (SIGINT to the whole process group when this
    process leads one, like Ctrl-C in a terminal), after writing this process's and the workers' pids to
    ``S2M2_PREPARE_TEST_PIDFILE``. A deterministic interrupt mid-decode, instead of a sleep race."""
    spec = os.environ.get("S2M2_PREPARE_TEST_SIGNAL")
    if not spec:
        return
    name, at = spec.split("@")
    if done < int(at):
        return
    del os.environ["S2M2_PREPARE_TEST_SIGNAL"]  # once
    if pidfile := os.environ.get("S2M2_PREPARE_TEST_PIDFILE"):
        pids = [os.getpid(), *(p.pid for p in (pool._processes or {}).values())]
        Path(pidfile).write_text(" ".join(map(str, pids)) + "\n")
    signum = getattr(signal, f"SIG{name}")
    if signum == signal.SIGINT and os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signum)
    else:
        os.kill(os.getpid(), signum)


def _memmap_file(array: np.ndarray | None) -> str | None:
    """The .npy file behind a whole memory-mapped array (not a view of one: a worker reopens the whole
    file), else None."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap):
        return array.filename
    return None


def decode_into(images: np.ndarray, items: Iterable[ImageItem], total: int, spec: DecodeSpec, *,
                workers: int, desc: str, batch_size: int = 64, train_images: np.ndarray | None = None,
                source_sizes: np.ndarray | None = None) -> None:
    """Decode ``items`` into ``images[item.index]`` (uint8 (N, size, size, C)), in a process pool; with
    ``spec.train_size`` T also into ``train_images[item.index]`` (uint8 (N, T, T, C)) and
    ``source_sizes[item.index]`` (int32 (N, 2), original (height, width)).

    ``items`` may be a lazy stream (e.g. members read from a tar archive): at most ``2 * workers`` batches
    are in flight, so memory stays bounded whatever the dataset size. Results are written by slot index,
    so the output does not depend on the number of workers or on completion order.

    On any exception (a worker's PrepareError, Ctrl-C, SIGTERM turned into KeyboardInterrupt) the workers
    are terminated before it propagates; workers also die with this process if it is killed.
    """
    if bool(spec.train_size) != (train_images is not None) or (train_images is None) != (source_sizes is None):
        raise ValueError("spec.train_size needs train_images and source_sizes (and only then)")
    targets = (images, train_images, source_sizes)
    progress = tqdm(total=total, desc=desc, unit="img", leave=False, disable=total < 500)
    try:
        if workers <= 1 or total < MIN_POOL_IMAGES:
            for batch in _batches(items, batch_size):
                indices, decoded = _decode_batch(batch, spec)
                _store(targets, indices, decoded)
                progress.update(len(indices))
            return
        files = tuple(_memmap_file(a) for a in targets)
        # workers write into the files only when every target is a whole memory-mapped file
        worker_targets = files if all(f is not None for f, a in zip(files, targets) if a is not None) else None
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                                   initargs=(os.getpid(), worker_targets))
        pending: set[Future] = set()
        stored = 0

        def drain(until: int) -> None:
            nonlocal pending, stored
            while len(pending) > until:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    indices, decoded = future.result()  # re-raises a worker's PrepareError
                    if decoded is not None:  # else the worker wrote them into the memory-mapped files
                        _store(targets, indices, decoded)
                    progress.update(len(indices))
                    stored += len(indices)
                    _test_signal(stored, pool)

        try:
            for batch in _batches(items, batch_size):
                pending.add(pool.submit(_decode_batch, batch, spec))
                drain(2 * workers)
            drain(0)
        except BaseException:
            _stop_pool(pool)
            raise
        pool.shutdown(wait=True)
    finally:
        progress.close()


def write_split(writer: PreparedWriter, split: str, items: Sequence[ImageItem] | Iterable[ImageItem], *,
                num_images: int, spec: DecodeSpec, class_names: list[str], class_ids: list[str],
                labels: np.ndarray, workers: int, expected_classes: int | None,
                expected_images: int | None) -> None:
    """Write one split: allocate it, decode every item into its slot, set the labels, validate.

    Args:
        items: one ImageItem per slot 0..num_images-1 (any order, may be a lazy stream).
        labels: int64 (num_images,) split-local labels in slot order.
    """
    out = writer.begin_split(split, num_images=num_images, height=spec.size, width=spec.size,
                             channels=spec.channels, class_names=class_names, class_ids=class_ids,
                             train_size=spec.train_size)
    decode_into(out.images, items, num_images, spec, workers=workers,
                desc=f"{writer.meta['dataset']}/{split}", train_images=out.train_images,
                source_sizes=out.source_sizes)
    out.labels[:] = labels
    writer.end_split(split, expected_classes=expected_classes, expected_images=expected_images)


@dataclass
class ClassImages:
    """The images found for one class: id (wnid, folder name), human-readable name, payloads."""

    class_id: str
    name: str
    images: list[tuple[str, Payload]]  # (name for errors, payload) in a deterministic order


def items_from_classes(classes: list[ClassImages]) -> tuple[list[ImageItem], np.ndarray]:
    """Flatten classes (already in label order) into slot-ordered items and their int64 labels."""
    items: list[ImageItem] = []
    for label, cls in enumerate(classes):
        for name, payload in cls.images:
            items.append(ImageItem(len(items), label, name, payload))
    labels = np.fromiter((item.label for item in items), dtype=np.int64, count=len(items))
    return items, labels


def write_class_split(writer: PreparedWriter, split: str, classes: list[ClassImages], *, spec: DecodeSpec,
                      workers: int, expected_classes: int | None, expected_images: int | None) -> None:
    """Write a split whose classes are listed in label order (sorted by class id by the caller)."""
    items, labels = items_from_classes(classes)
    write_split(writer, split, items, num_images=len(items), spec=spec,
                class_names=[c.name for c in classes], class_ids=[c.class_id for c in classes],
                labels=labels, workers=workers, expected_classes=expected_classes,
                expected_images=expected_images)


def write_array_split(writer: PreparedWriter, split: str, images: np.ndarray, order: np.ndarray,
                      labels: np.ndarray, *, spec: DecodeSpec, class_names: list[str], class_ids: list[str],
                      workers: int, names: Sequence[str], expected_classes: int | None,
                      expected_images: int | None, chunk: int = 4096) -> None:
    """Write a split whose pixels are already decoded (pickled uint8 arrays).

    Args:
        images: uint8 (M, H, W, C), the whole source array (not copied).
        order: int64 (N,) rows of ``images`` in slot order; labels: int64 (N,) in slot order.
        names: (N,) how each image is named in errors.

    At the native size rows are copied chunk by chunk (vectorised, no second copy of the whole split in
    RAM); at another ``--resolution`` each image is resized like a decoded file (PIL bilinear) in the
    process pool.
    """
    _, h, w, c = images.shape
    n = len(order)
    if (h, w) == (spec.size, spec.size) and c == spec.channels and not spec.train_size:
        out = writer.begin_split(split, num_images=n, height=h, width=w, channels=c,
                                 class_names=class_names, class_ids=class_ids)
        for start in range(0, n, chunk):
            out.images[start:start + chunk] = images[order[start:start + chunk]]
        out.labels[:] = labels
        writer.end_split(split, expected_classes=expected_classes, expected_images=expected_images)
        return
    items = (ImageItem(slot, int(labels[slot]), names[slot], images[row]) for slot, row in enumerate(order))
    write_split(writer, split, items, num_images=n, spec=spec, class_names=class_names, class_ids=class_ids,
                labels=labels, workers=workers, expected_classes=expected_classes,
                expected_images=expected_images)


# ------------------------------------------------------------------------------------------------
# Checking a source against a split definition
# ------------------------------------------------------------------------------------------------
def check_classes(found: Iterable[str], splits: dict[str, list[str]], *, source: Path, split_desc: str,
                  allow_extra: bool = False) -> dict[str, list[str]]:
    """Match the classes found in a source against the split definition.

    Returns {split: sorted class ids present}. Classes in the source but in no split are an error
    (unless ``allow_extra``, e.g. an ILSVRC tree holds 1000 classes); a split with none of its classes
    present means the split file does not match the source (error). Missing classes are allowed here
    (a subset source); the writer records the found vs expected counts as a warning.
    """
    found_set = set(found)
    known = {c for classes in splits.values() for c in classes}
    extra = sorted(found_set - known)
    if extra and not allow_extra:
        raise PrepareError(f"{source}: {len(extra)} classes are not in the split definition ({split_desc}): "
                           f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}; the source and the "
                           f"split file do not match")
    present: dict[str, list[str]] = {}
    for split, classes in splits.items():
        present[split] = sorted(c for c in classes if c in found_set)
        if not present[split]:
            raise PrepareError(f"{source}: none of the {len(classes)} {split} classes of {split_desc} is "
                               f"present (e.g. {classes[0]!r}); the source and the split file do not match")
    return present


# ------------------------------------------------------------------------------------------------
# ILSVRC-2012 train tree (mini- and tiered-ImageNet rebuilt from full resolution)
# ------------------------------------------------------------------------------------------------
_WNID = re.compile(r"^n\d{8}$")
_ILSVRC_NUMBER = re.compile(r"_(\d+)\.[A-Za-z]+$")


def is_wnid(name: str) -> bool:
    """``n01532829``-style WordNet id (an ILSVRC class folder name)."""
    return bool(_WNID.match(name))


def find_ilsvrc_tree(root: Path) -> Path | None:
    """The ILSVRC train tree (a folder of ``nXXXXXXXX/`` class folders) at ``root/train`` or ``root``."""
    for tree in (root / "train", root):
        if tree.is_dir() and any(is_wnid(p.name) and p.is_dir() for p in tree.iterdir()):
            return tree
    return None


def _ilsvrc_number(path: Path) -> int:
    match = _ILSVRC_NUMBER.search(path.name)
    if not match:
        raise PrepareError(f"{path}: not an ILSVRC train image name (expected nXXXXXXXX_<number>.JPEG); for "
                           f"Ravi-named images (nXXXXXXXXNNNNNNNN.jpg) give the folder holding images/ or "
                           f"train/ val/ test/ (see docs/data.md)")
    return int(match.group(1))


def ilsvrc_class_images(folder: Path) -> list[Path]:
    """A class folder's images sorted by the number in their file name ``nXXXXXXXX_<number>.JPEG``
    (numerically: ``_9`` before ``_10``), the order the mini-ImageNet CSV indices refer to."""
    return sorted((p for p in folder.iterdir() if has_extension(p.name, IMAGE_EXTENSIONS)),
                  key=_ilsvrc_number)
