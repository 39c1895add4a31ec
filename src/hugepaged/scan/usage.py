"""Every kind of THP a process maps, as tools/mm/thpmaps counts them (our own code).

smaps gives the PMD-mapped figures (AnonHugePages, ShmemPmdMapped, FilePmdMapped). What it
does not give comes from pagemap and kpageflags: the folio each PTE-mapped page belongs to,
by size. A folio is a COMPOUND_HEAD frame followed by COMPOUND_TAIL frames; its size is one
plus the run of tails after the head. A mapped tail belongs to the folio of the mapped head
before it when the frames line up with the addresses; a tail whose head this process does not
map at the right place is counted as part of a partly mapped folio of unknown size.
2 MiB folios mapped by PTEs are the order-9 figure minus what smaps says is PMD-mapped.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from hugepaged.kernel import Kernel, KPageFlags
from hugepaged.kernel.kpageflags import KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP
from hugepaged.kernel.pagemap import PAGE_IS_PRESENT, PM_PFN_MASK, PM_PRESENT, PageMap
from hugepaged.kernel.procfs import Vma
from hugepaged.scan.eligibility import MemoryKind, collapsible, memory_kind

CHUNK_BYTES = 1 << 30  # of address space read at once where PAGEMAP_SCAN is missing
_U = np.uint64


@dataclass
class ThpUsage:
    """kB of one process (or a total) by kind of THP."""

    anon_pmd_kb: int = 0  # smaps AnonHugePages
    shmem_pmd_kb: int = 0  # smaps ShmemPmdMapped
    file_pmd_kb: int = 0  # smaps FilePmdMapped
    anon_pte_kb: Counter = field(default_factory=Counter)  # folio kB -> kB mapped by PTEs
    shmem_pte_kb: Counter = field(default_factory=Counter)
    anon_partial_kb: int = 0  # tails of folios whose head is not mapped in line
    shmem_partial_kb: int = 0

    def add(self, other: "ThpUsage") -> None:
        for name in ("anon_pmd_kb", "shmem_pmd_kb", "file_pmd_kb", "anon_partial_kb",
                     "shmem_partial_kb"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.anon_pte_kb.update(other.anon_pte_kb)
        self.shmem_pte_kb.update(other.shmem_pte_kb)

    def as_dict(self) -> dict:
        return {"anon_pmd_kb": self.anon_pmd_kb, "shmem_pmd_kb": self.shmem_pmd_kb,
                "file_pmd_kb": self.file_pmd_kb,
                "anon_pte_kb": {f"{k}kB": v for k, v in sorted(self.anon_pte_kb.items())},
                "shmem_pte_kb": {f"{k}kB": v for k, v in sorted(self.shmem_pte_kb.items())},
                "anon_partial_kb": self.anon_partial_kb,
                "shmem_partial_kb": self.shmem_partial_kb}


def head_sizes(after_head: np.ndarray) -> np.ndarray:
    """Folio size in pages per head, from the kpageflags of the HPAGE_PMD_NR - 1 frames
    after each head ((heads, HPAGE_PMD_NR - 1) array): one plus the leading run of tails
    (the largest folio reported is one PMD)."""
    tail = (after_head & _U(KPF_COMPOUND_TAIL)) != 0
    run = np.where(tail.all(axis=1), tail.shape[1], (~tail).argmax(axis=1))
    return run + 1


def folio_pages(pm: np.ndarray, flags: np.ndarray, read_flags, pmd_nr: int
                ) -> tuple[Counter, int]:
    """(pages mapped per folio size in pages, pages of partly mapped folios) for one VMA's
    pagemap entries `pm` and the kpageflags of their frames `flags` (1-D, address order).

    A run is a mapped head and the mapped tails that follow it page by page and frame by
    frame. The frame after the run tells whether the run is the whole folio; only where it
    is a tail (the folio goes on unmapped) are the pmd_nr - 1 frames after the head read
    (`read_flags(pfns)` reads kpageflags). Only THP folios count, not hugetlb.
    """
    present = (pm & _U(PM_PRESENT)) != 0
    thp = present & ((flags & _U(KPF_THP)) != 0)
    head = thp & ((flags & _U(KPF_COMPOUND_HEAD)) != 0)
    tail = thp & ((flags & _U(KPF_COMPOUND_TAIL)) != 0)
    if not (head.any() or tail.any()):
        return Counter(), 0
    pfn = (pm & _U(PM_PFN_MASK)).astype(np.int64)
    cont = np.zeros(pm.size, dtype=bool)
    cont[1:] = tail[1:] & (pfn[1:] == pfn[:-1] + 1)
    first = np.flatnonzero(~cont)
    length = np.diff(np.append(first, pm.size))
    runs = head[first]
    partial = int(tail[~cont].sum() + (length[~runs & tail[first]] - 1).sum())
    h, n = pfn[first[runs]], length[runs]
    size = n.copy()
    after = read_flags(h + n)
    longer = np.flatnonzero((after & _U(KPF_COMPOUND_TAIL)) != 0)
    if longer.size:
        steps = np.arange(1, pmd_nr, dtype=np.int64)
        size[longer] = head_sizes(read_flags(h[longer, None] + steps))
    counts = Counter({int(k): int(n[size == k].sum()) for k in np.unique(size)})
    return counts, partial


def pte_kb(pages_by_size: Counter, pmd_kb: int, page_kb: int, pmd_nr: int) -> Counter:
    """kB mapped by PTEs per folio kB: PMD-sized folios' pages minus the PMD-mapped ones."""
    out = Counter()
    for pages, n in pages_by_size.items():
        kb = n * page_kb
        if pages == pmd_nr:
            kb -= pmd_kb
        if kb > 0 and pages > 1:
            out[pages * page_kb] = kb
    return out


