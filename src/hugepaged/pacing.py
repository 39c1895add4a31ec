"""Pacing a one-shot collapse: sleep between windows so its CPU stays at N% of one core.

A collapse runs in the caller's context, so an unpaced `hugepaged collapse` of a large heap
takes a core for seconds and the application's own threads wait for it (on the mmap lock,
on its page tables, for the CPU). The daemon has its CPU cap; this gives the one-shot command
the same kind of pace. The target is the running average: after each window the pacer sleeps
until the CPU spent so far is N% of the time elapsed, so a slow window is followed by a long
rest and no debt or credit is carried beyond the run.
"""

import time
from collections.abc import Callable


class Pacer:
    """`pacer.charge(cpu_seconds)` after each collapse; percent 0 means unpaced."""

    def __init__(self, percent: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.percent, self.clock, self.sleep = percent, clock, sleep
        self.start = clock()
        self.cpu = 0.0
        self.slept = 0.0

    def charge(self, cpu_seconds: float) -> None:
        if self.percent <= 0:
            return
        self.cpu += cpu_seconds
        due = self.start + self.cpu * 100.0 / self.percent
        rest = due - self.clock()
        if rest > 0:
            self.sleep(rest)
            self.slept += rest
