"""``s2m2 prepare DATASET --source PATH --out DIR``: turn downloaded files into a prepared folder.

Each dataset module (``data_prep.mini_imagenet``, ``tiered_imagenet``, ``cifar``, ``cub``, ``omniglot``)
detects the source layout itself and exposes ``prepare(source, out, *, resolution, overwrite, workers)``;
``python -m data_prep.<module>`` runs the same command with the dataset fixed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from data_prep.common import PrepareError, default_workers
from s2m2.data.prepared import OutputError, check_replaceable
from s2m2.cli import CommandParser

#: exit statuses: a user error (bad input, --out not writable or not replaceable), Ctrl-C, SIGTERM
EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143
INTERRUPTED = "s2m2 prepare: interrupted; nothing written (temporary folder removed)"

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
# Full-resolution sources, whose preparers keep a training view (prepared format 2, docs/data.md).
TRAIN_VIEW_DATASETS = ("mini-imagenet", "tiered-imagenet", "cub")


def build_parser(dataset: str | None = None) -> argparse.ArgumentParser:
    prog = "s2m2 prepare" if dataset is None else f"python -m {DATASETS[dataset][0]}"
    epilog = "\n".join(f"  {name:<16} {what}" for name, (_, what) in DATASETS.items())
    parser = CommandParser(
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
    parser.add_argument("--train-resolution", type=int, default=None, metavar="T",
                        help="full-resolution sources (ILSVRC tree, CUB): side of the training view the "
                             "RandomResizedCrop boxes are cut from (default 160; 0 = none, crops then come "
                             "from the --resolution images)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (the old folder is kept until the new one is "
                             "complete)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="decoding processes (default: min(2, CPU count))")
    return parser


def run(dataset: str, source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
        workers: int | None = None, train_resolution: int | None = None) -> Path:
    """Prepare ``dataset`` from ``source`` into ``out``; returns ``out``.

    Raises PrepareError (its message names the file or flag) on bad input, and when ``out`` cannot be
    written or may not be replaced (only a prepared folder is replaced, and only with ``overwrite``).
    """
    try:
        return _run(dataset, source, out, resolution=resolution, overwrite=overwrite, workers=workers,
                    train_resolution=train_resolution)
    except OutputError as err:
        raise PrepareError(str(err)) from err


def _run(dataset: str, source: Path, out: Path, *, resolution: int | None, overwrite: bool,
         workers: int | None, train_resolution: int | None = None) -> Path:
    if dataset not in DATASETS:
        raise PrepareError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if resolution is not None and not 8 <= resolution <= 1024:
        raise PrepareError(f"--resolution {resolution}: expected a size between 8 and 1024 pixels")
    if train_resolution is not None:
        if dataset not in TRAIN_VIEW_DATASETS:
            raise PrepareError(f"--train-resolution applies to full-resolution sources "
                               f"({', '.join(TRAIN_VIEW_DATASETS)}), not to {dataset}")
        if train_resolution != 0 and not 32 <= train_resolution <= 1024:
            raise PrepareError(f"--train-resolution {train_resolution}: expected 0 (no training view) or a "
                               f"size between 32 and 1024 pixels")
    if workers is not None and workers < 1:
        raise PrepareError(f"--workers {workers}: expected at least 1 decoding process")
    if not Path(source).exists():
        raise PrepareError(f"{source}: no such file or folder (--source)")
    if Path(out).resolve() == Path(source).resolve() or Path(out).resolve() in Path(source).resolve().parents:
        raise PrepareError(f"--out {out} would replace the source {source}; choose another folder")
    # checked up front so a long preparation is not wasted (PreparedWriter checks again)
    check_replaceable(out, overwrite)
    module = importlib.import_module(DATASETS[dataset][0])
    extra = {} if train_resolution is None else {"train_resolution": train_resolution}
    return module.prepare(Path(source), Path(out), resolution=resolution, overwrite=overwrite,
                          workers=default_workers() if workers is None else workers, **extra)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs (temporary folder, worker processes)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While preparing, SIGTERM unwinds like Ctrl-C instead of killing the process mid-write."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None, dataset: str | None = None) -> int:
    """Run the command; returns 0, 2 for a user error (one ``error: ...`` line naming the file or flag),
    130 for Ctrl-C and 143 for SIGTERM (one line; the temporary folder is removed, workers are ended)."""
    args = build_parser(dataset).parse_args(argv)
    dataset = dataset or args.dataset
    try:
        with _sigterm_as_interrupt(), warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)  # shown as plain "warning: ..." lines
            warnings.showwarning = _print_warning
            out = run(dataset, args.source, args.out, resolution=args.resolution, overwrite=args.overwrite,
                      workers=args.workers, train_resolution=args.train_resolution)
    except KeyboardInterrupt as err:
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # e.g. disk full, a source file that cannot be read: name the file, no traceback
        where = err.filename or args.out
        print(f"error: {where}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(_summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
