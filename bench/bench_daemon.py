#!/usr/bin/env python3
"""The daemon's CPU: per collapsed huge page against the kernel's khugepaged, and when idle.

Usage: python bench/bench_daemon.py [collapse|idle|all] [--gib N] [--repeat R]
           [--procs N] [--warmup S] [--duration S] [--all-processes] [--profile OUT]
           [--json OUT]

collapse -- CPU per collapsed huge page (goal: hugepaged <= 1.10x the kernel's khugepaged).
    The same layout for both: one workload process (kit/workload.py) with one N GiB region,
    every 4 KiB page written, MADV_HUGEPAGE. Alternating, R times each:
    * kernel: THP enabled=madvise (before the workload's MADV_HUGEPAGE, so that the madvise
      registers its mm with khugepaged), khugepaged pages_to_scan=65536,
      scan_sleep_millisecs=0. CPU of the khugepaged thread, from /proc/PID/stat (utime +
      stime) and /proc/PID/schedstat (ns on CPU), from before the workload starts until every
      window of the region is PMD-mapped (polled from /proc/PID/smaps every 2 ms), minus
      what khugepaged spent over the same time in a quiet period just before (other
      registered processes).
    * hugepaged: the kernel at enabled=never (its khugepaged off); `hugepaged run --pid W
      --set max_cpu_percent=0 --set scan_sleep_millisecs=0 --set pages_to_scan=1048576`,
      started with enabled=never and, once up, switched to madvise over the control socket,
      so that start-up (imports) is not counted. CPU of the daemon process from the switch
      until every window is PMD-mapped (and, separately, until its slot has settled: the
      rescan that finds nothing left).
    Medians over the repeats; the ratio of the medians.

idle -- the daemon's CPU at its default settings with N idle processes and nothing to
    collapse (goal: <= 0.2 % of one core). N forked Python children (comm "hpidle"), each with
    a 2 MiB MADV_HUGEPAGE region it collapsed itself and 256 KiB of 4 KiB-mapped anonymous
    memory, sleeping. The kernel at enabled=madvise (so the daemon's inherited default is
    madvise). The daemon runs in discovery mode (no --pid), no --set at all; other users'
    processes are kept out of its registry with exclude_comm (all but "hpidle"), unless
    --all-processes. After --warmup seconds, its CPU over --duration seconds, from
    /proc/PID/stat and /proc/PID/schedstat. --profile writes a cProfile of that daemon.

Everything runs under kit/helpers.machine_lock() with the kernel's THP knobs saved and
restored, and every workload is verified after its collapses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scenarios import cpu as cpu_probe
from scenarios.cpu import cpu_seconds

from kit.daemon_runner import Daemon, settled
from kit.helpers import Workload, machine_lock, pmd_mapped_windows, saved_thp

GOAL_RATIO = 1.10
GOAL_IDLE_PCT = 0.2


# --------------------------------------------------------------------------------------------
# Probes that do not go through hugepaged


def find_khugepaged() -> int:
    pid = cpu_probe.find_khugepaged()
    if pid is None:
        raise RuntimeError("no khugepaged thread (THP enabled=never?)")
    return pid


def region_huge_kb(pid: int, start: int) -> int:
    """AnonHugePages of the VMA that starts at `start` (/proc/PID/smaps, read up to it)."""
    head = f"{start:x}-"
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if not inside:
                inside = line.startswith(head)
                continue
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def wait_huge(pid: int, start: int, kb: int, timeout: float, poll: float = 0.002) -> float:
    deadline = time.monotonic() + timeout
    while region_huge_kb(pid, start) < kb:
        if time.monotonic() > deadline:
            raise TimeoutError(f"region of {pid} not collapsed in {timeout} s "
                               f"({region_huge_kb(pid, start)} of {kb} kB)")
        time.sleep(poll)
    return time.monotonic()


# --------------------------------------------------------------------------------------------
# 1. CPU per collapsed huge page


def layout(gib: float) -> dict:
    return {"regions": [{"name": "a", "windows": int(gib * 512), "hugepage": True}]}


def kernel_once(gib: float) -> dict:
    windows = int(gib * 512)
    with saved_thp(enabled="madvise", pages_to_scan=65536, scan_sleep_millisecs=0,
                   max_ptes_none=511, defrag=1):
        kpid = find_khugepaged()
        q0, qt0 = cpu_seconds(kpid), time.monotonic()
        time.sleep(0.5)
        q1, qt1 = cpu_seconds(kpid), time.monotonic()
        spin = [(b - a) / (qt1 - qt0) for a, b in zip(q0, q1, strict=True)]
        c0, t0 = cpu_seconds(kpid), time.monotonic()
        with Workload(layout(gib)) as w:
            r = w.regions["a"]
            t1 = wait_huge(w.pid, r.start, windows * 2048, timeout=120)
            c1 = cpu_seconds(kpid)
            collapsed = sum(pmd_mapped_windows(w.pid, r.start, r.end))
            w.verify()
    used = [(b - a) - s * (t1 - t0) for a, b, s in zip(c0, c1, spin, strict=True)]
    return {"collapsed": collapsed, "seconds": t1 - t0, "cpu_stat": used[0],
            "cpu_sched": used[1], "spin_stat": spin[0], "spin_sched": spin[1],
            "ms_per_page_stat": 1000 * used[0] / collapsed,
            "ms_per_page_sched": 1000 * used[1] / collapsed}


def hugepaged_once(gib: float) -> dict:
    windows = int(gib * 512)
    with saved_thp(enabled="never"), Workload(layout(gib)) as w:
        r = w.regions["a"]
        sets = {"enabled": "never", "max_cpu_percent": 0, "scan_sleep_millisecs": 1,
                "pages_to_scan": 1 << 20}
        with Daemon(pids=[w.pid], sets=sets, log_level="info") as d:
            c0, t0 = cpu_seconds(d.pid), time.monotonic()
            assert d.set("enabled", "madvise")["ok"]
            assert d.set("scan_sleep_millisecs", 0)["ok"]
            t1 = wait_huge(w.pid, r.start, windows * 2048, timeout=120)
            c1 = cpu_seconds(d.pid)
            d.wait_for(lambda st: settled(st, w.pid), timeout=60, interval=0.05)
            c2 = cpu_seconds(d.pid)
            st = d.status()
        collapsed = sum(pmd_mapped_windows(w.pid, r.start, r.end))
        w.verify()
    assert st["counters"]["pages_collapsed"] == collapsed == windows, st["counters"]
    return {"collapsed": collapsed, "seconds": t1 - t0,
            "cpu_stat": c1[0] - c0[0], "cpu_sched": c1[1] - c0[1],
            "cpu_stat_settled": c2[0] - c0[0], "cpu_sched_settled": c2[1] - c0[1],
            "collapse_cpu_seconds": st["counters"]["collapse_cpu_seconds"],
            "ms_per_page_stat": 1000 * (c1[0] - c0[0]) / collapsed,
            "ms_per_page_sched": 1000 * (c1[1] - c0[1]) / collapsed,
            "ms_per_page_sched_settled": 1000 * (c2[1] - c0[1]) / collapsed}


def bench_collapse(gib: float, repeat: int) -> dict:
    kernel, ours = [], []
    for i in range(repeat):
        kernel.append(kernel_once(gib))
        ours.append(hugepaged_once(gib))
        k, h = kernel[-1], ours[-1]
        print(f"  run {i + 1}: kernel {k['ms_per_page_sched']:.3f} ms/page "
              f"(stat {k['ms_per_page_stat']:.3f}), {k['seconds']:.2f} s;  "
              f"hugepaged {h['ms_per_page_sched']:.3f} ms/page "
              f"(stat {h['ms_per_page_stat']:.3f}, settled "
              f"{h['ms_per_page_sched_settled']:.3f}), {h['seconds']:.2f} s", flush=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    out = {"gib": gib, "repeat": repeat, "kernel": kernel, "hugepaged": ours}
    for clock in ("sched", "stat"):
        k, h = med(kernel, f"ms_per_page_{clock}"), med(ours, f"ms_per_page_{clock}")
        out[f"kernel_ms_per_page_{clock}"] = k
        out[f"hugepaged_ms_per_page_{clock}"] = h
        out[f"ratio_{clock}"] = h / k
    out["hugepaged_ms_per_page_sched_settled"] = med(ours, "ms_per_page_sched_settled")
    out["ratio_sched_settled"] = out["hugepaged_ms_per_page_sched_settled"] / \
        out["kernel_ms_per_page_sched"]
    out["kernel_seconds"] = med(kernel, "seconds")
    out["hugepaged_seconds"] = med(ours, "seconds")
    return out


# --------------------------------------------------------------------------------------------
# 2. Idle


IDLER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
libc.prctl(15, b"hpidle", 0, 0, 0)  # PR_SET_NAME, inherited by the children
n = int(sys.argv[1])
r, w = os.pipe()
for _ in range(n):
    if os.fork() == 0:
        os.close(r)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        libc.prctl(41, 1, 0, 0, 0)  # THP off while writing: 4 KiB pages
        base = libc.mmap(None, 2 * HPAGE, 3, 0x22, -1, 0)
        start = (base + HPAGE - 1) & ~(HPAGE - 1)
        ctypes.memset(start, 0x5A, HPAGE)
        small = bytearray(256 << 10)
        for i in range(0, len(small), 4096):
            small[i] = 1
        libc.prctl(41, 0, 0, 0, 0)
        libc.madvise(start, HPAGE, 14)  # MADV_HUGEPAGE
        ok = libc.madvise(start, HPAGE, 25) == 0  # MADV_COLLAPSE: nothing left to do
        os.write(w, b"1" if ok else b"0")
        os.close(w)
        os.close(0)
        os.close(1)
        while True:
            signal.pause()
os.close(w)
got = b""
while len(got) < n:
    chunk = os.read(r, n)
    if not chunk:
        break
    got += chunk
print(got.count(b"1"), flush=True)
sys.stdin.readline()
"""


