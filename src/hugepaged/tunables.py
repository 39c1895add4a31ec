"""Tunables with the kernel's names, ranges and refusals (mm/khugepaged.c sysfs stores).

SPECS is the one table: per key its range or words, its default, whether the kernel's sysfs
has it (and then whether hugepaged starts from the kernel's value), whether a [[target]] may
set it, and whether a change of it re-decides every process. The Tunables dataclass, the
target keys, the inherited list and the checks of every face (the configuration file, --set,
the control socket) are derived from it.

The kernel derives max_ptes_*'s limits and defaults from HPAGE_PMD_NR (kernel/geometry.py);
so do these, from the geometry of the running kernel: on arm64 with 64 KiB pages a PMD
holds 8192 PTEs and max_ptes_none goes to 8191.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, make_dataclass

from hugepaged.errors import InvalidTunable
from hugepaged.kernel.geometry import DEFAULT_GEOMETRY, Geometry, running_geometry

UINT_MAX = 2**32 - 1
SHMEM_MODES = ("always", "within_size", "advise", "never", "deny", "force")
Derived = Callable[[Geometry], int]


@dataclass(frozen=True)
class Spec:
    """One tunable. `hi` and `default` may be functions of the geometry. `kernel`: sysfs has
    it too (the khugepaged directory, or the THP directory for the modes); `inherited`: the
    daemon starts from the kernel's value; `per_target`: a [[target]] may set it; `rule`: a
    change re-decides every process (as a write to the kernel's knobs wakes khugepaged)."""

    name: str
    default: int | str | Derived
    lo: int | None = None
    hi: int | Derived | None = None
    choices: tuple[str, ...] = ()
    kernel: bool = False
    inherited: bool = False
    per_target: bool = False
    rule: bool = False
    parse: Callable[[str], str] | None = field(default=None, compare=False)  # own syntax
    doc: str = field(default="", compare=False)

    @property
    def type(self) -> type:
        """What a value is: a word (or a list of CPUs), or an integer."""
        return str if self.choices or self.parse is not None else int

    def bounds(self, geometry: Geometry) -> tuple[int, int]:
        hi = self.hi(geometry) if callable(self.hi) else self.hi
        return self.lo, hi  # type: ignore[return-value]

    def default_for(self, geometry: Geometry) -> int | str:
        return self.default(geometry) if callable(self.default) else self.default

    def describe(self, geometry: Geometry | None = None) -> str:
        if self.parse is not None:
            return "a list of online CPUs (0-1,3), or empty for all"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        lo, hi = self.bounds(geometry or running_geometry())
        return f"an integer {lo}..{hi}"


def _cpulist(text: str) -> str:
    """A CPU list of online CPUs, normalized ("1,0-0" -> "0-1"); "" is every CPU."""
    from hugepaged.kernel.cpus import format_cpulist, online_cpus, parse_cpulist

    cpus = parse_cpulist(text)
    offline = sorted(set(cpus) - set(online_cpus()))
    if offline:
        raise ValueError(f"CPU {format_cpulist(offline)} not online")
    return format_cpulist(cpus)


def _ptes(g: Geometry) -> int:
    return g.pmd_nr - 1  # the kernel refuses max_ptes_* above HPAGE_PMD_NR - 1


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("enabled", "madvise", choices=("always", "madvise", "never"), kernel=True,
         inherited=True, per_target=True, rule=True,
         doc="which VMAs are candidates: all, MADV_HUGEPAGE only, none"),
    Spec("shmem_enabled", "never", choices=SHMEM_MODES, kernel=True, inherited=True,
         per_target=True, rule=True,
         doc="which shared-memory mappings are candidates (the kernel's shmem_enabled)"),
    Spec("defrag", 1, 0, 1, kernel=True, inherited=True,
         doc="khugepaged's defrag, hugepaged's meaning: 1: collapse even when no free huge "
             "page exists (the kernel compacts); 0: only while one exists"),
    Spec("max_ptes_none", lambda g: g.max_ptes_none, 0, _ptes, kernel=True, inherited=True,
         per_target=True, rule=True,
         doc="empty or zero-page PTEs a window may have and still collapse"),
    Spec("max_ptes_swap", lambda g: g.max_ptes_swap, 0, _ptes, kernel=True, inherited=True,
         per_target=True, rule=True,
         doc="swapped-out PTEs a window may have (they are swapped in)"),
    Spec("max_ptes_shared", lambda g: g.max_ptes_shared, 0, _ptes, kernel=True,
         inherited=True, per_target=True, rule=True,
         doc="pages mapped by more than one process a window may have"),
    # hugepaged's default: 32 windows per 100 ms, 400x the kernel's 8 per 10 s.
    Spec("pages_to_scan", lambda g: 32 * g.pmd_nr, 1, UINT_MAX, kernel=True,
         doc="progress budget of one pass: HPAGE_PMD_NR per window examined, 1 per VMA "
             "skipped"),
    Spec("scan_sleep_millisecs", 100, 0, UINT_MAX, kernel=True,
         doc="sleep between passes"),
    Spec("alloc_sleep_millisecs", 60000, 0, UINT_MAX, kernel=True, inherited=True,
         doc="back-off after a huge page allocation failed"),
    # 20: a 3 GiB heap 95% huge in about a minute here (bench/results/2026-12-07-defaults.md);
    # collapsing it costs 5-8 s of CPU, so a minute needs ~10-13% of a core while it works.
    Spec("max_cpu_percent", 20, 0, 100, per_target=True,
         doc="cap on all CPU the daemon spends (collapses, its workers, scanning, "
             "registration): percent of one core as an average over 10 s, collapses spread "
             "evenly within it; 0: no cap (hugepaged's own)"),
    Spec("max_stall_ms", 10, 0, 60000, per_target=True,
         doc="how long one process_madvise call may hold a process (its mmap lock, a CPU): "
             "a call takes as many windows as fit at their mean collapse time, at least one "
             "(hugepaged's own)"),
    Spec("max_memory_pressure", 10, 0, 100, per_target=True,
         doc="collapses pause while memory pressure (PSI `some avg10`, percent; of the "
             "process's own cgroup for a target matched by cgroup, else the machine's) is "
             "above this, and resume below it; 0: never pause (hugepaged's own)"),
    Spec("on_split", "back_off", choices=("back_off", "leave"), per_target=True,
         doc="a window hugepaged collapsed and later finds split again: back_off (not "
             "again for a while that doubles with every split, up to hours) or leave (never "
             "again) (hugepaged's own)"),
    Spec("collapse_cpus", "", parse=lambda text: _cpulist(text),
         doc="the CPUs the collapsing threads run on, as a CPU list (0-1,3); empty: all "
             "(hugepaged's own: keep latency-critical CPUs free of in-kernel collapses)"),
    Spec("collapse_workers", 1, 1, 16,
         doc="threads that collapse different processes' windows at the same time"),
    Spec("kernel_khugepaged", "leave", choices=("leave", "quiet"),
         doc="quiet: turn the kernel's khugepaged scanning down while hugepaged runs"),
)}

