"""Targets: processes an admin names (by comm, exe, cgroup or pid) that get their own policy.

The kernel has one policy for every process; MADV_COLLAPSE ignores the sysfs `enabled` mode,
so hugepaged can give one process `enabled = "always"` on a `madvise` machine (and
`shmem_enabled = "always"` for its shared memory on a `never` one), its own `max_ptes_*`
limits, a priority, a CPU share and a bloat budget. Targets are tried in the order of the
configuration file and the first whose every match key matches wins; a process no target
matches gets the global policy.
"""

import re
from collections.abc import Callable
from dataclasses import field, make_dataclass, replace
from functools import cached_property

from hugepaged.errors import HugepagedError
from hugepaged.kernel.procfs import ProcFS
from hugepaged.policy import CollapseControl
from hugepaged.regex_bound import COMM_CHARS, compile_bounded
from hugepaged.tunables import SPECS, TARGET_KEYS

MATCH_KEYS = ("comm", "exe", "cgroup", "pid")
# The keys a target shares with the tunables: same names, same ranges, same refusals.
TUNABLE_KEYS = TARGET_KEYS
# Every setting a target may give: what is not its name or a match key.
POLICY_KEYS = (*TUNABLE_KEYS, "priority", "max_bloat_mb", "min_coverage",
               "coverage_deadline")
NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
PRIORITY_RANGE = (-1000, 1000)
MAX_TARGETS = 64  # each is a label value in the metrics: bounded


class _Target:
    """One `[[target]]` table, checked. None means "not given": the global value applies.

    Its fields (TARGET_FIELDS): the name, the match keys, a field per tunable a target may
    set (tunables.TARGET_KEYS: the same names, ranges and refusals), priority, max_bloat_mb.
    """

    def __post_init__(self) -> None:
        if self.comm is not None and self._comm_re is None:
            # Bounded: one search of a name takes at most regex_bound.MAX_STEPS steps.
            object.__setattr__(self, "_comm_re", compile_bounded(self.comm))

    def matches(self, proc: "ProcessFacts") -> bool:
        """AND of the keys given; exe and cgroup are read only when asked for. A pid names
        the process that had it when the daemon read its targets, not a later one given the
        same number (ProcessFacts.same_process)."""
        if self.pid is not None and (proc.pid not in self.pid or not proc.same_process()):
            return False
        # A comm is at most COMM_CHARS characters: the length the pattern's bound holds for.
        if self._comm_re is not None and not self._comm_re.search(proc.comm[:COMM_CHARS]):
            return False
        if self.exe is not None and proc.exe != self.exe:
            return False
        return self.cgroup is None or any(cgroup_under(p, self.cgroup) for p in proc.cgroups)

    @property
    def max_bloat_kb(self) -> int | None:
        return None if self.max_bloat_mb is None else self.max_bloat_mb * 1024

    def overrides(self) -> dict[str, object]:
        """The CollapseControl fields this target sets (the rest stay the global policy's)."""
        out: dict[str, object] = {"target": self.name, "priority": self.priority,
                                  "max_cpu_percent": self.max_cpu_percent or None,
                                  "max_bloat_kb": self.max_bloat_kb,
                                  "by_cgroup": self.cgroup is not None}
        for key in TUNABLE_KEYS:
            if key != "max_cpu_percent" and getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def policy(self) -> dict[str, object]:
        """The settings this target gives (its keys other than name and the match keys), as
        written: what a reader of status needs to decide its processes as the daemon does."""
        return {k: getattr(self, k) for k in POLICY_KEYS if getattr(self, k) is not None}

    def describe(self) -> str:
        """The match keys as written, for status and logs."""
        parts = [f"{k}={getattr(self, k)!r}" for k in MATCH_KEYS if getattr(self, k) is not None]
        return " ".join(parts)


def _annotation(key: str) -> type:
    return SPECS[key].type | None  # type: ignore[return-value]


