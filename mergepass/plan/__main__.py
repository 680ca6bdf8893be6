import sys

from ..cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
