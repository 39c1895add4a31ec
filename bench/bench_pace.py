"""hugepaged's pace at given settings: time to 99% coverage and daemon CPU per huge page.

    python bench/bench_pace.py [--gib N] [-- hugepaged run options, e.g. --set max_cpu_percent=0]

One target of N GiB faulted in as 4 KiB pages (MADV_HUGEPAGE), the kernel at enabled=never
so its khugepaged stays out, the daemon targeted at it. CPU includes the daemon's start-up.
"""

import argparse
import time

from scenarios.cpu import stat_cpu_seconds

from kit.daemon_runner import Daemon
from kit.helpers import Workload, pmd_mapped_windows, saved_thp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("daemon_args", nargs="*")
    args = p.parse_args()
    n = int(args.gib * 512)
    with saved_thp(enabled="never"), Workload(regions=[
            {"name": "heap", "windows": n, "hugepage": True, "fill": "all"}]) as w:
        r = w.regions["heap"]
        daemon = Daemon([w.pid], {"enabled": "madvise"}, args=args.daemon_args,
                        log_format=None, log_level=None)
        t0 = time.monotonic()
        with daemon.start(ready="socket"):
            while time.monotonic() - t0 < args.timeout:
                time.sleep(0.5)
                if sum(pmd_mapped_windows(w.pid, r.start, r.end)) >= 0.99 * n:
                    break
            elapsed, cpu = time.monotonic() - t0, stat_cpu_seconds(daemon.pid)
        w.verify()
    print(f"{args.gib:g} GiB, daemon {' '.join(args.daemon_args) or 'defaults'}: "
          f"99% in {elapsed:.1f} s, daemon CPU {cpu:.2f} s, "
          f"{cpu * 1000 / n:.2f} ms per huge page (start-up included)")


if __name__ == "__main__":
    main()
