"""Tunables with the kernel's names, ranges and refusals (mm/khugepaged.c sysfs stores)."""

import re
from dataclasses import asdict, dataclass, fields

from hugepaged.errors import InvalidTunable
from hugepaged.kernel.geometry import DEFAULT_GEOMETRY

UINT_MAX = 2**32 - 1
# The kernel refuses max_ptes_* above HPAGE_PMD_NR - 1.
HPAGE_PMD_NR = DEFAULT_GEOMETRY.pmd_nr
SHMEM_MODES = ("always", "within_size", "advise", "never", "deny", "force")


@dataclass(frozen=True)
class Spec:
    """How one tunable is parsed and checked; `kernel` says whether sysfs has it too."""

    name: str
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()
    kernel: bool = True
    doc: str = ""

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return f"an integer {self.lo}..{self.hi}"


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("enabled", choices=("always", "madvise", "never"),
         doc="which VMAs are candidates: all, MADV_HUGEPAGE only, none"),
    Spec("shmem_enabled", choices=SHMEM_MODES,
         doc="which shared-memory mappings are candidates (the kernel's shmem_enabled)"),
    Spec("defrag", 0, 1, doc="khugepaged's defrag, hugepaged's meaning: 1: collapse even "
                             "when no free 2 MiB block exists (the kernel compacts); 0: only "
                             "while one exists"),
    Spec("max_ptes_none", 0, HPAGE_PMD_NR - 1,
         doc="empty or zero-page PTEs a window may have and still collapse"),
    Spec("max_ptes_swap", 0, HPAGE_PMD_NR - 1,
         doc="swapped-out PTEs a window may have (they are swapped in)"),
    Spec("max_ptes_shared", 0, HPAGE_PMD_NR - 1,
         doc="pages mapped by more than one process a window may have"),
    Spec("pages_to_scan", 1, UINT_MAX,
         doc="progress budget of one pass: 512 per window examined, 1 per VMA skipped"),
    Spec("scan_sleep_millisecs", 0, UINT_MAX, doc="sleep between passes"),
    Spec("alloc_sleep_millisecs", 0, UINT_MAX,
         doc="back-off after a huge page allocation failed"),
    Spec("max_cpu_percent", 0, 100, kernel=False,
         doc="cap on all CPU the daemon spends (collapses, its workers, scanning, "
             "registration), percent of one core over any interval, give or take one batch; "
             "0: no cap"),
    Spec("collapse_workers", 1, 16, kernel=False,
         doc="threads that collapse different processes' windows at the same time"),
    Spec("kernel_khugepaged", choices=("leave", "quiet"), kernel=False,
         doc="quiet: turn the kernel's khugepaged scanning down while hugepaged runs"),
)}

_KSTRTOUL = re.compile(r"\+?[0-9]+\n?")


def _quoted(text: str) -> str:
    """'text'; with control characters escaped (repr) so an error stays on one line."""
    return f"'{text}'" if text.isprintable() else repr(text)


def parse(name: str, text: str | int) -> int | str:
    """Parse like the kernel's store(): kstrtoul base 10 or sysfs_streq of a word."""
    spec = SPECS.get(name)
    if spec is None:
        raise InvalidTunable(f"unknown tunable {_quoted(name)} (known: {', '.join(SPECS)})")
    raw = str(text)
    if spec.choices:
        word = raw[:-1] if raw.endswith("\n") else raw
        if word not in spec.choices:
            raise InvalidTunable(f"{name}: invalid value {_quoted(word)} ({spec.describe()})")
        return word
    if not _KSTRTOUL.fullmatch(raw):
        raise InvalidTunable(f"{name}: invalid value {raw!r} ({spec.describe()})")
    value = int(raw)
    if not spec.lo <= value <= spec.hi:  # type: ignore[operator]
        raise InvalidTunable(f"{name}: invalid value '{value}' ({spec.describe()})")
    return value


@dataclass(frozen=True)
class Tunables:
    """The effective settings of one hugepaged run."""

    enabled: str = "madvise"
    shmem_enabled: str = "never"
    defrag: int = 1
    max_ptes_none: int = 511
    max_ptes_swap: int = 64
    max_ptes_shared: int = 256
    # hugepaged's defaults: 32 MiB per 100 ms, 200x the kernel's 16 MiB per 10 s.
    pages_to_scan: int = 16384
    scan_sleep_millisecs: int = 100
    alloc_sleep_millisecs: int = 60000
    max_cpu_percent: int = 5
    collapse_workers: int = 1
    kernel_khugepaged: str = "leave"

    def with_values(self, values: dict[str, int | str]) -> "Tunables":
        """A copy with `values` parsed and checked; nothing changes if one is refused."""
        parsed = {k: parse(k, v) for k, v in values.items()}
        return Tunables(**{**asdict(self), **parsed})

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


# Inherited from the kernel unless set, so an admin's tuning carries over.
INHERITED = ("enabled", "shmem_enabled", "defrag", "max_ptes_none", "max_ptes_swap",
             "max_ptes_shared", "alloc_sleep_millisecs")


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


def resolve(kernel_values: dict[str, int | str], *layers: dict[str, int | str]) -> Tunables:
    """Defaults, then the kernel's current values of INHERITED, then each layer in order."""
    base = Tunables().with_values({k: v for k, v in kernel_values.items() if k in INHERITED})
    for layer in layers:
        base = base.with_values(layer)
    return base


NAMES = tuple(f.name for f in fields(Tunables))
