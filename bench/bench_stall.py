#!/usr/bin/env python3
"""Stalls during coverage, hugepaged against the kernel's khugepaged at the same pace; and what
the daemon spends after coverage while Redis's allocator splits its huge pages.

    sudo python bench/bench_stall.py [--quick] [--rounds N] [--redis-mb 3072]
                                     [--set KEY=VALUE ...] [--kernel-pace PAGES,SLEEP_MS]
                                     [--churn-seconds 120] [--name NAME]

A ~3 GiB Redis (DEBUG POPULATE, 1 KiB values, 4 KiB-mapped: filled at `enabled=madvise`) is
covered by one collapser per run:
- hugepaged: `hugepaged run --pid REDIS` with a target `enabled = "always"` for it, at its
  defaults plus every --set (the pass-through for stall control, new defaults ...);
- kernel: the kernel's khugepaged at `enabled=always`, `pages_to_scan` = 512 x W and
  `scan_sleep_millisecs` chosen so that it collapses as many windows a second as the daemon
  did (the median rate of the hugepaged runs so far; --kernel-pace fixes it). Redis is then
  made to map new memory (a small DEBUG POPULATE) so that the kernel registers its mm.
Meanwhile a bystander Redis (1 GiB, never collapsed: started at `always` with
`--disable-thp yes`, so it set PR_SET_THP_DISABLE on itself) runs on the same CPU as the
collapsed one (CPU 1). On CPU 0 one probe per Redis (bench/apps/redis_probe.c `probe`) sends
one GET at a time and keeps every request's latency, from the collapser's start until 95% of
Redis's anonymous memory is PMD-mapped (or --cover-limit). The same probes run for
--baseline seconds before the collapser starts.

Figures per run: worst request and p99 (and p99.9, count over 10 ms / 50 ms) of the collapsed
Redis and of the bystander, during coverage and before; seconds to 50/90/95% coverage; the
collapser's CPU (the daemon's /proc/PID/stat, or the [khugepaged] thread's) until 95%; the
achieved pace (windows per second).

Churn (hugepaged runs only): once the Redis is covered, an eviction-and-refill load
(redis_probe `churn`: DEL --churn-rate keys a second in DEBUG POPULATE's order, default 0.5%
of the keys, each SET back with its original value 15 s later) makes jemalloc purge what was
freed (its dirty decay is 10 s), which splits the huge pages it lies in (vmstat
thp_split_pmd); memory stays about constant. Over --churn-seconds: the daemon's CPU (% of a
core), its collapses, the splits, the coverage.

Rounds alternate the order (hugepaged first, then kernel first ...); each run is one phase
under the machine lock (at most about 5 minutes), every THP knob restored after it.
Writes bench/results/NAME.{json,md} (default NAME: DATE-stall[-quick]).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from scenarios import write_results
from scenarios.cpu import find_khugepaged, stat_cpu_seconds
from scenarios.realapps import (
    anon_coverage,
    build_c,
    describe_machine,
    fmt_range,
    install_signals,
    log,
    no_swap,
    parse_sets,
    parse_target_sets,
    phase,
    quick_or_full,
    require_root,
    summary,
    target_daemon,
    taskset,
    vmstat,
)

from kit import helpers as H
from kit.redis_app import Redis

SERVER_CPU, CLIENT_CPU = 1, 0
HPAGE = 2 << 20
LEVELS = (0.5, 0.9, 0.95)


def proc_status(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    return ""


class Probes:
    """One latency probe per Redis, on CLIENT_CPU, stopped with SIGTERM."""

    def __init__(self, exe: str, servers: dict[str, Redis], seconds: float) -> None:
        self.procs = {name: subprocess.Popen(
            taskset(CLIENT_CPU, [exe, "probe", str(r.port), str(seconds), str(r.keys)]),
            stdout=subprocess.PIPE, text=True) for name, r in servers.items()}

    def stop(self) -> dict[str, dict]:
        out = {}
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            text, _ = p.communicate(timeout=60)
            out[name] = digest(json.loads(text))
        return out

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def digest(doc: dict) -> dict:
    """The probe's figures, its list of slow requests reduced to counts and the worst ten."""
    slow = doc.pop("slow", [])
    per_s = doc.pop("per_second", [])
    doc["over_10ms"] = len(slow)
    doc["over_50ms"] = sum(1 for _, us in slow if us >= 50000)
    doc["worst"] = sorted(slow, key=lambda s: -s[1])[:10]
    doc["slow_times"] = [round(t - doc.get("t0", 0), 3) for t, _ in slow][:2000]
    doc["per_second_max_us"] = [m for _, m in per_s]
    doc["per_second_requests"] = [n for n, _ in per_s]
    return doc


