"""Options and set-up every subcommand shares: kernel roots, --set, preconditions."""

import argparse
import os

from hugepaged.config import ConfigError, check_socket_path
from hugepaged.errors import AccessDenied, UsageError
from hugepaged.kernel import Kernel
from hugepaged.tunables import SPECS, Tunables, parse_assignments, resolve


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="assignments", action="append", default=[],
                   metavar="KEY=VALUE", help="set a tunable for this run (repeatable); "
                   f"keys: {', '.join(SPECS)}")
    p.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    p.add_argument("--sys-root", default="/sys", help=argparse.SUPPRESS)


def kernel_of(args: argparse.Namespace) -> Kernel:
    return Kernel(proc_root=args.proc_root, sys_root=args.sys_root)


def kernel_tunables(kernel: Kernel) -> dict[str, int | str]:
    """The kernel's current values of the tunables it shares with hugepaged."""
    values: dict[str, int | str] = {"enabled": kernel.thp.effective_enabled()}
    values.update({k: v for k, v in kernel.thp.khugepaged().items() if k in SPECS})
    return values


def tunables_of(args: argparse.Namespace, kernel: Kernel, *layers: dict) -> Tunables:
    """Defaults < the kernel's current values < config layers < --set; checked first."""
    assigned = parse_assignments(args.assignments)
    return resolve(kernel_tunables(kernel), *layers, assigned)


def require_root() -> None:
    if os.geteuid() != 0:
        raise AccessDenied("hugepaged needs root: PFNs and /proc/kpageflags need "
                           "CAP_SYS_ADMIN, MADV_COLLAPSE on another process CAP_SYS_NICE")


def check_pids(kernel: Kernel, pids: list[int]) -> list[int]:
    """--pid values a process can have: 1 .. pid_max-1 (the kernel's bound, read live)."""
    top = kernel.procfs.pid_max()
    for pid in pids:
        if not 0 < pid < top:
            raise UsageError(f"--pid {pid}: not a process id (1..{top - 1})")
    return pids


def check_socket(path: str) -> str:
    """--socket PATH: a path a client can reach (an empty one would bind an abstract socket)."""
    try:
        return check_socket_path(path, "--socket")
    except ConfigError as err:
        raise UsageError(str(err)) from None
