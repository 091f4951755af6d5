"""``python -m data_prep.fc100``: FC100 (60 / 20 / 20 classes by superclass); see data_prep.cifar."""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep.cifar import FC100, prepare_variant

DATASET = FC100.dataset


def prepare(source: Path, out: Path, *, resolution: int | None = None, overwrite: bool = False,
            workers: int = 2) -> Path:
    return prepare_variant(FC100, source, out, resolution=resolution, overwrite=overwrite, workers=workers)


def main(argv: list[str] | None = None) -> int:
    from data_prep.cli import main as cli_main

    return cli_main(argv, dataset=DATASET)


if __name__ == "__main__":
    sys.exit(main())
