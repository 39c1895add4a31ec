"""Anonymous mTHP by size per registered process (hugepaged's own figure, for the metrics).

smaps has no per-size figure for folios smaller than a PMD; pagemap and kpageflags do
(scan.usage.anon_mthp_kb, what `scan` reports). Counting them reads every present page of a
process, so the daemon does it where it has the process's VMAs already, at the end of a full
visit, at most once per MTHP_EVERY seconds per process, on its own thread (its CPU is charged
to the cap like any other work of the loop), and not at all while the kernel's own per-size
counters (hugepages-<size>kB/stats/nr_anon) say no such folio exists on the machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hugepaged.errors import HugepagedError
from hugepaged.scan.usage import anon_mthp_kb, mthp_in_system

if TYPE_CHECKING:
    from hugepaged.kernel import Kernel, KPageFlags

    from .registry import MmSlot

MTHP_EVERY = 30.0  # seconds between two counts of one process
SYSTEM_EVERY = 1.0  # seconds a reading of the kernel's nr_anon counters is reused


class MthpSampler:
    """Keeps `slot.anon_mthp_kb` (folio kB -> kB mapped) as of a recent visit."""

    def __init__(self, kernel: Kernel, every: float = MTHP_EVERY) -> None:
        self.kernel, self.every = kernel, every
        self._system: tuple[float, bool] | None = None
        self.nr_anon: dict[int, int] = {}

    def _any(self, now: float) -> bool:
        if self._system is None or now - self._system[0] >= SYSTEM_EVERY:
            try:
                self.nr_anon = self.kernel.thp.nr_anon()
            except OSError:
                self.nr_anon = {}
            self._system = (now, mthp_in_system(self.nr_anon,
                                                self.kernel.geometry.pmd_size >> 10))
        return self._system[1]

    def visited(self, slot: MmSlot, kpf: KPageFlags, now: float) -> None:
        """At the end of a full visit, while its VMAs are at hand."""
        if slot.visit is None or (slot.mthp_at and now - slot.mthp_at < self.every):
            return
        slot.mthp_at = now
        if not self._any(now):
            slot.anon_mthp_kb = {}
            return
        try:
            counts = anon_mthp_kb(self.kernel, slot.mm_pid or slot.pid,
                                  [*slot.visit[1], *slot.small_anon], kpf)
        except (HugepagedError, OSError, ValueError):  # gone, unreadable: the next visit tells
            return
        slot.anon_mthp_kb = dict(counts)
