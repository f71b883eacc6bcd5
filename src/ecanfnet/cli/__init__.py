"""`ecanfnet` command line: one module per subcommand, each adding its options and calling the library.

Heavy imports (torch, PIL, the model) stay inside the commands' run() functions, so `ecanfnet --help`
does not pay for them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..errors import BackendError, ShardError, WeightsError
from . import bench, embed, evaluate, explain, export, predict, push, quantize, search, serve, train
from ._console import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, console_log, error, os_error_text, warnings_as_lines
from ._options import apply_fast_switch

__all__ = ["build_parser", "main"]

# In the order `ecanfnet --help` lists them.
COMMANDS = (predict, explain, bench, export, train, push, evaluate, embed, quantize, search, serve)


def build_parser() -> argparse.ArgumentParser:
    """The `ecanfnet` parser, with every subcommand's."""
    parser = argparse.ArgumentParser(prog="ecanfnet", description="ECA-NFNet-L0 image classifier.")
    parser.add_argument("--version", action="version", version=f"ecanfnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ecanfnet` console script."""
    args = build_parser().parse_args(argv)
    apply_fast_switch(args)
    warnings_as_lines()
    with console_log():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command's exit status; a library error, an interrupt or a failed write is one line on stderr."""
    try:
        return args.func(args)
    except (WeightsError, BackendError, ShardError) as exc:  # ShardError: embed's EmbedError too
        error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("ecanfnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # writing an output (disk full, read-only, a folder in the way, ...)
        error(os_error_text(exc))
        return EXIT_FAILED
