"""Pacing a one-shot collapse: sleep between windows so its CPU stays at N% of one core.

A collapse runs in the caller's context, so an unpaced `hugepaged collapse` of a large heap
takes a core for seconds and the application's own threads wait for it (on the mmap lock,
on its page tables, for the CPU). The daemon has its CPU cap; this gives the one-shot command
the same kind of pace. The target is the running average: after each batch the pacer sleeps
until the CPU spent so far (all of the command's, its scan included) is N% of the time
elapsed, so a slow batch is followed by a long rest and no debt or credit is carried beyond
the run.
"""

import time
from collections.abc import Callable


class Pacer:
    """`pacer.charge(cpu_seconds)` after each collapse; percent 0 means unpaced."""

    def __init__(self, percent: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self.percent, self.clock, self.sleep, self.cpu_clock = percent, clock, sleep, cpu_clock
        self.start = clock()
        self.cpu = 0.0
        self.slept = 0.0
        self._mark = cpu_clock()

    def tick(self) -> None:
        """Charge everything this thread spent since the pacer started or last ticked (the
        scan that found the windows included), then rest as charge() does."""
        now = self.cpu_clock()
        spent, self._mark = now - self._mark, now
        self.charge(spent)

    def charge(self, cpu_seconds: float) -> None:
        if self.percent <= 0:
            return
        self.cpu += cpu_seconds
        due = self.start + self.cpu * 100.0 / self.percent
        rest = due - self.clock()
        if rest > 0:
            self.sleep(rest)
            self.slept += rest
