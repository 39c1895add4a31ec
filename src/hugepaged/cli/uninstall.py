"""`hugepaged uninstall`: undo `hugepaged install` exactly, and leave the kernel as it was.

Stops and disables the service where systemd runs it (its own stop restores what it
changed), then restores the kernel's khugepaged settings a killed daemon may have left
quiet (as `restore-kernel` does), then removes the files install recorded; see cli/install.py.
"""

import argparse
import os

from hugepaged.cli.install import (
    RECORD,
    add_locations,
    below,
    os_errors,
    systemctl,
    systemd_running,
    uninstall,
)
from hugepaged.errors import UsageError
from hugepaged.paths import STATE_FILE


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = ("remove what hugepaged install put in place (as it recorded), stop the service "
            "and restore the kernel's khugepaged settings")
    p = sub.add_parser("uninstall", help=text, description=text[0].upper() + text[1:]
                       + ". A file changed since it was installed is kept.")
    add_locations(p)
    p.add_argument("--state-file", default=None, metavar="PATH",
                   help=f"the daemon's saved kernel values (default {STATE_FILE}; with "
                        "--root only when given)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hugepaged.cli.restore_kernel import restore

    if not below(args.root, RECORD).exists():
        raise UsageError(f"{below(args.root, RECORD)}: no record of an installation "
                         "(nothing removed)")
    if systemd_running(args.root):
        systemctl("disable", "--now", "hugepaged.service")
    if args.state_file is not None or os.path.realpath(args.root) == "/":
        args.state_file = args.state_file or STATE_FILE
        print(f"kernel khugepaged settings: {restore(args)}")
    with os_errors("uninstall"):
        removed, kept = uninstall(args.root)
    for path in removed:
        print(f"removed {below(args.root, path)}")
    for path in kept:
        print(f"kept {below(args.root, path)} (changed since it was installed)")
    if systemd_running(args.root):
        systemctl("daemon-reload")
    return 0
