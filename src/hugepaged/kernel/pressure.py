"""Pressure stall information (PSI): how much of the time tasks waited for memory.

/proc/pressure/memory for the machine; memory.pressure of a cgroup in the cgroup2 hierarchy
for the tasks in it (cgroup2 keeps one per group whether or not a controller is enabled
there, so it exists even on a machine whose memory controller is v1). `some avg10` is the
share of the last ten seconds in which at least one task was stalled on memory.
"""

from __future__ import annotations

import os


def parse_some_avg10(text: str) -> float:
    """`some avg10=1.23 avg60=... total=...` -> 1.23 (percent)."""
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                key, _, value = field.partition("=")
                if key == "avg10":
                    return float(value)
    raise ValueError("no 'some avg10' in a pressure file")


class Pressure:
    """Reads PSI files under a proc root and a cgroup2 mount (found in mountinfo)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root
        self._cgroup2: str | None | bool = False  # False: not looked for yet

    def machine(self) -> float | None:
        """The machine's memory `some avg10`, percent; None without PSI."""
        return self._read(f"{self.proc_root}/pressure/memory")

    def cgroup(self, path: str) -> float | None:
        """A cgroup2 group's memory `some avg10` (its path as /proc/PID/cgroup's `0::`
        line names it); None where there is no cgroup2 hierarchy or no such group."""
        mount = self.cgroup2_mount()
        if mount is None:
            return None
        return self._read(os.path.join(mount, path.lstrip("/"), "memory.pressure"))

    def cgroup2_mount(self) -> str | None:
        if self._cgroup2 is False:
            self._cgroup2 = None
            try:
                with open(f"{self.proc_root}/self/mountinfo") as f:
                    for line in f:
                        left, sep, right = line.partition(" - ")
                        if sep and right.split()[:1] == ["cgroup2"]:
                            self._cgroup2 = left.split()[4]
                            break
            except OSError:
                pass
        return self._cgroup2 or None

    @staticmethod
    def _read(path: str) -> float | None:
        try:
            with open(path) as f:
                return parse_some_avg10(f.read())
        except (OSError, ValueError):
            return None
