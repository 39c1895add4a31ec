"""The kernel-facing layer: the only code that touches /proc, /sys or a syscall.

Everything takes its root paths as parameters so tests can point it at a fixture tree
where this machine cannot produce a state (swap, for example).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hugepaged.kernel.geometry import Geometry, running_geometry
from hugepaged.kernel.pressure import Pressure
from hugepaged.kernel.procfs import ProcFS
from hugepaged.kernel.sysfs import MmStats, ThpSysfs

if TYPE_CHECKING:
    from hugepaged.kernel.access import AccessSource
    from hugepaged.kernel.kpageflags import KPageFlags
    from hugepaged.kernel.pagemap import PageMap

_LAZY = {"KPageFlags": "hugepaged.kernel.kpageflags", "PageMap": "hugepaged.kernel.pagemap"}


def __getattr__(name: str):
    """KPageFlags and PageMap pull in numpy: imported when first used, so that commands
    that read no page state start fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


@dataclass
class Kernel:
    """Roots of the kernel interfaces, and factories for what reads them."""

    proc_root: str = "/proc"
    sys_root: str = "/sys"
    page_idle_path: str = ""  # idle page tracking's bitmap; "" is the one under sys_root
    procfs: ProcFS = field(init=False)
    thp: ThpSysfs = field(init=False)
    mm: MmStats = field(init=False)
    pressure: Pressure = field(init=False)

    def __post_init__(self) -> None:
        self.procfs = ProcFS(self.proc_root)
        self.thp = ThpSysfs(self.sys_root)
        self.mm = MmStats(self.proc_root, lambda: self.geometry.pmd_order)
        self.pressure = Pressure(self.proc_root)
        self._scan_ok: bool | None = None
        self._drain = None
        self._geometry: Geometry | None = None

    @property
    def geometry(self) -> Geometry:
        """Page and PMD sizes, read once."""
        if self._geometry is None:
            self._geometry = running_geometry(self.sys_root)
        return self._geometry

    def pagemap(self, pid: int) -> PageMap:
        from hugepaged.kernel.pagemap import PageMap

        return PageMap(self.proc_root, pid, self.geometry.page_shift)

    def kpageflags(self) -> KPageFlags:
        from hugepaged.kernel.kpageflags import KPageFlags

        return KPageFlags(self.proc_root)

    def access_source(self, *, mark: bool = False) -> AccessSource | None:
        """Which pages were touched (LACK_REFERENCED_PAGE needs it), chosen once here
        (kernel/access.py); None where this kernel offers no source."""
        from hugepaged.kernel.access import choose

        return choose(self.sys_root, self.page_idle_path, mark=mark)

    def drain_lru(self) -> None:
        """lru_add_drain_all(), so kpageflags shows fresh pages on their LRU lists."""
        if self._drain is None:
            from hugepaged.kernel.madvise import LruDrain

            self._drain = LruDrain(self.geometry.pmd_size)
        cleared = self._drain.cleared
        self._drain()
        if self._drain.cleared != cleared:
            logging.getLogger("hugepaged").warning(
                "THP was disabled for hugepaged itself (PR_SET_THP_DISABLE, inherited): "
                "re-enabled for our own process, or the LRU drain would not happen",
                extra={"event": "thp_disabled_self"})

    def has_pagemap_scan(self) -> bool:
        if self._scan_ok is None:
            from hugepaged.kernel.pagemap import pagemap_scan_supported

            self._scan_ok = pagemap_scan_supported(self.proc_root, self.geometry.page_shift)
        return self._scan_ok


__all__ = ["Geometry", "Kernel", "KPageFlags", "PageMap", "ProcFS", "ThpSysfs", "MmStats"]
