"""THP settings under /sys/kernel/mm/transparent_hugepage, and /proc/buddyinfo."""

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hugepaged.errors import Unsupported
from hugepaged.kernel.errors import process_errors
from hugepaged.kernel.geometry import DEFAULT_GEOMETRY, running_geometry

THP_DIR = "kernel/mm/transparent_hugepage"
ANON_MODES = ("always", "madvise", "never")


def combined_enabled(global_mode: str, pmd_mode: str | None) -> str:
    """The anonymous PMD-size mode khugepaged obeys, from the global and per-size `enabled`.

    As thp_vma_allowable_orders and hugepage_pmd_enabled combine them: the PMD order is in
    huge_anon_orders_always (every VMA), _madvise (VM_HUGEPAGE VMAs, whatever the global
    mode says) or _inherit (the global mode decides); `never` in neither. A kernel without
    per-size files (before 6.8) has the global mode alone (`pmd_mode` None).
    """
    if pmd_mode is None or pmd_mode == "inherit":
        return global_mode
    return pmd_mode
MODES = ("enabled", "shmem_enabled")  # files that show their choices with one [selected]


def _bracketed(text: str) -> str:
    m = re.search(r"\[(\w[\w+]*)\]", text)
    return m.group(1) if m else text.strip()


class ThpSysfs:
    """The kernel's THP and khugepaged knobs; paths relative to a sysfs root."""

    def __init__(self, sys_root: str = "/sys") -> None:
        self.sys_root = sys_root
        self.dir = f"{sys_root}/{THP_DIR}"
        self._files: dict[str, bool] | None = None

    def khugepaged_files(self) -> dict[str, bool]:
        """The khugepaged directory as the kernel has it: name -> writable (a knob; the
        read-only files are its counters, pages_collapsed and full_scans)."""
        if self._files is None:
            sub = f"{self.dir}/khugepaged"
            try:
                names = sorted(os.listdir(sub))
            except FileNotFoundError:
                names = []
            self._files = {n: bool(os.stat(f"{sub}/{n}").st_mode & 0o200) for n in names}
        return self._files

    def knobs(self) -> tuple[str, ...]:
        return tuple(n for n, w in self.khugepaged_files().items() if w)

    def available(self) -> bool:
        return os.path.isdir(self.dir)

    def require(self) -> None:
        if not self.available():
            raise Unsupported(f"{self.dir} is missing: this kernel has no transparent huge pages")

    def _path(self, name: str) -> str:
        sub = "khugepaged/" if name in self.khugepaged_files() else ""
        return f"{self.dir}/{sub}{name}"

    def read_raw(self, name: str) -> str:
        with process_errors(None, self._path(name)), open(self._path(name)) as f:
            return f.read().strip()

    def read(self, name: str) -> str | int:
        """`enabled`/`shmem_enabled` as the selected word, khugepaged knobs as ints."""
        raw = self.read_raw(name)
        if name in MODES:
            return _bracketed(raw)
        return int(raw)

    def enabled(self) -> str:
        return str(self.read("enabled"))

    def pmd_size_dir(self) -> str:
        """`hugepages-2048kB` (for the PMD size of this machine): its per-size knobs."""
        return f"hugepages-{running_geometry(self.sys_root).pmd_size >> 10}kB"

    def pmd_enabled(self) -> str | None:
        """The per-size `enabled` of the PMD size (always, inherit, madvise, never); None
        on a kernel without per-size controls."""
        path = f"{self.dir}/{self.pmd_size_dir()}/enabled"
        try:
            with open(path) as f:
                return _bracketed(f.read())
        except FileNotFoundError:
            return None

    def effective_enabled(self) -> str:
        """What khugepaged obeys for anonymous PMD-size pages: global and per-size combined."""
        return combined_enabled(self.enabled(), self.pmd_enabled())

    def page_fault_defrag(self) -> str:
        """The top-level `defrag` (always, defer, defer+madvise, madvise, never): how a page
        fault allocates; not khugepaged's `defrag`, which is a 0/1 knob of its own."""
        with process_errors(None, f"{self.dir}/defrag"), open(f"{self.dir}/defrag") as f:
            return _bracketed(f.read())

    def shmem_enabled_pmd(self) -> str:
        """hugepages-<PMD size>kB/shmem_enabled, the per-size shmem mode (6.11+); `inherit`
        (follow the global shmem_enabled) on kernels without per-size controls."""
        path = f"{self.dir}/{self.pmd_size_dir()}/shmem_enabled"
        try:
            with open(path) as f:
                return _bracketed(f.read())
        except FileNotFoundError:
            return "inherit"

    def mthp_sizes(self) -> dict[int, str]:
        """Anonymous folio sizes below the PMD size (kB) and their `enabled` mode."""
        pmd_kb = running_geometry(self.sys_root).pmd_size >> 10
        out: dict[int, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                m = re.fullmatch(r"hugepages-(\d+)kB", name)
                if m is None or int(m.group(1)) >= pmd_kb:
                    continue
                with contextlib.suppress(OSError), open(f"{self.dir}/{name}/enabled") as f:
                    out[int(m.group(1))] = _bracketed(f.read())
        return dict(sorted(out.items()))

    def khugepaged_collapses_mthp(self) -> bool:
        """Whether the kernel's khugepaged collapses to folio sizes below the PMD (Linux
        7.2's mTHP collapse), probed, not read from a version: those kernels count per size
        what stops such a collapse (stats/collapse_exceed_none_pte)."""
        pmd_kb = running_geometry(self.sys_root).pmd_size >> 10
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                m = re.fullmatch(r"hugepages-(\d+)kB", name)
                if m and int(m.group(1)) < pmd_kb and \
                        os.path.exists(f"{self.dir}/{name}/stats/collapse_exceed_none_pte"):
                    return True
        return False

    def nr_anon(self) -> dict[int, int]:
        """Anonymous THP folios on the machine per folio kB, the kernel's own count
        (hugepages-<size>kB/stats/nr_anon, 6.11+); empty where the kernel has none."""
        out: dict[int, int] = {}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                m = re.fullmatch(r"hugepages-(\d+)kB", name)
                if m is None:
                    continue
                with contextlib.suppress(FileNotFoundError), \
                        open(f"{self.dir}/{name}/stats/nr_anon") as f:
                    out[int(m.group(1))] = int(f.read())
        return out

    def shrink_underused(self) -> bool | None:
        """Whether the kernel's underused-THP shrinker (6.12) splits THPs holding more
        zero-filled pages than khugepaged's max_ptes_none; None where it has none."""
        try:
            return self.read_raw("shrink_underused") == "1"
        except OSError:
            return None

    def khugepaged(self) -> dict[str, int]:
        return {n: int(self.read_raw(n)) for n in self.khugepaged_files()}

    def current(self) -> dict[str, int | str]:
        """The kernel's current values of everything it shares with hugepaged's tunables."""
        values: dict[str, int | str] = {"enabled": self.effective_enabled()}
        with contextlib.suppress(OSError):  # absent without CONFIG_SHMEM
            values["shmem_enabled"] = str(self.read("shmem_enabled"))
        knobs = self.knobs()
        values.update({k: v for k, v in self.khugepaged().items() if k in knobs})
        return values

    def write(self, name: str, value: str | int) -> None:
        with process_errors(None, self._path(name)), open(self._path(name), "w") as f:
            f.write(f"{value}\n")

    def snapshot(self, names: tuple[str, ...] | None = None) -> dict:
        """The knobs' values (default: `enabled` and every khugepaged knob)."""
        return {n: self.read(n) for n in (names or ("enabled", *self.knobs()))}

    def restore(self, saved: dict) -> None:
        # enabled last: going back to madvise/always restarts the kernel thread with the
        # knobs already in place.
        for name in sorted(saved, key=lambda n: n == "enabled"):
            if self.read(name) != saved[name]:
                self.write(name, saved[name])

    @contextmanager
    def changed(self, **values: str | int) -> Iterator[dict]:
        """Set knobs for a block and put every one back afterwards, also on error."""
        saved = self.snapshot(tuple(values) + (() if "enabled" in values else ("enabled",)))
        try:
            for name, value in values.items():
                self.write(name, value)
            yield saved
        finally:
            self.restore(saved)


def free_huge_blocks(text: str, order: int = DEFAULT_GEOMETRY.pmd_order) -> int:
    """Free blocks of `order` or larger in /proc/buddyinfo text, counted in order-`order` units.

    ZONE_DMA is left out: its lowmem reserve keeps user pages, huge pages among them, out.
    """
    total = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "DMA":
            continue
        counts = fields[4:]
        for o, c in enumerate(counts):
            if o >= order:
                total += int(c) << (o - order)
    return total


class MmStats:
    """/proc/buddyinfo and /proc/zoneinfo, counted in blocks of the PMD order."""

    def __init__(self, proc_root: str = "/proc",
                 order: Callable[[], int] = lambda: DEFAULT_GEOMETRY.pmd_order) -> None:
        self.proc_root, self._order = proc_root, order

    def _read(self, name: str) -> str:
        with open(f"{self.proc_root}/{name}") as f:
            return f.read()

    def vmstat(self, prefix: str = "thp_") -> dict[str, int]:
        """The /proc/vmstat counters whose names start with `prefix`."""
        out = {}
        for line in self._read("vmstat").splitlines():
            name, _, value = line.partition(" ")
            if name.startswith(prefix):
                out[name] = int(value)
        return out

    def numa_nodes(self) -> set[int]:
        """Nodes with memory (zoneinfo); {0} where there is no zoneinfo."""
        from hugepaged.kernel.zones import Zones

        try:
            return Zones(self.proc_root).nodes() or {0}
        except FileNotFoundError:
            return {0}

    def window_nodes(self, pagemap_entries) -> set[int]:
        """hpage_collapse_find_target_node: the node(s) holding most of a window's present
        pages (its pagemap entries), where a collapse allocates its huge page."""
        import numpy as np

        from hugepaged.kernel.pagemap import PM_PFN_MASK, PM_PRESENT
        from hugepaged.kernel.zones import Zones, target_nodes

        e = np.asarray(pagemap_entries, dtype=np.uint64)
        pfns = e[(e & np.uint64(PM_PRESENT)) != 0] & np.uint64(PM_PFN_MASK)
        return target_nodes(Zones(self.proc_root).zones(), pfns)

    def free_huge_blocks(self, nodes: set[int] | None = None) -> int:
        """Free huge-page blocks an allocation could take (on `nodes`, None: any): per zone
        above its min watermark (kernel/zones.py); without /proc/zoneinfo, buddyinfo alone.
        Where buddyinfo shows no such block at all, the answer is 0 without reading zoneinfo
        (ten times longer): a back-off polls this while memory stays fragmented."""
        from hugepaged.kernel.zones import Zones

        if free_huge_blocks(self._read("buddyinfo"), self._order()) == 0:
            return 0
        try:
            return Zones(self.proc_root).usable_huge_blocks(nodes, self._order())
        except FileNotFoundError:
            return free_huge_blocks(self._read("buddyinfo"), self._order())
