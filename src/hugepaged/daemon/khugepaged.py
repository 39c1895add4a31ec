"""khugepaged_do_scan and khugepaged_scan_mm_slot, over process_madvise(MADV_COLLAPSE).

Progress is accounted as the kernel does: 512 per window examined, 1 per VMA (or settled
process) skipped, up to pages_to_scan per pass.
"""

import contextlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from hugepaged.collapse import CollapseOutcome, collapse_run, result_of_errno, window_now
from hugepaged.errors import AccessDenied, HugepagedError, ProcessGone
from hugepaged.kernel import Kernel, KPageFlags
from hugepaged.kernel.madvise import pidfd_exited, pidfd_open
from hugepaged.kernel.procfs import PF_KTHREAD
from hugepaged.policy import CollapseControl
from hugepaged.results import COLLAPSIBLE, ScanResult
from hugepaged.scan.eligibility import aligned_range
from hugepaged.scan.process import CHUNK_WINDOWS, ProcessScanner
from hugepaged.scan.referenced import Referenced
from hugepaged.targets import ProcessFacts, Target, control_under, first_match
from hugepaged.tunables import Tunables

from .advice import apply_advice
from .budget import CpuBudget, ThreadMeter
from .mthp import MthpSampler
from .ranges import RangeMemo
from .registry import RESCAN_MAX, MmSlot, Registry
from .targets import TargetState, TargetStates, target_changes
from .workers import LANE_WINDOWS, CollapsePool, Job

log = logging.getLogger("hugepaged")
MAX_BATCH = 16  # windows per process_madvise call: bounds the time one call holds the daemon
FIRST_COLLAPSE_CPU = 0.003  # CPU-seconds a collapse is assumed to cost before one is measured
MAX_ERRORS = 3  # unexpected errors in a row before a slot is dropped
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class Counters:
    """pages_collapsed and full_scans as the kernel's, plus what the kernel only traces."""

    pages_collapsed: int = 0
    full_scans: int = 0
    passes: int = 0
    results: Counter = field(default_factory=Counter)  # windows examined, per result
    collapse_attempts: int = 0
    collapse_failures: Counter = field(default_factory=Counter)  # per errno name
    collapse_seconds: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    collapse_seconds_sum: float = 0.0
    collapse_cpu_seconds: float = 0.0
    alloc_backoffs: int = 0
    registered: int = 0  # hugepaged's own: processes registered, and gone (or dropped)
    gone: int = 0

    def observe(self, outcome: CollapseOutcome) -> None:
        self.collapse_attempts += 1
        i = next((k for k, b in enumerate(LATENCY_BUCKETS) if outcome.seconds <= b),
                 len(LATENCY_BUCKETS))
        self.collapse_seconds[i] += 1
        self.collapse_seconds_sum += outcome.seconds
        if outcome.result == ScanResult.SUCCEED:
            self.pages_collapsed += 1
        else:
            self.collapse_failures[outcome.errno_name or outcome.result.name] += 1


class Stop(Exception):
    """Raised inside a pass to end it at the current window (it is retried later)."""


