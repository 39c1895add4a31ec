"""Read one process's page state through the kernel layer and decide every window.

The reader half of khugepaged_scan_mm_slot: PAGEMAP_SCAN (where the kernel has it) tells
which windows are empty or already PMD-mapped without reading 512 entries each; only the
rest are read entry by entry, with kpageflags for their present frames.
"""

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from hugepaged.kernel import Kernel, KPageFlags
from hugepaged.kernel.kpageflags import KPF_COMPOUND_HEAD, KPF_THP, KPF_ZERO_PAGE
from hugepaged.kernel.pagemap import (
    PAGE_IS_HUGE,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
)
from hugepaged.kernel.procfs import Vma
from hugepaged.results import ScanResult
from hugepaged.scan.decide import HPAGE_PMD_NR, Limits, Verdicts, decide
from hugepaged.scan.eligibility import HPAGE_PMD_SIZE, aligned_range, uffd_armed, vma_skip_reason
from hugepaged.tunables import Tunables

HPAGE_SHIFT = 21
CHUNK_WINDOWS = 512  # 1 GiB of address space per read
_U = np.uint64
_STEPS = np.arange(HPAGE_PMD_NR, dtype=np.uint64)
_VERDICT_FIELDS = ("codes", "present", "none", "swap", "shared")


@dataclass
class VmaScan:
    """One VMA: why it was skipped, or its windows and their verdicts."""

    vma: Vma
    skip: str | None
    starts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    codes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int8))
    present: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass
class ProcessScan:
    """What `hugepaged scan` reports for one process."""

    pid: int
    comm: str
    anon_kb: int
    anon_huge_kb: int
    vmas: list[VmaScan]
    referenced_known: bool = False

    @property
    def eligible_windows(self) -> int:
        return sum(v.codes.size for v in self.vmas)

    def results(self) -> Counter:
        counts: Counter = Counter()
        for v in self.vmas:
            vals, nums = np.unique(v.codes, return_counts=True)
            counts.update({ScanResult(int(c)): int(k) for c, k in zip(vals, nums, strict=True)})
        return counts

    def windows(self, *codes: ScanResult) -> Iterator[tuple[int, ScanResult]]:
        """(address, result) of windows whose result is one of `codes` (all when none)."""
        wanted = {int(c) for c in codes}
        for v in self.vmas:
            for addr, code in zip(v.starts.tolist(), v.codes.tolist(), strict=True):
                if not wanted or code in wanted:
                    yield addr, ScanResult(code)

    @property
    def coverage(self) -> float:
        return 100.0 * self.anon_huge_kb / self.anon_kb if self.anon_kb else 0.0


def window_masks(regions: np.ndarray, start: int, nwin: int) -> tuple[np.ndarray, np.ndarray]:
    """Per window: touched by any region, and wholly PMD-mapped (PAGE_IS_HUGE)."""
    def cover(rows: np.ndarray) -> np.ndarray:
        diff = np.zeros(nwin + 1, dtype=np.int64)
        if rows.size:
            first = ((rows[:, 0] - start) >> HPAGE_SHIFT).astype(np.int64)
            last = ((rows[:, 1] - 1 - start) >> HPAGE_SHIFT).astype(np.int64)
            np.add.at(diff, first, 1)
            np.add.at(diff, last + 1, -1)
        return np.cumsum(diff[:nwin]) > 0

    huge_rows = regions[(regions[:, 2] & np.uint64(PAGE_IS_HUGE)) != 0]
    return cover(regions), cover(huge_rows)


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs [a, b) in sorted window indexes, one pread each."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    firsts = idx[np.concatenate(([0], breaks))]
    lasts = idx[np.concatenate((breaks - 1, [idx.size - 1]))] + 1
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


