"""``s2m2 prepare DATASET --source PATH --out DIR``: turn downloaded files into a prepared folder.

Each dataset module (``data_prep.mini_imagenet``, ``tiered_imagenet``, ``cifar``, ``cub``, ``omniglot``)
detects the source layout itself and exposes ``prepare(source, out, *, resolution, overwrite, workers)``;
``python -m data_prep.<module>`` runs the same command with the dataset fixed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

from data_prep.common import PrepareError, default_workers

#: dataset name -> (module, what it accepts)
DATASETS: dict[str, tuple[str, str]] = {
    "mini-imagenet": ("data_prep.mini_imagenet",
                      "Ravi folder (images/ + train/val/test.csv), mini-imagenet-cache-*.pkl pickles, "
                      "or the ILSVRC-2012 train tree"),
    "tiered-imagenet": ("data_prep.tiered_imagenet",
                        "Ren et al. pickles ({split}_images_png.pkl + {split}_labels.pkl) or the ILSVRC-2012 "
                        "train tree"),
    "cifar-fs": ("data_prep.cifar_fs", "cifar-100-python.tar.gz (or extracted folder) or the R2D2 folder"),
    "fc100": ("data_prep.fc100", "cifar-100-python.tar.gz (or extracted folder) or the R2D2 folder"),
    "cub": ("data_prep.cub", "CUB_200_2011 folder (or its parent) or CUB_200_2011.tgz"),
    "omniglot": ("data_prep.omniglot", "folder with images_background.zip and images_evaluation.zip"),
}


def build_parser(dataset: str | None = None) -> argparse.ArgumentParser:
    prog = "s2m2 prepare" if dataset is None else f"python -m {DATASETS[dataset][0]}"
    epilog = "\n".join(f"  {name:<16} {what}" for name, (_, what) in DATASETS.items())
    parser = argparse.ArgumentParser(
        prog=prog, description="Prepare a few-shot dataset (memory-mappable uint8 arrays + meta.json) from "
        "the files you downloaded.", epilog="datasets and accepted sources:\n" + epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if dataset is None:
        parser.add_argument("dataset", choices=sorted(DATASETS), metavar="DATASET",
                            help="one of: " + ", ".join(DATASETS))
    parser.add_argument("--source", required=True, type=Path, help="downloaded file or folder")
    parser.add_argument("--out", required=True, type=Path, help="prepared folder to create")
    parser.add_argument("--resolution", type=int, default=None,
                        help="stored image size (square); default: 92 for full-resolution sources (ILSVRC, "
                             "CUB), the native size for pre-shrunk ones (84 mini/tiered, 32 CIFAR), "
                             "28 Omniglot")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (the old folder is kept until the new one is "
                             "complete)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="decoding processes (default: min(2, CPU count))")
    return parser


def run(dataset: str, source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
        workers: int | None = None) -> Path:
    """Prepare ``dataset`` from ``source`` into ``out``; returns ``out``. Raises PrepareError on bad input."""
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if resolution is not None and not 8 <= resolution <= 1024:
        raise PrepareError(f"--resolution {resolution}: expected a size between 8 and 1024 pixels")
    if not Path(source).exists():
        raise PrepareError(f"{source}: no such file or folder (--source)")
    if Path(out).resolve() == Path(source).resolve() or Path(out).resolve() in Path(source).resolve().parents:
        raise PrepareError(f"--out {out} would replace the source {source}; choose another folder")
    if Path(out).exists() and not overwrite:
        # checked up front so a long preparation is not wasted (PreparedWriter checks again)
        raise PrepareError(f"{out} already exists; pass --overwrite to replace it")
    module = importlib.import_module(DATASETS[dataset][0])
    return module.prepare(Path(source), Path(out), resolution=resolution, overwrite=overwrite,
                          workers=default_workers() if workers is None else max(1, workers))


def _summary(out: Path) -> str:
    from s2m2.data import load_meta

    meta = load_meta(out)
    lines = [f"prepared {meta['dataset']} ({meta['source_layout']}) -> {out}"]
    for name, split in meta["splits"].items():
        h, w, c = split["shape"]
        lines.append(f"  {name:<6} {split['num_classes']:>4} classes {split['num_images']:>7} images "
                     f"{h}x{w}x{c}{'' if split['complete'] else '  (subset)'}")
    if meta["warnings"]:
        lines.append(f"  {len(meta['warnings'])} warning(s) recorded in meta.json")
    return "\n".join(lines)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None, dataset: str | None = None) -> int:
    args = build_parser(dataset).parse_args(argv)
    dataset = dataset or args.dataset
    try:
        with warnings.catch_warnings():  # show the preparation's warnings as plain "warning: ..." lines
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = _print_warning
            out = run(dataset, args.source, args.out, resolution=args.resolution, overwrite=args.overwrite,
                      workers=args.workers)
    except (PrepareError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(_summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
