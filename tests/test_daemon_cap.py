"""The CPU cap, measured from outside: a capped `hugepaged run` with two collapse workers, kept
busy, spends no more than its share of a core.

Only the bound is asserted, what the daemon controls: how much CPU a nice-19 daemon gets on a
loaded machine is not the daemon's to promise (how close it comes to its cap is measured in
bench/bench_target_share.py and bench/bench_daemon.py).

The daemon's CPU is read from /proc/PID/stat (utime + stime: every thread, the ones that have
exited too), never from what the daemon says about itself, and the daemon is not asked
anything while it is measured (its control thread is not charged to the cap). It is kept busy
throughout: each workload whose memory is all huge pages is remapped as 4 KiB pages and
advised again, so the cap is what bounds the daemon, however cheap a collapse is here.
"""

from __future__ import annotations

import os
import time

from kit.daemon_runner import Daemon
from kit.helpers import Workload, pmd_mapped_windows, saved_thp

from .marks import kernel_test

CAP = 20  # percent of one core
SECONDS = 12.0
WINDOW = 10.0  # the pace's window (collapse/limiter.py WINDOW_SECONDS): at most this much
# debt, so a run of T seconds spends at most the share of T + WINDOW
# What /proc/PID/stat cannot tell apart (a clock tick at each end) and one window collapsed on
# credit per worker at the end of the interval.
SLACK = 0.06
REGION = [{"name": "heap", "windows": 32, "fill": "all", "hugepage": True}]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def covered(w: Workload) -> bool:
    r = w.regions["heap"]
    return all(pmd_mapped_windows(w.pid, r.start, r.end))


def keep_busy(works: list[Workload], until: float) -> int:
    """Give every fully collapsed workload its memory back as 4 KiB pages, advised again,
    until `until`; how many times that was done."""
    again = 0
    while time.monotonic() < until:
        for w in works:
            if covered(w):
                w.command("remap heap")
                w.command("hugepage heap")
                again += 1
        time.sleep(0.05)
    return again


@kernel_test
def test_cpu_cap_holds_with_two_workers_measured_from_proc_stat():
    with saved_thp(enabled="never"):
        works = [Workload(regions=REGION).start() for _ in range(2)]
        try:
            sets = {"enabled": "madvise", "max_cpu_percent": CAP, "collapse_workers": 2,
                    "scan_sleep_millisecs": 0, "pages_to_scan": 65536}
            with Daemon(pids=[w.pid for w in works], sets=sets, log_level="info") as d:
                # Work is under way (the first windows are huge), the start-up is over.
                deadline = time.monotonic() + 15
                while not any(pmd_mapped_windows(w.pid, w.regions["heap"].start,
                                                 w.regions["heap"].start + (2 << 20))[0]
                              for w in works):
                    assert time.monotonic() < deadline, "nothing collapsed in 15 s"
                    time.sleep(0.02)
                t0, cpu0 = time.monotonic(), cpu_seconds(d.pid)
                again = keep_busy(works, t0 + SECONDS)
                elapsed, spent = time.monotonic() - t0, cpu_seconds(d.pid) - cpu0
                assert d.alive()
            for w in works:
                w.verify()
        finally:
            for w in works:
                w.close()
    share = CAP / 100.0
    limit = share * (elapsed + WINDOW) + SLACK
    print(f"cap {CAP}%, 2 workers: {spent:.2f} s of CPU in {elapsed:.1f} s "
          f"({100 * spent / elapsed:.1f}% of a core; limit {limit:.2f} s), "
          f"{again} workload(s) given back their 4 KiB pages")
    assert spent <= limit, f"{spent:.2f} s of CPU in {elapsed:.1f} s: over the {CAP}% cap"
    assert again >= 1  # it had work throughout: the cap is what bounded it
