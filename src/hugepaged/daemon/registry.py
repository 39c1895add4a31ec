"""The mm_slot list (mm/khugepaged.c): one slot per process, each holding a pidfd, and the cursor.

A pidfd pins the identity: once its process exits the pidfd polls readable, so a reused
pid is never taken for the old process.
"""

import errno
import logging
import os
import time
from dataclasses import dataclass, field

from hugepaged.errors import HugepagedError
from hugepaged.kernel.madvise import pidfd_exited, pidfd_open

log = logging.getLogger("hugepaged")
REFUSAL_LOG_EVERY = 60.0  # a full registry says so at most this often

# A slot whose last visit found nothing to do is checked again after this many seconds,
# doubling up to SETTLE_MAX while its fault counters stay put. A full rescan is forced
# RESCAN_MIN seconds after the last one even so (MADV_HUGEPAGE changes no counter); each
# forced rescan that finds nothing doubles that interval, up to RESCAN_MAX: a full scan reads
# /proc/PID/smaps, a page-table walk, so quiet processes must not pay it often (the cost of
# watching idle processes is measured in bench/bench_daemon.py idle).
SETTLE_MIN = 1.0
SETTLE_MAX = 64.0
RESCAN_MIN = 300.0
RESCAN_MAX = 3600.0


@dataclass
class MmSlot:
    """One registered process."""

    pid: int
    pidfd: int
    comm: str = "?"
    registered: float = field(default_factory=time.monotonic)
    fingerprint: tuple = ()
    settled_for: float = 0.0  # current back-off, 0 while the slot has work
    due: float = 0.0  # monotonic time of the next visit
    last_full: float = 0.0
    last_result: str = ""
    rescan_every: float = RESCAN_MIN  # forced full rescan of a quiet slot after this long
    forced: bool = False  # the visit in progress is a forced rescan
    # (THP enabled for the process, its VMAs) read when a visit starts at address 0 and
    # kept until the visit ends: a pass that stops mid-process (budget, CPU cap) resumes
    # without re-reading smaps, whose page-table walk grows with the memory mapped.
    visit: tuple | None = None
    # The process's policy (a CollapseControl: its target's, or the global one), resolved at
    # registration, on exec and on reload; None until resolved. `priority` orders the scan.
    control: object = None
    target: object = None  # the Target it matched, None: the global policy
    priority: int = 0
    anon_kb: int = 0  # Anonymous and AnonHugePages of its last smaps read (+ collapses since)
    anon_huge_kb: int = 0
    # The RSS its collapses added (kB; empty and zero-page PTEs filled): counted in the bloat
    # ledger of whichever target it has now, moved with it when a reload or exec changes it.
    bloat_kb: int = 0
    # Anonymous mTHP by folio kB as of a recent visit, and when it was counted (daemon/mthp).
    anon_mthp_kb: dict = field(default_factory=dict)
    mthp_at: float = 0.0
    # Where a visit that left the slot early (its target's CPU share ran dry) resumes.
    resume: int = 0
    wakes: int = 0  # wake() calls; one during a visit keeps the visit from settling the slot
    visit_wakes: int = 0
    visit_fp: tuple = ()  # fault counters when `visit` was read: moved = re-read before collapse
    errors: int = 0  # unexpected errors in a row
    # Whose /proc files the scan reads: the leader's, or, once the leader thread has exited
    # while others live (its /proc maps read empty), a live thread's.
    mm_pid: int = 0
    mm_pidfd: int = -1
    leader_gone: bool = False
    # The last full read of the memory map: ((minflt, majflt, rss, vsize), THP enabled, the
    # VMAs that can hold a window, how many cannot),
    # and the ranges MADV_HUGEPAGE'd since (traced): the next visit applies them to the flags
    # it reads, or to that read if the process neither faulted nor mapped anything since.
    last_map: tuple | None = None
    advice: list = field(default_factory=list)
    # Verdicts decided and not yet used, when a pass stopped for the CPU pace: (address of
    # their first window, Verdicts, when read, visit_fp then). The next pass takes them
    # instead of reading the page state again, while they are fresh (daemon/visit.py).
    kept: tuple | None = None
    # Windows this daemon collapsed, by address, watched for being split again
    # (daemon/churn.py).
    collapsed: dict = field(default_factory=dict)
    visits: int = 0  # visits started (a window no visit meets is forgotten)
    small_anon: list = field(default_factory=list)  # small VMAs with anonymous memory
    hold_until: float = 0.0  # when the first held window's hold ends: a visit is due then
    waiting: str = ""  # what a visit left early waits for: "share", "lane", "pressure"
    cgroup2: str | None = None  # its cgroup2 group (read once: memory pressure by cgroup)
    pressured: bool = False  # its collapses are paused for memory pressure

    def exited(self) -> bool:
        return pidfd_exited(self.pidfd)

    def close(self) -> None:
        for fd in (self.pidfd, self.mm_pidfd):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.mm_pidfd = -1

    def settle(self, now: float) -> None:
        """Nothing to do here: look again later, and later still if nothing changes."""
        self.settled_for = min(SETTLE_MAX, max(SETTLE_MIN, self.settled_for * 2))
        self.due = now + self.settled_for

    def forget_map(self) -> None:
        """The flags may have changed in a way the advice does not say: read them afresh."""
        self.last_map = None
        self.advice = []

    def wake(self) -> None:
        self.wakes += 1
        self.settled_for, self.due = 0.0, 0.0
        self.rescan_every = RESCAN_MIN


