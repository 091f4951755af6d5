"""CUB-200-2011 with the CloserLook split (Chen et al., ICLR 2019), as used by S2M2: 100 / 50 / 50 classes.

The rule: sort the 200 class folder names (``001.Black_footed_Albatross`` ... ``200.Common_Yellowthroat``);
the class at 0-based index i is ``base`` if i % 2 == 0, ``val`` if i % 4 == 1, ``novel`` if i % 4 == 3.
It is applied to the full list of 200 classes (the shipped ``splits/cub/closerlook_split`` lists, checked
against the source's ``classes.txt``), never to the folders that happen to be present, so a partial source
keeps every class in its true split.

Source layouts: the ``CUB_200_2011`` folder (or a folder containing it), or ``CUB_200_2011.tgz``. Whole
images (no bounding-box crop, like the release), converted to RGB (a few CUB images are grayscale) and
resized to ``--resolution`` (default 92 = the release's test Resize((92, 92)) before its centre crop 80).
Labels are split-local in sorted folder order; ids are the folder names, names the species
(``Black footed Albatross``). Images within a class are in sorted file-name order.
"""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from data_prep.common import (FEWSHOT_SPLITS, ClassImages, DecodeSpec, ImageItem, PrepareError,
                              check_classes, has_extension, iter_tar_files, iter_tar_members, open_tar,
                              record_split_files, split_file, write_class_split, write_split)
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


def find_root(source: Path) -> Path:
    for root in (source, source / "CUB_200_2011"):
        if (root / "images").is_dir():
            return root
    raise PrepareError(f"{source}: no CUB-200-2011 source found: expected the CUB_200_2011 folder (with "
                       f"images/<class>/*.jpg), a folder containing it, or CUB_200_2011.tgz")


def folder_classes(root: Path, splits: dict[str, list[str]]) -> dict[str, list[ClassImages]]:
    if (root / "classes.txt").is_file():
        check_classes_txt((root / "classes.txt").read_text(), str(root / "classes.txt"), splits)
    images_dir = root / "images"
    folders = {p.name: p for p in images_dir.iterdir() if p.is_dir()}
    found = check_classes(folders, splits, source=images_dir, split_desc="the CloserLook CUB split")

    def images_of(cls: str) -> list[tuple[str, str]]:
        return [(str(p), str(p)) for p in sorted(folders[cls].iterdir()) if has_extension(p.name, _JPEG)]

    return {fs: [ClassImages(c, species_name(c), images_of(c)) for c in classes]
            for fs, classes in found.items()}


def prepare_tgz(path: Path, writer: PreparedWriter, splits: dict[str, list[str]], spec: DecodeSpec,
                workers: int) -> None:
    """Two kinds of pass over the archive: one listing (slots are assigned in sorted order), then one per
    split streaming the JPEG bytes to the decoders (the 1.1 GB of images never sit in memory)."""
    members: dict[str, list[str]] = {}  # class folder -> member names
    with open_tar(path) as tar, tqdm(desc=f"listing {path.name}", unit=" files", leave=False) as bar:
        for member in iter_tar_members(tar, path):
            bar.update()
            parts = PurePosixPath(member.name).parts
            if member.isfile() and parts[-3:-2] == ("images",) and has_extension(parts[-1], _JPEG):
                members.setdefault(parts[-2], []).append(member.name)
            elif member.isfile() and parts[-1] == "classes.txt":
                handle = tar.extractfile(member)
                check_classes_txt(handle.read().decode(), f"{path}:{member.name}", splits)
    if not members:
        raise PrepareError(f"{path}: no CUB_200_2011/images/<class>/*.jpg inside the archive")
    found = check_classes(members, splits, source=path, split_desc="the CloserLook CUB split")
    for fs in FEWSHOT_SPLITS:
        slot: dict[str, tuple[int, int]] = {}  # member name -> (index, label)
        for label, cls in enumerate(found[fs]):
            for name in sorted(members[cls], key=lambda m: PurePosixPath(m).name):
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
            workers: int = 2) -> Path:
    if source.is_dir() and not any((r / "images").is_dir() for r in (source, source / "CUB_200_2011")) \
            and (source / "CUB_200_2011.tgz").is_file():
        source = source / "CUB_200_2011.tgz"
    layout = "cub-tgz" if source.is_file() else "cub-folder"
    splits, files = closerlook_split()
    spec = DecodeSpec(resolution or FULL_RES_SIZE, 3)
    with PreparedWriter(out, dataset=DATASET, source=source, source_layout=layout, resolution=spec.size,
                        overwrite=overwrite) as writer:
        record_split_files(writer, files)
        writer.meta["split_rule"] = SPLIT_RULE
        if layout == "cub-tgz":
            prepare_tgz(source, writer, splits, spec, workers)
        else:
            per_split = folder_classes(find_root(source), splits)
            for fs in FEWSHOT_SPLITS:
                write_class_split(writer, fs, per_split[fs], spec=spec, workers=workers,
                                  expected_classes=EXPECTED[fs][0], expected_images=EXPECTED[fs][1])
    return out


def main(argv: list[str] | None = None) -> int:
    from data_prep.cli import main as cli_main

    return cli_main(argv, dataset=DATASET)


if __name__ == "__main__":
    sys.exit(main())
