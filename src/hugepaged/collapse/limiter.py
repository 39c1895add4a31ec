"""CPU limiters for collapses: the daemon's cap (a token bucket) and a one-shot run's pace.

Both answer the same three questions (Limiter): may work start now, how long until it may,
and here is what was spent. The collapse path asks them and never sleeps inside them: the
daemon's loop schedules its wake-up from wait(), the one-shot command sleeps for it.

CpuBudget, the daemon's: a token bucket refilled at max_cpu_percent of a core.

Every CPU-second is charged once, by whoever measured it on the thread that spent it: the
scan loop's thread through a ThreadMeter (scanning, registration, the /proc walk, the syscall
records, its own collapses), each collapse worker's batches as they are taken back. Nothing
is subtracted from anything.

The bucket holds at most BURST_SECONDS of refill, and once it runs dry work rests until it is
full again, so that each pass pays its fixed cost (reading the page state) for a batch of
collapses, not for one. Credit is not saved up while there is nothing to do: after an idle
spell the bucket starts empty (a debt is still paid off), and the first collapse may go at
once on credit. So over any interval the daemon spends at most max_cpu_percent of it, give
or take the batch in flight at its ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

BURST_SECONDS = 1.25


class Limiter(Protocol):
    """What the collapse path asks of a CPU limit."""

    percent: int

    def allows(self, now: float) -> bool: ...
    def wait(self, now: float) -> float: ...
    def charge(self, cpu_seconds: float) -> None: ...


class CpuBudget:
    """Tokens are CPU-seconds; work may start while the bucket is not in debt and not
    resting."""

    def __init__(self, percent: int, now: float, burst: float = BURST_SECONDS) -> None:
        self.burst = burst
        self.tokens = 0.0
        self.resting = False
        self.idle_now = False  # nothing to do: no credit beyond paying off a debt
        self.stamp = now
        self.percent = 0
        self.set_percent(percent)

    def set_percent(self, percent: int) -> None:
        uncapped = self.percent == 0
        self.percent = percent
        self.rate = percent / 100.0
        self.capacity = self.rate * self.burst
        # From no cap to a cap: an empty bucket, as at start-up (what was spent without a cap
        # is not owed); otherwise what is left stays (a debt stays a debt).
        if uncapped:
            self.tokens, self.resting = 0.0, False
        else:
            self.tokens = min(self.tokens, self.capacity)

    def _refill(self, now: float) -> None:
        top = 0.0 if self.idle_now else self.capacity
        if self.tokens < top:
            self.tokens = min(top, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.idle_now and self.tokens >= 0.0:
            self.resting = False  # a fresh start: the first batch goes on credit

    def allows(self, now: float) -> bool:
        if self.percent == 0:
            return True
        self._refill(now)
        if self.tokens < 0:
            self.resting = True
        elif self.resting and self.tokens >= self.capacity:
            self.resting = False
        return not self.resting

    def charge(self, cpu_seconds: float) -> None:
        self.tokens -= cpu_seconds

    def idle(self, now: float) -> None:
        """Nothing to do: unspent credit is dropped, and none is saved up until busy()."""
        self._refill(now)
        self.tokens = min(self.tokens, 0.0)
        self.idle_now = True
        self._refill(now)

    def busy(self, now: float) -> None:
        """Work again: the bucket refills towards full from now."""
        if self.idle_now:
            self._refill(now)
            self.idle_now = False

    def wait(self, now: float) -> float:
        """Seconds until work may start again."""
        if self.allows(now):
            return 0.0
        top = 0.0 if self.idle_now else self.capacity
        return (top - self.tokens) / self.rate


class Pacer:
    """A one-shot run's pace: work may start while the CPU charged so far is at most
    `percent` of the time since the pacer started (a running average over the whole run, so
    a slow batch is followed by a long rest and no debt or credit outlives the run)."""

    def __init__(self, percent: int, now: float) -> None:
        self.percent, self.start, self.cpu = percent, now, 0.0

    def charge(self, cpu_seconds: float) -> None:
        self.cpu += cpu_seconds

    def wait(self, now: float) -> float:
        if self.percent <= 0:
            return 0.0
        return max(0.0, self.start + self.cpu * 100.0 / self.percent - now)

    def allows(self, now: float) -> bool:
        return self.wait(now) == 0.0


class ThreadMeter:
    """One thread's CPU, charged to a budget exactly once: what it spent since the last
    charge. A charge from another thread (a test driving the core) only moves the mark."""

    def __init__(self, budget: Limiter, clock: Callable[[], float] = time.thread_time
                 ) -> None:
        self.budget, self.clock = budget, clock
        self.reset()

    def reset(self) -> None:
        self.thread = threading.get_ident()
        self.mark = self.clock()

    def charge(self) -> float:
        now = self.clock()
        if threading.get_ident() != self.thread:
            self.reset()
            return 0.0
        spent, self.mark = now - self.mark, now
        self.budget.charge(spent)
        return spent
