"""Access sources: which pages were touched, for the young-bit half of hpage_collapse_scan_pmd.

khugepaged counts a present page as referenced when its PTE is young or its folio is young or
referenced, and gives up a window with no referenced page (or, with swapped PTEs, fewer than
half) as LACK_REFERENCED_PAGE. Userspace cannot read a PTE's young bit; an access source
tells the same fact over an interval. Every source answers the same three things
(AccessSource); the kernel layer chooses one, once (Kernel.access_source): idle page
tracking where the kernel has it (kernel/pageidle.py). Another source (DAMON's access
samples, soft-dirty) is one more module and one more line in `choose`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np


class AccessSource(Protocol):
    """Per-page access facts for the windows a visit decides."""

    name: str  # what status and the metrics call it

    def referenced(self, pagemap: np.ndarray, kflags: np.ndarray) -> np.ndarray:
        """(n, HPAGE_PMD_NR) bool: which present pages of these windows count as
        referenced (their pagemap entries and kpageflags given, shaped alike)."""
        ...

    def leave(self, pagemap: np.ndarray) -> None:
        """The visit leaves these windows uncollapsed: start the interval its next visit
        reads (a source that only reads does nothing)."""
        ...

    def close(self) -> None: ...


def choose(sys_root: str, page_idle_path: str = "", *, mark: bool) -> AccessSource | None:
    """The access source this kernel offers, or None (LACK_REFERENCED_PAGE is then not
    applied, and `scan` says so). `mark`: the daemon's use, which starts intervals; `scan`
    only reads."""
    from hugepaged.kernel.pageidle import PageIdleSource, bitmap_path, open_page_idle

    idle = open_page_idle(page_idle_path or bitmap_path(sys_root))
    return PageIdleSource(idle, mark) if idle is not None else None
