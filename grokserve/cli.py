"""The `grokserve` command line.

Each subcommand lives in `grokserve/commands/<name>.py` with `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Those modules import torch, ray or kopf only inside `run`, so that every
subcommand's `--help` works in any image, and the operator image (no torch) runs `grokserve operator`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: tuple[str, ...] = ("inspect", "generate", "plan", "render", "operator", "serve")
# The pip extra that provides what each command imports inside `run`.
EXTRAS = {"operator": "operator", "render": "operator", "serve": "serve"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grokserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"grokserve.commands.{name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as error:
        print(
            f"grokserve {args.command}: missing dependency {error.name!r}; install it with "
            f"pip install 'grokserve[{EXTRAS.get(args.command, 'model')}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