class Collapser:
    """hugepaged (a daemon with a target) or the kernel's khugepaged at a given pace."""

    def __init__(self, kind: str, work: str, sets: dict, pace: tuple[int, int] | None) -> None:
        self.kind, self.work, self.sets, self.pace = kind, work, sets, pace
        self.target_sets: dict = {}
        self.daemon = None
        self.pid = None

    def register(self, redis: Redis) -> None:
        """Kernel: before the probes start, make the kernel register Redis's mm (it does when
        the mm maps or faults memory that is eligible: at `always` a 16 MiB DEBUG POPULATE),
        with khugepaged asleep for an hour; the DEBUG POPULATE itself blocks Redis for up
        to ~140 ms, which is no collapse's doing."""
        if self.kind != "kernel":
            return
        H.write_knob("pages_to_scan", self.pace[0])
        H.write_knob("scan_sleep_millisecs", 3_600_000)
        H.write_knob("enabled", "always")
        redis.command("DEBUG", "POPULATE", 16384, "khugepaged-registration", 1024)

    def start(self, redis: Redis) -> None:
        if self.kind == "hugepaged":
            self.daemon = target_daemon(self.work, [redis.pid],
                                        {"enabled": "always", **self.target_sets}, self.sets,
                                        name="redis")
            self.daemon.start(timeout=60)
            self.pid = self.daemon.pid
            self.cpu0 = stat_cpu_seconds(self.pid)
        else:
            self.pid = find_khugepaged()
            if self.pid is None:
                raise RuntimeError("no [khugepaged] thread at enabled=always")
            self.cpu0 = stat_cpu_seconds(self.pid)
            H.write_knob("scan_sleep_millisecs", self.pace[1])  # wakes the thread

    def cpu(self) -> float:
        return stat_cpu_seconds(self.pid) - self.cpu0

    def status(self) -> dict:
        if self.daemon is None:
            return {}
        with contextlib.suppress(Exception):
            st = self.daemon.status()
            return {"counters": st.get("counters"), "tunables": st.get("tunables")}
        return {}

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
        else:
            H.write_knob("enabled", "madvise")


