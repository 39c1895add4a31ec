#!/usr/bin/env python3
"""Process churn: what the daemon spends while 300 processes start and exit continuously.

`hugepaged run` at its defaults, in discovery mode (process connector and /proc walk),
`exclude_comm` leaving out everything but the churn's own processes (so no other workload on
the machine is touched). The churn keeps CHURN processes alive at all times, each living a
random 0.2-4 s (`sleep`, run under the name `hpchurn`), replacing each one as it exits.

Measured from outside (never through hugepaged's code): the daemon's utime + stime from
/proc/PID/stat over the run, as % of one core, against its cap (`max_cpu_percent`, 5 by
default), which since issue 11 bounds everything the daemon spends, not only collapses.
Takes the machine lock, as every benchmark does.

    python bench/bench_churn.py [--seconds 300] [--procs 300]
Results: bench/results/churn-<date>-<machine>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scenarios import ROOT
from scenarios.cpu import stat_cpu_seconds
from scenarios.machine import machine, machine_tag

from kit.daemon_runner import Daemon
from kit.helpers import machine_lock

RESULTS = ROOT / "bench" / "results"


def churn(seconds: float, procs: int, link: str, sample) -> dict:
    """Keep `procs` short-lived processes alive for `seconds`; returns counts."""
    alive: list[subprocess.Popen] = []
    started = exited = 0
    rng = random.Random(11)
    t_end = time.monotonic() + seconds
    next_sample = time.monotonic()
    try:
        while time.monotonic() < t_end:
            still = []
            for p in alive:
                if p.poll() is None:
                    still.append(p)
                else:
                    exited += 1
            alive = still
            while len(alive) < procs:
                life = f"{rng.uniform(0.2, 4.0):.2f}"
                alive.append(subprocess.Popen([link, life], stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, close_fds=True))
                started += 1
            if time.monotonic() >= next_sample:
                sample()
                next_sample += 5.0
            time.sleep(0.01)
    finally:
        for p in alive:
            p.kill()
        for p in alive:
            p.wait()
    return {"started": started, "exited": exited}


def run(seconds: float, procs: int, lock: bool = True, cap: int | None = None) -> dict:
    work = tempfile.mkdtemp(prefix="bench-churn-")
    link = os.path.join(work, "hpchurn")
    os.symlink("/bin/sleep", link)
    cfg = os.path.join(work, "hugepaged.toml")
    Path(cfg).write_text("exclude_comm = '(?!hpchurn$).*'\n")  # fullmatch: all but ours
    with machine_lock() if lock else contextlib.nullcontext():
        sets = {} if cap is None else {"max_cpu_percent": cap}
        daemon = Daemon(config=cfg, log_level="info", workdir=work, sets=sets).start()
        try:
            time.sleep(2.0)  # start-up (the first /proc walk) is not churn
            cpu0, t0 = stat_cpu_seconds(daemon.pid), time.monotonic()
            samples: list[dict] = []

            def sample() -> None:
                st = daemon.status()
                samples.append({"t": round(time.monotonic() - t0, 1),
                                "cpu_s": round(stat_cpu_seconds(daemon.pid) - cpu0, 3),
                                "registered": st.get("registered"),
                                "pending": st.get("pending")})

            counts = churn(seconds, procs, link, sample)
            cpu1, t1 = stat_cpu_seconds(daemon.pid), time.monotonic()
            st = daemon.status()
            cap = st["tunables"]["max_cpu_percent"]
        finally:
            daemon.close()
    wall = t1 - t0
    pct = 100.0 * (cpu1 - cpu0) / wall
    return {
        "machine": machine(), "seconds": round(wall, 1), "procs": procs,
        "started": counts["started"], "starts_per_second": round(counts["started"] / wall, 1),
        "daemon_cpu_seconds": round(cpu1 - cpu0, 2), "daemon_cpu_percent": round(pct, 2),
        "max_cpu_percent": cap, "within_cap": pct <= cap,
        "registered_at_end": st.get("registered"), "samples": samples,
    }


def write(res: dict, label: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"churn-{time.strftime('%Y-%m-%d')}-{machine_tag(res['machine'])}"
    stem += f"-{label}" if label else ""
    (RESULTS / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    m = res["machine"]
    md = [f"# Process churn, {m['date_utc']}, commit {m['git_commit']}"
          + (f" ({res['label']})" if res.get("label") else ""), "",
          f"Daemon code from PYTHONPATH={res.get('pythonpath') or '(installed)'}.", "",
          f"`python bench/bench_churn.py --seconds {res['seconds']:.0f} --procs {res['procs']}`"
          f" on {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}.", "",
          f"{res['procs']} processes alive at all times, each living 0.2-4 s: "
          f"{res['started']} started in {res['seconds']:.0f} s "
          f"({res['starts_per_second']}/s). `hugepaged run` at its defaults, discovery mode."
          + ("" if res.get("machine_lock", True) else " Run without the machine lock: other "
             "agents' tests and benchmarks shared the 2 CPUs meanwhile (the daemon's CPU "
             "seconds are its own; its wall-clock pace is not)."),
          "", "| daemon CPU | % of one core | cap (max_cpu_percent) | within cap |",
          "|---|---|---|---|",
          f"| {res['daemon_cpu_seconds']} s | {res['daemon_cpu_percent']}% | "
          f"{res['max_cpu_percent']}% | {'yes' if res['within_cap'] else 'no'} |", "",
          "Samples every 5 s (t, daemon CPU since start, registered, pending fork events):", "",
          "| t (s) | CPU (s) | registered | pending |", "|---|---|---|---|"]
    md += [f"| {s['t']} | {s['cpu_s']} | {s['registered']} | {s['pending']} |"
           for s in res["samples"]]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    return RESULTS / f"{stem}.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--procs", type=int, default=300)
    ap.add_argument("--no-lock", action="store_true",
                    help="do not wait for the machine lock (the churn changes no kernel "
                         "setting; say so when quoting: other work ran meanwhile)")
    ap.add_argument("--label", default="", help="suffix of the result files (e.g. the tree "
                    "measured, when PYTHONPATH points the daemon at another checkout)")
    ap.add_argument("--max-cpu-percent", type=int, default=None,
                    help="the daemon's cap (default: its own default; set it to compare "
                         "trees whose defaults differ)")
    args = ap.parse_args()
    res = run(args.seconds, args.procs, lock=not args.no_lock, cap=args.max_cpu_percent)
    res["label"] = args.label
    res["machine_lock"] = not args.no_lock
    res["pythonpath"] = os.environ.get("PYTHONPATH", "")
    path = write(res, args.label)
    print(f"{res['started']} processes in {res['seconds']} s; daemon "
          f"{res['daemon_cpu_percent']}% of a core (cap {res['max_cpu_percent']}%); {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
