"""One run's settings and work directory, and hugepaged's start-up CPU measured apart."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kit.daemon_runner import Daemon

from .cpu import cpu_seconds


@dataclass
class Context:
    quick: bool
    gib: float
    workdir: str
    log: Callable[[str], None]
    empty_config: str = ""
    hugepaged_startup_cpu: tuple[float, float] = (0.0, 0.0)  # (stat, schedstat) seconds
    startup_detail: dict = field(default_factory=dict)

    def p(self, quick_value, full_value):
        return quick_value if self.quick else full_value

    def daemon(self, pids: list[int], sets: dict) -> Daemon:
        """`hugepaged run` targeted at `pids` with no configuration but `sets`, logging at
        info into its directory under the run's work directory (kept there on failure)."""
        return Daemon(pids, sets, self.empty_config, workdir=self.workdir, log_level="info")


def make_context(quick: bool, gib: float, log: Callable[[str], None]) -> Context:
    workdir = tempfile.mkdtemp(prefix="hugepaged-bench-")
    empty = os.path.join(workdir, "empty.toml")
    Path(empty).write_text("# hugepaged defaults: no settings\n")
    return Context(quick=quick, gib=gib, workdir=workdir, log=log, empty_config=empty)


def measure_daemon_startup(ctx: Context, repeat: int = 3) -> dict:
    """CPU a `hugepaged run` spends before it collapses anything: interpreter, imports, first
    empty pass. Targets a sleeping process with nothing eligible; median of `repeat`."""
    values = []
    for _ in range(repeat):
        sleeper = subprocess.Popen(["sleep", "600"])
        try:
            with ctx.daemon([sleeper.pid], {"enabled": "madvise"}) as d:
                time.sleep(0.5)
                values.append(cpu_seconds(d.pid))
                d.stop()
        finally:
            sleeper.kill()
            sleeper.wait()
    values.sort(key=lambda v: v[1])
    ctx.hugepaged_startup_cpu = values[len(values) // 2]
    ctx.startup_detail = {"median_cpu_seconds_stat": ctx.hugepaged_startup_cpu[0],
                          "median_cpu_seconds_schedstat": ctx.hugepaged_startup_cpu[1],
                          "values": values}
    return ctx.startup_detail
