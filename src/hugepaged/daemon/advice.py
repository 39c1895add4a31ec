"""khugepaged_enter_vma for hugepaged: MADV_HUGEPAGE and PR_SET_THP_DISABLE, acted on at once.

The kernel registers an mm with its khugepaged inside hugepage_madvise, so a process that
faulted its memory, went quiet and then called MADV_HUGEPAGE is scanned on the next pass. A
settled slot in hugepaged is only revisited when its fault counters move, and MADV_HUGEPAGE
moves none: the traced syscall wakes the slot (registering the process if it is unknown).

A sys_enter record is written before the syscall does its work, so the VMA flags the visit
reads may not have the advice yet. The record has the range, so the visit applies the advice
to the flags itself, exactly as hugepage_madvise sets them (VM_HUGEPAGE on, VM_NOHUGEPAGE
off); and where the process has neither faulted nor mapped anything since its VMAs were last
read, the visit takes that read with the advice applied instead of walking its page tables
again (smaps costs in proportion to the memory mapped). MADV_NOHUGEPAGE, and a
PR_SET_THP_DISABLE, drop that read: the next visit reads the process afresh.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from hugepaged.kernel.procfs import PR_THP_DISABLE_EXCEPT_ADVISED, Vma
from hugepaged.kernel.tracepoints import (
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    PR_SET_THP_DISABLE,
    SyscallEvent,
)

if TYPE_CHECKING:
    from .membership import Membership

log = logging.getLogger("hugepaged")
# A record without the advised range (an older format): the slot is visited this much
# later, so that the VMA flags it reads are the new ones.
ADVICE_SETTLE = 0.005
# Ranges kept per process, merged; a process that advises more distinct ranges than this
# before its next visit has its memory map read afresh instead (a flood stays bounded).
MAX_RANGES = 64
LOST_EVERY = 10.0  # lost records wake every process at most this often


def on_syscall(members: Membership, ev: SyscallEvent, now: float) -> float | None:
    """Apply one traced call to the registry; when the slot is next due, or None."""
    slot = members.registry.slots.get(ev.pid)
    if ev.what == "madvise" and ev.value == MADV_HUGEPAGE:
        if slot is None:
            slot = members.enter(ev.pid, settle=ADVICE_SETTLE)
            if slot is None:
                return None
        rng = advised_range(ev, members.kernel.geometry.page_size)
        slot.wake()
        slot.due = now + (ADVICE_SETTLE if rng is None else 0.0)
        if rng is not None:
            slot.advice = merged(slot.advice, rng)
            if len(slot.advice) > MAX_RANGES:
                slot.forget_map()
        log.debug("pid %d: MADV_HUGEPAGE", ev.pid,
                  extra={"event": "madvise", "pid": ev.pid, "advice": "MADV_HUGEPAGE"})
        return slot.due
    if ev.what == "madvise" and ev.value == MADV_NOHUGEPAGE and slot is not None:
        slot.forget_map()  # VM_NOHUGEPAGE: the next visit reads the flags afresh
        return None
    if ev.what in ("mremap", "mmap") and slot is not None:
        # A mapping moved (its flags go with it, to addresses a kept map gives to another) or
        # was replaced in place by one without them: the map kept for the visit is stale.
        forget_layout(slot)
        if ev.what == "mmap" and ev.length:
            # Memory mapped anew over windows the daemon collapsed is no split of theirs,
            # whatever frames the kernel hands out again (daemon/churn.py tells by frames).
            end = ev.start + ev.length
            for address in [a for a in slot.collapsed if ev.start <= a < end]:
                del slot.collapsed[address]
        return None
    if ev.what == "prctl" and ev.value == PR_SET_THP_DISABLE:
        # /proc shows PR_THP_DISABLE_EXCEPT_ADVISED only where THPeligible can (the kernel's
        # enabled=always): the traced call is remembered for the process, slot or not.
        members.kernel.procfs.note_thp_disable(ev.pid, ev.arg, ev.flags)
    if ev.what == "prctl" and ev.value == PR_SET_THP_DISABLE and slot is not None:
        # The visit in progress re-reads THP_enabled; memory allowed again is looked at now.
        slot.visit = None
        slot.forget_map()
        log.debug("pid %d: PR_SET_THP_DISABLE %d %d", ev.pid, ev.arg, ev.flags,
                  extra={"event": "prctl", "pid": ev.pid, "thp_disable": ev.arg,
                         "flags": ev.flags})
        if ev.arg == 0 or ev.flags & PR_THP_DISABLE_EXCEPT_ADVISED:  # allowed (somewhere) again
            slot.wake()
            slot.due = now + ADVICE_SETTLE
            return slot.due
    return None


def on_lost(members: Membership, lost: int, now: float) -> bool:
    """Records dropped from a full ring name no process: every slot is looked at again, at
    most every LOST_EVERY seconds (a flood of advice would otherwise have the daemon read
    every process's memory map all the time); True if it woke them."""
    members.lost_records += lost
    if now - members.lost_woken < LOST_EVERY:
        return False
    log.warning("%d syscall records lost: waking every process", members.lost_records,
                extra={"event": "syscall_records_lost", "lost": members.lost_records})
    members.lost_records, members.lost_woken = 0, now
    members.wake_all()
    for slot in list(members.registry.slots.values()):  # what was lost may have moved maps
        forget_layout(slot)
    return True


def forget_layout(slot) -> None:
    """The memory map kept for the slot's visit, and the verdicts read under it, are stale:
    the next step reads them again (a visit trusts its map while the traced calls say it
    holds: daemon/visit.py)."""
    slot.forget_map()
    slot.visit = slot.kept = None


def merged(ranges: list[tuple[int, int]], rng: tuple[int, int]) -> list[tuple[int, int]]:
    """`ranges` (sorted, disjoint) with [start, end) added: overlapping and adjacent ones
    become one, so a process advising the same memory over and over keeps one range."""
    start, end = rng
    out = []
    for a, b in ranges:
        if b < start or a > end:
            out.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    out.append((start, end))
    return sorted(out)


def advised_range(ev: SyscallEvent, page: int) -> tuple[int, int] | None:
    """[start, end) of a traced madvise as the kernel takes it (the length rounded up to a
    page); None where the record has no range or madvise refuses it (EINVAL)."""
    if ev.length <= 0 or ev.start % page:
        return None
    end = ev.start + -(-ev.length // page) * page
    return (ev.start, end) if end > ev.start else None


def apply_advice(vmas: list[Vma], start: int, end: int) -> list[Vma]:
    """The VMAs after MADV_HUGEPAGE over [start, end): hugepage_madvise's flags (hg on, nh
    off) on the part of each VMA inside the range, a VMA split where the range ends inside it
    (its sizes shared out by length), as the kernel splits it. A VMA merge with a neighbour
    is not guessed at: the next full read shows it."""
    out: list[Vma] = []
    for v in vmas:
        lo, hi = max(v.start, start), min(v.end, end)
        if lo >= hi or ("hg" in v.flags and "nh" not in v.flags):
            out.append(v)
            continue
        flags = (v.flags - {"nh"}) | {"hg"}
        for a, b, f in ((v.start, lo, v.flags), (lo, hi, flags), (hi, v.end, v.flags)):
            if a < b:
                out.append(_part(v, a, b, f))
    return out


_SIZES = ("rss_kb", "anonymous_kb", "anon_huge_kb", "shmem_pmd_kb", "file_pmd_kb")


def _part(v: Vma, start: int, end: int, flags: frozenset[str]) -> Vma:
    if (start, end) == (v.start, v.end):
        return replace(v, flags=flags)
    share = (end - start) / v.size
    sizes = {k: int(getattr(v, k) * share) for k in _SIZES}
    return replace(v, start=start, end=end, offset=v.offset + (start - v.start),
                   flags=flags, **sizes)
