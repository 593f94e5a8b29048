"""`python -m mqwen.train.configs [NAME]`: print a shipped launcher config's path (or list them)."""

import argparse

from . import names, path

EXAMPLES = """examples:
  python -m mqwen.train.configs                        # list the shipped configs
  accelerate launch --config_file "$(python -m mqwen.train.configs fsdp_cpu.yaml)" -m mqwen.train --model ...
  mqwen-train --deepspeed "$(python -m mqwen.train.configs deepspeed_zero3.json)" --model ...
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mqwen.train.configs",
        description="Print the path of a launcher config shipped with MQwen (accelerate, DeepSpeed), or list them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", help="a config's file name, e.g. fsdp_cpu.yaml (omit to list them)")
    args = parser.parse_args(argv)
    if args.name is None:
        print("\n".join(names()))
        return 0
    try:
        print(path(args.name))
    except ValueError as error:
        parser.error(str(error))
    return 0
