"""Split churn on the real kernel: a process whose allocator gives memory back (MADV_DONTNEED
of a few pages of every collapsed window, as jemalloc's purge does: the kernel splits each
huge page's PMD) is not collapsed again at once. The daemon counts each split once and holds
the windows back; memory mapped anew where it collapsed (a remap) is no split and is
collapsed again at once."""

from __future__ import annotations

import time

from kit.daemon_runner import Daemon
from kit.helpers import Workload, pmd_mapped_windows, saved_thp

from .marks import kernel_test

FAST = {"enabled": "madvise", "max_cpu_percent": 0, "scan_sleep_millisecs": 0,
        "pages_to_scan": 65536}
WINDOWS = 8


def huge(w: Workload) -> list[bool]:
    r = w.regions["heap"]
    return pmd_mapped_windows(w.pid, r.start, r.end)


@kernel_test
def test_a_purging_allocator_is_not_fought_and_a_remap_is_no_split():
    spec = [{"name": "heap", "windows": WINDOWS, "fill": "all", "hugepage": True}]
    with saved_thp(enabled="never"), Workload(regions=spec) as w, \
            Daemon([w.pid], sets=FAST) as d:
        deadline = time.monotonic() + 20
        while not all(huge(w)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(huge(w))
        assert w.command("purge heap 16")["ok"]  # every window's PMD split
        assert not any(huge(w))
        st = d.wait_for(lambda st: st["counters"]["pages_split_after_collapse"] >= WINDOWS,
                        timeout=20, what="every split counted")
        time.sleep(3.0)  # visits go on: none of them collapses a window again
        st = d.status()
        assert st["counters"]["pages_split_after_collapse"] == WINDOWS  # once each
        assert st["held_windows"]["split_backoff"] == WINDOWS
        assert not any(huge(w)) and st["results"].get("SPLIT_BACKOFF", 0) >= WINDOWS
        collapsed = st["counters"]["pages_collapsed"]
        w.verify()
        # New memory where it collapsed: nothing split, collapsed again at once.
        assert w.command("remap heap")["ok"] and w.command("hugepage heap")["ok"]
        deadline = time.monotonic() + 20
        while not all(huge(w)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(huge(w))
        st = d.status()
        assert st["counters"]["pages_split_after_collapse"] == WINDOWS
        assert st["counters"]["pages_collapsed"] == collapsed + WINDOWS
        w.verify()
