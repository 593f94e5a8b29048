"""`python -m mqwen.caption ...`: the same as the `mqwen-caption` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
