#!/usr/bin/env python
"""Same as `s2m2 cross-domain`: see s2m2/cross_domain.py."""

import sys

from s2m2.cross_domain import main

if __name__ == "__main__":
    sys.exit(main())
