"""tiered-ImageNet (Ren et al., ICLR 2018): 351 / 97 / 160 ILSVRC classes in 20 / 6 / 8 categories,
448,695 / 124,261 / 206,209 images (every ILSVRC-2012 train image of each class).

Source layouts:

* ``ren-pickles``: ``{train,val,test}_images_png.pkl`` (a pickled list of PNG-encoded 84x84 images, each a
  1-D uint8 array or bytes) + ``{split}_labels.pkl`` (dict with ``label_specific`` (N,) class indices,
  ``label_general`` (N,) category indices, ``label_specific_str`` class wnids and ``label_general_str``
  category wnids; keys may be bytes: the files were written by Python 2). Stored at the native 84x84.
  The images pickle is unpickled whole (that is the format), so the train split needs RAM for its bytes.
* ``ilsvrc``: the ILSVRC-2012 train tree ``[train/]nXXXXXXXX/*.JPEG``; every image of each split class,
  sorted by the number in its file name, resized from full resolution to 92x92 by default, plus a
  training view (each photo squashed to 160x160 by default, and its original size) that training crops
  are cut from in the photo's coordinates.

The split definition is the shipped Ren et al. CSVs (``data_prep/splits/tiered_imagenet/{split}.csv``:
``class wnid,category wnid``; ``*_named.csv`` add the WordNet words). Labels are split-local in sorted-wnid
order; classes.json ids are wnids, names the WordNet words; meta.json ``categories`` maps every class of a
split to its category wnid.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from data_prep.common import (FEWSHOT_SPLITS, ClassImages, DecodeSpec, ImageItem, PrepareError, SplitFile,
                              as_text, check_classes, find_ilsvrc_tree, ilsvrc_class_images, is_wnid,
                              load_pickle,
                              record_split_files, split_file, text_keys, train_size_for, write_class_split,
                              write_split)
from s2m2.data import PreparedWriter

DATASET = "tiered-imagenet"
NATIVE_SIZE = 84
FULL_RES_SIZE = 92
FILE_SPLITS = {"base": "train", "val": "val", "novel": "test"}
EXPECTED = {"base": (351, 448_695), "val": (97, 124_261), "novel": (160, 206_209)}  # classes, images
LABEL_KEYS = ("label_specific", "label_specific_str")


def load_ren_split() -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, SplitFile]]:
    """-> ({split: {class wnid: category wnid}}, {wnid: words}, split files)."""
    files = {fs: split_file("tiered_imagenet", f"{name}.csv") for fs, name in FILE_SPLITS.items()}
    splits: dict[str, dict[str, str]] = {}
    for fs, f in files.items():
        rows = [row for row in csv.reader(f.path.read_text().splitlines()) if row]
        splits[fs] = {row[0]: row[1] for row in rows}
    words: dict[str, str] = {}
    for name in FILE_SPLITS.values():
        with open(split_file("tiered_imagenet", f"{name}_named.csv").path, newline="") as fh:
            for row in csv.DictReader(fh):
                words[row["wnid"]] = row["wnid_words"]
                words[row["category_wnid"]] = row["category_words"]
    return splits, words, files


def detect_layout(source: Path) -> tuple[str, Path]:
    root = source.parent if source.is_file() else source
    if any((root / f"{name}_images_png.pkl").exists() or (root / f"{name}_labels.pkl").exists()
           for name in FILE_SPLITS.values()):
        return "ren-pickles", root
    if (tree := find_ilsvrc_tree(root)) is not None:
        return "ilsvrc", tree
    raise PrepareError(f"{source}: no tiered-ImageNet layout found: expected "
                       f"{{train,val,test}}_images_png.pkl + {{split}}_labels.pkl (Ren et al.), or an ILSVRC "
                       f"train tree of nXXXXXXXX/ class folders")


def read_labels(path: Path, num_images: int) -> tuple[np.ndarray, list[str]]:
    """-> (label_specific int64 (N,), class wnid of each specific label)."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise PrepareError(f"{path}: expected a dict with {LABEL_KEYS}, got {type(obj).__name__}")
    obj = text_keys(obj)
    missing = [k for k in LABEL_KEYS if k not in obj]
    if missing:
        raise PrepareError(f"{path}: keys {missing} missing (has {sorted(obj)})")
    specific = np.asarray(obj["label_specific"], dtype=np.int64).reshape(-1)
    names = [as_text(s) for s in obj["label_specific_str"]]
    if len(specific) != num_images:
        raise PrepareError(f"{path}: {len(specific)} labels but the images pickle holds {num_images} images")
    if len(specific) and (specific.min() < 0 or specific.max() >= len(names)):
        raise PrepareError(f"{path}: label_specific {specific.max()} out of range of the {len(names)} "
                           f"label_specific_str entries")
    return specific, names


