"""khugepaged_do_scan and khugepaged_scan_mm_slot, over process_madvise(MADV_COLLAPSE).

Progress is accounted as the kernel does: 512 per window examined, 1 per VMA (or settled
process) skipped, up to pages_to_scan per pass.
"""

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from hugepaged.collapse import CollapseOutcome, collapse_window
from hugepaged.errors import AccessDenied, HugepagedError, ProcessGone
from hugepaged.kernel import Kernel, KPageFlags
from hugepaged.kernel.procfs import PF_KTHREAD, mapped_at
from hugepaged.policy import CollapseControl
from hugepaged.results import COLLAPSIBLE, ScanResult
from hugepaged.scan.eligibility import aligned_range
from hugepaged.scan.process import CHUNK_WINDOWS, ProcessScanner
from hugepaged.targets import ProcessFacts, Target, first_match
from hugepaged.tunables import Tunables

from .budget import CpuBudget
from .ranges import RangeMemo
from .registry import RESCAN_MAX, MmSlot, Registry
from .targets import TargetState, TargetStates

log = logging.getLogger("hugepaged")
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
    """Raised inside a pass when the slot's target has spent its CPU share: the pass leaves
    that slot where it is (it resumes there when the share is back) and goes on."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


class Khugepaged:
    """The scan state machine, free of I/O multiplexing so tests can drive it pass by pass."""

    def __init__(self, kernel: Kernel, tunables: Tunables, clock=time.monotonic) -> None:
        self.kernel, self.clock = kernel, clock
        self.registry = Registry()
        self.counters = Counters()
        self.budget = CpuBudget(tunables.max_cpu_percent, clock())
        self.tunables = tunables
        self.control = CollapseControl.from_tunables(tunables)  # the global policy
        self._kpf: KPageFlags | None = None  # opened at the first scan, after the start-up checks
        self.backoff_until = 0.0
        self.cpu_wait_until = 0.0
        self.stopping = False
        self.kthreads: set[int] = set()
        self.only_pids: set[int] | None = None  # targeted mode: these processes only
        self.exclude_comm: re.Pattern | None = None
        self.targets: list[Target] = []
        self._return_to: int | None = None  # the slot a higher priority one cut in before
        self.target_states = TargetStates()
        self.collapsed_ranges = RangeMemo()

    def set_tunables(self, tunables: Tunables) -> None:
        old, self.tunables = self.tunables, tunables
        self.control = CollapseControl.from_tunables(tunables)
        self.budget.set_percent(tunables.max_cpu_percent)
        for slot in self.registry.slots.values():
            self._apply_target(slot, slot.target)  # the global part of every policy
        if (old.enabled, old.max_ptes_none, old.max_ptes_swap, old.max_ptes_shared) != \
           (tunables.enabled, tunables.max_ptes_none, tunables.max_ptes_swap,
                tunables.max_ptes_shared):
            for slot in self.registry.slots.values():
                slot.wake()  # new rules: look at everyone again

    def set_targets(self, targets: list[Target]) -> None:
        """A new list of targets (start-up, reload): every slot is matched again."""
        self.targets = list(targets)
        self.target_states.configure(
            [(t.name, t.max_cpu_percent, t.max_bloat_kb) for t in targets], self.clock())
        for slot in list(self.registry.slots.values()):
            if self.resolve(slot):
                slot.wake()

    @property
    def kpf(self) -> KPageFlags:
        if self._kpf is None:
            self._kpf = self.kernel.kpageflags()
        return self._kpf

    def close(self) -> None:
        self.registry.close()
        if self._kpf is not None:
            self._kpf.close()
            self._kpf = None

    def control_for(self, slot: MmSlot) -> CollapseControl:
        """The policy this slot's process is decided and collapsed by (the kernel passes a
        struct collapse_control down the same way): its target's, resolved at registration,
        on exec and on reload, or the global one."""
        return slot.control if slot.control is not None else self.control

    def resolve(self, slot: MmSlot) -> bool:
        """Match the slot's process against the targets (first match wins); True if its
        policy changed."""
        target = first_match(self.targets, ProcessFacts(self.kernel.procfs, slot.pid,
                                                        slot.comm)) if self.targets else None
        old = slot.control
        self._apply_target(slot, target)
        new = target.name if target is not None else None
        if old is not None and old.target != new:  # at registration the register line says
            log.info("pid %d (%s): target %s -> %s", slot.pid, slot.comm, old.target, new,
                     extra={"event": "target", "pid": slot.pid, "comm": slot.comm,
                            "target": new, "old": old.target})
        return slot.control != old

    def _apply_target(self, slot: MmSlot, target: Target | None) -> None:
        slot.target = target
        control = self.control if target is None else replace(self.control,
                                                              **target.overrides())
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
            slot.comm = self.kernel.procfs.stat(pid).comm
        except (HugepagedError, OSError):
            return
        self.resolve(slot)
        slot.visit = None
        slot.wake()

    def _state(self, slot: MmSlot) -> TargetState | None:
        return self.target_states.get(self.control_for(slot).target)

    # --- the registry's feeds -------------------------------------------------------
    def enter(self, pid: int, settle: float = 0.0) -> MmSlot | None:
        """Register a user process (never kernel threads, never ourselves)."""
        if pid in self.registry or pid in self.kthreads:
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
            log.info("registered pid %d (%s)%s", pid, st.comm,
                     f", target {target}" if target else "",
                     extra={"event": "register", "pid": pid, "comm": st.comm,
                            "target": target})
        return slot

    def exit(self, pid: int) -> None:
        self.kthreads.discard(pid)
        if pid in self.registry and self.registry.cursor.pid == pid:
            self._advance(pid)  # collect_mm_slot at the tail still completes a full scan
        self.target_states.forget(pid)  # its bloat no longer counts against its target
        if self.registry.exit(pid):
            log.info("pid %d gone", pid, extra={"event": "unregister", "pid": pid})

    def discover(self) -> None:
        """The periodic /proc walk: catches what the connector missed, and exits."""
        pids = set(self.kernel.procfs.pids())
        self.kthreads &= pids
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
        self.kernel.drain_lru()  # khugepaged_do_scan: lru_add_drain_all()
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
            worked = True
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
        cur.pid, cur.address = self.registry.next_pid(pid), 0
        if cur.pid is None:
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
        if cur.address == 0 and not self._due(slot, now):
            self._advance(pid)
            return 1, False
        control = self.control_for(slot)
        if control.target is not None and control.enabled == "never":
            slot.visit = None  # a target at never: leave the process alone, read nothing
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
        except (ProcessGone, AccessDenied) as err:
            if isinstance(err, AccessDenied):
                log.warning("pid %d: %s; dropped", pid, err,
                            extra={"event": "unregister", "pid": pid})
            self.exit(pid)
            return 1, True
        if finished:
            slot.visit = None
            slot.last_full = now
            if collapsed:
                slot.wake()
            else:
                if slot.forced:  # nothing changed and nothing found: force less often
                    slot.rescan_every = min(RESCAN_MAX, slot.rescan_every * 2)
                slot.settle(now)
            slot.forced = False
            self._advance(pid)
        return progress, True

    def _due(self, slot: MmSlot, now: float) -> bool:
        """A settled slot is visited when due, and only if its fault counters moved."""
        if slot.due > now:
            return False
        try:
            st = self.kernel.procfs.stat(slot.pid)
        except (HugepagedError, OSError):
            return True  # let the scan find out and drop it
        fp = (st.minflt, st.majflt, st.rss_pages)
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
        if cur.address == 0 or slot.visit is None:
            thp_enabled = self.kernel.procfs.status(slot.pid).thp_enabled
            slot.visit = (thp_enabled, self.kernel.procfs.smaps(slot.pid))
            slot.anon_kb = sum(v.anonymous_kb for v in slot.visit[1])
            slot.anon_huge_kb = sum(v.anon_huge_kb for v in slot.visit[1])
        thp_enabled, vmas = slot.visit
        state = self._state(slot)
        if slot.exited():
            raise ProcessGone(f"pid {slot.pid}: process has exited")
        geo = self.kernel.geometry
        progress, collapsed = 1, 0
        with ProcessScanner(self.kernel, slot.pid, self.kpf, self.control_for(slot)) as mm:
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
                    want = max(1, -(-(budget - progress) // geo.pmd_nr))
                    n = min((hend - addr) >> geo.pmd_shift, want, CHUNK_WINDOWS)
                    verdicts = mm.decide_range(vma, addr, addr + n * geo.pmd_size)
                    nones = verdicts.none.tolist()
                    for i, code in enumerate(verdicts.codes.tolist()):
                        a = addr + i * geo.pmd_size
                        cur.address = a
                        result = ScanResult(code)
                        if result in COLLAPSIBLE:
                            result = self._collapse_range(slot, mm, vma, state, a, nones[i])
                            collapsed += result == ScanResult.SUCCEED
                        self.counters.results[result.name] += 1
                        if state is not None:
                            state.results[result.name] += 1
                        slot.last_result = result.name
                        progress += geo.pmd_nr
                    addr += n * geo.pmd_size
                cur.address = hend
        return progress, True, collapsed

    # --- collapse_huge_page ----------------------------------------------------------
    def _collapse_range(self, slot: MmSlot, mm: ProcessScanner, vma, state: TargetState | None,
                        address: int, none_ptes: int) -> ScanResult:
        """One collapse per range of a file: a shared-memory range another process already
        collapsed is one huge page in the page cache, and this process maps it by PMD at
        its next fault (PTE_MAPPED_HUGEPAGE until then); it is not asked again."""
        key = mm.range_key(vma, address)
        if key is not None and self.collapsed_ranges.seen(key):
            return ScanResult.PTE_MAPPED_HUGEPAGE
        result = self._collapse_for(slot, state, address, none_ptes)
        if key is not None and result == ScanResult.SUCCEED:
            self.collapsed_ranges.add(key)
        return result

    def _collapse_for(self, slot: MmSlot, state: TargetState | None, address: int,
                      none_ptes: int) -> ScanResult:
        """A SUCCEED window, within its target's bloat budget: a collapse fills its empty and
        zero-page PTEs with new pages, so it may not take the target past max_bloat_mb.
        A full window adds nothing and always goes ahead."""
        bloat_kb = none_ptes * (self.kernel.geometry.page_size >> 10)  # one new page each
        if state is not None and not state.bloat_allows(bloat_kb):
            return ScanResult.EXCEED_BLOAT_BUDGET
        result = self._collapse(slot, address, state)
        if result == ScanResult.SUCCEED:
            slot.anon_huge_kb += self.kernel.geometry.pmd_size >> 10
            if state is not None:
                state.collapsed += 1
                state.charge_bloat(slot.pid, bloat_kb)
        return result

    def _collapse(self, slot: MmSlot, address: int,
                  state: TargetState | None = None) -> ScanResult:
        """One collapse, within the CPU cap and outside an allocation back-off."""
        now = self.clock()
        if self.stopping or now < self.backoff_until:
            raise Stop
        if not self.budget.allows(now):
            self.cpu_wait_until = now + self.budget.wait(now)
            raise Stop
        if state is not None and state.budget is not None and not state.budget.allows(now):
            raise TargetDry(state.budget.wait(now))
        if self.tunables.defrag == 0 and self.kernel.mm.free_huge_blocks() == 0:
            self._back_off(slot, address, "defrag=0 and no free huge page")
            raise Stop
        cpu0 = time.thread_time()
        outcome = collapse_window(slot.pidfd, slot.pid, address,
                                  self.kernel.geometry.pmd_size,
                                  lambda: mapped_at(self.kernel.procfs.maps_text(slot.pid),
                                                    address))
        cpu = time.thread_time() - cpu0
        self.budget.charge(cpu)
        if state is not None:
            state.cpu_seconds += cpu
            if state.budget is not None:
                state.budget.charge(cpu)
        self.counters.collapse_cpu_seconds += cpu
        self.counters.observe(outcome)
        log.debug("collapse pid %d %#x: %s", slot.pid, address, outcome.result.name,
                  extra={"event": "collapse", "pid": slot.pid, "comm": slot.comm,
                         "target": state.name if state is not None else None,
                         "address": hex(address), "result": outcome.result.name,
                         "errno": outcome.errno_name or None,
                         "duration_ms": round(outcome.seconds * 1000, 3)})
        if outcome.result == ScanResult.ALLOC_HUGE_PAGE_FAIL:
            self._back_off(slot, address, "huge page allocation failed")
            raise Stop
        return outcome.result

    def _back_off(self, slot: MmSlot, address: int, why: str) -> None:
        ms = self.tunables.alloc_sleep_millisecs
        self.backoff_until = self.clock() + ms / 1000.0
        self.counters.alloc_backoffs += 1
        self.registry.cursor.address = address
        log.info("back-off %d ms: %s", ms, why,
                 extra={"event": "backoff", "pid": slot.pid, "address": hex(address),
                        "ms": ms, "reason": why})

    def end_backoff_if_free(self) -> bool:
        """Free huge pages are used at once: the reason khugepaged exists (a VM that exits and
        frees gigabytes should hand them to the processes that are left)."""
        if self.backoff_until and self.kernel.mm.free_huge_blocks() > 0:
            self.backoff_until = 0.0
            log.info("back-off ended: free huge page available",
                     extra={"event": "backoff_end"})
            return True
        return False