TARGET_FIELDS = [
    ("name", str),
    ("comm", str | None, None),  # regular expression, searched in /proc/PID/comm
    ("exe", str | None, None),  # exactly /proc/PID/exe
    ("cgroup", str | None, None),  # path prefix, whole components, in any hierarchy
    ("pid", tuple[int, ...] | None, None),
    *[(k, _annotation(k), None) for k in TARGET_KEYS],  # max_cpu_percent: a share; 0: none
    ("priority", int, 0),
    ("max_bloat_mb", int | None, None),
    ("min_coverage", int | None, None),  # percent huge, promised (daemon/promise.py)
    ("coverage_deadline", int | None, None),  # seconds short of it before it is broken (60)
]
Target = make_dataclass(
    "Target", [*TARGET_FIELDS,
               ("_comm_re", re.Pattern | None, field(default=None, compare=False, repr=False))],
    bases=(_Target,), frozen=True)
Target.__module__ = __name__
KEYS = tuple(f[0] for f in TARGET_FIELDS)  # every key a [[target]] table may have


def cgroup_under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it, by whole components ("/a/b" is not under "/a/bc")."""
    prefix = prefix.rstrip("/") or "/"
    if prefix == "/":
        return path.startswith("/")
    return path == prefix or path.startswith(prefix + "/")


class ProcessFacts:
    """What a target may match on, read from the kernel layer only when a target asks.

    `identities`: pid -> start time of the processes the targets' pid keys named when they
    were read (the daemon's); None where a pid is taken as it is now (a one-shot command)."""

    def __init__(self, procfs: ProcFS, pid: int, comm: str,
                 identities: dict[int, int] | None = None) -> None:
        self.procfs, self.pid, self.comm = procfs, pid, comm
        self.identities = identities

    def same_process(self) -> bool:
        if self.identities is None:
            return True
        want = self.identities.get(self.pid)
        try:
            return want is not None and self.procfs.stat(self.pid).starttime == want
        except (HugepagedError, OSError):
            return False

    @cached_property
    def exe(self) -> str | None:
        try:
            return self.procfs.exe(self.pid)
        except HugepagedError:  # gone or not readable: no exe to match
            return None

    @cached_property
    def cgroups(self) -> list[str]:
        try:
            return self.procfs.cgroups(self.pid)
        except (HugepagedError, OSError):
            return []


def first_match(targets: list[Target], proc: ProcessFacts) -> Target | None:
    """Targets are tried in file order; the first that matches wins."""
    return next((t for t in targets if t.matches(proc)), None)


def control_under(control: CollapseControl, target: Target | None) -> CollapseControl:
    """The policy of a process that matched `target`: its settings over the global ones."""
    return control if target is None else replace(control, **target.overrides())


def controls_by_pid(procfs: ProcFS, control: CollapseControl, targets: list[Target]
                    ) -> Callable[[int], CollapseControl]:
    """pid -> its policy, resolved as the daemon resolves a process at registration (first
    match wins). A process that is gone gets the global policy (its scan then says gone)."""
    def control_for(pid: int) -> CollapseControl:
        if not targets:
            return control
        try:
            comm = procfs.stat(pid).comm
        except (HugepagedError, OSError):
            return control
        return control_under(control, first_match(targets, ProcessFacts(procfs, pid, comm)))
    return control_for


def controls_of_daemon(status: dict, control: CollapseControl
                       ) -> Callable[[int], CollapseControl] | None:
    """pid -> the policy the daemon applies to it, from its status: a registered process's
    target (status "processes"), with that target's settings (status "targets" "policy");
    every other process the global policy. None when the status has no policies (a daemon
    from before they were reported)."""
    policies = {t["name"]: t.get("policy") for t in status.get("targets", [])}
    if any(p is None for p in policies.values()):
        return None
    targets = {name: Target(name=name, **p) for name, p in policies.items()}
    by_pid = {p["pid"]: targets.get(p.get("target") or "") for p in status.get("processes", [])}
    return lambda pid: control_under(control, by_pid.get(pid))


def by_name(targets: list[Target], name: str) -> Target | None:
    return next((t for t in targets if t.name == name), None)
