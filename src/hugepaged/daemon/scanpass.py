"""The pass: khugepaged_do_scan and khugepaged_scan_mm_slot, over process_madvise(MADV_COLLAPSE).

Progress is accounted as the kernel does: HPAGE_PMD_NR per window examined, 1 per VMA (or
settled process) skipped, up to pages_to_scan per pass. The pass owns the cursor's movement
and the size of each read; whether a collapse may start, and the collapse itself, are the
collapser's; who is scanned, and by which policy, is membership's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hugepaged.errors import AccessDenied, HugepagedError, ProcessGone

from . import schedule as sched
from .collapser import Collapser, Halt
from .counters import Counters
from .lanes import Lanes
from .membership import Membership
from .mthp import MthpSampler
from .promise import Promises
from .ratelimit import RateLimited
from .registry import RESCAN_MAX, MmSlot
from .visit import ProcessView, Visit, Visitor, due

log = logging.getLogger("hugepaged")
MAX_ERRORS = 3  # unexpected errors in a row before a slot is dropped
IDLE_MIN = 5.0  # an idle pass (nothing due, nothing done) is not repeated sooner
LANE_POLL = 1.0  # a pass stopped for a full lane: a finished batch wakes the loop before
# lru_add_drain_all() at most this often: a paced daemon passes many times a second, and a
# page faulted since the last drain that still reads PAGE_LRU is met again a second later.
DRAIN_EVERY = 1.0
OBSTACLES = {"share": "its CPU share (max_cpu_percent)", "pressure": "memory pressure",
             "lane": "its collapse worker's lane full"}


class ScanPass:
    """The cursor's walk over the registry, one pass at a time."""

    def __init__(self, kernel, membership: Membership, collapser: Collapser, lanes: Lanes,
                 counters: Counters, schedule: sched.Schedule, clock: Callable[[], float],
                 referenced=None) -> None:
        self.kernel, self.membership, self.collapser, self.lanes = (kernel, membership,
                                                                    collapser, lanes)
        self.counters, self.schedule, self.clock = counters, schedule, clock
        self.referenced = referenced  # the access source for the young-bit check, or None
        self.registry = membership.registry
        self.mthp = MthpSampler(kernel)
        self.promises = Promises(membership, clock)
        self.errors = RateLimited(log, clock=clock)
        self.visitor = Visitor(kernel, membership, collapser, lanes, referenced)
        self._return_to: int | None = None  # the slot a higher priority one cut in before
        self._drained = float("-inf")
        membership.on_exit.append(self.forget)
        self.registry.on_wrap = self._full_scan

    @property
    def tunables(self):
        return self.collapser.tunables

    def forget(self, pid: int) -> None:
        """A slot goes: the cursor moves past it (collect_mm_slot at the tail still completes
        a full scan), and what its visits kept is forgotten."""
        self.visitor.forget(pid)
        self.collapser.forget(pid)
        self.lanes.forget(pid)
        if self.registry.cursor.pid == pid:
            self._advance(pid)

    # --- khugepaged_do_scan ----------------------------------------------------------
    def do_scan(self) -> bool:
        """One pass of at most pages_to_scan; True if it did work."""
        cur, c = self.registry.cursor, self.collapser
        pages = self.tunables.pages_to_scan
        progress, through_head, worked = 0, 0, False
        self.counters.passes += 1
        self.lanes.reap()
        self.lanes.stalled = False
        if self.clock() - self._drained >= DRAIN_EVERY:
            self.kernel.drain_lru()  # khugepaged_do_scan: lru_add_drain_all()
            self._drained = self.clock()
        c.ticket = c.budget.allows(self.clock())
        while progress < pages and not c.stopping:
            if cur.pid is None:
                through_head += 1
                if through_head >= 2 or not self.registry:
                    break
                cur.pid, cur.address = self.registry.first_pid(), 0
            if cur.address == 0:
                self._preempt()
            step, visited, halt = self.scan_mm_slot(pages - progress)
            progress += step
            worked |= visited
            if halt:
                worked = True
                break
        self._share_deadlines()
        self.promises.evaluate()
        return worked

    def _share_deadlines(self) -> None:
        """The schedule's waits of visits left early, as their slots say: for a target's
        share (one deadline per target) or for memory pressure to fall."""
        waits: dict[str, float] = {}
        for slot in self.registry.slots.values():
            if not slot.resume:
                continue
            name = self.membership.control_for(slot).target
            key = sched.PRESSURE if slot.waiting == "pressure" else \
                sched.SHARE + name if slot.waiting == "share" and name is not None else None
            if key is not None:
                waits[key] = min(waits.get(key, slot.due), slot.due)
        for name, _ in list(self.schedule.shares()):
            if sched.SHARE + name not in waits:
                self.schedule.clear(sched.SHARE + name)
        if sched.PRESSURE not in waits:
            self.schedule.clear(sched.PRESSURE)
        for key, when in waits.items():
            self.schedule.set(key, when)

    def after(self, worked: bool, now: float) -> float:
        """When the next pass is due (khugepaged_wait_work): scan_sleep_millisecs after work;
        after an idle pass, when the first settled slot is due (not sooner than IDLE_MIN);
        either way no later than a visit waiting for its target's share may go on (its share
        is its pace: a scan_sleep on top of it, one call of max_stall_ms a pass, would hold
        a target to a fraction of its share); a pass stopped for a full lane is taken up when
        a batch finishes."""
        if self.lanes.stalled:
            return now + LANE_POLL
        sleep = self.tunables.scan_sleep_millisecs / 1000.0
        waiting = self.registry.next_resume()
        if worked:
            return now + sleep if waiting is None else min(now + sleep, max(now, waiting))
        first = self.registry.next_due()
        idle = max(now + max(sleep, IDLE_MIN), first if first is not None else now + IDLE_MIN)
        return idle if waiting is None else min(idle, max(now + sleep, waiting))

    def _preempt(self) -> None:
        """A due slot of higher priority goes before the one the cursor is at; the cursor
        comes back to that one afterwards, so one priority keeps its cursor order."""
        cur = self.registry.cursor
        hi = self.registry.preempting(cur.pid, self.clock())
        if hi is not None:
            if self._return_to is None:
                self._return_to = cur.pid
            cur.pid = hi

    def _advance(self, pid: int) -> None:
        """Move the cursor to the next slot; wrapping past the tail is a full scan."""
        cur = self.registry.cursor
        back, self._return_to = self._return_to, None
        if back is not None and back != pid and back in self.registry:
            cur.pid, cur.address = back, 0  # where a higher priority slot cut in
            return
        self.registry.advance(pid)  # the one place the cursor moves on (and wraps)

    def _full_scan(self) -> None:
        """The cursor wrapped past the tail (Registry.advance): one full scan."""
        self.counters.full_scans += 1

    # --- khugepaged_scan_mm_slot -----------------------------------------------------
    def scan_mm_slot(self, budget: int) -> tuple[int, bool, bool]:
        """(progress, whether the process was really scanned, whether the pass must stop)."""
        cur = self.registry.cursor
        pid = cur.pid
        slot = self.registry.slots[pid]
        now = self.clock()
        if slot.exited():
            self.membership.exit(pid)
            return 1, False, False
        view = ProcessView(self.kernel.procfs, pid)
        if cur.address == 0 and (self.lanes.busy(pid) and not slot.resume  # a new visit
                                 or not due(slot, view, now)):  # waits for the last one
            self._advance(pid)
            return 1, False, False
        if cur.address == 0 and self._renamed(slot, view, now):
            return 1, False, False
        control = self.membership.control_for(slot)
        if control.target is not None and control.enabled == "never" \
                and control.shmem_enabled in ("never", "deny"):
            # A target at never for both kinds: leave the process alone, read nothing. As in
            # the kernel, `enabled` is anonymous memory's mode only: a target's shmem_enabled
            # still takes its shared memory.
            slot.visit = None
            slot.settle(now)
            self._advance(pid)
            return 1, False, False
        try:
            visit = self.visitor.walk(slot, view, budget)
        except (ProcessGone, AccessDenied) as err:
            self._lost(slot, err, now)
            return 1, True, False
        except Exception as err:  # noqa: BLE001 - one process never ends the daemon
            self._contain(slot, err, now)
            return 1, True, False
        if visit.hold is not None and visit.hold.halt is Halt.STOP:
            return visit.progress, True, True
        if visit.hold is not None:  # its target's share ran dry, or its lane is full
            slot.resume = cur.address  # the window that waits
            slot.due = now + visit.hold.wait
            slot.waiting = visit.hold.reason
            self.collapser.obstacle(self.membership.state_of(slot), OBSTACLES.get(
                visit.hold.reason, visit.hold.reason))
            self._advance(pid)
            return 1, True, False
        slot.errors = 0
        if visit.finished:
            self._finished(slot, visit, now)
        return visit.progress, True, False

    def _renamed(self, slot: MmSlot, view: ProcessView, now: float) -> bool:
        """A name changed without an event (a write to /proc/PID/comm sends none; PR_SET_NAME
        does): resolved as the connector's rename is, now. True if the slot went."""
        try:
            comm = view.stat().comm
        except (HugepagedError, OSError):
            return False
        if comm == slot.comm:
            return False
        self.membership.on_rename(slot.pid)
        return slot.pid not in self.registry

    def _finished(self, slot: MmSlot, visit: Visit, now: float) -> None:
        self.mthp.visited(slot, self.collapser.kpf, now)
        self.collapser.splits.finished(slot, slot.visits)
        slot.visit = None
        slot.last_full = now
        # Woken while visited (a rule change on the control thread): the visit may have used
        # the old rules, so it does not settle the slot.
        if visit.collapsed or slot.wakes != slot.visit_wakes:
            slot.wake()
        else:
            if slot.forced:  # nothing changed and nothing found: force less often
                slot.rescan_every = min(RESCAN_MAX, slot.rescan_every * 2)
            slot.settle(now)
            if slot.hold_until:  # not past the end of a window's split hold
                slot.due = min(slot.due, slot.hold_until)
        slot.forced = False
        self._advance(slot.pid)

    def _lost(self, slot: MmSlot, err: Exception, now: float) -> None:
        """The process went away or refused us part-way through its visit."""
        if isinstance(err, ProcessGone) and not slot.exited():
            self._leader_gone(slot, now)  # threads live: the process does too
        elif isinstance(err, ProcessGone) or slot.exited():  # an exiting one refuses too
            self.membership.exit(slot.pid)
        else:
            self.membership.drop_unreadable(slot)

    def _contain(self, slot: MmSlot, err: Exception, now: float) -> None:
        """An unexpected error from one process (EMFILE, a parse error, a kernel surprise):
        logged (once a minute per kind of error: at the fd limit every process fails alike),
        the slot settled and its visit ended; dropped after MAX_ERRORS in a row."""
        slot.errors += 1
        slot.visit = None
        what = f"{type(err).__name__}: {err}"
        dropped = slot.errors >= MAX_ERRORS
        self.errors.log((type(err).__name__, getattr(err, "errno", None)), logging.ERROR,
                        "pid %d (%s): %s; %s", slot.pid, slot.comm, what,
                        f"dropped after {slot.errors} errors" if dropped else "settled",
                        extra={"event": "slot_error", "pid": slot.pid, "comm": slot.comm,
                               "error": what, "dropped": dropped})
        if dropped:
            self.membership.exit(slot.pid)
            return
        slot.settle(now)
        self._advance(slot.pid)

    def _leader_gone(self, slot: MmSlot, now: float) -> None:
        """ESRCH from a process whose pidfd says it lives: its leader thread has exited and
        others run. process_madvise reaches a process through its leader, so it cannot be
        collapsed from userspace now; the slot stays (settled) until its last thread exits."""
        if not slot.leader_gone:
            slot.leader_gone = True
            log.info("pid %d (%s): leader thread exited, other threads live: kept, but "
                     "process_madvise cannot reach it", slot.pid, slot.comm,
                     extra={"event": "leader_gone", "pid": slot.pid, "comm": slot.comm})
        slot.visit = None
        slot.settle(now)
        self._advance(slot.pid)
