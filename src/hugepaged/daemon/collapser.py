"""The collapser: collapse_huge_page's caller side in the daemon (and khugepaged_alloc_sleep).

It owns what decides whether a collapse may start and what one costs: the global CPU cap
(and each target's share, kept in the target's state), the meter that charges the loop
thread's CPU, the allocation back-off, the ramp of batch sizes a visit's calls take, and the
collapse workers. It answers "may I collapse now" with a Hold (or None: go) instead of
raising, and "collapse this run" with the outcomes; the pass decides what to do with both.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from hugepaged.collapse import (
    DAEMON,
    CollapseOutcome,
    Pace,
    ProcessCollapse,
    ThreadMeter,
    window_now,
)
from hugepaged.errors import HugepagedError, ProcessGone
from hugepaged.results import ScanResult
from hugepaged.tunables import Tunables

from . import schedule as sched
from .churn import SplitWatch
from .counters import Counters
from .registry import MmSlot
from .schedule import Schedule
from .targets import TargetState

log = logging.getLogger("hugepaged")
FIRST_COLLAPSE = 0.003  # seconds a collapse is assumed to take before one is measured


class Halt(enum.Enum):
    STOP = "stop"  # the pass ends at this window (back-off, the global cap, stopping)
    DRY = "dry"  # this process waits (its target's share, its lane full); the pass goes on


@dataclass(frozen=True)
class Hold:
    """Why a collapse may not start now, and for how long (DRY: seconds from now, and what
    the process waits for: "share", "lane" or "pressure")."""

    halt: Halt
    wait: float = 0.0
    reason: str = ""


STOP = Hold(Halt.STOP)
# Results that are hugepaged's own reasons not to collapse a collapsible window.
OBSTACLES = {
    ScanResult.ALLOC_HUGE_PAGE_FAIL: "no free huge page (allocation failed: back-off)",
    ScanResult.EXCEED_BLOAT_BUDGET: "its bloat budget (max_bloat_mb)",
    ScanResult.SPLIT_BACKOFF: "windows held after being split again (on_split)",
    ScanResult.UNDERUSED_SPLIT: "windows the kernel's underused-THP shrinker split",
}
PRESSURE_POLL = 1.0  # seconds a pressure reading is reused, and a paused process waits


class Collapser:
    """Caps, back-off and the calls; shared by the pass (on the loop's thread) and the
    workers (daemon/lanes.py, which hands batches to threads)."""

    def __init__(self, kernel, tunables: Tunables, counters: Counters, schedule: Schedule,
                 clock: Callable[[], float], cpu_clock: Callable[[], float]) -> None:
        self.kernel, self.counters, self.schedule, self.clock = kernel, counters, schedule, clock
        self.tunables = tunables
        self.budget = Pace(tunables.max_cpu_percent, clock)
        self.meter = ThreadMeter(self.budget, cpu_clock)  # the loop thread's CPU, all of it
        self.stopping = False
        self.ticket = False  # this pass's first batch may go on credit (cap)
        self.sync_cpu = 0.0  # CPU of the collapses made on the loop's own thread
        self.ramp: dict[int, int] = {}  # pid -> windows its next call may take
        self.backoff_nodes: set[int] | None = None  # where the back-off's allocation was
        self._one_node: bool | None = None
        self._kpf = None  # opened at the first use, after the start-up checks
        self.splits = SplitWatch(kernel, counters, clock)  # collapsed windows split again
        self._psi_cache: dict[str | None, tuple[float, float | None]] = {}

    @property
    def kpf(self):
        if self._kpf is None:
            self._kpf = self.kernel.kpageflags()
        return self._kpf

    def set_tunables(self, tunables: Tunables) -> None:
        self.tunables = tunables
        self.budget.set_percent(tunables.max_cpu_percent)

    def forget(self, pid: int) -> None:
        self.ramp.pop(pid, None)

    def close(self) -> None:
        if self._kpf is not None:
            self._kpf.close()
            self._kpf = None

    # --- may a collapse start --------------------------------------------------------
    @property
    def backoff_until(self) -> float:
        return self.schedule.at(sched.BACKOFF) or 0.0

    def in_backoff(self, now: float) -> bool:
        return self.schedule.until(sched.BACKOFF, now)

    def capped(self, state: TargetState | None) -> Hold | None:
        """The caps: STOP (the global cap rests) or DRY (the target's share), or None. What
        the loop spent so far is charged first. A pass that started within the cap takes
        its first batch even if reading the page state for it ran into debt (it is paid off
        before the next pass)."""
        self.meter.charge()
        now = self.clock()
        if not self.budget.allows(now) and not self.ticket:
            self.schedule.set(sched.CPU, now + self.budget.wait(now))
            self.obstacle(state, "the daemon's CPU cap (max_cpu_percent)")
            return STOP
        if state is not None and state.budget is not None and not state.budget.allows(now):
            return Hold(Halt.DRY, state.budget.wait(now), "share")
        return None

    def pressure(self, slot: MmSlot, control) -> Hold | None:
        """Memory pressure above the policy's max_memory_pressure: this process waits (DRY)
        and the pass goes on. A target matched by cgroup is judged by its process's own
        cgroup2 group's pressure, everything else by the machine's."""
        limit = control.max_memory_pressure
        if not limit:
            return None
        value, where = None, "machine"
        if control.by_cgroup:
            if slot.cgroup2 is None:
                try:
                    slot.cgroup2 = self.kernel.procfs.cgroup2(slot.pid) or ""
                except (HugepagedError, OSError):
                    slot.cgroup2 = ""
            if slot.cgroup2:
                value, where = self._psi(slot.cgroup2), f"cgroup {slot.cgroup2}"
        if value is None:
            value, where = self._psi(None), "machine"
        paused = value is not None and value > limit
        if paused != slot.pressured:  # said once when it starts and once when it ends
            slot.pressured = paused
            log.info("pid %d (%s): collapses %s: memory pressure (%s) %.1f%% %s %d%%",
                     slot.pid, slot.comm, "paused" if paused else "resumed", where,
                     value or 0.0, ">" if paused else "<=", limit,
                     extra={"event": "pressure", "pid": slot.pid, "paused": paused,
                            "where": where, "avg10": value, "limit": limit})
        return Hold(Halt.DRY, PRESSURE_POLL, "pressure") if paused else None

    def _psi(self, cgroup: str | None) -> float | None:
        """A PSI reading (the machine's, or a cgroup2 group's), reused for PRESSURE_POLL."""
        now = self.clock()
        hit = self._psi_cache.get(cgroup)
        if hit is None or now - hit[0] >= PRESSURE_POLL:
            p = self.kernel.pressure
            hit = (now, p.machine() if cgroup is None else p.cgroup(cgroup))
            self._psi_cache[cgroup] = hit
        return hit[1]

    def admit(self, slot: MmSlot, address: int, state: TargetState | None) -> Hold | None:
        """Whether a collapse of this window may start now: not stopping, not in a back-off,
        within the caps, and with defrag=0 only while a free huge page exists."""
        if self.stopping or self.in_backoff(self.clock()):
            return STOP
        hold = self.pressure(slot, slot.control) or self.capped(state)
        if hold is not None:
            return hold
        if self.tunables.defrag == 0 and \
                self.kernel.mm.free_huge_blocks(self.window_nodes(slot, address)) == 0:
            self.back_off(slot, address, "defrag=0 and no free huge page")
            return STOP
        return None

    def cost(self) -> float:
        """CPU-seconds one collapse is expected to cost: the mean so far."""
        c = self.counters
        return max(c.collapse_cpu_seconds / c.collapse_attempts if c.collapse_attempts
                   else FIRST_COLLAPSE, 1e-6)

    def duration(self) -> float:
        """Seconds one collapse is expected to take (wall time): the mean so far."""
        c = self.counters
        return max(c.collapse_seconds_sum / c.collapse_attempts if c.collapse_attempts
                   else FIRST_COLLAPSE, 1e-6)

    def batch_size(self, windows: int, control) -> int:
        """Windows one call may take: as many as fit in the policy's max_stall_ms at the
        mean time of a collapse so far (a call holds the process for all of them), at least
        one."""
        fit = int(control.max_stall_ms / 1000.0 / self.duration())
        return max(1, min(windows, fit))

    def paced_windows(self, state: TargetState | None, seconds: float) -> int:
        """Windows the CPU caps (the global one and the target's share) pay for over the
        next `seconds`, at the mean cost of a collapse so far."""
        rates = [b.rate for b in (self.budget, state.budget if state is not None else None)
                 if b is not None and b.percent]
        return int(min(rates) * seconds / self.cost()) if rates else 0

    def next_ramp(self, pid: int, most: int) -> int:
        """Windows this process's next call may take: 1, 2, 4, ... up to `most` (a visit's
        first collapse comes soon, and later ones amortise the call)."""
        limit = self.ramp.get(pid, most)
        self.ramp[pid] = min(most, 2 * limit)
        return limit

    # --- collapse_huge_page ----------------------------------------------------------
    def process(self, slot: MmSlot, control) -> ProcessCollapse:
        """The collapse path for this slot's process, failures named by a re-decision."""
        pid = slot.pid
        return ProcessCollapse(pid, slot.pidfd, self.kernel.geometry.pmd_size,
                               lambda a: window_now(self.kernel, pid, self.kpf, control, a),
                               DAEMON)

    def collapse(self, slot: MmSlot, control, addresses: list[int],
                 state: TargetState | None) -> tuple[list[CollapseOutcome], int | None]:
        """Collapse consecutive windows (as many as one call may take) on this thread:
        (outcomes, the window an allocation failure stopped at). admit() first."""
        run = addresses[:self.batch_size(len(addresses), control)]
        outcomes, cpu = self.process(slot, control).call(run)
        self.sync_cpu += cpu  # the loop thread's own collapses (the pass's CPU less these)
        self.meter.charge()  # the global cap: the loop thread's CPU, this call included
        self.ticket = False
        return self.account(slot, state, outcomes, cpu)

    def account(self, slot: MmSlot, state: TargetState | None,
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
        self.counters.cpu["collapse"] += cpu
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
            self.obstacle(state, OBSTACLES[ScanResult.ALLOC_HUGE_PAGE_FAIL])
            failed = outcomes.pop().address
            self.back_off(slot, failed, "huge page allocation failed")
            return outcomes, failed
        return outcomes, None

    def collapsed(self, slot: MmSlot, state: TargetState | None, outcome: CollapseOutcome,
                  bloat_kb: int) -> None:
        """A window's outcome in the slot's and its target's books."""
        if outcome.result == ScanResult.SUCCEED:
            self.splits.collapsed(slot, outcome.address, slot.visits)
            slot.anon_huge_kb += self.kernel.geometry.pmd_size >> 10
            slot.bloat_kb += bloat_kb
            if state is not None:
                state.collapsed += 1
                state.ledger.charge(slot.pid, bloat_kb)

    def count(self, slot: MmSlot, state: TargetState | None, result: ScanResult) -> None:
        """One window's result, examined or collapsed, in the counters (and, for a window
        it could not collapse for a reason of hugepaged's, as its target's obstacle)."""
        self.counters.results[result.name] += 1
        if state is not None:
            state.results[result.name] += 1
            self.obstacle(state, OBSTACLES.get(result))
        slot.last_result = result.name

    @staticmethod
    def obstacle(state: TargetState | None, why: str | None) -> None:
        """The last thing that kept a target's collapses back: why a promise is broken."""
        if state is not None and why:
            state.obstacle = why

    # --- khugepaged_alloc_sleep ------------------------------------------------------
    def back_off(self, slot: MmSlot, address: int, why: str) -> None:
        ms = self.tunables.alloc_sleep_millisecs
        now = self.clock()
        self.schedule.set(sched.BACKOFF, now + ms / 1000.0)
        self.schedule.set(sched.BUDDY, now)
        self.backoff_nodes = self.window_nodes(slot, address)
        self.counters.alloc_backoffs += 1
        log.info("back-off %d ms: %s", ms, why,
                 extra={"event": "backoff", "pid": slot.pid, "address": hex(address),
                        "ms": ms, "reason": why})

    def window_nodes(self, slot: MmSlot, address: int) -> set[int] | None:
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
        if self.schedule.at(sched.BACKOFF) is None:
            return False
        if self.kernel.mm.free_huge_blocks(self.backoff_nodes) > 0:
            self.end_backoff()
            log.info("back-off ended: free huge page available",
                     extra={"event": "backoff_end"})
            return True
        return False

    def end_backoff(self) -> None:
        """The back-off is over, and with it what the failed collapse and the wait cost:
        a collapse that becomes possible is not delayed by the CPU spent failing."""
        self.schedule.clear(sched.BACKOFF)
        self.schedule.clear(sched.BUDDY)
        now = self.clock()
        self.budget.forgive(now)
        self.schedule.clear(sched.CPU)

