"""`hugepaged restore-kernel`: put back kernel khugepaged values a killed daemon left quiet."""

import argparse

from hugepaged.cli.common import kernel_of
from hugepaged.paths import STATE_FILE
from hugepaged.preflight import require_root


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore-kernel",
                       help="restore the kernel's khugepaged settings saved by a daemon "
                            "that could not restore them (e.g. after SIGKILL); only knobs "
                            "still at the quiet values are written")
    p.add_argument("--state-file", default=STATE_FILE, help="(default %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_root()
    from hugepaged.daemon.kernel_quiet import KernelQuieter

    quieter = KernelQuieter(kernel_of(args).thp, args.state_file)
    restored = quieter.recover()
    if not restored and getattr(quieter, "holder", None) is not None:
        print(f"nothing to restore: a running hugepaged{quieter.holder_text()} holds "
              f"{args.state_file}")
        return 0
    print("restored" if restored else "nothing to restore")
    return 0
