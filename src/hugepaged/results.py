"""Result codes with the kernel's names and numbers (enum scan_result, 6.18 tracepoint order),
plus hugepaged's own, numbered from 100 so they can never be mistaken for the kernel's."""

from enum import IntEnum, StrEnum


class ScanResult(IntEnum):
    """One per window, so a hugepaged log line and a mm_khugepaged_scan_pmd trace line compare."""

    FAIL = 0
    SUCCEED = 1
    PMD_NULL = 2
    PMD_NONE = 3
    PMD_MAPPED = 4
    EXCEED_NONE_PTE = 5
    EXCEED_SWAP_PTE = 6
    EXCEED_SHARED_PTE = 7
    PTE_NON_PRESENT = 8
    PTE_UFFD_WP = 9
    PTE_MAPPED_HUGEPAGE = 10
    LACK_REFERENCED_PAGE = 11
    PAGE_NULL = 12
    SCAN_ABORT = 13
    PAGE_COUNT = 14
    PAGE_LRU = 15
    PAGE_LOCK = 16
    PAGE_ANON = 17
    PAGE_COMPOUND = 18
    ANY_PROCESS = 19
    VMA_NULL = 20
    VMA_CHECK = 21
    ADDRESS_RANGE = 22
    DEL_PAGE_LRU = 23
    ALLOC_HUGE_PAGE_FAIL = 24
    CGROUP_CHARGE_FAIL = 25
    TRUNCATED = 26
    PAGE_HAS_PRIVATE = 27
    STORE_FAILED = 28
    COPY_MC = 29
    PAGE_FILLED = 30
    # hugepaged's own, not the kernel's (numbered outside the kernel's enum): a collapsible
    # window that would take its target past max_bloat_mb by filling empty or zero-page PTEs.
    EXCEED_BLOAT_BUDGET = 100
    # hugepaged's own too: a collapse failed with this errno and a re-decision of the window
    # could not narrow it to one of the kernel results the errno stands for
    # (madvise_collapse_errno: EINVAL is the default for most results, EBUSY is a cgroup
    # charge failure or EXCEED_NONE_PTE, EAGAIN a page that is locked, off the LRU or pinned).
    COLLAPSE_EINVAL = 101
    COLLAPSE_EBUSY = 102
    COLLAPSE_EAGAIN = 103
    COLLAPSE_ERRNO = 104  # an errno MADV_COLLAPSE is not documented to give
    # hugepaged's own: a window hugepaged collapsed and found split again (an allocator's
    # purge, the kernel's reclaim), held back for a while that doubles at every new split;
    # or (on_split = "leave") for good.
    SPLIT_BACKOFF = 105
    # hugepaged's own: a window it collapsed that the kernel's underused-THP shrinker split
    # (it holds more zero-filled pages than the kernel's max_ptes_none), held until that
    # share falls: collapsing it again would only have the kernel split it again.
    UNDERUSED_SPLIT = 106


# Windows the kernel would not even try: nothing to do, not a failure (TRUNCATED: a file
# range with nothing in its page cache).
NOTHING_TO_DO = frozenset({ScanResult.PMD_NULL, ScanResult.PMD_NONE, ScanResult.PMD_MAPPED,
                           ScanResult.TRUNCATED})
# Windows a pass collapses: PTE_MAPPED_HUGEPAGE is a file range that is one huge page in
# the page cache already, mapped by PTEs here or not at all; the collapse only installs the
# PMD (collapse_pte_mapped_thp).
COLLAPSIBLE = frozenset({ScanResult.SUCCEED, ScanResult.PTE_MAPPED_HUGEPAGE})


def collapsible(counts) -> int:
    """Windows a pass would collapse, from a Counter of results."""
    return sum(counts[r] for r in COLLAPSIBLE)


class Ineligible(StrEnum):
    """hugepaged's own names (not the kernel's) for memory that is in no candidate window.

    The kernel says nothing about memory thp_vma_allowable_order() turns away; an operator
    asking "why did nothing happen?" needs the reason and its size. One per VMA, the first
    that applies in the kernel's order of checks.
    """

    THP_DISABLED_PRCTL = "THP_DISABLED_PRCTL"  # the process set PR_SET_THP_DISABLE
    # ... with PR_THP_DISABLE_EXCEPT_ADVISED (6.18): THP only where it gave MADV_HUGEPAGE
    THP_EXCEPT_ADVISED_PRCTL = "THP_EXCEPT_ADVISED_PRCTL"
    SPECIAL = "SPECIAL"  # VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND, hugetlb
    VM_NOHUGEPAGE = "VM_NOHUGEPAGE"  # MADV_NOHUGEPAGE
    FILE_BACKED = "FILE_BACKED"  # a regular file's page cache (READ_ONLY_THP_FOR_FS only)
    SHARED_MEMORY = "SHARED_MEMORY"  # shmem, memfd, MAP_SHARED|MAP_ANONYMOUS
    ENABLED_NEVER = "ENABLED_NEVER"  # the policy's mode is never
    NO_MADV_HUGEPAGE = "NO_MADV_HUGEPAGE"  # mode madvise and no MADV_HUGEPAGE on the VMA
    TOO_SMALL = "TOO_SMALL"  # no whole aligned huge-page window inside the VMA
    MISALIGNED = "MISALIGNED"  # shared memory whose address and file offset differ mod 2 MiB
    SHMEM_NEVER = "SHMEM_NEVER"  # shared memory, the policy's shmem mode is never
    SHMEM_NO_MADV_HUGEPAGE = "SHMEM_NO_MADV_HUGEPAGE"  # shmem mode advise, no MADV_HUGEPAGE
    SHMEM_DENIED = "SHMEM_DENIED"  # the kernel's shmem controls refuse even MADV_COLLAPSE
