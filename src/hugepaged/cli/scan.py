"""`hugepaged scan`: decide every window of every (or the given) process, collapse nothing."""

import argparse
import os

from hugepaged.cli.common import add_common, add_target_options, check_pids, kernel_of, policy_of
from hugepaged.errors import AccessDenied, ProcessGone, UsageError
from hugepaged.preflight import require_scan_support


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="show, per process, what khugepaged's checks decide",
                       description="Classify every 2 MiB window of anonymous memory with "
                                   "khugepaged's checks. Collapses nothing.")
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="only this process (repeatable); default: every process")
    p.add_argument("--cgroup", metavar="PATH",
                   help="only the processes in this cgroup or below it: a path under a "
                        "cgroup mount (/sys/fs/cgroup/...) or as /proc/PID/cgroup shows it "
                        "(v1 and v2)")
    p.add_argument("--vmas", action="store_true",
                   help="one line per VMA of each process (with --pid)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_target_options(p)
    add_common(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hugepaged import report
    from hugepaged.scan.mthp_kernel import describe, kernel_mthp_collapse
    from hugepaged.scan.process import scan_processes

    kernel = kernel_of(args)
    check_pids(kernel, args.pid)
    tunables, control_for, target = policy_of(args, kernel)
    require_scan_support(kernel)
    if args.vmas and not args.pid:
        raise UsageError("--vmas needs --pid")
    explicit = bool(args.pid)
    pids = args.pid or [p for p in kernel.procfs.pids() if p != os.getpid()]
    for pid in args.pid:
        if not kernel.procfs.exists(pid):
            raise ProcessGone(f"pid {pid}: no such process")
    if target is not None and not explicit:
        pids = matching(kernel, pids, target)  # the processes this target would take
    if args.cgroup is not None:
        pids = in_cgroup(kernel, pids, args.cgroup)
    scans, skipped = scan_processes(kernel, pids, control_for, explicit=explicit, usage=True)
    mthp = kernel_mthp_collapse(kernel)
    if args.json:
        doc = report.scan_json(scans, tunables.as_dict(), skipped,
                               target=target.name if target else None)
        doc["kernel_mthp_collapse"] = mthp
        if args.vmas:
            doc["vmas"] = {str(s.pid): report.vmas_json(s) for s in scans}
        report.print_json(doc)
    elif args.vmas:
        for s in scans:
            report.print_vmas(s)
    else:
        note = describe(mthp)
        report.print_scan(scans, skipped, (note,) if note else ())
    return 0


def matching(kernel, pids: list[int], target) -> list[int]:
    """The pids `target` matches (comm, exe, cgroup, pid); vanished ones are dropped."""
    from hugepaged.errors import HugepagedError
    from hugepaged.targets import ProcessFacts

    out = []
    for pid in pids:
        try:
            comm = kernel.procfs.stat(pid).comm
        except (HugepagedError, OSError):
            continue
        if target.matches(ProcessFacts(kernel.procfs, pid, comm)):
            out.append(pid)
    return out


def in_cgroup(kernel, pids: list[int], path: str) -> list[int]:
    """The pids whose /proc/PID/cgroup puts them in `path` or below it, in any hierarchy."""
    from hugepaged.targets import cgroup_under

    rel = kernel.procfs.cgroup_relative(path)
    if rel is None:
        raise UsageError(f"--cgroup {path!r}: no such cgroup")
    out = []
    for pid in pids:
        try:
            if any(cgroup_under(p, rel) for p in kernel.procfs.cgroups(pid)):
                out.append(pid)
        except (ProcessGone, AccessDenied):
            continue
    return out
