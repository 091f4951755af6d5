"""CIFAR-FS (Bertinetto et al.: 64 / 16 / 20 CIFAR-100 classes) and FC100 (Oreshkin et al.: 60 / 20 / 20
classes, split by superclass 12 / 4 / 4) from the CIFAR-100 files users download.

Source layouts:

* ``cifar-python``: the official ``cifar-100-python.tar.gz``, or its extracted ``cifar-100-python/`` folder
  (pickles ``train``, ``test``, ``meta``). Both official subsets are used: 500 train + 100 test images per
  class = 600, as in every CIFAR-FS / FC100 paper.
* ``r2d2``: the R2D2 folder layout ``data/<class name>/*.png`` (+ ``splits/bertinetto/*.txt``, checked against
  the shipped CIFAR-FS split when present).

The split definitions are the shipped ``data_prep/splits/{cifar_fs,fc100}/{train,val,test}.txt`` (fine class
names). Images are stored at the native 32x32 by default. Labels are split-local in sorted-name order;
class names and ids are the CIFAR-100 fine label names. Within a class, images keep source order (train
records then test records in file order; sorted file names for the R2D2 layout).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.common import (FEWSHOT_SPLITS, ClassImages, DecodeSpec, PrepareError, SplitFile, as_text,
                              check_classes, check_not_html, iter_tar_files, open_tar, record_split_files,
                              restricted_loads, split_file, text_keys, write_array_split,
                              write_class_split)
from s2m2.data import PreparedWriter

NATIVE_SIZE = 32
IMAGES_PER_CLASS = 600
FILE_SPLITS = {"base": "train", "val": "val", "novel": "test"}


@dataclass(frozen=True)
class Variant:
    """CIFAR-FS or FC100: the dataset name, its split-file folder and expected class counts."""

    dataset: str
    split_dir: str
    expected_classes: dict[str, int]


CIFAR_FS = Variant("cifar-fs", "cifar_fs", {"base": 64, "val": 16, "novel": 20})
FC100 = Variant("fc100", "fc100", {"base": 60, "val": 20, "novel": 20})


@dataclass
class CifarArrays:
    """The decoded CIFAR-100 python pickles: train and test concatenated (train first)."""

    images: np.ndarray        # uint8 (N, 32, 32, 3)
    fine: np.ndarray          # int64 (N,)
    coarse: np.ndarray        # int64 (N,)
    fine_names: list[str]     # 100
    coarse_names: list[str]   # 20
    origin: list[str]         # per record "file[index]" for error messages


def load_split_classes(variant: Variant) -> tuple[dict[str, list[str]], dict[str, SplitFile]]:
    files = {fs: split_file(variant.split_dir, f"{name}.txt") for fs, name in FILE_SPLITS.items()}
    return {fs: f.lines() for fs, f in files.items()}, files


# -- official python pickles -------------------------------------------------------------------------
def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = restricted_loads(data, where)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as err:
        raise PrepareError(f"{where}: not a readable CIFAR pickle ({type(err).__name__}: {err}); the file is "
                           f"corrupt or truncated") from err
    if not isinstance(obj, dict):
        raise PrepareError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return text_keys(obj)


def read_cifar_python(source: Path) -> tuple[dict[str, dict], str]:
    """{'train','test','meta': dict} from the tarball or the extracted folder; also a printable origin."""
    raw: dict[str, bytes] = {}
    if source.is_file():
        with open_tar(source) as tar:
            for member, data in iter_tar_files(tar, source):
                name = Path(member.name).name
                if name in ("train", "test", "meta"):
                    raw[name] = data
        where = f"{source}:cifar-100-python/"
    else:
        folder = source / "cifar-100-python" if (source / "cifar-100-python").is_dir() else source
        for name in ("train", "test", "meta"):
            if (folder / name).is_file():
                check_not_html(folder / name)
                raw[name] = (folder / name).read_bytes()
        where = f"{folder}/"
    missing = sorted({"train", "test", "meta"} - set(raw))
    if missing:
        raise PrepareError(f"{source}: missing CIFAR-100 file(s) {missing} (expected cifar-100-python/train, "
                           f"test and meta)")
    return {name: _unpickle(data, where + name) for name, data in raw.items()}, where


def _field(obj: dict, key: str, where: str):
    if key not in obj:
        raise PrepareError(f"{where}: key {key!r} missing (has {sorted(obj)})")
    return obj[key]


def load_cifar_arrays(source: Path) -> CifarArrays:
    pickles, where = read_cifar_python(source)
    meta = pickles["meta"]
    fine_names = [as_text(n) for n in _field(meta, "fine_label_names", where + "meta")]
    coarse_names = [as_text(n) for n in _field(meta, "coarse_label_names", where + "meta")]
    if len(fine_names) != 100:
        raise PrepareError(f"{where}meta: expected 100 fine_label_names, got {len(fine_names)} (is this "
                           f"CIFAR-100?)")
    images, fine, coarse, origin = [], [], [], []
    for name in ("train", "test"):
        obj = pickles[name]
        data = np.asarray(_field(obj, "data", where + name))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise PrepareError(f"{where}{name}: 'data' should be uint8 (N, 3072), got {data.dtype} "
                               f"{data.shape}")
        f = np.asarray(_field(obj, "fine_labels", where + name), dtype=np.int64)
        c = np.asarray(_field(obj, "coarse_labels", where + name), dtype=np.int64)
        if len(f) != len(data) or len(c) != len(data):
            raise PrepareError(f"{where}{name}: {len(data)} images but {len(f)} fine / {len(c)} coarse "
                               f"labels")
        if len(f) and (f.min() < 0 or f.max() >= 100):
            raise PrepareError(f"{where}{name}: fine label {f.max()} out of range 0..99")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW planes -> HWC
        fine.append(f)
        coarse.append(c)
        origin += [f"{where}{name}[{i}]" for i in range(len(data))]
    return CifarArrays(np.concatenate(images), np.concatenate(fine), np.concatenate(coarse), fine_names,
                       coarse_names, origin)


def check_fc100_superclasses(arrays: CifarArrays, splits: dict[str, list[str]]) -> dict[str, list[str]]:
    """FC100 splits by superclass: check each split's fine classes are exactly its superclasses' classes."""
    coarse_of = {arrays.fine_names[f]: arrays.coarse_names[c]
                 for f, c in set(zip(arrays.fine.tolist(), arrays.coarse.tolist()))}
    superclasses = {}
    for fs, name in FILE_SPLITS.items():
        expected = split_file(FC100.split_dir, f"{name}_superclasses.txt").lines()
        found = sorted({coarse_of[c] for c in splits[fs] if c in coarse_of})
        if found != sorted(expected):
            raise PrepareError(f"{split_file(FC100.split_dir, f'{name}.txt').path}: its classes belong to "
                               f"superclasses {found}, expected {sorted(expected)}")
        superclasses[fs] = sorted(expected)
    return superclasses


def prepare_python(source: Path, writer: PreparedWriter, variant: Variant, splits: dict[str, list[str]],
                   spec: DecodeSpec, workers: int) -> None:
    arrays = load_cifar_arrays(source)
    unknown = sorted({c for classes in splits.values() for c in classes} - set(arrays.fine_names))
    if unknown:
        raise PrepareError(f"{variant.split_dir} split files name classes that are not CIFAR-100 fine labels "
                           f"of {source}: {unknown[:5]}; the split file does not match the source")
    present_ids = {arrays.fine_names[i] for i in np.unique(arrays.fine)}
    found = check_classes(present_ids, splits, source=source, split_desc=f"splits/{variant.split_dir}")
    if variant is FC100:
        writer.meta["superclasses"] = check_fc100_superclasses(arrays, splits)
    index_of = {name: i for i, name in enumerate(arrays.fine_names)}
    for fs in FEWSHOT_SPLITS:
        names = found[fs]
        per_class = [np.flatnonzero(arrays.fine == index_of[n]) for n in names]  # source order in each class
        order = np.concatenate(per_class)
        labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(p) for p in per_class])
        write_array_split(writer, fs, arrays.images, order, labels, spec=spec, class_names=names,
                          class_ids=names, workers=workers, names=[arrays.origin[i] for i in order],
                          expected_classes=variant.expected_classes[fs],
                          expected_images=variant.expected_classes[fs] * IMAGES_PER_CLASS)


# -- R2D2 folders ------------------------------------------------------------------------------------
def prepare_r2d2(root: Path, writer: PreparedWriter, variant: Variant, splits: dict[str, list[str]],
                 spec: DecodeSpec, workers: int) -> None:
    data_dir = root / "data"
    if variant is CIFAR_FS:  # the download's own Bertinetto split files must agree with ours
        for fs, name in FILE_SPLITS.items():
            path = root / "splits" / "bertinetto" / f"{name}.txt"
            if path.is_file():
                check_not_html(path)
                theirs = [line.strip() for line in path.read_text().splitlines() if line.strip()]
                if sorted(theirs) != sorted(splits[fs]):
                    diff = sorted(set(theirs) ^ set(splits[fs]))
                    raise PrepareError(f"{path}: does not match the CIFAR-FS {name} split (differs in "
                                       f"{diff[:5]}); the split file does not match")
    folders = {p.name: p for p in data_dir.iterdir() if p.is_dir()}
    found = check_classes(folders, splits, source=data_dir, split_desc=f"splits/{variant.split_dir}")
    for fs in FEWSHOT_SPLITS:
        classes = [ClassImages(n, n, [(str(p), str(p)) for p in sorted(folders[n].glob("*.png"))])
                   for n in found[fs]]
        write_class_split(writer, fs, classes, spec=spec, workers=workers,
                          expected_classes=variant.expected_classes[fs],
                          expected_images=variant.expected_classes[fs] * IMAGES_PER_CLASS)


def prepare_variant(variant: Variant, source: Path, out: Path, *, resolution: int | None = None,
                    overwrite: bool = False, workers: int = 2) -> Path:
    if source.is_dir() and (source / "data").is_dir():
        layout = "r2d2"
    elif source.is_file() or (source / "cifar-100-python").is_dir() or (source / "meta").is_file():
        layout = "cifar-python"
    elif source.is_dir() and (source / "cifar-100-python.tar.gz").is_file():
        source, layout = source / "cifar-100-python.tar.gz", "cifar-python"
    else:
        raise PrepareError(f"{source}: no CIFAR-100 source found: expected cifar-100-python.tar.gz, its "
                           f"extracted cifar-100-python/ folder, or the R2D2 layout data/<class>/*.png")
    splits, files = load_split_classes(variant)
    spec = DecodeSpec(resolution or NATIVE_SIZE, 3)
    with PreparedWriter(out, dataset=variant.dataset, source=source, source_layout=layout,
                        resolution=spec.size, overwrite=overwrite) as writer:
        record_split_files(writer, files)
        if layout == "r2d2":
            prepare_r2d2(source, writer, variant, splits, spec, workers)
        else:
            prepare_python(source, writer, variant, splits, spec, workers)
    return out
