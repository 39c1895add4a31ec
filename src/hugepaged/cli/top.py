"""`hugepaged top`: processes ordered by how much memory hugepaged could still collapse."""

import argparse
import os
import time

from hugepaged.cli.common import (
    add_common,
    add_socket,
    check_pids,
    check_socket,
    control_of,
    kernel_of,
    tunables_of,
)
from hugepaged.errors import DaemonUnreachable, UsageError
from hugepaged.preflight import require_scan_support
from hugepaged.tunables import parse_assignments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="live view of processes by memory still collapsible",
                       description="Scan every (or the given) process each refresh and list "
                                   "them by collapsible windows, with the daemon's counters "
                                   "when it answers on --socket. Collapses nothing.")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes (default %(default)s)")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--once", action="store_true", help="print one frame and exit")
    count.add_argument("--iterations", type=int, metavar="N", help="N frames, then exit")
    p.add_argument("--limit", type=int, metavar="N",
                   help="rows shown (default: what fits the terminal; all when piped)")
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="only this process (repeatable); default: every process")
    p.add_argument("--config", metavar="FILE",
                   help="configuration file: each process's COLLAPSIBLE is decided by the "
                        "target it matches, as the daemon decides it (default: the target the "
                        "daemon on --socket applies to each process it registered, else the "
                        "global policy)")
    add_socket(p)
    add_common(p)
    p.set_defaults(run=run)


def daemon_status(path: str) -> tuple[dict | None, str | None]:
    from hugepaged.control.client import request

    try:
        return request(path, {"cmd": "status"})["status"], None
    except DaemonUnreachable as err:
        return None, str(err)


def take_frame(args: argparse.Namespace, kernel, limit: int | None = None):
    """One refresh: the daemon's status first (its tunables decide), then the scan; the
    mTHP of the `limit` rows shown (all: None) last."""
    status, error = daemon_status(args.socket)
    from hugepaged.scan.process import scan_processes
    from hugepaged.targets import controls_by_pid, controls_of_daemon
    from hugepaged.topview import Frame, rows_of

    cfg = getattr(args, "loaded_config", None)  # read once, at start (run)
    layers = ([cfg.tunables] if cfg else []) + ([status["tunables"]] if status else [])
    tunables = tunables_of(args, kernel, *layers)
    pids = args.pid or [p for p in kernel.procfs.pids() if p != os.getpid()]
    t0 = time.monotonic()
    # The policy of each process: --config's targets when given; else, attached to a
    # daemon, the target the daemon applies to it, so a row's TARGET and its COLLAPSIBLE
    # agree; else the global policy.
    control = control_of(tunables)
    control_for = controls_by_pid(kernel.procfs, control, cfg.targets) if cfg else \
        (controls_of_daemon(status, control) if status else None) or (lambda pid: control)
    scans, skipped = scan_processes(kernel, pids, control_for, explicit=False)
    rows = with_mthp(kernel, rows_of(scans, status), scans, limit)
    return Frame(rows=rows, status=status, daemon_error=error,
                 skipped=skipped, interval=None if args.once else args.interval,
                 scan_seconds=time.monotonic() - t0)


def with_mthp(kernel, rows: list, scans: list, limit: int | None) -> list:
    """The rows with their anonymous mTHP by size, counted (pagemap and kpageflags of every
    present page) only for the rows shown, and not at all while the kernel's nr_anon
    counters say the machine has no mTHP folio."""
    from dataclasses import replace

    from hugepaged.errors import HugepagedError
    from hugepaged.scan.usage import anon_mthp_kb, mthp_in_system

    try:
        nr_anon = kernel.thp.nr_anon()
    except OSError:
        nr_anon = {}
    if not mthp_in_system(nr_anon, kernel.geometry.pmd_size >> 10):
        return [replace(r, anon_mthp_kb=()) for r in rows]
    vmas = {s.pid: [v.vma for v in s.vmas] for s in scans}
    shown = rows if limit is None else rows[:max(0, limit)]
    out = []
    with kernel.kpageflags() as kpf:
        for r in shown:
            try:
                counts = anon_mthp_kb(kernel, r.pid, vmas[r.pid], kpf)
            except (HugepagedError, OSError):  # gone since the scan: shown as not counted
                out.append(r)
                continue
            out.append(replace(r, anon_mthp_kb=tuple(sorted(counts.items()))))
    return out + rows[len(shown):]


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    if args.iterations is not None and args.iterations < 1:
        raise UsageError("--iterations must be at least 1")
    kernel = kernel_of(args)
    check_pids(kernel, args.pid)
    check_socket(args.socket)
    parse_assignments(args.assignments)  # refused before anything else
    from hugepaged.config import load_config

    args.loaded_config = load_config(args.config) if args.config else None
    require_scan_support(kernel)
    from hugepaged.report import console as make_console

    console = make_console()
    frames = 1 if args.once else args.iterations
    try:
        if console.is_terminal and not args.once:
            _live(args, kernel, console, frames)
        else:
            _printed(args, kernel, console, frames)
    except KeyboardInterrupt:
        pass  # q for top is Ctrl-C here
    return 0


def _limit(args: argparse.Namespace, console, live: bool) -> int | None:
    from hugepaged.topview import HEADER_LINES

    if args.limit is not None:
        return args.limit
    return max(1, console.size.height - HEADER_LINES - 3) if live else None


def _live(args, kernel, console, frames: int | None) -> None:
    from rich.live import Live

    from hugepaged.topview import render

    with Live(console=console, auto_refresh=False, screen=True) as live:
        n = 0
        while frames is None or n < frames:
            t0 = time.monotonic()
            limit = _limit(args, console, True)
            live.update(render(take_frame(args, kernel, limit), limit), refresh=True)
            n += 1
            if frames is None or n < frames:
                time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))


def _printed(args, kernel, console, frames: int | None) -> None:
    from hugepaged.topview import render

    n = 0
    while frames is None or n < frames:
        t0 = time.monotonic()
        if n:
            console.print()
        limit = _limit(args, console, False)
        console.print(render(take_frame(args, kernel, limit), limit))
        n += 1
        if frames is None or n < frames:
            time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
