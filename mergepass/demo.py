"""``python -m mergepass.demo``: compile a ViT and print its schedule, speedup and fidelity (see
:mod:`mergepass.cli.demo`)."""
import sys

from .cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
