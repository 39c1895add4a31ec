"""One process's memory, VMA by VMA: the one entry that dispatches by memory kind.

As khugepaged_scan_mm_slot does, every VMA goes through one eligibility check and then to the
scanner of its kind: private anonymous memory by the PTE rules (scan.anon), shared memory by
the file rules. SCANNERS is the only place that chooses a scanner, and scan.scanner.Scanner
all this module asks of one; what smaps says of a VMA of each kind is
scan.eligibility.COLLAPSIBLE's. A new kind is one scanner and one entry in each.
"""

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from hugepaged.kernel import Kernel, KPageFlags
from hugepaged.kernel.access import AccessSource
from hugepaged.kernel.procfs import PR_THP_DISABLE_EXCEPT_ADVISED, Vma
from hugepaged.policy import CollapseControl
from hugepaged.results import Ineligible, ScanResult
from hugepaged.scan.anon import AnonScanner
from hugepaged.scan.decide import Verdicts
from hugepaged.scan.eligibility import (
    COLLAPSIBLE,
    MemoryKind,
    aligned_range,
    collapsible,
    ineligible,
    memory_kind,
)
from hugepaged.scan.scanner import Scanner
from hugepaged.scan.shmem import ShmemKind, ShmemModes, shmem_kind
from hugepaged.scan.shmem_scan import ShmemScanner
from hugepaged.scan.usage import ThpUsage, thp_usage

CHUNK_WINDOWS = 256  # windows decided per read: bounds the arrays of one step
SCANNERS: dict[MemoryKind, type[Scanner]] = {MemoryKind.ANON: AnonScanner,
                                              MemoryKind.SHMEM: ShmemScanner}


@dataclass
class VmaScan:
    """One VMA: why it is not a candidate, or its windows and their verdicts."""

    vma: Vma
    skip: Ineligible | None
    starts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    codes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int8))
    present: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    none: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # Pages a collapse adds to this process's RSS (Scanner.rss_growth).
    unmapped: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass
class ProcessScan:
    """What `hugepaged scan` reports for one process."""

    pid: int
    comm: str
    anon_kb: int
    anon_huge_kb: int
    vmas: list[VmaScan]
    referenced_known: bool = False  # a per-page access source was read (scan.referenced)
    shmem_kb: int = 0  # resident shared memory (shmem, memfd, MAP_SHARED|MAP_ANONYMOUS)
    shmem_pmd_kb: int = 0  # of it, PMD-mapped (smaps ShmemPmdMapped)
    thp: ThpUsage | None = None  # every kind of THP mapped, when asked for
    target: str | None = None  # the target whose policy decided it (hugepaged's own)

    @property
    def eligible_windows(self) -> int:
        return sum(v.codes.size for v in self.vmas)

    def results(self) -> Counter:
        counts: Counter = Counter()
        for v in self.vmas:
            vals, nums = np.unique(v.codes, return_counts=True)
            counts.update({ScanResult(int(c)): int(k) for c, k in zip(vals, nums, strict=True)})
        return counts

    def ineligible(self) -> dict[Ineligible, int]:
        """kB per reason a VMA is in no candidate window: its `Anonymous` kB (what a collapse
        would have made huge: private anonymous pages, also the copied-on-write pages of a
        private file mapping), except shared memory, whose pages smaps counts as `Rss` only.
        A VMA with none of those pages is left out; so is the unaligned head and tail of a
        candidate VMA (smaps gives no per-range sizes)."""
        out: Counter = Counter()
        for v in self.vmas:
            facts = collapsible(v.vma)
            if v.skip is None or facts is None:
                continue
            kb = facts.resident_kb(v.vma)
            if kb:
                out[v.skip] += kb
        return dict(out)

    def windows(self, *codes: ScanResult) -> Iterator[tuple[int, ScanResult]]:
        """(address, result) of windows whose result is one of `codes` (all when none)."""
        wanted = {int(c) for c in codes}
        for v in self.vmas:
            for addr, code in zip(v.starts.tolist(), v.codes.tolist(), strict=True):
                if not wanted or code in wanted:
                    yield addr, ScanResult(code)

    def none_by_window(self) -> dict[int, int]:
        """Empty or zero-page PTEs per candidate window's address."""
        out: dict[int, int] = {}
        for v in self.vmas:
            out.update(zip(v.starts.tolist(), v.none.tolist(), strict=True))
        return out

    def none_ptes(self, addresses: set[int]) -> int:
        """Empty or zero-page PTEs of these windows (page-cache holes of shared memory):
        the new pages collapsing them allocates."""
        return self._total("none", addresses)

    def rss_growth_pages(self, addresses: set[int]) -> int:
        """Pages collapsing these windows adds to the process's RSS (VmaScan.unmapped)."""
        return self._total("unmapped", addresses)

    def _total(self, name: str, addresses: set[int]) -> int:
        total = 0
        for v in self.vmas:
            if v.codes.size:
                total += int(getattr(v, name)[np.isin(v.starts, list(addresses))].sum())
        return total

    @property
    def coverage(self) -> float:
        return 100.0 * self.anon_huge_kb / self.anon_kb if self.anon_kb else 0.0