def bench_idle(procs: int, warmup: float, duration: float, all_processes: bool,
               profile: str | None) -> dict:
    with saved_thp(enabled="madvise"):
        idlers = subprocess.Popen([sys.executable, "-c", IDLER, str(procs)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        tmp = tempfile.mkdtemp(prefix="bench-idle-")
        try:
            collapsed_themselves = int(idlers.stdout.readline())
            cfg = Path(tmp) / "hugepaged.toml"
            cfg.write_text("" if all_processes else "exclude_comm = '(?!hpidle).*'\n")
            python = ("-m", "cProfile", "-o", profile) if profile else ()
            with Daemon(config=str(cfg), log_level="info", interpreter_args=python) as d:
                t_start = time.monotonic()
                d.wait_for(lambda st: st["registered"] >= procs, timeout=60, interval=0.5)
                time.sleep(max(0.0, warmup - (time.monotonic() - t_start)))
                before = d.status()["counters"]
                c0, t0 = cpu_seconds(d.pid), time.monotonic()
                time.sleep(duration)
                c1, t1 = cpu_seconds(d.pid), time.monotonic()
                st = d.status()
                if profile:
                    d.stop()
        finally:
            if idlers.poll() is None:
                idlers.stdin.close()
                idlers.kill()
            idlers.wait()
            for f in Path(tmp).iterdir():
                f.unlink()
            os.rmdir(tmp)
    seconds = t1 - t0
    c = st["counters"]
    return {"procs": procs, "collapsed_themselves": collapsed_themselves,
            "registered": st["registered"], "warmup": warmup, "seconds": seconds,
            "all_processes": all_processes,
            "pct_stat": 100 * (c1[0] - c0[0]) / seconds,
            "pct_sched": 100 * (c1[1] - c0[1]) / seconds,
            "passes": c["passes"] - before["passes"],
            "full_scans": c["full_scans"] - before["full_scans"],
            "pages_collapsed": c["pages_collapsed"] - before["pages_collapsed"],
            "results": st["results"]}


# --------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", choices=("collapse", "idle", "all"), default="all")
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--procs", type=int, default=500)
    p.add_argument("--warmup", type=float, default=30.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--all-processes", action="store_true",
                   help="idle: register every process, not only the idlers")
    p.add_argument("--profile", metavar="OUT", help="idle: cProfile the daemon into OUT")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    # SIGTERM (timeout(1), a CI runner) unwinds like Ctrl-C: daemons killed, knobs restored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("bench_daemon.py needs root", file=sys.stderr)
        return 1
    doc: dict = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                             "python": platform.python_version()}}
    with machine_lock():
        if args.what in ("collapse", "all"):
            print(f"CPU per collapsed huge page, {args.gib:g} GiB filled, "
                  f"{args.repeat} repeats:", flush=True)
            r = doc["collapse"] = bench_collapse(args.gib, args.repeat)
            print(f"  median kernel khugepaged: {r['kernel_ms_per_page_sched']:.3f} ms/page "
                  f"(schedstat), {r['kernel_ms_per_page_stat']:.3f} (stat)")
            print(f"  median hugepaged:         {r['hugepaged_ms_per_page_sched']:.3f} ms/page "
                  f"(schedstat), {r['hugepaged_ms_per_page_stat']:.3f} (stat); "
                  f"{r['hugepaged_ms_per_page_sched_settled']:.3f} to settled")
            print(f"  ratio hugepaged/kernel: {r['ratio_sched']:.2f}x (schedstat), "
                  f"{r['ratio_stat']:.2f}x (stat), {r['ratio_sched_settled']:.2f}x to "
                  f"settled; goal <= {GOAL_RATIO:.2f}x: "
                  f"{'met' if r['ratio_sched'] <= GOAL_RATIO else 'MISSED'}")
            print(f"  time to collapse all: kernel {r['kernel_seconds']:.2f} s, "
                  f"hugepaged {r['hugepaged_seconds']:.2f} s", flush=True)
        if args.what in ("idle", "all"):
            print(f"Idle: {args.procs} idle processes, default settings, {args.warmup:g} s "
                  f"warm-up, {args.duration:g} s measured:", flush=True)
            r = doc["idle"] = bench_idle(args.procs, args.warmup, args.duration,
                                         args.all_processes, args.profile)
            print(f"  registered {r['registered']}, passes {r['passes']}, "
                  f"pages_collapsed {r['pages_collapsed']} in the window")
            print(f"  daemon CPU: {r['pct_sched']:.3f} % of one core (schedstat), "
                  f"{r['pct_stat']:.3f} % (stat); goal <= {GOAL_IDLE_PCT} %: "
                  f"{'met' if r['pct_sched'] <= GOAL_IDLE_PCT else 'MISSED'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
