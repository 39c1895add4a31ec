"""What the daemon keeps per target: its CPU bucket, its bloat ledger, its counters.

A target's `max_cpu_percent` is a share within the global cap: a collapse for one of its
processes needs both the global bucket and the target's own. Its `max_bloat_mb` is a bloat
ledger (collapse/ledger.py) of the RSS its collapses added, per live process.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from hugepaged.collapse import BloatLedger, Pace

from .promise import DEADLINE as PROMISE_DEADLINE


@dataclass
class TargetState:
    """One target's share of the daemon's work, by the target's name."""

    name: str
    budget: Pace | None = None  # its share of the CPU; None: only the global cap applies
    ledger: BloatLedger = field(default_factory=BloatLedger)
    collapsed: int = 0
    cpu_seconds: float = 0.0
    results: Counter = field(default_factory=Counter)
    splits: int = 0  # windows collapsed for it and found split again (daemon/churn.py)
    # Its coverage promise (daemon/promise.py): coverage as last looked at, whether it is
    # short of it (its processes then rank first), since when, the promise's state
    # (kept, pending, broken), how often broken, and the last obstacle its collapses met.
    coverage: float = 0.0
    short: bool = False
    short_since: float | None = None
    promise: str = ""
    broken: int = 0
    obstacle: str = ""

    @property
    def max_bloat_kb(self) -> int | None:
        return self.ledger.limit_kb

    @property
    def bloat_used_kb(self) -> int:
        return self.ledger.used_kb


class TargetStates:
    """The states of the configured targets; a reload keeps what a kept name had."""

    def __init__(self) -> None:
        self.by_name: dict[str, TargetState] = {}

    def configure(self, specs: list[tuple[str, int | None, int | None]],
                  clock: Callable[[], float]) -> None:
        """(name, max_cpu_percent or None, max_bloat_kb or None) per target, in file order."""
        old, self.by_name = self.by_name, {}
        for name, percent, bloat_kb in specs:
            st = old.get(name) or TargetState(name)
            if percent:
                if st.budget is None:
                    st.budget = Pace(percent, clock)
                else:
                    st.budget.set_percent(percent)
            else:
                st.budget = None
            st.ledger.limit_kb = bloat_kb
            self.by_name[name] = st

    def get(self, name: str | None) -> TargetState | None:
        return None if name is None else self.by_name.get(name)

    def forget(self, pid: int) -> None:
        for st in self.by_name.values():
            st.ledger.forget(pid)

    def __iter__(self):
        return iter(self.by_name.values())


def target_changes(old: list, new: list) -> list[str]:
    """What a reload changed in the targets, one phrase each, in the new file's order and
    then the removed ones: so the log confirms an edit of a target's settings, which moves
    no process and so has no "targets reloaded" line."""
    before = {t.name: t for t in old}
    out = []
    for t in new:
        was = before.pop(t.name, None)
        if was is None:
            out.append(f"target {t.name}: added ({t.describe()})")
            continue
        if was.describe() != t.describe():
            out.append(f"target {t.name}: match {was.describe()} -> {t.describe()}")
        a, b = was.policy(), t.policy()
        out += [f"target {t.name}: {k}: {a.get(k, '(global)')} -> {b.get(k, '(global)')}"
                for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return out + [f"target {name}: removed" for name in before]


def summaries(targets: list, states: TargetStates, slots) -> list[dict]:
    """One record per configured target, in file order, for status, top and metrics:
    its processes, their anonymous memory and THP (as of their last visit), what was
    collapsed for it, its bloat used and limit, its CPU used."""
    out = []
    for t in targets:
        mine = [s for s in slots if getattr(s.target, "name", None) == t.name]
        st = states.get(t.name)
        anon = sum(s.anon_kb for s in mine)
        huge = min(anon, sum(s.anon_huge_kb for s in mine))
        out.append({
            "name": t.name, "match": t.describe(), "enabled": t.enabled,
            "shmem_enabled": t.shmem_enabled,
            "priority": t.priority, "processes": len(mine), "pids": [s.pid for s in mine],
            "anon_kb": anon, "anon_huge_kb": huge,
            "coverage_pct": round(100.0 * huge / anon, 1) if anon else 0.0,
            "windows_collapsed": st.collapsed if st else 0,
            "bloat_used_kb": st.bloat_used_kb if st else 0,
            "bloat_limit_kb": t.max_bloat_kb,
            "cpu_seconds": round(st.cpu_seconds, 3) if st else 0.0,
            "max_cpu_percent": t.max_cpu_percent,
            "policy": t.policy(),
            "results": dict(sorted(st.results.items())) if st else {},
            "pages_split_after_collapse": st.splits if st else 0,
            "promise": None if t.min_coverage is None else {
                "min_coverage": t.min_coverage,
                "deadline_seconds": t.coverage_deadline or PROMISE_DEADLINE,
                "state": st.promise if st else "", "broken": st.broken if st else 0,
                "obstacle": st.obstacle if st else ""},
        })
    return out
