"""What one visit of a process reads from /proc, read once and passed down (psutil's
`oneshot` is the model): /proc/PID/stat for the due check, the fingerprint and the leader's
state, then status and smaps for the memory map.

A settled process is visited when due and only if its counters moved. A visit spans passes
and keeps the memory map it read (smaps walks every page table: tens of milliseconds for a few
GiB); before it collapses it checks that the map still holds (hugepage_vma_revalidate). Where
the syscall tracepoints show every call that changes VM flags without changing
/proc/PID/maps (advice, PR_SET_THP_DISABLE, a moving mremap, a MAP_FIXED mmap: daemon/advice.py
drops the kept map), the map holds while /proc/PID/maps reads the same; without them, while
the process has not faulted, which a busy process always has.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hugepaged.collapse import MAX_BATCH, take_run
from hugepaged.errors import HugepagedError, ProcessGone
from hugepaged.kernel.madvise import pidfd_exited, pidfd_open
from hugepaged.kernel.procfs import ProcStat
from hugepaged.results import COLLAPSIBLE, ScanResult
from hugepaged.scan.decide import window_slice
from hugepaged.scan.process import CHUNK_WINDOWS, ProcessScanner

from .advice import apply_advice
from .collapser import STOP, Collapser, Halt, Hold
from .lanes import Lanes
from .ranges import RangeMemo
from .registry import MmSlot
from .targets import TargetState

LANE_FULL = Hold(Halt.DRY, 0.0, "lane")
SMALL_ANON = 4096  # small VMAs with anonymous memory kept per process for mTHP counting
# Verdicts a paced pass decided and could not use yet are taken by the next passes for this
# long (their process not having faulted since): a CPU cap then pays for reading the page
# state once per several calls, not once per call. The kernel re-checks every window when it
# collapses it, so a stale verdict costs a failed call at worst.
KEEP_SECONDS = 1.0

log = logging.getLogger("hugepaged")


class ProcessView:
    """One process's /proc/PID/stat, read at most once until refresh()."""

    def __init__(self, procfs, pid: int) -> None:
        self.procfs, self.pid = procfs, pid
        self._stat: ProcStat | None = None
        self._layout: int | None = None

    def stat(self) -> ProcStat:
        if self._stat is None:
            self._stat = self.procfs.stat(self.pid)
        return self._stat

    def refresh(self) -> ProcStat:
        self._stat = None
        return self.stat()

    def layout(self, traced: bool) -> object:
        """What says the kept memory map still holds: /proc/PID/maps when the calls that change
        flags only are traced (a process that faults keeps its map), else the fault counters."""
        if not traced:
            return self.faults()
        if self._layout is None:
            self._layout = hash(self.procfs.maps_text(self.pid))
        return self._layout

    def relayout(self, traced: bool) -> object:
        """layout(), read afresh."""
        self._stat = self._layout = None
        return self.layout(traced)

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
    if slot.hold_until and now >= slot.hold_until:  # a held window may be collapsed now
        slot.hold_until = 0.0
        return True
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


