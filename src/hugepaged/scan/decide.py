"""The per-window decision of hpage_collapse_scan_pmd, vectorised over (windows, PTEs) arrays.

The second axis is HPAGE_PMD_NR of the kernel the entries came from (512 with 4 KiB pages,
2048 with 16 KiB, 8192 with 64 KiB): every count and limit here is relative to it.

The kernel walks a window's PTEs in address order and stops at the first PTE that fails a
check, so the result is the failure met first, not a global priority. Here every check
yields the index of its first failing PTE; the smallest (index, check order) wins.
"""

import sys
from dataclasses import dataclass

import numpy as np

from hugepaged.kernel.kpageflags import (
    KPF_ANON,
    KPF_LOCKED,
    KPF_LRU,
    KPF_NOPAGE,
    KPF_ZERO_PAGE,
)
from hugepaged.kernel.pagemap import (
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SWAP,
    PM_UFFD_WP,
)
from hugepaged.policy import Limits
from hugepaged.results import ScanResult as R

__all__ = ["Limits", "Verdicts", "clean_windows", "decide", "window_slice"]
_U = np.uint64


@dataclass
class Verdicts:
    """One result code per window, with the counts an operator wants to see."""

    codes: np.ndarray  # int8 ScanResult per window
    present: np.ndarray  # normal pages mapped (zero page excluded)
    none: np.ndarray  # empty PTEs plus zero-page PTEs
    swap: np.ndarray
    shared: np.ndarray
    # File rules only: pages of the range this process maps (present counts the page cache).
    mapped: np.ndarray | None = None
    # PTE rules only: of `none`, the PTEs mapping the shared zero page (what the kernel's
    # underused-THP shrinker maps in place of zero-filled pages when it splits a THP).
    zero: np.ndarray | None = None
    # PTE rules only: the frame of the window's first normal page, 0 if none: which folio
    # its pages belong to (a split huge page keeps its frames; memory mapped anew does not).
    first_pfn: np.ndarray | None = None


def window_slice(v: Verdicts, start: int, end: int | None = None) -> Verdicts:
    """The verdicts of windows [start, end) of `v`."""
    cut = slice(start, end)
    return Verdicts(v.codes[cut], v.present[cut], v.none[cut], v.swap[cut], v.shared[cut],
                    None if v.mapped is None else v.mapped[cut],
                    None if v.zero is None else v.zero[cut],
                    None if v.first_pfn is None else v.first_pfn[cut])


def _bit(a: np.ndarray, mask: int) -> np.ndarray:
    return (a & _U(mask)) != 0


def _first(mask: np.ndarray) -> np.ndarray:
    """Index of the first True per row, or the row width (no PTE fails)."""
    none = mask.shape[1]
    if not mask.any():
        return np.full(mask.shape[0], none, dtype=np.int64)
    return np.where(mask.any(axis=1), mask.argmax(axis=1), none)


def _first_over(mask: np.ndarray, limit: np.ndarray | int) -> np.ndarray:
    """Index of the PTE at which the running count of `mask` first exceeds `limit`."""
    if not mask.any():  # the count stays 0: only a negative limit is exceeded, at PTE 0
        return np.broadcast_to(np.where(np.asarray(limit) < 0, 0, mask.shape[1]).astype(np.int64),
                               mask.shape[:1])
    over = np.cumsum(mask, axis=1, dtype=np.int16) > np.reshape(limit, (-1, 1))
    return _first(over)


# A PTE that passes every check: present, exclusively mapped, no uffd-wp, anonymous (no
# PM_FILE), and its frame on an LRU list, anonymous, unlocked, with a struct page, not the
# zero page. pagemap bits 56..63 are the top byte of an entry; every kpageflags bit used
# here is in the low 32 bits.
_CLEAN_PM_MASK = (PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_UFFD_WP | PM_FILE) >> 56
_CLEAN_PM = (PM_PRESENT | PM_MMAP_EXCLUSIVE) >> 56
_CLEAN_KF_MASK = KPF_LOCKED | KPF_LRU | KPF_ANON | KPF_NOPAGE | KPF_ZERO_PAGE
_CLEAN_KF = KPF_LRU | KPF_ANON
_LITTLE = sys.byteorder == "little"


def _u64_words(a: np.ndarray) -> bool:
    return _LITTLE and a.ndim == 2 and a.dtype.itemsize == 8 and a.flags.c_contiguous


def clean_windows(pagemap: np.ndarray, kflags: np.ndarray) -> np.ndarray:
    """Per window: all its PTEs pass every check, so SUCCEED (or LACK_REFERENCED_PAGE).

    Reads one byte of each pagemap entry and one 32-bit word of each kpageflags entry.
    """
    if _u64_words(pagemap) and _u64_words(kflags):
        top = pagemap.view(np.uint8)[:, 7::8]
        low = kflags.view(np.uint32)[:, 0::2]
    else:
        top = (np.asarray(pagemap, dtype=_U) >> _U(56)).astype(np.uint8)
        low = (np.asarray(kflags, dtype=_U) & _U(0xFFFFFFFF)).astype(np.uint32)
    clean = (top & np.uint8(_CLEAN_PM_MASK)) == np.uint8(_CLEAN_PM)
    clean &= (low & np.uint32(_CLEAN_KF_MASK)) == np.uint32(_CLEAN_KF)
    return clean.all(axis=1)


