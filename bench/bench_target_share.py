"""A target's CPU share, used: how much of its `max_cpu_percent` a target gets while it has work.

    sudo python bench/bench_target_share.py [--rounds 3] [--shares 5,10] [--name NAME]

One workload of WINDOWS full 4 KiB-mapped windows with MADV_HUGEPAGE, matched by a target with
`max_cpu_percent = S` under one `hugepaged run` (global cap 50%, so the share is what binds).
For SECONDS from its first collapse the target always has work: whenever all its windows are
PMD-mapped (read from pagemap and kpageflags by the tests' own helpers) the workload maps its
memory again as 4 KiB pages and advises it again. The target's collapse CPU over that time
(status `cpu_seconds`, read at both ends), as a percentage of one core, against S. Shares are
interleaved within each round (S1, S2, S1, S2, ...), fresh workloads every run; medians. The
kernel is at enabled=never for the run (restored on every exit) so its khugepaged stays out.
Writes bench/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from scenarios import write_results

from kit.daemon_runner import Daemon
from kit.helpers import Workload, pmd_mapped_windows, saved_thp

WINDOWS = 64
SECONDS = 10.0


def cpu_of_target(d: Daemon) -> float:
    return d.status()["targets"][0]["cpu_seconds"]


def one_run(share: int) -> dict:
    spec = [{"name": "heap", "windows": WINDOWS, "fill": "all", "hugepage": True}]
    with Workload(regions=spec) as w, tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "hugepaged.toml")
        with open(cfg, "w") as f:
            f.write(f'[[target]]\nname = "t"\npid = [{w.pid}]\nmax_cpu_percent = {share}\n')
        r = w.regions["heap"]
        again = 0
        with Daemon(pids=[w.pid], config=cfg,
                    sets={"enabled": "madvise", "max_cpu_percent": 50}) as d:
            deadline = time.monotonic() + 30
            while not any(pmd_mapped_windows(w.pid, r.start, r.end)):
                if time.monotonic() > deadline:
                    raise SystemExit(f"share {share}%: nothing collapsed in 30 s")
                time.sleep(0.02)
            t0, cpu0 = time.monotonic(), cpu_of_target(d)
            # Work all along: memory all huge is given back as 4 KiB pages and advised again.
            while time.monotonic() < t0 + SECONDS:
                if all(pmd_mapped_windows(w.pid, r.start, r.end)):
                    w.command("remap heap")
                    w.command("hugepage heap")
                    again += 1
                time.sleep(0.05)
            seconds, cpu = time.monotonic() - t0, cpu_of_target(d) - cpu0
        w.verify()
    return {"share": share, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 4),
            "used_percent": round(100 * cpu / seconds, 2), "given_back": again}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shares", default="5,10")
    ap.add_argument("--name", default=time.strftime("%Y-%m-%d") + "-target-share")
    args = ap.parse_args()
    shares = [int(s) for s in args.shares.split(",")]
    runs: list[dict] = []
    with saved_thp(enabled="never"):
        for _ in range(args.rounds):
            for share in shares:
                runs.append(one_run(share))
                print(runs[-1], flush=True)
    lines = [f"# A target's CPU share, used ({args.name})", "",
             f"`python bench/bench_target_share.py --rounds {args.rounds} --shares "
             f"{args.shares}` — {WINDOWS} windows kept busy for {SECONDS:g} s, global cap 50%, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; medians", "",
             "| share | used, % of a core (median) | runs | times all given back (median) |",
             "|---|---|---|---|"]
    for share in shares:
        mine = [r for r in runs if r["share"] == share]
        used = [r["used_percent"] for r in mine]
        lines.append(f"| {share}% | {statistics.median(used):.1f} | "
                     f"{', '.join(f'{u:.1f}' for u in used)} | "
                     f"{statistics.median(r['given_back'] for r in mine):g} |")
    write_results(args.name, {"windows": WINDOWS, "seconds": SECONDS, "runs": runs}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