class TargetDry(Exception):
    """Raised inside a pass when the slot's target has spent its CPU share, or its workers'
    lane is full: the pass leaves that slot where it is (it resumes there when the share is
    back, or at once) and goes on."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


class Khugepaged:
    """The scan state machine, free of I/O multiplexing so tests can drive it pass by pass."""

    def __init__(self, kernel: Kernel, tunables: Tunables, clock=time.monotonic,
                 cpu_clock=time.thread_time) -> None:
        self.kernel, self.clock = kernel, clock
        self.registry = Registry()
        self.counters = Counters()
        self.budget = CpuBudget(tunables.max_cpu_percent, clock())
        self.meter = ThreadMeter(self.budget, cpu_clock)  # the loop thread's CPU, all of it
        self.tunables = tunables
        self.control = CollapseControl.from_tunables(tunables)  # the global policy
        self._kpf: KPageFlags | None = None  # opened at the first scan, after the start-up checks
        # The young-bit check's source: idle page tracking where the kernel has it, the daemon
        # marking the windows it leaves so that its next visit can tell which were touched.
        idle = kernel.page_idle()
        self.referenced = Referenced(idle, mark=True) if idle is not None else None
        self.backoff_until = 0.0
        self.cpu_wait_until = 0.0
        self.stopping = False
        self.kthreads: set[int] = set()
        self.unreadable: set[int] = set()  # alive but not ours to read: dropped, not re-entered
        self.only_pids: set[int] | None = None  # targeted mode: these processes only
        self.exclude_comm: re.Pattern | None = None
        self.targets: list[Target] = []
        self._return_to: int | None = None  # the slot a higher priority one cut in before
        self.target_states = TargetStates()
        self.collapsed_ranges = RangeMemo()
        self.mthp = MthpSampler(kernel)
        self.wake_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a worker's batch finished
        self.pool: CollapsePool | None = None
        self.queue_stalled = False  # the last pass stopped because the workers' queue was full
        self.handed = 0  # windows handed to the workers so far
        self._ticket = False  # this pass's first batch may go on credit (_capped)
        self._ramp: dict[int, int] = {}  # pid -> windows its next call may take
        self.backoff_nodes: set[int] | None = None  # where the back-off's allocation was
        self._one_node: bool | None = None
        self._chunk: dict[int, int] = {}  # pid -> windows its next read may decide
        self._set_workers(tunables.collapse_workers)
        self.registry.on_wrap = self._full_scan

    def set_tunables(self, tunables: Tunables) -> None:
        old, self.tunables = self.tunables, tunables
        self.control = CollapseControl.from_tunables(tunables)
        if old.collapse_workers != tunables.collapse_workers:
            self._set_workers(tunables.collapse_workers)
        self.budget.set_percent(tunables.max_cpu_percent)
        # list(): this runs on the control thread (`hugepaged set`) while the loop may drop
        # slots; a slot woken mid-visit is not settled by that visit (see scan_mm_slot).
        for slot in list(self.registry.slots.values()):
            self._apply_target(slot, slot.target)  # the global part of every policy
        rules = ("enabled", "shmem_enabled", "max_ptes_none", "max_ptes_swap",
                 "max_ptes_shared")
        if any(getattr(old, k) != getattr(tunables, k) for k in rules):
            for slot in list(self.registry.slots.values()):
                slot.wake()  # new rules: look at everyone again

    def set_targets(self, targets: list[Target], source: str | None = None) -> None:
        """A new list of targets (start-up; a reload names its `source` and has each change
        of a target logged): every slot is matched again."""
        if source is not None:
            for change in target_changes(self.targets, targets):
                log.info("%s (%s)", change, source,
                         extra={"event": "target_changed", "change": change, "source": source})
        self.targets = list(targets)
        self.target_states.configure(
            [(t.name, t.max_cpu_percent, t.max_bloat_kb) for t in targets], self.clock())
        moved: Counter = Counter()
        for slot in list(self.registry.slots.values()):
            old = slot.control.target if slot.control is not None else None
            if self.resolve(slot, level=logging.DEBUG):
                slot.wake()
            if slot.control.target != old:
                moved[(old, slot.control.target)] += 1
        for (old, new), n in sorted(moved.items(), key=lambda i: -i[1]):
            # One line per change of target, not per process: a fleet reload can move
            # thousands (each one is logged at debug).
            log.info("targets reloaded: %d process(es) %s -> %s", n, old, new,
                     extra={"event": "targets_reloaded", "processes": n, "target": new,
                            "old": old})

    @property
    def kpf(self) -> KPageFlags:
        if self._kpf is None:
            self._kpf = self.kernel.kpageflags()
        return self._kpf

    def _set_workers(self, workers: int) -> None:
        """1: collapses on the daemon's own thread; more: a pool of lanes (daemon/workers)."""
        if self.pool is not None:
            self._reap(self.pool.close())
            self.pool = None
        if workers > 1:
            self.pool = CollapsePool(workers, self.kernel.geometry.pmd_size, self.wake_pipe)

    def close(self) -> None:
        if self.pool is not None:
            self._reap(self.pool.close())
            self.pool = None
        for fd in self.wake_pipe:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.registry.close()
        if self._kpf is not None:
            self._kpf.close()
            self._kpf = None
        if self.referenced is not None:
            self.referenced.idle.close()

    def control_for(self, slot: MmSlot) -> CollapseControl:
        """The policy this slot's process is decided and collapsed by (the kernel passes a
        struct collapse_control down the same way): its target's, resolved at registration,
        on exec and on reload, or the global one."""
        return slot.control if slot.control is not None else self.control

    def resolve(self, slot: MmSlot, level: int = logging.INFO) -> bool:
        """Match the slot's process against the targets (first match wins); True if its
        policy changed. A change of target is logged at `level`."""
        target = first_match(self.targets, ProcessFacts(self.kernel.procfs, slot.pid,
                                                        slot.comm)) if self.targets else None
        old = slot.control
        self._apply_target(slot, target)
        new = target.name if target is not None else None
        if old is not None and old.target != new:  # at registration the register line says
            log.log(level, "pid %d (%s): target %s -> %s", slot.pid, slot.comm, old.target,
                    new, extra={"event": "target", "pid": slot.pid, "comm": slot.comm,
                                "target": new, "old": old.target})
        return slot.control != old

    def _apply_target(self, slot: MmSlot, target: Target | None) -> None:
        old = getattr(slot.target, "name", None)
        new = getattr(target, "name", None)
        if old != new:  # its added RSS counts against the target it has now
            self.target_states.forget(slot.pid)
            state = self.target_states.get(new)
            if state is not None:
                state.adopt(slot.pid, slot.bloat_kb)
        slot.target = target
        control = control_under(self.control, target)
        if slot.priority != control.priority:
            slot.priority = control.priority
            self.registry.reorder()
        slot.control = control

    def on_exec(self, pid: int) -> None:
        """The process connector's exec event: a new program, a new comm, maybe a new target."""
        slot = self.registry.slots.get(pid)
        if slot is None:
            return
        try:
            comm = self.kernel.procfs.stat(pid).comm
        except (HugepagedError, OSError):
            return
        if comm != slot.comm:
            log.info("pid %d: %s -> %s (exec)", pid, slot.comm, comm,
                     extra={"event": "exec", "pid": pid, "old_comm": slot.comm, "comm": comm})
        slot.comm = comm
        if self.exclude_comm is not None and self.exclude_comm.fullmatch(comm):
            # A fork child had its parent's name until now: exclusions are resolved here too.
            log.info("pid %d (%s): excluded by exclude_comm; dropped", pid, comm,
                     extra={"event": "excluded", "pid": pid, "comm": comm})
            self.exit(pid)
            return
        self.resolve(slot)
        slot.visit = None
        slot.forget_map()
        slot.wake()

    def _state(self, slot: MmSlot) -> TargetState | None:
        return self.target_states.get(self.control_for(slot).target)

    # --- the registry's feeds -------------------------------------------------------
    def enter(self, pid: int, settle: float = 0.0) -> MmSlot | None:
        """Register a user process (never kernel threads, never ourselves)."""
        if pid in self.registry or pid in self.kthreads or pid in self.unreadable:
            return None
        if self.only_pids is not None and pid not in self.only_pids:
            return None
        try:
            st = self.kernel.procfs.stat(pid)
        except (HugepagedError, OSError):
            return None
        if st.flags & PF_KTHREAD:
            self.kthreads.add(pid)
            return None
        if self.exclude_comm is not None and self.exclude_comm.fullmatch(st.comm):
            return None
        slot = self.registry.enter(pid, st.comm)
        if slot is not None:
            slot.due = self.clock() + settle
            self.resolve(slot)
            target = self.control_for(slot).target
            self.counters.registered += 1
            log.debug("registered pid %d (%s)%s", pid, st.comm,
                      f", target {target}" if target else "",
                      extra={"event": "register", "pid": pid, "comm": st.comm,
                             "target": target})
        return slot

    def exit(self, pid: int, why: str = "gone") -> None:
        self.kthreads.discard(pid)
        self._ramp.pop(pid, None)
        self._chunk.pop(pid, None)
        if self.pool is not None:
            self.pool.drop(pid)
        if why == "gone":
            self.unreadable.discard(pid)
        if pid in self.registry and self.registry.cursor.pid == pid:
            self._advance(pid)  # collect_mm_slot at the tail still completes a full scan
        self.target_states.forget(pid)  # its bloat no longer counts against its target
        if self.registry.exit(pid):
            self.counters.gone += 1
            log.debug("pid %d %s", pid, why, extra={"event": "unregister", "pid": pid,
                                                    "reason": why})

    def discover(self) -> None:
        """The periodic /proc walk: catches what the connector missed, and exits."""
        pids = set(self.kernel.procfs.pids())
        self.kthreads &= pids
        self.unreadable &= pids
        for pid in list(self.registry.slots):
            if pid not in pids or self.registry.slots[pid].exited():
                self.exit(pid)
        candidates = pids if self.only_pids is None else pids & self.only_pids
        for pid in sorted(candidates - self.registry.slots.keys() - self.kthreads):
            self.enter(pid)

    # --- one pass -----------------------------------------------------------------
    def do_scan(self) -> bool:
        """khugepaged_do_scan: one pass of at most pages_to_scan; True if it did work."""
        pages = self.tunables.pages_to_scan
        progress, through_head, worked = 0, 0, False
        self.counters.passes += 1
        self.reap()
        self.queue_stalled = False
        self.kernel.drain_lru()  # khugepaged_do_scan: lru_add_drain_all()
        before, stopped = self.counters.collapse_attempts + self.handed, False
        self._ticket = self.budget.allows(self.clock())
        try:
            while progress < pages and not self.stopping:
                if self.registry.cursor.pid is None:
                    through_head += 1
                    if through_head >= 2 or not self.registry:
                        break
                    self.registry.cursor.pid = self.registry.first_pid()
                    self.registry.cursor.address = 0
                if self.registry.cursor.address == 0:
                    self._preempt()
                step, visited = self.scan_mm_slot(pages - progress)
                progress += step
                worked |= visited
        except Stop:
            worked = stopped = True
        # A pass that tried no collapse and left none waiting is idle: the CPU cap saves no
        # credit up for later (daemon/budget.py). A visit held for its target's share is
        # work waiting: were the global bucket emptied meanwhile, its first collapse back
        # would go on credit and the next wait for the whole bucket (a second's rest after
        # every single collapse, whatever the target's share).
        busy = stopped or self.queue_stalled or (self.pool is not None and self.pool.lanes) \
            or self.counters.collapse_attempts + self.handed != before \
            or self.registry.next_resume() is not None
        (self.budget.busy if busy else self.budget.idle)(self.clock())
        return worked

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

    def scan_mm_slot(self, budget: int) -> tuple[int, bool]:
        """khugepaged_scan_mm_slot: (progress, whether the process was really scanned)."""
        cur = self.registry.cursor
        pid = cur.pid
        slot = self.registry.slots[pid]
        now = self.clock()
        if slot.exited():
            self.exit(pid)
            return 1, False
        if cur.address == 0 and (self.pool is not None and self.pool.busy(pid)
                                 and not slot.resume  # a new visit waits for the last one
                                 or not self._due(slot, now)):
            self._advance(pid)
            return 1, False
        control = self.control_for(slot)
        if control.target is not None and control.enabled == "never" \
                and control.shmem_enabled in ("never", "deny"):
            # A target at never for both kinds: leave the process alone, read nothing. As in
            # the kernel, `enabled` is anonymous memory's mode only: a target's shmem_enabled
            # still takes its shared memory.
            slot.visit = None
            slot.settle(now)
            self._advance(pid)
            return 1, False
        try:
            progress, finished, collapsed = self._scan_vmas(slot, budget)
        except TargetDry as dry:
            slot.resume = cur.address  # the window that waits for the target's share
            slot.due = now + dry.wait
            self._advance(pid)
            return 1, True
        except Stop:
            raise
        except (ProcessGone, AccessDenied) as err:
            if isinstance(err, ProcessGone) and not slot.exited():
                self._leader_gone(slot, now)  # threads live: the process does too
                return 1, True
            if isinstance(err, ProcessGone) or slot.exited():  # an exiting one refuses too
                self.exit(pid)
                return 1, True
            self.unreadable.add(pid)  # alive, but not readable: said once, not entered again
            log.warning("pid %d (%s): dropped: not readable", pid, slot.comm,
                        extra={"event": "dropped", "pid": pid, "comm": slot.comm})
            self.exit(pid, "dropped: not readable")
            return 1, True
        except Exception as err:  # noqa: BLE001 - one process never ends the daemon
            self._contain(slot, err, now)
            return 1, True
        slot.errors = 0
        if finished:
            self.mthp.visited(slot, self.kpf, now)
            slot.visit = None
            slot.last_full = now
            # Woken while visited (a rule change on the control thread): the visit may have
            # used the old rules, so it does not settle the slot.
            if collapsed or slot.wakes != slot.visit_wakes:
                slot.wake()
            else:
                if slot.forced:  # nothing changed and nothing found: force less often
                    slot.rescan_every = min(RESCAN_MAX, slot.rescan_every * 2)
                slot.settle(now)
            slot.forced = False
            self._advance(pid)
        return progress, True

    def _contain(self, slot: MmSlot, err: Exception, now: float) -> None:
        """An unexpected error from one process (EMFILE, a parse error, a kernel surprise):
        logged, the slot settled and its visit ended; dropped after MAX_ERRORS in a row."""
        slot.errors += 1
        slot.visit = None
        what = f"{type(err).__name__}: {err}"
        if slot.errors >= MAX_ERRORS:
            log.error("pid %d (%s): %s; dropped after %d errors", slot.pid, slot.comm, what,
                      slot.errors, extra={"event": "slot_error", "pid": slot.pid,
                                          "comm": slot.comm, "error": what, "dropped": True})
            self.exit(slot.pid)
            return
        log.error("pid %d (%s): %s; settled", slot.pid, slot.comm, what,
                  extra={"event": "slot_error", "pid": slot.pid, "comm": slot.comm,
                         "error": what, "dropped": False})
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

    def _mm_of(self, slot: MmSlot) -> int:
        """The pid whose /proc files show the process's memory: the leader's while it runs,
        else a live thread's (the process lives while any thread does)."""
        if slot.mm_pid and slot.mm_pid != slot.pid and not pidfd_exited(slot.mm_pidfd):
            return slot.mm_pid
        if self.kernel.procfs.stat(slot.pid).state != "Z":
            slot.mm_pid = slot.pid
            return slot.pid
        for tid in self.kernel.procfs.tasks(slot.pid):
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

    def _fingerprint(self, pid: int) -> tuple:
        st = self.kernel.procfs.stat(pid)
        return (st.minflt, st.majflt, st.rss_pages)

    def _due(self, slot: MmSlot, now: float) -> bool:
        """A settled slot is visited when due, and only if its fault counters moved."""
        if slot.due > now:
            return False
        try:
            st = self.kernel.procfs.stat(slot.pid)
        except (HugepagedError, OSError):
            return True  # let the scan find out and drop it
        # vsize: a new mapping (MADV_HUGEPAGE'd memory not yet touched, say) ends the
        # back-off too, where no syscall tracepoints tell us of the advice itself.
        fp = (st.minflt, st.majflt, st.rss_pages, st.vsize)
        changed = fp != slot.fingerprint
        slot.fingerprint = fp
        if slot.settled_for and not changed:
            if now - slot.last_full < slot.rescan_every:
                slot.settle(now)
                return False
            slot.forced = True
        return True

    def _scan_vmas(self, slot: MmSlot, budget: int) -> tuple[int, bool, int]:
        """Walk the VMAs from the cursor; (progress, reached the end, windows collapsed)."""
        cur = self.registry.cursor
        if cur.address == 0 and slot.resume and slot.visit is not None:
            cur.address = slot.resume  # back where its target's CPU share ran out
        slot.resume = 0
        if cur.address == 0:  # a visit's first read and call are one window, then 2, 4, ...:
            self._ramp[slot.pid] = self._chunk[slot.pid] = 1  # its first collapse comes sooner
            slot.visit_wakes = slot.wakes
        fresh = cur.address == 0 or slot.visit is None or \
            self._fingerprint(slot.pid) != slot.visit_fp
        if fresh:  # a resumed visit whose process faulted since may have a new memory map
            slot.visit_fp = self._fingerprint(slot.pid)
            slot.visit = self._memory_map(slot)
            slot.anon_kb = sum(v.anonymous_kb for v in slot.visit[1])
            slot.anon_huge_kb = sum(v.anon_huge_kb for v in slot.visit[1])
        thp_enabled, vmas = slot.visit
        state = self._state(slot)
        if slot.exited():
            raise ProcessGone(f"pid {slot.pid}: process has exited")
        geo = self.kernel.geometry
        progress, collapsed = 1, 0
        mm_pid = slot.mm_pid or slot.pid
        with ProcessScanner(self.kernel, mm_pid, self.kpf, self.control_for(slot),
                            referenced=self.referenced) as mm:
            for vma in vmas:
                if vma.end <= cur.address:
                    continue
                if mm.ineligible(vma, not thp_enabled) is not None:
                    progress += 1
                    continue
                hstart, hend = aligned_range(vma, geo)
                addr = max(cur.address, hstart)
                while addr < hend:
                    if progress >= budget:
                        cur.address = addr
                        return progress, False, collapsed
                    if self.stopping:  # SIGTERM is honoured between chunks, not per pass
                        cur.address = addr
                        raise Stop
                    want = max(1, -(-(budget - progress) // geo.pmd_nr))
                    chunk = self._chunk.get(slot.pid, CHUNK_WINDOWS)
                    self._chunk[slot.pid] = min(CHUNK_WINDOWS, 2 * chunk)
                    cur.address = addr
                    n = min((hend - addr) >> geo.pmd_shift, want, chunk,
                            self._room(slot, state))
                    verdicts = mm.decide_range(vma, addr, addr + n * geo.pmd_size)
                    if not fresh and (verdicts.codes == ScanResult.SUCCEED).any() and \
                            self._fingerprint(slot.pid) != slot.visit_fp:
                        # hugepage_vma_revalidate: the process faulted since its VMAs were
                        # read (a region may have been replaced by a fresh mapping without
                        # MADV_HUGEPAGE): read them again before collapsing here.
                        cur.address, slot.visit = addr, None
                        return progress, False, collapsed
                    for result in self._windows(slot, state, mm, vma, addr,
                                                verdicts.codes.tolist(),
                                                verdicts.none.tolist(), verdicts.mapped):
                        progress += geo.pmd_nr
                        if result is None:  # handed to a worker: counted when it is reaped
                            collapsed += 1
                            continue
                        collapsed += result == ScanResult.SUCCEED
                        self._count(slot, state, result)
                    addr += n * geo.pmd_size
                cur.address = hend
        return progress, True, collapsed

    def _room(self, slot: MmSlot, state: TargetState | None) -> int:
        """How many windows are worth deciding now: no more than can be collapsed before
        the decision is read again (what the CPU caps pay for at the mean cost of a collapse,
        what the slot's worker lane takes), so that no pass reads page state it then throws
        away. Raises Stop or TargetDry when that is none."""
        self._capped(state)
        room, reserved = CHUNK_WINDOWS, 0
        if self.pool is not None:
            reserved = self.pool.pending()
            room = LANE_WINDOWS - self.pool.queued(slot.pid)
            if room <= 0:  # this process waits for its lane, the pass goes on
                self.queue_stalled = True
                raise TargetDry(0.0)
        return self._batch_size(room, state, reserved)

    def _memory_map(self, slot: MmSlot) -> tuple[bool, list]:
        """(THP enabled, VMAs) for a visit: /proc/PID/status and smaps, with the MADV_HUGEPAGE
        traced since applied (daemon/advice.py). A visit woken by that advice, in a process
        that has neither faulted nor mapped anything since its last read, takes that read
        instead: smaps walks every page table, and the advice changed only flags."""
        mm_pid = self._mm_of(slot)
        st = self.kernel.procfs.stat(mm_pid)
        fp = (st.minflt, st.majflt, st.rss_pages, st.vsize)
        advice, slot.advice = slot.advice, []
        if advice and slot.last_map is not None and slot.last_map[0] == fp:
            thp_enabled, vmas = slot.last_map[1], slot.last_map[2]
        else:
            thp_enabled = self.kernel.procfs.status(mm_pid).thp_enabled
            vmas = self.kernel.procfs.smaps(mm_pid)
        for start, end in advice:
            vmas = apply_advice(vmas, start, end)
        slot.last_map = (fp, thp_enabled, vmas)
        return thp_enabled, vmas

    def _count(self, slot: MmSlot, state: TargetState | None, result: ScanResult) -> None:
        self.counters.results[result.name] += 1
        if state is not None:
            state.results[result.name] += 1
        slot.last_result = result.name

    def _windows(self, slot: MmSlot, state: TargetState | None, mm: ProcessScanner, vma,
                 addr: int, codes: list[int], nones: list[int], mapped=None
                 ) -> Iterator[ScanResult]:
        """Each window's result in address order, the cursor on it. A run of SUCCEED windows
        within its target's bloat budget (a collapse fills the window's empty and zero-page
        PTEs with new pages; a full window adds nothing) is collapsed a bounded batch per
        call, and every window gets its own outcome."""
        geo, cur, i = self.kernel.geometry, self.registry.cursor, 0
        page_kb = geo.page_size >> 10
        while i < len(codes):
            cur.address = addr + i * geo.pmd_size
            if codes[i] not in COLLAPSIBLE:
                yield ScanResult(codes[i])
                i += 1
                continue
            key = mm.range_key(vma, cur.address)
            if key is not None:  # shared memory: one call per range of its file
                unmapped = codes[i] == ScanResult.PTE_MAPPED_HUGEPAGE and mapped is not None \
                    and mapped[i] == 0
                yield self._collapse_range(slot, state, key, cur.address, nones[i], unmapped)
                i += 1
                continue
            j, kb, limit = i, 0, self._ramp.get(slot.pid, MAX_BATCH)
            self._ramp[slot.pid] = min(MAX_BATCH, 2 * limit)  # 1, 2, 4, ... per call
            while j < len(codes) and codes[j] in COLLAPSIBLE and j - i < limit \
                    and (state is None or state.bloat_allows(kb + nones[j] * page_kb)):
                kb += nones[j] * page_kb
                j += 1
            if j == i:
                yield ScanResult.EXCEED_BLOAT_BUDGET
                i += 1
                continue
            if self.pool is not None:  # what the cap pays for, less the batches not yet charged
                j = i + self._batch_size(j - i, state, reserved=self.pool.pending())
            run = [addr + k * geo.pmd_size for k in range(i, j)]
            if self.pool is not None:  # a worker collapses it; outcomes counted when reaped
                self._may_collapse(slot, run[0], state)
                if self.pool.full(slot.pid):  # this process waits, the pass goes on
                    self.queue_stalled = True
                    raise TargetDry(0.0)
                self.pool.add(Job(slot.pid, slot.pidfd, run, nones[i:j],
                                  state.name if state is not None else None,
                                  on_credit=self._ticket,
                                  chainable=state is None or state.budget is None))
                self.handed += len(run)
                self._ticket = False
                self._start_batches()
                for a in run:
                    cur.address = a
                    yield None
                    i += 1
                continue
            outcomes, failed_at = self._collapse(slot, run, state)
            for outcome in outcomes:
                self._collapsed(slot, state, outcome, nones[i] * page_kb)
                cur.address = outcome.address
                yield outcome.result
                i += 1
            if failed_at is not None:  # backing off: the pass resumes at that window
                cur.address = failed_at
                raise Stop

    def _collapse_range(self, slot: MmSlot, state: TargetState | None, key, address: int,
                        none_ptes: int, unmapped: bool = False) -> ScanResult:
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
        if state is not None and not state.bloat_allows(bloat_kb):
            return ScanResult.EXCEED_BLOAT_BUDGET
        outcomes, failed_at = self._collapse(slot, [address], state)
        if failed_at is not None:
            self.registry.cursor.address = failed_at
            raise Stop
        outcome = outcomes[0]
        self._collapsed(slot, state, outcome, bloat_kb)
        if outcome.result == ScanResult.SUCCEED:
            self.collapsed_ranges.add(key)
        return outcome.result

    def _collapsed(self, slot: MmSlot, state: TargetState | None, outcome: CollapseOutcome,
                   bloat_kb: int) -> None:
        if outcome.result == ScanResult.SUCCEED:
            slot.anon_huge_kb += self.kernel.geometry.pmd_size >> 10
            slot.bloat_kb += bloat_kb
            if state is not None:
                state.collapsed += 1
                state.charge_bloat(slot.pid, bloat_kb)

    # --- the workers -----------------------------------------------------------------
    def _may_start(self, job: Job) -> bool:
        """A queued batch starts only outside a back-off and within the CPU caps: under a
        cap, beside a running batch only while the tokens pay for that one too."""
        now = self.clock()
        state = self.target_states.get(job.target)
        if self.stopping or now < self.backoff_until:
            return False
        if job.on_credit:  # the first batch of a pass that started within the cap
            return True
        if not self.budget.allows(now):
            return False
        running = self.pool.in_flight() if self.pool is not None else 0
        if self.budget.percent and running and \
                self.budget.tokens <= running * self._collapse_cost():
            return False
        return state is None or state.budget is None or state.budget.allows(now)

    def reap(self) -> bool:
        """Take back the batches the workers finished (on the daemon's thread), start the
        next ones; True if any had finished."""
        if self.pool is None:
            return False
        done = self.pool.finished()
        self._reap(done)
        self._start_batches()
        return bool(done)

    def _start_batches(self) -> None:
        """Start what the workers may take now; batches the CPU cap holds back are due when
        it allows them (the loop wakes then: no finished batch will wake it)."""
        now = self.clock()
        self.pool.chain = not self.budget.percent and not self.stopping \
            and now >= self.backoff_until
        self.pool.start(self._may_start)
        if self.pool.waiting() and not self.budget.allows(now):
            self.cpu_wait_until = max(self.cpu_wait_until, now + self.budget.wait(now))

    def _reap(self, done: list) -> None:
        page_kb = self.kernel.geometry.page_size >> 10
        for job, future in done:
            self.budget.charge(job.cpu)  # the worker thread's CPU: charged here, once
            slot = self.registry.slots.get(job.pid)
            try:
                outcomes, cpu = future.result()
            except (ProcessGone, AccessDenied):
                if slot is not None:
                    self.exit(job.pid)
                continue
            if slot is None:
                continue
            state = self.target_states.get(job.target)
            outcomes = [self._named(slot, o) for o in outcomes]
            outcomes, failed_at = self._account(slot, state, outcomes, cpu, cursor=False)
            nones = dict(zip(job.addresses, job.nones, strict=True))
            for outcome in outcomes:
                self._collapsed(slot, state, outcome, nones[outcome.address] * page_kb)
                self._count(slot, state, outcome.result)
            if failed_at is not None and self.pool is not None:
                self.pool.drop()  # found again on the next visits (their slots are awake)
                slot.wake()

    def _named(self, slot: MmSlot, outcome: CollapseOutcome) -> CollapseOutcome:
        """A worker names no failure (it reads no page state): name it here."""
        if not outcome.errno:
            return outcome
        control = self.control_for(slot)
        result = result_of_errno(outcome.errno, lambda: window_now(
            self.kernel, slot.pid, self.kpf, control, outcome.address))
        return replace(outcome, result=result)

    # --- collapse_huge_page ----------------------------------------------------------
    def _collapse_cost(self) -> float:
        """CPU-seconds one collapse is expected to cost: the mean so far."""
        c = self.counters
        return max(c.collapse_cpu_seconds / c.collapse_attempts if c.collapse_attempts
                   else FIRST_COLLAPSE_CPU, 1e-6)

    def _batch_size(self, windows: int, state: TargetState | None, reserved: int = 0) -> int:
        """At most what the CPU caps' tokens (the global one and the target's) pay for at
        the mean cost of the collapses so far, less `reserved` windows decided and not yet
        charged, and at least one window."""
        each = self._collapse_cost()
        for budget in (self.budget, state.budget if state is not None else None):
            if budget is not None and budget.percent:
                windows = min(windows, int(budget.tokens / each) - reserved)
        return max(1, windows)

    def _collapse(self, slot: MmSlot, addresses: list[int], state: TargetState | None = None
                  ) -> tuple[list[CollapseOutcome], int | None]:
        """Collapse consecutive SUCCEED windows in one call, within the CPU caps and outside
        an allocation back-off: (outcomes, the window an allocation failure stopped at)."""
        self._may_collapse(slot, addresses[0], state)
        control = self.control_for(slot)
        cpu0 = time.thread_time()
        outcomes = collapse_run(
            slot.pidfd, slot.pid, addresses[:self._batch_size(len(addresses), state)],
            self.kernel.geometry.pmd_size,
            lambda a: window_now(self.kernel, slot.pid, self.kpf, control, a))
        cpu = time.thread_time() - cpu0
        self.meter.charge()  # the global cap: the loop thread's CPU, this call included
        self._ticket = False
        return self._account(slot, state, outcomes, cpu)

    def _may_collapse(self, slot: MmSlot, address: int, state: TargetState | None) -> None:
        """Raise Stop (or TargetDry) unless a collapse may start now."""
        if self.stopping or self.clock() < self.backoff_until:
            raise Stop
        self._capped(state)
        if self.tunables.defrag == 0 and \
                self.kernel.mm.free_huge_blocks(self._window_nodes(slot, address)) == 0:
            self._back_off(slot, address, "defrag=0 and no free huge page")
            raise Stop

    def _capped(self, state: TargetState | None) -> None:
        """Raise Stop (the global cap) or TargetDry (the target's share) unless the caps
        allow more work now. What the pass spent so far is charged first. A
        pass that started within the cap takes its first batch even if reading the page
        state for it ran into debt (it is paid off before the next pass)."""
        self.meter.charge()
        now = self.clock()
        if not self.budget.allows(now) and not self._ticket:
            self.cpu_wait_until = now + self.budget.wait(now)
            raise Stop
        if state is not None and state.budget is not None and not state.budget.allows(now):
            raise TargetDry(state.budget.wait(now))

    def _account(self, slot: MmSlot, state: TargetState | None,
                 outcomes: list[CollapseOutcome], cpu: float, cursor: bool = True
                 ) -> tuple[list[CollapseOutcome], int | None]:
        """A collapse's CPU charged to its target's share (the global cap is charged by the
        thread that spent it), every outcome observed and logged; an allocation failure
        backs off: (the outcomes before it, its window)."""
        if state is not None:
            state.cpu_seconds += cpu
            if state.budget is not None:
                state.budget.charge(cpu)
        self.counters.collapse_cpu_seconds += cpu
        for outcome in outcomes:
            self.counters.observe(outcome)
            log.debug("collapse pid %d %#x: %s", slot.pid, outcome.address,
                      outcome.result.name,
                      extra={"event": "collapse", "pid": slot.pid, "comm": slot.comm,
                             "target": state.name if state is not None else None,
                             "address": hex(outcome.address), "result": outcome.result.name,
                             "errno": outcome.errno_name or None, "batch": len(outcomes),
                             "duration_ms": round(outcome.seconds * 1000, 3)})
        if not outcomes:
            raise ProcessGone(f"pid {slot.pid}: process has exited")
        if outcomes[-1].result == ScanResult.ALLOC_HUGE_PAGE_FAIL:
            failed = outcomes.pop().address
            self._back_off(slot, failed, "huge page allocation failed", cursor)
            return outcomes, failed
        return outcomes, None

    def _back_off(self, slot: MmSlot, address: int, why: str, cursor: bool = True) -> None:
        ms = self.tunables.alloc_sleep_millisecs
        self.backoff_until = self.clock() + ms / 1000.0
        if self.pool is not None:
            self.pool.chain = False
        self.backoff_nodes = self._window_nodes(slot, address)
        self.counters.alloc_backoffs += 1
        if cursor:
            self.registry.cursor.address = address
        log.info("back-off %d ms: %s", ms, why,
                 extra={"event": "backoff", "pid": slot.pid, "address": hex(address),
                        "ms": ms, "reason": why})

    def _window_nodes(self, slot: MmSlot, address: int) -> set[int] | None:
        """The NUMA node(s) a collapse of this window allocates on (the one holding most of
        its pages); None (any) on a one-node machine, or when its pages cannot be read."""
        if self._one_node is None:
            self._one_node = len(self.kernel.mm.numa_nodes()) < 2
        if self._one_node:
            return None
        try:
            with self.kernel.pagemap(slot.pid) as pm:
                entries = pm.read(address, address + self.kernel.geometry.pmd_size)
        except (HugepagedError, OSError):
            return None
        return self.kernel.mm.window_nodes(entries) or None

    def end_backoff_if_free(self) -> bool:
        """Free huge pages are used at once: the reason khugepaged exists (a VM that exits and
        frees gigabytes should hand them to the processes that are left)."""
        if self.backoff_until and self.kernel.mm.free_huge_blocks(self.backoff_nodes) > 0:
            self.backoff_until = 0.0
            log.info("back-off ended: free huge page available",
                     extra={"event": "backoff_end"})
            return True
        return False
