#!/usr/bin/env python
"""Same as `s2m2 evaluate`: see s2m2/evaluate.py."""

import sys

from s2m2.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