def _png_bytes(item, where: str) -> bytes:
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # Python-2 str unpickled with latin1
        return item.encode("latin1")
    raise PrepareError(f"{where}: expected PNG bytes (uint8 array or bytes), got {type(item).__name__}")


def prepare_pickles(root: Path, writer: PreparedWriter, splits: dict[str, dict[str, str]],
                    words: dict[str, str], spec: DecodeSpec, workers: int) -> dict[str, list[str]]:
    """Write the three splits; returns {split: class wnids written, in label order}."""
    written: dict[str, list[str]] = {}
    for fs, name in FILE_SPLITS.items():
        images_path, labels_path = root / f"{name}_images_png.pkl", root / f"{name}_labels.pkl"
        images = load_pickle(images_path)
        if not isinstance(images, (list, tuple)):
            raise PrepareError(f"{images_path}: expected a list of PNG-encoded images, got "
                               f"{type(images).__name__}")
        specific, class_wnids = read_labels(labels_path, len(images))
        present = sorted({class_wnids[k] for k in np.unique(specific)})
        wnids = check_classes(present, {fs: sorted(splits[fs])}, source=labels_path,
                              split_desc=f"splits/tiered_imagenet/{name}.csv")[fs]
        label_of_specific = np.full(len(class_wnids), -1, dtype=np.int64)
        for label, wnid in enumerate(wnids):
            label_of_specific[[k for k, w in enumerate(class_wnids) if w == wnid]] = label
        new_labels = label_of_specific[specific]
        order = np.argsort(new_labels, kind="stable")  # class by class, pickle order within a class
        labels = new_labels[order]
        items = (ImageItem(slot, int(labels[slot]), f"{images_path}: image {i}",
                           _png_bytes(images[i], f"{images_path}: image {i}"))
                 for slot, i in enumerate(order))
        write_split(writer, fs, items, num_images=len(order), spec=spec,
                    class_names=[words.get(w, w) for w in wnids], class_ids=wnids, labels=labels,
                    workers=workers, expected_classes=EXPECTED[fs][0], expected_images=EXPECTED[fs][1])
        written[fs] = wnids
        del images
    return written


def ilsvrc_classes(tree: Path, splits: dict[str, dict[str, str]], words: dict[str, str]
                   ) -> dict[str, list[ClassImages]]:
    present = {p.name for p in tree.iterdir() if p.is_dir() and is_wnid(p.name)}
    found = check_classes(present, {fs: sorted(s) for fs, s in splits.items()}, source=tree,
                          split_desc="the Ren et al. tiered-ImageNet CSVs", allow_extra=True)

    def images_of(wnid: str) -> list[tuple[str, str]]:
        return [(str(p), str(p)) for p in ilsvrc_class_images(tree / wnid)]

    return {fs: [ClassImages(w, words.get(w, w), images_of(w)) for w in wnids] for fs, wnids in found.items()}


def prepare(source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
            workers: int = 2, train_resolution: int | None = None) -> Path:
    """``train_resolution``: side of the training view, ILSVRC tree only (None: the default 160; 0: none)."""
    layout, root = detect_layout(source)
    splits, words, files = load_ren_split()
    spec = DecodeSpec(resolution or (NATIVE_SIZE if layout == "ren-pickles" else FULL_RES_SIZE), 3,
                      train_size_for(layout == "ilsvrc", train_resolution))
    with PreparedWriter(out, dataset=DATASET, source=source, source_layout=layout, resolution=spec.size,
                        overwrite=overwrite, train_resolution=spec.train_size) as writer:
        record_split_files(writer, files)
        if layout == "ren-pickles":
            written = prepare_pickles(root, writer, splits, words, spec, workers)
        else:
            per_split = ilsvrc_classes(root, splits, words)
            for fs in FEWSHOT_SPLITS:
                write_class_split(writer, fs, per_split[fs], spec=spec, workers=workers,
                                  expected_classes=EXPECTED[fs][0], expected_images=EXPECTED[fs][1])
            written = {fs: [c.class_id for c in classes] for fs, classes in per_split.items()}
        writer.meta["categories"] = {fs: {wnid: splits[fs][wnid] for wnid in written[fs]}
                                     for fs in FEWSHOT_SPLITS}
    return out


def main(argv: list[str] | None = None) -> int:
    from data_prep.cli import main as cli_main

    return cli_main(argv, dataset=DATASET)


if __name__ == "__main__":
    sys.exit(main())
