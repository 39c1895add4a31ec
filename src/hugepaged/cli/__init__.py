"""The `hugepaged` command: one module per subcommand, one place that turns errors into exits."""

import argparse
import sys
from collections.abc import Sequence

from hugepaged import __version__
from hugepaged.cli import (
    collapse,
    completion,
    get,
    install,
    manpage,
    restore_kernel,
    run,
    scan,
    set,
    status,
    suggest,
    top,
    uninstall,
    unit,
)
from hugepaged.errors import HugepagedError
from hugepaged.names import printable

COMMANDS = [scan, collapse, run, status, top, get, set, suggest, restore_kernel, install,
            uninstall, unit, completion, manpage]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hugepaged",
        description="khugepaged in userspace: collapse anonymous memory into transparent "
                    "huge pages with process_madvise(MADV_COLLAPSE).")
    parser.add_argument("--version", action="version", version=f"hugepaged {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None,
         parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; `parser` is build_parser()'s unless a caller extends it (the tests'
    fixture entry point adds fixture roots the installed command does not offer)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    args.parser = parser  # completion and manpage describe it (without importing this module)
    try:
        return int(args.run(args) or 0)
    except HugepagedError as err:
        from hugepaged.logs import journal_prefix

        print(f"{journal_prefix(sys.stderr, 3)}hugepaged: {printable(str(err))}",
              file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
