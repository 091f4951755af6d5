#!/usr/bin/env python
"""Same as `s2m2 features`: see s2m2/features.py."""

import sys

from s2m2.cli import main

if __name__ == "__main__":
    # Through the CLI, so Ctrl-C and errors read exactly as `s2m2 features`'s (one line, exit 130 / 2).
    sys.exit(main(["features", *sys.argv[1:]]))
