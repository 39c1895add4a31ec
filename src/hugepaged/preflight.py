"""Start-up checks every command that reads page state or collapses shares, in one place.

Below both the command line and the daemon, so neither reaches into the other for them.
"""

import os

from hugepaged.errors import AccessDenied, Unsupported
from hugepaged.kernel import Kernel


def require_root() -> None:
    if os.geteuid() != 0:
        raise AccessDenied("hugepaged needs root: PFNs and /proc/kpageflags need "
                           "CAP_SYS_ADMIN, MADV_COLLAPSE on another process CAP_SYS_NICE")


def require_scan_support(kernel: Kernel) -> None:
    """What `scan` and `top` need: root and THP compiled in."""
    require_root()
    kernel.thp.require()


def require_collapse_support(kernel: Kernel) -> None:
    """What `collapse` and the daemon need besides: MADV_COLLAPSE and kpageflags."""
    from hugepaged.kernel.madvise import require_collapse_support as madv_collapse

    require_scan_support(kernel)
    madv_collapse()
    if not os.path.exists(f"{kernel.proc_root}/kpageflags"):
        raise Unsupported(f"{kernel.proc_root}/kpageflags is missing (CONFIG_PROC_PAGE_MONITOR)")