def memory_map(slot: MmSlot, view: ProcessView, geometry) -> tuple[bool, list, int]:
    """(THP enabled, VMAs that can hold a window, VMAs that cannot) for a visit:
    /proc/PID/status and smaps, with the MADV_HUGEPAGE traced since applied
    (daemon/advice.py). A visit woken by that advice, in a process that has neither faulted
    nor mapped anything since its last read, takes that read instead: smaps walks every page
    table, and the advice changed only flags. Only VMAs with a whole aligned window are kept
    (a process of 65,000 small mappings costs a count, not 65,000 records); the slot's
    anonymous totals are taken from all of them first."""
    mm_pid = mm_of(slot, view)
    mm_view = view if mm_pid == view.pid else ProcessView(view.procfs, mm_pid)
    fp = mm_view.fingerprint()
    advice, slot.advice = slot.advice, []
    if advice and slot.last_map is not None and slot.last_map[0] == fp:
        thp_enabled, vmas, small = slot.last_map[1], slot.last_map[2], slot.last_map[3]
    else:
        thp_enabled = view.procfs.status(mm_pid).thp_enabled
        # smaps one VMA at a time: 60,000 mappings held at once were 68 MB of peak RSS.
        vmas, small_anon, anon_kb, anon_huge_kb, total = [], [], 0, 0, 0
        for v in view.procfs.smaps_each(mm_pid):
            total += 1
            anon_kb += v.anonymous_kb
            anon_huge_kb += v.anon_huge_kb
            start, end = geometry.aligned(v.start, v.end)
            if end > start:
                vmas.append(v)
            elif v.anonymous_kb and len(small_anon) < SMALL_ANON:
                # Small VMAs with anonymous memory can still hold mTHP folios
                # (daemon/mthp.py counts them): a bounded few are kept.
                small_anon.append(v)
        slot.anon_kb, slot.anon_huge_kb, slot.small_anon = anon_kb, anon_huge_kb, small_anon
        small = total - len(vmas)
    for start, end in advice:
        vmas = apply_advice(vmas, start, end)
    slot.last_map = (fp, thp_enabled, vmas, small)
    return thp_enabled, vmas, small


@dataclass
class Visit:
    """What one step of a visit came to."""

    progress: int
    finished: bool = False
    collapsed: int = 0
    hold: Hold | None = None


