"""`python -m mqwen.convert ...`: the same as the `mqwen-convert` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
