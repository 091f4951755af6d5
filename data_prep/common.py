"""Shared pieces of every dataset preparation: errors, input sniffing, archive/pickle reading, split files,
image decoding/conversion and parallel decoding into a :class:`~s2m2.data.PreparedWriter` split.

Every dataset module builds a list of :class:`ImageItem` per split (where each image comes from and which
slot/label it gets), then calls :func:`write_split`, which decodes the images in a process pool and fills
the memory-mapped arrays. Writing, atomic rename, counts and checksums are the ``PreparedWriter``'s job.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
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


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle a data file written by Python 2 or 3 (``latin1`` so Python-2 numpy arrays load).

    Raises PrepareError naming the file for an HTML page, a truncated file, or something not a pickle.
    """
    path = Path(path)
    require_file(path, "expected a pickle file")
    check_not_html(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, tqdm(total=size, desc=f"reading {path.name}", unit="B", unit_scale=True,
                                         leave=False, disable=size < (256 << 20)) as bar:
            return pickle.load(_ProgressFile(f, bar), encoding="latin1")
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
        raise PrepareError(f"{path}: not a readable tar archive ({err}); the file is corrupt or "
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
    """Target of decoding: ``size`` x ``size`` pixels with ``channels`` (1 grey, 3 RGB)."""

    size: int
    channels: int = 3


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


def decode_image(payload: Payload, name: str, spec: DecodeSpec) -> np.ndarray:
    """Decode one image to uint8 (size, size, channels), resizing (bilinear, aspect-distorting) if needed.

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
        if image.size != (spec.size, spec.size):
            image = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise PrepareError(f"{name}: the image does not decode ({type(err).__name__}: {err})") from err
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _decode_batch(batch: list[tuple[int, str, Payload]], spec: DecodeSpec) -> tuple[list[int], np.ndarray]:
    """Worker: decode a batch -> (slot indices, uint8 (B, size, size, C))."""
    out = np.empty((len(batch), spec.size, spec.size, spec.channels), dtype=np.uint8)
    for row, (_, name, payload) in enumerate(batch):
        out[row] = decode_image(payload, name, spec)
    return [index for index, _, _ in batch], out


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


def decode_into(images: np.ndarray, items: Iterable[ImageItem], total: int, spec: DecodeSpec, *,
                workers: int, desc: str, batch_size: int = 64) -> None:
    """Decode ``items`` into ``images[item.index]`` (uint8 (N, size, size, C)), in a process pool.

    ``items`` may be a lazy stream (e.g. members read from a tar archive): at most ``2 * workers`` batches
    are in flight, so memory stays bounded whatever the dataset size. Results are written by slot index,
    so the output does not depend on the number of workers or on completion order.
    """
    progress = tqdm(total=total, desc=desc, unit="img", leave=False, disable=total < 500)
    try:
        if workers <= 1 or total < MIN_POOL_IMAGES:
            for batch in _batches(items, batch_size):
                indices, decoded = _decode_batch(batch, spec)
                images[indices] = decoded
                progress.update(len(indices))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: set[Future] = set()

            def drain(until: int) -> None:
                nonlocal pending
                while len(pending) > until:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        indices, decoded = future.result()  # re-raises a worker's PrepareError
                        images[indices] = decoded
                        progress.update(len(indices))

            try:
                for batch in _batches(items, batch_size):
                    pending.add(pool.submit(_decode_batch, batch, spec))
                    drain(2 * workers)
                drain(0)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
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
                             channels=spec.channels, class_names=class_names, class_ids=class_ids)
    decode_into(out.images, items, num_images, spec, workers=workers,
                desc=f"{writer.meta['dataset']}/{split}")
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
    if (h, w) == (spec.size, spec.size) and c == spec.channels:
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
        raise PrepareError(f"{path}: not an ILSVRC train image name (expected nXXXXXXXX_<number>.JPEG)")
    return int(match.group(1))


def ilsvrc_class_images(folder: Path) -> list[Path]:
    """A class folder's images sorted by the number in their file name ``nXXXXXXXX_<number>.JPEG``
    (numerically: ``_9`` before ``_10``), the order the mini-ImageNet CSV indices refer to."""
    return sorted((p for p in folder.iterdir() if has_extension(p.name, IMAGE_EXTENSIONS)),
                  key=_ilsvrc_number)
