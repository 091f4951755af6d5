#!/usr/bin/env python
"""Build the compact Omniglot copy shipped in ``data_prep/demo/`` for ``make demo``.

Reads the official ``images_background.zip`` / ``images_evaluation.zip`` (default: ../shared/data/omniglot)
and writes zips with the SAME layout (``images_background/<Alphabet>/characterNN/<id>_<drawer>.png``), so the
real Omniglot preparation code path (``s2m2 prepare omniglot --source data_prep/demo``) reads them. The copy
holds whole alphabets of the Vinyals split, taken in sorted order until each split has at least
``MIN_CLASSES`` characters (now: every character, 16 MB), with every image downscaled to
28x28 8-bit grey PNG (PIL bilinear, the same resize the preparation applies to the full set).

Deterministic: same inputs and arguments give byte-identical zips (fixed member order and timestamps).

    python scripts/make_demo_data.py [--source DIR] [--out data_prep/demo]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from pathlib import Path, PurePosixPath

from PIL import Image

from data_prep.common import open_zip, read_zip_member, split_file
from data_prep.omniglot import ARCHIVES, DEFAULT_SIZE, FILE_SPLITS

REPO = Path(__file__).resolve().parents[1]
#: minimum characters per split in the demo copy (base, val, novel): the whole Vinyals split (1028 / 172 /
#: 423), 15.9 MB as 28x28 PNG. `make demo`'s accuracy targets need the full set of base characters.
MIN_CLASSES = {"base": 1028, "val": 172, "novel": 423}
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def choose_characters(min_classes: dict[str, int]) -> set[str]:
    """Whole alphabets per split (sorted alphabet names) until each split has enough characters."""
    chosen: set[str] = set()
    for fs, name in FILE_SPLITS.items():
        by_alphabet: dict[str, list[str]] = {}
        for cid in split_file("omniglot", "vinyals", f"{name}.txt").lines():
            by_alphabet.setdefault(cid.split("/")[0], []).append(cid)
        count = 0
        for alphabet in sorted(by_alphabet):
            if count >= min_classes[fs]:
                break
            chosen.update(by_alphabet[alphabet])
            count += len(by_alphabet[alphabet])
    return chosen


def shrink_png(data: bytes, size: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def build(source: Path, out: Path, size: int, min_classes: dict[str, int]) -> list[Path]:
    chosen = choose_characters(min_classes)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for archive in ARCHIVES:
        src = source / f"{archive}.zip"
        dst = out / f"{archive}.zip"
        tmp = dst.with_name(dst.name + ".tmp")
        count = 0
        with open_zip(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for name in sorted(zin.namelist()):
                parts = PurePosixPath(name).parts
                if name.endswith("/") or len(parts) < 4 or f"{parts[-3]}/{parts[-2]}" not in chosen:
                    continue
                info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(info, shrink_png(read_zip_member(zin, name, src), size))
                count += 1
        os.replace(tmp, dst)
        print(f"{dst}: {count} images, {dst.stat().st_size / 1e6:.2f} MB")
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "omniglot",
                        help="folder with the official Omniglot zips")
    parser.add_argument("--out", type=Path, default=REPO / "data_prep" / "demo")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    args = parser.parse_args(argv)
    build(args.source, args.out, args.size, MIN_CLASSES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
