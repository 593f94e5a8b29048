"""`python -m mqwen.benchmarks ...`: the same as the `mqwen-bench` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
