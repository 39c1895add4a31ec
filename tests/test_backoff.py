"""An allocation back-off, for real: physical memory fragmented so that no free huge page is
left (bench/scenarios/filler.py: one pinned page in every free 2 MiB block, and, holding,
every block that comes free later), two daemons that back off, one uncapped and tuned to scan
flat out, one at the defaults. Both run at defrag=0, which backs off on the free blocks the
kernel reports rather than on a failed allocation: on a machine others use, compaction may
still assemble a block from their movable pages, so a failed MADV_COLLAPSE cannot be forced;
the back-off, its wait and its end are the same code either way. In the back-off neither
may burn the CPU (both were once found spinning); once the memory is freed both must
collapse at once (the seed's story: a VM quits, the survivor gets its huge pages), whatever
they spent failing before.

Asserted: what the daemon controls (its CPU while it waits; the first collapse within a poll
and a pass of the memory coming back). The time to the first collapse is printed; its figures
across runs are in bench/ (bench_comeback.py)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

from .daemon_runner import Daemon
from .helpers import Workload, pmd_mapped_windows, saved_thp
from .marks import kernel_test
from .test_daemon_cap import cpu_seconds

FILLER = Path(__file__).resolve().parent.parent / "bench" / "scenarios" / "filler.py"
MEASURE = 60.0  # seconds of back-off measured
BUDGET = 0.01  # of a core: the most either daemon may spend meanwhile
COMEBACK = 3.0  # seconds from the memory coming back to the first collapse, at most
LONG_BACKOFF = 300000  # ms: the measured minute lies inside one back-off
REGION = [{"name": "heap", "windows": 16, "fill": "all", "hugepage": True}]


def first_collapse(w: Workload, deadline: float) -> float | None:
    r = w.regions["heap"]
    while time.monotonic() < deadline:
        if any(pmd_mapped_windows(w.pid, r.start, r.end)):
            return time.monotonic()
        time.sleep(0.02)
    return None


@kernel_test
def test_no_burn_in_a_backoff_and_a_collapse_as_soon_as_memory_comes_back():
    # The kernel's khugepaged may act on neither workload; the filler takes the last free
    # blocks as THPs, which needs THP at madvise while it does.
    with saved_thp(enabled="madvise", pages_to_scan=8, scan_sleep_millisecs=4294967295):
        # Holding (free blocks that appear later are taken too) down to 256 MiB free.
        filler = subprocess.Popen([sys.executable, str(FILLER),
                                   json.dumps({"hold": True, "floor_mib": 256})],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            ready = select.select([filler.stdout], [], [], 240)[0]
            info = json.loads(filler.stdout.readline()) if ready else {}
            assert info.get("pid") == filler.pid, "the filler did not fragment memory"
            with Workload(regions=REGION) as a, Workload(regions=REGION) as b:
                # Memory this full is memory pressure too: that pause is not under test.
                tuned = {"enabled": "madvise", "max_cpu_percent": 0, "pages_to_scan": 65536,
                         "scan_sleep_millisecs": 0, "alloc_sleep_millisecs": LONG_BACKOFF,
                         "defrag": 0, "max_memory_pressure": 0}
                defaults = {"enabled": "madvise", "alloc_sleep_millisecs": LONG_BACKOFF,
                            "defrag": 0, "max_memory_pressure": 0}
                with Daemon([a.pid], sets=tuned, log_level="info") as da, \
                        Daemon([b.pid], sets=defaults, log_level="info") as db:
                    for d in (da, db):
                        d.wait_for(lambda st: st["counters"]["alloc_backoffs"] >= 1,
                                   timeout=60, what="a failed allocation and its back-off")
                    t0 = time.monotonic()
                    cpu0 = [cpu_seconds(d.pid) for d in (da, db)]
                    time.sleep(MEASURE)
                    spent = [cpu_seconds(d.pid) - c for d, c in zip((da, db), cpu0,
                                                                    strict=True)]
                    elapsed = time.monotonic() - t0
                    states = [d.status()["state"] for d in (da, db)]
                    filler.stdin.write(b"exit\n")
                    filler.stdin.flush()
                    filler.wait(60)
                    back = time.monotonic()  # the filler is gone: its memory is free
                    firsts = [first_collapse(w, back + 30) for w in (a, b)]
                    by_activity = [d.status()["cpu_by_activity"] for d in (da, db)]
                a.verify()
                b.verify()
        finally:
            if filler.poll() is None:
                filler.kill()
                filler.wait()
    print(f"in back-off for {elapsed:.0f} s: uncapped {spent[0]:.3f} s, defaults "
          f"{spent[1]:.3f} s of CPU; first collapse "
          + ", ".join("none" if f is None else f"{f - back:.2f} s" for f in firsts)
          + f" after the memory came back; by activity {by_activity}")
    assert states == ["alloc-backoff", "alloc-backoff"], states
    for s in spent:
        assert s < BUDGET * elapsed, f"{s:.3f} s of CPU in {elapsed:.0f} s of back-off"
    for f in firsts:
        assert f is not None and f - back <= COMEBACK, firsts