def _present_spans(pagemap: PageMap, start: int, end: int, use_scan: bool,
                   chunk: int) -> list[tuple[int, int]]:
    """[a, b) pieces of a VMA worth reading: PAGEMAP_SCAN's present regions where the kernel
    has it (a big sparse VMA costs nothing), else the VMA in chunks."""
    if not use_scan:
        return [(a, min(a + chunk, end)) for a in range(start, end, chunk)]
    rows = pagemap.scan(start, end, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
    spans: list[tuple[int, int]] = []
    for a, b in rows[:, :2].tolist():
        if spans and spans[-1][1] == a and a - spans[-1][0] < chunk:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((a, b))
    return spans


def _vma_pages(pagemap: PageMap, kpf: KPageFlags, v: Vma, use_scan: bool, pmd_nr: int
               ) -> tuple[Counter, int]:
    """(pages mapped per folio size in pages, pages of partly mapped folios) of one VMA."""
    pages: Counter = Counter()
    partial = 0
    for a, b in _present_spans(pagemap, v.start, v.end, use_scan, CHUNK_BYTES):
        pm = pagemap.read(a, b)
        flags = kpf.read(np.where(pm >= _U(PM_PRESENT), pm & _U(PM_PFN_MASK), _U(0)))
        got, part = folio_pages(pm, flags, kpf.read, pmd_nr)
        pages.update(got)
        partial += part
    return pages, partial


def thp_usage(kernel: Kernel, pid: int, vmas: list[Vma], kpf: KPageFlags,
              use_pagemap_scan: bool | None = None) -> ThpUsage:
    """Every kind of THP `pid` maps; raises ProcessGone if it exits."""
    use_scan = kernel.has_pagemap_scan() if use_pagemap_scan is None else use_pagemap_scan
    page_kb, nr = kernel.geometry.page_size >> 10, kernel.geometry.pmd_nr
    out = ThpUsage()
    with kernel.pagemap(pid) as pagemap:
        for v in vmas:
            out.anon_pmd_kb += v.anon_huge_kb
            out.shmem_pmd_kb += v.shmem_pmd_kb
            out.file_pmd_kb += v.file_pmd_kb
            facts = collapsible(v)
            if facts is None or not v.rss_kb:
                continue
            pages, partial = _vma_pages(pagemap, kpf, v, use_scan, nr)
            by_size = pte_kb(pages, facts.huge_kb(v), page_kb, nr)
            if facts.shared:
                out.shmem_pte_kb.update(by_size)
                out.shmem_partial_kb += partial * page_kb
            else:
                out.anon_pte_kb.update(by_size)
                out.anon_partial_kb += partial * page_kb
    return out


def mthp_in_system(nr_anon: dict[int, int], pmd_kb: int) -> bool:
    """Whether any anonymous folio smaller than a PMD exists on the machine, from the kernel's
    per-size hugepages-<size>kB/stats/nr_anon (folio kB -> folios; empty where the kernel has
    no such counters, and then the answer is "maybe"). Where it says none, no process maps
    one, and anon_mthp_kb has nothing to find."""
    if not nr_anon:
        return True
    return any(n > 0 for kb, n in nr_anon.items() if kb < pmd_kb)


def anon_mthp_kb(kernel: Kernel, pid: int, vmas: list[Vma], kpf: KPageFlags,
                 use_pagemap_scan: bool | None = None) -> Counter:
    """kB of `pid`'s anonymous memory in mTHP folios (larger than a page, smaller than a PMD)
    by folio kB: thp_usage's anon_pte_kb without the 2 MiB folios, reading only the private
    anonymous VMAs that hold pages not PMD-mapped. Raises ProcessGone if it exits."""
    use_scan = kernel.has_pagemap_scan() if use_pagemap_scan is None else use_pagemap_scan
    page_kb = kernel.geometry.page_size >> 10
    pmd_kb = kernel.geometry.pmd_size >> 10
    out: Counter = Counter()
    with kernel.pagemap(pid) as pagemap:
        for v in vmas:
            if memory_kind(v) is not MemoryKind.ANON or v.anonymous_kb <= v.anon_huge_kb:
                continue
            pages, _ = _vma_pages(pagemap, kpf, v, use_scan, kernel.geometry.pmd_nr)
            out.update({kb: n for kb, n in pte_kb(pages, 0, page_kb, kernel.geometry.pmd_nr)
                        .items() if kb < pmd_kb})
    return out
