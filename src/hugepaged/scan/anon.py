"""The PTE rules for private anonymous memory: hpage_collapse_scan_pmd's reader half.

PAGEMAP_SCAN (where the kernel has it) tells which windows are empty or already PMD-mapped
without reading every entry; only the rest are read entry by entry, with kpageflags for their
present frames, and decided by scan.decide.
"""

import numpy as np

from hugepaged.kernel import Kernel, KPageFlags, PageMap
from hugepaged.kernel.access import AccessSource
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
from hugepaged.policy import CollapseControl
from hugepaged.results import ScanResult
from hugepaged.scan.decide import Verdicts, decide
from hugepaged.scan.eligibility import uffd_armed

_U = np.uint64
_VERDICT_FIELDS = ("codes", "present", "none", "swap", "shared", "zero", "first_pfn")


def window_masks(regions: np.ndarray, start: int, nwin: int, shift: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per window: touched by any region, and wholly PMD-mapped (PAGE_IS_HUGE)."""
    def cover(rows: np.ndarray) -> np.ndarray:
        diff = np.zeros(nwin + 1, dtype=np.int64)
        if rows.size:
            first = ((rows[:, 0] - start) >> shift).astype(np.int64)
            last = ((rows[:, 1] - 1 - start) >> shift).astype(np.int64)
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
    """Windows that a PMD mapping can be, from pagemap alone: HPAGE_PMD_NR present
    entries with consecutive PFNs from an aligned first one. Only these need the
    kpageflags of their first frame to tell whether they are PMD-mapped.

    Also returns which of them have all entries equal but for the PFN (as a PMD mapping
    has): their first entry speaks for all.
    """
    n, nr = pm.shape
    steps = np.arange(nr, dtype=np.uint64)
    first, last = pm[:, 0], pm[:, -1]
    pfn0 = first & _U(PM_PFN_MASK)
    # O(windows) filter first: present at both ends, aligned, the right PFN distance.
    maybe = ((first & _U(PM_PRESENT)) != 0) & ((last & _U(PM_PRESENT)) != 0) \
        & ((pfn0 % _U(nr)) == 0) \
        & ((last & _U(PM_PFN_MASK)) == pfn0 + _U(nr - 1))
    cand, uniform = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    rows = np.flatnonzero(maybe)
    if rows.size == 0:
        return cand, uniform
    sub = pm if rows.size == n else pm[rows]
    # pm[i] == pm[0] + i: since the first PFN is aligned, PFN + i never carries into
    # the flag bits, so this is "same flags, consecutive PFNs".
    same = (sub - steps == sub[:, :1]).all(axis=1)
    cand[rows] = uniform[rows] = same
    other = rows[~same]
    if other.size:  # differing flags (soft-dirty, uffd-wp, exclusivity): the full check
        o = pm[other]
        pfn = o & _U(PM_PFN_MASK)
        cand[other] = ((o & _U(PM_PRESENT)) != 0).all(axis=1) \
            & (pfn == pfn[:, :1] + steps).all(axis=1)
    return cand, uniform


class AnonScanner:
    """Private anonymous windows of one process, over its pagemap and a shared kpageflags."""

    def __init__(self, kernel: Kernel, pid: int, kpf: KPageFlags, control: CollapseControl,
                 pagemap: PageMap, use_pagemap_scan: bool | None = None,
                 referenced: AccessSource | None = None) -> None:
        self.kpf, self.limits, self.pagemap = kpf, control.limits(), pagemap
        # The young-bit check is khugepaged's only (cc->is_khugepaged), not MADV_COLLAPSE's.
        self.referenced = referenced if self.limits.khugepaged else None
        self.shift, self.nr = kernel.geometry.pmd_shift, kernel.geometry.pmd_nr
        self.use_scan = kernel.has_pagemap_scan() if use_pagemap_scan is None \
            else use_pagemap_scan

    def range_key(self, vma: Vma, address: int) -> None:
        """Private memory: no other process maps this window's pages as its own."""
        return None

    def rss_growth(self, v: Verdicts) -> np.ndarray:
        """The new pages for empty and zero-page PTEs, and the swapped-out ones read back."""
        return v.none + v.swap

    def close(self) -> None:
        """Nothing of its own: the pagemap is the process scanner's."""

    def decide_range(self, vma: Vma, start: int, end: int) -> Verdicts:
        """Verdicts for the aligned windows of [start, end) inside `vma`."""
        armed = uffd_armed(vma)
        nwin = (end - start) >> self.shift
        if self.use_scan:
            regions = self.pagemap.scan(start, end, PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                                        PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_HUGE)
            touched, huge = window_masks(regions, start, nwin, self.shift)
        else:
            touched, huge = np.ones(nwin, dtype=bool), np.zeros(nwin, dtype=bool)
        detail = np.flatnonzero(touched & ~huge)
        codes = np.full(nwin, int(ScanResult.PMD_NONE), dtype=np.int8)
        codes[huge] = int(ScanResult.PMD_MAPPED)
        zeros = np.zeros(nwin, dtype=np.int64)
        out = Verdicts(codes, zeros.copy(), zeros + self.nr, zeros.copy(), zeros.copy(),
                       zero=zeros.copy(), first_pfn=zeros.copy())
        out.present[huge] = self.nr
        out.none[huge] = 0
        if detail.size == 0:
            return out
        pm = self._read_windows(start, detail)
        v = self._decide(pm, armed) if self.use_scan else self._decide_unscanned(pm, armed)
        for name in _VERDICT_FIELDS:
            getattr(out, name)[detail] = getattr(v, name)
        return out

    def _decide_unscanned(self, pm: np.ndarray, armed: bool) -> Verdicts:
        """Without PAGEMAP_SCAN: PMD-mapped windows (HPAGE_PMD_NR present PTEs of one
        order-9 folio with a THP head),
        reading kpageflags for their first frame only; every other window in full."""
        n = pm.shape[0]
        cand, uniform = pmd_candidates(pm)
        pmd = np.zeros(n, dtype=bool)
        head = np.zeros(n, dtype=np.uint64)
        rows = np.flatnonzero(cand)
        if rows.size:
            head[rows] = self.kpf.read(pm[rows, 0] & _U(PM_PFN_MASK))
            # A THP head on the first frame; the candidates' PFN checks are done already.
            pmd[rows] = ((head[rows] & _U(KPF_COMPOUND_HEAD)) != 0) \
                & ((head[rows] & _U(KPF_THP)) != 0)
        if not pmd.any():
            return self._decide(pm, armed)
        zeros = np.zeros(n, dtype=np.int64)
        out = Verdicts(np.full(n, int(ScanResult.PMD_MAPPED), dtype=np.int8),
                       zeros + self.nr, zeros.copy(), zeros.copy(), zeros.copy(),
                       zero=zeros.copy(),
                       first_pfn=(pm[:, 0] & _U(PM_PFN_MASK)).astype(np.int64))
        rest = np.flatnonzero(~pmd)
        if rest.size:
            v = self._decide(pm[rest], armed)
            for name in _VERDICT_FIELDS:
                getattr(out, name)[rest] = getattr(v, name)
        # Counts as decide() has them, all entries being present: the zero page counts
        # as none. An exclusively mapped PTE never maps the zero page (vm_normal_page() is
        # NULL for it, so pagemap leaves PM_MMAP_EXCLUSIVE clear) and the huge zero page
        # carries KPF_ZERO_PAGE on its first frame: an exclusive window whose first frame
        # is not a zero page has only normal, unshared pages. The others are read in full.
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
            out.present[rows] = self.nr - nzero
            out.none[rows] = nzero
            out.zero[rows] = nzero
            out.shared[rows] = (~zero & ~excl).sum(axis=1)
        return out

    def _decide(self, pm: np.ndarray, armed: bool) -> Verdicts:
        """decide() over read windows, with their referenced state where a source exists;
        the windows left uncollapsed are marked for the next visit's young-bit check."""
        kf = self._read_flags(pm)
        if self.referenced is None:
            return decide(pm, kf, self.limits, uffd_armed=armed)
        v = decide(pm, kf, self.limits, referenced=self.referenced.referenced(pm, kf),
                   uffd_armed=armed)
        self.referenced.leave(pm[v.codes != int(ScanResult.SUCCEED)])
        return v

    def _read_windows(self, start: int, detail: np.ndarray) -> np.ndarray:
        pm = np.empty((detail.size, self.nr), dtype=np.uint64)
        row = 0
        for a, b in _runs(detail):
            self.pagemap.read(start + (a << self.shift), start + (b << self.shift),
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
