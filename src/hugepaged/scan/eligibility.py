"""Which VMAs are candidates at all: the anonymous half of thp_vma_allowable_order."""

from hugepaged.kernel.procfs import Vma

HPAGE_PMD_SIZE = 2 << 20
# VmFlags of special mappings (VM_IO, VM_PFNMAP, VM_MIXEDMAP, VM_DONTEXPAND, hugetlb).
SPECIAL_FLAGS = frozenset({"io", "pf", "mm", "de", "ht"})
UFFD_FLAGS = frozenset({"um", "uw", "ui"})
_ANON_NAMES = ("", "[heap]", "[stack]")


def aligned_range(vma: Vma, size: int = HPAGE_PMD_SIZE) -> tuple[int, int]:
    """[hstart, hend): the 2 MiB-aligned windows wholly inside the VMA (may be empty)."""
    hstart = (vma.start + size - 1) & ~(size - 1)
    hend = vma.end & ~(size - 1)
    return hstart, max(hstart, hend)


def is_private_anon(vma: Vma) -> bool:
    named_anon = vma.path.startswith("[anon:")
    return (vma.inode == 0 and "s" not in vma.perms[3:]
            and (vma.path in _ANON_NAMES or named_anon))


def vma_skip_reason(vma: Vma, enabled: str, thp_disabled: bool) -> str | None:
    """None if the VMA is a candidate, else why not (in the kernel's terms)."""
    if thp_disabled:
        return "PR_SET_THP_DISABLE"
    if not is_private_anon(vma):
        return "not private anonymous"
    if vma.flags & SPECIAL_FLAGS:
        return "special mapping"
    if "nh" in vma.flags:
        return "VM_NOHUGEPAGE"
    if enabled == "never":
        return "enabled=never"
    if enabled == "madvise" and "hg" not in vma.flags:
        return "no VM_HUGEPAGE"
    hstart, hend = aligned_range(vma)
    if hstart >= hend:
        return "no aligned 2 MiB window"
    return None


def uffd_armed(vma: Vma) -> bool:
    return bool(vma.flags & UFFD_FLAGS)
