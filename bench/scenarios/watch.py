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
bench/bench_daemon.py (the daemon's own benchmark) is reused for part b when it can run the
daemon targeted at the idle processes (a bench_idle() taking `pids` or `targeted`); its
bench_idle as of this writing runs the daemon over every process with an exclude_comm
filter instead, and the rule here is that hugepaged runs targeted, never over other users'
processes: the measurement below is then used, and the result says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import (
    GIB,
    HPAGE,
    Context,
    Daemon,
    H,
    sched_cpu_seconds,
    stat_cpu_seconds,
    write_knob,
)

IDLERS = Path(__file__).resolve().parent / "idlers.py"
BENCH_DAEMON = Path(__file__).resolve().parents[1] / "bench_daemon.py"
GOALS = {"scan_4k_gib_per_cpu_s": 20.0, "scan_pmd_gib_per_cpu_s": 200.0,
         "idle_cpu_percent_500": 0.2}
_libc = ctypes.CDLL(None, use_errno=True)


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
    with H.Workload(regions=[{"name": "r", "windows": windows, "fill": "all",
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
        fd = os.pidfd_open(w.pid)
        try:
            for a in range(r.start, r.end, 256 << 20):
                iov = (ctypes.c_uint64 * 2)(a, min(256 << 20, r.end - a))
                _libc.syscall(440, fd, iov, 1, 25, 0)
        finally:
            os.close(fd)
        huge = sum(H.pmd_mapped_windows(w.pid, r.start, r.end))
        cases["collapsed_windows"] = {"pmd_mapped": huge, "of": r.windows}
        case("PMD-mapped, PAGEMAP_SCAN", True)
        case("PMD-mapped, plain pagemap", False)
        w.verify()
        cases["verified"] = True
    return {"gib": windows * HPAGE / GIB, "repeat": repeat, "cases": cases}


# ---------------------------------------------------------------------------------------------
# b) idle daemon


def _bench_daemon_idle():
    """(function, reason): bench/bench_daemon.py's bench_idle if it can run targeted."""
    if not BENCH_DAEMON.exists():
        return None, "bench/bench_daemon.py absent"
    spec = importlib.util.spec_from_file_location("bench_daemon", BENCH_DAEMON)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as err:  # noqa: BLE001 - fall back to our own
        return None, f"bench/bench_daemon.py does not import: {err!r}"
    fn = getattr(mod, "bench_idle", None)
    if fn is None:
        return None, "bench/bench_daemon.py has no bench_idle"
    params = inspect.signature(fn).parameters
    if "targeted" in params or "pids" in params:
        return fn, "bench/bench_daemon.py bench_idle (targeted)"
    return None, ("bench/bench_daemon.py's bench_idle runs the daemon untargeted "
                  "(exclude_comm filter); hugepaged must run targeted here")


def idle(ctx: Context, count: int = 500) -> dict:
    seconds = ctx.p(20.0, 120.0)
    external, why = _bench_daemon_idle()
    if external is not None:
        params = inspect.signature(external).parameters
        kw = {"targeted": True} if "targeted" in params else {}
        res = external(count, 30.0, seconds, False, None, **kw)
        return {"source": why, **res}
    proc = subprocess.Popen([sys.executable, str(IDLERS), json.dumps({"count": count})],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(proc.stdout.readline())
        pids = info["pids"]
        res: dict = {"source": f"compare.py ({why})",
                     "processes": len(pids), "collapsed_by_idlers": info["collapsed"]}
        with Daemon(pids, {"enabled": "madvise"}, ctx.empty_config, ctx.workdir) as d:
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
            c0, n0, t0 = stat_cpu_seconds(d.pid), sched_cpu_seconds(d.pid), time.monotonic()
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
            c1, n1, t1 = stat_cpu_seconds(d.pid), sched_cpu_seconds(d.pid), time.monotonic()
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