def pmd_candidates(pm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows that pmd_mapped_from_pages can accept, from pagemap alone: 512 present
    entries with consecutive PFNs from a 512-aligned first one. Only these need the
    kpageflags of their first frame to tell whether they are PMD-mapped.

    Also returns which of them have 512 entries equal but for the PFN (as a PMD mapping
    has): their first entry speaks for all.
    """
    n = pm.shape[0]
    first, last = pm[:, 0], pm[:, -1]
    pfn0 = first & _U(PM_PFN_MASK)
    # O(windows) filter first: present at both ends, aligned, the right PFN distance.
    maybe = ((first & _U(PM_PRESENT)) != 0) & ((last & _U(PM_PRESENT)) != 0) \
        & ((pfn0 % _U(HPAGE_PMD_NR)) == 0) & ((last & _U(PM_PFN_MASK)) == pfn0 + _U(511))
    cand, uniform = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    rows = np.flatnonzero(maybe)
    if rows.size == 0:
        return cand, uniform
    sub = pm if rows.size == n else pm[rows]
    # pm[i] == pm[0] + i: since the first PFN is 512-aligned, PFN + i never carries into
    # the flag bits, so this is "same flags, consecutive PFNs".
    same = (sub - _STEPS == sub[:, :1]).all(axis=1)
    cand[rows] = uniform[rows] = same
    other = rows[~same]
    if other.size:  # differing flags (soft-dirty, uffd-wp, exclusivity): the full check
        o = pm[other]
        pfn = o & _U(PM_PFN_MASK)
        cand[other] = ((o & _U(PM_PRESENT)) != 0).all(axis=1) \
            & (pfn == pfn[:, :1] + _STEPS).all(axis=1)
    return cand, uniform


class MmScanner:
    """An open view of one process's memory: pagemap fd plus a shared kpageflags fd."""

    def __init__(self, kernel: Kernel, pid: int, kpf: KPageFlags, limits: Limits,
                 use_pagemap_scan: bool | None = None) -> None:
        self.kernel, self.pid, self.kpf, self.limits = kernel, pid, kpf, limits
        self.use_scan = kernel.has_pagemap_scan() if use_pagemap_scan is None \
            else use_pagemap_scan
        self.pagemap = kernel.pagemap(pid)

    def close(self) -> None:
        self.pagemap.close()

    def __enter__(self) -> "MmScanner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decide_range(self, start: int, end: int, armed: bool = False) -> Verdicts:
        """Verdicts for the aligned windows of [start, end)."""
        nwin = (end - start) >> HPAGE_SHIFT
        if self.use_scan:
            regions = self.pagemap.scan(start, end, PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                                        PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_HUGE)
            touched, huge = window_masks(regions, start, nwin)
        else:
            touched, huge = np.ones(nwin, dtype=bool), np.zeros(nwin, dtype=bool)
        detail = np.flatnonzero(touched & ~huge)
        codes = np.full(nwin, int(ScanResult.PMD_NONE), dtype=np.int8)
        codes[huge] = int(ScanResult.PMD_MAPPED)
        zeros = np.zeros(nwin, dtype=np.int64)
        out = Verdicts(codes, zeros.copy(), zeros + HPAGE_PMD_NR, zeros.copy(), zeros.copy())
        out.present[huge] = HPAGE_PMD_NR
        out.none[huge] = 0
        if detail.size == 0:
            return out
        pm = self._read_windows(start, detail)
        if self.use_scan:
            v = decide(pm, self._read_flags(pm), self.limits, uffd_armed=armed)
        else:
            v = self._decide_unscanned(pm, armed)
        for name in _VERDICT_FIELDS:
            getattr(out, name)[detail] = getattr(v, name)
        return out

    def _decide_unscanned(self, pm: np.ndarray, armed: bool) -> Verdicts:
        """Without PAGEMAP_SCAN: PMD-mapped windows as pmd_mapped_from_pages tells them,
        reading kpageflags for their first frame only; every other window in full."""
        n = pm.shape[0]
        cand, uniform = pmd_candidates(pm)
        pmd = np.zeros(n, dtype=bool)
        head = np.zeros(n, dtype=np.uint64)
        rows = np.flatnonzero(cand)
        if rows.size:
            head[rows] = self.kpf.read(pm[rows, 0] & _U(PM_PFN_MASK))
            # pmd_mapped_from_pages, the candidates' PFN checks being done already.
            pmd[rows] = ((head[rows] & _U(KPF_COMPOUND_HEAD)) != 0) \
                & ((head[rows] & _U(KPF_THP)) != 0)
        if not pmd.any():
            return decide(pm, self._read_flags(pm), self.limits, uffd_armed=armed)
        zeros = np.zeros(n, dtype=np.int64)
        out = Verdicts(np.full(n, int(ScanResult.PMD_MAPPED), dtype=np.int8),
                       zeros + HPAGE_PMD_NR, zeros.copy(), zeros.copy(), zeros.copy())
        rest = np.flatnonzero(~pmd)
        if rest.size:
            sub = pm[rest]
            v = decide(sub, self._read_flags(sub), self.limits, uffd_armed=armed)
            for name in _VERDICT_FIELDS:
                getattr(out, name)[rest] = getattr(v, name)
        # Counts as decide() has them, all 512 entries being present: the zero page counts
        # as none. An exclusively mapped PTE never maps the zero page (vm_normal_page() is
        # NULL for it, so pagemap leaves PM_MMAP_EXCLUSIVE clear) and the huge zero page
        # carries KPF_ZERO_PAGE on its first frame: an exclusive window whose first frame
        # is not a zero page has 512 normal, unshared pages. The others are read in full.
        excl0 = (pm[:, 0] & _U(PM_MMAP_EXCLUSIVE)) != 0
        plain = pmd & uniform & excl0 & ((head & _U(KPF_ZERO_PAGE)) == 0)
        rows = np.flatnonzero(pmd & ~plain)
        if rows.size:
            sub = pm[rows]
            excl = (sub & _U(PM_MMAP_EXCLUSIVE)) != 0
            need = ~excl
            need[(head[rows] & _U(KPF_ZERO_PAGE)) != 0] = True
            flags = self.kpf.read(np.where(need, sub & _U(PM_PFN_MASK), _U(0)))
            zero = (flags & _U(KPF_ZERO_PAGE)) != 0
            nzero = zero.sum(axis=1)
            out.present[rows] = HPAGE_PMD_NR - nzero
            out.none[rows] = nzero
            out.shared[rows] = (~zero & ~excl).sum(axis=1)
        return out

    def _read_windows(self, start: int, detail: np.ndarray) -> np.ndarray:
        pm = np.empty((detail.size, HPAGE_PMD_NR), dtype=np.uint64)
        row = 0
        for a, b in _runs(detail):
            self.pagemap.read(start + (a << HPAGE_SHIFT), start + (b << HPAGE_SHIFT),
                              out=pm[row:row + b - a])
            row += b - a
        return pm

    def _read_flags(self, pm: np.ndarray) -> np.ndarray:
        """kpageflags of each present entry's frame (0 elsewhere), shaped like pm."""
        pfns = pm & _U(PM_PFN_MASK)
        absent = pm < _U(PM_PRESENT)  # bit 63 clear
        if absent.any():
            pfns[absent] = 0
        return self.kpf.read(pfns)

    def scan_vma(self, vma: Vma, tunables: Tunables, thp_disabled: bool,
                 force: bool = False) -> VmaScan:
        """Every window of one VMA, read CHUNK_WINDOWS at a time."""
        enabled = "always" if force else tunables.enabled
        skip = vma_skip_reason(vma, enabled, thp_disabled)
        if skip is not None:
            return VmaScan(vma, skip)
        hstart, hend = aligned_range(vma)
        chunk = CHUNK_WINDOWS * HPAGE_PMD_SIZE
        parts = [self.decide_range(a, min(a + chunk, hend), uffd_armed(vma))
                 for a in range(hstart, hend, chunk)]
        starts = np.arange(hstart, hend, HPAGE_PMD_SIZE, dtype=np.uint64)
        return VmaScan(vma, None, starts, np.concatenate([p.codes for p in parts]),
                       np.concatenate([p.present for p in parts]))


def limits_of(tunables: Tunables, force: bool = False) -> Limits:
    return Limits(tunables.max_ptes_none, tunables.max_ptes_swap, tunables.max_ptes_shared,
                  khugepaged=not force)


def scan_process(kernel: Kernel, pid: int, tunables: Tunables, kpf: KPageFlags, *,
                 force: bool = False, use_pagemap_scan: bool | None = None) -> ProcessScan:
    """Decide every window of every VMA of `pid` (raises ProcessGone if it exits)."""
    status = kernel.procfs.status(pid)
    vmas = kernel.procfs.smaps(pid)
    kernel.drain_lru()  # as khugepaged_do_scan and madvise_collapse do first
    with MmScanner(kernel, pid, kpf, limits_of(tunables, force), use_pagemap_scan) as mm:
        scans = [mm.scan_vma(v, tunables, not status.thp_enabled, force) for v in vmas]
    return ProcessScan(
        pid=pid, comm=status.name,
        anon_kb=sum(v.anonymous_kb for v in vmas),
        anon_huge_kb=sum(v.anon_huge_kb for v in vmas),
        vmas=scans,
    )
