"""Scenario 3, does it pay: a TLB-sensitive workload while each contender works.

tlbreader.py maps N/2 GiB in 4 KiB pages and reads random words from it, reporting its
throughput about every second. Per contender, on a fresh reader:
1. baseline: BASELINE seconds of reports with 4 KiB pages (the first report is skipped);
2. the reader does MADV_HUGEPAGE (time zero) and the contender starts; it runs until the
   region is fully PMD-mapped (or the bounded window of the kernel's defaults ends), and AFTER
   seconds more are recorded ("after");
3. the contender stops; whatever is left is collapsed by the benchmark itself with
   process_madvise(MADV_COLLAPSE), and HUGE seconds are recorded: the huge page throughput.
Time to 95%: from time zero to the end of the first one-second report from which a 3-report
mean is >= 95% of the huge page throughput (it got there and stayed; a lucky second does not
count). For a contender that does not get there within its window it is projected
from its projected coverage times with a mixing model: with a fraction c of the reads on
2 MiB pages, time per read = c / huge + (1 - c) / before.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from kit.helpers import HPAGE

from .collapser import Collapser
from .contenders import Contender
from .context import Context
from .coverage import HugeProbe, independent_huge_windows
from .machine import quiesce
from .timeline import Sample, sampler, samples_json, summarise, watch

MIB = 1 << 20

READER = Path(__file__).resolve().parent / "tlbreader.py"
_libc = ctypes.CDLL(None, use_errno=True)
SYS_process_madvise = 440
MADV_COLLAPSE = 25


def target_gib(ctx: Context) -> float:
    return max(0.25, ctx.gib / 2)


def describe(ctx: Context) -> dict:
    return {"target_gib": target_gib(ctx), "reader": "np.take of 1 Mi random uint64 per round"}


class Reader:
    """tlbreader.py as a child; a thread collects its reports."""

    def __init__(self, gib: float) -> None:
        self.proc = subprocess.Popen([sys.executable, str(READER), json.dumps({"gib": gib})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        r, _, _ = select.select([self.proc.stdout], [], [], 300)
        line = self.proc.stdout.readline() if r else b""
        if not line:
            self.close()
            raise RuntimeError("tlbreader did not start")
        info = json.loads(line)
        self.pid, self.start, self.end = info["pid"], info["start"], info["end"]
        self.reports: list[tuple[float, float]] = []
        self.replies: list[dict] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "reads_per_s" in msg:
                    self.reports.append((msg["t"], msg["reads_per_s"]))
                else:
                    self.replies.append(msg)
                self.cond.notify_all()

    def command(self, cmd: str, key: str, timeout: float = 120.0) -> dict:
        with self.cond:
            n = len(self.replies)
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.replies[n:]:
                    if key in msg:
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"tlbreader: no answer to {cmd}")
                self.cond.wait(left)

    def wait_reports(self, after: float, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while sum(1 for t, _ in self.reports if t > after) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("tlbreader: no reports")
                self.cond.wait(left)

    def mean(self, t_from: float, t_to: float) -> float | None:
        """Median of the reports in (t_from, t_to]: a second disturbed by another process on
        this shared machine does not move it."""
        with self.cond:
            vals = [r for t, r in self.reports if t_from < t <= t_to]
        return float(np.median(vals)) if vals else None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"exit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def collapse_all(pid: int, start: int, end: int) -> None:
    """The rest, with process_madvise(MADV_COLLAPSE), 256 MiB per call (calls are capped at
    MAX_RW_COUNT bytes)."""
    fd = os.pidfd_open(pid)
    try:
        step = 256 * MIB
        for a in range(start, end, step):
            iov = (ctypes.c_uint64 * 2)(a, min(step, end - a))
            _libc.syscall(SYS_process_madvise, fd, iov, 1, MADV_COLLAPSE, 0)
    finally:
        os.close(fd)


def model_fraction(before: float, huge: float, share: float = 0.95) -> float:
    """Fraction of 2 MiB-mapped memory at which throughput reaches share * huge."""
    inv_b, inv_h = 1.0 / before, 1.0 / huge
    if inv_b <= inv_h:
        return 0.0
    return min(1.0, max(0.0, (inv_b - 1.0 / (share * huge)) / (inv_b - inv_h)))


def run(ctx: Context, c: Contender) -> dict:
    col = Collapser(c, ctx)
    col.prepare()
    gib = target_gib(ctx)
    baseline, after, huge_s = ctx.p(4.0, 6.0), ctx.p(3.0, 5.0), ctx.p(4.0, 6.0)
    window = ctx.p(20.0, 45.0) if c.bounded else ctx.p(240.0, 600.0)
    result: dict = {"contender": c.key, "label": c.label, "bounded": c.bounded,
                    "target_gib": gib, "window_seconds": window if c.bounded else None}
    reader = Reader(gib)
    probe = HugeProbe(reader.pid, [(reader.start, reader.end)])
    try:
        result["quiesce"] = quiesce()
        t_b = time.monotonic()
        reader.wait_reports(t_b, int(baseline) + 1)
        before = reader.mean(reader_next(reader, t_b), time.monotonic())
        h_start = probe.huge_bytes()
        t0 = reader.command("hugepage", "hugepage")["hugepage"]
        samples = [Sample(time.monotonic() - t0, h_start, 0.0, 0.0)]
        col.start([reader.pid], tick=sampler(col, probe, t0, samples))
        watch(col, probe, t0, t0 + window, 0.25 if c.bounded else 0.1, samples,
              min_rises=4 if c.bounded else 0, hard_until=t0 + 2 * window)
        t_done = t0 + samples[-1].t
        full = samples[-1].huge >= probe.total
        if full:
            reader.wait_reports(t_done, int(after) + 1)
            after_rate = reader.mean(reader_next(reader, t_done), time.monotonic())
        else:  # the window's last seconds
            after_rate = reader.mean(t_done - after, t_done)
        info = col.stop()
        t_c = time.monotonic()
        collapse_all(reader.pid, reader.start, reader.end)
        result["bench_collapse_seconds"] = time.monotonic() - t_c
        t_h = time.monotonic()
        reader.wait_reports(t_h, int(huge_s) + 1)
        huge_rate = reader.mean(reader_next(reader, t_h), time.monotonic())
        result["independent_huge_windows"] = independent_huge_windows(
            reader.pid, [(reader.start, reader.end)])
        result["verified"] = bool(reader.command("verify", "verify", 600)["verify"])
        with reader.cond:
            reports = [(round(t - t0, 3), round(r / 1e6, 3)) for t, r in reader.reports]
    finally:
        probe.close()
        col.close()
        reader.close()
    offset = ctx.hugepaged_startup_cpu if not c.is_kernel else (0.0, 0.0)
    result.update(summarise(samples, probe.total, c.bounded, h_start, cpu_offset=offset))
    cutoff = result["bench_collapse_at"] = t_c - t0  # later reports: the benchmark's collapse
    t95 = time_to_share([(t, r) for t, r in reports if t <= cutoff], 0.95 * huge_rate / 1e6)
    in_run = [r for t, r in reports if 0 < t <= samples[-1].t + 1.5]
    result.update({
        "target_windows": probe.total // HPAGE, "target_mib": probe.total // MIB,
        "reads_per_s_before": before, "reads_per_s_after": after_rate,
        "reads_per_s_huge": huge_rate,
        "reads_per_s_min_during": min(in_run) * 1e6 if in_run else None,
        "speedup_huge_over_before": huge_rate / before if before else None,
        "collapser": info, "samples": samples_json(samples, probe.total),
        "throughput": reports,
    })
    if t95 is not None:
        result["t95_throughput"] = {"seconds": t95, "projected": False}
    elif c.bounded:
        frac = model_fraction(before, huge_rate)
        times = result["times"]
        # projected coverage time at fraction `frac`, interpolated between the levels we have
        levels = [(0.0, 0.0)] + [(int(k) / 100, v["seconds"]) for k, v in times.items()
                                 if v.get("seconds") is not None]
        xs, ys = zip(*sorted(levels), strict=True)
        result["t95_throughput"] = {"seconds": float(np.interp(frac, xs, ys)),
                                    "projected": True, "coverage_needed": frac}
    else:  # never 3 seconds in a row at 95% while the contender ran
        result["t95_throughput"] = {"seconds": None, "projected": False,
                                    "not_reached_within": cutoff}
    return result


def time_to_share(reports: list[tuple[float, float]], level: float, n: int = 3) -> float | None:
    """End of the first report after time zero from which the mean of n reports reaches
    level: it got there and stayed; one lucky second does not count."""
    after = [(t, r) for t, r in reports if t > 0]
    for i in range(len(after) - n + 1):
        if np.mean([r for _, r in after[i:i + n]]) >= level:
            return after[i][0]
    return None


def reader_next(reader: Reader, t: float) -> float:
    """Start of the first full report interval after t (skip the one that straddles t)."""
    with reader.cond:
        ts = [x for x, _ in reader.reports if x > t]
    return ts[0] if ts else t

