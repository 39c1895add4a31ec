"""`hugepaged` for tests: the installed command plus fixture roots it does not offer.

    python tests/hugepaged_fixture.py scan --pid N --page-idle FILE
    python tests/hugepaged_fixture.py run ... --sys-root DIR

The installed console script has no way to point the kernel layer at another /proc, /sys or
idle-page bitmap: a root daemon told to write a file of the caller's choosing, or to quote a
file the caller cannot read, is a hole. Tests that need a fixture (this machine's kernel has
no idle page tracking, for one) run this file instead; everything else is the real command
(hugepaged.cli.main with this parser). Never imported by hugepaged.
"""

from __future__ import annotations

import argparse
import os
import sys

FIXTURE = os.path.abspath(__file__)
# Every command that builds a Kernel from its arguments (cli.common.kernel_of).
KERNEL_COMMANDS = ("scan", "collapse", "run", "top", "restore-kernel", "uninstall")


def fixture_command(*args: str) -> list[str]:
    """The command line of `hugepaged ARGS...` through this entry point."""
    return [sys.executable, FIXTURE, *args]


def fixture_parser() -> argparse.ArgumentParser:
    from hugepaged.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in KERNEL_COMMANDS:
        p = sub.choices[name]
        p.add_argument("--proc-root", default="/proc", help="a fixture /proc")
        p.add_argument("--sys-root", default="/sys", help="a fixture /sys")
        p.add_argument("--page-idle", default="",
                       help="the idle page tracking bitmap alone (a fixture file)")
    return parser


if __name__ == "__main__":
    from hugepaged.cli import main

    sys.exit(main(parser=fixture_parser()))
