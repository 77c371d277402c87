"""`tokensift` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from tokensift.errors import TokensiftError, one_line

# Modules that add their own sub-commands through `add_parser(subparsers)`.
EXTRA_COMMANDS: list[str] = ["tokensift.calibration", "tokensift.audit.cli", "tokensift.serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokensift",
        description="Run LLMs with token-level efficiency methods and measure what they cost and save.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from tokensift.commands import add_parsers

    add_parsers(sub)
    for name in EXTRA_COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def _version() -> str:
    from tokensift import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TokensiftError as exc:
        print(f"tokensift: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokensift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
