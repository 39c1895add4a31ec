"""khugepaged(): the daemon core, put together from its parts along the kernel's seams.

- membership (membership.py): registry, targets, exclusions, fork/exec/exit;
  __khugepaged_enter, __khugepaged_exit, collect_mm_slot.
- the pass (scanpass.py, visit.py): cursor, progress, one process's visit;
  khugepaged_do_scan, khugepaged_scan_mm_slot.
- the collapser (collapser.py, lanes.py): CPU caps, back-off, batch ramp, workers;
  collapse_huge_page's caller, khugepaged_alloc_sleep.
- the schedule (schedule.py): every deadline, by reason; khugepaged_wait_work.
- counters (counters.py): one object, one snapshot; pages_collapsed, full_scans.

Free of I/O multiplexing so tests can drive it pass by pass; daemon/service.py runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hugepaged.kernel import Kernel
from hugepaged.policy import CollapseControl
from hugepaged.targets import Target
from hugepaged.tunables import Tunables

from . import schedule as sched
from .collapser import Collapser
from .counters import Counters
from .lanes import Lanes
from .membership import Membership
from .registry import Registry
from .scanpass import ScanPass
from .schedule import Schedule

# A change of these looks at every process again (as a write to the kernel's knobs wakes
# khugepaged): the decisions of a settled process may be different now.
RULES = ("enabled", "shmem_enabled", "max_ptes_none", "max_ptes_swap", "max_ptes_shared")


class Khugepaged:
    """The parts, wired; each is reached by its name (core.membership, core.scan, ...)."""

    def __init__(self, kernel: Kernel, tunables: Tunables,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self.kernel, self.clock = kernel, clock
        self.counters = Counters()
        self.schedule = Schedule()
        self.membership = Membership(kernel, CollapseControl.from_tunables(tunables),
                                     self.counters, clock)
        self.collapser = Collapser(kernel, tunables, self.counters, self.schedule, clock,
                                   cpu_clock)
        self.lanes = Lanes(self.collapser, self.membership, tunables.collapse_workers)
        # The young-bit check's source: idle page tracking where the kernel has it, the daemon
        # marking the windows it leaves so that its next visit can tell which were touched.
        self.referenced = kernel.access_source(mark=True)
        self.scan = ScanPass(kernel, self.membership, self.collapser, self.lanes,
                             self.counters, self.schedule, clock, self.referenced)
        from hugepaged.kernel.cpus import allowed_cpus

        self.all_cpus = allowed_cpus()  # the loop thread's own, to go back to

    @property
    def registry(self) -> Registry:
        return self.membership.registry

    @property
    def tunables(self) -> Tunables:
        return self.collapser.tunables

    def set_tunables(self, tunables: Tunables) -> None:
        """New tunables (the control thread, or a reload): a change of the workers is the
        loop's to make (resize_lanes); of the rules, every slot is looked at again."""
        old = self.collapser.tunables
        self.collapser.set_tunables(tunables)
        self.membership.set_control(CollapseControl.from_tunables(tunables))
        if any(getattr(old, k) != getattr(tunables, k) for k in RULES):
            self.membership.wake_all()

    def resize_lanes(self) -> None:
        """On the loop's thread: the workers and the CPUs collapses run on, as the tunables
        say (never on the control thread, which would race the pass that hands batches
        over). With one worker the loop's own thread collapses, so it is the one pinned."""
        from hugepaged.kernel.cpus import parse_cpulist, pin_thread

        t = self.tunables
        want = (t.collapse_workers, t.collapse_cpus)
        if want == self.lanes.shape:
            return
        self.lanes.resize(*want)
        loop_cpus = parse_cpulist(t.collapse_cpus) if t.collapse_workers == 1 else []
        pin_thread(loop_cpus or self.all_cpus)

    def set_targets(self, targets: list[Target], source: str | None = None) -> None:
        self.membership.set_targets(targets, source)

    def do_scan(self) -> bool:
        self.resize_lanes()
        return self.scan.do_scan()

    # --- what the loop asks and tells ------------------------------------------------
    def trace_layouts(self) -> None:
        """The calls that change VM flags in place are traced from now on: a visit keeps its
        memory map while the process faults (daemon/visit.py)."""
        self.scan.visitor.layout_traced = True

    def kick(self) -> None:
        """The next pass is due now."""
        self.schedule.set(sched.PASS, 0.0)

    def wakeup(self) -> None:
        """wakeup_khugepaged: a back-off or a CPU rest ends too."""
        self.collapser.end_backoff()
        self.schedule.clear(sched.CPU)
        self.kick()

    def pass_due(self, now: float) -> bool:
        """A pass may run now: due, outside a back-off, and the global CPU cap not resting
        (scanning is paid from the same budget as collapses)."""
        if now < self.schedule.pass_at():
            return False
        budget = self.collapser.budget
        if budget.allows(now):
            return True
        self.schedule.set(sched.CPU, now + budget.wait(now))
        return False

    def run_pass(self) -> None:
        """One pass, then the next one scheduled (khugepaged_wait_work). A pass the global
        CPU cap stopped goes on as soon as the cap allows: scan_sleep_millisecs is the rest
        after a pass that spent its pages_to_scan, and added to the cap's own rest it would
        make the pace (one batch per scan_sleep) what the cap is meant to set."""
        worked = self.do_scan()
        now = self.clock()
        if self.schedule.until(sched.CPU, now):
            self.schedule.set(sched.PASS, now)
        else:
            self.schedule.set(sched.PASS, self.scan.after(worked, now))

    def admit(self, now: float) -> None:
        """Fork events whose settle delay has passed become slots, and execs and renames
        that have settled are resolved, within the CPU cap."""
        members, budget = self.membership, self.collapser.budget
        if members.pending or members.changed:
            if not budget.allows(now):
                until = max(self.schedule.at(sched.CPU) or 0.0, now + budget.wait(now))
                self.schedule.set(sched.CPU, until)
            elif members.admit(now):
                self.schedule.set(sched.PASS, min(self.schedule.at(sched.PASS) or 0.0, now))
        first = members.next_admit()
        if first is None:
            self.schedule.clear(sched.ADMIT)
        else:
            self.schedule.set(sched.ADMIT, first)

    def poll_backoff(self, now: float, every: float) -> None:
        """During a back-off, look for a free huge page every `every` seconds: found, the
        back-off ends and a pass is due."""
        if not self.collapser.in_backoff(now):
            self.schedule.clear(sched.BUDDY)
            return
        if not self.schedule.due(sched.BUDDY, now):
            return
        self.schedule.set(sched.BUDDY, now + every)
        if self.collapser.end_backoff_if_free():
            self.kick()

    def workers_done(self, now: float) -> None:
        """A worker finished a batch: its outcomes are counted now; a pass that stopped for
        a full lane goes on; when all are done, what was decided meanwhile is next."""
        self.lanes.reap()
        if self.lanes.pool is None:
            return
        pass_at = self.schedule.at(sched.PASS) or 0.0
        if self.lanes.waiting():  # held back by the CPU cap: due when it allows them
            pass_at = min(pass_at, max(self.schedule.at(sched.CPU) or 0.0, now))
        if self.lanes.stalled:  # room in a lane again: top it up
            self.lanes.stalled = False
            pass_at = 0.0
        elif not self.lanes.active():
            pass_at = min(pass_at, now + self.tunables.scan_sleep_millisecs / 1000.0)
        self.schedule.set(sched.PASS, pass_at)

    def discover(self) -> None:
        self.membership.discover()

    def enter(self, pid: int, settle: float = 0.0):
        return self.membership.enter(pid, settle)

    def exit(self, pid: int, why: str = "gone") -> None:
        self.membership.exit(pid, why)

    @property
    def stopping(self) -> bool:
        return self.collapser.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.collapser.stopping = value

    def close(self) -> None:
        self.lanes.close()
        self.registry.close()
        self.collapser.close()
        if self.referenced is not None:
            self.referenced.close()