class ProcessScanner:
    """An open view of one process's memory under one policy; one scanner per memory kind."""

    def __init__(self, kernel: Kernel, pid: int, kpf: KPageFlags, control: CollapseControl,
                 use_pagemap_scan: bool | None = None, *,
                 referenced: AccessSource | None = None) -> None:
        self.kernel, self.pid, self.kpf, self.control = kernel, pid, kpf, control
        self.referenced = referenced
        self.geometry = kernel.geometry
        self.pagemap = kernel.pagemap(pid)
        self._use_scan = use_pagemap_scan
        self._scanners: dict[MemoryKind, Scanner] = {}
        self._shmem: ShmemModes | None = None
        self._prctl: int | None = None  # see thp_prctl
        self._kernel_enabled: str | None = None

    def close(self) -> None:
        for s in self._scanners.values():
            s.close()
        self.pagemap.close()

    def __enter__(self) -> "ProcessScanner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ineligible(self, vma: Vma, thp_disabled: bool) -> Ineligible | None:
        facts = collapsible(vma)
        shmem = self.shmem_modes(vma) if facts is not None and facts.shared else None
        return ineligible(vma, self.control, self.thp_prctl(vma, thp_disabled), self.geometry,
                          shmem)

    def thp_prctl(self, vma: Vma, thp_disabled: bool) -> int:
        """What PR_GET_THP_DISABLE would answer for the process (0, 1 or 3), as far as it
        shows from outside. /proc/PID/status says THP_enabled: 0 only for 1 (thp_disabled).
        For 3 (PR_THP_DISABLE_EXCEPT_ADVISED) there are two witnesses: the syscall tracepoint,
        where the daemon saw the call (ProcFS.thp_prctl), and smaps' THPeligible, which the
        kernel computes with the mode: a private anonymous VMA holding a whole aligned window,
        neither advised nor VM_NOHUGEPAGE, that the kernel's own `enabled=always` for the PMD
        size would make eligible says 0 only under it. Under the kernel's `madvise` nothing
        tells it from outside until the process makes the call again. Once seen, it holds
        for every later VMA of this process."""
        if thp_disabled:
            return 1
        if self._prctl is None:
            self._prctl = self.kernel.procfs.thp_prctl(self.pid)
        if not self._prctl and self._shows_except_advised(vma):
            self._prctl = 1 | PR_THP_DISABLE_EXCEPT_ADVISED
        return self._prctl

    def _shows_except_advised(self, vma: Vma) -> bool:
        if vma.thp_eligible is not False or vma.flags & {"hg", "nh"} \
                or memory_kind(vma) is not MemoryKind.ANON:
            return False
        hstart, hend = aligned_range(vma, self.geometry)
        if hstart >= hend:
            return False
        if self._kernel_enabled is None:
            self._kernel_enabled = str(self.kernel.thp.effective_enabled())
        return self._kernel_enabled == "always"

    def shmem_modes(self, vma: Vma) -> ShmemModes:
        """The kernel's shmem controls for this VMA: read once per process; a linked file of
        a tmpfs mount adds that mount's huge= option (Vma.mount_huge: by device)."""
        if self._shmem is None:
            self._shmem = ShmemModes(str(self.kernel.thp.read("shmem_enabled")),
                                     self.kernel.thp.shmem_enabled_pmd())
        if vma.fs != "tmpfs" or shmem_kind(vma) is not ShmemKind.FILE:
            return self._shmem
        return replace(self._shmem, mount_huge=vma.mount_huge)

    def range_key(self, vma: Vma, address: int) -> tuple[int, int, int] | None:
        """(device, inode, file offset) of a shared-memory window: the same range of the
        same file, whichever process maps it; None for private memory (Scanner.range_key)."""
        kind = memory_kind(vma)
        return self._scanner(kind).range_key(vma, address) if kind in SCANNERS else None

    def _scanner(self, kind: MemoryKind) -> Scanner:
        if kind not in self._scanners:
            self._scanners[kind] = SCANNERS[kind](self.kernel, self.pid, self.kpf, self.control,
                                                  self.pagemap, self._use_scan,
                                                  referenced=self.referenced)
        return self._scanners[kind]

    def decide_range(self, vma: Vma, start: int, end: int) -> Verdicts:
        """Verdicts for the aligned windows of [start, end) of a candidate VMA."""
        return self._scanner(memory_kind(vma)).decide_range(vma, start, end)

    def scan_vma(self, vma: Vma, thp_disabled: bool) -> VmaScan:
        """Every window of one VMA, CHUNK_WINDOWS at a time."""
        skip = self.ineligible(vma, thp_disabled)
        if skip is not None:
            return VmaScan(vma, skip)
        hstart, hend = aligned_range(vma, self.geometry)
        size = self.geometry.pmd_size
        chunk = CHUNK_WINDOWS * size
        scanner = self._scanner(memory_kind(vma))
        parts = [scanner.decide_range(vma, a, min(a + chunk, hend))
                 for a in range(hstart, hend, chunk)]
        starts = np.arange(hstart, hend, size, dtype=np.uint64)
        return VmaScan(vma, None, starts, np.concatenate([p.codes for p in parts]),
                       np.concatenate([p.present for p in parts]),
                       np.concatenate([p.none for p in parts]),
                       np.concatenate([scanner.rss_growth(p) for p in parts]))


