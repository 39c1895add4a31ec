"""Scenario 4, the cost of watching.

a) Scan throughput: GiB of address space classified per CPU-second by hugepaged's decision
   (hugepaged.scan.process.scan_process: smaps, PAGEMAP_SCAN or pagemap, kpageflags, the vectorised
   checks) over an N GiB MADV_HUGEPAGE region, first 4 KiB-mapped, then PMD-mapped (collapsed by
   the benchmark); with PAGEMAP_SCAN and with plain pagemap reads. Median of REPEAT scans
   after one warm-up; CPU is this thread's (time.thread_time: user + system).
b) Idle: `hugepaged run` at its defaults (targeted at them, --set enabled=madvise) watching 500
   idle processes, each holding 2 MiB of MADV_HUGEPAGE memory already collapsed (idlers.py);
   its CPU, once every process has been scanned and found settled, over a measured window.
   The kernel is at enabled=never throughout.
(bench/bench_daemon.py's idle benchmark runs the daemon over every process with an
exclude_comm filter; here hugepaged runs targeted, never over other users' processes.)
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kit.helpers import HPAGE, Workload, pmd_mapped_windows

from .context import Context
from .cpu import cpu_seconds, sched_cpu_seconds
from .knobs import write_knob
from .tlb import collapse_all

GIB = 1 << 30

IDLERS = Path(__file__).resolve().parent / "idlers.py"
GOALS = {"scan_4k_gib_per_cpu_s": 20.0, "scan_pmd_gib_per_cpu_s": 200.0,
         "idle_cpu_percent_500": 0.2}


def run(ctx: Context) -> dict:
    write_knob("enabled", "never")
    out = {"goals": GOALS}
    ctx.log("  scan throughput")
    out["scan"] = scan_throughput(ctx)
    ctx.log("  idle daemon with 500 processes")
    out["idle"] = idle(ctx)
    return out


# ---------------------------------------------------------------------------------------------
# a) scan throughput


def scan_throughput(ctx: Context) -> dict:
    from hugepaged.kernel import Kernel
    from hugepaged.policy import CollapseControl
    from hugepaged.scan.process import scan_process
    from hugepaged.tunables import Tunables

    kernel = Kernel()
    tunables = Tunables(enabled="madvise")
    windows = max(16, int(ctx.gib * GIB // HPAGE))
    repeat = ctx.p(3, 5)
    cases: dict = {}
    with Workload(regions=[{"name": "r", "windows": windows, "fill": "all",
                              "hugepage": True}], timeout=900) as w, kernel.kpageflags() as kpf:
        r = w.regions["r"]

        def case(label: str, use_scan: bool) -> None:
            def once():
                t = time.thread_time()
                scan = scan_process(kernel, w.pid, CollapseControl.from_tunables(tunables), kpf,
                                    use_pagemap_scan=use_scan)
                return time.thread_time() - t, scan
            _, scan = once()
            secs = [once()[0] for _ in range(repeat)]
            med = statistics.median(secs)
            gib = scan.eligible_windows * HPAGE / GIB
            cases[label] = {"gib": gib, "results": {k.name: v for k, v in
                                                    scan.results().items()},
                            "cpu_seconds": secs, "median_cpu_seconds": med,
                            "gib_per_cpu_second": gib / med if med > 0 else None}
            ctx.log(f"    {label}: {gib:.2f} GiB, {med * 1e3:.1f} ms CPU, "
                    f"{cases[label]['gib_per_cpu_second']:.0f} GiB/CPU-s")

        case("4 KiB-mapped, PAGEMAP_SCAN", True)
        case("4 KiB-mapped, plain pagemap", False)
        collapse_all(w.pid, r.start, r.end)
        huge = sum(pmd_mapped_windows(w.pid, r.start, r.end))
        cases["collapsed_windows"] = {"pmd_mapped": huge, "of": r.windows}
        case("PMD-mapped, PAGEMAP_SCAN", True)
        case("PMD-mapped, plain pagemap", False)
        w.verify()
        cases["verified"] = True
    return {"gib": windows * HPAGE / GIB, "repeat": repeat, "cases": cases}


# ---------------------------------------------------------------------------------------------
# b) idle daemon


def idle(ctx: Context, count: int = 500) -> dict:
    seconds = ctx.p(20.0, 120.0)
    proc = subprocess.Popen([sys.executable, str(IDLERS), json.dumps({"count": count})],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(proc.stdout.readline())
        pids = info["pids"]
        res: dict = {"source": "compare.py",
                     "processes": len(pids), "collapsed_by_idlers": info["collapsed"]}
        with ctx.daemon(pids, {"enabled": "madvise"}) as d:
            t_start = time.monotonic()
            deadline = t_start + ctx.p(60.0, 90.0)
            while True:
                st = d.status()
                settled = sum(1 for p in st["processes"] if p.get("settled_seconds", 0) > 0)
                if (st["registered"] == len(pids) and settled == len(pids)) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            res["registered"] = st["registered"]
            res["settled"] = settled
            res["seconds_to_settle"] = round(time.monotonic() - t_start, 2)
            res["counters_at_settle"] = st["counters"]
            (c0, n0), t0 = cpu_seconds(d.pid), time.monotonic()
            windows = []
            step = ctx.p(10.0, 30.0)
            while time.monotonic() - t0 < seconds - 1e-6:
                t1 = time.monotonic()
                a = sched_cpu_seconds(d.pid)
                time.sleep(max(0.0, min(step, seconds - (t1 - t0))))
                b = sched_cpu_seconds(d.pid)
                windows.append({"from_s": round(t1 - t0, 1),
                                "seconds": round(time.monotonic() - t1, 2),
                                "cpu_percent": 100 * (b - a) / (time.monotonic() - t1)})
            (c1, n1), t1 = cpu_seconds(d.pid), time.monotonic()
            st2 = d.status()
            res.update({
                "measured_seconds": round(t1 - t0, 1),
                "cpu_seconds_stat": c1 - c0, "cpu_seconds_schedstat": n1 - n0,
                "cpu_percent": 100 * (n1 - n0) / (t1 - t0),
                "windows": windows,
                "passes": st2["counters"]["passes"] - st["counters"]["passes"],
                "pages_collapsed_while_measured": st2["counters"]["pages_collapsed"]
                - st["counters"]["pages_collapsed"],
                "tunables": st2["tunables"],
            })
            late = [w["cpu_percent"] for w in windows if w["from_s"] >= seconds / 2]
            if late:
                res["cpu_percent_second_half"] = statistics.mean(late)
            with contextlib.suppress(Exception):
                d.stop()
        return res
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.write(b"exit\n")
            proc.stdin.flush()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
