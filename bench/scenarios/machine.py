"""The machine a run measures: its description for the results, and letting it settle."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from kit.helpers import read_enabled, read_knob

from . import ROOT
from .knobs import meminfo_kb

REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def quiesce(min_wait: float = 2.0, max_wait: float = 20.0) -> dict:
    """Let the machine settle before a time zero: at least min_wait seconds, and, where the
    kernel has free page reporting (a VM handing free memory back to its host), until the
    reported total has not moved for 2 s. Free 2 MiB blocks are then in the same state for
    every contender (on such a VM the first touch of a reported block costs host faults, and
    that cost lands in the collapse's copy)."""
    t0 = time.monotonic()
    time.sleep(min_wait)
    if not REPORTED_KIB.exists():
        return {"seconds": round(time.monotonic() - t0, 2)}
    first = last = int(REPORTED_KIB.read_text())
    stable_since = time.monotonic()
    while time.monotonic() - t0 < max_wait:
        time.sleep(0.5)
        now = int(REPORTED_KIB.read_text())
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 2.0:
            break
    return {"seconds": round(time.monotonic() - t0, 2), "reported_mib": (last - first) >> 10}


def machine() -> dict:
    u = platform.uname()
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    thp = {"enabled": read_enabled(), "defrag": read_knob("thp_defrag")}
    h = hashlib.sha256()
    for p in sorted((ROOT / "src" / "hugepaged").rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    try:  # only the plots need it (the `bench` extra); the record says which, if any
        import matplotlib
        mpl = matplotlib.__version__
    except ImportError:
        mpl = None
    return {
        "hostname": socket.gethostname(), "uname": " ".join(u), "kernel": u.release,
        "arch": u.machine, "cpu_model": cpu, "cpus": os.cpu_count(),
        "mem_total_gib": round(meminfo_kb("MemTotal") / (1 << 20), 2),
        "swap_total_gib": round(meminfo_kb("SwapTotal") / (1 << 20), 2),
        "python": platform.python_version(), "numpy": np.__version__,
        "matplotlib": mpl,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "src_sha256": h.hexdigest()[:16],  # the tree measured, uncommitted changes included
        "git_dirty_files": [ln[3:] for ln in git("status", "--porcelain").splitlines()
                            if ln[3:].startswith("src/")],
        "thp_at_start": thp,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine_tag(m: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-",
                  f"{m['hostname']}-{m['cpus']}cpu-{round(m['mem_total_gib'])}g")
