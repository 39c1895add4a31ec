"""`hugepaged restore-kernel`: put back kernel khugepaged values a killed daemon left quiet.

Leaves nothing behind: the state file goes once its values are back, and so does its lock
file when no daemon holds it (kernel.limits.remove_lock), as does a lock the command itself
had to create to look.
"""

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


def restore(args: argparse.Namespace) -> str:
    """What `restore-kernel` does, as one line to print (`uninstall` does it too)."""
    import os

    from hugepaged.daemon.kernel_quiet import KernelQuieter
    from hugepaged.kernel.limits import remove_lock

    quieter = KernelQuieter(kernel_of(args).thp, args.state_file)
    if not os.path.lexists(args.state_file) and not os.path.lexists(quieter.lock_file):
        return "nothing to restore"
    restored = quieter.recover()
    if not restored and getattr(quieter, "holder", None) is not None:
        return (f"nothing to restore: a running hugepaged{quieter.holder_text()} holds "
                f"{args.state_file}")
    remove_lock(quieter.lock_file)  # a daemon that took it meanwhile keeps it
    return "restored" if restored else "nothing to restore"


def run(args: argparse.Namespace) -> int:
    require_root()
    print(restore(args))
    return 0
