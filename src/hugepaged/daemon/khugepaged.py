"""khugepaged_do_scan and khugepaged_scan_mm_slot, over process_madvise(MADV_COLLAPSE).

Progress is accounted as the kernel does: 512 per window examined, 1 per VMA (or settled
process) skipped, up to pages_to_scan per pass.
"""

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from hugepaged.collapse import CollapseOutcome, collapse_window
from hugepaged.errors import AccessDenied, HugepagedError, ProcessGone
from hugepaged.kernel import Kernel, KPageFlags
from hugepaged.kernel.procfs import PF_KTHREAD, mapped_at
from hugepaged.policy import CollapseControl
from hugepaged.results import ScanResult
from hugepaged.scan.eligibility import aligned_range
from hugepaged.scan.process import CHUNK_WINDOWS, ProcessScanner
from hugepaged.tunables import Tunables

from .budget import CpuBudget
from .registry import RESCAN_MAX, MmSlot, Registry

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

    def set_tunables(self, tunables: Tunables) -> None:
        old, self.tunables = self.tunables, tunables
        self.control = CollapseControl.from_tunables(tunables)
        self.budget.set_percent(tunables.max_cpu_percent)
        if (old.enabled, old.max_ptes_none, old.max_ptes_swap, old.max_ptes_shared) != \
           (tunables.enabled, tunables.max_ptes_none, tunables.max_ptes_swap,
                tunables.max_ptes_shared):
            for slot in self.registry.slots.values():
                slot.wake()  # new rules: look at everyone again

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
        struct collapse_control down the same way); today every slot has the global one."""
        return self.control

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
            log.info("registered pid %d (%s)", pid, st.comm,
                     extra={"event": "register", "pid": pid, "comm": st.comm})
        return slot

    def exit(self, pid: int) -> None:
        self.kthreads.discard(pid)
        if pid in self.registry and self.registry.cursor.pid == pid:
            self._advance(pid)  # collect_mm_slot at the tail still completes a full scan
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
                step, visited = self.scan_mm_slot(pages - progress)
                progress += step
                worked |= visited
        except Stop:
            worked = True
        return worked

    def _advance(self, pid: int) -> None:
        """Move the cursor to the next slot; wrapping past the tail is a full scan."""
        cur = self.registry.cursor
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
        try:
            progress, finished, collapsed = self._scan_vmas(slot, budget)
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
        if cur.address == 0 or slot.visit is None:
            thp_enabled = self.kernel.procfs.status(slot.pid).thp_enabled
            slot.visit = (thp_enabled, self.kernel.procfs.smaps(slot.pid))
        thp_enabled, vmas = slot.visit
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
                    codes = mm.decide_range(vma, addr, addr + n * geo.pmd_size).codes
                    for i, code in enumerate(codes.tolist()):
                        a = addr + i * geo.pmd_size
                        cur.address = a
                        result = ScanResult(code)
                        if result == ScanResult.SUCCEED:
                            result = self._collapse(slot, a)
                            collapsed += result == ScanResult.SUCCEED
                        self.counters.results[result.name] += 1
                        slot.last_result = result.name
                        progress += geo.pmd_nr
                    addr += n * geo.pmd_size
                cur.address = hend
        return progress, True, collapsed

    # --- collapse_huge_page ----------------------------------------------------------
    def _collapse(self, slot: MmSlot, address: int) -> ScanResult:
        """One collapse, within the CPU cap and outside an allocation back-off."""
        now = self.clock()
        if self.stopping or now < self.backoff_until:
            raise Stop
        if not self.budget.allows(now):
            self.cpu_wait_until = now + self.budget.wait(now)
            raise Stop
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
        self.counters.collapse_cpu_seconds += cpu
        self.counters.observe(outcome)
        log.debug("collapse pid %d %#x: %s", slot.pid, address, outcome.result.name,
                  extra={"event": "collapse", "pid": slot.pid, "comm": slot.comm,
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
