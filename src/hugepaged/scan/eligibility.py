"""Which VMAs are candidates at all, and what kind of memory each is.

The userspace half of thp_vma_allowable_order(): one function answers for every VMA, in the
kernel's order of checks, with a reason an operator can act on (results.Ineligible).
"""

from enum import StrEnum

from hugepaged.kernel.geometry import DEFAULT_GEOMETRY, Geometry
from hugepaged.kernel.procfs import Vma
from hugepaged.policy import CollapseControl
from hugepaged.results import Ineligible
from hugepaged.scan.shmem import ShmemModes, shmem_ineligible

# VmFlags of special mappings (VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND, hugetlb).
SPECIAL_FLAGS = frozenset({"io", "pf", "mm", "de", "ht"})
UFFD_FLAGS = frozenset({"um", "uw", "ui"})
_ANON_NAMES = ("", "[heap]", "[stack]")
# Names /proc/PID/maps gives shmem-backed mappings: MAP_SHARED|MAP_ANONYMOUS, memfd, SysV.
_SHMEM_PREFIXES = ("/dev/zero", "/memfd:", "/SYSV", "/dev/shm/", "[anon_shmem:")


class MemoryKind(StrEnum):
    """Which scanner decides a VMA's windows (khugepaged_scan_mm_slot's anon/file split)."""

    ANON = "anon"  # private anonymous: the PTE rules (hpage_collapse_scan_pmd)
    SHMEM = "shmem"  # shared memory: the file rules (hpage_collapse_scan_file)
    FILE = "file"  # a regular file's page cache
    SPECIAL = "special"  # never a candidate


def memory_kind(vma: Vma) -> MemoryKind:
    if vma.flags & SPECIAL_FLAGS:
        return MemoryKind.SPECIAL
    shared = "s" in vma.perms[3:]
    if not shared and vma.inode == 0 and (vma.path in _ANON_NAMES
                                          or vma.path.startswith("[anon:")):
        return MemoryKind.ANON
    if vma.path.startswith(_SHMEM_PREFIXES) or (shared and vma.inode == 0):
        return MemoryKind.SHMEM
    if vma.path.startswith("["):  # [vdso], [vvar], [vsyscall], [uprobes], ...
        return MemoryKind.SPECIAL
    return MemoryKind.FILE


def aligned_range(vma: Vma, geometry: Geometry = DEFAULT_GEOMETRY) -> tuple[int, int]:
    """[hstart, hend): the aligned huge-page windows wholly inside the VMA (may be empty)."""
    return geometry.aligned(vma.start, vma.end)


def ineligible(vma: Vma, control: CollapseControl, thp_disabled: bool,
               geometry: Geometry = DEFAULT_GEOMETRY,
               shmem: ShmemModes | None = None) -> Ineligible | None:
    """None if the VMA is a candidate under `control`, else the first reason it is not.
    `shmem`: the kernel's shmem controls (default: the policy's mode, per-size inherit)."""
    if thp_disabled:
        return Ineligible.THP_DISABLED_PRCTL
    kind = memory_kind(vma)
    if kind is MemoryKind.SPECIAL:
        return Ineligible.SPECIAL
    if "nh" in vma.flags:
        return Ineligible.VM_NOHUGEPAGE
    if kind is MemoryKind.FILE:
        return Ineligible.FILE_BACKED
    if kind is MemoryKind.SHMEM:
        return shmem_ineligible(vma, control, shmem or ShmemModes(control.shmem_enabled),
                                geometry)
    if control.is_khugepaged:  # MADV_COLLAPSE ignores the sysfs mode
        if control.enabled == "never":
            return Ineligible.ENABLED_NEVER
        if control.enabled == "madvise" and "hg" not in vma.flags:
            return Ineligible.NO_MADV_HUGEPAGE
    hstart, hend = aligned_range(vma, geometry)
    if hstart >= hend:
        return Ineligible.TOO_SMALL
    return None


def uffd_armed(vma: Vma) -> bool:
    return bool(vma.flags & UFFD_FLAGS)
