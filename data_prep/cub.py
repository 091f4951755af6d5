"""CUB-200-2011 with the CloserLook split (Chen et al., ICLR 2019), as used by S2M2: 100 / 50 / 50 classes.

The rule: sort the 200 class folder names (``001.Black_footed_Albatross`` ... ``200.Common_Yellowthroat``);
the class at 0-based index i is ``base`` if i % 2 == 0, ``val`` if i % 4 == 1, ``novel`` if i % 4 == 3.
It is applied to the full list of 200 classes (the shipped ``splits/cub/closerlook_split`` lists, checked
against the source's ``classes.txt``), never to the folders that happen to be present, so a partial source
keeps every class in its true split.

Source layouts: the ``CUB_200_2011`` folder (or a folder containing it), or ``CUB_200_2011.tgz``. Whole
images (no bounding-box crop, like the release), converted to RGB (a few CUB images are grayscale) and
resized to ``--resolution`` (default 92 = the release's test Resize((92, 92)) before its centre crop 80), plus
a training view (the whole photo squashed to ``train_resolution``, default 160, and its original size) from
which training crops are cut in the photo's own coordinates, as the release's RandomResizedCrop.
Labels are split-local in sorted folder order; ids are the folder names, names the species
(``Black footed Albatross``). Images within a class are in sorted file-name order.

The images are exactly those listed in the source's ``images.txt``: a listed file that is missing is an
error naming it; files in ``images/`` that it does not list (e.g. ``*_rgb.jpg`` near-duplicates left by a
conversion script) are ignored, counted in a meta.json warning.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from data_prep.common import (FEWSHOT_SPLITS, IMAGE_EXTENSIONS, ClassImages, DecodeSpec, ImageItem,
                              PrepareError, check_classes, check_not_html, has_extension, iter_tar_files,
                              iter_tar_members, open_tar, record_split_files, split_file, train_size_for,
                              write_class_split, write_split)
from s2m2.data import PreparedWriter

DATASET = "cub"
FULL_RES_SIZE = 92
EXPECTED = {"base": (100, 5885), "val": (50, 2950), "novel": (50, 2953)}  # classes, images
SPLIT_RULE = "CloserLook: sorted 200 class folders, index i: i%2==0 base, i%4==1 val, i%4==3 novel"
_JPEG = (".jpg", ".jpeg")


def species_name(folder: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    return folder.split(".", 1)[-1].replace("_", " ")


def closerlook_split() -> tuple[dict[str, list[str]], dict]:
    files = {fs: split_file("cub", "closerlook_split", f"{fs}_classes.txt") for fs in FEWSHOT_SPLITS}
    return {fs: f.lines() for fs, f in files.items()}, files


def check_classes_txt(text: str, where: str, splits: dict[str, list[str]]) -> None:
    """The source's ``classes.txt`` ("<id> <folder>" per line) must list exactly the 200 split classes."""
    listed = sorted(line.split()[-1] for line in text.splitlines() if line.strip())
    known = sorted(c for classes in splits.values() for c in classes)
    if listed != known:
        diff = sorted(set(listed) ^ set(known))
        raise PrepareError(f"{where}: lists {len(listed)} classes that do not match the 200 CUB-200-2011 "
                           f"classes of the CloserLook split (differences: {diff[:5]})")


def read_images_txt(text: str, where: str) -> list[str]:
    """``images.txt`` ("<id> <class folder>/<file>" per line) -> the listed paths relative to images/."""
    listed = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1].count("/") != 1:
            raise PrepareError(f"{where}:{line_no}: expected '<id> <class folder>/<file>.jpg', got {line!r}")
        listed.append(fields[1])
    if not listed:
        raise PrepareError(f"{where}: lists no images")
    return listed


def select_listed(listed: list[str], present: dict[str, str], where: str,
                  missing_name) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """Match ``images.txt`` against the files present.

    Args:
        listed: relative paths ``class/file`` from images.txt; present: relative path -> payload (a path or
            an archive member name) of every file found under images/; where: images.txt, for errors;
        missing_name: relative path -> how a missing file is named in the error.
    Returns ({class: [(relative path, payload), ...] sorted by file name}, unlisted image files).
    Raises PrepareError naming the first listed file that is missing.
    """
    per_class: dict[str, list[tuple[str, str]]] = {}
    for rel in sorted(set(listed), key=lambda r: r.split("/")):
        if rel not in present:
            raise PrepareError(f"{missing_name(rel)}: listed in {where} but missing; the CUB source is "
                               f"incomplete (extract CUB_200_2011.tgz again)")
        per_class.setdefault(rel.split("/")[0], []).append((rel, present[rel]))
    unlisted = sorted(r for r in set(present) - set(listed) if has_extension(r, IMAGE_EXTENSIONS))
    return per_class, unlisted


def warn_unlisted(writer: PreparedWriter, unlisted: list[str], where: str) -> None:
    """Record (meta.json) and show how many files images.txt does not list: they are not prepared."""
    if unlisted:
        writer.warn(f"{where}: {len(unlisted)} image file(s) in images/ are not listed in images.txt and were "
                    f"ignored (e.g. {unlisted[0]})")


def find_root(source: Path) -> Path:
    for root in (source, source / "CUB_200_2011"):
        if (root / "images").is_dir():
            return root
    raise PrepareError(f"{source}: no CUB-200-2011 source found: expected the CUB_200_2011 folder (with "
                       f"images/<class>/*.jpg), a folder containing it, or CUB_200_2011.tgz")


