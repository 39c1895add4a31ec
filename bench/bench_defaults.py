"""The default pace: how long a large heap takes to be covered at each CPU cap, and what the
collapses cost the process they run in.

    sudo python bench/bench_defaults.py [--rounds 3] [--caps 5,10,15,20] [--gib 3]
                                        [--set KEY=VALUE]... [--name NAME]

One workload of GIB GiB of anonymous memory faulted in as 4 KiB pages, pattern-filled and
advised (MADV_HUGEPAGE), under `hugepaged run --pid` at `max_cpu_percent = CAP` (the rest at
hugepaged's defaults, or as --set says). Per run: seconds from the daemon's start to 50, 90
and 95% of the heap PMD-mapped (read from pagemap and kpageflags by the tests' own helpers,
never from the daemon), the daemon's CPU over that time (/proc/PID/stat), and the workload's
own stalls while it was covered: a thread in it that touches a page every millisecond reports
its worst gap and the 99th percentile of its gaps (a collapse takes the process's mmap lock
and a CPU). Caps are interleaved within each round (C1, C2, ..., C1, C2, ...), a fresh
workload every run, medians and ranges. The kernel is at enabled=never for the run (restored
on every exit) so its khugepaged stays out. Writes bench/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from scenarios import write_results

from tests.daemon_runner import Daemon
from tests.helpers import HPAGE, Workload, machine_lock, pmd_mapped_windows, saved_thp

GIB = 1 << 30
STEPS = (50, 90, 95)
TIMEOUT = 600.0
# A thread in the workload: touch one page every millisecond, record the gaps.
PROBE = r"""
import ctypes, json, mmap, sys, threading, time
buf = mmap.mmap(-1, 1 << 20)
gaps = []
stop = threading.Event()
def run():
    last = time.monotonic()
    i = 0
    while not stop.is_set():
        buf[(i * 4096) % len(buf)] = 1
        i += 1
        time.sleep(0.001)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
t = threading.Thread(target=run)
t.start()
sys.stdin.readline()
stop.set()
t.join()
gaps.sort()
print(json.dumps({"worst_ms": round(gaps[-1] * 1000, 2),
                  "p99_ms": round(gaps[int(len(gaps) * 0.99)] * 1000, 2),
                  "samples": len(gaps)}), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(cap: int, gib: float, sets: dict[str, str]) -> dict:
    windows = int(gib * GIB // HPAGE)
    spec = [{"name": "heap", "windows": windows, "fill": "all", "hugepage": True}]
    out: dict = {"cap": cap, "windows": windows}
    with Workload(regions=spec, timeout=900) as w:
        r = w.regions["heap"]
        probe = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        with Daemon(pids=[w.pid, probe.pid], log_level="info",
                    sets={"enabled": "madvise", **sets, "max_cpu_percent": cap}) as d:
            cpu0 = cpu_seconds(d.pid)
            reached: dict[int, float] = {}
            while len(reached) < len(STEPS) and time.monotonic() - t0 < TIMEOUT:
                pct = 100.0 * sum(pmd_mapped_windows(w.pid, r.start, r.end)) / windows
                for step in STEPS:
                    if step not in reached and pct >= step:
                        reached[step] = round(time.monotonic() - t0, 2)
                time.sleep(0.25)
            out["seconds_to"] = {str(k): v for k, v in reached.items()}
            out["daemon_cpu_seconds"] = round(cpu_seconds(d.pid) - cpu0, 3)
            out["cpu_by_activity"] = d.status()["cpu_by_activity"]
        probe.stdin.write("done\n")
        probe.stdin.flush()
        out["probe"] = json.loads(probe.stdout.readline())
        probe.wait(10)
        w.verify()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--caps", default="5,10,15,20")
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-defaults")
    args = ap.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    sets = dict(s.split("=", 1) for s in args.sets)
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for cap in caps:
            with machine_lock(), saved_thp(enabled="never"):
                run = one_run(cap, args.gib, sets)
            run["round"] = rnd
            runs.append(run)
            print(json.dumps(run), flush=True)
    rows = []
    for cap in caps:
        mine = [r for r in runs if r["cap"] == cap]

        def med(key, mine=mine):
            vals = [key(r) for r in mine if key(r) is not None]
            return (statistics.median(vals), min(vals), max(vals)) if vals else None

        rows.append({"cap": cap,
                     **{f"to_{s}": med(lambda r, s=s: r["seconds_to"].get(str(s)))
                        for s in STEPS},
                     "daemon_cpu": med(lambda r: r["daemon_cpu_seconds"]),
                     "worst_ms": med(lambda r: r["probe"]["worst_ms"]),
                     "p99_ms": med(lambda r: r["probe"]["p99_ms"])})
    lines = [f"# Default pace: {args.gib:g} GiB heap, {args.rounds} interleaved rounds",
             "", f"`python bench/bench_defaults.py --rounds {args.rounds} --caps {args.caps} "
             f"--gib {args.gib:g}" + "".join(f" --set {s}" for s in args.sets) + "`", "",
             "| max_cpu_percent | to 50% (s) | to 90% (s) | to 95% (s) | daemon CPU (s) | "
             "worst gap in the process (ms) | p99 gap (ms) |", "|---|---|---|---|---|---|---|"]

    def fmt(v):
        return "—" if v is None else f"{v[0]:g} ({v[1]:g}–{v[2]:g})"

    for row in rows:
        lines.append(f"| {row['cap']} | {fmt(row['to_50'])} | {fmt(row['to_90'])} | "
                     f"{fmt(row['to_95'])} | {fmt(row['daemon_cpu'])} | {fmt(row['worst_ms'])} "
                     f"| {fmt(row['p99_ms'])} |")
    write_results(args.name, {"args": vars(args), "runs": runs, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
