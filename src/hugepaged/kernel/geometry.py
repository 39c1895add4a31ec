"""Page and PMD sizes, read from the kernel once (as tools/mm/thpmaps does).

Everything that cuts an address range into huge-page windows takes its sizes from here, so a
kernel with 16 KiB or 64 KiB base pages (arm64) is cut by its own PMD size (32 MiB, 512 MiB)
and decided over its own number of PTEs per table (2048, 8192), not by x86's. The defaults
and limits khugepaged derives from HPAGE_PMD_NR are derived here the same way.
"""

import functools
import os
from dataclasses import dataclass

HPAGE_PMD_SIZE_FILE = "kernel/mm/transparent_hugepage/hpage_pmd_size"


@dataclass(frozen=True)
class Geometry:
    """The base page size and the PMD-mapped huge page size of the running kernel."""

    page_size: int = 4096
    pmd_size: int = 2 << 20

    @property
    def pmd_nr(self) -> int:
        """HPAGE_PMD_NR: base pages per PMD-sized window."""
        return self.pmd_size // self.page_size

    @property
    def pmd_shift(self) -> int:
        return self.pmd_size.bit_length() - 1

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    # khugepaged_init (mm/khugepaged.c): its defaults, from HPAGE_PMD_NR.
    @property
    def max_ptes_none(self) -> int:
        return self.pmd_nr - 1

    @property
    def max_ptes_swap(self) -> int:
        return self.pmd_nr // 8

    @property
    def max_ptes_shared(self) -> int:
        return self.pmd_nr // 2

    @property
    def pages_to_scan(self) -> int:
        return self.pmd_nr * 8

    @property
    def pmd_order(self) -> int:
        """HPAGE_PMD_ORDER: the buddy order of one PMD-sized page."""
        return self.pmd_nr.bit_length() - 1

    def aligned(self, start: int, end: int) -> tuple[int, int]:
        """[hstart, hend): the PMD-aligned windows wholly inside [start, end) (may be empty)."""
        size = self.pmd_size
        hstart = (start + size - 1) & ~(size - 1)
        return hstart, max(hstart, end & ~(size - 1))


def read_geometry(sys_root: str = "/sys") -> Geometry:
    """sysconf(PAGE_SIZE) and sysfs hpage_pmd_size; 2 MiB where THP is compiled out."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open(f"{sys_root}/{HPAGE_PMD_SIZE_FILE}") as f:
            pmd = int(f.read())
    except (OSError, ValueError):
        pmd = page * (page // 8)  # a page table holds page_size / 8 entries
    return Geometry(page_size=page, pmd_size=pmd)


DEFAULT_GEOMETRY = Geometry()  # x86_64 and arm64 with 4 KiB pages; fixtures use it


@functools.cache
def running_geometry(sys_root: str = "/sys") -> Geometry:
    """The running kernel's geometry, read once per sysfs root."""
    return read_geometry(sys_root)
