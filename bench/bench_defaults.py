"""The default pace: how long a large heap takes to be covered at each CPU cap, and what the
collapses cost the process they run in, against the kernel's khugepaged on the same heap.

    sudo python bench/bench_defaults.py [--rounds 3] [--caps 5,10,15,20,kernel] [--gib 3]
                                        [--set KEY=VALUE]... [--name NAME]

One process (HEAP below, this benchmark's own) maps GIB GiB of anonymous memory, faults it
in as 4 KiB pages (enabled=never meanwhile), fills it with a known pattern and advises it
(MADV_HUGEPAGE). A cap is `hugepaged run --pid` at `max_cpu_percent = CAP` (the rest at
hugepaged's defaults, or as --set says), the kernel's khugepaged at enabled=never so that it
stays out. `kernel` is the kernel's khugepaged instead, tuned to its fastest
(pages_to_scan=65536, scan_sleep_millisecs=0), the process registered by its advice.

Per run: seconds from the collapser's start to 50, 90 and 95% of the heap PMD-mapped (read
from pagemap and kpageflags by the tests' own helpers, never from the daemon), the
collapser's CPU over that time (/proc/PID/stat, the [khugepaged] thread's for the kernel),
and the stalls of the process being collapsed: a thread in it maps, touches and unmaps 64
KiB every millisecond, as an allocator does, which needs the process's mmap lock that a
collapse holds (MADV_COLLAPSE for its whole call, khugepaged per window); its worst gap and
99th percentile are reported. The pattern is verified at the end of every run. Contenders
are interleaved within each round (C1, C2, ..., C1, C2, ...), a fresh heap every run, medians
and ranges. Every knob is saved and restored under the machine lock. Writes
bench/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from scenarios import write_results
from scenarios.cpu import find_khugepaged, stat_cpu_seconds

from kit.daemon_runner import Daemon
from kit.helpers import HPAGE, machine_lock, pmd_mapped_windows, saved_thp

GIB = 1 << 30
STEPS = (50, 90, 95)
TIMEOUT = 600.0
KERNEL_FAST = {"pages_to_scan": 65536, "scan_sleep_millisecs": 0}
# The collapsed process: a 2 MiB-aligned heap of 4 KiB pages with a pattern, and a thread
# that needs the mmap lock every millisecond. Commands on stdin: advise, done.
HEAP = r"""
import ctypes, json, mmap, sys, threading, time
import numpy as np
HP = 2 << 20
size = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
raw = libc.mmap(None, size + HP, 3, 0x22, -1, 0)
start = (raw + HP - 1) // HP * HP
heap = np.ctypeslib.as_array((ctypes.c_uint64 * (size // 8)).from_address(start))
CHUNK = HP // 8  # the pattern made 2 MiB at a time: numpy advises MADV_HUGEPAGE on its own
def pattern(i):  # arrays from 4 MiB, so a whole-heap copy would be collapsed alongside
    return np.arange(i, min(i + CHUNK, heap.size), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
for i in range(0, heap.size, CHUNK):
    heap[i:i + CHUNK] = pattern(i)
print(json.dumps({"start": start, "end": start + size}), flush=True)
gaps = []
stop = threading.Event()
def probe():
    last = time.monotonic()
    while not stop.is_set():
        m = mmap.mmap(-1, 65536)
        m[0] = 1
        m.close()
        time.sleep(0.001)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
t = threading.Thread(target=probe)
t.start()
for line in sys.stdin:
    if line.strip() == "advise":
        if libc.madvise(start, size, 14):
            raise OSError(ctypes.get_errno(), "madvise")
        print("advised", flush=True)
    else:
        break
stop.set()
t.join()
gaps.sort()
print(json.dumps({"worst_ms": round(gaps[-1] * 1000, 2),
                  "p99_ms": round(gaps[int(len(gaps) * 0.99)] * 1000, 2),
                  "samples": len(gaps),
                  "intact": all((heap[i:i + CHUNK] == pattern(i)).all()
                                for i in range(0, heap.size, CHUNK))}), flush=True)
"""


def _wait_steps(pid: int, start: int, end: int, t0: float) -> dict[str, float]:
    """Seconds from t0 to each step of coverage, read independently every 0.25 s."""
    windows = (end - start) // HPAGE
    reached: dict[str, float] = {}
    while len(reached) < len(STEPS) and time.monotonic() - t0 < TIMEOUT:
        pct = 100.0 * sum(pmd_mapped_windows(pid, start, end)) / windows
        for step in STEPS:
            if str(step) not in reached and pct >= step:
                reached[str(step)] = round(time.monotonic() - t0, 2)
        time.sleep(0.25)
    return reached


def _command(heap: subprocess.Popen, line: str) -> str:
    heap.stdin.write(line + "\n")
    heap.stdin.flush()
    return heap.stdout.readline()


def one_run(contender: str, gib: float, sets: dict[str, str]) -> dict:
    """One fresh heap covered by one contender (a cap, or "kernel"); knobs restored after."""
    size = int(gib * GIB) // HPAGE * HPAGE
    out: dict = {"contender": contender, "windows": size // HPAGE}
    heap = subprocess.Popen([sys.executable, "-c", HEAP, str(size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        with saved_thp(enabled="never"):
            span = json.loads(heap.stdout.readline())
        if contender == "kernel":
            with saved_thp(enabled="madvise", **KERNEL_FAST):
                kpid = find_khugepaged()
                cpu0, t0 = stat_cpu_seconds(kpid), time.monotonic()
                _command(heap, "advise")
                out["seconds_to"] = _wait_steps(heap.pid, span["start"], span["end"], t0)
                out["collapser_cpu_seconds"] = round(stat_cpu_seconds(kpid) - cpu0, 3)
        else:
            with saved_thp(enabled="never"):
                _command(heap, "advise")
                t0 = time.monotonic()
                with Daemon(pids=[heap.pid], log_level="info",
                            sets={"enabled": "madvise", **sets,
                                  "max_cpu_percent": int(contender)}) as d:
                    cpu0 = stat_cpu_seconds(d.pid)
                    out["seconds_to"] = _wait_steps(heap.pid, span["start"], span["end"], t0)
                    out["collapser_cpu_seconds"] = round(stat_cpu_seconds(d.pid) - cpu0, 3)
        out["probe"] = json.loads(_command(heap, "done"))
        heap.wait(30)
    finally:
        if heap.poll() is None:
            heap.kill()
            heap.wait()
    if not out["probe"]["intact"]:
        raise SystemExit(f"{contender}: the heap's contents changed")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--caps", default="5,10,15,20,kernel")
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-defaults")
    args = ap.parse_args()
    caps = args.caps.split(",")
    bad = [c for c in caps if c != "kernel" and not c.isdigit()]
    if bad:
        ap.error(f"--caps: {bad[0]!r} is neither a percentage nor 'kernel'")
    sets = dict(s.split("=", 1) for s in args.sets)
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for cap in caps:
            with machine_lock():
                run = one_run(cap, args.gib, sets)
            run["round"] = rnd
            runs.append(run)
            print(json.dumps(run), flush=True)
    rows = []
    for cap in caps:
        mine = [r for r in runs if r["contender"] == cap]

        def med(key, mine=mine):
            vals = [key(r) for r in mine if key(r) is not None]
            return (statistics.median(vals), min(vals), max(vals)) if vals else None

        rows.append({"cap": cap,
                     **{f"to_{s}": med(lambda r, s=s: r["seconds_to"].get(str(s)))
                        for s in STEPS},
                     "collapser_cpu": med(lambda r: r["collapser_cpu_seconds"]),
                     "worst_ms": med(lambda r: r["probe"]["worst_ms"]),
                     "p99_ms": med(lambda r: r["probe"]["p99_ms"])})
    lines = [f"# Default pace: {args.gib:g} GiB heap, {args.rounds} interleaved rounds",
             "", f"`python bench/bench_defaults.py --rounds {args.rounds} --caps {args.caps} "
             f"--gib {args.gib:g}" + "".join(f" --set {s}" for s in args.sets) + "`", "",
             "| max_cpu_percent | to 50% (s) | to 90% (s) | to 95% (s) | collapser CPU (s) | "
             "worst gap in the process (ms) | p99 gap (ms) |", "|---|---|---|---|---|---|---|"]

    def fmt(v):
        return "—" if v is None else f"{v[0]:g} ({v[1]:g}–{v[2]:g})"

    for row in rows:
        lines.append(f"| {row['cap']} | {fmt(row['to_50'])} | {fmt(row['to_90'])} | "
                     f"{fmt(row['to_95'])} | {fmt(row['collapser_cpu'])} | {fmt(row['worst_ms'])} "
                     f"| {fmt(row['p99_ms'])} |")
    write_results(args.name, {"args": vars(args), "runs": runs, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
