"""What every scenario shares: contenders, kernel knobs, CPU and coverage probes, timelines.

Measurements here never go through hugepaged's own code: coverage is read with the
PAGEMAP_SCAN ioctl (PAGE_IS_HUGE regions of the target's ranges) and cross-checked at the
end of every run with tests/helpers.pmd_mapped_windows (pagemap + kpageflags); CPU comes
from /proc/PID/stat (utime + stime) and /proc/PID/task/*/schedstat (ns on CPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import platform
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import helpers as H  # noqa: E402  (tests/helpers.py: Workload, saved_thp, machine_lock, ...)

HPAGE = H.HPAGE
MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000

# The kernel's documented khugepaged defaults (transhuge.rst); the whole run starts from them.
KERNEL_DEFAULTS: dict[str, int] = {
    "pages_to_scan": 4096, "scan_sleep_millisecs": 10000, "alloc_sleep_millisecs": 60000,
    "defrag": 1, "max_ptes_none": 511, "max_ptes_swap": 64, "max_ptes_shared": 256,
}
FAST = {"pages_to_scan": 65536, "scan_sleep_millisecs": 0}


# ------------------------------------------------------------------------------------------
# Contenders


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    kind: str  # "kernel" | "hugepaged"
    settings: dict = field(default_factory=dict)  # kernel knobs, or hugepaged --set values
    bounded: bool = False  # measured over a bounded window, the rest projected

    @property
    def is_kernel(self) -> bool:
        return self.kind == "kernel"


CONTENDERS = (
    Contender("kernel-defaults", "kernel khugepaged, defaults", "kernel",
              {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000}, bounded=True),
    Contender("kernel-tuned", "kernel khugepaged, 65536 pages / 0 ms", "kernel", dict(FAST)),
    Contender("hugepaged-defaults", "hugepaged, defaults", "hugepaged", {}),
    Contender("hugepaged-tuned", "hugepaged, 65536 pages / 0 ms / no CPU cap", "hugepaged",
              {**FAST, "max_cpu_percent": 0}),
)


# ------------------------------------------------------------------------------------------
# Kernel knobs (saved and restored by compare.py with helpers.saved_thp around the whole run)


def write_knob(name: str, value) -> None:
    path = H.THP_DIR / "enabled" if name == "enabled" else H.KHUGEPAGED_DIR / name
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read_counter(name: str) -> int:
    return int((H.KHUGEPAGED_DIR / name).read_text())


def vmstat(*names: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        k, _, v = line.partition(" ")
        if k in names:
            out[k] = int(v)
    return out


def buddyinfo() -> dict[str, list[int]]:
    """Free blocks per order, per zone ("DMA", "DMA32", "Normal", ...)."""
    zones = {}
    for line in Path("/proc/buddyinfo").read_text().splitlines():
        parts = line.split()
        zones[f"{parts[1].rstrip(',')}:{parts[3]}"] = [int(x) for x in parts[4:]]
    return zones


def free_huge_blocks(zones: dict[str, list[int]] | None = None, usable_only: bool = True) -> int:
    """Free order>=9 blocks in order-9 units. usable_only leaves out ZONE_DMA: its 16 MiB are
    kept from user allocations by lowmem_reserve, so its blocks can never back a THP."""
    zones = buddyinfo() if zones is None else zones
    total = 0
    for name, counts in zones.items():
        if usable_only and name.endswith(":DMA"):
            continue
        total += sum(c << (o - 9) for o, c in enumerate(counts) if o >= 9)
    return total


def meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# ------------------------------------------------------------------------------------------
# CPU of a process or kernel thread


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/PID/stat (all threads of a process, also exited ones)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def sched_cpu_seconds(pid: int) -> float:
    """Time on CPU from /proc/PID/task/*/schedstat (ns resolution; live threads only)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (schedstat) per thread, keyed "tid:comm"."""
    out = {}
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except OSError:
            continue
        out[f"{tid}:{comm}"] = round(ns / 1e9, 4)
    return out


def find_khugepaged() -> int | None:
    """The pid of the [khugepaged] kernel thread (it exists only while enabled != never)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        flags = int(text.rsplit(")", 1)[1].split()[6])
        if comm == "khugepaged" and flags & PF_KTHREAD:
            return int(d)
    return None


def rss_anon_kb(pid: int) -> int:
    """Anonymous memory (kB) from /proc/PID/smaps_rollup: counted from the page tables, where
    /proc/PID/status's RssAnon is an approximate per-CPU counter."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise LookupError(f"no Anonymous in /proc/{pid}/smaps_rollup")


# ------------------------------------------------------------------------------------------
# Coverage: PAGEMAP_SCAN for PAGE_IS_HUGE over the target's ranges (~5 ms per 4 GiB)

PAGEMAP_SCAN = 0xC0606610
PAGE_IS_HUGE = 1 << 6
_SCAN_ARG = struct.Struct("<12Q")


class HugeProbe:
    """Bytes of [start, end) ranges of a process that are PMD-mapped, read in-kernel."""

    def __init__(self, pid: int, ranges: list[tuple[int, int]]) -> None:
        self.pid = pid
        self.ranges = ranges
        self.total = sum(e - s for s, e in ranges)
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.buf = np.zeros((4096, 3), dtype=np.uint64)

    def huge_bytes(self) -> int:
        total = 0
        for start, end in self.ranges:
            addr = start
            while addr < end:
                arg = bytearray(_SCAN_ARG.pack(_SCAN_ARG.size, 0, addr, end, 0,
                                               self.buf.ctypes.data, len(self.buf), 0, 0,
                                               PAGE_IS_HUGE, 0, PAGE_IS_HUGE))
                n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg, True)
                if n:
                    r = self.buf[:n]
                    total += int((r[:, 1] - r[:, 0]).sum())
                walk_end = _SCAN_ARG.unpack(arg)[4]
                if n < len(self.buf) or walk_end <= addr:
                    break
                addr = walk_end
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def independent_huge_windows(pid: int, ranges: list[tuple[int, int]]) -> int:
    """tests/helpers.pmd_mapped_windows: PFNs consecutive + kpageflags THP head, per window."""
    return sum(sum(H.pmd_mapped_windows(pid, s, e)) for s, e in ranges)


# ------------------------------------------------------------------------------------------
# `hugepaged run` as a child process, spoken to over its control socket

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Daemon:
    """`python -m hugepaged run --socket TMP --pid P... --set K=V... --config EMPTY`.

    stderr (JSON log lines) goes to a file in the run's work directory. The child gets
    SIGTERM if this process dies, so no daemon outlives the benchmark."""

    def __init__(self, pids: list[int], sets: dict, config: str, workdir: str,
                 log_level: str = "info") -> None:
        self.dir = tempfile.mkdtemp(prefix="daemon-", dir=workdir)
        self.socket = os.path.join(self.dir, "hugepaged.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.cmd = [sys.executable, "-m", "hugepaged", "run", "--socket", self.socket,
                    "--config", config, "--log-format", "json", "--log-level", log_level]
        for pid in pids:
            self.cmd += ["--pid", str(pid)]
        for k, v in sets.items():
            self.cmd += ["--set", f"{k}={v}"]
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 30.0, tick=None) -> Daemon:
        """Start it and wait until its control socket accepts connections (its first pass
        may be under way: the reply to a request would wait for that pass to end); tick() is
        called meanwhile."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, cwd="/",
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hugepaged exited with {self.proc.returncode}: "
                                   + self.log_tail())
            if tick is not None:
                tick()
            if os.path.exists(self.socket):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(self.socket)
                        return self
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise RuntimeError("hugepaged did not open its socket: " + self.log_tail())
            time.sleep(0.02)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, msg: dict, timeout: float = 10.0) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket)
            s.sendall(json.dumps(msg).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def status(self) -> dict:
        reply = self.request({"cmd": "status"})
        if not reply.get("ok"):
            raise RuntimeError(f"status refused: {reply}")
        return reply["status"]

    def stop(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM and wait: (exit status, seconds)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - t0

    def close(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
        return ""

    def log_records(self) -> list[dict]:
        out = []
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


# ------------------------------------------------------------------------------------------
# The collapser under test


class Collapser:
    """One contender at work: the kernel's khugepaged with knobs set, or a `hugepaged run`."""

    def __init__(self, contender: Contender, ctx: Context) -> None:
        self.c, self.ctx = contender, ctx
        self.daemon: Daemon | None = None
        self.kpid: int | None = None
        self.cpu0 = (0.0, 0.0)
        self.counters0: dict = {}
        self.info: dict = {}

    def prepare(self) -> None:
        """Before the target exists: kernel at `madvise` for the kernel contenders (so the
        target's MADV_HUGEPAGE registers it with khugepaged), at `never` for hugepaged (the
        MADV_HUGEPAGE then registers nothing and the khugepaged thread is stopped)."""
        for k, v in KERNEL_DEFAULTS.items():
            write_knob(k, v)
        write_knob("enabled", "madvise" if self.c.is_kernel else "never")

    def start(self, pids: list[int], tick=None) -> None:
        self.counters0 = {"pages_collapsed": read_counter("pages_collapsed"),
                          "full_scans": read_counter("full_scans"),
                          **vmstat("thp_collapse_alloc", "thp_collapse_alloc_failed")}
        if self.c.is_kernel:
            self.kpid = find_khugepaged()
            if self.kpid is None:
                raise RuntimeError("no [khugepaged] thread although enabled=madvise")
            self.cpu0 = self._raw_cpu()
            for k, v in self.c.settings.items():  # scan_sleep_millisecs last: wakes the thread
                write_knob(k, v)
        else:
            sets = {"enabled": "madvise", **self.c.settings}
            self.daemon = Daemon(pids, sets, self.ctx.empty_config, self.ctx.workdir)
            self.daemon.start(timeout=30, tick=tick)
            self.cpu0 = (0.0, 0.0)  # from the process's start; start-up subtracted later

    def _raw_cpu(self) -> tuple[float, float]:
        pid = self.kpid if self.c.is_kernel else self.daemon.pid
        try:
            return stat_cpu_seconds(pid), sched_cpu_seconds(pid)
        except FileNotFoundError:  # not yet, or no longer
            return self.cpu0

    def cpu(self) -> tuple[float, float]:
        """(stat, schedstat) CPU seconds spent since start()."""
        s, n = self._raw_cpu()
        return s - self.cpu0[0], n - self.cpu0[1]

    def alloc_failures(self) -> int:
        if self.c.is_kernel:
            return (vmstat("thp_collapse_alloc_failed")["thp_collapse_alloc_failed"]
                    - self.counters0["thp_collapse_alloc_failed"])
        return int(self.daemon.status()["counters"].get("alloc_backoffs", 0))

    def alive(self) -> bool:
        return self.c.is_kernel or self.daemon.alive()

    def stop(self) -> dict:
        info = {"kernel_pages_collapsed": read_counter("pages_collapsed")
                - self.counters0["pages_collapsed"],
                "kernel_full_scans": read_counter("full_scans") - self.counters0["full_scans"]}
        v = vmstat("thp_collapse_alloc", "thp_collapse_alloc_failed")
        info.update({k: v[k] - self.counters0[k] for k in v})
        if self.c.is_kernel:
            for k in self.c.settings:
                write_knob(k, KERNEL_DEFAULTS[k])
        elif self.daemon is not None:
            try:
                st = self.daemon.status()
                info["daemon_status"] = {k: st.get(k) for k in
                                         ("counters", "results", "collapse_failures",
                                          "tunables", "cpu_seconds", "registered")}
                info["daemon_threads"] = thread_cpu(self.daemon.pid)
                rc, took = self.daemon.stop()
                info["daemon_exit"] = {"status": rc, "seconds": round(took, 3)}
            except Exception as err:  # noqa: BLE001 - record, then make sure it is gone
                info["daemon_error"] = repr(err)
            finally:
                self.daemon.close()
        self.info = info
        return info


# ------------------------------------------------------------------------------------------
# Timelines


@dataclass
class Sample:
    t: float  # seconds since the scenario's time zero
    huge: int  # bytes PMD-mapped
    cpu: float  # collapser CPU (stat), seconds since start
    cpu_ns: float  # collapser CPU (schedstat), seconds since start


def sampler(col: Collapser, probe: HugeProbe, t0: float, samples: list[Sample]):
    """A tick for Collapser.start: samples coverage while hugepaged starts up."""
    def tick() -> None:
        c, n = col.cpu() if col.daemon is not None and col.daemon.proc is not None \
            else (0.0, 0.0)
        samples.append(Sample(time.monotonic() - t0, probe.huge_bytes(), c, n))
    return tick


def watch(col: Collapser, probe: HugeProbe, t0: float, until: float, poll: float,
          samples: list[Sample] | None = None, stop_full: bool = True,
          tick=None, min_rises: int = 0, hard_until: float | None = None) -> list[Sample]:
    """Poll coverage and CPU until the target is fully covered or `until` (monotonic).

    With min_rises, a window that has seen fewer rises of coverage than that (the kernel's
    defaults: one every 10 s) goes on until it has, or until hard_until: a projection needs
    at least two intervals between rises."""
    samples = [] if samples is None else samples
    rises = sum(1 for a, b in zip(samples, samples[1:], strict=False) if b.huge > a.huge)
    while True:
        now = time.monotonic()
        h = probe.huge_bytes()
        c, n = col.cpu()
        if samples and h > samples[-1].huge:
            rises += 1
        samples.append(Sample(now - t0, h, c, n))
        if tick is not None:
            tick(now)
        if stop_full and h >= probe.total:
            return samples
        if now >= until and (rises >= min_rises or now >= (hard_until or until)):
            return samples
        if not col.alive():
            raise RuntimeError("the collapser died: " + col.daemon.log_tail())
        time.sleep(max(0.0, poll - (time.monotonic() - now)))


def time_to(samples: list[Sample], level: float) -> float | None:
    """First time huge >= level (bytes), interpolated between the two samples around it."""
    prev = None
    for s in samples:
        if s.huge >= level:
            if prev is None or s.huge == prev.huge:
                return s.t
            f = (level - prev.huge) / (s.huge - prev.huge)
            return prev.t + f * (s.t - prev.t)
        prev = s
    return None


def value_at(samples: list[Sample], t: float, attr: str) -> float:
    xs = [s.t for s in samples]
    ys = [getattr(s, attr) for s in samples]
    return float(np.interp(t, xs, ys))


def projection(samples: list[Sample], total: int) -> dict | None:
    """Rate from the collapse steps seen in the window: (h_last - h_first) / (t_last - t_first)
    over the times coverage rose; the remaining coverage is extrapolated at that rate."""
    rises = [(b.t, b.huge) for a, b in zip(samples, samples[1:], strict=False)
             if b.huge > a.huge]
    if not rises:
        return None
    (t1, h1), (tk, hk) = rises[0], rises[-1]
    if len(rises) < 2 or tk <= t1:
        return None  # one step says nothing about the pace
    rate = (hk - h1) / (tk - t1)
    return {"rate_bytes_per_s": rate, "t_last": tk, "h_last": hk,
            "method": "coverage rises in the window: (last - first) / (t_last - t_first)"}


def coverage_times(samples: list[Sample], total: int, bounded: bool,
                   levels=(0.5, 0.9, 0.99, 1.0)) -> dict:
    """{"50": {"seconds": x, "projected": bool} | None, ...}"""
    proj = projection(samples, total) if bounded else None
    out = {}
    for lv in levels:
        key = f"{round(lv * 100):d}"
        t = time_to(samples, lv * total)
        if t is not None:
            out[key] = {"seconds": t, "projected": False}
        elif proj is not None and proj["rate_bytes_per_s"] > 0:
            t = proj["t_last"] + (lv * total - proj["h_last"]) / proj["rate_bytes_per_s"]
            out[key] = {"seconds": t, "projected": True}
        else:
            out[key] = {"seconds": None, "projected": False,
                        "not_reached_within": samples[-1].t if samples else 0.0}
    return out


def summarise(samples: list[Sample], total: int, bounded: bool, h_start: int,
              cpu_offset: tuple[float, float] = (0.0, 0.0), t_from: float = 0.0) -> dict:
    """Coverage times, CPU until full coverage (or the window's end), CPU per huge page.

    Times count from the samples' zero. CPU counts from start() (or from t_from when given)
    and huge pages from h_start, the coverage when the CPU count began. cpu_offset
    (stat, schedstat) is subtracted: hugepaged's start-up, measured apart."""
    times = coverage_times(samples, total, bounded)
    t_full = times["100"]["seconds"] if not times["100"].get("projected") else None
    end = t_full if t_full is not None else samples[-1].t
    if t_from > 0:
        h_start = int(value_at(samples, t_from, "huge"))
    cpu0 = value_at(samples, t_from, "cpu") if t_from > 0 else 0.0
    ns0 = value_at(samples, t_from, "cpu_ns") if t_from > 0 else 0.0
    cpu = max(0.0, value_at(samples, end, "cpu") - cpu0 - cpu_offset[0])
    cpu_ns = max(0.0, value_at(samples, end, "cpu_ns") - ns0 - cpu_offset[1])
    huge_end = value_at(samples, end, "huge")
    collapsed = round((huge_end - h_start) / HPAGE)
    out = {
        "times": times, "measured_seconds": samples[-1].t if samples else 0.0,
        "end_seconds": end, "covered_pct": 100.0 * samples[-1].huge / total if total else 0.0,
        "covered_pct_at_start": 100.0 * h_start / total if total else 0.0,
        "collapsed_windows": collapsed, "cpu_seconds": cpu, "cpu_seconds_schedstat": cpu_ns,
        "cpu_ms_per_hpage": 1000 * cpu_ns / collapsed if collapsed > 0 else None,
        "cpu_ms_per_hpage_stat": 1000 * cpu / collapsed if collapsed > 0 else None,
    }
    if bounded and times["100"].get("projected") and collapsed > 0:
        windows_left = (total - huge_end) / HPAGE
        out["cpu_seconds_projected_total"] = cpu_ns + windows_left * cpu_ns / collapsed
    return out


def samples_json(samples: list[Sample], total: int) -> list[list[float]]:
    return [[round(s.t, 3), round(100.0 * s.huge / total, 3), round(s.cpu, 3),
             round(s.cpu_ns, 4)] for s in samples]


REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def quiesce(min_wait: float = 2.0, max_wait: float = 20.0) -> dict:
    """Let the machine settle before a time zero: at least min_wait seconds, and, where the
    kernel has free page reporting (a VM handing free memory back to its host), until the
    reported total has not moved for 2 s. Free 2 MiB blocks are then in the same state for
    every contender (on such a VM the first touch of a reported block costs host faults, and
    that cost lands in the collapse's copy)."""
    t0 = time.monotonic()
    time.sleep(min_wait)
    if not REPORTED_KIB.exists():
        return {"seconds": round(time.monotonic() - t0, 2)}
    first = last = int(REPORTED_KIB.read_text())
    stable_since = time.monotonic()
    while time.monotonic() - t0 < max_wait:
        time.sleep(0.5)
        now = int(REPORTED_KIB.read_text())
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 2.0:
            break
    return {"seconds": round(time.monotonic() - t0, 2), "reported_mib": (last - first) >> 10}


# ------------------------------------------------------------------------------------------
# The run's context


@dataclass
class Context:
    quick: bool
    gib: float
    workdir: str
    log: callable
    empty_config: str = ""
    hugepaged_startup_cpu: tuple[float, float] = (0.0, 0.0)  # (stat, schedstat) seconds
    startup_detail: dict = field(default_factory=dict)

    def p(self, quick_value, full_value):
        return quick_value if self.quick else full_value


def make_context(quick: bool, gib: float, log) -> Context:
    workdir = tempfile.mkdtemp(prefix="hugepaged-bench-")
    empty = os.path.join(workdir, "empty.toml")
    Path(empty).write_text("# hugepaged defaults: no settings\n")
    return Context(quick=quick, gib=gib, workdir=workdir, log=log, empty_config=empty)


def measure_daemon_startup(ctx: Context, repeat: int = 3) -> dict:
    """CPU a `hugepaged run` spends before it collapses anything: interpreter, imports, first
    empty pass. Targets a sleeping process with nothing eligible; median of `repeat`."""
    values = []
    for _ in range(repeat):
        sleeper = subprocess.Popen(["sleep", "600"])
        try:
            with Daemon([sleeper.pid], {"enabled": "madvise"}, ctx.empty_config,
                        ctx.workdir) as d:
                time.sleep(0.5)
                values.append((stat_cpu_seconds(d.pid), sched_cpu_seconds(d.pid)))
                d.stop()
        finally:
            sleeper.kill()
            sleeper.wait()
    values.sort(key=lambda v: v[1])
    ctx.hugepaged_startup_cpu = values[len(values) // 2]
    ctx.startup_detail = {"median_cpu_seconds_stat": ctx.hugepaged_startup_cpu[0],
                          "median_cpu_seconds_schedstat": ctx.hugepaged_startup_cpu[1],
                          "values": values}
    return ctx.startup_detail


# ------------------------------------------------------------------------------------------
# Machine description


def machine() -> dict:
    u = platform.uname()
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    thp = {"enabled": H.read_enabled(), "defrag": H.read_knob("thp_defrag")}
    import hashlib
    h = hashlib.sha256()
    for p in sorted((ROOT / "src" / "hugepaged").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    import matplotlib
    return {
        "hostname": socket.gethostname(), "uname": " ".join(u), "kernel": u.release,
        "arch": u.machine, "cpu_model": cpu, "cpus": os.cpu_count(),
        "mem_total_gib": round(meminfo_kb("MemTotal") / (1 << 20), 2),
        "swap_total_gib": round(meminfo_kb("SwapTotal") / (1 << 20), 2),
        "python": platform.python_version(), "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "src_sha256": h.hexdigest()[:16],  # the tree measured, uncommitted changes included
        "git_dirty_files": [ln[3:] for ln in git("status", "--porcelain").splitlines()
                            if ln[3:].startswith("src/")],
        "thp_at_start": thp,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine_tag(m: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-",
                  f"{m['hostname']}-{m['cpus']}cpu-{round(m['mem_total_gib'])}g")


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=lambda o: o.__dict__ if hasattr(o, "__dict__")
                      else str(o))
