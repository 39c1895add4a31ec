"""How much of a target is PMD-mapped, read without hugepaged's code.

PAGEMAP_SCAN for PAGE_IS_HUGE over the target's ranges (one ioctl per 4096 regions: cheap
enough to poll), cross-checked at the end of every run with kit/helpers.pmd_mapped_windows
(pagemap + kpageflags); and the target's anonymous memory, for its RSS growth.
"""

from __future__ import annotations

import fcntl
import os
import struct

import numpy as np

from kit.helpers import pmd_mapped_windows

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
    """kit/helpers.pmd_mapped_windows: PFNs consecutive + kpageflags THP head, per window."""
    return sum(sum(pmd_mapped_windows(pid, s, e)) for s, e in ranges)


def rss_anon_kb(pid: int) -> int:
    """Anonymous memory (kB) from /proc/PID/smaps_rollup: counted from the page tables, where
    /proc/PID/status's RssAnon is an approximate per-CPU counter."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise LookupError(f"no Anonymous in /proc/{pid}/smaps_rollup")


def verify_into(result: dict, workload, ranges: list[tuple[int, int]]) -> None:
    """The end-of-run checks every scenario records: PMD-mapped windows counted apart from
    the probe, and the target's memory contents intact."""
    result["independent_huge_windows"] = independent_huge_windows(workload.pid, ranges)
    try:
        workload.verify()
        result["verified"] = True
    except AssertionError as err:
        result["verified"] = False
        result["verify_error"] = str(err)
