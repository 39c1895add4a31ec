"""The interface every memory kind's scanner provides (khugepaged's anon/file split).

mm/khugepaged.c sends each VMA to hpage_collapse_scan_pmd (private anonymous memory, PTE by
PTE) or hpage_collapse_scan_file (shared memory, by the page cache); the two differ in what
they read and in what a collapse adds, not in how a pass uses them. scan/process.py chooses
the scanner of a VMA's kind (SCANNERS) and uses nothing but this; a new kind (a regular
file's page cache, say) is one class with these methods and one entry there.
"""

from typing import Protocol

import numpy as np

from hugepaged.kernel import Kernel, KPageFlags, PageMap
from hugepaged.kernel.access import AccessSource
from hugepaged.kernel.procfs import Vma
from hugepaged.policy import CollapseControl
from hugepaged.scan.decide import Verdicts


class Scanner(Protocol):
    """One process's windows of one memory kind, open for one visit."""

    def __init__(self, kernel: Kernel, pid: int, kpf: KPageFlags, control: CollapseControl,
                 pagemap: PageMap, use_pagemap_scan: bool | None = None,
                 referenced: AccessSource | None = None) -> None: ...

    def decide_range(self, vma: Vma, start: int, end: int) -> Verdicts:
        """Verdicts for the aligned windows of [start, end) inside a candidate `vma`."""
        ...

    def range_key(self, vma: Vma, address: int) -> tuple[int, int, int] | None:
        """What names the window's memory whichever process maps it ((device, inode, file
        offset) for a file's range); None where the memory is this process's alone."""
        ...

    def rss_growth(self, v: Verdicts) -> np.ndarray:
        """Pages per window that collapsing it adds to this process's RSS."""
        ...

    def close(self) -> None:
        """Release what the visit opened (files, descriptors)."""
        ...
