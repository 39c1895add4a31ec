"""collapse_huge_page in userspace: one window per process_madvise(MADV_COLLAPSE) call.

The kernel re-checks everything under its own locks; what comes back is an errno, mapped
here (and only here) to the kernel's result codes.
"""

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass

from hugepaged.errors import AccessDenied, ProcessGone
from hugepaged.kernel.madvise import MADV_COLLAPSE, process_madvise
from hugepaged.results import ScanResult


@dataclass(frozen=True)
class CollapseOutcome:
    """What one collapse attempt came to."""

    address: int
    result: ScanResult
    errno: int = 0
    seconds: float = 0.0
    attempts: int = 1

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno)) if self.errno else ""


def result_of_errno(err: int, still_mapped: Callable[[], bool]) -> ScanResult:
    """errno of MADV_COLLAPSE → result code (mm/khugepaged.c madvise_collapse_errno)."""
    if err == errno.ENOMEM:
        # ENOMEM is also madvise's "range not mapped": only a mapped range is an
        # allocation failure.
        return ScanResult.ALLOC_HUGE_PAGE_FAIL if still_mapped() else ScanResult.VMA_NULL
    if err == errno.EBUSY:
        return ScanResult.CGROUP_CHARGE_FAIL
    if err == errno.EINVAL:
        return ScanResult.VMA_CHECK
    return ScanResult.FAIL  # EAGAIN after the retry: page locked, pinned or off the LRU


def collapse_window(pidfd: int, pid: int, address: int, size: int,
                    still_mapped: Callable[[], bool]) -> CollapseOutcome:
    """Collapse one window now; EAGAIN (transient) is retried once."""
    t0 = time.perf_counter()
    attempts = 0
    while True:
        attempts += 1
        ret = process_madvise(pidfd, address, size, MADV_COLLAPSE)
        if ret >= 0 or -ret != errno.EAGAIN or attempts == 2:
            break
    seconds = time.perf_counter() - t0
    if ret >= 0:
        return CollapseOutcome(address, ScanResult.SUCCEED, 0, seconds, attempts)
    err = -ret
    if err == errno.ESRCH:
        raise ProcessGone(f"pid {pid}: process has exited")
    if err == errno.EPERM:
        raise AccessDenied(f"pid {pid}: MADV_COLLAPSE not permitted "
                           "(needs CAP_SYS_NICE and ptrace access)")
    return CollapseOutcome(address, result_of_errno(err, still_mapped), err, seconds, attempts)


def collapse_windows(pidfd: int, pid: int, addresses: list[int], size: int,
                     still_mapped: Callable[[int], bool]) -> list[CollapseOutcome]:
    """Collapse each window in turn; stops early only if the process exits."""
    return [collapse_window(pidfd, pid, a, size, lambda a=a: still_mapped(a))
            for a in addresses]
