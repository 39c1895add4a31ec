"""Shared-memory windows of one process, read through the kernel layer, decided by scan.shmem.

Per VMA the file behind it is opened once (/proc/PID/map_files); per chunk of windows the
page cache is counted (cachestat, or mincore where cachestat is missing), this process's own
pagemap says which pages it maps and with what (PAGEMAP_SCAN for PMD mappings where the
kernel has it), and kpageflags of the mapped frames tells large folios and pages off the LRU.
"""

import numpy as np

from hugepaged.errors import Unsupported
from hugepaged.kernel import Kernel, KPageFlags
from hugepaged.kernel.pagecache import FileId, MappedFile, cachestat_supported
from hugepaged.kernel.pagemap import PAGE_IS_HUGE, PAGE_IS_PRESENT, PM_PFN_MASK, PM_PRESENT, PageMap
from hugepaged.kernel.procfs import Vma
from hugepaged.policy import CollapseControl
from hugepaged.scan.anon import window_masks
from hugepaged.scan.decide import Verdicts
from hugepaged.scan.shmem import FileLimits, decide_file, folio_facts, head_candidates, one_folio

_U = np.uint64
_CACHESTAT: list[bool] = []  # probed once per process


def has_cachestat() -> bool:
    if not _CACHESTAT:
        _CACHESTAT.append(cachestat_supported())
    return _CACHESTAT[0]


class ShmemScanner:
    """hpage_collapse_scan_file over the windows of this process's shared-memory VMAs."""

    def __init__(self, kernel: Kernel, pid: int, kpf: KPageFlags, control: CollapseControl,
                 pagemap: PageMap, use_pagemap_scan: bool | None = None,
                 referenced: object = None) -> None:
        # `referenced` is unused: hpage_collapse_scan_file has no young-bit check.
        self.kernel, self.pid, self.kpf, self.pagemap = kernel, pid, kpf, pagemap
        self.limits = FileLimits(control.max_ptes_none, control.max_ptes_swap,
                                 khugepaged=control.is_khugepaged, nr=kernel.geometry.pmd_nr)
        self.geometry = kernel.geometry
        self.use_scan = kernel.has_pagemap_scan() if use_pagemap_scan is None \
            else use_pagemap_scan
        self.use_cachestat = has_cachestat()
        self._files: dict[tuple[int, int], MappedFile] = {}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def file(self, vma: Vma) -> MappedFile:
        key = (vma.start, vma.end)
        if key not in self._files:
            self._files[key] = MappedFile(self.kernel.proc_root, self.pid, vma.start, vma.end)
        return self._files[key]

    def file_id(self, vma: Vma) -> FileId:
        return self.file(vma).id

    def range_key(self, vma: Vma, address: int) -> tuple[int, int, int]:
        fid = self.file(vma).id
        return fid.dev, fid.ino, self.file_offset(vma, address)

    def rss_growth(self, v: Verdicts) -> np.ndarray:
        """Every page of the range this process does not map now: the new PMD maps all of
        them, holes and pages only in the cache alike."""
        return self.geometry.pmd_nr - v.mapped

    def file_offset(self, vma: Vma, address: int) -> int:
        """Byte offset in the file of an address of the VMA (linear_page_index)."""
        return vma.offset + (address - vma.start)

    def cache_counts(self, vma: Vma, start: int, nwin: int) -> np.ndarray:
        """(nwin, 2): pages present and swapped (-1: unknown) per window's file range."""
        f, size = self.file(vma), self.geometry.pmd_size
        offset = self.file_offset(vma, start)
        if self.use_cachestat:
            try:
                return f.ranges_cachestat(offset, nwin, size)
            except Unsupported:
                self.use_cachestat = False
        return f.ranges_mincore(offset, nwin, size)

    def decide_range(self, vma: Vma, start: int, end: int) -> Verdicts:
        """Verdicts for the aligned windows of [start, end) inside `vma`."""
        shift = self.geometry.pmd_shift
        nwin = (end - start) >> shift
        counts = self.cache_counts(vma, start, nwin)
        present, swap = counts[:, 0], counts[:, 1]
        nr = self.geometry.pmd_nr
        pm = self.pagemap.read(start, end).reshape(nwin, nr)
        mapped = (pm >= _U(PM_PRESENT)).sum(axis=1)
        self._probe_unmapped(vma, start, pm, mapped, present)
        pfns = np.where(pm >= _U(PM_PRESENT), pm & _U(PM_PFN_MASK), _U(0))
        kflags = self.kpf.read(pfns)
        heads = head_candidates(pm).astype(np.uint64)
        probe = np.stack([heads, np.where(heads > 0, heads + _U(nr - 1), _U(0)),
                          np.where(heads > 0, heads + _U(nr), _U(0))])
        hf, tf, nf = self.kpf.read(probe)
        folios = folio_facts(pm, kflags, hf, tf, nf, self._pmd_mapped(pm, hf, tf, nf, start,
                                                                         end))
        codes = decide_file(present, swap, folios, self.limits)
        none = nr - present - np.maximum(swap, 0)
        return Verdicts(codes, present.copy(), none, swap.copy(), np.zeros(nwin, np.int64),
                        mapped=mapped)

    def _probe_unmapped(self, vma: Vma, start: int, pm: np.ndarray, mapped: np.ndarray,
                        present: np.ndarray) -> None:
        """A range wholly in the cache that this process maps none of may be one 2 MiB folio
        already (another process collapsed it; the kernel took this one's page table away):
        its first page's frame, learnt through hugepaged's own mapping (MappedFile.frames),
        goes into that range's first pagemap entry, so that the folio facts see it as if this
        process mapped that one page."""
        rows = np.flatnonzero((mapped == 0) & (present == self.geometry.pmd_nr))
        if not rows.size:
            return
        size = self.geometry.pmd_size
        base = self.file_offset(vma, start)
        frames = self.file(vma).frames(self.kernel.proc_root,
                                       [base + int(r) * size for r in rows])
        pm[rows, 0] = np.where(frames > 0, frames | _U(PM_PRESENT), _U(0))

    def _pmd_mapped(self, pm: np.ndarray, hf: np.ndarray, tf: np.ndarray, nf: np.ndarray,
                    start: int, end: int) -> np.ndarray:
        """Windows this process maps with a PMD: PAGEMAP_SCAN says so exactly; pagemap alone
        cannot tell a PMD from 512 PTEs of one 2 MiB folio, and takes them for a PMD."""
        if self.use_scan:
            regions = self.pagemap.scan(start, end, PAGE_IS_PRESENT, PAGE_IS_HUGE)
            return window_masks(regions, start, pm.shape[0], self.geometry.pmd_shift)[1]
        return one_folio(pm, hf, tf, nf) & (pm >= _U(PM_PRESENT)).all(axis=1)
