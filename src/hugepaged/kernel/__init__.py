"""The kernel-facing layer: the only code that touches /proc, /sys or a syscall.

Everything takes its root paths as parameters so tests can point it at a fixture tree
where this machine cannot produce a state (swap, for example).
"""

from dataclasses import dataclass, field

from hugepaged.kernel.kpageflags import KPageFlags
from hugepaged.kernel.pagemap import PageMap, pagemap_scan_supported
from hugepaged.kernel.procfs import ProcFS
from hugepaged.kernel.sysfs import MmStats, ThpSysfs


@dataclass
class Kernel:
    """Roots of the kernel interfaces, and factories for what reads them."""

    proc_root: str = "/proc"
    sys_root: str = "/sys"
    procfs: ProcFS = field(init=False)
    thp: ThpSysfs = field(init=False)
    mm: MmStats = field(init=False)

    def __post_init__(self) -> None:
        self.procfs = ProcFS(self.proc_root)
        self.thp = ThpSysfs(self.sys_root)
        self.mm = MmStats(self.proc_root)
        self._scan_ok: bool | None = None
        self._drain = None

    def pagemap(self, pid: int) -> PageMap:
        return PageMap(self.proc_root, pid)

    def kpageflags(self) -> KPageFlags:
        return KPageFlags(self.proc_root)

    def drain_lru(self) -> None:
        """lru_add_drain_all(), so kpageflags shows fresh pages on their LRU lists."""
        if self._drain is None:
            from hugepaged.kernel.madvise import LruDrain

            self._drain = LruDrain()
        self._drain()

    def has_pagemap_scan(self) -> bool:
        if self._scan_ok is None:
            self._scan_ok = pagemap_scan_supported(self.proc_root)
        return self._scan_ok


__all__ = ["Kernel", "KPageFlags", "PageMap", "ProcFS", "ThpSysfs", "MmStats"]
