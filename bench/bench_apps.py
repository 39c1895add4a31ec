#!/usr/bin/env python3
"""Real applications, contenders alive at once, rotated rounds: what each way of getting huge
pages buys Redis, a JVM and PostgreSQL on this machine's `madvise` default.

    sudo python bench/bench_apps.py [--quick] [--apps redis,java,pg] [--rounds N]
                                    [--seconds S] [--set KEY=VALUE ...] [--name NAME]

For each application, one copy per contender, all alive at the same time (same machine state,
same neighbours), each server pinned to CPU 1 and its client to CPU 0:

- madvise: nothing; the machine's default `enabled=madvise`, the application never advises.
- always: the machine at `enabled=always` (PostgreSQL: `shmem_enabled=always`) while the
  copy starts and loads; put back right after.
- target: `hugepaged run` (its defaults, plus --set) with a target `enabled = "always"`
  (PostgreSQL: `shmem_enabled = "always"`) for the copy's pid.
- force: one `hugepaged collapse --force` after loading (PostgreSQL: `--set
  shmem_enabled=always`).
- jvm-thp: Java only, `-XX:+UseTransparentHugePages` (the JVM advises its own heap).

Applications (sizes beyond what the page-walk caches reach; --quick uses small ones):
- Redis 7 (`redis-server`, `--disable-thp no`), DEBUG POPULATE to --redis-mb (3072) of 1 KiB
  values; load: bench/apps/redis_probe.c `bench`, GETs of the populated keys pipelined 16 deep
  on one connection (every GET a hit). Figure: GET/s, server CPU per GET.
- Java 17: bench/apps/HeapReader.java, random reads over a --java-mb (2560) long[]; the JVM
  pinned to CPU 1. Figure: reads/s, JVM CPU per read.
- PostgreSQL 15 (kit/pg.py): shared_buffers --pg-buffers (2GB), pgbench scale --pg-scale,
  pg_prewarm'ed; `pgbench -S -M prepared -c 2 -j 1` on CPU 0, the postmaster and its backends
  on CPU 1. Figure: tps, server CPU per transaction (postmaster + reaped backends).

Each round measures every copy once, in an order rotated every round (scenarios/realapps
.rotated), --seconds each. Per round the ratio of each contender to `madvise` (throughput, and
server CPU per operation) is taken: paired ratios, whose median and range over the rounds are
the figures. Coverage (AnonHugePages / Anonymous, or the buffers' ShmemPmdMapped in the
backends) is read from smaps at every round, so a copy touched by someone else shows.
The machine lock is held per phase (set-up, coverage, one round), never for the whole run.
Writes bench/results/NAME.{json,md} (default NAME: DATE-apps[-quick]).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scenarios import ROOT, write_results
from scenarios.cpu import stat_cpu_seconds
from scenarios.realapps import (
    BUILD,
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
    pin,
    quick_or_full,
    require_root,
    rotated,
    summary,
    target_daemon,
    taskset,
)

from kit import helpers as H
from kit import pg
from kit.redis_app import Redis

SERVER_CPU, CLIENT_CPU = 1, 0
JAVA_SRC = ROOT / "bench" / "apps" / "HeapReader.java"


def hugepaged_collapse(pid: int, *sets: str) -> dict:
    argv = [sys.executable, "-m", "hugepaged", "collapse", "--pid", str(pid), "--force",
            "--json"]
    for s in sets:
        argv += ["--set", s]
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    res = {"rc": out.returncode, "wall_s": round(time.monotonic() - t0, 2)}
    with contextlib.suppress(ValueError):
        doc = json.loads(out.stdout)
        res.update({k: doc.get(k) for k in ("collapsed", "failed", "seconds")})
    if out.returncode:
        res["stderr"] = out.stderr[-300:]
    return res


def wait_covered(pids_cov, daemon, level: float, limit_s: float) -> dict:
    """Until every (pid, coverage function) of pids_cov is >= level, the daemon has settled
    them, or limit_s passed."""
    t0 = time.monotonic()
    while True:
        covs = {pid: f(pid) for pid, f in pids_cov}
        settled = False
        if daemon is not None:
            with contextlib.suppress(Exception):
                st = daemon.status()
                slots = {p["pid"]: p for p in st["processes"]}
                settled = all(slots.get(pid, {}).get("settled_seconds", 0) > 0
                              for pid, _ in pids_cov)
        if all(c >= level for c in covs.values()) or settled \
                or time.monotonic() - t0 > limit_s:
            return {"seconds": round(time.monotonic() - t0, 1),
                    "coverage": {str(k): round(v, 4) for k, v in covs.items()},
                    "settled": settled}
        time.sleep(1.0)


# ---------------------------------------------------------------------------------------------
# The applications: each gives start/measure/coverage/close for one copy per contender.


class RedisApp:
    name = "redis"
    unit, op = "GET/s", "GET"
    contenders = ["madvise", "always", "target", "force"]

    def __init__(self, args, work: str) -> None:
        self.mb, self.work = args.redis_mb, work
        self.probe = build_c("redis_probe")
        self.copies: dict[str, Redis] = {}
        self.keys = 0

    def start(self, key: str) -> int:
        r = Redis()
        r.cmd = taskset(SERVER_CPU, r.cmd)  # taskset execs redis-server: same pid
        r.start()
        self.copies[key] = r
        self.keys = r.populate(self.mb)
        return r.pid

    def coverage(self, pid: int) -> float:
        return anon_coverage(pid)

    def force_args(self) -> tuple[str, ...]:
        return ()

    def target(self) -> dict:
        return {"enabled": "always"}

    def measure(self, key: str, seconds: float) -> dict:
        r = self.copies[key]
        c0 = stat_cpu_seconds(r.pid)
        out = subprocess.run(taskset(CLIENT_CPU, [self.probe, "bench", str(r.port),
                                                  str(seconds), str(self.keys), "16"]),
                             capture_output=True, text=True, timeout=seconds + 60, check=True)
        cpu = stat_cpu_seconds(r.pid) - c0
        doc = json.loads(out.stdout)
        return {"ops_per_s": doc["gets_per_s"], "ops": doc["gets"],
                "server_cpu_s": round(cpu, 3),
                "cpu_us_per_op": 1e6 * cpu / doc["gets"] if doc["gets"] else None}

    def check(self, key: str) -> bool:
        r = self.copies[key]
        return all(r.get(f"key:{i}") == r.expected_value(i) for i in (0, self.keys // 2,
                                                                      self.keys - 1))

    def close(self) -> None:
        for r in self.copies.values():
            r.close()


class JavaApp:
    name = "java"
    unit, op = "reads/s", "read"
    contenders = ["madvise", "always", "target", "force", "jvm-thp"]

    def __init__(self, args, work: str) -> None:
        self.mb, self.work = args.java_mb, work
        BUILD.mkdir(parents=True, exist_ok=True)
        cls = BUILD / "HeapReader.class"
        if not cls.exists() or cls.stat().st_mtime < JAVA_SRC.stat().st_mtime:
            subprocess.run(["javac", "-d", str(BUILD), str(JAVA_SRC)], check=True)
        self.copies: dict[str, subprocess.Popen] = {}

    def start(self, key: str) -> int:
        heap = self.mb + 512
        # A small young generation: the one array must fit in the old one (SerialGC gives the
        # young a third of the heap by default, and a 2.5 GiB array then does not fit).
        flags = [f"-Xms{heap}m", f"-Xmx{heap}m", "-Xmn64m", "-XX:+UseSerialGC",
                 "-XX:-UsePerfData",
                 "-XX:TieredStopAtLevel=4"]
        if key == "jvm-thp":
            flags.append("-XX:+UseTransparentHugePages")
        p = subprocess.Popen(taskset(SERVER_CPU, ["java", *flags, "-cp", str(BUILD),
                                                  "HeapReader", str(self.mb)]),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
        self.copies[key] = p
        line = p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"HeapReader said {line!r}")
        return p.pid

    def coverage(self, pid: int) -> float:
        return anon_coverage(pid)

    def force_args(self) -> tuple[str, ...]:
        return ()

    def target(self) -> dict:
        return {"enabled": "always"}

    def _ask(self, key: str, line: str) -> str:
        p = self.copies[key]
        p.stdin.write(line + "\n")
        p.stdin.flush()
        return p.stdout.readline().strip()

    def measure(self, key: str, seconds: float) -> dict:
        p = self.copies[key]
        c0 = stat_cpu_seconds(p.pid)
        reply = self._ask(key, f"run {seconds}")
        cpu = stat_cpu_seconds(p.pid) - c0
        rate = float(reply.split()[1])
        return {"ops_per_s": rate, "ops": rate * seconds, "server_cpu_s": round(cpu, 3),
                "cpu_us_per_op": 1e6 * cpu / (rate * seconds) if rate else None}

    def check(self, key: str) -> bool:
        return self._ask(key, "check") == "ok"

    def close(self) -> None:
        for p in self.copies.values():
            with contextlib.suppress(OSError):
                os.killpg(p.pid, 9)
            with contextlib.suppress(Exception):
                p.wait(10)


def reaped_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime: the postmaster and the backends it has reaped."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in rest[11:15]) / os.sysconf("SC_CLK_TCK")


class PgApp:
    name = "pg"
    unit, op = "tps", "transaction"
    contenders = ["madvise", "always", "target", "force"]
    START_MODE = {"madvise": "never", "always": "always", "target": "advise", "force": "advise"}

    def __init__(self, args, work: str) -> None:
        if not pg.available():
            raise RuntimeError("PostgreSQL 15 is not installed (apt-get install postgresql)")
        self.buffers, self.scale = args.pg_buffers, args.pg_scale
        self.copies: dict[str, pg.Postgres] = {}

    def start(self, key: str) -> int:
        # Alignment of the buffers' MAP_SHARED|MAP_ANONYMOUS mapping is decided at mmap time:
        # only while shmem huge pages are possible (kernel-interfaces.md, Shared memory here).
        H.write_knob("hugepages-2048kB/shmem_enabled", "inherit")
        H.write_knob("shmem_enabled", self.START_MODE[key])
        s = pg.Postgres(shared_buffers=self.buffers, max_connections="20")
        s.__enter__()
        self.copies[key] = s
        pin(s.postmaster_pid, SERVER_CPU)  # its backends, forked later, inherit it
        subprocess.run(taskset(CLIENT_CPU, s.client("pgbench")) + ["-i", "-q", "-s",
                                                                   str(self.scale)],
                       check=True, capture_output=True)
        s.psql("create extension pg_prewarm")
        s.psql("select sum(pg_prewarm(c.oid)) from pg_class c join pg_namespace n on n.oid = "
               "c.relnamespace where n.nspname = 'public' and c.relkind in ('r', 'i')")
        if key == "always":
            H.write_knob("shmem_enabled", "never")
        return s.postmaster_pid

    def coverage(self, pid: int) -> float:
        """ShmemPmdMapped / Rss of the buffers' mapping in a fresh backend (the postmaster
        itself maps only what it touched)."""
        s = next(c for c in self.copies.values() if c.postmaster_pid == pid)
        with s.session() as sess:
            sess.query("select count(*) from pgbench_accounts")
            lo, _ = s.shared_memory_vma(sess.backend_pid)
            v = H.smaps_vma(sess.backend_pid, lo)
        return v["ShmemPmdMapped"] / v["Rss"] if v["Rss"] else 0.0

    def force_args(self) -> tuple[str, ...]:
        return ("shmem_enabled=always",)

    def target(self) -> dict:
        return {"shmem_enabled": "always"}

    def measure(self, key: str, seconds: float) -> dict:
        s = self.copies[key]
        pid = s.postmaster_pid
        c0 = reaped_cpu(pid)
        r = subprocess.run(taskset(CLIENT_CPU, s.client("pgbench")) +
                           ["-S", "-M", "prepared", "-c", "2", "-j", "1", "-n",
                            "-T", str(int(seconds))], check=True, capture_output=True, text=True)
        time.sleep(0.5)  # the backends exit and are reaped: their CPU lands in cutime
        cpu = reaped_cpu(pid) - c0
        tps = float(re.search(r"tps = ([0-9.]+)", r.stdout).group(1))
        n = int(re.search(r"number of transactions actually processed: (\d+)",
                          r.stdout).group(1))
        return {"ops_per_s": tps, "ops": n, "server_cpu_s": round(cpu, 3),
                "cpu_us_per_op": 1e6 * cpu / n if n else None}

    def check(self, key: str) -> bool:
        return int(self.copies[key].psql("select count(*) from pgbench_accounts")) \
            == 100000 * self.scale

    def close(self) -> None:
        for s in self.copies.values():
            s.close()


APPS = {"redis": RedisApp, "java": JavaApp, "pg": PgApp}


# ---------------------------------------------------------------------------------------------


def run_app(app_cls, args, sets: dict, work: str, locks: list) -> dict:
    app = app_cls(args, work)
    keys = [k for k in app.contenders if k in args.contenders.split(",")]
    res: dict = {"contenders": keys, "rounds": [], "setup": {}}
    pids: dict[str, int] = {}
    daemon = None
    try:
        for key in keys:  # one lock phase per copy: PostgreSQL's load takes minutes
            with phase(f"{app.name}: start {key}", locks):
                t0 = time.monotonic()
                H.write_knob("enabled", "always" if key == "always" and app.name != "pg"
                             else "madvise")
                pids[key] = app.start(key)
                H.write_knob("enabled", "madvise")
                res["setup"][key] = {"pid": pids[key], "start_s": round(time.monotonic() - t0,
                                                                          1)}
                log(f"  {app.name} {key}: pid {pids[key]} ({time.monotonic() - t0:.0f} s)")
        with phase(f"{app.name}: collapse and daemon", locks):
            if "force" in keys:
                res["setup"]["force"]["collapse"] = hugepaged_collapse(pids["force"],
                                                                       *app.force_args())
                log(f"  collapse --force: {res['setup']['force']['collapse']}")
            if "target" in keys:
                daemon = target_daemon(work, [pids["target"]],
                                       {**app.target(), **args.target_sets}, sets,
                                       name=app.name)
                daemon.start(timeout=60)
                res["setup"]["target"]["daemon_sets"] = sets
        if "target" in keys:
            t0 = time.monotonic()
            cpu0 = stat_cpu_seconds(daemon.pid)
            for _ in range(2):  # at most two phases of waiting
                with phase(f"{app.name}: target coverage", locks):
                    w = wait_covered([(pids["target"], app.coverage)], daemon, 0.95,
                                     args.cover_limit / 2)
                if w["settled"] or min(w["coverage"].values()) >= 0.95:
                    break
            res["setup"]["target"]["coverage_wait"] = {
                **w, "seconds": round(time.monotonic() - t0, 1),
                "daemon_cpu_s": round(stat_cpu_seconds(daemon.pid) - cpu0, 2)}
            log(f"  target: {res['setup']['target']['coverage_wait']}")
        for rnd in range(args.rounds):
            order = rotated(keys, rnd)
            with phase(f"{app.name}: round {rnd + 1}", locks):
                row = {"order": order, "results": {}}
                for key in order:
                    m = app.measure(key, args.seconds)
                    m["coverage"] = round(app.coverage(pids[key]), 4)
                    row["results"][key] = m
                    log(f"  round {rnd + 1} {key}: {m['ops_per_s']:.0f} {app.unit}, "
                        f"{m['cpu_us_per_op']:.3f} us CPU/{app.op}, coverage "
                        f"{m['coverage']:.1%}")
            res["rounds"].append(row)
        res["checked"] = {k: app.check(k) for k in keys}
        if daemon is not None:
            with contextlib.suppress(Exception):
                st = daemon.status()
                res["daemon"] = {"cpu_s": round(stat_cpu_seconds(daemon.pid), 2),
                                 "counters": st.get("counters"), "tunables": st.get("tunables")}
    finally:
        if daemon is not None:
            daemon.close()
        app.close()
    res["figures"] = figures(res, keys)
    return res


def figures(res: dict, keys: list[str]) -> dict:
    """Per contender: throughput and CPU per op (medians, ranges), and the paired ratios
    against madvise of the same round."""
    out = {}
    for key in keys:
        rows = [r["results"][key] for r in res["rounds"]]
        f = {"ops_per_s": summary([r["ops_per_s"] for r in rows]),
             "cpu_us_per_op": summary([r["cpu_us_per_op"] for r in rows]),
             "coverage": summary([r["coverage"] for r in rows])}
        if key != "madvise" and "madvise" in keys:
            f["speedup"] = summary([r["results"][key]["ops_per_s"] /
                                    r["results"]["madvise"]["ops_per_s"]
                                    for r in res["rounds"]])
            f["cpu_per_op_ratio"] = summary([
                r["results"][key]["cpu_us_per_op"] / r["results"]["madvise"]["cpu_us_per_op"]
                for r in res["rounds"] if r["results"]["madvise"]["cpu_us_per_op"]])
        out[key] = f
    return out


LABELS = {"madvise": "madvise default (nothing)", "always": "machine at `always` before start",
          "target": "hugepaged target `enabled = \"always\"`", "force": "`collapse --force`",
          "jvm-thp": "`-XX:+UseTransparentHugePages`"}
WHAT = {"redis": "Redis 7, {redis_mb} MiB DEBUG POPULATE (1 KiB values), GETs pipelined 16 deep",
        "java": "Java 17 HeapReader, random reads over a {java_mb} MiB long[]",
        "pg": "PostgreSQL 15, shared_buffers={pg_buffers}, pgbench -S scale {pg_scale}"}


def report(doc: dict, args) -> list[str]:
    lines = [f"# Real applications: paired ratios against the madvise default ({doc['date']})",
             "", f"`{doc['command']}`  ", f"Linux {doc['machine'].get('kernel', '?')}, "
             f"{os.cpu_count()} CPUs; server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}; "
             f"{args.rounds} rounds of {args.seconds} s per copy, order rotated every round; "
             f"hugepaged --set: {doc['sets'] or 'none (defaults)'}.", "",
             "Figures: median (min–max) over the rounds. Ratios are paired: each round's "
             "contender against that round's madvise copy.", ""]
    for name, res in doc["apps"].items():
        if "error" in res:
            lines += [f"## {name}", "", f"not measured: {res['error']}", ""]
            continue
        app = APPS[name]
        lines += [f"## {WHAT[name].format(**vars(args))}", "",
                  f"| contender | {app.unit} | speed-up | server CPU per {app.op} (us) | "
                  "CPU per op ratio | coverage |", "|---|---|---|---|---|---|"]
        for key, f in res["figures"].items():
            lines.append(
                f"| {LABELS[key]} | {fmt_range(f['ops_per_s'], '{:,.0f}')} | "
                f"{fmt_range(f.get('speedup', {}), '{:.3f}', 'x')} | "
                f"{fmt_range(f['cpu_us_per_op'], '{:.3f}')} | "
                f"{fmt_range(f.get('cpu_per_op_ratio', {}), '{:.3f}', 'x')} | "
                f"{fmt_range(f['coverage'], '{:.1%}')} |")
        t = res["setup"].get("target", {}).get("coverage_wait")
        if t:
            lines += ["", f"Target coverage before the rounds: {t['coverage']}, "
                      f"{t['daemon_cpu_s']} s of daemon CPU{' (settled)' if t['settled'] else ''}"
                      f"; reached within {t['seconds']} s, which includes waiting for the "
                      "machine lock (bench_stall.py measures the time to coverage)."]
        c = res["setup"].get("force", {}).get("collapse")
        if c:
            lines.append(f"`collapse --force`: {c.get('collapsed')} windows in "
                         f"{c.get('wall_s')} s.")
        lines += [f"Contents checked after the rounds: {res.get('checked')}.", ""]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds, 3 s each")
    ap.add_argument("--apps", default="redis,java,pg")
    ap.add_argument("--contenders", default="madvise,always,target,force,jvm-thp")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--redis-mb", type=int)
    ap.add_argument("--java-mb", type=int)
    ap.add_argument("--pg-buffers")
    ap.add_argument("--pg-scale", type=int)
    ap.add_argument("--cover-limit", type=float, default=480.0,
                    help="seconds to wait for the target's coverage (in two lock phases)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="passed to the hugepaged daemon (repeatable)")
    ap.add_argument("--target-set", action="append", metavar="KEY=VALUE",
                    help="more settings of the daemon's [[target]] (e.g. max_stall_ms=20)")
    ap.add_argument("--name")
    args = ap.parse_args(argv)
    require_root("bench_apps.py")
    no_swap()
    q = args.quick
    quick_or_full(args, (("rounds", 2, 5), ("seconds", 3.0, 8.0), ("redis_mb", 512, 3072),
                        ("java_mb", 512, 2560), ("pg_buffers", "256MB", "2GB"),
                        ("pg_scale", 10, 100)))
    bad = [a for a in args.apps.split(",") if a not in APPS]
    if bad:
        sys.exit(f"--apps: unknown {bad}; known: {sorted(APPS)}")
    sets = parse_sets(args.set)
    args.target_sets = parse_target_sets(args.target_set)
    install_signals()
    name = args.name or time.strftime("%Y-%m-%d") + "-apps" + ("-quick" if q else "")
    work = tempfile.mkdtemp(prefix="hugepaged-apps-")
    locks: list = []
    given = sys.argv[1:] if argv is None else argv
    doc = {"command": "python bench/bench_apps.py " + " ".join(given),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": describe_machine(),
           "args": vars(args), "sets": sets, "apps": {}, "lock_phases": locks}
    for a in args.apps.split(","):
        log(f"{a}")
        try:
            doc["apps"][a] = run_app(APPS[a], args, sets, work, locks)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one application failing leaves the others
            log(f"  {a} failed: {err!r}")
            doc["apps"][a] = {"error": repr(err)[:500]}
    write_results(name, doc, report(doc, args))
    Path(work, "done").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
