"""What bench_apps.py, bench_stall.py and bench_vm.py share: phases under the machine lock with
every THP knob restored, CPU pinning, coverage from smaps_rollup, the C helpers, a daemon with
a target, and the figures (medians, ranges, paired ratios).

Every measurement phase holds kit/helpers.machine_lock for at most a few minutes and puts
back every THP knob it found (knob_snapshot/restore_knobs, SIGINT held off while restoring),
also on Ctrl-C, SIGTERM and SIGHUP (install_signals turns those into KeyboardInterrupt), so
other engineers' kernel tests can run between rounds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kit import helpers as H
from kit.daemon_runner import Daemon

from . import ROOT
from .cpu import stat_cpu_seconds

APPS = ROOT / "bench" / "apps"
BUILD = Path("/var/tmp/hugepaged-bench-build")
PHASE_LIMIT_S = 300.0

# Every hugepaged these benchmarks start (the daemon, `collapse`) is this checkout's: its src/
# goes first on the children's PYTHONPATH, whatever else is installed.
_SRC = str(ROOT / "src")
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _SRC:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP: unwind like Ctrl-C, so that every server is killed and knob restored."""


def _raise(signum, frame):  # noqa: ARG001
    raise Terminated(f"signal {signum}")


def install_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def require_root(name: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"{name}: needs root (THP knobs, pagemap, process_madvise)")


def no_swap() -> None:
    """Refuse to measure with swap on (the brief: never leave swap or zram on; a benchmark
    with swap measures the swap)."""
    with open("/proc/swaps") as f:
        if len(f.readlines()) > 1:
            sys.exit("swap is on (/proc/swaps): turn it off before measuring")


@contextlib.contextmanager
def phase(what: str, lock_log: list | None = None) -> Iterator[None]:
    """The machine lock and a knob snapshot around one measurement phase; knobs restored and
    the lock released on the way out, whatever happened. The phase's length is logged (and
    kept in lock_log): a phase should stay under PHASE_LIMIT_S."""
    t_wait = time.monotonic()
    with H.machine_lock():
        t0 = time.monotonic()
        saved = H.knob_snapshot()
        try:
            yield
        finally:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                H.restore_knobs(saved)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            held = time.monotonic() - t0
            if lock_log is not None:
                lock_log.append({"phase": what, "held_s": round(held, 1),
                                 "waited_s": round(t0 - t_wait, 1)})
            if held > PHASE_LIMIT_S:
                log(f"  note: phase '{what}' held the machine lock {held:.0f} s")


def build_c(name: str, static: bool = False) -> str:
    """bench/apps/NAME.c compiled (once per source change) into BUILD/NAME."""
    BUILD.mkdir(parents=True, exist_ok=True)
    src, out = APPS / f"{name}.c", BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", *(["-static"] if static else []), "-o", str(out),
                        str(src)], check=True)
    return str(out)


def taskset(cpus: str | int | None, cmd: list[str]) -> list[str]:
    return cmd if cpus is None else ["taskset", "-c", str(cpus), *cmd]


def pin(pid: int, cpus: str | int) -> None:
    """Pin every thread of a running process (taskset -a)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpus), str(pid)], check=True,
                   capture_output=True)


def tree_cpu(pid: int) -> float:
    """stat_cpu_seconds of pid and its live children (PostgreSQL's backends)."""
    total = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            total += stat_cpu_seconds(p)
    return total


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in kB (Anonymous, AnonHugePages, Shmem*, Rss ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            k, _, v = line.partition(":")
            parts = v.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[k] = int(parts[0])
    return out


def anon_coverage(pid: int) -> float:
    """AnonHugePages / Anonymous: the share of the process's anonymous memory PMD-mapped."""
    r = rollup(pid)
    return r.get("AnonHugePages", 0) / r["Anonymous"] if r.get("Anonymous") else 0.0


def vmstat(*names: str) -> dict[str, int]:
    out = dict.fromkeys(names, 0)
    with open("/proc/vmstat") as f:
        for line in f:
            k, _, v = line.partition(" ")
            if k in out:
                out[k] = int(v)
    return out


def target_daemon(workdir: str, pids: list[int], target: dict, sets: dict,
                  name: str = "covered") -> Daemon:
    """`hugepaged run --pid ... --config T.toml` with one [[target]] for `pids` holding
    `target`'s settings, `--set` for `sets` (the lead's pass-through), logging at info."""
    lines = ["[[target]]", f'name = "{name}"', f"pid = {list(pids)}"]
    for k, v in target.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}")
    cfg = Path(workdir) / f"target-{name}.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return Daemon(pids, sets, str(cfg), workdir=workdir, log_level="info")


def quick_or_full(args, table: tuple) -> None:
    """Each (option, quick value, full value) of `table` not given on the command line takes
    the value of the run's kind (`args.quick`)."""
    for k, quick, full in table:
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """--set KEY=VALUE pairs (passed to every hugepaged the benchmark starts)."""
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            sys.exit(f"--set {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


def parse_target_sets(items: list[str] | None) -> dict:
    """--target-set KEY=VALUE pairs: more settings for the benchmark's [[target]] (e.g.
    max_stall_ms=20, on_split=leave); numbers are written as TOML numbers, the rest as
    strings."""
    out: dict = {}
    for k, v in parse_sets(items).items():
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k] = v
    return out


def summary(values: list[float]) -> dict:
    """Median and range of a list of figures (None left out)."""
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(v), "median": statistics.median(v), "min": min(v), "max": max(v)}


def fmt_range(s: dict, fmt: str = "{:.2f}", unit: str = "") -> str:
    """"median (min–max)" of a summary()."""
    if not s.get("n"):
        return "—"
    f = lambda x: fmt.format(x) + unit  # noqa: E731
    if s["n"] == 1:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def rotated(keys: list[str], round_no: int) -> list[str]:
    """The order of round `round_no`: the list rotated by one each round, reversed every
    other round, so that no contender always runs first or right after the same one."""
    k = keys[round_no % len(keys):] + keys[:round_no % len(keys)]
    return k if round_no % 2 == 0 else k[::-1]


def describe_machine() -> dict:
    """Kernel, CPUs, memory, the code measured (git), the THP knobs at the start."""
    import platform

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return r.stdout.strip()

    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "mem_gib": round(mem_kb / (1 << 20), 1), "python": platform.python_version(),
            "commit": git("rev-parse", "--short", "HEAD"), "branch": git("rev-parse",
                                                                         "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "thp": H.knob_snapshot()}
