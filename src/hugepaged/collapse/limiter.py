"""CPU limiters for collapses: the daemon's cap and a one-shot run's pace.

Both answer the same three questions (Limiter): may work start now, how long until it may,
and here is what was spent. The collapse path asks them and never sleeps inside them: the
daemon's loop schedules its wake-up from wait(), the one-shot command sleeps for it.

- Pace, the daemon's: max_cpu_percent of a core as a rolling average over WINDOW_SECONDS.
- Pacer, a one-shot run's: a running average over the whole run.

Every CPU-second is charged once, by whoever measured it on the thread that spent it: the
scan loop's thread through a ThreadMeter (scanning, registration, the /proc walk, the syscall
records, its own collapses), each collapse worker's batches as they are taken back. Nothing
is subtracted from anything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class Limiter(Protocol):
    """What the collapse path asks of a CPU limit."""

    percent: int

    def allows(self, now: float) -> bool: ...
    def wait(self, now: float) -> float: ...
    def charge(self, cpu_seconds: float) -> None: ...


WINDOW_SECONDS = 10.0


class Pace:
    """The daemon's cap: `percent` of one core as a rolling average over WINDOW_SECONDS.

    A charge of c CPU-seconds moves the moment work may start again (`until`) c / rate
    later, so the gap after a collapse follows from its cost and the rate: collapses come
    evenly spread, not in bursts. Nothing is saved up while idle (`until` never lags behind
    now when a charge lands) and no debt outlives the window (`until` never runs more than
    WINDOW_SECONDS ahead): over any stretch of time the daemon spends at most its rate of it,
    plus what it charged within the last window; and a burst of start-up scanning or a failed
    compacting collapse delays the next collapse by at most the window (forgive() ends even
    that: a back-off that ends because memory came free)."""

    def __init__(self, percent: int, clock: Callable[[], float] = time.monotonic,
                 window: float = WINDOW_SECONDS) -> None:
        self.clock, self.window = clock, window
        self.until = clock()
        self.percent, self.rate = 0, 0.0
        self.set_percent(percent)

    def set_percent(self, percent: int) -> None:
        if self.percent == 0 and percent:  # from no cap to a cap: what was spent is not owed
            self.until = self.clock()
        self.percent, self.rate = percent, percent / 100.0

    def charge(self, cpu_seconds: float) -> None:
        if not self.percent:
            return
        now = self.clock()
        self.until = min(max(self.until, now) + cpu_seconds / self.rate, now + self.window)

    def allows(self, now: float) -> bool:
        return not self.percent or now >= self.until

    def wait(self, now: float) -> float:
        return max(0.0, self.until - now) if self.percent else 0.0

    def allows_more(self, now: float, in_flight: float) -> bool:
        """Whether work may start beside work already running that will cost `in_flight`
        CPU-seconds when it is charged (the collapse workers' batches)."""
        return not self.percent or now >= self.until + in_flight / self.rate

    def forgive(self, now: float) -> None:
        """Whatever is owed is dropped: work may start now."""
        self.until = min(self.until, now)


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
