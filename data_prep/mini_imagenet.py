"""mini-ImageNet (Ravi & Larochelle split: 64 / 16 / 20 classes x 600 images) from three source layouts.

* ``ravi``: a folder with a flat ``images/`` of 84x84 JPEGs named ``nXXXXXXXXNNNNNNNN.jpg`` and (optionally)
  ``train.csv`` / ``val.csv`` / ``test.csv``; stored at the native 84x84 by default.
* ``ravi-folders``: the same Ravi-named JPEGs sorted into ``train/ val/ test/<wnid>/`` folders (a common
  mirror layout); each file is placed by its name, as in ``ravi``, and must sit in the folder of its split.
* ``pickle``: ``mini-imagenet-cache-{train,validation,test}.pkl`` (dict with ``image_data`` uint8
  (N, 84, 84, 3) and ``class_dict`` wnid -> list of row indices); native 84x84 by default.
* ``ilsvrc``: the ILSVRC-2012 train tree (``[train/]nXXXXXXXX/nXXXXXXXX_<number>.JPEG``), rebuilt from full
  resolution and resized to 92x92 by default, plus a training view (each photo squashed to 160x160 by
  default, and its original size) that training crops are cut from in the photo's coordinates. A CSV
  name ``nXXXXXXXX`` + ``NNNNNNNN`` means the NNNNNNNN-th (1-based) image of class nXXXXXXXX when its
  train images are sorted by the number in their file name.

The split definition is always the shipped Ravi CSVs (``data_prep/splits/mini_imagenet/ravi``); CSVs found
in the source are checked against them. Splits: train -> ``base``, val -> ``val``, test -> ``novel``.
Labels are split-local, in sorted-wnid order; class names are the WordNet words.
"""

from __future__ import annotations

import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.common import (FEWSHOT_SPLITS, IMAGE_EXTENSIONS, ClassImages, DecodeSpec, PrepareError,
                              SplitFile, check_classes, check_not_html, find_ilsvrc_tree, has_extension,
                              ilsvrc_class_images, is_wnid, load_pickle, record_split_files, split_file,
                              text_keys, train_size_for, write_array_split, write_class_split)
from s2m2.data import PreparedWriter

DATASET = "mini-imagenet"
NATIVE_SIZE = 84       # Ravi images and the pickles are pre-shrunk to 84x84
FULL_RES_SIZE = 92     # = the release's test Resize((92, 92)) before its centre crop 80
CSV_SPLITS = {"base": "train", "val": "val", "novel": "test"}
PICKLE_SPLITS = {"base": "train", "val": "validation", "novel": "test"}
EXPECTED_CLASSES = {"base": 64, "val": 16, "novel": 20}
IMAGES_PER_CLASS = 600
_RAVI_NAME = re.compile(r"^(n\d{8})(\d{8})\.jpg$")


@dataclass(frozen=True)
class RaviSplit:
    """The shipped Ravi split: per few-shot split, the CSV rows (file name, wnid), the sorted class wnids
    and the CSV file."""

    rows: dict[str, list[tuple[str, str]]]
    classes: dict[str, list[str]]
    files: dict[str, SplitFile]
    words: dict[str, str]  # wnid -> WordNet words


