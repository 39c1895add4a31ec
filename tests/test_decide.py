"""scan.decide over synthetic (windows, 512) pagemap entries and kpageflags.

The reference for every rule is hpage_collapse_scan_pmd in mm/khugepaged.c: a loop over the
window's PTEs in address order that stops at the first PTE failing a check. `reference()` below
is that loop written plainly, one PTE at a time; the vectorised decide() must agree with it.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hugepaged.kernel.geometry import DEFAULT_GEOMETRY
from hugepaged.kernel.kpageflags import (
    KPF_ANON,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_LOCKED,
    KPF_LRU,
    KPF_NOPAGE,
    KPF_THP,
    KPF_ZERO_PAGE,
)
from hugepaged.kernel.pagemap import (
    PM_FILE,
    PM_MMAP_EXCLUSIVE,
    PM_PRESENT,
    PM_SWAP,
    PM_UFFD_WP,
)
from hugepaged.results import ScanResult as R
from hugepaged.scan.decide import Limits, Verdicts, decide

N = DEFAULT_GEOMETRY.pmd_nr
KPF_UPTODATE = 1 << 3
KPF_DIRTY = 1 << 4
KPF_MMAP = 1 << 11
KPF_SWAPBACKED = 1 << 14
PAGE_OK = KPF_ANON | KPF_LRU | KPF_UPTODATE | KPF_DIRTY | KPF_MMAP | KPF_SWAPBACKED
PFN_BASE = 0x40000  # order-9 aligned
ZERO_PFN = 0x2a00
SWAP_ENTRY = (0x1234 << 5) | 1  # offset 0x1234, type 1

# kind -> (pagemap bits without the PFN, kpageflags). Present kinds get a PFN per index.
KINDS: dict[str, tuple[int, int]] = {
    "normal": (PM_PRESENT | PM_MMAP_EXCLUSIVE, PAGE_OK),
    "none": (0, 0),
    "zero": (PM_PRESENT, KPF_ZERO_PAGE),
    "zero_uffd": (PM_PRESENT | PM_UFFD_WP, KPF_ZERO_PAGE),
    "swap": (PM_SWAP | SWAP_ENTRY, 0),
    "swap_uffd": (PM_SWAP | PM_UFFD_WP | SWAP_ENTRY, 0),
    "shared": (PM_PRESENT, PAGE_OK),
    "not_lru": (PM_PRESENT | PM_MMAP_EXCLUSIVE, PAGE_OK & ~KPF_LRU),
    "locked": (PM_PRESENT | PM_MMAP_EXCLUSIVE, PAGE_OK | KPF_LOCKED),
    "file": (PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_FILE, KPF_LRU | KPF_UPTODATE | KPF_MMAP),
    "not_anon": (PM_PRESENT | PM_MMAP_EXCLUSIVE, KPF_LRU | KPF_UPTODATE),
    "nopage": (PM_PRESENT | PM_MMAP_EXCLUSIVE, KPF_NOPAGE),
    "uffd": (PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_UFFD_WP, PAGE_OK),
    # Combinations, to pin the order of the checks within one PTE.
    "shared_not_lru": (PM_PRESENT, PAGE_OK & ~KPF_LRU),
    "shared_file": (PM_PRESENT | PM_FILE, KPF_LRU),
    "locked_not_lru": (PM_PRESENT | PM_MMAP_EXCLUSIVE, (PAGE_OK & ~KPF_LRU) | KPF_LOCKED),
    "uffd_not_lru": (PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_UFFD_WP, PAGE_OK & ~KPF_LRU),
    "nopage_file": (PM_PRESENT | PM_MMAP_EXCLUSIVE | PM_FILE, KPF_NOPAGE),
    "shared_locked": (PM_PRESENT, PAGE_OK | KPF_LOCKED),
}
KIND_NAMES = list(KINDS)


def window(default: str = "normal", **at: object) -> tuple[np.ndarray, np.ndarray]:
    """One window: `default` everywhere, `kind=indices` (an int, range or iterable) on top."""
    pm = np.zeros(N, dtype=np.uint64)
    kf = np.zeros(N, dtype=np.uint64)

    def put(kind: str, idx: object) -> None:
        if isinstance(idx, int):
            idx = [idx]
        idx = np.asarray(list(idx), dtype=np.int64)
        bits, flags = KINDS[kind]
        pm[idx] = np.uint64(bits)
        kf[idx] = np.uint64(flags)
        if bits & PM_PRESENT:
            pfn = ZERO_PFN if flags & KPF_ZERO_PAGE else PFN_BASE + idx
            pm[idx] |= np.asarray(pfn, dtype=np.uint64)

    put(default, range(N))
    for kind, idx in at.items():
        put(kind, idx)
    return pm, kf


def from_kinds(kinds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A window from one kind name per PTE."""
    assert len(kinds) == N
    by_kind: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        by_kind.setdefault(k, []).append(i)
    return window("none", **by_kind)


