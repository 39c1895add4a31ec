"""The one CPU probe of the benchmarks: a process's or kernel thread's CPU, read from /proc.

Two clocks, both kept: /proc/PID/stat utime + stime (every thread, exited ones included, in
clock ticks) and /proc/PID/task/*/schedstat (live threads only, in ns). CPU per huge page
uses schedstat, whose resolution a few milliseconds of collapses need.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000


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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(stat, schedstat) CPU seconds of `pid` so far."""
    return stat_cpu_seconds(pid), sched_cpu_seconds(pid)


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
