"""The ``gridgate`` command line."""
from __future__ import annotations

import argparse
import sys

from gridgate import __version__


def _version_text() -> str:
    from gridgate import hotpath

    return f"gridgate {__version__}\n{hotpath.describe()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridgate", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and which hot path is loaded")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    build_parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
