import sys

from s2m2.cli import main

sys.exit(main())
