"""collapse_huge_page in userspace: process_madvise(MADV_COLLAPSE) calls, one iovec a window.

The kernel re-checks everything under its own locks; what comes back is an errno, mapped
here (and only here) to the kernel's result codes.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hugepaged.errors import AccessDenied, HugepagedError, ProcessGone
from hugepaged.kernel.madvise import MADV_COLLAPSE, process_madvise, process_madvise_windows
from hugepaged.results import ScanResult

if TYPE_CHECKING:
    from hugepaged.kernel import Kernel, KPageFlags
    from hugepaged.policy import CollapseControl


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


R = ScanResult
# madvise_collapse_errno (mm/khugepaged.c): which results each errno stands for. EINVAL is
# its default, and also madvise's answer for a VMA thp_vma_allowable_order refuses up front.
EBUSY_RESULTS = frozenset({R.CGROUP_CHARGE_FAIL, R.EXCEED_NONE_PTE})
EAGAIN_RESULTS = frozenset({R.PAGE_COUNT, R.PAGE_LOCK, R.PAGE_LRU, R.DEL_PAGE_LRU,
                            R.PAGE_FILLED})
_KERNEL = frozenset(r for r in R if r < R.COLLAPSE_EINVAL)
EINVAL_RESULTS = _KERNEL - EBUSY_RESULTS - EAGAIN_RESULTS - {
    R.SUCCEED, R.PMD_MAPPED, R.ALLOC_HUGE_PAGE_FAIL}
# What a re-read of the window's page state can show; the others only the kernel sees under
# its locks (a pin's reference count, a cgroup charge, a page the collapse itself isolated).
OBSERVABLE = frozenset({R.PMD_NULL, R.PMD_NONE, R.PMD_MAPPED, R.EXCEED_NONE_PTE,
                        R.EXCEED_SWAP_PTE, R.EXCEED_SHARED_PTE, R.PTE_UFFD_WP, R.PAGE_NULL,
                        R.PAGE_ANON, R.PAGE_LRU, R.PAGE_LOCK, R.VMA_NULL, R.VMA_CHECK})
_BY_ERRNO = {errno.EBUSY: (EBUSY_RESULTS, R.COLLAPSE_EBUSY),
             errno.EAGAIN: (EAGAIN_RESULTS, R.COLLAPSE_EAGAIN),
             errno.EINVAL: (EINVAL_RESULTS, R.COLLAPSE_EINVAL)}
# The window's result now, decided again under MADV_COLLAPSE's rules (VMA_NULL: unmapped,
# VMA_CHECK: no longer eligible); None when it cannot be known.
Redecide = Callable[[], ScanResult | None]


def result_of_errno(err: int, redecide: Redecide) -> ScanResult:
    """errno of MADV_COLLAPSE -> the result, named only as far as the errno and a re-decision
    of the window tell: a kernel result the errno stands for that the page state shows now,
    or the only one it can stand for that the page state cannot show; else hugepaged's
    COLLAPSE_<errno>."""
    if err == errno.ENOMEM:
        # ENOMEM is also madvise's "range not mapped": only a mapped range is an
        # allocation failure (the one result madvise_collapse_errno gives ENOMEM for).
        return R.VMA_NULL if redecide() == R.VMA_NULL else R.ALLOC_HUGE_PAGE_FAIL
    if err not in _BY_ERRNO:
        return R.COLLAPSE_ERRNO
    candidates, unnamed = _BY_ERRNO[err]
    now = redecide()
    if now is None:
        return unnamed
    if now in candidates:
        return now
    hidden = candidates - OBSERVABLE  # what the page state would not show us anyway
    return next(iter(hidden)) if len(hidden) == 1 else unnamed


def window_now(kernel: Kernel, pid: int, kpf: KPageFlags, control: CollapseControl,
               address: int) -> ScanResult | None:
    """The window's result decided again from fresh page state under MADV_COLLAPSE's rules
    (the ones the failed call obeyed), after an LRU drain as madvise_collapse does first:
    VMA_NULL if nothing is mapped there now, VMA_CHECK if its VMA is no longer eligible."""
    from hugepaged.scan.process import ProcessScanner

    try:
        vmas = kernel.procfs.smaps(pid)
        thp_enabled = kernel.procfs.status(pid).thp_enabled
        vma = next((v for v in vmas if v.start <= address < v.end), None)
        if vma is None:
            return R.VMA_NULL
        kernel.drain_lru()
        size = kernel.geometry.pmd_size
        forced = dataclasses.replace(control, is_khugepaged=False)
        with ProcessScanner(kernel, pid, kpf, forced) as mm:
            if mm.ineligible(vma, not thp_enabled) is not None:
                return R.VMA_CHECK
            return R(int(mm.decide_range(vma, address, address + size).codes[0]))
    except (HugepagedError, OSError, LookupError):
        return None


def collapse_window(pidfd: int, pid: int, address: int, size: int,
                    redecide: Redecide = lambda: None) -> CollapseOutcome:
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
    return CollapseOutcome(address, result_of_errno(err, redecide), err, seconds, attempts)


def collapse_run(pidfd: int, pid: int, addresses: list[int], size: int,
                 redecide: Callable[[int], ScanResult | None]) -> list[CollapseOutcome]:
    """Collapse consecutive windows with one process_madvise call, one iovec each.

    The kernel stops at the first window that fails and returns the bytes it advised: the
    windows before it succeeded, and that one is collapsed again alone to learn its errno
    (or succeeds then); the rest go in the next call, unless the failure was the huge page's
    allocation (madvise_collapse stops its range there too). Every window gets its own outcome; the
    time of a call is shared out evenly among the windows it collapsed. A process that exits
    or refuses us part-way ends the run with the outcomes so far (the next call raises).
    """
    out: list[CollapseOutcome] = []
    i = 0
    while i < len(addresses):
        if len(addresses) - i == 1:
            step = [_single(pidfd, pid, addresses[i], size, redecide, out)]
        else:
            step = _batch(pidfd, pid, addresses[i:], size, redecide, out)
        if not step or step[-1] is None:
            break
        out += step
        i += len(step)
        if out[-1].result == R.ALLOC_HUGE_PAGE_FAIL:
            break  # as madvise_collapse and khugepaged: no huge page now, stop here
    return out


def _single(pidfd, pid, address, size, redecide, done) -> CollapseOutcome | None:
    try:
        return collapse_window(pidfd, pid, address, size, lambda: redecide(address))
    except (ProcessGone, AccessDenied):
        if not done:
            raise
        return None


def _batch(pidfd, pid, addresses, size, redecide, done) -> list[CollapseOutcome]:
    t0 = time.perf_counter()
    ret = process_madvise_windows(pidfd, addresses, size, MADV_COLLAPSE)
    seconds = time.perf_counter() - t0
    if ret < 0:  # the first window failed: collapse it alone for its own outcome
        one = _single(pidfd, pid, addresses[0], size, redecide, done)
        return [] if one is None else [one]
    ok = min(ret // size, len(addresses))
    each = seconds / max(ok, 1)
    step = [CollapseOutcome(a, R.SUCCEED, 0, each) for a in addresses[:ok]]
    if ok < len(addresses):
        one = _single(pidfd, pid, addresses[ok], size, redecide, done + step)
        step += [] if one is None else [one]
    return step


# Back-offs before the one-shot collapse tries its EAGAIN windows again. EAGAIN is a page
# someone else holds for a moment (a reference taken by DAMON's sampling, a page compaction
# has isolated to migrate, a lock); khugepaged just meets the window again on a later scan,
# a command must not give up on its first meeting.
TRANSIENT_BACKOFF = (0.02, 0.1, 0.5)


def retry_transient(outcomes: list[CollapseOutcome],
                    again: Callable[[list[int]], list[CollapseOutcome]],
                    backoff: tuple[float, ...] = TRANSIENT_BACKOFF,
                    sleep: Callable[[float], None] = time.sleep) -> list[CollapseOutcome]:
    """Collapse the EAGAIN windows again after each back-off, until none is left.

    `again(addresses)` collapses those windows and returns one outcome per window it reached
    (fewer if the process exited). An outcome keeps its place; a retried window's attempts
    and time add up, so the report says how often it was asked. A process that exits or
    refuses us meanwhile ends the retries, its first outcomes kept."""
    by_address = {o.address: o for o in outcomes}
    for delay in backoff:
        pending = [o.address for o in by_address.values() if o.errno == errno.EAGAIN]
        if not pending:
            break
        sleep(delay)
        try:
            retried = again(pending)
        except (ProcessGone, AccessDenied):  # gone meanwhile: what it had stays reported
            break
        for o in retried:
            before = by_address[o.address]
            by_address[o.address] = dataclasses.replace(
                o, attempts=before.attempts + o.attempts, seconds=before.seconds + o.seconds)
    return [by_address[o.address] for o in outcomes]


def collapse_windows(pidfd: int, pid: int, addresses: list[int], size: int,
                     redecide: Callable[[int], ScanResult | None]) -> list[CollapseOutcome]:
    """Collapse each window in turn; stops early only if the process exits."""
    return [collapse_window(pidfd, pid, a, size, lambda a=a: redecide(a))
            for a in addresses]
