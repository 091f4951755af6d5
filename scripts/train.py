#!/usr/bin/env python
"""Thin wrapper around ``s2m2 train`` (same arguments), for checkouts where the package is not installed
as a command: ``python scripts/train.py --config configs/mini_imagenet/s2m2_r.yaml [--set k=v ...]``."""

import sys

from s2m2.cli import main

if __name__ == "__main__":
    # Through the CLI, so Ctrl-C and errors read exactly as `s2m2 train`'s (one line, exit 130 / 2).
    sys.exit(main(["train", *sys.argv[1:]]))