def read_csv_rows(path: Path) -> list[tuple[str, str]]:
    """Rows (filename, wnid) of a Ravi CSV (header ``filename,label``); errors name the file and line."""
    check_not_html(path)
    rows = []
    with open(path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or (line_no == 1 and row[0] == "filename"):
                continue
            if len(row) != 2 or not _RAVI_NAME.match(row[0]) or row[0][:9] != row[1]:
                raise PrepareError(f"{path}:{line_no}: expected 'nXXXXXXXXNNNNNNNN.jpg,nXXXXXXXX', got "
                                   f"{','.join(row)!r}")
            rows.append((row[0], row[1]))
    return rows


def load_ravi_split() -> RaviSplit:
    files = {split: split_file("mini_imagenet", "ravi", f"{name}.csv") for split, name in CSV_SPLITS.items()}
    rows = {split: read_csv_rows(f.path) for split, f in files.items()}
    with open(split_file("mini_imagenet", "ravi", "class_names.csv").path, newline="") as f:
        words = {row["wnid"]: row["words"] for row in csv.DictReader(f)}
    classes = {split: sorted({wnid for _, wnid in split_rows}) for split, split_rows in rows.items()}
    return RaviSplit(rows, classes, files, words)


def detect_layout(source: Path) -> tuple[str, Path]:
    """-> (layout, root folder). Raises PrepareError listing what was expected."""
    root = source.parent if source.is_file() else source
    if source.is_file() and not source.name.startswith("mini-imagenet-cache-"):
        raise PrepareError(f"{source}: not a mini-ImageNet source; give a folder (Ravi layout with images/, "
                           f"the mini-imagenet-cache-*.pkl pickles, or the ILSVRC train tree)")
    if any((root / f"mini-imagenet-cache-{name}.pkl").exists() for name in PICKLE_SPLITS.values()):
        return "pickle", root
    if (root / "images").is_dir():
        return "ravi", root
    if has_ravi_folders(root):  # before the ILSVRC test: train/<wnid>/ folders look like an ILSVRC tree
        return "ravi-folders", root
    if (tree := find_ilsvrc_tree(root)) is not None:
        return "ilsvrc", tree
    raise PrepareError(f"{source}: no mini-ImageNet layout found: expected images/ + train/val/test.csv "
                       f"(Ravi), train/ val/ test/<wnid>/ of Ravi-named JPEGs, "
                       f"mini-imagenet-cache-{{train,validation,test}}.pkl, or an ILSVRC train tree of "
                       f"nXXXXXXXX/ class folders")


def _class(wnid: str, split: RaviSplit, images: list) -> ClassImages:
    return ClassImages(wnid, split.words.get(wnid, wnid), images)


# -- Ravi folder ---------------------------------------------------------------------------------
def has_ravi_folders(root: Path) -> bool:
    """True for ``train|val|test/<wnid>/`` folders holding Ravi-named ``nXXXXXXXXNNNNNNNN.jpg`` files."""
    for folder in (root / name for name in CSV_SPLITS.values()):
        if not folder.is_dir():
            continue
        for cls in folder.iterdir():
            if cls.is_dir() and is_wnid(cls.name):
                first = next((f.name for f in cls.iterdir() if has_extension(f.name, IMAGE_EXTENSIONS)), None)
                if first is not None:
                    return bool(_RAVI_NAME.match(first))
    return False


def ravi_flat_images(root: Path) -> dict[str, Path]:
    """File name -> path of the images in a flat ``images/`` folder."""
    images_dir = root / "images"
    return {p.name: p for p in images_dir.iterdir() if has_extension(p.name, IMAGE_EXTENSIONS)}


def ravi_folder_images(root: Path, split: RaviSplit) -> dict[str, Path]:
    """File name -> path of the images in ``train|val|test/<wnid>/``; a file in the folder of another
    split or class than the Ravi split gives it, or a name found twice, is an error naming it."""
    official = {name: (fs, wnid) for fs, rows in split.rows.items() for name, wnid in rows}
    images: dict[str, Path] = {}
    for fs, folder_name in CSV_SPLITS.items():
        folder = root / folder_name
        if not folder.is_dir():
            continue
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(p for p in cls.iterdir() if has_extension(p.name, IMAGE_EXTENSIONS)):
                if path.name in images:
                    raise PrepareError(f"{path}: the same image is also at {images[path.name]}")
                if path.name in official and official[path.name] != (fs, cls.name):
                    right_fs, wnid = official[path.name]
                    raise PrepareError(f"{path}: the Ravi split puts this image in "
                                       f"{CSV_SPLITS[right_fs]}/{wnid}/; the folders do not follow the "
                                       f"standard Ravi & Larochelle split")
                images[path.name] = path
    return images


def ravi_classes(root: Path, split: RaviSplit, images: dict[str, Path]) -> dict[str, list[ClassImages]]:
    """Per split, the classes (sorted wnids) with their image files (sorted by name = by index).

    ``images``: file name -> path of every image found (Ravi names place each image, whatever its folder).
    """
    official = {name: (fs, wnid) for fs, rows in split.rows.items() for name, wnid in rows}
    for fs, csv_name in CSV_SPLITS.items():  # CSVs shipped with the download must agree with ours
        path = root / f"{csv_name}.csv"
        if not path.exists():
            continue
        for name, wnid in read_csv_rows(path):
            if official.get(name) != (fs, wnid):
                where = official.get(name, ("no split", None))[0]
                raise PrepareError(f"{path}: row {name},{wnid} is in {where} of the Ravi split "
                                   f"({split.files[fs].path.name} expected); the split file does not match "
                                   f"the standard Ravi & Larochelle split")
    files = sorted(images)
    unknown = [f for f in files if f not in official]
    found = check_classes({f[:9] for f in files}, split.classes, source=root, split_desc="the Ravi CSVs")
    if unknown:
        raise PrepareError(f"{images[unknown[0]].parent}: {len(unknown)} images are not in the Ravi split "
                           f"files, e.g. {unknown[0]}; the images and the split file do not match")
    per_class: dict[str, list] = {}
    for f in files:  # sorted: the zero-padded index makes name order = index order
        per_class.setdefault(official[f][1], []).append((str(images[f]), str(images[f])))
    return {fs: [_class(w, split, per_class[w]) for w in wnids] for fs, wnids in found.items()}


# -- ILSVRC train tree ---------------------------------------------------------------------------
def ilsvrc_classes(tree: Path, split: RaviSplit) -> dict[str, list[ClassImages]]:
    present = {p.name for p in tree.iterdir() if p.is_dir() and is_wnid(p.name)}
    found = check_classes(present, split.classes, source=tree, split_desc="the Ravi CSVs", allow_extra=True)
    out: dict[str, list[ClassImages]] = {}
    for fs, wnids in found.items():
        rows_by_class: dict[str, list[str]] = {}
        for name, wnid in split.rows[fs]:
            rows_by_class.setdefault(wnid, []).append(name)
        classes = []
        for wnid in wnids:
            ordered = ilsvrc_class_images(tree / wnid)
            images = []
            for name in sorted(rows_by_class[wnid]):
                index = int(name[9:17])  # 1-based
                if index > len(ordered):
                    raise PrepareError(f"{tree / wnid}: the Ravi split refers to image #{index} ({name}) but "
                                       f"the folder holds {len(ordered)} images; the ILSVRC train tree is "
                                       f"incomplete")
                path = ordered[index - 1]
                images.append((f"{path} (for {name})", str(path)))
            classes.append(_class(wnid, split, images))
        out[fs] = classes
    return out


# -- pickles -------------------------------------------------------------------------------------
def prepare_pickles(root: Path, writer: PreparedWriter, split: RaviSplit, spec: DecodeSpec,
                    workers: int) -> None:
    for fs, name in PICKLE_SPLITS.items():
        path = root / f"mini-imagenet-cache-{name}.pkl"
        if not path.exists():
            raise PrepareError(f"{path}: missing (the pickle layout needs all three "
                               f"mini-imagenet-cache-{{train,validation,test}}.pkl)")
        data = load_pickle(path)
        data = text_keys(data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise PrepareError(f"{path}: expected a dict with 'image_data' and 'class_dict', got {keys}")
        image_data = np.asarray(data["image_data"])
        if image_data.dtype != np.uint8 or image_data.ndim != 4 or image_data.shape[-1] != 3:
            raise PrepareError(f"{path}: 'image_data' should be uint8 (N, H, W, 3), got {image_data.dtype} "
                               f"{image_data.shape}")
        class_dict: dict[str, list[int]] = text_keys(data["class_dict"])
        wnids = check_classes(class_dict, {fs: split.classes[fs]}, source=path,
                              split_desc=split.files[fs].path.name)[fs]
        order = np.concatenate([np.asarray(sorted(class_dict[w]), dtype=np.int64) for w in wnids])
        if len(order) and (order.min() < 0 or order.max() >= len(image_data)):
            raise PrepareError(f"{path}: 'class_dict' indexes row {order.max()} but 'image_data' has "
                               f"{len(image_data)} rows")
        labels = np.repeat(np.arange(len(wnids)), [len(class_dict[w]) for w in wnids])
        names = [f"{path}: image_data[{i}]" for i in order]
        write_array_split(writer, fs, image_data, order, labels, spec=spec,
                          class_names=[split.words.get(w, w) for w in wnids], class_ids=wnids,
                          workers=workers, names=names, expected_classes=EXPECTED_CLASSES[fs],
                          expected_images=EXPECTED_CLASSES[fs] * IMAGES_PER_CLASS)


def prepare(source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
            workers: int = 2, train_resolution: int | None = None) -> Path:
    """``train_resolution``: side of the training view, ILSVRC tree only (None: the default 160; 0: none).
    The 84-px layouts have no training view: images.npy already holds all their pixels."""
    layout, root = detect_layout(source)
    split = load_ravi_split()
    size = resolution or (FULL_RES_SIZE if layout == "ilsvrc" else NATIVE_SIZE)
    spec = DecodeSpec(size, 3, train_size_for(layout == "ilsvrc", train_resolution))
    with PreparedWriter(out, dataset=DATASET, source=source, source_layout=layout, resolution=size,
                        overwrite=overwrite, train_resolution=spec.train_size) as writer:
        record_split_files(writer, split.files)
        if layout == "pickle":
            prepare_pickles(root, writer, split, spec, workers)
        else:
            if layout == "ilsvrc":
                per_split = ilsvrc_classes(root, split)
            else:
                images = ravi_flat_images(root) if layout == "ravi" else ravi_folder_images(root, split)
                per_split = ravi_classes(root, split, images)
            for fs in FEWSHOT_SPLITS:
                write_class_split(writer, fs, per_split[fs], spec=spec, workers=workers,
                                  expected_classes=EXPECTED_CLASSES[fs],
                                  expected_images=EXPECTED_CLASSES[fs] * IMAGES_PER_CLASS)
    return out


def main(argv: list[str] | None = None) -> int:
    from data_prep.cli import main as cli_main

    return cli_main(argv, dataset=DATASET)


if __name__ == "__main__":
    sys.exit(main())
