"""The ``s3delta`` console script: thin subcommands over typed Python functions.

Every ``S3DeltaError`` becomes ``error: <message>`` on stderr and exit code 2; nothing is written
on failure (outputs are written atomically, last).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import S3DeltaError
from . import (
    assets_cmd,
    config_cmd,
    demo_cmd,
    export_cmd,
    hostfile_cmd,
    inspect_cmd,
    pafi_cmd,
    space_cmd,
    structure_cmd,
    train_cmd,
    transfer_cmd,
)

COMMANDS = (
    space_cmd,
    structure_cmd,
    inspect_cmd,
    transfer_cmd,
    train_cmd,
    export_cmd,
    demo_cmd,
    hostfile_cmd,
    assets_cmd,
    pafi_cmd,
    config_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="s3delta", description="Sparse structure search for delta tuning (S3Delta) on DeepSpeed ZeRO-3."
    )
    parser.add_argument("--version", action="version", version=f"s3delta_ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.register(sub)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, keeping ``key=value`` overrides on both sides of an option: argparse ends a ``nargs="*"``
    positional at the first option, and ``s3delta search a=1 --nproc 2 b=2`` was refused."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args) or 0)
    except S3DeltaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `s3delta space ... | head`
        return 0
    except OSError as e:  # a path the user gave: unwritable output directory, missing input file
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