@dataclass
class Cursor:
    """khugepaged_scan: the slot being scanned and the next address in it."""

    pid: int | None = None
    address: int = 0


class Registry:
    """Slots in scan order: by priority, highest first, then in registration order; a new
    slot enters at the tail of its priority, behind the cursor."""

    def __init__(self, own_pid: int | None = None) -> None:
        self.slots: dict[int, MmSlot] = {}  # insertion order is the scan order
        self.cursor = Cursor()
        self.own_pid = os.getpid() if own_pid is None else own_pid
        self._order: list[int] | None = None  # scan order and positions, rebuilt on change
        self._pos: dict[int, int] = {}
        self._mixed = False  # more than one priority among the slots
        # One pidfd per slot: at most this many slots, so the fd limit is never reached by
        # the registry (None: no bound). A refusal is counted and logged, rate-limited.
        self.capacity: int | None = None
        self.refused = 0
        self._refused_logged = 0
        self._last_refusal_log = -REFUSAL_LOG_EVERY
        # Targeted mode: pidfds taken when the daemon started, by pid. A pid whose pinned
        # process has exited is a different process now and is never registered.
        self.pinned: dict[int, int] = {}
        self.on_wrap = None  # called when the cursor wraps past the tail (full_scans)

    def __len__(self) -> int:
        return len(self.slots)

    def __contains__(self, pid: int) -> bool:
        return pid in self.slots

    def enter(self, pid: int, comm: str = "?") -> MmSlot | None:
        """__khugepaged_enter: register once; None if it cannot be (gone, ourselves)."""
        if pid == self.own_pid or pid in self.slots:
            return self.slots.get(pid)
        if self.capacity is not None and len(self.slots) >= self.capacity:
            self._refuse(pid, f"registry full ({self.capacity} processes, the fd limit)")
            return None
        try:
            pidfd = self._pidfd(pid)
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                self._refuse(pid, f"no file descriptor for a pidfd ({err.strerror})")
            return None
        except HugepagedError:
            return None
        if pidfd is None:
            return None
        slot = MmSlot(pid, pidfd, comm)
        self.slots[pid] = slot
        self._order = None
        return slot

    def _pidfd(self, pid: int) -> int | None:
        pinned = self.pinned.get(pid)
        if pinned is None:
            return pidfd_open(pid)
        if pidfd_exited(pinned):
            return None  # the pid now names a different process
        return os.dup(pinned)

    def _refuse(self, pid: int, why: str) -> None:
        """Counted always, logged once a minute with the count since the last line."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_EVERY:
            log.warning("pid %d not registered: %s; %d refused since the last report", pid,
                        why, self.refused - self._refused_logged,
                        extra={"event": "register_refused", "pid": pid, "reason": why,
                               "refused": self.refused})
            self._last_refusal_log, self._refused_logged = now, self.refused

    def exit(self, pid: int) -> bool:
        """khugepaged_exit/collect_mm_slot: the slot goes; the cursor moves past it."""
        slot = self.slots.get(pid)
        if slot is None:
            return False
        if self.cursor.pid == pid:
            self.advance(pid)  # collect_mm_slot at the tail still completes a full scan
        del self.slots[pid]
        self._order = None
        slot.close()
        return True

    def reorder(self) -> None:
        """A slot's priority changed (exec, reload): the scan order is rebuilt."""
        self._order = None

    def _ordered(self) -> list[int]:
        if self._order is None:  # sorted() is stable: registration order within a priority
            self._order = sorted(self.slots, key=lambda p: -self.slots[p].priority)
            self._pos = {p: i for i, p in enumerate(self._order)}
            self._mixed = len({s.priority for s in self.slots.values()}) > 1
        return self._order

    def advance(self, pid: int) -> None:
        """The one place the cursor leaves a slot; wrapping past the tail is a full scan."""
        self.cursor.pid, self.cursor.address = self.next_pid(pid), 0
        if self.cursor.pid is None and self.on_wrap is not None:
            self.on_wrap()

    def next_pid(self, pid: int) -> int | None:
        """The pid after `pid` in scan order, or None at the end of the list (O(1): a pass
        over hundreds of settled slots does this for each)."""
        order = self._ordered()
        i = self._pos[pid] + 1
        return order[i] if i < len(order) else None

    def preempting(self, pid: int, now: float) -> int | None:
        """A due slot of higher priority than `pid`'s, highest first, if there is one (looked
        for only while the slots' priorities differ)."""
        order = self._ordered()
        if not self._mixed:
            return None
        floor = self.slots[pid].priority
        for p in order:
            s = self.slots[p]
            if s.priority <= floor:
                return None
            if s.due <= now:
                return p
        return None

    def first_pid(self) -> int | None:
        order = self._ordered()
        return order[0] if order else None

    def next_due(self) -> float | None:
        return min((s.due for s in self.slots.values()), default=None)

    def next_resume(self) -> float | None:
        """When the first slot left mid-visit for its target's CPU share is due back (the
        control thread asks too: the values are copied first, in one call)."""
        return min((s.due for s in list(self.slots.values()) if s.resume), default=None)

    def close(self) -> None:
        for slot in list(self.slots.values()):
            slot.close()
        self.slots.clear()
        self._order = None
        for fd in self.pinned.values():
            os.close(fd)
        self.pinned.clear()
