"""What one visit of a process reads from /proc, read once and passed down (psutil's
`oneshot` is the model): /proc/PID/stat for the due check, the fingerprint and the leader's
state, then status and smaps for the memory map.

A settled process is visited when due and only if its counters moved; a visit that resumes
mid-process re-reads the counters before it collapses, because the VMAs it kept may be stale
(hugepage_vma_revalidate).
"""

from __future__ import annotations

import logging
import os

from hugepaged.errors import HugepagedError, ProcessGone
from hugepaged.kernel.madvise import pidfd_exited, pidfd_open
from hugepaged.kernel.procfs import ProcStat

from .advice import apply_advice
from .registry import MmSlot

log = logging.getLogger("hugepaged")


class ProcessView:
    """One process's /proc/PID/stat, read at most once until refresh()."""

    def __init__(self, procfs, pid: int) -> None:
        self.procfs, self.pid = procfs, pid
        self._stat: ProcStat | None = None

    def stat(self) -> ProcStat:
        if self._stat is None:
            self._stat = self.procfs.stat(self.pid)
        return self._stat

    def refresh(self) -> ProcStat:
        self._stat = None
        return self.stat()

    def moved_since(self, faults: tuple) -> bool:
        """Read the counters afresh: have they moved since `faults` was taken?"""
        self.refresh()
        return self.faults() != faults

    def faults(self) -> tuple:
        """The fault counters and RSS: moved means the page tables may have changed."""
        st = self.stat()
        return (st.minflt, st.majflt, st.rss_pages)

    def fingerprint(self) -> tuple:
        """faults() and the size mapped: a new mapping (MADV_HUGEPAGE'd memory not yet
        touched, say) changes it too, where no syscall tracepoint tells of the advice."""
        st = self.stat()
        return (st.minflt, st.majflt, st.rss_pages, st.vsize)


def due(slot: MmSlot, view: ProcessView, now: float) -> bool:
    """A settled slot is visited when due, and only if its fingerprint moved (or a forced
    full rescan is due: MADV_HUGEPAGE moves no counter)."""
    if slot.due > now:
        return False
    try:
        fp = view.fingerprint()
    except (HugepagedError, OSError):
        return True  # let the scan find out and drop it
    changed = fp != slot.fingerprint
    slot.fingerprint = fp
    if slot.settled_for and not changed:
        if now - slot.last_full < slot.rescan_every:
            slot.settle(now)
            return False
        slot.forced = True
    return True


def mm_of(slot: MmSlot, view: ProcessView) -> int:
    """The pid whose /proc files show the process's memory: the leader's while it runs,
    else a live thread's (the process lives while any thread does)."""
    if slot.mm_pid and slot.mm_pid != slot.pid and not pidfd_exited(slot.mm_pidfd):
        return slot.mm_pid
    if view.stat().state != "Z":
        slot.mm_pid = slot.pid
        return slot.pid
    for tid in view.procfs.tasks(slot.pid):
        if tid == slot.pid:
            continue
        try:
            fd = pidfd_open(tid, thread=True)
        except (HugepagedError, OSError):
            continue
        if slot.mm_pidfd >= 0:
            os.close(slot.mm_pidfd)
        slot.mm_pid, slot.mm_pidfd = tid, fd
        log.info("pid %d: leader thread exited; reading its memory through thread %d",
                 slot.pid, tid, extra={"event": "leader_exit", "pid": slot.pid, "tid": tid})
        return tid
    raise ProcessGone(f"pid {slot.pid}: no live thread")


def memory_map(slot: MmSlot, view: ProcessView) -> tuple[bool, list]:
    """(THP enabled, VMAs) for a visit: /proc/PID/status and smaps, with the MADV_HUGEPAGE
    traced since applied (daemon/advice.py). A visit woken by that advice, in a process
    that has neither faulted nor mapped anything since its last read, takes that read
    instead: smaps walks every page table, and the advice changed only flags."""
    mm_pid = mm_of(slot, view)
    mm_view = view if mm_pid == view.pid else ProcessView(view.procfs, mm_pid)
    fp = mm_view.fingerprint()
    advice, slot.advice = slot.advice, []
    if advice and slot.last_map is not None and slot.last_map[0] == fp:
        thp_enabled, vmas = slot.last_map[1], slot.last_map[2]
    else:
        thp_enabled = view.procfs.status(mm_pid).thp_enabled
        vmas = view.procfs.smaps(mm_pid)
    for start, end in advice:
        vmas = apply_advice(vmas, start, end)
    slot.last_map = (fp, thp_enabled, vmas)
    return thp_enabled, vmas
