"""Shared memory by the kernel's file rules: eligibility and the per-range decision.

The per-range decision is hpage_collapse_scan_file's (mm/khugepaged.c): it walks the file's
page cache over the 512 offsets of a 2 MiB range, whether this process maps those pages or
not, and stops at the first entry that fails:

- a swap entry counts; more than max_ptes_swap -> EXCEED_SWAP_PTE (khugepaged only);
- a 2 MiB folio starting at the range -> PTE_MAPPED_HUGEPAGE (the collapse then only
  installs the PMD: collapse_pte_mapped_thp);
- a folio off the LRU -> PAGE_LRU (its reference count -> PAGE_COUNT: not visible here);
- any other folio counts as present, all its pages: a smaller large folio (shmem mTHP, say
  16 KiB ones) is collapsed with the rest. Since "mm: khugepaged: support shmem mTHP
  collapse" (6.12); older kernels said PAGE_COMPOUND there, but small shmem folios came only
  with the per-size shmem controls of 6.11, so that is the one kernel where the two differ;
- afterwards, khugepaged only: fewer than 512 - max_ptes_none present -> EXCEED_NONE_PTE.
There is no max_ptes_shared for files. MADV_COLLAPSE (is_khugepaged false) skips both
limits and collapse_file then answers TRUNCATED for a range with nothing in the cache.

Eligibility is thp_vma_allowable_order's for a shmem VMA: the alignment of the mapping to its
file offset (thp_vma_suitable_order), then shmem_allowable_huge_orders with
shmem_huge_global_enabled. Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, shown as
"/dev/zero (deleted)") and unlinked shmem files such as memfds get shmem_anon_vm_ops, and
their PMD order is governed by hugepages-2048kB/shmem_enabled, whose `inherit` follows the
global shmem_enabled; SysV segments and named tmpfs files take the global mode only, through
the huge= option of their mount (the kernel's internal mount mirrors the global knob).
`deny` and `force` are global-only and win over everything.

Only the 2 MiB (PMD) order is considered: that is what MADV_COLLAPSE makes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

from hugepaged.kernel.geometry import DEFAULT_GEOMETRY as _G
from hugepaged.kernel.kpageflags import (
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_LRU,
    KPF_THP,
)
from hugepaged.kernel.pagemap import PM_PFN_MASK, PM_PRESENT
from hugepaged.results import Ineligible
from hugepaged.results import ScanResult as R

if TYPE_CHECKING:
    from hugepaged.kernel.geometry import Geometry
    from hugepaged.kernel.procfs import Vma
    from hugepaged.policy import CollapseControl

_U = np.uint64


class ShmemKind(StrEnum):
    """Which of the kernel's shmem rules a shared-memory VMA falls under."""

    ANON = "anon"  # shmem_anon_vm_ops: MAP_SHARED|MAP_ANONYMOUS, memfd, unlinked files
    FILE = "file"  # SysV segments and named tmpfs files: the mount's huge= option


def shmem_kind(vma: Vma) -> ShmemKind:
    """Which rules: shmem_mmap gives an inode unlinked at the time of mmap shmem_anon_vm_ops
    (memfd, MAP_SHARED|MAP_ANONYMOUS, an unlinked tmpfs file), a linked one shmem_vm_ops;
    SysV wraps its own (shm_vm_ops). On the kernel's internal mount every file is unlinked,
    and a SysV segment is told by the name the kernel gives it there ("/SYSV%08x": no user
    names a file on that mount; memfd names are "memfd:" + the user's). On a tmpfs mount the
    inode's link count says (Vma.nlink, read now: a file unlinked after its mmap keeps
    shmem_vm_ops, which is not to be seen from userspace); where unknown, a linked file."""
    if vma.fs == "shmem":
        return ShmemKind.FILE if vma.path.startswith("/SYSV") else ShmemKind.ANON
    return ShmemKind.ANON if vma.nlink == 0 else ShmemKind.FILE


def misaligned(start: int, offset: int, pmd_size: int) -> bool:
    """thp_vma_suitable_order: (vm_start >> PAGE_SHIFT) - vm_pgoff must be a multiple of
    HPAGE_PMD_NR, or no PMD-aligned address maps a PMD-aligned range of the file. `offset` is
    the VMA's file offset in bytes (smaps shows it)."""
    return (start - offset) % pmd_size != 0


