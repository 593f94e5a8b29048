"""`python -m mqwen.demo ...`: the same as the `mqwen-demo` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