def cover_run(kind: str, args, sets: dict, pace, bystander: Redis, probe_exe: str,
              work: str) -> dict:
    """One run: a fresh Redis, baseline probes, the collapser until 95% (or the limit);
    for hugepaged, then the churn window."""
    res: dict = {"kind": kind}
    if pace:
        res["kernel_pace"] = {"pages_to_scan": pace[0], "scan_sleep_millisecs": pace[1]}
    redis = Redis()
    redis.cmd = taskset(SERVER_CPU, redis.cmd)
    col = Collapser(kind, work, sets, pace)
    col.target_sets = args.target_sets
    probes = None
    try:
        H.write_knob("enabled", "madvise")
        redis.start()
        t0 = time.monotonic()
        redis.populate(args.redis_mb)
        res["populate_s"] = round(time.monotonic() - t0, 1)
        res["anon_mib"] = round(rollup_anon(redis.pid) / 1024)
        servers = {"collapsed": redis, "bystander": bystander}
        col.register(redis)
        probes = Probes(probe_exe, servers, args.baseline)
        time.sleep(args.baseline + 0.5)
        res["before"] = probes.stop()
        probes = Probes(probe_exe, servers, args.cover_limit + 60)
        splits0 = vmstat("thp_split_pmd")["thp_split_pmd"]
        t0 = time.monotonic()
        col.start(redis)
        times: dict = {}
        samples = []
        while True:
            time.sleep(1.0)
            el = time.monotonic() - t0
            c = anon_coverage(redis.pid)
            samples.append((round(el, 1), round(c, 4), round(col.cpu(), 3)))
            for lv in LEVELS:
                if c >= lv and str(lv) not in times:
                    times[str(lv)] = {"s": round(el, 1), "cpu_s": round(col.cpu(), 2)}
            if c >= LEVELS[-1] or el > args.cover_limit:
                break
        res["during"] = probes.stop()
        probes = None
        res["cover_s"] = round(time.monotonic() - t0, 1)
        res["coverage_end"] = samples[-1][1]
        res["times"] = times
        res["collapser_cpu_s"] = round(col.cpu(), 2)
        res["samples"] = samples
        res["windows_per_s"] = round(samples[-1][1] * res["anon_mib"] / 2 / res["cover_s"], 2)
        res["thp_split_pmd_during"] = vmstat("thp_split_pmd")["thp_split_pmd"] - splits0
        res["collapser_status"] = col.status()
        log(f"    {kind}: {res['coverage_end']:.1%} in {res['cover_s']} s, "
            f"{res['collapser_cpu_s']} s CPU, {res['windows_per_s']} windows/s; collapsed "
            f"max {res['during']['collapsed']['max_us'] / 1e3:.1f} ms p99 "
            f"{res['during']['collapsed']['p99_us'] / 1e3:.2f} ms; bystander max "
            f"{res['during']['bystander']['max_us'] / 1e3:.1f} ms p99 "
            f"{res['during']['bystander']['p99_us'] / 1e3:.2f} ms")
        if kind == "hugepaged" and args.churn_seconds > 0:
            res["churn"] = churn(redis, col, args, probe_exe)
        res["checked"] = all(redis.get(f"key:{i}") == redis.expected_value(i)
                             for i in (0, redis.keys // 2, redis.keys - 1))
    finally:
        if probes is not None:
            probes.kill()
        col.stop()
        redis.close()
    return res


def rollup_anon(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return 0


def churn(redis: Redis, col: Collapser, args, exe: str) -> dict:
    """After coverage: the write load for --churn-seconds; the daemon's CPU meanwhile."""
    st0 = col.status().get("counters") or {}
    v0 = vmstat("thp_split_pmd", "thp_deferred_split_page", "thp_underused_split_page")
    anon0 = rollup_anon(redis.pid)
    cov0, cpu0, t0 = anon_coverage(redis.pid), col.cpu(), time.monotonic()
    out = subprocess.run(taskset(CLIENT_CPU, [exe, "churn", str(redis.port),
                                              str(args.churn_seconds), str(redis.keys),
                                              str(args.churn_rate)]),
                         capture_output=True, text=True, timeout=args.churn_seconds + 60)
    secs = time.monotonic() - t0
    cpu = col.cpu() - cpu0
    st1 = col.status().get("counters") or {}
    v1 = vmstat(*v0)
    res = {"seconds": round(secs, 1), "load": json.loads(out.stdout or "{}"),
           "daemon_cpu_s": round(cpu, 3), "daemon_cpu_percent": round(100 * cpu / secs, 3),
           "coverage_before": round(cov0, 4), "coverage_after": round(anon_coverage(redis.pid),
                                                                      4),
           "anon_mib_before": anon0 >> 10, "anon_mib_after": rollup_anon(redis.pid) >> 10,
           "vmstat": {k: v1[k] - v0[k] for k in v0},
           "daemon_counters": {k: st1[k] - st0.get(k, 0) for k in st1
                               if isinstance(st1.get(k), int)}}
    res["collapses_per_min"] = round(60 * res["daemon_counters"].get("pages_collapsed", 0)
                                     / secs, 1)
    log(f"    churn {secs:.0f} s: daemon {res['daemon_cpu_percent']:.2f}% of a core, "
        f"thp_split_pmd +{res['vmstat']['thp_split_pmd']}, "
        f"{res['daemon_counters'].get('pages_collapsed', 0)} collapses, coverage "
        f"{cov0:.1%} -> {res['coverage_after']:.1%}, anonymous {res['anon_mib_before']} -> "
        f"{res['anon_mib_after']} MiB")
    return res


def kernel_pace(rates: list[float], fixed: str | None) -> tuple[int, int]:
    """(pages_to_scan, scan_sleep_millisecs) for the kernel's khugepaged: the daemon's median
    collapse rate, 8 windows (4096 pages, the kernel's default batch) per wake-up."""
    if fixed:
        p, s = fixed.split(",")
        return int(p), int(s)
    rate = statistics.median(rates) if rates else 10.0
    per_wake = 8
    return 512 * per_wake, max(1, round(1000 * per_wake / max(rate, 0.01)))


SKIP_S = 0.5


def worst_ms(d: dict, skip: float = SKIP_S) -> float:
    """The worst request that started at least `skip` s into the probe: what the collapser
    did, not what starting it did (runs before the kernel's registration was moved ahead of
    the probes had its 16 MiB DEBUG POPULATE in their first 0.1 s). From the ten worst kept
    (all over 10 ms), else the maximum of all when none was slow."""
    t0 = d.get("t0", 0)
    worst = d.get("worst", [])
    late = [us for t, us in worst if t - t0 >= skip]
    if late:
        return max(late) / 1e3
    if worst:  # every slow request kept was early: the whole seconds after
        return max(d.get("per_second_max_us", [])[int(skip) + 1:], default=0) / 1e3
    return d["max_us"] / 1e3


def figures(runs: list[dict]) -> dict:
    out = {}
    for kind in ("hugepaged", "kernel"):
        rs = [r for r in runs if r.get("kind") == kind and "during" in r]
        if not rs:
            continue
        f = {}
        for who in ("collapsed", "bystander"):
            for when in ("during", "before"):
                f[f"{who}_{when}_max_ms"] = summary([worst_ms(r[when][who]) for r in rs])
                f[f"{who}_{when}_p99_ms"] = summary([r[when][who]["p99_us"] / 1e3 for r in rs])
            f[f"{who}_during_over_50ms"] = summary([r["during"][who]["over_50ms"] for r in rs])
        f["t95_s"] = summary([r["times"].get("0.95", {}).get("s") for r in rs])
        f["cpu_to_95_s"] = summary([r["times"].get("0.95", {}).get("cpu_s") for r in rs])
        f["windows_per_s"] = summary([r["windows_per_s"] for r in rs])
        f["coverage_end"] = summary([r["coverage_end"] for r in rs])
        ch = [r["churn"] for r in rs if "churn" in r]
        if ch:
            f["churn_cpu_percent"] = summary([c["daemon_cpu_percent"] for c in ch])
            f["churn_splits"] = summary([c["vmstat"]["thp_split_pmd"] for c in ch])
            f["churn_collapses_per_min"] = summary([c["collapses_per_min"] for c in ch])
        out[kind] = f
    return out


def report(doc: dict, args) -> list[str]:
    f = doc["figures"]
    lines = [f"# Stalls during coverage of a {args.redis_mb} MiB Redis ({doc['date']})", "",
             f"`{doc['command']}`  ",
             f"Linux {doc['machine']['kernel']}, {doc['machine']['cpus']} CPUs, code "
             f"{doc['machine']['commit']}; both Redis servers on CPU {SERVER_CPU}, probes on "
             f"CPU {CLIENT_CPU}; hugepaged --set: {doc['sets'] or 'none (defaults)'}, target "
             f"extras: {getattr(args, 'target_sets', None) or 'none'}; "
             f"{args.rounds} round(s), order alternating.", "",
             "Median (min–max) over the runs. `during`: from the collapser's start until 95% "
             "of the Redis is PMD-mapped (worst request: from 0.5 s after it); `before`: the "
             f"same probes for {args.baseline:.0f} s before the collapser starts.", "",
             "| figure | hugepaged | kernel khugepaged, same pace |", "|---|---|---|"]
    rows = [("collapsed Redis: worst request, during (ms)", "collapsed_during_max_ms", "{:.1f}"),
            ("collapsed Redis: p99, during (ms)", "collapsed_during_p99_ms", "{:.2f}"),
            ("collapsed Redis: requests > 50 ms, during", "collapsed_during_over_50ms", "{:.0f}"),
            ("bystander Redis: worst request, during (ms)", "bystander_during_max_ms", "{:.1f}"),
            ("bystander Redis: p99, during (ms)", "bystander_during_p99_ms", "{:.2f}"),
            ("bystander Redis: requests > 50 ms, during", "bystander_during_over_50ms", "{:.0f}"),
            ("collapsed Redis: worst request, before (ms)", "collapsed_before_max_ms", "{:.1f}"),
            ("collapsed Redis: p99, before (ms)", "collapsed_before_p99_ms", "{:.2f}"),
            ("bystander Redis: worst request, before (ms)", "bystander_before_max_ms", "{:.1f}"),
            ("time to 95% (s)", "t95_s", "{:.1f}"),
            ("collapser CPU until 95% (s)", "cpu_to_95_s", "{:.2f}"),
            ("pace (windows collapsed per second)", "windows_per_s", "{:.1f}"),
            ("coverage at the end", "coverage_end", "{:.1%}"),
            ("after coverage, under the write load: daemon CPU (% of a core)",
             "churn_cpu_percent", "{:.2f}"),
            ("  thp_split_pmd during the load", "churn_splits", "{:.0f}"),
            ("  daemon collapses a minute during the load", "churn_collapses_per_min",
             "{:.1f}")]
    for label, key, fmt in rows:
        cells = [fmt_range(f.get(k, {}).get(key, {}), fmt) for k in ("hugepaged", "kernel")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    paces = sorted({(r["kernel_pace"]["pages_to_scan"], r["kernel_pace"]["scan_sleep_millisecs"])
                    for r in doc["runs"] if r.get("kernel_pace")})
    used = ", ".join(f"pages_to_scan={p}, scan_sleep_millisecs={s}" for p, s in paces)
    lines += ["", f"Kernel pace used: {used or '—'}. "
              f"Churn: {args.churn_seconds:.0f} s of `redis_probe churn` (eviction and refill, "
              f"{args.churn_rate or '0.5% of the'} keys a second, each set back 15 s later) "
              "after coverage (hugepaged runs only).", "",
              "| run | kind | t95 (s) | CPU (s) | collapsed max / p99 (ms) | bystander max / p99 "
              "(ms) |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(doc["runs"]):
        if "during" not in r:
            lines.append(f"| {i + 1} | {r.get('kind')} | failed: {r.get('error', '')[:80]} |||| ")
            continue
        d = r["during"]
        lines.append(f"| {i + 1} | {r['kind']} | {r['times'].get('0.95', {}).get('s', '—')} | "
                     f"{r['collapser_cpu_s']} | {worst_ms(d['collapsed']):.1f} / "
                     f"{d['collapsed']['p99_us'] / 1e3:.2f} | {worst_ms(d['bystander']):.1f}"
                     f" / {d['bystander']['p99_us'] / 1e3:.2f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB, one round, 20 s of churn")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--redis-mb", type=int)
    ap.add_argument("--bystander-mb", type=int, default=1024)
    ap.add_argument("--baseline", type=float)
    ap.add_argument("--cover-limit", type=float, default=200.0)
    ap.add_argument("--churn-seconds", type=float)
    ap.add_argument("--churn-rate", type=int, default=0,
                    help="keys deleted (and set back 15 s later) a second; 0: 0.5%% of them")
    ap.add_argument("--kernel-pace", help="PAGES,SLEEP_MS for the kernel's khugepaged "
                    "(default: matched to the daemon's measured rate)")
    ap.add_argument("--kinds", default="hugepaged,kernel")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="passed to the hugepaged daemon (repeatable)")
    ap.add_argument("--target-set", action="append", metavar="KEY=VALUE",
                    help="more settings of the daemon's [[target]] (e.g. max_stall_ms=20)")
    ap.add_argument("--name")
    args = ap.parse_args(argv)
    require_root("bench_stall.py")
    no_swap()
    q = args.quick
    quick_or_full(args, (("rounds", 1, 3), ("redis_mb", 512, 3072), ("baseline", 5.0, 15.0),
                        ("churn_seconds", 20.0, 120.0)))
    if q:
        args.bystander_mb = min(args.bystander_mb, 256)
    sets = parse_sets(args.set)
    args.target_sets = parse_target_sets(args.target_set)
    kinds = args.kinds.split(",")
    install_signals()
    name = args.name or time.strftime("%Y-%m-%d") + "-stall" + ("-quick" if q else "")
    work = tempfile.mkdtemp(prefix="hugepaged-stall-")
    exe = build_c("redis_probe")
    locks: list = []
    doc = {"command": "python bench/bench_stall.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": describe_machine(), "args": vars(args), "sets": sets, "runs": [],
           "lock_phases": locks}
    bystander = Redis(disable_thp=True)
    bystander.cmd = taskset(SERVER_CPU, bystander.cmd)
    try:
        with phase("bystander", locks):
            H.write_knob("enabled", "always")  # Redis sets PR_SET_THP_DISABLE at start
            bystander.start()
            H.write_knob("enabled", "madvise")
            bystander.populate(args.bystander_mb)
            doc["bystander"] = {"pid": bystander.pid, "mib": args.bystander_mb,
                                "THP_enabled": proc_status(bystander.pid, "THP_enabled")}
            log(f"bystander Redis pid {bystander.pid}, THP_enabled "
                f"{doc['bystander']['THP_enabled']}")
        rates: list[float] = []
        for rnd in range(args.rounds):
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for kind in order:
                pace = kernel_pace(rates, args.kernel_pace) if kind == "kernel" else None
                log(f"round {rnd + 1}: {kind}" + (f" at {pace}" if pace else ""))
                try:
                    with phase(f"round {rnd + 1} {kind}", locks):
                        r = cover_run(kind, args, sets, pace, bystander, exe, work)
                except KeyboardInterrupt:
                    raise
                except Exception as err:  # noqa: BLE001 - record it, go on with the next
                    log(f"    failed: {err!r}")
                    r = {"kind": kind, "error": repr(err)[:500]}
                r["round"] = rnd + 1
                doc["runs"].append(r)
                if kind == "hugepaged" and "windows_per_s" in r:
                    rates.append(r["windows_per_s"])
                doc["figures"] = figures(doc["runs"])  # kept after every run: a cut-short
                write_results(name, doc, report(doc, args), quiet=True)  # run leaves data
    finally:
        bystander.close()
    doc["figures"] = figures(doc["runs"])
    write_results(name, doc, report(doc, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
