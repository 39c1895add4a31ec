#!/usr/bin/env python3
"""The metrics endpoint under abuse by a local user (issue 21 e): what it costs the daemon.

Usage: python bench/bench_metrics_abuse.py [--rounds 2] [--seconds 15] [--baseline SRC]
                                           [--name NAME]

A daemon (`run --pid SLEEPER --metrics :0`, defaults otherwise) is scraped by 3 `curl`s run
as user nobody (setpriv), each walking a URL range back to back, while 273 more connections
sit idle. Over the phase: the daemon's CPU (utime + stime of all its threads,
/proc/PID/stat), its thread count at the end, and the scrapes completed. Contenders alternate
A/B/A/B: this tree's src/ and, with --baseline, another tree's src/ (/work/main/src, say).
Writes bench/results/NAME.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kit.daemon_runner import Daemon  # noqa: E402

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def phase(src: str, seconds: float) -> dict:
    sleeper = subprocess.Popen(["sleep", str(int(seconds) + 60)])
    counts = Path(tempfile.mkdtemp(prefix="hugepaged-scrapes-"))
    counts.chmod(0o777)
    loops, idle = [], []
    try:
        with Daemon([sleeper.pid], args=["--metrics", ":0"], log_level="info",
                    env={"PYTHONPATH": src}) as d:
            port = d.wait_event("metrics_listen")["port"]
            time.sleep(2)
            url = f"http://127.0.0.1:{port}/metrics"
            for _ in range(273):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            c0, t0 = cpu_seconds(d.pid), time.monotonic()
            for i in range(3):
                # One curl walking a numbered URL range: back-to-back requests without a
                # process start each (the query string is ignored); a status line each.
                script = (f"exec stdbuf -o0 curl -s -o /dev/null -w '%{{http_code}}\\n' "
                          f"--max-time 1000 "
                          f"'{url}?n=[1-100000000]' > {counts}/{i}")
                loops.append(subprocess.Popen([*AS_NOBODY, "sh", "-c", script]))
            time.sleep(seconds)
            cpu = cpu_seconds(d.pid) - c0
            elapsed = time.monotonic() - t0
            threads = len(os.listdir(f"/proc/{d.pid}/task"))
            for p in loops:  # before the daemon stops (each URL left would fail at once)
                p.kill()
                p.wait()
    finally:
        for p in loops:
            p.kill()
            p.wait()
        for s in idle:
            s.close()
        sleeper.kill()
        sleeper.wait()
    codes = [c for f in os.listdir(counts) for c in (counts / f).read_text().split()]
    scrapes = codes.count("200")
    return {"cpu_pct": 100 * cpu / elapsed, "threads": threads, "scrapes_per_s":
            scrapes / elapsed}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--baseline", help="another tree's src/ to compare with (A/B/A/B)")
    ap.add_argument("--name", default="metrics_abuse")
    args = ap.parse_args()
    contenders = {"this tree": str(ROOT / "src")}
    if args.baseline:
        contenders = {"baseline": args.baseline, **contenders}
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, src in contenders.items():
            runs[name].append(phase(src, args.seconds))
            print(name, runs[name][-1], flush=True)
    lines = [f"# {args.name} ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/bench_metrics_abuse.py --rounds {args.rounds} --seconds "
             f"{args.seconds:g}" + (f" --baseline {args.baseline}`" if args.baseline else "`")
             + f": 3 curl loops as nobody + 273 idle connections, {args.seconds:g} s a phase, "
             "medians of the rounds (interleaved).", "",
             "| daemon | CPU (% of a core) | threads | scrapes/s |", "|---|---:|---:|---:|"]
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        lines.append(f"| {name} ({contenders[name]}) | {med['cpu_pct']:.1f} | "
                     f"{med['threads']:.0f} | {med['scrapes_per_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results" / f"{args.name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
