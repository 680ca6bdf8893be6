"""``python -m mergepass.viz``: draw merge maps (see :mod:`mergepass.cli.viz`)."""
import sys

from .cli.viz import main

if __name__ == "__main__":
    sys.exit(main())
