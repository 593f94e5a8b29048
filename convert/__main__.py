"""`python -m convert {tiny,build,push}`: make, assemble and publish MQwen checkpoints."""

import argparse
import sys

EXAMPLES = """examples:
  python -m convert tiny /tmp/mqwen-tiny --seed 0
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Build and publish MQwen checkpoints.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="write a tiny random Hub-ready checkpoint (for tests and examples)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "tiny":
        from .tiny import main as run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
