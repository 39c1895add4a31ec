"""The pass: khugepaged_do_scan and khugepaged_scan_mm_slot, over process_madvise(MADV_COLLAPSE).

Progress is accounted as the kernel does: HPAGE_PMD_NR per window examined, 1 per VMA (or
settled process) skipped, up to pages_to_scan per pass. The pass owns the cursor's movement
and the size of each read; whether a collapse may start, and the collapse itself, are the
collapser's; who is scanned, and by which policy, is membership's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from hugepaged.collapse import MAX_BATCH, take_run
from hugepaged.errors import AccessDenied, ProcessGone
from hugepaged.results import COLLAPSIBLE, ScanResult
from hugepaged.scan.process import CHUNK_WINDOWS, ProcessScanner

from . import schedule as sched
from .collapser import STOP, Collapser, Halt, Hold
from .counters import Counters
from .lanes import Lanes
from .membership import Membership
from .mthp import MthpSampler
from .ranges import RangeMemo
from .registry import RESCAN_MAX, MmSlot
from .targets import TargetState
from .visit import ProcessView, due, memory_map

log = logging.getLogger("hugepaged")
MAX_ERRORS = 3  # unexpected errors in a row before a slot is dropped
IDLE_MIN = 5.0  # an idle pass (nothing due, nothing done) is not repeated sooner
LANE_POLL = 1.0  # a pass stopped for a full lane: a finished batch wakes the loop before
DRY = Hold(Halt.DRY)


@dataclass
class Visit:
    """What one step of a visit came to."""

    progress: int
    finished: bool = False
    collapsed: int = 0
    hold: Hold | None = None


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
        self.collapsed_ranges = RangeMemo()
        self.mthp = MthpSampler(kernel)
        self.scanner = ProcessScanner
        self._return_to: int | None = None  # the slot a higher priority one cut in before
        self._chunk: dict[int, int] = {}  # pid -> windows its next read may decide
        membership.on_exit.append(self.forget)
        self.registry.on_wrap = self._full_scan

    @property
    def tunables(self):
        return self.collapser.tunables

    def forget(self, pid: int) -> None:
        """A slot goes: the cursor moves past it (collect_mm_slot at the tail still completes
        a full scan), and its read chunk is forgotten."""
        self._chunk.pop(pid, None)
        self.collapser.forget(pid)
        self.lanes.forget(pid)
        if self.registry.cursor.pid == pid:
            self._advance(pid)

    # --- khugepaged_do_scan ----------------------------------------------------------
    def do_scan(self) -> bool:
        """One pass of at most pages_to_scan; True if it did work."""
        cur, c = self.registry.cursor, self.collapser
        pages = self.tunables.pages_to_scan
        progress, through_head, worked, stopped = 0, 0, False, False
        self.counters.passes += 1
        self.lanes.reap()
        self.lanes.stalled = False
        self.kernel.drain_lru()  # khugepaged_do_scan: lru_add_drain_all()
        before = self.counters.collapse_attempts + self.lanes.handed
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
                worked = stopped = True
                break
        self._share_deadlines()
        # A pass that tried no collapse and left none waiting is idle: the CPU cap saves no
        # credit up for later (collapse/limiter.py). A visit held for its target's share is
        # work waiting: were the global bucket emptied meanwhile, its first collapse back
        # would go on credit and the next wait for the whole bucket.
        busy = stopped or self.lanes.stalled or self.lanes.active() \
            or self.counters.collapse_attempts + self.lanes.handed != before \
            or self.registry.next_resume() is not None
        (c.budget.busy if busy else c.budget.idle)(self.clock())
        return worked

    def _share_deadlines(self) -> None:
        """The schedule's share waits, as the slots left for their target's share say."""
        waits: dict[str, float] = {}
        for slot in self.registry.slots.values():
            name = self.membership.control_for(slot).target
            if slot.resume and name is not None:
                waits[name] = min(waits.get(name, slot.due), slot.due)
        for name, _ in list(self.schedule.shares()):
            if name not in waits:
                self.schedule.clear(sched.SHARE + name)
        for name, when in waits.items():
            self.schedule.set(sched.SHARE + name, when)

    def after(self, worked: bool, now: float) -> float:
        """When the next pass is due (khugepaged_wait_work): scan_sleep_millisecs after work;
        after an idle pass, when the first settled slot is due (not sooner than IDLE_MIN), or
        when a visit waiting for its target's share may go on; a pass stopped for a full lane
        is taken up when a batch finishes."""
        if self.lanes.stalled:
            return now + LANE_POLL
        sleep = self.tunables.scan_sleep_millisecs / 1000.0
        if worked:
            return now + sleep
        first = self.registry.next_due()
        idle = max(now + max(sleep, IDLE_MIN), first if first is not None else now + IDLE_MIN)
        waiting = self.registry.next_resume()
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
            visit = self._scan_vmas(slot, view, budget)
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
            self._advance(pid)
            return 1, True, False
        slot.errors = 0
        if visit.finished:
            self._finished(slot, visit, now)
        return visit.progress, True, False

    def _finished(self, slot: MmSlot, visit: Visit, now: float) -> None:
        self.mthp.visited(slot, self.collapser.kpf, now)
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
        logged, the slot settled and its visit ended; dropped after MAX_ERRORS in a row."""
        slot.errors += 1
        slot.visit = None
        what = f"{type(err).__name__}: {err}"
        dropped = slot.errors >= MAX_ERRORS
        log.error("pid %d (%s): %s; %s", slot.pid, slot.comm, what,
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

    # --- the visit -------------------------------------------------------------------
    def _scan_vmas(self, slot: MmSlot, view: ProcessView, budget: int) -> Visit:
        """Walk the VMAs from the cursor, a chunk of windows a read."""
        cur, pid, geo = self.registry.cursor, slot.pid, self.kernel.geometry
        if cur.address == 0 and slot.resume and slot.visit is not None:
            cur.address = slot.resume  # back where its target's CPU share ran out
        slot.resume = 0
        if cur.address == 0:  # a visit's first read and call are one window, then 2, 4, ...:
            self.collapser.ramp[pid] = self._chunk[pid] = 1  # its first collapse comes sooner
            slot.visit_wakes = slot.wakes
        fresh = cur.address == 0 or slot.visit is None or view.faults() != slot.visit_fp
        if fresh:  # a resumed visit whose process faulted since may have a new memory map
            slot.visit_fp = view.faults()
            slot.visit = memory_map(slot, view)
            slot.anon_kb = sum(v.anonymous_kb for v in slot.visit[1])
            slot.anon_huge_kb = sum(v.anon_huge_kb for v in slot.visit[1])
        thp_enabled, vmas = slot.visit
        state = self.membership.state_of(slot)
        if slot.exited():
            raise ProcessGone(f"pid {pid}: process has exited")
        visit = Visit(progress=1)
        with self.scanner(self.kernel, slot.mm_pid or pid, self.collapser.kpf,
                          self.membership.control_for(slot),
                          referenced=self.referenced) as mm:
            for vma in vmas:
                if vma.end <= cur.address:
                    continue
                if mm.ineligible(vma, not thp_enabled) is not None:
                    visit.progress += 1
                    continue
                hstart, hend = geo.aligned(vma.start, vma.end)
                addr = max(cur.address, hstart)
                while addr < hend:
                    cur.address = addr
                    if visit.progress >= budget:
                        return visit
                    if self.collapser.stopping:  # SIGTERM is honoured between chunks
                        visit.hold = STOP
                        return visit
                    want = max(1, -(-(budget - visit.progress) // geo.pmd_nr))
                    chunk = self._chunk.get(pid, CHUNK_WINDOWS)
                    self._chunk[pid] = min(CHUNK_WINDOWS, 2 * chunk)
                    room = self._room(slot, state)
                    if isinstance(room, Hold):
                        visit.hold = room
                        return visit
                    n = min((hend - addr) >> geo.pmd_shift, want, chunk, room)
                    verdicts = mm.decide_range(vma, addr, addr + n * geo.pmd_size)
                    if not fresh and (verdicts.codes == ScanResult.SUCCEED).any() and \
                            view.moved_since(slot.visit_fp):
                        # hugepage_vma_revalidate: the process faulted since its VMAs were
                        # read (a region may have been replaced by a fresh mapping without
                        # MADV_HUGEPAGE): read them again before collapsing here.
                        cur.address, slot.visit = addr, None
                        return visit
                    results, visit.hold = self._windows(slot, state, mm, vma, addr, verdicts)
                    for result in results:
                        visit.progress += geo.pmd_nr
                        if result is None:  # handed to a worker: counted when it is reaped
                            visit.collapsed += 1
                            continue
                        visit.collapsed += result == ScanResult.SUCCEED
                        self.collapser.count(slot, state, result)
                    if visit.hold is not None:
                        return visit
                    addr += n * geo.pmd_size
                cur.address = hend
        visit.finished = True
        return visit

    def _room(self, slot: MmSlot, state: TargetState | None) -> int | Hold:
        """How many windows are worth deciding now: no more than can be collapsed before
        the decision is read again (what the CPU caps pay for at the mean cost of a collapse,
        what the slot's worker lane takes), so that no pass reads page state it then throws
        away; or why none is."""
        hold = self.collapser.capped(state)
        if hold is not None:
            return hold
        room, reserved = CHUNK_WINDOWS, 0
        lane = self.lanes.room(slot.pid)
        if lane is not None:
            reserved, room = self.lanes.reserved(), lane
            if room <= 0:  # this process waits for its lane, the pass goes on
                self.lanes.stalled = True
                return DRY
        return self.collapser.batch_size(room, state, reserved)

    def _windows(self, slot: MmSlot, state: TargetState | None, mm, vma, addr: int,
                 verdicts) -> tuple[list[ScanResult | None], Hold | None]:
        """Each window's result in address order, the cursor on it (None: handed to a
        worker), and why the walk stopped early, if it did. A run of SUCCEED windows within
        its target's bloat budget is collapsed a bounded batch per call."""
        geo, cur, c = self.kernel.geometry, self.registry.cursor, self.collapser
        page_kb = geo.page_size >> 10
        codes, nones = verdicts.codes.tolist(), verdicts.none.tolist()
        control = self.membership.control_for(slot)
        ledger = state.ledger if state is not None else None
        out: list[ScanResult | None] = []
        i = 0
        while i < len(codes):
            cur.address = addr + i * geo.pmd_size
            if codes[i] not in COLLAPSIBLE:
                out.append(ScanResult(codes[i]))
                i += 1
                continue
            key = mm.range_key(vma, cur.address)
            if key is not None:  # shared memory: one call per range of its file
                unmapped = codes[i] == ScanResult.PTE_MAPPED_HUGEPAGE \
                    and verdicts.mapped is not None and verdicts.mapped[i] == 0
                result = self._collapse_range(slot, state, control, key, cur.address,
                                              nones[i], unmapped)
                if isinstance(result, Hold):
                    return out, result
                out.append(result)
                i += 1
                continue
            j = take_run(codes, nones, i, c.next_ramp(slot.pid, MAX_BATCH), ledger, page_kb)
            if j == i:
                out.append(ScanResult.EXCEED_BLOAT_BUDGET)
                i += 1
                continue
            if self.lanes.pool is not None:  # what the cap pays for, less what is in flight
                j = i + c.batch_size(j - i, state, reserved=self.lanes.reserved())
            run = [addr + k * geo.pmd_size for k in range(i, j)]
            hold = c.admit(slot, run[0], state)
            if hold is not None:
                return out, hold
            if self.lanes.pool is not None:  # a worker collapses it; counted when reaped
                if not self.lanes.hand_over(slot, run, nones[i:j], state):
                    return out, DRY
                for a in run:
                    cur.address = a
                    out.append(None)
                    i += 1
                continue
            outcomes, failed_at = c.collapse(slot, control, run, state)
            for outcome in outcomes:
                c.collapsed(slot, state, outcome, nones[i] * page_kb)
                cur.address = outcome.address
                out.append(outcome.result)
                i += 1
            if failed_at is not None:  # backing off: the pass resumes at that window
                cur.address = failed_at
                return out, STOP
        return out, None

    def _collapse_range(self, slot: MmSlot, state: TargetState | None, control, key,
                        address: int, none_ptes: int, unmapped: bool) -> ScanResult | Hold:
        """One collapse per range of a file: a shared-memory range another process already
        collapsed is one huge page in the page cache, and this process maps it by PMD at
        its next fault (PTE_MAPPED_HUGEPAGE until then); it is not asked again. Nor is a
        range that is one huge page and that this process maps none of (`unmapped`): the
        kernel's khugepaged has no page table to retract there and installs no PMD
        (collapse_pte_mapped_thp with install_pmd false). Collapsed on the daemon's thread,
        one window a call, so the memo stays exact."""
        if unmapped or self.collapsed_ranges.seen(key):
            return ScanResult.PTE_MAPPED_HUGEPAGE
        bloat_kb = none_ptes * (self.kernel.geometry.page_size >> 10)
        if state is not None and not state.ledger.allows(bloat_kb):
            return ScanResult.EXCEED_BLOAT_BUDGET
        hold = self.collapser.admit(slot, address, state)
        if hold is not None:
            return hold
        outcomes, failed_at = self.collapser.collapse(slot, control, [address], state)
        if failed_at is not None:
            self.registry.cursor.address = failed_at
            return STOP
        outcome = outcomes[0]
        self.collapser.collapsed(slot, state, outcome, bloat_kb)
        if outcome.result == ScanResult.SUCCEED:
            self.collapsed_ranges.add(key)
        return outcome.result