def folder_classes(root: Path, splits: dict[str, list[str]]) -> tuple[dict[str, list[ClassImages]],
                                                                     list[str]]:
    """Per split, the classes of the images listed in ``images.txt``; also the unlisted image files."""
    if (root / "classes.txt").is_file():
        check_classes_txt((root / "classes.txt").read_text(), str(root / "classes.txt"), splits)
    images_txt = root / "images.txt"
    if not images_txt.is_file():
        raise PrepareError(f"{images_txt}: missing (the list of CUB images; it ships in CUB_200_2011.tgz)")
    check_not_html(images_txt)
    images_dir = root / "images"
    present = {f"{folder.name}/{f.name}": str(f) for folder in images_dir.iterdir() if folder.is_dir()
               for f in folder.iterdir() if f.is_file()}
    per_class, unlisted = select_listed(read_images_txt(images_txt.read_text(), str(images_txt)), present,
                                        str(images_txt), lambda rel: images_dir / rel)
    found = check_classes(per_class, splits, source=images_txt, split_desc="the CloserLook CUB split")
    return ({fs: [ClassImages(c, species_name(c), [(path, path) for _, path in per_class[c]]) for c in classes]
             for fs, classes in found.items()}, unlisted)


def prepare_tgz(path: Path, writer: PreparedWriter, splits: dict[str, list[str]], spec: DecodeSpec,
                workers: int) -> None:
    """Two kinds of pass over the archive: one listing (slots are assigned in sorted order), then one per
    split streaming the JPEG bytes to the decoders (the 1.1 GB of images never sit in memory)."""
    present: dict[str, str] = {}  # "class/file" -> member name
    images_txt: tuple[str, list[str]] | None = None  # (member name, listed paths)
    with open_tar(path) as tar, tqdm(desc=f"listing {path.name}", unit=" files", leave=False) as bar:
        for member in iter_tar_members(tar, path):
            bar.update()
            parts = PurePosixPath(member.name).parts
            if member.isfile() and parts[-3:-2] == ("images",):
                present["/".join(parts[-2:])] = member.name
            elif member.isfile() and parts[-1] == "classes.txt":
                handle = tar.extractfile(member)
                check_classes_txt(handle.read().decode(), f"{path}:{member.name}", splits)
            elif member.isfile() and parts[-1] == "images.txt":
                where = f"{path}:{member.name}"
                images_txt = (where, read_images_txt(tar.extractfile(member).read().decode(), where))
    if not any(has_extension(rel, _JPEG) for rel in present):
        raise PrepareError(f"{path}: no CUB_200_2011/images/<class>/*.jpg inside the archive")
    if images_txt is None:
        raise PrepareError(f"{path}: no CUB_200_2011/images.txt inside the archive (the list of CUB images)")
    where, listed = images_txt
    prefix = where[:-len("images.txt")]
    per_class, unlisted = select_listed(listed, present, where, lambda rel: f"{prefix}images/{rel}")
    warn_unlisted(writer, unlisted, str(path))
    found = check_classes(per_class, splits, source=path, split_desc="the CloserLook CUB split")
    for fs in FEWSHOT_SPLITS:
        slot: dict[str, tuple[int, int]] = {}  # member name -> (index, label)
        for label, cls in enumerate(found[fs]):
            for _, name in per_class[cls]:
                slot[name] = (len(slot), label)
        labels = np.array([label for _, label in slot.values()], dtype=np.int64)

        def stream(slot=slot):
            with open_tar(path) as tar:
                for member, data in iter_tar_files(tar, path):
                    if member.name in slot:
                        index, label = slot[member.name]
                        yield ImageItem(index, label, f"{path}:{member.name}", data)

        write_split(writer, fs, stream(), num_images=len(slot), spec=spec,
                    class_names=[species_name(c) for c in found[fs]], class_ids=found[fs], labels=labels,
                    workers=workers, expected_classes=EXPECTED[fs][0], expected_images=EXPECTED[fs][1])


def prepare(source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
            workers: int = 2, train_resolution: int | None = None) -> Path:
    """``train_resolution``: side of the training view (None: the default 160; 0: no training view)."""
    if source.is_dir() and not any((r / "images").is_dir() for r in (source, source / "CUB_200_2011")) \
            and (source / "CUB_200_2011.tgz").is_file():
        source = source / "CUB_200_2011.tgz"
    layout = "cub-tgz" if source.is_file() else "cub-folder"
    splits, files = closerlook_split()
    spec = DecodeSpec(resolution or FULL_RES_SIZE, 3, train_size_for(True, train_resolution))
    with PreparedWriter(out, dataset=DATASET, source=source, source_layout=layout, resolution=spec.size,
                        overwrite=overwrite, train_resolution=spec.train_size) as writer:
        record_split_files(writer, files)
        writer.meta["split_rule"] = SPLIT_RULE
        if layout == "cub-tgz":
            prepare_tgz(source, writer, splits, spec, workers)
        else:
            root = find_root(source)
            per_split, unlisted = folder_classes(root, splits)
            warn_unlisted(writer, unlisted, str(root / "images"))
            for fs in FEWSHOT_SPLITS:
                write_class_split(writer, fs, per_split[fs], spec=spec, workers=workers,
                                  expected_classes=EXPECTED[fs][0], expected_images=EXPECTED[fs][1])
    return out


def main(argv: list[str] | None = None) -> int:
    from data_prep.cli import main as cli_main

    return cli_main(argv, dataset=DATASET)


if __name__ == "__main__":
    sys.exit(main())
