"""One info line a minute instead of one per process: what the daemon did since the last one.

A busy server starts and ends processes by the thousand; a line for each at the default
level buries the lines that matter, and journald's rate limit then drops those too. The
per-process lines are logged at debug; at info the daemon says every SUMMARY_SECONDS what
happened since its last summary (hugepaged's own line: the kernel's khugepaged has no log),
and nothing when nothing happened.
"""

import logging
import time
from collections.abc import Callable

log = logging.getLogger("hugepaged")
SUMMARY_SECONDS = 60.0

# (field of the log record, what the line calls it)
FIELDS = (("registered", "registered"), ("gone", "gone"), ("collapsed", "collapsed"),
          ("failures", "failed collapses"), ("backoffs", "back-offs"))


class Summary:
    """Counts since the last summary line, read from the daemon's own counters.

    tick() is called on every wake-up of the daemon's loop; flush() at its stop, so that the
    lines of a run add up to its counters.
    """

    def __init__(self, counters, every: float = SUMMARY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counters, self.every, self.clock = counters, every, clock
        self.since = clock()
        self.last = self.totals()

    def totals(self) -> dict[str, int]:
        snap = self.counters.snapshot()
        c = snap["counters"]  # the counters' one snapshot (daemon/counters.py)
        return {"registered": c["registered"], "gone": c["gone"],
                "collapsed": c["pages_collapsed"],
                "failures": sum(snap["collapse_failures"].values()),
                "backoffs": c["alloc_backoffs"]}

    def tick(self, _service=None) -> None:
        if self.clock() - self.since >= self.every:
            self.flush()

    def flush(self) -> None:
        """Log what happened since the last line, if anything did; start counting anew."""
        now, totals = self.clock(), self.totals()
        delta = {k: totals[k] - self.last[k] for k in totals}
        seconds = round(now - self.since, 1)
        self.since, self.last = now, totals
        if not any(delta.values()):
            return
        words = ", ".join(f"{delta[k]} {name}" for k, name in FIELDS)
        log.info("in the last %g s: %s", seconds, words,
                 extra={"event": "summary", "seconds": seconds, **delta})
