#!/usr/bin/env python3
"""How fast hugepaged decides: GiB of anonymous address space per CPU-second.

Usage: python bench/bench_scan.py [--gib N] [--repeat R] [--json OUT]

A real workload process (kit/workload.py) maps one region of N GiB, MADV_HUGEPAGE, every
4 KiB page written. The kernel's THP mode is `never` for the whole run (saved and restored), so
the kernel's khugepaged cannot collapse it behind our back; hugepaged decides with
Tunables(enabled="madvise"), under which the region is eligible (VmFlags `hg`).

Each case times scan_process() -- everything the decision reads: /proc/PID/status and smaps,
PAGEMAP_SCAN, /proc/PID/pagemap, /proc/kpageflags, and the decision itself -- with
time.process_time() (user + system CPU of this process), R times after one warm-up, and
reports the median. The numerator is the address space decided: eligible windows x 2 MiB.

Cases: the region 4 KiB-mapped, via PAGEMAP_SCAN and via plain pagemap; then the whole region
collapsed with process_madvise(MADV_COLLAPSE) and the same two paths over PMD-mapped memory.
A separate, instrumented run per case says where the CPU goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import scenarios  # noqa: F401 - puts the repository root (the `kit` package) on sys.path

import hugepaged.kernel.kpageflags as kpf_mod
import hugepaged.scan.anon as mm_mod
from hugepaged.collapse import collapse_windows
from hugepaged.kernel import Kernel, KPageFlags, PageMap
from hugepaged.kernel.procfs import ProcFS, mapped_at
from hugepaged.policy import CollapseControl
from hugepaged.results import ScanResult
from hugepaged.scan.process import scan_process
from hugepaged.tunables import Tunables
from kit.helpers import HPAGE, Workload, anon_huge_kb, saved_thp

GOALS = {"4k": 20.0, "pmd": 200.0}  # GiB per CPU-second (issue 2)
GIB = 1 << 30

# Breakdown buckets: (label, owner, attribute). Time in each is CPU time inside that call.
PARTS = [
    ("status+smaps", ProcFS, "status"),
    ("status+smaps", ProcFS, "smaps"),
    ("PAGEMAP_SCAN", PageMap, "scan"),
    ("PAGEMAP_SCAN", mm_mod, "window_masks"),
    ("pagemap", PageMap, "read"),
    ("kpageflags", KPageFlags, "read"),
    ("decide", mm_mod, "decide"),
]


class _TimedOs:
    """Stands in for `os` inside hugepaged.kernel.kpageflags: times its preads."""

    def __init__(self, acc: dict[str, float], label: str) -> None:
        self._acc, self._label = acc, label

    def preadv(self, *a):
        t0 = time.process_time()
        try:
            return os.preadv(*a)
        finally:
            self._acc[self._label] = self._acc.get(self._label, 0.0) + time.process_time() - t0

    def __getattr__(self, name):
        return getattr(os, name)


@contextmanager
def timed_parts(acc: dict[str, float]):
    """Wrap each PARTS callable so its CPU time accumulates in acc[label] (not re-entrant).

    The preads of /proc/kpageflags are timed apart from the numpy work around them: at the
    end acc["kpageflags"] is split into "kpageflags pread" and "kpageflags numpy".
    """
    saved = [(kpf_mod, "os", kpf_mod.os)]
    kpf_mod.os = _TimedOs(acc, "kpageflags pread")

    def wrap(label, fn):
        def timed(*a, **kw):
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                acc[label] = acc.get(label, 0.0) + time.process_time() - t0
        return timed

    try:
        for label, owner, name in PARTS:
            fn = getattr(owner, name)  # a part renamed in hugepaged fails here, not silently
            saved.append((owner, name, fn))
            setattr(owner, name, wrap(label, fn))
        yield acc
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
        if "kpageflags" in acc:
            acc["kpageflags numpy"] = acc.pop("kpageflags") - acc.get("kpageflags pread", 0.0)


def one_scan(kernel, pid, tunables, kpf, use_scan):
    t0 = time.process_time()
    scan = scan_process(kernel, pid, CollapseControl.from_tunables(tunables), kpf,
                        use_pagemap_scan=use_scan)
    return time.process_time() - t0, scan


def run_case(kernel, pid, tunables, kpf, use_scan, repeat, expect):
    """Median GiB/CPU-s over `repeat` scans after a warm-up, plus a breakdown run."""
    _, scan = one_scan(kernel, pid, tunables, kpf, use_scan)  # warm-up
    results = {r.name: n for r, n in sorted(scan.results().items())}
    gib = scan.eligible_windows * HPAGE / GIB
    secs = [one_scan(kernel, pid, tunables, kpf, use_scan)[0] for _ in range(repeat)]
    acc: dict[str, float] = {}
    with timed_parts(acc):
        total, _ = one_scan(kernel, pid, tunables, kpf, use_scan)
    acc["other (glue)"] = max(0.0, total - sum(acc.values()))
    med = statistics.median(secs)
    return {
        "gib": gib, "windows": scan.eligible_windows, "results": results,
        "as_expected": results.get(expect.name, 0) == scan.eligible_windows,
        "cpu_seconds": secs, "median_cpu_seconds": med,
        "gib_per_cpu_second": gib / med if med > 0 else float("inf"),
        "breakdown_cpu_seconds": {k: round(v, 6) for k, v in acc.items()},
        "breakdown_total": total,
    }


def collapse_region(kernel, pid, start, end):
    pidfd = os.pidfd_open(pid)
    try:
        t0 = time.perf_counter()
        outcomes = collapse_windows(
            pidfd, pid, list(range(start, end, HPAGE)), HPAGE,
            lambda a: mapped_at(kernel.procfs.maps_text(pid), a))
        wall = time.perf_counter() - t0
    finally:
        os.close(pidfd)
    return wall, Counter(o.result.name for o in outcomes)


def print_case(label, c):
    goal = GOALS["pmd" if "PMD" in label else "4k"]
    mark = "ok" if c["gib_per_cpu_second"] >= goal else "MISSED"
    print(f"{label:<34} {c['gib']:6.2f} GiB  median {c['median_cpu_seconds'] * 1e3:8.2f} ms CPU"
          f"  {c['gib_per_cpu_second']:9.1f} GiB/CPU-s  (goal {goal:.0f}: {mark})"
          + ("" if c["as_expected"] else f"  UNEXPECTED results {c['results']}"))
    total = c["breakdown_total"] or 1e-12
    parts = sorted(c["breakdown_cpu_seconds"].items(), key=lambda kv: -kv[1])
    print("    " + "  ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=int, default=4, help="region size in GiB (default 4)")
    ap.add_argument("--repeat", type=int, default=5, help="timed scans per case (default 5)")
    ap.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_scan: needs root (pagemap PFNs, kpageflags, MADV_COLLAPSE)", file=sys.stderr)
        return 1

    kernel = Kernel()
    tunables = Tunables(enabled="madvise")
    windows = args.gib * GIB // HPAGE
    has_scan = kernel.has_pagemap_scan()
    doc = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "cpu": _cpu_model(), "mem_gib": round(_mem_gib(), 1),
                    "python": platform.python_version(), "numpy": _numpy_version()},
        "gib": args.gib, "repeat": args.repeat, "goals_gib_per_cpu_second": GOALS, "cases": {},
    }
    cases = [("4 KiB-mapped, PAGEMAP_SCAN", True), ("4 KiB-mapped, plain pagemap", False)]
    print(f"bench_scan: {args.gib} GiB region, {args.repeat} repeats, "
          f"{doc['machine']['cpu']}, {doc['machine']['kernel']}")
    with saved_thp(enabled="never"), \
            Workload(regions=[{"name": "r", "windows": windows, "fill": "all",
                               "hugepage": True}], timeout=600) as w, \
            KPageFlags() as kpf:
        region = w.regions["r"]
        print(f"workload pid {w.pid}: {region.windows} windows filled in "
              f"{w.setup_seconds:.1f} s")
        for label, use_scan in cases:
            if use_scan and not has_scan:
                print(f"{label}: skipped, no PAGEMAP_SCAN")
                continue
            c = run_case(kernel, w.pid, tunables, kpf, use_scan, args.repeat, ScanResult.SUCCEED)
            doc["cases"][label] = c
            print_case(label, c)

        wall, outcome = collapse_region(kernel, w.pid, region.start, region.end)
        huge_kb = anon_huge_kb(w.pid, region.start)
        doc["collapse"] = {"wall_seconds": wall, "results": dict(outcome),
                           "anon_huge_kb": huge_kb}
        print(f"collapsed {dict(outcome)} in {wall:.1f} s wall; "
              f"AnonHugePages {huge_kb // 1024} MiB")
        for label, use_scan in cases:
            label = label.replace("4 KiB", "PMD")
            if use_scan and not has_scan:
                continue
            c = run_case(kernel, w.pid, tunables, kpf, use_scan, args.repeat,
                         ScanResult.PMD_MAPPED)
            doc["cases"][label] = c
            print_case(label, c)

    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def _numpy_version() -> str:
    import numpy
    return numpy.__version__


if __name__ == "__main__":
    sys.exit(main())
