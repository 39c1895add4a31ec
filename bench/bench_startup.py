"""Start-up time of the command line: wall time of `hugepaged --version` and of a `scan` of one
small process, against the bare interpreter (`python -c pass`) as the floor.

Every round runs each command once, in turn (A/B/C, A/B/C, ...), so a passing load on the
machine touches all of them alike; the median of the rounds is reported.

    python bench/bench_startup.py [--rounds 7] [--out bench/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"--version": 0.15, "scan --pid": 0.2}  # seconds, median wall (issue 8)


def commands(pid: int) -> dict[str, list[str]]:
    exe = shutil.which("hugepaged", path=os.path.dirname(sys.executable)) \
        or shutil.which("hugepaged")
    base = [exe] if exe else [sys.executable, "-m", "hugepaged"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "--version": [*base, "--version"],
        "scan --pid": [*base, "scan", "--pid", str(pid)],
    }


def installed_env(cache: str) -> dict[str, str]:
    """The environment of an installed package: byte-compiled modules. An editable install
    under PYTHONDONTWRITEBYTECODE (this machine's sandbox sets it) compiles every module of
    hugepaged on every start, about 0.1 s a user of a wheel never pays; the cache goes to a
    directory of the benchmark's own, not into the source tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache
    return env


def time_once(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   cwd="/", env=env)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_startup: needs root (scan reads /proc/kpageflags)", file=sys.stderr)
        return 2
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    cache = tempfile.mkdtemp(prefix="hugepaged-bench-pyc-")
    env = installed_env(cache)
    try:
        cmds = commands(target.pid)
        for cmd in cmds.values():  # warm the page cache and the byte-code cache
            time_once(cmd, env)
        samples: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.rounds):
            for name, cmd in cmds.items():
                samples[name].append(time_once(cmd, env))
    finally:
        target.kill()
        target.wait()
        shutil.rmtree(cache, ignore_errors=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rounds": args.rounds, "load_average": os.getloadavg()[0],
              "bytecode": "cached (PYTHONPYCACHEPREFIX), as an installed package has it",
              "median_seconds": {n: round(statistics.median(s), 4) for n, s in samples.items()},
              "samples": samples, "goals": GOALS}
    for name, med in result["median_seconds"].items():
        goal = GOALS.get(name)
        verdict = "" if goal is None else \
            (" met" if med <= goal else " missed") + f" (goal {goal} s)"
        print(f"{name:16} median {med:.3f} s{verdict}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