def within_size(offset: int, i_size: int, pmd_size: int) -> bool:
    """shmem_get_orders_within_size for the PMD order at the VMA's first offset (bytes)."""
    return i_size >= (offset // pmd_size + 1) * pmd_size


@dataclass(frozen=True)
class ShmemModes:
    """The shmem controls one decision uses: the global shmem_enabled, the per-size
    hugepages-2048kB/shmem_enabled, and (file rules) the mount's huge= option, None for the
    kernel's internal mount, which follows the global knob."""

    shmem_enabled: str = "never"
    size_enabled: str = "inherit"
    mount_huge: str | None = None


def _global_allows(modes: ShmemModes, kind: ShmemKind, hugepage: bool, force: bool,
                   fits: bool) -> bool:
    """shmem_huge_global_enabled for the PMD order."""
    if modes.shmem_enabled == "deny":
        return False
    if force or modes.shmem_enabled == "force":
        return True
    huge = modes.shmem_enabled if kind is ShmemKind.ANON or modes.mount_huge is None \
        else modes.mount_huge
    if huge == "always":
        return True
    if huge == "within_size" and fits:
        return True
    return huge in ("within_size", "advise") and hugepage


def pmd_allowed(modes: ShmemModes, kind: ShmemKind, *, hugepage: bool, force: bool,
                fits: bool = True) -> bool:
    """shmem_allowable_huge_orders has the PMD order. `force` is MADV_COLLAPSE's
    shmem_huge_force (sysfs not enforced); `hugepage` is VM_HUGEPAGE; `fits`: within_size."""
    global_ok = _global_allows(modes, kind, hugepage, force, fits)
    if kind is ShmemKind.FILE:
        return global_ok
    if modes.shmem_enabled == "deny":
        return False
    size = modes.size_enabled
    if modes.shmem_enabled == "force":
        return size == "inherit"
    return (size == "always" or (size == "within_size" and fits)
            or (size == "advise" and hugepage) or (size == "inherit" and global_ok))


def refusal(modes: ShmemModes, kind: ShmemKind, *, hugepage: bool, force: bool,
            fits: bool = True) -> str | None:
    """None if the PMD order is allowed, else "never" or "advise" (VM_HUGEPAGE missing):
    which of the kernel's modes said no."""
    if pmd_allowed(modes, kind, hugepage=hugepage, force=force, fits=fits):
        return None
    if pmd_allowed(modes, kind, hugepage=True, force=force, fits=fits):
        return "advise"
    return "never"


_REFUSED = {"never": Ineligible.SHMEM_NEVER, "advise": Ineligible.SHMEM_NO_MADV_HUGEPAGE}


def shmem_ineligible(vma: Vma, control: CollapseControl, kernel: ShmemModes,
                     geometry: Geometry) -> Ineligible | None:
    """The shared-memory half of thp_vma_allowable_order, in the kernel's order.

    Size and alignment first (thp_vma_suitable_order, which refuses both alike; a VMA smaller
    than a huge page is TOO_SMALL before it is MISALIGNED); then the kernel's own controls with
    shmem_huge_force, as MADV_COLLAPSE meets them: where they refuse even so (deny, a per-size
    never), no collapse can succeed whatever hugepaged's policy says; then, with khugepaged's
    semantics, hugepaged's shmem_enabled in place of the kernel's global one. The i_size of
    within_size is taken as the end of the mapping (a shared mapping past i_size faults
    SIGBUS, so a mapped range lies within it).
    """
    # Smaller than one huge page: no alignment could make it fit (and MISALIGNED's advice,
    # start the application again with shmem huge pages on, would not help).
    if vma.size < geometry.pmd_size:
        return Ineligible.TOO_SMALL
    if misaligned(vma.start, vma.offset, geometry.pmd_size):
        return Ineligible.MISALIGNED
    hstart, hend = geometry.aligned(vma.start, vma.end)
    if hstart >= hend:
        return Ineligible.TOO_SMALL
    kind = shmem_kind(vma)
    fits = within_size(vma.offset, vma.offset + vma.size, geometry.pmd_size)
    hugepage = "hg" in vma.flags
    if refusal(kernel, kind, hugepage=hugepage, force=True, fits=fits):
        return Ineligible.SHMEM_DENIED
    if control.is_khugepaged:
        policy = replace(kernel, shmem_enabled=control.shmem_enabled)
        why = refusal(policy, kind, hugepage=hugepage, force=False, fits=fits)
        if why:
            return _REFUSED[why]
    return None


# ---------------------------------------------------------------------------------------------
# The per-range decision


@dataclass(frozen=True)
class FileLimits:
    """The limits hpage_collapse_scan_file applies; `khugepaged=False` is MADV_COLLAPSE."""

    max_ptes_none: int = _G.max_ptes_none
    max_ptes_swap: int = _G.max_ptes_swap
    khugepaged: bool = True
    nr: int = _G.pmd_nr  # HPAGE_PMD_NR: pages per range


@dataclass
class Folios:
    """What this process's own mappings tell about the folios of each range.

    pmd_mapped: it maps the range with a PMD. huge: the range is one 2 MiB folio starting at
    the range (as far as the mapped pages show). compound: a mapped page of another large
    folio (no verdict of its own: see the module docstring). off_lru: a mapped page not on an
    LRU list. All bool per range.
    """

    pmd_mapped: np.ndarray
    huge: np.ndarray
    compound: np.ndarray
    off_lru: np.ndarray

    @classmethod
    def none(cls, n: int) -> Folios:
        z = np.zeros(n, dtype=bool)
        return cls(z, z.copy(), z.copy(), z.copy())


def decide_file(present: np.ndarray, swap: np.ndarray, folios: Folios,
                limits: FileLimits) -> np.ndarray:
    """int8 ScanResult per range, from page-cache counts (swap -1: unknown) and folio facts.

    The kernel's walk meets a 2 MiB folio at the range's first offset before anything else;
    where counts alone cannot order a swap entry against another large folio or a page off
    the LRU, the swap limit is taken first.
    """
    n = present.shape[0]
    codes = np.full(n, int(R.SUCCEED), dtype=np.int8)
    empty = (present == 0) & (swap <= 0)
    if not limits.khugepaged:
        codes[empty] = int(R.TRUNCATED)
    else:
        codes[present < limits.nr - limits.max_ptes_none] = int(R.EXCEED_NONE_PTE)
    codes[folios.off_lru] = int(R.PAGE_LRU)
    if limits.khugepaged:
        codes[swap > limits.max_ptes_swap] = int(R.EXCEED_SWAP_PTE)
    codes[folios.huge] = int(R.PTE_MAPPED_HUGEPAGE)
    codes[folios.pmd_mapped] = int(R.PMD_MAPPED)
    return codes


def folio_facts(pagemap: np.ndarray, kflags: np.ndarray, head_flags: np.ndarray,
                tail_flags: np.ndarray, next_flags: np.ndarray,
                pmd_mapped: np.ndarray) -> Folios:
    """Folios from this process's (n, 512) pagemap entries and their frames' kpageflags.

    head/tail/next_flags are the flags of head_candidates()'s frames: a range is one 2 MiB
    folio when that head is a THP head, its 511th frame a tail and the frame after it not.
    """
    mapped = (pagemap & _U(PM_PRESENT)) != 0
    compound = mapped & ((kflags & _U(KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL)) != 0)
    huge = one_folio(pagemap, head_flags, tail_flags, next_flags) & compound.any(axis=1)
    off_lru = (mapped & ((kflags & _U(KPF_LRU)) == 0)).any(axis=1)
    return Folios(pmd_mapped=pmd_mapped.copy(), huge=huge & ~pmd_mapped,
                  compound=compound.any(axis=1) & ~huge & ~pmd_mapped,
                  off_lru=off_lru & ~huge & ~pmd_mapped)


def one_folio(pagemap: np.ndarray, head_flags: np.ndarray, tail_flags: np.ndarray,
              next_flags: np.ndarray) -> np.ndarray:
    """Per range: every mapped page lies in one 2 MiB THP folio starting at the range."""
    mapped = (pagemap & _U(PM_PRESENT)) != 0
    return ((head_flags & _U(KPF_COMPOUND_HEAD)) != 0) & ((head_flags & _U(KPF_THP)) != 0) \
        & ((tail_flags & _U(KPF_COMPOUND_TAIL)) != 0) \
        & ((next_flags & _U(KPF_COMPOUND_TAIL)) == 0) & _consistent(pagemap, mapped)


def head_candidates(pagemap: np.ndarray) -> np.ndarray:
    """Per range, the frame that would be the head of one 2 MiB folio holding every mapped
    page at its offset: first mapped page's frame minus its index (0: no page mapped)."""
    mapped = (pagemap & _U(PM_PRESENT)) != 0
    first = mapped.argmax(axis=1)
    rows = np.arange(pagemap.shape[0])
    pfn = (pagemap[rows, first] & _U(PM_PFN_MASK)).astype(np.int64) - first
    ok = mapped.any(axis=1) & (pfn > 0) & (pfn % pagemap.shape[1] == 0)
    return np.where(ok, pfn, 0)


def _consistent(pagemap: np.ndarray, mapped: np.ndarray) -> np.ndarray:
    """Every mapped page's frame is the head candidate plus its index."""
    head = head_candidates(pagemap)
    pfn = (pagemap & _U(PM_PFN_MASK)).astype(np.int64)
    want = head[:, None] + np.arange(pagemap.shape[1], dtype=np.int64)
    return (head > 0) & ((pfn == want) | ~mapped).all(axis=1)