def decide(pagemap: np.ndarray, kflags: np.ndarray, limits: Limits, *,
           referenced: np.ndarray | None = None,
           uffd_armed: np.ndarray | bool = False) -> Verdicts:
    """Result code per window from pagemap entries and kpageflags, both (n, HPAGE_PMD_NR) uint64.

    `referenced` (n, HPAGE_PMD_NR) bool is the young/referenced state where an access source
    exists; None means unknown and the LACK_REFERENCED_PAGE rule is not applied.

    Windows whose PTEs all pass every check (the usual 4 KiB-mapped window) are settled
    from one byte and one word per PTE; only the rest go through the per-check search.
    """
    n = pagemap.shape[0]
    armed = np.broadcast_to(np.asarray(uffd_armed, dtype=bool), (n,))
    fast = clean_windows(pagemap, kflags) & ~armed if n else np.zeros(0, dtype=bool)
    if not fast.any():
        out = _decide_checks(pagemap, kflags, limits, referenced, armed)
    else:
        zeros = np.zeros(n, dtype=np.int64)
        out = Verdicts(codes=np.full(n, int(R.SUCCEED), dtype=np.int8),
                       present=zeros + pagemap.shape[1], none=zeros, swap=zeros.copy(),
                       shared=zeros.copy(), zero=zeros.copy(),
                       first_pfn=(pagemap[:, 0] & _U(PM_PFN_MASK)).astype(np.int64))
        if referenced is not None and limits.khugepaged:
            # Every PTE is a normal page and none is swapped: lacking means none referenced.
            out.codes[fast & ~np.asarray(referenced, dtype=bool).any(axis=1)] = \
                int(R.LACK_REFERENCED_PAGE)
        slow = np.flatnonzero(~fast)
        if slow.size:
            rest = _decide_checks(pagemap[slow], kflags[slow], limits,
                                  None if referenced is None else referenced[slow],
                                  armed[slow])
            for name in ("codes", "present", "none", "swap", "shared", "zero", "first_pfn"):
                getattr(out, name)[slow] = getattr(rest, name)
    return out


def _decide_checks(pagemap: np.ndarray, kflags: np.ndarray, limits: Limits,
                   referenced: np.ndarray | None, armed: np.ndarray) -> Verdicts:
    """decide() for any windows: every check's first failing PTE, the earliest wins."""
    n = pagemap.shape[0]
    present = _bit(pagemap, PM_PRESENT)
    swapped = _bit(pagemap, PM_SWAP) & ~present
    zero = present & _bit(kflags, KPF_ZERO_PAGE)
    none = (~present & ~swapped) | zero
    normal = present & ~zero
    shared = normal & ~_bit(pagemap, PM_MMAP_EXCLUSIVE)
    uffd_wp = _bit(pagemap, PM_UFFD_WP)
    big = np.iinfo(np.int16).max

    if limits.khugepaged:
        none_limit = np.where(armed, 0, limits.max_ptes_none)
        swap_limit, shared_limit = limits.max_ptes_swap, limits.max_ptes_shared
    else:
        none_limit, swap_limit, shared_limit = np.where(armed, 0, big), big, big

    # (first failing PTE index, code) in the kernel's check order within one PTE.
    checks = [
        (_first_over(swapped, swap_limit), R.EXCEED_SWAP_PTE),
        (_first(swapped & uffd_wp), R.PTE_UFFD_WP),
        (_first_over(none, none_limit), R.EXCEED_NONE_PTE),
        (_first(normal & uffd_wp), R.PTE_UFFD_WP),
        (_first(normal & _bit(kflags, KPF_NOPAGE)), R.PAGE_NULL),
        (_first(normal & (_bit(pagemap, PM_FILE) | ~_bit(kflags, KPF_ANON))), R.PAGE_ANON),
        (_first_over(shared, shared_limit), R.EXCEED_SHARED_PTE),
        (_first(normal & ~_bit(kflags, KPF_LRU)), R.PAGE_LRU),
        (_first(normal & _bit(kflags, KPF_LOCKED)), R.PAGE_LOCK),
    ]
    keys = np.stack([idx * 16 + rank for rank, (idx, _) in enumerate(checks)])
    codes_by_rank = np.array([int(code) for _, code in checks], dtype=np.int8)
    best = keys.argmin(axis=0)
    failed = keys.min(axis=0) < pagemap.shape[1] * 16

    codes = np.full(n, int(R.SUCCEED), dtype=np.int8)
    codes[failed] = codes_by_rank[best[failed]]
    if referenced is not None and limits.khugepaged:
        nref = (normal & referenced).sum(axis=1)
        unmapped = swapped.sum(axis=1)
        lack = (nref == 0) | ((unmapped > 0) & (nref < pagemap.shape[1] // 2))
        codes[~failed & lack] = int(R.LACK_REFERENCED_PAGE)
    codes[~(present | swapped).any(axis=1)] = int(R.PMD_NONE)
    first = normal.argmax(axis=1)
    first_pfn = np.where(normal.any(axis=1),
                         pagemap[np.arange(n), first] & _U(PM_PFN_MASK), _U(0)).astype(np.int64)
    return Verdicts(codes=codes, present=normal.sum(axis=1), none=none.sum(axis=1),
                    swap=swapped.sum(axis=1), shared=shared.sum(axis=1), zero=zero.sum(axis=1),
                    first_pfn=first_pfn)
