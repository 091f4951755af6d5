"""Omniglot (Lake et al.) with the Vinyals et al. character split: 1028 / 172 / 423 characters x 20 drawers.

Source: a folder with the official ``images_background.zip`` and ``images_evaluation.zip`` (or the folders
they extract to). Members are ``images_{background,evaluation}/<Alphabet>/characterNN/<id>_<drawer>.png``
(105x105, 1-bit). The class id is ``<Alphabet>/characterNN``; the split (shipped in
``data_prep/splits/omniglot/vinyals``) mixes characters of both archives. Rotated copies (the x4 classes of
Vinyals/ProtoNets training) are not materialised: rotation is a training-time augmentation here.

Images are grayscale, stored with C=1 (white background, dark strokes, as in the source), resized with PIL
bilinear to ``--resolution`` (default 28, the usual Omniglot size). Labels are split-local in sorted
class-id order; class names equal the ids. Images within a character are sorted by file name.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

from data_prep.common import (FEWSHOT_SPLITS, IMAGE_EXTENSIONS, ClassImages, DecodeSpec, PrepareError,
                              check_classes, has_extension, open_zip, read_zip_member, record_split_files,
                              split_file, write_class_split)
from s2m2.data import PreparedWriter

DATASET = "omniglot"
DEFAULT_SIZE = 28
ARCHIVES = ("images_background", "images_evaluation")
FILE_SPLITS = {"base": "train", "val": "val", "novel": "test"}
EXPECTED_CLASSES = {"base": 1028, "val": 172, "novel": 423}
DRAWERS = 20


def _class_id(parts: tuple[str, ...]) -> str | None:
    """``(..., Alphabet, characterNN, file.png)`` -> ``Alphabet/characterNN``."""
    return f"{parts[-3]}/{parts[-2]}" if len(parts) >= 3 else None


def collect_images(source: Path) -> tuple[dict[str, list[tuple[str, bytes | str]]], list[str]]:
    """-> ({class id: [(name for errors, payload)]}, the zips/folders used). A zip is preferred to its
    extracted folder; the PNG bytes (about 300 B each) are read here, decoded in the workers."""
    per_class: dict[str, list[tuple[str, bytes | str]]] = {}
    used: list[str] = []
    for archive in ARCHIVES:
        zip_path, folder = source / f"{archive}.zip", source / archive
        if zip_path.exists():
            used.append(zip_path.name)
            with open_zip(zip_path) as zf:
                for name in sorted(zf.namelist()):
                    parts = PurePosixPath(name).parts
                    class_id = _class_id(parts)
                    if name.endswith("/") or not has_extension(name, IMAGE_EXTENSIONS) or class_id is None:
                        continue
                    data = read_zip_member(zf, name, zip_path)
                    per_class.setdefault(class_id, []).append((f"{zip_path}:{name}", data))
        elif folder.is_dir():
            used.append(folder.name + "/")
            for path in sorted(folder.glob("*/*/*")):
                if has_extension(path.name, IMAGE_EXTENSIONS):
                    per_class.setdefault(_class_id(path.parts), []).append((str(path), str(path)))
    if not used:
        raise PrepareError(f"{source}: no Omniglot source found: expected images_background.zip and "
                           f"images_evaluation.zip (or the folders they extract to)")
    return per_class, used


def prepare(source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
            workers: int = 2) -> Path:
    if source.is_file():  # one of the zips was given: use the folder holding both
        source = source.parent
    files = {fs: split_file("omniglot", "vinyals", f"{name}.txt") for fs, name in FILE_SPLITS.items()}
    splits = {fs: f.lines() for fs, f in files.items()}
    per_class, used = collect_images(source)
    found = check_classes(per_class, splits, source=source, split_desc="the Vinyals Omniglot split")
    spec = DecodeSpec(resolution or DEFAULT_SIZE, 1)
    layout = "omniglot-zips" if all(u.endswith(".zip") for u in used) else "omniglot-folders"
    with PreparedWriter(out, dataset=DATASET, source=source, source_layout=layout, resolution=spec.size,
                        overwrite=overwrite) as writer:
        record_split_files(writer, files)
        writer.meta["source_files"] = used
        for fs in FEWSHOT_SPLITS:
            classes = [ClassImages(c, c, sorted(per_class[c])) for c in found[fs]]
            write_class_split(writer, fs, classes, spec=spec, workers=workers,
                              expected_classes=EXPECTED_CLASSES[fs],
                              expected_images=EXPECTED_CLASSES[fs] * DRAWERS)
    return out


def main(argv: list[str] | None = None) -> int:
    from data_prep.cli import main as cli_main

    return cli_main(argv, dataset=DATASET)


if __name__ == "__main__":
    sys.exit(main())
