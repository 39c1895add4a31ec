"""Cgroups for the tests: a v1 memory cgroup with a limit, and a cgroup2 group beside it (this
machine has the hybrid layout: the memory controller on v1, PSI per group on cgroup2).

Never imports hugepaged. Every group made is removed again, its processes killed first."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

V1_MEMORY = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")


def available() -> bool:
    return (V1_MEMORY / "cgroup.procs").exists() and (V2 / "cgroup.procs").exists()


class Group:
    """One name in both hierarchies: `memory` (v1, limited) and `unified` (cgroup2)."""

    def __init__(self, limit_bytes: int) -> None:
        self.name = f"hugepaged-test-{uuid.uuid4().hex[:8]}"
        self.memory = V1_MEMORY / self.name
        self.unified = V2 / self.name
        self.memory.mkdir()
        self.unified.mkdir()
        (self.memory / "memory.limit_in_bytes").write_text(str(limit_bytes))

    @property
    def v2_path(self) -> str:
        """The group as /proc/PID/cgroup's `0::` line names it."""
        return "/" + self.name

    def add(self, pid: int, memory: bool = True) -> None:
        """Move a process in: its cgroup2 group always, the limited memory cgroup if asked."""
        (self.unified / "cgroup.procs").write_text(str(pid))
        if memory:
            (self.memory / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int((self.memory / "memory.usage_in_bytes").read_text())

    def some_avg10(self) -> float:
        line = (self.unified / "memory.pressure").read_text().splitlines()[0]
        return float(line.split()[1].split("=")[1])

    def remove(self) -> None:
        for group in (self.memory, self.unified):
            for _ in range(50):
                pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            with contextlib.suppress(OSError):
                group.rmdir()


@contextlib.contextmanager
def group(limit_bytes: int) -> Iterator[Group]:
    g = Group(limit_bytes)
    try:
        yield g
    finally:
        g.remove()
