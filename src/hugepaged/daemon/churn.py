"""Split churn: windows hugepaged collapsed that come back split (hugepaged's own).

An allocator that purges with MADV_DONTNEED (jemalloc, Redis) splits the PMD of a huge page
it partly frees, and reclaim or the kernel's underused-THP shrinker (6.12) split huge pages
too. Collapsing such a window again at once refills what the application just gave back, and
fights the kernel. So every window the daemon collapses is remembered; one found split on a
later visit is counted (pages_split_after_collapse, per target too) and held back: for a
while that doubles with every new split of it (SPLIT_BACKOFF_MIN up to SPLIT_BACKOFF_MAX), or
for good where its target says on_split = "leave". A split window whose zero-page PTEs are
more than the kernel's max_ptes_none while the kernel's shrink_underused is on is what that
shrinker splits: it is held (UNDERUSED_SPLIT) until its zero-filled share falls to what the
shrinker leaves alone.

A split is told apart from memory mapped anew at the same addresses (an allocator that
unmaps and maps again, a remap) by the frames: a split huge page's pages keep the frames of
the huge page the collapse made (`head`), new memory has others; a window whose pages are no
longer that huge page's is forgotten, not counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from hugepaged.errors import HugepagedError
from hugepaged.kernel.pagemap import PM_PFN_MASK
from hugepaged.results import ScanResult

log = logging.getLogger("hugepaged")
SPLIT_BACKOFF_MIN = 60.0  # seconds a window is held after its first split
SPLIT_BACKOFF_MAX = 4 * 3600.0
KERNEL_EVERY = 10.0  # seconds the kernel's shrinker settings are reused
GONE = frozenset({ScanResult.PMD_NONE, ScanResult.PMD_NULL})  # freed whole: no split


@dataclass
class Collapsed:
    """One window this daemon collapsed: PMD-mapped as collapsed, or split and held."""

    head: int = 0  # the first frame of the huge page the collapse made (0: unknown)
    split: bool = False
    level: int = 0  # splits so far; the hold doubles with each
    until: float = 0.0  # held until then
    underused: bool = False  # held while its zero-page PTEs exceed the shrinker's limit
    seen: int = 0  # the visit that last met it (entries no visit meets are dropped)


class SplitWatch:
    """The daemon's memory of the windows it collapsed, per slot (slot.collapsed)."""

    def __init__(self, kernel, counters, clock: Callable[[], float]) -> None:
        self.kernel, self.counters, self.clock = kernel, counters, clock
        self._limit: tuple[float, int | None] | None = None

    def shrinker_limit(self) -> int | None:
        """The zero-filled pages above which the kernel's shrinker splits a THP (its own
        khugepaged/max_ptes_none), or None when the shrinker is off or absent."""
        now = self.clock()
        if self._limit is None or now - self._limit[0] >= KERNEL_EVERY:
            try:
                on = self.kernel.thp.shrink_underused()
                limit = int(self.kernel.thp.read("max_ptes_none")) if on else None
            except (OSError, ValueError):
                limit = None
            self._limit = (now, limit)
        return self._limit[1]

    def collapsed(self, slot, address: int, visit: int) -> None:
        """Remember a window just collapsed, with the first frame of its huge page."""
        head = self._head(slot, address)
        e = slot.collapsed.get(address)
        if e is None:
            slot.collapsed[address] = Collapsed(head=head, seen=visit)
        else:
            e.head, e.split, e.until, e.underused, e.seen = head, False, 0.0, False, visit

    def _head(self, slot, address: int) -> int:
        try:
            with self.kernel.pagemap(slot.mm_pid or slot.pid) as pm:
                entry = int(pm.read(address, address + self.kernel.geometry.page_size)[0])
        except (HugepagedError, OSError, ValueError, IndexError):
            return 0
        return entry & PM_PFN_MASK if entry >> 63 else 0

    def _same_pages(self, e: Collapsed, first_pfn: int | None) -> bool:
        """Whether the window's pages are (still) those of the huge page collapsed there."""
        if not e.head or not first_pfn:
            return True  # unknown: take it for a split
        return e.head <= first_pfn < e.head + self.kernel.geometry.pmd_nr

    def held(self, slot, state, control, address: int, code: int, zero: int | None,
             visit: int, first_pfn: int | None = None) -> ScanResult | None:
        """This window's result if it is held back (SPLIT_BACKOFF, UNDERUSED_SPLIT), else
        None; a window found split since its collapse is counted here, once per split."""
        e = slot.collapsed.get(address)
        if e is None:
            return None
        e.seen = visit
        if code in GONE or not self._same_pages(e, first_pfn):
            # Freed whole, or other memory there now: nothing split, nothing to hold.
            del slot.collapsed[address]
            return None
        if not e.split:
            if code == ScanResult.PMD_MAPPED:
                return None
            self._split(slot, state, control, address, e, zero)
        if e.underused:
            limit = self.shrinker_limit()
            if limit is not None and zero is not None and zero > limit:
                return ScanResult.UNDERUSED_SPLIT
            e.underused = False
        if self.clock() < e.until:
            return ScanResult.SPLIT_BACKOFF
        return None

    def _split(self, slot, state, control, address: int, e: Collapsed,
               zero: int | None) -> None:
        e.split, e.level = True, e.level + 1
        limit = self.shrinker_limit()
        e.underused = limit is not None and zero is not None and zero > limit
        if control.on_split == "leave":
            e.until = math.inf
        else:
            e.until = self.clock() + min(SPLIT_BACKOFF_MAX,
                                         SPLIT_BACKOFF_MIN * 2 ** (e.level - 1))
        self.counters.pages_split_after_collapse += 1
        if state is not None:
            state.splits += 1
        log.debug("pid %d %#x: split after collapse (%d time(s)); held %s", slot.pid, address,
                  e.level, "while underused" if e.underused else
                  ("for good" if e.until == math.inf else f"{e.until - self.clock():.0f} s"),
                  extra={"event": "split_after_collapse", "pid": slot.pid,
                         "address": hex(address), "splits": e.level,
                         "underused": e.underused, "on_split": control.on_split})

    def finished(self, slot, visit: int) -> None:
        """A visit reached the end: windows it did not meet are gone (unmapped, ineligible);
        the slot is due again when the first hold ends (slot.hold_until)."""
        for address in [a for a, e in slot.collapsed.items() if e.seen != visit]:
            del slot.collapsed[address]
        now = self.clock()
        ends = [e.until for e in slot.collapsed.values()
                if e.split and not e.underused and now < e.until < math.inf]
        slot.hold_until = min(ends, default=0.0)

    def held_counts(self, slots) -> dict[str, int]:
        """Windows held now, by why: for status and the metrics."""
        now, out = self.clock(), {"split_backoff": 0, "underused": 0}
        for slot in slots:
            for e in list(slot.collapsed.values()):
                if e.split and e.underused:
                    out["underused"] += 1
                elif e.split and now < e.until:
                    out["split_backoff"] += 1
        return out
