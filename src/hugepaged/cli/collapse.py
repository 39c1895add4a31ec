"""`hugepaged collapse --pid PID`: one full khugepaged-style pass over one process, now."""

import argparse
import os
import time

from hugepaged.cli.common import add_common, check_pids, control_of, kernel_of, tunables_of
from hugepaged.preflight import require_collapse_support
from hugepaged.results import NOTHING_TO_DO, ScanResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collapse", help="collapse every eligible window of one process now",
                       description="Classify every window of PID with khugepaged's checks "
                                   "and collapse each SUCCEED window, one per call.")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--dry-run", action="store_true", help="decide and report, collapse nothing")
    p.add_argument("--force", action="store_true",
                   help="MADV_COLLAPSE's own semantics: every window with a present page, "
                        "max_ptes_* and enabled ignored")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per window")
    add_common(p)
    p.set_defaults(run=run)


def targets(scan, force: bool) -> list[int]:
    """SUCCEED windows; with --force every window that has something mapped."""
    if not force:
        return [a for a, _ in scan.windows(ScanResult.SUCCEED)]
    return [a for a, r in scan.windows() if r not in NOTHING_TO_DO]


def run(args: argparse.Namespace) -> int:
    from hugepaged import report
    from hugepaged.collapse import CollapseOutcome, collapse_windows
    from hugepaged.kernel.madvise import pidfd_open
    from hugepaged.kernel.procfs import mapped_at
    from hugepaged.scan.process import scan_process

    kernel = kernel_of(args)
    check_pids(kernel, [args.pid])
    tunables = tunables_of(args, kernel)
    require_collapse_support(kernel)
    pidfd = pidfd_open(args.pid)
    try:
        t0 = time.perf_counter()
        before = kernel.procfs.status(args.pid).rss_anon_kb
        with kernel.kpageflags() as kpf:
            scan = scan_process(kernel, args.pid, control_of(tunables, args.force), kpf)
        addresses = targets(scan, args.force)
        outcomes = [] if args.dry_run else collapse_windows(
            pidfd, args.pid, addresses, kernel.geometry.pmd_size,
            lambda a: mapped_at(kernel.procfs.maps_text(args.pid), a))
        if args.dry_run:
            outcomes = [CollapseOutcome(a, ScanResult.SUCCEED) for a in addresses]
        after = kernel.procfs.status(args.pid).rss_anon_kb
        doc = report.collapse_json(scan, outcomes, dry_run=args.dry_run, force=args.force,
                                   seconds=time.perf_counter() - t0,
                                   rss_growth_kb=after - before)
    finally:
        os.close(pidfd)
    if args.json:
        report.print_json(doc)
    else:
        report.print_collapse(doc, args.verbose)
    return 0
