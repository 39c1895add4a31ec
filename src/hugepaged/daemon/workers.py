"""Parallel collapse: `collapse_workers` threads collapse different processes' windows at once.

The kernel holds a process's mmap write lock while it copies a window into its huge page, so
two collapses in one process wait for each other, and two in different processes do not:
one lane per process (its batches in order, one call in flight), lanes side by side on the
pool. A worker only makes the process_madvise calls (ctypes releases the GIL for a syscall)
and measures its own thread's CPU; everything else (counters, results, budgets, back-off,
naming a failure) stays on the daemon's thread, which takes the outcomes back (reap).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from hugepaged.collapse import DAEMON, CollapseOutcome, ProcessCollapse
from hugepaged.kernel.cpus import pin_thread

# A bound on a process's windows decided but not yet collapsed: beyond it the pass leaves
# that process where it is and goes on to the next, so decisions do not go stale in a queue,
# a CPU cap still holds, and other processes' lanes fill meanwhile.
LANE_WINDOWS = 64


@dataclass
class Job:
    """One batch: consecutive SUCCEED windows of one process, and what reaping needs."""

    pid: int
    pidfd: int
    addresses: list[int]
    nones: list[int]
    target: str | None = None
    cpu: float = 0.0  # the worker thread's CPU for this batch, also when the call raised
    on_credit: bool = False  # a pass's first batch: it starts even if the cap is in debt
    chainable: bool = True  # a worker may start it (no CPU share of its target to check)


@dataclass
class Lane:
    """A process's batches, collapsed in order, at most one in flight."""

    queue: deque = field(default_factory=deque)
    future: Future | None = None
    job: Job | None = None


def _work(job: Job, size: int) -> tuple[list[CollapseOutcome], float]:
    """On a worker: the calls only (failures are named on the daemon's thread)."""
    proc = ProcessCollapse(job.pid, job.pidfd, size, lambda a: None, DAEMON)
    try:
        return proc.call(job.addresses)
    finally:
        job.cpu = getattr(proc, "cpu", 0.0)


class CollapsePool:
    """The lanes and the threads; `wake` is a non-blocking pipe (read end, write end) whose
    read end polls readable when a batch has finished.

    Uncapped (`chain` true), a worker whose batch collapsed every window starts its lane's
    next batch itself, so that a lane does not wait for the daemon's thread to come back from
    a pass; whatever it collapsed is still taken back on the daemon's thread. The lanes are
    shared with the workers under `lock`."""

    def __init__(self, workers: int, size: int, wake: tuple[int, int],
                 cpus: list[int] | None = None) -> None:
        self.workers, self.size, self.cpus = workers, size, cpus
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="collapse",
                                       initializer=pin_thread if cpus else None,
                                       initargs=(cpus,) if cpus else ())
        self.lanes: dict[int, Lane] = {}
        self.done_fd, self._wake_fd = wake  # the owner's pipe: it outlives a resized pool
        self.lock = threading.RLock()  # a future already done calls back at once
        self.chain = False  # set by the daemon: no CPU cap, no back-off, not stopping
        self._finished: list[tuple[Job, Future]] = []

    def queued(self, pid: int) -> int:
        with self.lock:
            return self._queued(pid)

    def _queued(self, pid: int) -> int:
        lane = self.lanes.get(pid)
        if lane is None:
            return 0
        return sum(len(j.addresses) for j in lane.queue) + \
            (len(lane.job.addresses) if lane.job else 0)

    def in_flight(self) -> int:
        """Windows of the batches running now (collapsed, not yet charged)."""
        with self.lock:
            return sum(len(lane.job.addresses) for lane in self.lanes.values()
                       if lane.job is not None)

    def waiting(self) -> bool:
        """Whether a lane has a batch queued and none running (start() held it back)."""
        with self.lock:
            return any(lane.future is None and lane.queue for lane in self.lanes.values())

    def full(self, pid: int) -> bool:
        return self.queued(pid) >= LANE_WINDOWS

    def busy(self, pid: int) -> bool:
        with self.lock:
            return pid in self.lanes

    def add(self, job: Job) -> None:
        with self.lock:
            self.lanes.setdefault(job.pid, Lane()).queue.append(job)

    def start(self, may_start) -> None:
        """Submit the next batch of every idle lane, while may_start(job) allows."""
        with self.lock:
            for lane in self.lanes.values():
                if lane.future is None and lane.queue and may_start(lane.queue[0]):
                    self._submit(lane)

    def _submit(self, lane: Lane) -> None:
        lane.job = lane.queue.popleft()
        lane.future = self.pool.submit(_work, lane.job, self.size)
        lane.future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        """On the worker thread: the batch goes to the finished list, the lane's next one
        starts if chaining is on and this one failed nowhere, and the loop is woken."""
        with self.lock:
            for lane in self.lanes.values():
                if lane.future is future:
                    self._finished.append((lane.job, future))
                    lane.future, lane.job = None, None
                    if self.chain and lane.queue and lane.queue[0].chainable \
                            and _all_collapsed(future):
                        self._submit(lane)
                    break
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes the loop anyway
            os.write(self._wake_fd, b"x")

    def finished(self) -> list[tuple[Job, Future]]:
        """Batches that have finished; their lanes are idle again (or gone if empty)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.done_fd, 4096):
                pass
        with self.lock:
            out, self._finished = self._finished, []
            for pid, lane in list(self.lanes.items()):
                if lane.future is None and not lane.queue:
                    del self.lanes[pid]
        return out

    def drop(self, pid: int | None = None) -> None:
        """Forget queued batches (of one process, or all); calls in flight finish."""
        with self.lock:
            for p, lane in self.lanes.items():
                if pid is None or p == pid:
                    lane.queue.clear()

    def close(self) -> list[tuple[Job, Future]]:
        """Queued batches dropped, the ones in flight waited for and returned."""
        with self.lock:
            self.chain = False
            self.drop()
        self.pool.shutdown(wait=True)
        return self.finished()


def _all_collapsed(future: Future) -> bool:
    if future.exception() is not None:
        return False
    outcomes, _ = future.result()
    return bool(outcomes) and all(o.errno == 0 for o in outcomes)
