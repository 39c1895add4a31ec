"""Targets on real applications: what a target with enabled="always" buys on a madvise machine,
and what the collapse costs the application while it runs.

    sudo python bench/bench_targets.py [--quick] [--name NAME] [--runs 5]

1. Redis GET throughput: two redis-server instances filled alike (`key:%012d`, 64-byte values
   by redis-benchmark SET, so `redis-benchmark -r KEYS` GETs hit), one matched by a target with
   `enabled = "always"`, the other by one with `enabled = "never"` (left 4 KiB-mapped), both
   under one `hugepaged run` at its defaults. Once the first is >= 95% PMD-mapped,
   `redis-benchmark -t get -P 16 -r KEYS -n N -q` runs against each, interleaved A/B/A/B,
   median of --runs.
2. A Java heap random-read program of our own (bench/apps/HeapReader.java, openjdk, no
   -XX:+UseTransparentHugePages): two JVMs, the same two targets, random reads for 5 s each,
   interleaved, median of --runs.
3. The application's worst stall while it is being collapsed: HeapReader times batches of
   16384 random reads; the gap between the starts of consecutive batches is what the
   application sees. Once with `hugepaged run` at its defaults covering it through a target,
   once with an unpaced one-shot `hugepaged collapse` (and once with `collapse
   --max-cpu-percent 5`), each on a fresh JVM; p99 and maximum gap while collapses happen.

The kernel is at enabled=never for the run so its khugepaged and its page faults stay out
(MADV_COLLAPSE works at never; nothing of Redis's or the JVM's changes with the mode there);
settings are restored on every exit. Coverage is read from /proc/PID/smaps_rollup
(AnonHugePages / Anonymous), never through hugepaged's code.
Writes bench/results/NAME-targets.{md,json,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from scenarios import ROOT
from scenarios.cpu import stat_cpu_seconds

from kit.daemon_runner import Daemon
from kit.helpers import saved_thp
from kit.redis_app import Redis, anon_rollup_kb

BENCH = ROOT / "bench"

JAVA_SRC = BENCH / "apps" / "HeapReader.java"


def coverage(pid: int) -> float:
    anon, huge = anon_rollup_kb(pid)
    return huge / anon if anon else 0.0


def write_config(path: Path, always: list[int], never: list[int]) -> None:
    text = f'[[target]]\nname = "covered"\npid = {always}\nenabled = "always"\n'
    if never:
        text += f'\n[[target]]\nname = "left-alone"\npid = {never}\nenabled = "never"\n'
    path.write_text(text)


def wait_coverage(pid: int, level: float, timeout: float, daemon=None) -> tuple[float, float]:
    """(seconds until `pid`'s anonymous memory is `level` PMD-mapped, or until the daemon has
    settled it with nothing left to collapse (a JVM's non-heap memory can keep it under the
    level), coverage then)."""
    t0 = time.monotonic()
    while True:
        c = coverage(pid)
        if c >= level or time.monotonic() - t0 > timeout or settled(daemon, pid):
            return time.monotonic() - t0, c
        time.sleep(0.5)


def settled(daemon, pid: int) -> bool:
    if daemon is None:
        return False
    slot = next((p for p in daemon.status()["processes"] if p["pid"] == pid), None)
    return slot is not None and slot["settled_seconds"] > 0


# ------------------------------------------------------------------------------------------
# 1. Redis


def redis_benchmark(port: int, keys: int, n: int) -> float:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "get", "-P", "16",
                          "-r", str(keys), "-n", str(n), "-q"],
                         capture_output=True, text=True, timeout=600).stdout
    m = re.findall(r"GET: ([0-9.]+) requests per second", out)
    if not m:
        raise RuntimeError(f"redis-benchmark said: {out[-300:]!r}")
    return float(m[-1])


def redis_fill(port: int, keys: int) -> None:
    """SET key:%012d with 64-byte values, 3 x KEYS random keys: ~95% of 0..KEYS-1 exist, the
    names `redis-benchmark -r KEYS` GETs. Small values make GET a walk over the dict and the
    objects (what the TLB sees), not a copy of a large value."""
    subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set", "-P", "64", "-r",
                    str(keys), "-n", str(3 * keys), "-d", "64", "-q"], check=True,
                   capture_output=True, timeout=1200)


def bench_redis(args, work: Path) -> dict:
    keys = args.redis_mb * (1 << 20) // 170  # ~170 B of heap per key with a 64 B value
    with Redis() as a, Redis() as b:
        for r in (a, b):
            redis_fill(r.port, keys)
        sizes = {r: r.command("DBSIZE") for r in (a, b)}
        cfg = work / "redis.toml"
        write_config(cfg, always=[b.pid], never=[a.pid])
        before = {"a": coverage(a.pid), "b": coverage(b.pid)}
        with Daemon([a.pid, b.pid], {}, str(cfg), workdir=str(work), log_level="info") as d:
            t_cover, cov = wait_coverage(b.pid, 0.95, args.timeout)
            cpu = stat_cpu_seconds(d.pid)
            st = d.status()
        runs = {"4k": [], "covered": []}
        for _ in range(args.runs):
            runs["4k"].append(redis_benchmark(a.port, keys, args.redis_requests))
            runs["covered"].append(redis_benchmark(b.port, keys, args.redis_requests))
        ok = all(r.command("DBSIZE") == dbsize for r, dbsize in sizes.items())
        med = {k: statistics.median(v) for k, v in runs.items()}
        return {"keys": keys, "anon_kb": anon_rollup_kb(b.pid)[0], "coverage_before": before,
                "coverage_left_alone": coverage(a.pid), "coverage_covered": cov,
                "seconds_to_95pct": round(t_cover, 1), "daemon_cpu_seconds": round(cpu, 2),
                "runs": runs, "median": med, "gain_pct": 100 * (med["covered"] / med["4k"] - 1),
                "values_intact": ok, "status_targets": st.get("targets")}


# ------------------------------------------------------------------------------------------
# 2, 3. Java


class Jvm:
    """A HeapReader JVM: `cmd("run 5")` -> its reply line."""

    def __init__(self, classes: Path, mib: int) -> None:
        heap = mib + 512  # the array lives in the old generation: a small young one
        self.proc = subprocess.Popen(
            ["java", f"-Xms{heap}m", f"-Xmx{heap}m", "-Xmn128m", "-XX:-UseTransparentHugePages",
             "-XX:+UseSerialGC", "-cp", str(classes), "HeapReader", str(mib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"HeapReader: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cmd(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.cmd("quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def compile_java(work: Path) -> Path:
    out = work / "classes"
    out.mkdir()
    subprocess.run(["javac", "-d", str(out), str(JAVA_SRC)], check=True)
    return out


def bench_java(args, work: Path, classes: Path) -> dict:
    a, b = Jvm(classes, args.java_mb), Jvm(classes, args.java_mb)
    try:
        cfg = work / "java.toml"
        write_config(cfg, always=[b.pid], never=[a.pid])
        with Daemon([a.pid, b.pid], {}, str(cfg), workdir=str(work), log_level="info") as d:
            t_cover, cov = wait_coverage(b.pid, 0.95, args.timeout, d)
            cpu = stat_cpu_seconds(d.pid)
        runs = {"4k": [], "covered": []}
        for _ in range(args.runs):
            for key, jvm in (("4k", a), ("covered", b)):
                runs[key].append(int(jvm.cmd("run 5").split()[1]))
        ok = a.cmd("check") == "ok" and b.cmd("check") == "ok"
        med = {k: statistics.median(v) for k, v in runs.items()}
        return {"heap_mib": args.java_mb, "anon_kb": anon_rollup_kb(b.pid)[0],
                "coverage_covered": cov, "coverage_left_alone": coverage(a.pid),
                "seconds_to_95pct": round(t_cover, 1), "daemon_cpu_seconds": round(cpu, 2),
                "runs": runs, "median": med, "gain_pct": 100 * (med["covered"] / med["4k"] - 1),
                "contents_intact": ok}
    finally:
        a.close()
        b.close()


def gap_stats(gaps_ns: list[int]) -> dict:
    g = np.asarray(gaps_ns, dtype=np.float64) / 1e6
    return {"batches": int(g.size), "median_ms": round(float(np.median(g)), 3),
            "p99_ms": round(float(np.percentile(g, 99)), 3),
            "p999_ms": round(float(np.percentile(g, 99.9)), 3),
            "max_ms": round(float(g.max()), 3)}


def stall_run(args, work: Path, classes: Path, how: str) -> dict:
    """One fresh JVM; its gaps while `how` collapses it (until >= 95% or the time is up)."""
    jvm = Jvm(classes, args.java_mb)
    try:
        cfg = work / f"stall-{how}.toml"
        write_config(cfg, always=[jvm.pid], never=[])
        result: dict = {}

        def measure() -> None:
            result["gaps"] = [int(x) for x in jvm.cmd(f"gaps {args.stall_seconds}").split()[1:]]

        reader = threading.Thread(target=measure)
        reader.start()
        time.sleep(1.0)  # a baseline second before the collapser starts
        t0 = time.monotonic()
        if how == "daemon-defaults":
            with Daemon([jvm.pid], {}, str(cfg), workdir=str(work), log_level="info") as d:
                t, cov = wait_coverage(jvm.pid, 0.95, args.stall_seconds - 2, d)
        else:
            extra = [] if how == "collapse-unpaced" else ["--max-cpu-percent", "5"]
            subprocess.run([sys.executable, "-m", "hugepaged", "collapse", "--pid",
                            str(jvm.pid), "--config", str(cfg), "--target", "covered", *extra],
                           check=True, stdout=subprocess.DEVNULL, timeout=600)
            t, cov = time.monotonic() - t0, coverage(jvm.pid)
        reader.join()
        ok = jvm.cmd("check") == "ok"
        gaps = result["gaps"]
        # Batches are back to back: the cumulative sum is each batch's start; keep those
        # from the collapser's start to its end (the daemon: until 95% coverage).
        starts = np.cumsum(np.asarray(gaps, dtype=np.float64)) / 1e9
        lo, hi = 1.0, 1.0 + t
        during = [g for g, s in zip(gaps, starts, strict=True) if lo <= s <= hi]
        before = [g for g, s in zip(gaps, starts, strict=True) if s < lo]
        return {"how": how, "seconds": round(t, 1), "coverage": round(cov, 4),
                "during": gap_stats(during or gaps), "before": gap_stats(before or gaps),
                "contents_intact": ok}
    finally:
        jvm.close()


# ------------------------------------------------------------------------------------------
# Report


def write_report(name: str, doc: dict) -> None:
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    r, j, s = doc["redis"], doc["java"], doc["stall"]
    lines = [f"# Targets on real applications: {name}", "",
             f"`python bench/bench_targets.py {' '.join(doc['argv'])}` at commit {doc['commit']},"
             f" {doc['when']}, {doc['machine']}. Kernel at enabled=never for the run; one "
             "`hugepaged run` at its defaults with a target `enabled = \"always\"` for the "
             "covered process and `enabled = \"never\"` for the other.", "",
             "## Throughput, interleaved A/B, median of "
             f"{len(r['runs']['4k'])}", "",
             "| application | 4 KiB pages (target never) | covered (target always) | gain | goal |",
             "|---|---|---|---|---|",
             f"| Redis GET, redis-benchmark -P 16 -r {r['keys']} (64 B values) | "
             f"{r['median']['4k']:,.0f}/s | {r['median']['covered']:,.0f}/s | "
             f"{r['gain_pct']:+.1f}% | +30% ({'met' if r['gain_pct'] >= 30 else 'missed'}) |",
             f"| Java random reads over a {j['heap_mib']} MiB long[] | "
             f"{j['median']['4k'] / 1e6:.1f} M/s | {j['median']['covered'] / 1e6:.1f} M/s | "
             f"{j['gain_pct']:+.1f}% | +30% ({'met' if j['gain_pct'] >= 30 else 'missed'}) |",
             "",
             f"Redis: {r['anon_kb'] // 1024} MiB anonymous, 95% PMD-mapped after "
             f"{r['seconds_to_95pct']} s (coverage {r['coverage_covered']:.1%}; the other "
             f"instance {r['coverage_left_alone']:.1%}), daemon CPU {r['daemon_cpu_seconds']} s;"
             f" keys intact (DBSIZE): {r['values_intact']}. Runs: {r['runs']}.",
             f"Java: 95% (or nothing left to collapse) after {j['seconds_to_95pct']} s "
             f"(coverage {j['coverage_covered']:.1%}),"
             f" daemon CPU {j['daemon_cpu_seconds']} s; contents intact: "
             f"{j['contents_intact']}. Runs: {j['runs']}.", "",
             "## The application's stall while it is collapsed", "",
             "Gap between the starts of consecutive batches of 16384 random reads in "
             f"HeapReader ({doc['args']['java_mb']} MiB), while the collapser works.", "",
             "| collapser | time | coverage | median gap | p99 gap | p99.9 gap | max gap |"
             " before: p99 / max |",
             "|---|---|---|---|---|---|---|---|"]
    for x in s:
        d, b = x["during"], x["before"]
        lines.append(f"| {x['how']} | {x['seconds']} s | {x['coverage']:.1%} | "
                     f"{d['median_ms']} ms | {d['p99_ms']} ms | {d['p999_ms']} ms | "
                     f"{d['max_ms']} ms | {b['p99_ms']} / {b['max_ms']} ms |")
    dflt = next(x for x in s if x["how"] == "daemon-defaults")["during"]["p99_ms"]
    lines += ["", f"Goal p99 <= 10 ms at defaults: {dflt} ms, "
              f"{'met' if dflt <= 10 else 'missed'}.", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    plot(out / f"{name}.png", doc)


def plot(path: Path, doc: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title, scale in ((axes[0], "redis", "Redis GET/s", 1e3),
                                  (axes[1], "java", "Java random reads/s", 1e6)):
        runs = doc[key]["runs"]
        ax.bar(["4 KiB (never)", "covered (always)"],
               [statistics.median(runs["4k"]) / scale, statistics.median(runs["covered"]) / scale],
               color=["#999", "#2a7"])
        for i, k in enumerate(("4k", "covered")):
            ax.scatter([i] * len(runs[k]), [v / scale for v in runs[k]], color="k", s=10)
        ax.set_title(f"{title} ({'k' if scale == 1e3 else 'M'}), median of {len(runs['4k'])}")
    ax = axes[2]
    names = [x["how"] for x in doc["stall"]]
    ax.bar(np.arange(len(names)) - 0.2, [x["during"]["p99_ms"] for x in doc["stall"]], 0.4,
           label="p99 gap")
    ax.bar(np.arange(len(names)) + 0.2, [x["during"]["max_ms"] for x in doc["stall"]], 0.4,
           label="max gap")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("ms")
    ax.axhline(10, color="r", lw=0.8, ls="--")
    ax.set_title("application stall while collapsed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 runs: a smoke run")
    p.add_argument("--name", default=None)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--redis-mb", type=int, default=1024)
    p.add_argument("--redis-requests", type=int, default=2_000_000)
    p.add_argument("--java-mb", type=int, default=1024, help="a power of two")
    p.add_argument("--stall-seconds", type=int, default=45)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    if args.quick:
        args.runs, args.redis_mb, args.redis_requests = 3, 256, 500_000
        args.java_mb, args.stall_seconds = 256, 20
    name = args.name or time.strftime("%Y-%m-%d") + f"-vm-{os.cpu_count()}cpu" + \
        ("-quick" if args.quick else "") + "-targets"
    work = Path(tempfile.mkdtemp(prefix="bench-targets-"))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    doc = {"argv": sys.argv[1:], "args": vars(args), "commit": commit,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.release()}, {os.cpu_count()} CPUs"}
    try:
        classes = compile_java(work)
        with saved_thp(enabled="never"):
            doc["redis"] = bench_redis(args, work)
            print("redis", json.dumps(doc["redis"]["median"]), flush=True)
            doc["java"] = bench_java(args, work, classes)
            print("java", json.dumps(doc["java"]["median"]), flush=True)
            doc["stall"] = [stall_run(args, work, classes, how) for how in
                            ("daemon-defaults", "collapse-unpaced", "collapse-paced-5pct")]
            print("stall", json.dumps([(x["how"], x["during"]) for x in doc["stall"]]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(name, doc)
    print(f"wrote bench/results/{name}.md")


if __name__ == "__main__":
    main()
