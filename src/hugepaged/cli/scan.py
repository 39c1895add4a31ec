"""`hugepaged scan`: decide every window of every (or the given) process, collapse nothing."""

import argparse
import os

from hugepaged import report
from hugepaged.cli.common import add_common, check_pids, kernel_of, require_root, tunables_of
from hugepaged.errors import AccessDenied, ProcessGone
from hugepaged.scan.mm import ProcessScan, scan_process


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="show, per process, what khugepaged's checks decide",
                       description="Classify every 2 MiB window of anonymous memory with "
                                   "khugepaged's checks. Collapses nothing.")
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="only this process (repeatable); default: every process")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_common(p)
    p.set_defaults(run=run)


def scan_many(kernel, pids: list[int], tunables, *, explicit: bool
              ) -> tuple[list[ProcessScan], list[str]]:
    """Scan each pid; vanished ones are dropped, unreadable ones summed up in one line."""
    scans, denied = [], []
    with kernel.kpageflags() as kpf:
        for pid in pids:
            try:
                s = scan_process(kernel, pid, tunables, kpf)
            except ProcessGone:
                if explicit:
                    raise
                continue
            except AccessDenied:
                if explicit:
                    raise
                denied.append(pid)
                continue
            if explicit or s.anon_kb or s.eligible_windows:
                scans.append(s)
    skipped = []
    if denied:
        skipped.append(f"{len(denied)} process(es) not readable (permission denied): "
                       + ", ".join(map(str, denied[:10])) + (" ..." if len(denied) > 10 else ""))
    return scans, skipped


def run(args: argparse.Namespace) -> int:
    kernel = kernel_of(args)
    check_pids(kernel, args.pid)
    tunables = tunables_of(args, kernel)
    require_root()
    kernel.thp.require()
    explicit = bool(args.pid)
    pids = args.pid or [p for p in kernel.procfs.pids() if p != os.getpid()]
    for pid in args.pid:
        if not kernel.procfs.exists(pid):
            raise ProcessGone(f"pid {pid}: no such process")
    scans, skipped = scan_many(kernel, pids, tunables, explicit=explicit)
    if args.json:
        report.print_json(report.scan_json(scans, tunables.as_dict(), skipped))
    else:
        report.print_scan(scans, skipped)
    return 0