def scan_process(kernel: Kernel, pid: int, control: CollapseControl, kpf: KPageFlags, *,
                 use_pagemap_scan: bool | None = None, usage: bool = False,
                 referenced: AccessSource | None = None) -> ProcessScan:
    """Decide every window of every VMA of `pid` (raises ProcessGone if it exits);
    `usage`: also count every kind of THP it maps (scan.usage); `referenced`: the access
    source for khugepaged's young-bit check, where one exists."""
    status = kernel.procfs.status(pid)
    vmas = kernel.procfs.smaps(pid)
    kernel.drain_lru()  # as khugepaged_do_scan and madvise_collapse do first
    with ProcessScanner(kernel, pid, kpf, control, use_pagemap_scan,
                        referenced=referenced) as mm:
        scans = [mm.scan_vma(v, not status.thp_enabled) for v in vmas]
    return ProcessScan(
        pid=pid, comm=status.name,
        anon_kb=sum(v.anonymous_kb for v in vmas),
        anon_huge_kb=sum(v.anon_huge_kb for v in vmas),
        vmas=scans,
        shmem_kb=sum(COLLAPSIBLE[MemoryKind.SHMEM].resident_kb(v) for v in vmas
                     if memory_kind(v) is MemoryKind.SHMEM),
        shmem_pmd_kb=sum(v.shmem_pmd_kb for v in vmas),
        thp=thp_usage(kernel, pid, vmas, kpf, use_pagemap_scan) if usage else None,
        referenced_known=referenced is not None and control.is_khugepaged,
        target=control.target,
    )


def scan_processes(kernel: Kernel, pids: list[int],
                   control_for: Callable[[int], CollapseControl], *, explicit: bool,
                   usage: bool = False) -> tuple[list[ProcessScan], list[str]]:
    """Scan each pid under its own policy (`control_for(pid)`: its target's, or the global
    one); vanished ones are dropped, unreadable ones summed up in one line.

    `explicit`: the pids were named by the user, so a vanished or unreadable one is an error.
    The young-bit check reads idle page tracking where it exists and marks nothing.
    """
    source = kernel.access_source()
    try:
        scans, denied = _scan_each(kernel, pids, control_for, explicit, usage, source)
    finally:
        if source is not None:
            source.close()
    skipped = []
    if denied:
        skipped.append(f"{len(denied)} process(es) not readable (permission denied): "
                       + ", ".join(map(str, denied[:10])) + (" ..." if len(denied) > 10 else ""))
    return scans, skipped


def _scan_each(kernel: Kernel, pids: list[int], control_for: Callable[[int], CollapseControl],
               explicit: bool, usage: bool, referenced: AccessSource | None
               ) -> tuple[list[ProcessScan], list[int]]:
    """scan_processes' loop: the scans kept, and the pids we may not read."""
    from hugepaged.errors import AccessDenied, ProcessGone

    scans, denied = [], []
    with kernel.kpageflags() as kpf:
        for pid in pids:
            try:
                s = scan_process(kernel, pid, control_for(pid), kpf, usage=usage,
                                 referenced=referenced)
            except ProcessGone:
                if explicit:
                    raise
                continue
            except AccessDenied:
                if explicit:
                    raise
                denied.append(pid)
                continue
            if explicit or s.anon_kb or s.shmem_kb or s.eligible_windows:
                scans.append(s)
    return scans, denied
