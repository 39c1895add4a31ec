#!/usr/bin/env python3
"""Huge pages come back: a daemon in allocation back-off, then memory freed at once.

    sudo python bench/bench_comeback.py [--rounds 3] [--trees NAME=SRC,...] [--wait 30]
                                        [--windows 64] [--name NAME]

The seed's story without the guests: memory is fragmented so that every collapse fails
(kit/fragment.py: the hugetlb pool and the filler, no free 2 MiB block and none compaction can
assemble), one workload of WINDOWS full 4 KiB-mapped MADV_HUGEPAGE windows is given to a
`hugepaged run --pid` at its defaults, which fails and backs off. For WAIT seconds from its
first failure its CPU is read from /proc/PID/stat (the back-off must cost next to nothing:
the issue's goal is under 1% of a core); then the filler and the pool let go, as a guest that
quits, and the times from there to the first collapsed window and to 99% of the windows are
read from pagemap and kpageflags (kit.helpers, never through hugepaged). Trees (each a
hugepaged source tree put first on the daemon's PYTHONPATH, so the old code runs against the
new) are interleaved A/B within each round, fresh memory state and workload every run;
medians and ranges. The kernel's THP `enabled` is `never` during the runs (its khugepaged and
the faults stay out), restored on every exit with the pool. Writes bench/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time

from scenarios import ROOT, write_results
from scenarios.cpu import stat_cpu_seconds

from kit.daemon_runner import Daemon
from kit.fragment import fragmented_memory
from kit.helpers import Workload, machine_lock, pmd_mapped_windows, saved_thp


def huge(w: Workload) -> int:
    r = w.regions["heap"]
    return sum(pmd_mapped_windows(w.pid, r.start, r.end))


def one_run(src: str, windows: int, wait: float) -> dict:
    spec = [{"name": "heap", "windows": windows, "fill": "all", "hugepage": True}]
    with fragmented_memory() as release, saved_thp(enabled="never"), \
            Workload(regions=spec) as w, \
            Daemon([w.pid], sets={"enabled": "madvise"}, env={"PYTHONPATH": src},
                   log_level="info") as d:
        st = d.wait_for(lambda st: st["counters"]["alloc_backoffs"] >= 1, timeout=60,
                        what="a failed allocation and its back-off")
        had = huge(w)
        cpu0, t0 = stat_cpu_seconds(d.pid), time.monotonic()
        time.sleep(wait)
        cpu = stat_cpu_seconds(d.pid) - cpu0
        spent = time.monotonic() - t0
        state = d.status().get("state")
        release()
        back = time.monotonic()
        first = full = None
        while time.monotonic() < back + 120:
            n = huge(w)
            if first is None and n > had:
                first = time.monotonic() - back
            if n >= 0.99 * windows:
                full = time.monotonic() - back
                break
            time.sleep(0.02)
        end = d.status()
        w.verify()
    return {"state_in_backoff": state, "huge_before": had, "backoff_seconds": round(spent, 2),
            "backoff_cpu_percent": round(100 * cpu / spent, 3),
            "first_collapse_s": None if first is None else round(first, 3),
            "to_99_s": None if full is None else round(full, 3),
            "alloc_backoffs": st["counters"]["alloc_backoffs"],
            "cap": end.get("tunables", {}).get("max_cpu_percent")}


def med(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    m = statistics.median(xs)
    return f"{m:g} ({min(xs):g}–{max(xs):g})" if len(xs) > 1 else f"{m:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trees", default=f"this={ROOT / 'src'}",
                    help="NAME=SRC,... hugepaged source trees to compare (default: this one)")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds in back-off measured")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-comeback")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.trees.split(",")]
    runs = []
    with machine_lock():
        for rnd in range(args.rounds):
            order = trees if rnd % 2 == 0 else trees[::-1]
            for name, src in order:
                r = {"tree": name, "src": src, "round": rnd + 1,
                     **one_run(src, args.windows, args.wait)}
                print(r, flush=True)
                runs.append(r)
    lines = [f"# Huge pages come back after an allocation back-off ({args.name})", "",
             f"`python bench/bench_comeback.py --rounds {args.rounds} --trees {args.trees} "
             f"--wait {args.wait:g} --windows {args.windows}`", "",
             f"A daemon at its defaults in allocation back-off for {args.wait:g} s on a "
             f"{args.windows}-window workload (kit/fragment.py: no free 2 MiB block, none to "
             "compact), then the memory freed at once. Median (min–max) over the rounds, "
             "trees interleaved.", "",
             "| tree | cap (%) | CPU in back-off (% of a core) | first collapse after the "
             "memory came back (s) | all windows (99%) (s) | state in back-off |",
             "|---|---|---|---|---|---|"]
    for name, _ in trees:
        mine = [r for r in runs if r["tree"] == name]
        lines.append(f"| {name} | {mine[0]['cap']} | "
                     f"{med([r['backoff_cpu_percent'] for r in mine])} | "
                     f"{med([r['first_collapse_s'] for r in mine])} | "
                     f"{med([r['to_99_s'] for r in mine])} | "
                     f"{', '.join(sorted({str(r['state_in_backoff']) for r in mine}))} |")
    write_results(args.name, {"args": vars(args), "runs": runs}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
