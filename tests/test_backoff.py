"""An allocation back-off, for real: no free 2 MiB block left and none that compaction can
assemble, two daemons that back off, one uncapped and tuned to scan flat out at defrag=1 (its
MADV_COLLAPSE fails: the kernel's ALLOC_HUGE_PAGE_FAIL), one at the defaults with defrag=0
(it backs off on the free blocks the kernel reports, before any call). In the back-off neither
may burn the CPU (both were once found spinning); once the memory is freed both must collapse
at once (the seed's story: a VM quits, the survivor gets its huge pages), whatever they spent
failing before.

The memory: kit/fragment.py (the hugetlb pool and the filler; what stays free is in pieces
no huge page fits, and compaction cannot assemble one).

Asserted: what the daemon controls (its CPU while it waits; the first collapse within a poll
and a pass of the memory coming back). The time to the first collapse is printed; its figures
across runs are in bench/ (bench_comeback.py, the old code against the new)."""

from __future__ import annotations

import time

from kit.daemon_runner import Daemon
from kit.fragment import fragmented_memory
from kit.helpers import Workload, pmd_mapped_windows, saved_thp

from .marks import kernel_test
from .test_daemon_cap import cpu_seconds

MEASURE = 20.0  # seconds of back-off measured
BUDGET = 0.01  # of a core: the most either daemon may spend meanwhile
COMEBACK = 3.0  # seconds from the memory coming back to the first collapse, at most
LONG_BACKOFF = 300000  # ms: the measured seconds lie inside one back-off
REGION = [{"name": "heap", "windows": 16, "fill": "all", "hugepage": True}]


def huge_windows(w: Workload) -> int:
    r = w.regions["heap"]
    return sum(pmd_mapped_windows(w.pid, r.start, r.end))


def first_collapse(w: Workload, had: int, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        if huge_windows(w) > had:
            return time.monotonic()
        time.sleep(0.02)
    return None


@kernel_test
def test_no_burn_in_a_backoff_and_a_collapse_as_soon_as_memory_comes_back():
    # The kernel's khugepaged acts on neither workload, nor does a fault.
    with fragmented_memory() as release, \
            saved_thp(enabled="never", pages_to_scan=8, scan_sleep_millisecs=4294967295), \
            Workload(regions=REGION) as a, Workload(regions=REGION) as b:
        tuned = {"enabled": "madvise", "max_cpu_percent": 0, "pages_to_scan": 65536,
                 "scan_sleep_millisecs": 0, "alloc_sleep_millisecs": LONG_BACKOFF,
                 "defrag": 1, "max_memory_pressure": 0}
        defaults = {"enabled": "madvise", "alloc_sleep_millisecs": LONG_BACKOFF,
                    "defrag": 0, "max_memory_pressure": 0}
        # Memory this full is memory pressure too: that pause is not under test.
        with Daemon([a.pid], sets=tuned, log_level="info") as da, \
                Daemon([b.pid], sets=defaults, log_level="info") as db:
            for d in (da, db):
                d.wait_for(lambda st: st["counters"]["alloc_backoffs"] >= 1,
                           timeout=30, what="a failed allocation and its back-off")
            had = [huge_windows(w) for w in (a, b)]
            t0 = time.monotonic()
            cpu0 = [cpu_seconds(d.pid) for d in (da, db)]
            time.sleep(MEASURE)
            spent = [cpu_seconds(d.pid) - c for d, c in zip((da, db), cpu0, strict=True)]
            elapsed = time.monotonic() - t0
            states = [d.status()["state"] for d in (da, db)]
            release()
            back = time.monotonic()  # the filler and the pool are gone: memory is free
            firsts = [first_collapse(w, n, back + 30) for w, n in zip((a, b), had,
                                                                        strict=True)]
            by_activity = [d.status()["cpu_by_activity"] for d in (da, db)]
        a.verify()
        b.verify()
    print(f"in back-off for {elapsed:.0f} s: uncapped {spent[0]:.3f} s, defaults "
          f"{spent[1]:.3f} s of CPU; huge before {had}; first collapse "
          + ", ".join("none" if f is None else f"{f - back:.2f} s" for f in firsts)
          + f" after the memory came back; by activity {by_activity}")
    assert states == ["alloc-backoff", "alloc-backoff"], states
    for s in spent:
        assert s < BUDGET * elapsed, f"{s:.3f} s of CPU in {elapsed:.0f} s of back-off"
    for f in firsts:
        assert f is not None and f - back <= COMEBACK, firsts
