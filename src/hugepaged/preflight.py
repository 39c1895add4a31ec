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
    """What `collapse` and the daemon need besides: kpageflags, and MADV_COLLAPSE through
    process_madvise, tried on a page of our own rather than inferred from the kernel's
    version (backports exist; seccomp filters refuse what a version promises)."""
    from hugepaged.kernel.madvise import probe_collapse

    require_scan_support(kernel)
    if not os.path.exists(f"{kernel.proc_root}/kpageflags"):
        raise Unsupported(f"{kernel.proc_root}/kpageflags is missing (CONFIG_PROC_PAGE_MONITOR)")
    probe_collapse(kernel.geometry.pmd_size)
