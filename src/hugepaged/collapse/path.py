"""The one collapse path the daemon and the one-shot command share, as khugepaged and
madvise_collapse share collapse_huge_page and differ only in their struct collapse_control.

What a caller brings: the process (pidfd, how a failure is named), a CPU limiter, a bloat
ledger, and CollapseRules, the part that differs between them: how many windows one
process_madvise call takes, and what becomes of a window that failed for a moment (EAGAIN).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hugepaged.results import COLLAPSIBLE, ScanResult

from .calls import TRANSIENT_BACKOFF, CollapseOutcome, collapse_run, retry_transient
from .ledger import BloatLedger
from .limiter import Limiter, ThreadMeter

# Windows per process_madvise call at most: one call holds the caller (and, window by window,
# the process's mmap lock) for all of them, so this bounds the time one call takes.
MAX_BATCH = 16

Redecide = Callable[[int], "ScanResult | None"]


@dataclass(frozen=True)
class CollapseRules:
    """How a collapser treats a process's windows.

    `batch`: windows per call at most. `transient_backoff`: EAGAIN windows asked again after
    each of these delays (the command: it must not give up on a page held for a moment);
    empty, they are left to the next visit (the daemon, as khugepaged meets a window again on
    a later scan)."""

    batch: int = MAX_BATCH
    transient_backoff: tuple[float, ...] = ()


DAEMON = CollapseRules()
COMMAND = CollapseRules(transient_backoff=TRANSIENT_BACKOFF)


@dataclass
class ProcessCollapse:
    """One process's collapses: its pidfd, the window size and how a failure is named
    (`redecide(address)`: the window's result now, or None where nobody reads it here)."""

    pid: int
    pidfd: int
    size: int
    redecide: Redecide
    rules: CollapseRules = DAEMON
    sleep: Callable[[float], None] = time.sleep

    def call(self, addresses: Sequence[int]) -> tuple[list[CollapseOutcome], float]:
        """Collapse these consecutive windows (at most rules.batch a call): their outcomes,
        and the CPU this thread spent on them (the kernel does the copy on our time)."""
        cpu0 = time.thread_time()
        try:
            outcomes = self._calls(list(addresses))
            if self.rules.transient_backoff:
                outcomes = retry_transient(outcomes, self._calls, self.rules.transient_backoff,
                                           self.sleep)
        finally:
            self.cpu = time.thread_time() - cpu0
        return outcomes, self.cpu

    def _calls(self, addresses: list[int]) -> list[CollapseOutcome]:
        out: list[CollapseOutcome] = []
        batch = max(1, self.rules.batch)
        while len(out) < len(addresses):
            step = collapse_run(self.pidfd, self.pid, addresses[len(out):len(out) + batch],
                                self.size, self.redecide)
            if not step:
                break
            out += step
            if stopped(step):
                break
        return out


def take_run(codes: Sequence[int], nones: Sequence[int], i: int, limit: int,
             ledger: BloatLedger | None, page_kb: int) -> int:
    """The end j of the run of collapsible windows from i that one call takes: at most
    `limit` windows, each within the bloat ledger (filling its empty and zero-page PTEs adds
    page_kb each). j == i: window i does not fit (EXCEED_BLOAT_BUDGET)."""
    j, kb = i, 0
    while j < len(codes) and codes[j] in COLLAPSIBLE and j - i < limit and \
            (ledger is None or ledger.allows(kb + nones[j] * page_kb)):
        kb += nones[j] * page_kb
        j += 1
    return j


def collapse_paced(proc: ProcessCollapse, addresses: list[int], limiter: Limiter,
                   meter: ThreadMeter, clock: Callable[[], float] = time.monotonic
                   ) -> list[CollapseOutcome]:
    """The one-shot command's run: a batch at a time, resting after each call as the limiter
    says (the meter charges all of this thread's CPU, the scan before the first batch
    included), then EAGAIN windows asked again as the process's rules say."""
    batch = max(1, proc.rules.batch)

    def paced(todo: list[int]) -> list[CollapseOutcome]:
        done: list[CollapseOutcome] = []
        while len(done) < len(todo):
            step = collapse_run(proc.pidfd, proc.pid, todo[len(done):len(done) + batch],
                                proc.size, proc.redecide)
            meter.charge()
            rest = limiter.wait(clock())
            if rest > 0:
                proc.sleep(rest)
            if not step:
                break
            done += step
            if stopped(step):
                break
        return done

    out = paced(addresses)
    if proc.rules.transient_backoff:
        out = retry_transient(out, paced, proc.rules.transient_backoff, proc.sleep)
    return out


def stopped(step: list[CollapseOutcome]) -> bool:
    """The run ended early: the process went away part-way (fewer outcomes than windows
    asked would show it) or no huge page could be allocated (collapse_run stops there)."""
    return step[-1].result == ScanResult.ALLOC_HUGE_PAGE_FAIL


def succeeded(outcomes: list[CollapseOutcome]) -> set[int]:
    return {o.address for o in outcomes if o.result == ScanResult.SUCCEED}
