"""The daemon's side of the collapse workers: batches handed over, started within the caps,
and taken back (their outcomes counted, failures named, CPU charged) on the loop's thread.

collapse_workers = 1 has no lanes: the pass collapses on the loop's own thread. More, and a
pool of threads collapses different processes' windows at once (daemon/workers.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

from hugepaged.collapse import CollapseOutcome, result_of_errno, window_now
from hugepaged.errors import AccessDenied, ProcessGone

from . import schedule as sched
from .collapser import Collapser
from .membership import Membership
from .registry import MmSlot
from .targets import TargetState
from .workers import LANE_WINDOWS, CollapsePool, Job


class Lanes:
    """The pool (None with one worker), and the wake-up pipe a finished batch writes to."""

    def __init__(self, collapser: Collapser, membership: Membership, workers: int) -> None:
        self.collapser, self.membership = collapser, membership
        self.wake_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pool: CollapsePool | None = None
        self.stalled = False  # the last pass stopped because a lane was full
        self.handed = 0  # windows handed to the workers so far
        self.shape: tuple[int, str] = (1, "")  # (workers, collapse_cpus) of the pool
        self.resize(workers)

    def resize(self, workers: int, cpus: str = "") -> None:
        """1: collapses on the daemon's own thread; more: a pool of lanes, its threads on
        `cpus` (a CPU list; "": all). Called on the loop's thread only (the batches in
        flight are waited for and taken back)."""
        from hugepaged.kernel.cpus import parse_cpulist

        if self.pool is not None:
            self._reap(self.pool.close())
            self.pool = None
        if workers > 1:
            self.pool = CollapsePool(workers, self.collapser.kernel.geometry.pmd_size,
                                     self.wake_pipe, parse_cpulist(cpus) or None)
        self.shape = (workers, cpus)

    def close(self) -> None:
        self.resize(1)
        for fd in self.wake_pipe:
            with contextlib.suppress(OSError):
                os.close(fd)

    def forget(self, pid: int) -> None:
        if self.pool is not None:
            self.pool.drop(pid)

    # --- the pass's questions --------------------------------------------------------
    def busy(self, pid: int) -> bool:
        return self.pool is not None and self.pool.busy(pid)

    def active(self) -> bool:
        return self.pool is not None and bool(self.pool.lanes)

    def room(self, pid: int) -> int | None:
        """Windows this process's lane still takes (None: no lanes)."""
        if self.pool is None:
            return None
        return LANE_WINDOWS - self.pool.queued(pid)

    def hand_over(self, slot: MmSlot, run: list[int], nones: list[int],
                  state: TargetState | None) -> bool:
        """Queue a batch on the slot's lane; False if the lane is full (the process waits,
        the pass goes on)."""
        if self.pool.full(slot.pid):
            self.stalled = True
            return False
        self.pool.add(Job(slot.pid, slot.pidfd, run, nones,
                          state.name if state is not None else None,
                          on_credit=self.collapser.ticket,
                          chainable=state is None or state.budget is None))
        self.handed += len(run)
        self.collapser.ticket = False
        self.start()
        return True

    # --- starting and reaping --------------------------------------------------------
    def _may_start(self, job: Job) -> bool:
        """A queued batch starts only outside a back-off and within the CPU caps: under a
        cap, beside a running batch only while the tokens pay for that one too."""
        c = self.collapser
        now = c.clock()
        if c.stopping or c.in_backoff(now):
            return False
        if job.on_credit:  # the first batch of a pass that started within the cap
            return True
        running = self.pool.in_flight() if self.pool is not None else 0
        if not c.budget.allows_more(now, running * c.cost()):  # the batches running will cost
            return False
        state = self.membership.target_states.get(job.target)
        return state is None or state.budget is None or state.budget.allows(now)

    def start(self) -> None:
        """Start what the workers may take now; batches the CPU cap holds back are due when
        it allows them (the loop wakes then: no finished batch will wake it)."""
        c = self.collapser
        now = c.clock()
        self.pool.chain = not c.budget.percent and not c.stopping and not c.in_backoff(now)
        self.pool.start(self._may_start)
        if self.pool.waiting() and not c.budget.allows(now):
            until = max(c.schedule.at(sched.CPU) or 0.0, now + c.budget.wait(now))
            c.schedule.set(sched.CPU, until)

    def reap(self) -> bool:
        """Take back the batches the workers finished, start the next ones; True if any had
        finished."""
        if self.pool is None:
            return False
        done = self.pool.finished()
        self._reap(done)
        if self.pool is not None:
            self.start()
        return bool(done)

    def waiting(self) -> bool:
        return self.pool is not None and self.pool.waiting()

    def _reap(self, done: list) -> None:
        c, page_kb = self.collapser, self.collapser.kernel.geometry.page_size >> 10
        for job, future in done:
            c.budget.charge(job.cpu)  # the worker thread's CPU: charged here, once
            slot = self.membership.registry.slots.get(job.pid)
            try:
                outcomes, cpu = future.result()
            except (ProcessGone, AccessDenied):
                if slot is not None:
                    self.membership.exit(job.pid)
                continue
            if slot is None:
                continue
            state = self.membership.target_states.get(job.target)
            outcomes = [self._named(slot, o) for o in outcomes]
            try:
                outcomes, failed_at = c.account(slot, state, outcomes, cpu)
            except ProcessGone:
                self.membership.exit(job.pid)
                continue
            nones = dict(zip(job.addresses, job.nones, strict=True))
            for outcome in outcomes:
                c.collapsed(slot, state, outcome, nones[outcome.address] * page_kb)
                c.count(slot, state, outcome.result)
            if failed_at is not None and self.pool is not None:
                self.pool.drop()  # found again on the next visits (their slots are awake)
                slot.wake()

    def _named(self, slot: MmSlot, outcome: CollapseOutcome) -> CollapseOutcome:
        """A worker names no failure (it reads no page state): name it here."""
        if not outcome.errno:
            return outcome
        c, control = self.collapser, self.membership.control_for(slot)
        result = result_of_errno(outcome.errno, lambda: window_now(
            c.kernel, slot.pid, c.kpf, control, outcome.address))
        return replace(outcome, result=result)