class Visitor:
    """khugepaged_scan_mm_slot's walk over one process's VMAs from the cursor: a chunk of
    windows decided per read, their collapsible runs collapsed (or handed to a worker),
    every window's result counted. The read chunk of a visit grows 1, 2, 4, ... so that its
    first collapse comes soon."""

    def __init__(self, kernel, membership, collapser: Collapser, lanes: Lanes,
                 referenced=None) -> None:
        self.kernel, self.membership, self.collapser, self.lanes = (kernel, membership,
                                                                    collapser, lanes)
        self.registry = membership.registry
        self.referenced = referenced  # the access source for the young-bit check, or None
        self.collapsed_ranges = RangeMemo()
        self.scanner = ProcessScanner
        self._chunk: dict[int, int] = {}  # pid -> windows its next read may decide
        # The syscalls that change VM flags without changing /proc/PID/maps are traced
        # (set by the loop when its tracer opens): a kept map holds while maps reads the same.
        self.layout_traced = False

    def forget(self, pid: int) -> None:
        self._chunk.pop(pid, None)

    def walk(self, slot: MmSlot, view: ProcessView, budget: int) -> Visit:
        """Walk the VMAs from the cursor, a chunk of windows a read."""
        cur, pid, geo = self.registry.cursor, slot.pid, self.kernel.geometry
        if cur.address == 0 and slot.resume and slot.visit is not None:
            cur.address = slot.resume  # back where its target's CPU share ran out
        slot.resume = 0
        if cur.address == 0:  # a visit's first read and call are one window, then 2, 4, ...:
            self.collapser.ramp[pid] = self._chunk[pid] = 1  # its first collapse comes sooner
            slot.visit_wakes = slot.wakes
            slot.visits += 1
        traced = self.layout_traced
        fresh = cur.address == 0 or slot.visit is None or \
            view.layout(traced) != slot.visit_fp
        visit = Visit(progress=1)
        if fresh:  # a resumed visit whose memory map may have changed reads it again
            slot.kept = None
            slot.visit_fp = view.layout(traced)
            thp_enabled, vmas, small = memory_map(slot, view, geo)
            slot.visit = (thp_enabled, vmas)
            if cur.address == 0:
                visit.progress += small  # each VMA skipped counts one, as in the kernel
        thp_enabled, vmas = slot.visit
        state = self.membership.state_of(slot)
        if slot.exited():
            raise ProcessGone(f"pid {pid}: process has exited")
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
                    kept = self._kept(slot, addr, n)
                    if kept is not None:  # what the last pass decided, still fresh
                        verdicts, read_at = kept
                        n = verdicts.codes.size  # it may have kept fewer than n windows
                    else:
                        verdicts = mm.decide_range(vma, addr, addr + n * geo.pmd_size)
                        read_at = self.collapser.clock()
                    if kept is None and not fresh and \
                            (verdicts.codes == ScanResult.SUCCEED).any() and \
                            view.relayout(traced) != slot.visit_fp:
                        # hugepage_vma_revalidate: the map may have changed since its VMAs
                        # were read (a region replaced by a fresh mapping without
                        # MADV_HUGEPAGE): read them again before collapsing here.
                        cur.address, slot.visit = addr, None
                        return visit
                    results, visit.hold = self._windows(slot, state, mm, vma, addr, verdicts)
                    self._keep(slot, addr, verdicts, len(results), read_at, visit.hold)
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

    def _kept(self, slot: MmSlot, addr: int, n: int):
        """(verdicts, when read) a paced pass kept for the windows from `addr` (at most n),
        if they are still fresh; None: read the page state."""
        kept, slot.kept = slot.kept, None
        if kept is None:
            return None
        start, verdicts, read_at, fp = kept
        if start != addr or fp != slot.visit_fp or \
                self.collapser.clock() - read_at > KEEP_SECONDS:
            return None
        return window_slice(verdicts, 0, n), read_at

    def _keep(self, slot: MmSlot, addr: int, verdicts, used: int, read_at: float,
              hold: Hold | None) -> None:
        """A pass held by the CPU pace keeps the verdicts it has not used for the next."""
        if hold is None or used >= verdicts.codes.size:
            return
        size = self.kernel.geometry.pmd_size
        slot.kept = (addr + used * size, window_slice(verdicts, used), read_at, slot.visit_fp)

    def _room(self, slot: MmSlot, state: TargetState | None) -> int | Hold:
        """How many windows are worth deciding now: no more than can be collapsed before
        the decision is read again (under a CPU cap, one call's worth: the next waits for
        the pace; with workers, what the slot's lane takes), so that no pass reads page
        state it then throws away; or why none is."""
        control = self.membership.control_for(slot)
        hold = self.collapser.pressure(slot, control) or self.collapser.capped(state)
        if hold is not None:
            return hold
        room = CHUNK_WINDOWS
        lane = self.lanes.room(slot.pid)
        if lane is not None:
            if lane <= 0:  # this process waits for its lane, the pass goes on
                self.lanes.stalled = True
                return LANE_FULL
            return lane
        if self.collapser.budget.percent or (state is not None and state.budget is not None):
            # One call's worth, or what the pace pays for until kept verdicts go stale.
            room = min(room, max(self.collapser.batch_size(room, control),
                                 self.collapser.paced_windows(state, KEEP_SECONDS)))
        return room

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
        if slot.collapsed:  # windows it collapsed before: split since? held back?
            self._held(slot, state, control, addr, codes, verdicts)
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
            j = i + c.batch_size(j - i, control)  # what one call may hold the process for
            run = [addr + k * geo.pmd_size for k in range(i, j)]
            hold = c.admit(slot, run[0], state)
            if hold is not None:
                return out, hold
            if self.lanes.pool is not None:  # a worker collapses it; counted when reaped
                if not self.lanes.hand_over(slot, run, nones[i:j], state):
                    return out, LANE_FULL
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

    def _held(self, slot: MmSlot, state: TargetState | None, control, addr: int,
              codes: list[int], verdicts) -> None:
        """Collapsible windows the split watch holds back get its result instead (a run of
        collapsible windows then stops at them)."""
        size, watch = self.kernel.geometry.pmd_size, self.collapser.splits
        none = [None] * len(codes)
        zeros = verdicts.zero.tolist() if verdicts.zero is not None else none
        firsts = verdicts.first_pfn.tolist() if verdicts.first_pfn is not None else none
        for k, code in enumerate(codes):
            a = addr + k * size
            if a in slot.collapsed:
                held = watch.held(slot, state, control, a, code, zeros[k], slot.visits,
                                  firsts[k])
                if held is not None and code in COLLAPSIBLE:
                    codes[k] = int(held)

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