NAMES = tuple(SPECS)
INHERITED = tuple(n for n, s in SPECS.items() if s.inherited)
TARGET_KEYS = tuple(n for n, s in SPECS.items() if s.per_target)
RULES = tuple(n for n, s in SPECS.items() if s.rule)

_KSTRTOUL = re.compile(r"\+?[0-9]+\n?")


def _quoted(text: str) -> str:
    """'text'; with control characters escaped (repr) so an error stays on one line."""
    return f"'{text}'" if text.isprintable() else repr(text)


def parse(name: str, text: str | int, geometry: Geometry | None = None) -> int | str:
    """Parse like the kernel's store(): kstrtoul base 10 or sysfs_streq of a word; ranges
    of the running kernel's geometry unless another is given."""
    spec = SPECS.get(name)
    if spec is None:
        raise InvalidTunable(f"unknown tunable {_quoted(name)} (known: {', '.join(SPECS)})")
    raw = str(text)
    if spec.parse is not None:
        try:
            return spec.parse(raw[:-1] if raw.endswith("\n") else raw)
        except ValueError as err:
            raise InvalidTunable(f"{name}: invalid value {_quoted(raw)} ({err})") from None
    if spec.choices:
        word = raw[:-1] if raw.endswith("\n") else raw
        if word not in spec.choices:
            raise InvalidTunable(f"{name}: invalid value {_quoted(word)} ({spec.describe()})")
        return word
    geometry = geometry or running_geometry()
    if not _KSTRTOUL.fullmatch(raw):
        raise InvalidTunable(f"{name}: invalid value {raw!r} ({spec.describe(geometry)})")
    value = int(raw)
    lo, hi = spec.bounds(geometry)
    if not lo <= value <= hi:
        raise InvalidTunable(f"{name}: invalid value '{value}' ({spec.describe(geometry)})")
    return value


def _with_values(self, values: dict[str, int | str],
                 geometry: Geometry | None = None) -> Tunables:
    """A copy with `values` parsed and checked; nothing changes if one is refused."""
    parsed = {k: parse(k, v, geometry) for k, v in values.items()}
    return type(self)(**{**asdict(self), **parsed})


def _as_dict(self) -> dict[str, int | str]:
    return asdict(self)


def _defaults(cls, geometry: Geometry) -> Tunables:
    """hugepaged's defaults for a kernel of this geometry."""
    return cls(**{n: s.default_for(geometry) for n, s in SPECS.items()})


# The effective settings of one hugepaged run: a field per SPECS row. Tunables() has the
# defaults of the fixtures' geometry (4 KiB pages); a run starts from Tunables.defaults() of
# the running kernel's (resolve).
Tunables = make_dataclass(
    "Tunables",
    [(n, type(s.default_for(DEFAULT_GEOMETRY)), field(default=s.default_for(DEFAULT_GEOMETRY)))
     for n, s in SPECS.items()],
    frozen=True,
    namespace={"with_values": _with_values, "as_dict": _as_dict,
               "defaults": classmethod(_defaults),
               "__doc__": "The effective settings of one hugepaged run (a field per SPECS "
                          "row)."},
)

Tunables.__module__ = __name__


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings from --set, checked for shape (values are checked by parse)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidTunable(f"--set expects KEY=VALUE, got {_quoted(item)}")
        parse(key, value)  # the key exactly as written: ' max_ptes_none' is no tunable
        out[key] = value
    return out


def resolve(kernel_values: dict[str, int | str], *layers: dict[str, int | str],
            geometry: Geometry | None = None) -> Tunables:
    """Defaults, then the kernel's current values of INHERITED, then each layer in order."""
    geometry = geometry or running_geometry()
    base = Tunables.defaults(geometry).with_values(
        {k: v for k, v in kernel_values.items() if k in INHERITED}, geometry)
    for layer in layers:
        base = base.with_values(layer, geometry)
    return base
