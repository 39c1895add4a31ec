"""The daemon's counters: one object, one snapshot that status, the metrics, the summary line
and `get` all read (khugepaged_pages_collapsed, khugepaged_full_scans and what the kernel only
traces).

COUNTERS is the one list of the scalar counters, with what each means; a counter added there
is in status, in `get` and in the metrics (hugepaged_NAME) without another list to keep.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hugepaged.collapse import CollapseOutcome
from hugepaged.results import ScanResult

# Wall time of one collapse, seconds: the histogram's upper bounds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# (name, help): the kernel's two first, then hugepaged's own.
COUNTERS = (
    ("pages_collapsed", "Windows collapsed into a huge page (as khugepaged/pages_collapsed)"),
    ("full_scans", "Passes through the whole process list (as khugepaged/full_scans)"),
    ("passes", "Scan passes (khugepaged_do_scan)"),
    ("collapse_attempts", "Windows asked of process_madvise(MADV_COLLAPSE)"),
    ("collapse_cpu_seconds", "CPU time spent in collapses (charged to the CPU cap)"),
    ("alloc_backoffs", "Back-offs after a huge page could not be allocated"),
    ("pages_split_after_collapse", "Windows hugepaged collapsed and found split again "
     "(hugepaged's own)"),
    ("registered", "Processes registered (hugepaged's own)"),
    ("gone", "Processes that exited or were dropped (hugepaged's own)"),
)
KERNEL_COUNTERS = ("pages_collapsed", "full_scans")  # the ones /sys has too
# What the daemon's CPU is spent on (hugepaged's own): the loop thread's time by phase, and
# every collapse, on the loop's thread or a worker's. A burn shows where it is.
ACTIVITIES = ("scan", "collapse", "registration", "events", "loop")


@dataclass
class Counters:
    """pages_collapsed and full_scans as the kernel's, plus what the kernel only traces."""

    pages_collapsed: int = 0
    full_scans: int = 0
    passes: int = 0
    collapse_attempts: int = 0
    collapse_cpu_seconds: float = 0.0
    alloc_backoffs: int = 0
    pages_split_after_collapse: int = 0
    registered: int = 0
    gone: int = 0
    results: Counter = field(default_factory=Counter)  # windows examined, per result
    collapse_failures: Counter = field(default_factory=Counter)  # per errno name
    collapse_seconds: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    collapse_seconds_sum: float = 0.0
    cpu: Counter = field(default_factory=Counter)  # activity -> CPU-seconds (ACTIVITIES)

    def observe(self, outcome: CollapseOutcome) -> None:
        self.collapse_attempts += 1
        i = next((k for k, b in enumerate(LATENCY_BUCKETS) if outcome.seconds <= b),
                 len(LATENCY_BUCKETS))
        self.collapse_seconds[i] += 1
        self.collapse_seconds_sum += outcome.seconds
        if outcome.result == ScanResult.SUCCEED:
            self.pages_collapsed += 1
        else:
            self.collapse_failures[outcome.errno_name or outcome.result.name] += 1

    def snapshot(self) -> dict[str, Any]:
        """Everything, copied (the control and metrics threads read while the loop counts:
        each container is copied in one C-level call, atomic under the GIL)."""
        return {
            "counters": {name: round(getattr(self, name), 4)
                         if isinstance(getattr(self, name), float) else getattr(self, name)
                         for name, _ in COUNTERS},
            "results": dict(sorted(dict(self.results).items())),
            "collapse_failures": dict(self.collapse_failures),
            "cpu_by_activity": {a: round(dict(self.cpu).get(a, 0.0), 3) for a in ACTIVITIES},
        }

    def histogram(self) -> tuple[list[tuple[float, int]], float]:
        """The collapse-duration histogram: (upper bound, count) cumulative, and the sum."""
        acc, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), list(self.collapse_seconds),
                            strict=True):
            acc += n
            buckets.append((bound, acc))
        return buckets, self.collapse_seconds_sum
