#!/usr/bin/env python3
"""Does collapsing PostgreSQL's shared buffers pay: `pgbench -S` tps, 4 KiB against 2 MiB.

Usage: python bench/bench_pgbench.py [--scale S] [--buffers 1GB] [--runs 5] [--seconds 10]
                                     [--name NAME]

Two PostgreSQL 15 clusters (kit/pg.py), each with the same pgbench database (scale S)
loaded and pg_prewarm'ed into shared buffers:
- "4k": started at shmem_enabled=never: the buffers' mapping is misaligned and stays 4 KiB.
- "2m": started at shmem_enabled=advise (put back right after the start), then
  `hugepaged collapse --pid POSTMASTER --set shmem_enabled=always`: the file rules count the
  page cache, so every range of the buffers becomes one 2 MiB folio, and every backend
  pgbench opens afterwards maps them by PMD on its first touch.
The clusters run `pgbench -S -M prepared -c CPUS -j CPUS -T SECONDS` in turn, A/B/A/B, RUNS
each after one warm-up run each; medians reported. Writes bench/results/NAME.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

from scenarios import write_results

from kit import pg
from kit.helpers import machine_lock, saved_thp, smaps_vma

SIZE_KNOB = "hugepages-2048kB/shmem_enabled"


def start(mode: str, buffers: str) -> pg.Postgres:
    with saved_thp(**{SIZE_KNOB: "inherit", "shmem_enabled": mode}):
        return pg.Postgres(shared_buffers=buffers, max_connections="20").__enter__()


def load(server: pg.Postgres, scale: int) -> None:
    subprocess.run(server.client("pgbench") + ["-i", "-q", "-s", str(scale)], check=True,
                   capture_output=True)
    server.psql("create extension pg_prewarm")
    server.psql("select sum(pg_prewarm(c.oid)) from pg_class c join pg_namespace n "
                "on n.oid = c.relnamespace where n.nspname = 'public' and c.relkind in "
                "('r', 'i')")


def pgbench(server: pg.Postgres, seconds: int) -> float:
    cpus = str(os.cpu_count() or 1)
    r = subprocess.run(server.client("pgbench") + ["-S", "-M", "prepared", "-c", cpus, "-j",
                                                   cpus, "-T", str(seconds), "-n"],
                       check=True, capture_output=True, text=True)
    return float(re.search(r"tps = ([0-9.]+)", r.stdout).group(1))


def buffer_state(server: pg.Postgres) -> dict:
    pid = server.postmaster_pid
    lo, _ = server.shared_memory_vma(pid)
    v = smaps_vma(pid, lo)
    return {"start": hex(lo), "aligned": lo % (2 << 20) == 0, "size_kb": v["Size"]}


def collapse(server: pg.Postgres) -> dict:
    out = subprocess.run([sys.executable, "-m", "hugepaged", "collapse", "--pid",
                          str(server.postmaster_pid), "--set", "shmem_enabled=always",
                          "--json"], check=True, capture_output=True, text=True)
    doc = json.loads(out.stdout)
    return {"collapsed": doc["collapsed"], "seconds": doc["seconds"],
            "failed": doc["failed"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=40)
    ap.add_argument("--buffers", default="1GB")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-pgbench")
    args = ap.parse_args()
    tps: dict[str, list[float]] = {"4k": [], "2m": []}
    with machine_lock():
        servers = {}
        try:
            servers["4k"] = start("never", args.buffers)
            servers["2m"] = start("advise", args.buffers)
            for s in servers.values():
                load(s, args.scale)
            state = {k: buffer_state(s) for k, s in servers.items()}
            state["2m"]["collapse"] = collapse(servers["2m"])
            for s in servers.values():  # warm-up: backends fault their mappings in
                pgbench(s, args.seconds)
            for _ in range(args.runs):
                for k, s in servers.items():
                    tps[k].append(pgbench(s, args.seconds))
            with servers["2m"].session() as sess:  # what one backend maps now
                sess.query("select count(*) from pgbench_accounts")
                lo, _ = servers["2m"].shared_memory_vma(sess.backend_pid)
                v = smaps_vma(sess.backend_pid, lo)
                state["2m"]["backend_rss_kb"] = v["Rss"]
                state["2m"]["backend_shmem_pmd_kb"] = v["ShmemPmdMapped"]
        finally:
            for s in servers.values():
                s.close()
    med = {k: statistics.median(v) for k, v in tps.items()}
    result = {"kernel": platform.release(), "cpus": os.cpu_count(), "scale": args.scale,
              "shared_buffers": args.buffers, "runs": args.runs, "seconds": args.seconds,
              "tps": tps, "median_tps": med, "speedup": med["2m"] / med["4k"],
              "buffers": state}
    lines = [f"# pgbench -S, PostgreSQL 15, shared_buffers={args.buffers}, scale {args.scale}",
             "", f"Linux {platform.release()}, {os.cpu_count()} CPUs; `pgbench -S -M prepared "
             f"-c {os.cpu_count()} -j {os.cpu_count()} -T {args.seconds}`, {args.runs} runs "
             "per cluster, interleaved, after one warm-up run each.", "",
             "| buffers | median tps | runs |", "|---|---|---|"]
    for k, label in (("4k", "4 KiB (started at never: misaligned)"),
                     ("2m", "2 MiB (hugepaged collapse of the postmaster's view)")):
        runs = ", ".join(f"{x:.0f}" for x in tps[k])
        lines.append(f"| {label} | {med[k]:.0f} | {runs} |")
    lines += ["", f"2 MiB / 4 KiB: {result['speedup']:.3f}x. Collapse: "
              f"{state['2m']['collapse']['collapsed']} windows in "
              f"{state['2m']['collapse']['seconds']:.2f} s; a new backend after count(*): "
              f"{state['2m']['backend_shmem_pmd_kb']} kB of {state['2m']['backend_rss_kb']} kB "
              "resident buffers PMD-mapped."]
    write_results(args.name, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
