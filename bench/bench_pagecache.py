#!/usr/bin/env python3
"""How fast hugepaged counts another process's page cache: cachestat(2) against mincore(2).

Usage: python bench/bench_pagecache.py [--gib N] [--repeat R] [--name NAME]

A real workload process (kit/workload.py) maps a memfd of N GiB (default 1) MAP_SHARED,
every other 4 KiB page written. Each sample counts present (and, for cachestat, swapped)
pages per 2 MiB range of the whole file through /proc/PID/map_files, exactly as
scan.shmem_scan does: cachestat one call per range, mincore one PROT_NONE mapping and one
call per 1 GiB chunk. The two contenders are interleaved A/B/A/B, R samples each after one
warm-up; medians of CPU time (time.process_time) and wall time per GiB are reported, and
both sources must agree on every range. Writes bench/results/NAME.md and NAME.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from scenarios import write_results

from hugepaged.kernel.pagecache import MappedFile
from kit.helpers import HPAGE, Workload, machine_lock

GIB = 1 << 30
CHUNK = 512  # ranges per mincore call: 1 GiB


def count(f: MappedFile, nranges: int, source: str):
    parts = []
    for a in range(0, nranges, CHUNK):
        n = min(CHUNK, nranges - a)
        method = f.ranges_cachestat if source == "cachestat" else f.ranges_mincore
        parts.append(method(a * HPAGE, n, HPAGE))
    return parts


def sample(f: MappedFile, nranges: int, source: str) -> tuple[float, float, list]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = count(f, nranges, source)
    return time.process_time() - c0, time.perf_counter() - w0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-pagecache")
    args = ap.parse_args()
    windows = int(args.gib * GIB // HPAGE)
    spec = {"regions": [{"name": "m", "windows": windows, "kind": "memfd", "fill": "every:2"}]}
    samples: dict[str, list[tuple[float, float]]] = {"cachestat": [], "mincore": []}
    with machine_lock(), Workload(spec, timeout=600) as w:
        r = w.regions["m"]
        with MappedFile("/proc", w.pid, r.start, r.end) as f:
            for source in samples:  # warm-up
                sample(f, windows, source)
            for _ in range(args.repeat):
                got = {}
                for source in samples:
                    cpu, wall, out = sample(f, windows, source)
                    samples[source].append((cpu, wall))
                    got[source] = [int(x) for part in out for x in part[:, 0]]
                if got["cachestat"] != got["mincore"]:
                    raise SystemExit("cachestat and mincore disagree")
        w.verify()
    gib = windows * HPAGE / GIB
    result = {"gib": gib, "repeat": args.repeat, "kernel": platform.release(),
              "samples": samples, "median": {}}
    lines = [f"# Page cache counting, {gib:g} GiB memfd, every other page present",
             "", f"Linux {platform.release()}, {args.repeat} interleaved samples each, medians.",
             "", "| source | CPU ms per GiB | wall ms per GiB | swap visible |",
             "|---|---|---|---|"]
    for source, rows in samples.items():
        cpu = statistics.median(c for c, _ in rows) * 1000 / gib
        wall = statistics.median(x for _, x in rows) * 1000 / gib
        result["median"][source] = {"cpu_ms_per_gib": cpu, "wall_ms_per_gib": wall}
        lines.append(f"| {source} | {cpu:.2f} | {wall:.2f} | "
                     f"{'yes' if source == 'cachestat' else 'no'} |")
    write_results(args.name, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
