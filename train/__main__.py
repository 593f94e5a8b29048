"""`mqwen-train` (or `python -m mqwen.train`): see `mqwen-train --help`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
