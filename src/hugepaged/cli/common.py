"""Options and set-up every subcommand shares: kernel roots, --set, --socket, the policy."""

import argparse
from typing import TYPE_CHECKING

from hugepaged.errors import UsageError
from hugepaged.paths import SOCKET as DEFAULT_SOCKET
from hugepaged.tunables import SPECS, Tunables, parse_assignments, resolve

if TYPE_CHECKING:  # imported where used: building the parser must not load them
    from hugepaged.kernel import Kernel
    from hugepaged.policy import CollapseControl


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="assignments", action="append", default=[],
                   metavar="KEY=VALUE", help="set a tunable for this run (repeatable); "
                   f"keys: {', '.join(SPECS)}")


def add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"control socket (default {DEFAULT_SOCKET})")


def kernel_of(args: argparse.Namespace) -> "Kernel":
    """The running kernel. The installed command has no option to point it elsewhere (a root
    daemon told to write a file of the caller's choosing is a hole): tests that need fixture
    roots run tests/hugepaged_fixture.py, whose parser sets proc_root, sys_root, page_idle."""
    from hugepaged.kernel import Kernel

    return Kernel(proc_root=getattr(args, "proc_root", "/proc"),
                  sys_root=getattr(args, "sys_root", "/sys"),
                  page_idle_path=getattr(args, "page_idle", ""))


def tunables_of(args: argparse.Namespace, kernel: "Kernel", *layers: dict) -> Tunables:
    """Defaults < the kernel's current values < config layers < --set; checked first."""
    assigned = parse_assignments(args.assignments)
    return resolve(kernel.thp.current(), *layers, assigned)


def check_pids(kernel: "Kernel", pids: list[int]) -> list[int]:
    """--pid values that name a process: 1 .. pid_max-1 (the kernel's bound, read live), and
    not a thread id of another process or a kernel thread (both once said "process has
    exited"). A pid that cannot be read is left to the command (it says gone)."""
    from hugepaged.errors import HugepagedError
    from hugepaged.names import printable

    top = kernel.procfs.pid_max()
    for pid in pids:
        if not 0 < pid < top:
            raise UsageError(f"--pid {pid}: not a process id (1..{top - 1})")
        try:
            st = kernel.procfs.stat(pid)
            tgid = kernel.procfs.status(pid).tgid
        except (HugepagedError, OSError, ValueError, IndexError):
            continue
        if st.is_kernel_thread:
            raise UsageError(f"--pid {pid}: {printable(st.comm)} is a kernel thread "
                             "(no user memory to collapse)")
        if tgid and tgid != pid:
            raise UsageError(f"--pid {pid}: a thread of process {tgid}, not a process "
                             f"(give --pid {tgid})")
    return pids


def check_socket(path: str) -> str:
    """--socket PATH: a path a client can reach (an empty one would bind an abstract socket)."""
    from hugepaged.config import ConfigError, check_socket_path

    try:
        return check_socket_path(path, "--socket")
    except ConfigError as err:
        raise UsageError(str(err)) from None


def control_of(tunables: Tunables, force: bool = False) -> "CollapseControl":
    """The policy of a one-shot command: the global one (MADV_COLLAPSE's with --force)."""
    from hugepaged.policy import CollapseControl

    return CollapseControl.from_tunables(tunables, force=force)


def add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="configuration file: its tunables apply, and its targets for --target "
                        "(default with --target: /etc/hugepaged/hugepaged.toml)")
    p.add_argument("--target", metavar="NAME",
                   help="apply this target's policy (from the configuration file) once")


def policy_of(args: argparse.Namespace, kernel: "Kernel", force: bool = False):
    """(tunables, control_for, target) of a one-shot command. control_for(pid) is one
    process's policy: with --target that target's over the global one; with --config alone
    the first target the process matches, as the daemon resolves it; else the global one.
    An unknown target is bad input (exit 2)."""
    from hugepaged.config import load_config
    from hugepaged.errors import UsageError
    from hugepaged.targets import by_name, control_under, controls_by_pid

    cfg = load_config(args.config) if args.config or args.target else None
    tunables = tunables_of(args, kernel, *([cfg.tunables] if cfg else []))
    control = control_of(tunables, force)
    if not args.target:
        return tunables, controls_by_pid(kernel.procfs, control, cfg.targets if cfg else []), None
    target = by_name(cfg.targets, args.target)
    if target is None:
        from hugepaged.config import DEFAULT_PATH

        known = ", ".join(t.name for t in cfg.targets) or "none"
        raise UsageError(f"{args.config or DEFAULT_PATH}: no target named '{args.target}' "
                         f"(targets: {known})")
    forced = control_under(control, target)
    return tunables, lambda pid: forced, target
