"""khugepaged_enter_vma for hugepaged: MADV_HUGEPAGE and PR_SET_THP_DISABLE, acted on at once.

The kernel registers an mm with its khugepaged inside hugepage_madvise, so a process that
faulted its memory, went quiet and then called MADV_HUGEPAGE is scanned on the next pass. A
settled slot in hugepaged is only revisited when its fault counters move, and MADV_HUGEPAGE
moves none: the traced syscall wakes the slot (registering the process if it is unknown).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hugepaged.kernel.tracepoints import MADV_HUGEPAGE, PR_SET_THP_DISABLE, SyscallEvent

if TYPE_CHECKING:
    from .khugepaged import Khugepaged

log = logging.getLogger("hugepaged")
# A sys_enter record is written before the syscall does its work; the slot is visited this
# much later, so that the VMA flags it reads are the new ones.
ADVICE_SETTLE = 0.005


def on_syscall(core: Khugepaged, ev: SyscallEvent, now: float) -> float | None:
    """Apply one traced call to the registry; when the slot is next due, or None."""
    slot = core.registry.slots.get(ev.pid)
    if ev.what == "madvise" and ev.value == MADV_HUGEPAGE:
        if slot is None:
            slot = core.enter(ev.pid, settle=ADVICE_SETTLE)
            if slot is None:
                return None
        slot.wake()
        slot.due = now + ADVICE_SETTLE
        log.debug("pid %d: MADV_HUGEPAGE", ev.pid,
                  extra={"event": "madvise", "pid": ev.pid, "advice": "MADV_HUGEPAGE"})
        return slot.due
    if ev.what == "prctl" and ev.value == PR_SET_THP_DISABLE and slot is not None:
        # The visit in progress re-reads THP_enabled; memory allowed again is looked at now.
        slot.visit = None
        log.debug("pid %d: PR_SET_THP_DISABLE %d", ev.pid, ev.arg,
                  extra={"event": "prctl", "pid": ev.pid, "thp_disable": ev.arg})
        if ev.arg == 0:
            slot.wake()
            slot.due = now + ADVICE_SETTLE
            return slot.due
    return None


def on_lost(core: Khugepaged, lost: int) -> None:
    """Records dropped from a full ring name no process: every slot is looked at again."""
    log.warning("%d syscall records lost: waking every process", lost,
                extra={"event": "syscall_records_lost", "lost": lost})
    for slot in core.registry.slots.values():
        slot.wake()
