"""The young-bit half of hpage_collapse_scan_pmd: which PTEs of a window were referenced.

khugepaged counts a present page as referenced when its PTE is young or its folio is young
or referenced, and gives up a window with no referenced page (or, with swapped PTEs, fewer
than half) as LACK_REFERENCED_PAGE. From userspace the young bits are read over an interval
through idle page tracking: the daemon marks the frames of a window it leaves, and its next
visit reads which of them were touched since. A frame it never marked reads as referenced,
as a freshly faulted page's young PTE does for the kernel. `scan` reads only: it marks
nothing, so it changes no young bit the daemon or reclaim relies on.
"""

from dataclasses import dataclass

import numpy as np

from hugepaged.kernel.kpageflags import KPF_REFERENCED
from hugepaged.kernel.pageidle import PageIdle
from hugepaged.kernel.pagemap import PM_PFN_MASK, PM_PRESENT

_U = np.uint64


@dataclass
class Referenced:
    """A per-page access source; `mark` is the daemon's (mark the windows it leaves)."""

    idle: PageIdle
    mark: bool = False

    def of(self, pagemap: np.ndarray, kflags: np.ndarray) -> np.ndarray:
        """(n, 512) bool: present frames not idle since marked, or with PG_referenced."""
        pfns = _present_pfns(pagemap)
        return ~self.idle.idle(pfns) | ((kflags & _U(KPF_REFERENCED)) != 0)

    def leave(self, pagemap: np.ndarray) -> None:
        """Mark the present frames of windows not collapsed now, for the next visit."""
        if self.mark and pagemap.size:
            self.idle.mark(_present_pfns(pagemap))


def _present_pfns(pagemap: np.ndarray) -> np.ndarray:
    return np.where(pagemap >= _U(PM_PRESENT), pagemap & _U(PM_PFN_MASK), _U(0))
