"""``python -m data_prep.cifar_fs``: CIFAR-FS (Bertinetto split, 64 / 16 / 20); see data_prep.cifar."""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep.cifar import CIFAR_FS, prepare_variant

DATASET = CIFAR_FS.dataset


def prepare(source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
            workers: int = 2) -> Path:
    return prepare_variant(CIFAR_FS, source, out, resolution=resolution, overwrite=overwrite, workers=workers)


def main(argv: list[str] | None = None) -> int:
    from data_prep.cli import main as cli_main

    return cli_main(argv, dataset=DATASET)


if __name__ == "__main__":
    sys.exit(main())
