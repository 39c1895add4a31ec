"""Which VMAs are candidates at all, and what kind of memory each is.

The userspace half of thp_vma_allowable_order(): one function answers for every VMA, in the
kernel's order of checks, with a reason an operator can act on (results.Ineligible).
"""

import os
from dataclasses import dataclass
from enum import StrEnum

from hugepaged.kernel.geometry import DEFAULT_GEOMETRY, Geometry
from hugepaged.kernel.procfs import PR_THP_DISABLE_EXCEPT_ADVISED, Vma
from hugepaged.policy import CollapseControl
from hugepaged.results import Ineligible
from hugepaged.scan.shmem import ShmemModes, shmem_ineligible

# VmFlags of special mappings (VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND, hugetlb).
SPECIAL_FLAGS = frozenset({"io", "pf", "mm", "de", "ht"})
UFFD_FLAGS = frozenset({"um", "uw", "ui"})
_ANON_NAMES = ("", "[heap]", "[stack]")
# The mem driver's /dev/zero (drivers/char/mem.c): a private mapping of it is anonymous
# memory (mmap_zero makes the VMA anonymous), a shared one becomes shmem (shmem_zero_setup).
DEV_ZERO = os.makedev(1, 5)
SHMEM_FILESYSTEMS = frozenset({"shmem", "tmpfs"})


class MemoryKind(StrEnum):
    """Which scanner decides a VMA's windows (khugepaged_scan_mm_slot's anon/file split)."""

    ANON = "anon"  # private anonymous: the PTE rules (hpage_collapse_scan_pmd)
    SHMEM = "shmem"  # shared memory: the file rules (hpage_collapse_scan_file)
    FILE = "file"  # a regular file's page cache
    SPECIAL = "special"  # never a candidate


@dataclass(frozen=True)
class KindFacts:
    """What smaps says of a collapsible kind's VMA, read one way by scan, survey and usage:
    private anonymous memory counts its `Anonymous` pages, shared memory its `Rss` (the
    pages are the file's: one range may be mapped by many processes, and the kernel's
    shmem controls decide it)."""

    kind: MemoryKind
    shared: bool

    def resident_kb(self, vma: Vma) -> int:
        """kB of the VMA a collapse would make huge (or has)."""
        return vma.rss_kb if self.shared else vma.anonymous_kb

    def huge_kb(self, vma: Vma) -> int:
        """kB of it already PMD-mapped."""
        return vma.shmem_pmd_kb if self.shared else vma.anon_huge_kb


# The kinds hugepaged collapses; every other kind is only reported.
COLLAPSIBLE = {MemoryKind.ANON: KindFacts(MemoryKind.ANON, shared=False),
               MemoryKind.SHMEM: KindFacts(MemoryKind.SHMEM, shared=True)}


def collapsible(vma: Vma) -> KindFacts | None:
    """The facts of the VMA's kind if hugepaged collapses that kind, else None."""
    return COLLAPSIBLE.get(memory_kind(vma))


def has_file(vma: Vma) -> bool:
    """smaps prints device 0:0 and inode 0 for a VMA without a file, and only then."""
    return vma.dev != 0 or vma.inode != 0


def memory_kind(vma: Vma) -> MemoryKind:
    """What the kernel says backs the VMA (Vma.fs, kernel/mounts.py), never its path: shared
    memory is a file of the kernel's internal shmem mount or of any tmpfs mount; a private
    mapping of /dev/zero (the device 1:5, wherever its node is) is anonymous memory. The
    names in brackets are the kernel's own, given only to VMAs without a file."""
    if vma.flags & SPECIAL_FLAGS:
        return MemoryKind.SPECIAL
    private = "s" not in vma.perms[3:]
    if not has_file(vma):
        if private and (vma.path in _ANON_NAMES or vma.path.startswith("[anon:")):
            return MemoryKind.ANON
        return MemoryKind.SPECIAL  # [vdso], [vvar], [vsyscall], [uprobes], ...
    if vma.rdev:  # a device node: /dev/zero's private mappings are anonymous memory
        return MemoryKind.ANON if private and vma.rdev == DEV_ZERO else MemoryKind.FILE
    if vma.fs in SHMEM_FILESYSTEMS:
        return MemoryKind.SHMEM
    return MemoryKind.FILE


def aligned_range(vma: Vma, geometry: Geometry = DEFAULT_GEOMETRY) -> tuple[int, int]:
    """[hstart, hend): the aligned huge-page windows wholly inside the VMA (may be empty)."""
    return geometry.aligned(vma.start, vma.end)


def ineligible(vma: Vma, control: CollapseControl, thp_disabled: int,
               geometry: Geometry = DEFAULT_GEOMETRY,
               shmem: ShmemModes | None = None) -> Ineligible | None:
    """None if the VMA is a candidate under `control`, else the first reason it is not.

    `thp_disabled`: the process's PR_SET_THP_DISABLE as PR_GET_THP_DISABLE would answer it
    (0; 1 or True: no THP at all, not even MADV_COLLAPSE; 3: THP only in its MADV_HUGEPAGE
    VMAs, which MADV_COLLAPSE ignores as a forced collapse, and which wins over a target as
    MADV_NOHUGEPAGE does: vma_thp_disabled). `shmem`: the kernel's shmem controls (default:
    the policy's mode, per-size inherit)."""
    except_advised = bool(thp_disabled & PR_THP_DISABLE_EXCEPT_ADVISED)
    if thp_disabled and not except_advised:
        return Ineligible.THP_DISABLED_PRCTL
    kind = memory_kind(vma)
    if kind is MemoryKind.SPECIAL:
        return Ineligible.SPECIAL
    if "nh" in vma.flags:
        return Ineligible.VM_NOHUGEPAGE
    if kind is MemoryKind.FILE:
        return Ineligible.FILE_BACKED
    if except_advised and control.is_khugepaged and "hg" not in vma.flags:
        return Ineligible.THP_EXCEPT_ADVISED_PRCTL
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