def run(*wins: tuple[np.ndarray, np.ndarray], limits: Limits | None = None,
        **kw: object) -> Verdicts:
    pm = np.stack([w[0] for w in wins])
    kf = np.stack([w[1] for w in wins])
    return decide(pm, kf, limits or Limits(), **kw)


def codes(v: Verdicts) -> list[R]:
    return [R(int(c)) for c in v.codes]


def one(win: tuple[np.ndarray, np.ndarray], **kw: object) -> R:
    (code,) = codes(run(win, **kw))
    return code


def spread(count: int, seed: int) -> list[int]:
    """`count` distinct indexes scattered over the window."""
    return sorted(np.random.default_rng(seed).choice(N, size=count, replace=False).tolist())


def reference(pm: np.ndarray, kf: np.ndarray, limits: Limits, referenced: np.ndarray | None,
              armed: bool, pmd_mapped: bool) -> tuple[R, int, int, int, int]:
    """hpage_collapse_scan_pmd, one PTE at a time; plus whole-window counts.

    An empty page table cannot be told from a table of empty PTEs through pagemap, so a
    window with nothing present and nothing swapped is PMD_NONE.
    """
    present = sum(1 for e, f in zip(pm, kf, strict=True)
                  if int(e) & PM_PRESENT and not int(f) & KPF_ZERO_PAGE)
    none = sum(1 for e, f in zip(pm, kf, strict=True)
               if not int(e) & (PM_PRESENT | PM_SWAP) or
               (int(e) & PM_PRESENT and int(f) & KPF_ZERO_PAGE))
    swap = sum(1 for e in pm if not int(e) & PM_PRESENT and int(e) & PM_SWAP)
    shared = sum(1 for e, f in zip(pm, kf, strict=True)
                 if int(e) & PM_PRESENT and not int(f) & KPF_ZERO_PAGE
                 and not int(e) & PM_MMAP_EXCLUSIVE)
    counts = (present, none, swap, shared)

    if pmd_mapped:
        return (R.PMD_MAPPED, *counts)
    if not any(int(e) & (PM_PRESENT | PM_SWAP) for e in pm):
        return (R.PMD_NONE, *counts)
    khp = limits.khugepaged
    unmapped = none_or_zero = nshared = nref = 0
    result = None
    for i in range(N):
        e, f = int(pm[i]), int(kf[i])
        if not e & PM_PRESENT and e & PM_SWAP:  # is_swap_pte
            unmapped += 1
            if not khp or unmapped <= limits.max_ptes_swap:
                if e & PM_UFFD_WP:
                    result = R.PTE_UFFD_WP
                    break
                continue
            result = R.EXCEED_SWAP_PTE
            break
        if not e & PM_PRESENT or f & KPF_ZERO_PAGE:  # pte_none_or_zero
            none_or_zero += 1
            if not armed and (not khp or none_or_zero <= limits.max_ptes_none):
                continue
            result = R.EXCEED_NONE_PTE
            break
        if e & PM_UFFD_WP:
            result = R.PTE_UFFD_WP
            break
        if f & KPF_NOPAGE:  # vm_normal_page() == NULL
            result = R.PAGE_NULL
            break
        if e & PM_FILE or not f & KPF_ANON:
            result = R.PAGE_ANON
            break
        if not e & PM_MMAP_EXCLUSIVE:  # folio_maybe_mapped_shared
            nshared += 1
            if khp and nshared > limits.max_ptes_shared:
                result = R.EXCEED_SHARED_PTE
                break
        if not f & KPF_LRU:
            result = R.PAGE_LRU
            break
        if f & KPF_LOCKED:
            result = R.PAGE_LOCK
            break
        if khp and referenced is not None and referenced[i]:
            nref += 1
    if result is None:
        if khp and referenced is not None and (
                nref == 0 or (unmapped and nref < N // 2)):
            result = R.LACK_REFERENCED_PAGE
        else:
            result = R.SUCCEED
    return (result, *counts)


# ---------------------------------------------------------------------------------------------
# The plain outcomes


def test_all_normal_pages_succeed():
    v = run(window())
    assert codes(v) == [R.SUCCEED]
    assert v.codes.dtype == np.int8
    assert (v.present.tolist(), v.none.tolist(), v.swap.tolist(), v.shared.tolist()) == \
        ([512], [0], [0], [0])


def test_no_windows():
    empty = np.zeros((0, N), dtype=np.uint64)
    v = decide(empty, empty, Limits())
    assert v.codes.shape == (0,) and v.present.shape == (0,)


def test_all_empty_is_pmd_none():
    assert one(window("none")) == R.PMD_NONE
    # Nothing there to collapse under MADV_COLLAPSE either, nor in a uffd-armed VMA.
    assert one(window("none"), limits=Limits(khugepaged=False)) == R.PMD_NONE
    assert one(window("none"), uffd_armed=True) == R.PMD_NONE
    assert one(window("none"), referenced=np.zeros((1, N), bool)) == R.PMD_NONE


def test_all_zero_page_is_not_pmd_none():
    # The zero page is present in pagemap: there is a page table, and 512 none-or-zero PTEs
    # exceed max_ptes_none=511 at the last PTE.
    assert one(window("zero")) == R.EXCEED_NONE_PTE
    assert one(window("swap")) == R.EXCEED_SWAP_PTE


def thp_window(base: int = PFN_BASE) -> tuple[np.ndarray, np.ndarray]:
    """512 present PTEs of one order-9 folio, as a PMD mapping shows in pagemap."""
    pfns = np.uint64(base) + np.arange(N, dtype=np.uint64)
    pm = np.uint64(PM_PRESENT | PM_MMAP_EXCLUSIVE) | pfns
    kf = np.full(N, PAGE_OK | KPF_THP | KPF_COMPOUND_TAIL, dtype=np.uint64)
    kf[0] = PAGE_OK | KPF_THP | KPF_COMPOUND_HEAD
    return pm, kf


# ---------------------------------------------------------------------------------------------
# max_ptes_*: N passes, N + 1 fails


def _boundary_windows(n: int, seed: int) -> list[list[int]]:
    """Index sets of size n placed first, last and scattered."""
    return [list(range(n)), list(range(N - n, N)), spread(n, seed)]


@pytest.mark.parametrize("limit", [0, 1, 255, 511])
@pytest.mark.parametrize("kind", ["none", "zero"])
def test_max_ptes_none_boundary(limit, kind):
    lim = Limits(max_ptes_none=limit)
    for idx in _boundary_windows(limit, seed=limit):
        assert one(window(**{kind: idx}), limits=lim) == R.SUCCEED
    if limit + 1 == N and kind == "none":
        # 512 empty PTEs: nothing to read a page table from.
        assert one(window("none"), limits=lim) == R.PMD_NONE
        return
    for idx in _boundary_windows(limit + 1, seed=limit + 7):
        assert one(window(**{kind: idx}), limits=lim) == R.EXCEED_NONE_PTE


def test_none_and_zero_count_together():
    lim = Limits(max_ptes_none=4)
    assert one(window(none=[0, 100], zero=[50, 500]), limits=lim) == R.SUCCEED
    assert one(window(none=[0, 100], zero=[50, 500, 501]), limits=lim) == R.EXCEED_NONE_PTE


@pytest.mark.parametrize("limit", [0, 1, 255, 511])
def test_max_ptes_swap_boundary(limit):
    lim = Limits(max_ptes_swap=limit)
    for idx in _boundary_windows(limit, seed=limit):
        assert one(window(swap=idx), limits=lim) == R.SUCCEED
    for idx in _boundary_windows(limit + 1, seed=limit + 7):
        assert one(window(swap=idx), limits=lim) == R.EXCEED_SWAP_PTE


@pytest.mark.parametrize("limit", [0, 1, 255, 511])
def test_max_ptes_shared_boundary(limit):
    lim = Limits(max_ptes_shared=limit)
    for idx in _boundary_windows(limit, seed=limit):
        assert one(window(shared=idx), limits=lim) == R.SUCCEED
    for idx in _boundary_windows(limit + 1, seed=limit + 7):
        assert one(window(shared=idx), limits=lim) == R.EXCEED_SHARED_PTE


def test_default_limits_are_the_kernels():
    lim = Limits()
    assert (lim.max_ptes_none, lim.max_ptes_swap, lim.max_ptes_shared, lim.khugepaged) == \
        (511, 64, 256, True)
    assert one(window(swap=range(64))) == R.SUCCEED
    assert one(window(swap=range(65))) == R.EXCEED_SWAP_PTE
    assert one(window(shared=range(256))) == R.SUCCEED
    assert one(window(shared=range(257))) == R.EXCEED_SHARED_PTE
    assert one(window("none", normal=5)) == R.SUCCEED


# ---------------------------------------------------------------------------------------------
# One result per failing kind of PTE


@pytest.mark.parametrize(("kind", "expected"), [
    ("uffd", R.PTE_UFFD_WP),
    ("swap_uffd", R.PTE_UFFD_WP),
    ("nopage", R.PAGE_NULL),
    ("file", R.PAGE_ANON),
    ("not_anon", R.PAGE_ANON),
    ("not_lru", R.PAGE_LRU),
    ("locked", R.PAGE_LOCK),
])
@pytest.mark.parametrize("at", [0, 1, 300, 511])
def test_failing_pte(kind, expected, at):
    assert one(window(**{kind: at})) == expected
    # MADV_COLLAPSE fails these too.
    assert one(window(**{kind: at}), limits=Limits(0, 0, 0, khugepaged=False)) == expected


def test_zero_page_with_uffd_wp_counts_as_none():
    # pte_none_or_zero() is checked before pte_uffd_wp().
    assert one(window(zero_uffd=[4, 9])) == R.SUCCEED
    assert one(window(zero_uffd=[4, 9]), limits=Limits(max_ptes_none=1)) == R.EXCEED_NONE_PTE


@pytest.mark.parametrize(("kind", "limits", "expected"), [
    # The swap count is checked before the swap entry's uffd-wp bit.
    ("swap_uffd", Limits(max_ptes_swap=0), R.EXCEED_SWAP_PTE),
    ("swap_uffd", Limits(max_ptes_swap=1), R.PTE_UFFD_WP),
    ("swap_uffd", Limits(max_ptes_swap=0, khugepaged=False), R.PTE_UFFD_WP),
    # uffd-wp before the page checks.
    ("uffd_not_lru", Limits(), R.PTE_UFFD_WP),
    # vm_normal_page() before folio_test_anon().
    ("nopage_file", Limits(), R.PAGE_NULL),
    # folio_test_anon() before the shared count.
    ("shared_file", Limits(max_ptes_shared=0), R.PAGE_ANON),
    # The shared count before folio_test_lru() and folio_test_locked().
    ("shared_not_lru", Limits(max_ptes_shared=0), R.EXCEED_SHARED_PTE),
    ("shared_not_lru", Limits(max_ptes_shared=1), R.PAGE_LRU),
    ("shared_locked", Limits(max_ptes_shared=0), R.EXCEED_SHARED_PTE),
    ("shared_locked", Limits(max_ptes_shared=1), R.PAGE_LOCK),
    # folio_test_lru() before folio_test_locked().
    ("locked_not_lru", Limits(), R.PAGE_LRU),
])
def test_check_order_within_one_pte(kind, limits, expected):
    assert one(window(**{kind: 10}), limits=limits) == expected


# ---------------------------------------------------------------------------------------------
# The first failure in address order wins


def test_first_failure_in_address_order():
    lim = Limits(max_ptes_none=0)
    assert one(window(not_lru=3, none=range(400, N)), limits=lim) == R.PAGE_LRU
    assert one(window(none=range(3, 100), not_lru=400), limits=lim) == R.EXCEED_NONE_PTE


def test_overflow_is_at_the_pte_that_crosses_the_limit():
    # Two empty PTEs early, the third (the one over max_ptes_none=2) after the locked page.
    lim = Limits(max_ptes_none=2)
    assert one(window(none=[0, 1, 200], locked=100), limits=lim) == R.PAGE_LOCK
    assert one(window(none=[0, 1, 50], locked=100), limits=lim) == R.EXCEED_NONE_PTE


@pytest.mark.parametrize(("early", "late", "limits", "expected"), [
    ("swap", "uffd", Limits(max_ptes_swap=0), R.EXCEED_SWAP_PTE),
    ("uffd", "swap", Limits(max_ptes_swap=0), R.PTE_UFFD_WP),
    ("shared", "nopage", Limits(max_ptes_shared=0), R.EXCEED_SHARED_PTE),
    ("nopage", "shared", Limits(max_ptes_shared=0), R.PAGE_NULL),
    ("locked", "file", Limits(), R.PAGE_LOCK),
    ("file", "locked", Limits(), R.PAGE_ANON),
    ("not_lru", "swap_uffd", Limits(), R.PAGE_LRU),
    ("swap_uffd", "not_lru", Limits(), R.PTE_UFFD_WP),
])
def test_first_failure_pairs(early, late, limits, expected):
    assert one(window(**{early: 20, late: 21}), limits=limits) == expected


def test_windows_are_independent():
    wins = [window(), window(not_lru=5), window("none"), window(swap=range(65)),
            window(uffd=511), window(shared=range(300)), window(locked=0)]
    together = codes(run(*wins))
    assert together == [R.SUCCEED, R.PAGE_LRU, R.PMD_NONE, R.EXCEED_SWAP_PTE, R.PTE_UFFD_WP,
                        R.EXCEED_SHARED_PTE, R.PAGE_LOCK]
    assert together == [one(w) for w in wins]


# ---------------------------------------------------------------------------------------------
# userfaultfd-armed VMAs and MADV_COLLAPSE semantics


def test_uffd_armed_vma_fails_on_any_none_pte():
    assert one(window(none=300), uffd_armed=True) == R.EXCEED_NONE_PTE
    assert one(window(zero=300), uffd_armed=True) == R.EXCEED_NONE_PTE
    assert one(window(none=300), uffd_armed=True,
               limits=Limits(khugepaged=False)) == R.EXCEED_NONE_PTE
    assert one(window(), uffd_armed=True) == R.SUCCEED
    assert one(window(swap=3), uffd_armed=True) == R.SUCCEED
    # Earlier failures still come first.
    assert one(window(not_lru=2, none=300), uffd_armed=True) == R.PAGE_LRU


def test_uffd_armed_per_window():
    wins = [window(none=9), window(none=9), window()]
    v = run(*wins, uffd_armed=np.array([True, False, True]))
    assert codes(v) == [R.EXCEED_NONE_PTE, R.SUCCEED, R.SUCCEED]


def test_madv_collapse_ignores_max_ptes_and_referenced():
    lim = Limits(max_ptes_none=0, max_ptes_swap=0, max_ptes_shared=0, khugepaged=False)
    win = window(none=range(0, 200), zero=range(200, 300), swap=range(300, 400),
                 shared=range(400, 500))
    assert one(win, limits=lim) == R.SUCCEED
    assert one(window("swap", normal=0), limits=lim) == R.SUCCEED
    assert one(window("shared"), limits=lim) == R.SUCCEED
    assert one(window("zero"), limits=lim) == R.SUCCEED
    assert one(win, limits=lim, referenced=np.zeros((1, N), bool)) == R.SUCCEED
    # The same window under khugepaged's rules.
    assert one(win, limits=Limits(max_ptes_none=0, max_ptes_swap=0,
                                  max_ptes_shared=0)) == R.EXCEED_NONE_PTE
    for kind, expected in [("not_lru", R.PAGE_LRU), ("locked", R.PAGE_LOCK),
                           ("uffd", R.PTE_UFFD_WP), ("file", R.PAGE_ANON),
                           ("nopage", R.PAGE_NULL)]:
        assert one(window(**{kind: 450}), limits=lim) == expected


# ---------------------------------------------------------------------------------------------
# LACK_REFERENCED_PAGE


def ref(*idx: int, rows: int = 1) -> np.ndarray:
    r = np.zeros((rows, N), dtype=bool)
    r[:, list(idx)] = True
    return r


def test_lack_referenced_page():
    assert one(window(), referenced=ref()) == R.LACK_REFERENCED_PAGE
    assert one(window(), referenced=ref(511)) == R.SUCCEED
    # A referenced bit on a PTE that maps no normal page does not count.
    assert one(window(none=7, zero=8), referenced=ref(7, 8)) == R.LACK_REFERENCED_PAGE
    assert one(window(none=7, zero=8), referenced=ref(7, 8, 9)) == R.SUCCEED
    # Not applied when the access state is unknown.
    assert one(window()) == R.SUCCEED
    assert one(window(), referenced=None) == R.SUCCEED


def test_lack_referenced_with_swap_needs_half_referenced():
    win = window(swap=[500])
    assert one(win, referenced=ref(*range(255))) == R.LACK_REFERENCED_PAGE
    assert one(win, referenced=ref(*range(256))) == R.SUCCEED
    assert one(window(), referenced=ref(*range(1))) == R.SUCCEED  # no swap: one is enough


def test_failures_come_before_lack_referenced():
    assert one(window(not_lru=5), referenced=ref()) == R.PAGE_LRU
    assert one(window(swap=range(65)), referenced=ref()) == R.EXCEED_SWAP_PTE
    wins = [window(), window(), window(locked=1)]
    r = np.zeros((3, N), dtype=bool)
    r[1, 100] = True
    assert codes(run(*wins, referenced=r)) == [R.LACK_REFERENCED_PAGE, R.SUCCEED, R.PAGE_LOCK]


# ---------------------------------------------------------------------------------------------
# Counts


def test_counts():
    win = window(none=[1, 2, 3], zero=[10, 11], swap=[20, 21, 22, 23],
                 shared=[30, 31, 32, 33, 34])
    v = run(win, window("none"), window("zero"))
    assert codes(v) == [R.SUCCEED, R.PMD_NONE, R.EXCEED_NONE_PTE]
    assert v.present.tolist() == [512 - 3 - 2 - 4, 0, 0]
    assert v.none.tolist() == [5, 512, 512]
    assert v.swap.tolist() == [4, 0, 0]
    assert v.shared.tolist() == [5, 0, 0]


def test_counts_are_whole_window_even_after_a_failure():
    v = run(window(not_lru=0, none=[100, 101], swap=[200], shared=[300, 301, 302]))
    assert codes(v) == [R.PAGE_LRU]
    assert (int(v.present[0]), int(v.none[0]), int(v.swap[0]), int(v.shared[0])) == \
        (509, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Property: decide() agrees with the per-PTE reference loop


LIMIT_VALUES = st.one_of(st.sampled_from([0, 1, 2, 3, 8, 64, 255, 256, 510, 511]),
                         st.integers(0, 511))


@st.composite
def batches(draw):
    n = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pms, kfs = [], []
    for _ in range(n):
        # A few kinds per window, with weights, so counts land near the limits.
        chosen = draw(st.lists(st.sampled_from(KIND_NAMES), min_size=1, max_size=4,
                               unique=True))
        weights = np.array([draw(st.integers(1, 100)) for _ in chosen], dtype=float)
        kinds = list(rng.choice(chosen, size=N, p=weights / weights.sum()))
        for i, k in draw(st.lists(st.tuples(st.integers(0, N - 1),
                                            st.sampled_from(KIND_NAMES)), max_size=6)):
            kinds[i] = k
        pm, kf = from_kinds(kinds)
        pms.append(pm)
        kfs.append(kf)
    limits = Limits(draw(LIMIT_VALUES), draw(LIMIT_VALUES), draw(LIMIT_VALUES),
                    khugepaged=draw(st.booleans()))
    referenced = None
    if draw(st.booleans()):
        p = draw(st.sampled_from([0.0, 0.002, 0.3, 0.5, 0.7, 1.0]))
        referenced = rng.random((n, N)) < p
    armed = draw(st.one_of(st.booleans(), st.lists(st.booleans(), min_size=n, max_size=n)))
    return np.stack(pms), np.stack(kfs), limits, referenced, armed


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_decide_matches_per_pte_reference(batch):
    pm, kf, limits, referenced, armed = batch
    v = decide(pm, kf, limits, referenced=referenced,
               uffd_armed=np.asarray(armed) if isinstance(armed, list) else armed)
    n = pm.shape[0]
    armed_rows = armed if isinstance(armed, list) else [armed] * n
    for w in range(n):
        want = reference(pm[w], kf[w], limits, None if referenced is None else referenced[w],
                         armed_rows[w], False)
        got = (R(int(v.codes[w])), int(v.present[w]), int(v.none[w]), int(v.swap[w]),
               int(v.shared[w]))
        assert got == want, f"window {w}"


def test_reference_agrees_on_the_hand_written_cases():
    # Guard the reference itself against drifting from the explicit cases above.
    lim = Limits(max_ptes_none=0)
    pm, kf = window(not_lru=3, none=range(400, N))
    assert reference(pm, kf, lim, None, False, False)[0] == R.PAGE_LRU
    pm, kf = window(none=range(3, 100), not_lru=400)
    assert reference(pm, kf, lim, None, False, False)[0] == R.EXCEED_NONE_PTE
    pm, kf = window("none")
    assert reference(pm, kf, Limits(), None, False, False)[0] == R.PMD_NONE
