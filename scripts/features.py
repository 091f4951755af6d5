#!/usr/bin/env python
"""Same as `s2m2 features`: see s2m2/features.py."""

import sys

from s2m2.features import main

if __name__ == "__main__":
    sys.exit(main())
