"""``python -m mergepass.infer``: logits or features of every image in a folder, as Parquet (see
:mod:`mergepass.cli.infer`)."""
import sys

from .cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
