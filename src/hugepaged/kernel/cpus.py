"""CPU lists (the kernel's cpulist format, "0-3,8") and which CPUs a thread may run on."""

from __future__ import annotations

import os


def parse_cpulist(text: str) -> list[int]:
    """"0-3,8" -> [0, 1, 2, 3, 8]; "" -> []. Raises ValueError on anything else (ranges must
    ascend, numbers be decimal), as the kernel's bitmap_parselist does."""
    out: set[int] = set()
    if not text:
        return []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"not a CPU list: {text!r}")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"not a CPU list: {text!r} ({part}: descending)")
        out.update(range(a, b + 1))
    return sorted(out)


def format_cpulist(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8"."""
    parts, run = [], []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def online_cpus(sys_root: str = "/sys") -> list[int]:
    """/sys/devices/system/cpu/online; this process's own allowed CPUs where it is missing."""
    try:
        with open(f"{sys_root}/devices/system/cpu/online") as f:
            return parse_cpulist(f.read().strip())
    except (OSError, ValueError):
        return sorted(os.sched_getaffinity(0))


def allowed_cpus() -> list[int]:
    """The CPUs the calling thread may run on now."""
    return sorted(os.sched_getaffinity(0))


def pin_thread(cpus: list[int]) -> None:
    """Run the calling thread on these CPUs only (0: the calling thread, not the process:
    sched_setaffinity(2) on Linux)."""
    os.sched_setaffinity(0, cpus)
