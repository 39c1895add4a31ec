"""The policy one process is decided and collapsed by: the kernel's struct collapse_control.

The kernel passes a collapse_control down from khugepaged or madvise_collapse to the scan and
the collapse; hugepaged resolves one per process (the daemon per registered slot, `scan` and
`collapse` once per run) and passes it down the same way. The kernel's fields come from the
tunables; `target`, `priority`, `max_cpu_percent` and `max_bloat_kb` are hugepaged's own (a
target is a set of processes an administrator names with a policy of its own).

Field defaults are those of the fixtures' geometry (4 KiB pages); a run's control always
comes from its tunables (from_tunables), which come from the running kernel's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

from hugepaged.kernel.geometry import DEFAULT_GEOMETRY as _G


@dataclass(frozen=True)
class Limits:
    """The max_ptes_* of the kernel; `khugepaged=False` is MADV_COLLAPSE's semantics."""

    max_ptes_none: int = _G.max_ptes_none
    max_ptes_swap: int = _G.max_ptes_swap
    max_ptes_shared: int = _G.max_ptes_shared
    khugepaged: bool = True


@dataclass(frozen=True)
class CollapseControl:
    """What eligibility, the window decision and the collapse of one process obey."""

    enabled: str = "madvise"  # anonymous memory: always | madvise | never
    shmem_enabled: str = "never"  # always | within_size | advise | never | deny | force
    max_ptes_none: int = _G.max_ptes_none
    max_ptes_swap: int = _G.max_ptes_swap
    max_ptes_shared: int = _G.max_ptes_shared
    # cc->is_khugepaged: False is MADV_COLLAPSE's semantics (`--force`): the sysfs mode and
    # the max_ptes_* limits do not apply.
    is_khugepaged: bool = True
    # hugepaged's own: the target this process matched (None: the global policy), its
    # priority in the pass, its share of the collapse CPU cap, its bloat budget, and how
    # long one call may hold it.
    target: str | None = None
    priority: int = 0
    max_cpu_percent: int | None = None
    max_bloat_kb: int | None = None
    max_stall_ms: int = 10  # a call takes the windows that fit in this, at least one
    on_split: str = "back_off"  # a window found split after its collapse: back_off | leave
    max_memory_pressure: int = 10  # collapses pause above this PSI some avg10 (0: never)
    by_cgroup: bool = False  # its target matches by cgroup: that cgroup's own pressure

    @classmethod
    def from_tunables(cls, t, *, force: bool = False) -> CollapseControl:
        """The global policy: the tunables' values, MADV_COLLAPSE's with `force`."""
        return cls(enabled=t.enabled, shmem_enabled=t.shmem_enabled,
                   max_ptes_none=t.max_ptes_none, max_ptes_swap=t.max_ptes_swap,
                   max_ptes_shared=t.max_ptes_shared, is_khugepaged=not force,
                   max_stall_ms=t.max_stall_ms, on_split=t.on_split,
                   max_memory_pressure=t.max_memory_pressure)

    def limits(self) -> Limits:
        return Limits(self.max_ptes_none, self.max_ptes_swap, self.max_ptes_shared,
                      khugepaged=self.is_khugepaged)
