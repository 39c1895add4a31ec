"""`hugepaged collapse --pid PID`: one full khugepaged-style pass over one process, now."""

import argparse
import os
import time

from hugepaged.cli.common import add_common, add_target_options, check_pids, kernel_of, policy_of
from hugepaged.preflight import require_collapse_support
from hugepaged.results import COLLAPSIBLE, NOTHING_TO_DO, ScanResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collapse", help="collapse every eligible window of one process now",
                       description="Classify every window of PID with khugepaged's checks "
                                   "and collapse each SUCCEED window (a bounded batch a call).")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--dry-run", action="store_true", help="decide and report, collapse nothing")
    p.add_argument("--force", action="store_true",
                   help="MADV_COLLAPSE's own semantics: every window with a present page, "
                        "max_ptes_* and enabled ignored")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per window")
    p.add_argument("--max-cpu-percent", default="0", metavar="N",
                   help="pace the collapses: sleep between windows so their CPU stays at N%% "
                        "of one core (0..100; 0, the default: unpaced)")
    add_target_options(p)
    add_common(p)
    p.set_defaults(run=run)


def targets(scan, force: bool) -> list[int]:
    """SUCCEED (and PTE_MAPPED_HUGEPAGE) windows; with --force every window that has
    something mapped."""
    if not force:
        return [a for a, _ in scan.windows(*COLLAPSIBLE)]
    return [a for a, r in scan.windows() if r not in NOTHING_TO_DO]


def cpu_percent(text: str) -> int:
    """Checked as the max_cpu_percent tunable is (0..100); a refusal is one line, exit 2."""
    from hugepaged.errors import InvalidTunable
    from hugepaged.tunables import parse

    try:
        return int(parse("max_cpu_percent", text))
    except InvalidTunable as err:
        raise InvalidTunable(str(err).replace("max_cpu_percent", "--max-cpu-percent")) from None


def within_bloat(scan, addresses: list[int], limit_kb: int | None, page_kb: int
                 ) -> tuple[list[int], dict[int, str]]:
    """The windows a target's bloat budget allows, in address order (each fills its empty
    and zero-page PTEs: page_kb each), and those it holds back as EXCEED_BLOAT_BUDGET: the
    daemon's ledger, planned as if every window collapsed."""
    from hugepaged.collapse import BloatLedger

    nones = scan.none_by_window()
    kept, refused = BloatLedger(limit_kb).plan(
        scan.pid, [(a, nones.get(a, 0) * page_kb) for a in addresses])
    return kept, {a: ScanResult.EXCEED_BLOAT_BUDGET.name for a in refused}


def run(args: argparse.Namespace) -> int:
    from hugepaged import report
    from hugepaged.collapse import (
        COMMAND,
        CollapseOutcome,
        Pacer,
        ProcessCollapse,
        ThreadMeter,
        window_now,
    )
    from hugepaged.collapse.path import collapse_paced, succeeded
    from hugepaged.kernel.madvise import pidfd_open
    from hugepaged.scan.process import scan_process

    kernel = kernel_of(args)
    percent = cpu_percent(args.max_cpu_percent)
    check_pids(kernel, [args.pid])
    _, control_for, _ = policy_of(args, kernel, args.force)
    control = control_for(args.pid)
    require_collapse_support(kernel)
    pidfd = pidfd_open(args.pid)
    try:
        pacer = Pacer(percent, time.monotonic())
        meter = ThreadMeter(pacer)  # the scan's CPU counts against the pace too
        t0 = time.perf_counter()
        before = kernel.procfs.status(args.pid).vm_rss_kb
        with kernel.kpageflags() as kpf:
            scan = scan_process(kernel, args.pid, control, kpf)
            page_kb = kernel.geometry.page_size >> 10
            addresses, refused = within_bloat(scan, targets(scan, args.force),
                                              control.max_bloat_kb, page_kb)
            # Each collapse maps a whole window: the new pages it fills in, and for
            # shared memory those only in the page cache (ProcessScan.rss_growth_pages).
            predicted = scan.rss_growth_pages(set(addresses)) * page_kb
            proc = ProcessCollapse(args.pid, pidfd, kernel.geometry.pmd_size,
                                   lambda a: window_now(kernel, args.pid, kpf, control, a),
                                   COMMAND)
            outcomes = [] if args.dry_run else collapse_paced(proc, addresses, pacer, meter)
        if args.dry_run:
            outcomes = [CollapseOutcome(a, ScanResult.SUCCEED) for a in addresses]
        else:
            predicted = scan.rss_growth_pages(succeeded(outcomes)) * page_kb
        after = kernel.procfs.status(args.pid).vm_rss_kb
        doc = report.collapse_json(scan, outcomes, dry_run=args.dry_run, force=args.force,
                                   seconds=time.perf_counter() - t0,
                                   rss_growth_kb=0 if args.dry_run else after - before,
                                   rss_predicted_kb=predicted, target=control.target,
                                   max_cpu_percent=percent, refused=refused)
    finally:
        os.close(pidfd)
    if args.json:
        report.print_json(doc)
    else:
        report.print_collapse(doc, args.verbose)
    return 0
