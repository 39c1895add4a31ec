"""Geometries this machine does not have: arm64 kernels with 16 KiB and 64 KiB base pages
(a PMD of 32 MiB and 2048 PTEs, of 512 MiB and 8192 PTEs). These are fixtures by necessity:
the decisions, ranges, refusals and pagemap offsets must follow the kernel's HPAGE_PMD_NR,
not x86's 512, and nothing in the code may assume otherwise (tests/test_structure.py keeps
the literals out; this checks the arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from hugepaged.errors import InvalidTunable
from hugepaged.kernel.geometry import DEFAULT_GEOMETRY, Geometry, read_geometry
from hugepaged.kernel.kpageflags import KPF_ANON, KPF_LRU, KPF_ZERO_PAGE
from hugepaged.kernel.pagemap import PM_MMAP_EXCLUSIVE, PM_PRESENT, PageMap
from hugepaged.kernel.procfs import Vma
from hugepaged.policy import CollapseControl, Limits
from hugepaged.results import Ineligible
from hugepaged.results import ScanResult as R
from hugepaged.scan.decide import decide
from hugepaged.scan.eligibility import ineligible
from hugepaged.tunables import SPECS, Tunables, parse, resolve

G16 = Geometry(page_size=16 << 10, pmd_size=32 << 20)
G64 = Geometry(page_size=64 << 10, pmd_size=512 << 20)


@pytest.mark.parametrize(("g", "nr", "order", "defaults"), [
    (DEFAULT_GEOMETRY, 512, 9, (511, 64, 256, 4096)),
    (G16, 2048, 11, (2047, 256, 1024, 16384)),
    (G64, 8192, 13, (8191, 1024, 4096, 65536)),
])
def test_the_kernels_derived_values(g, nr, order, defaults):
    """khugepaged_init: max_ptes_none = NR - 1, max_ptes_swap = NR / 8, max_ptes_shared =
    NR / 2, pages_to_scan = NR * 8."""
    assert (g.pmd_nr, g.pmd_order) == (nr, order)
    assert (g.max_ptes_none, g.max_ptes_swap, g.max_ptes_shared, g.pages_to_scan) == defaults
    assert g.pmd_shift == g.pmd_size.bit_length() - 1 and 1 << g.pmd_shift == g.pmd_size


@pytest.mark.parametrize("g", [G16, G64])
def test_ranges_and_refusals_follow_the_geometry(g):
    top = g.pmd_nr - 1
    for key in ("max_ptes_none", "max_ptes_swap", "max_ptes_shared"):
        assert parse(key, str(top), g) == top
        with pytest.raises(InvalidTunable, match=f"0..{top}"):
            parse(key, str(top + 1), g)
        assert SPECS[key].bounds(g) == (0, top)
    # 511 is no limit on these kernels: a value x86 refuses is valid here.
    assert parse("max_ptes_none", "600", g) == 600
    with pytest.raises(InvalidTunable):
        parse("max_ptes_none", "600", DEFAULT_GEOMETRY)


@pytest.mark.parametrize("g", [G16, G64])
def test_defaults_and_resolve_follow_the_geometry(g):
    t = Tunables.defaults(g)
    assert (t.max_ptes_none, t.max_ptes_swap, t.max_ptes_shared) == \
        (g.max_ptes_none, g.max_ptes_swap, g.max_ptes_shared)
    assert t.pages_to_scan == 32 * g.pmd_nr  # hugepaged's pace: 32 windows a pass
    kernel = {"max_ptes_none": g.pmd_nr - 1, "enabled": "always"}
    r = resolve(kernel, {"max_ptes_swap": str(g.pmd_nr - 1)}, geometry=g)
    assert (r.max_ptes_none, r.max_ptes_swap, r.enabled) == (g.pmd_nr - 1, g.pmd_nr - 1,
                                                              "always")
    with pytest.raises(InvalidTunable):
        resolve(kernel, {"max_ptes_swap": str(g.pmd_nr)}, geometry=g)


def _windows(g: Geometry, none: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One window per entry: that many empty PTEs at its end, the rest normal pages."""
    nr = g.pmd_nr
    pm = np.zeros((len(none), nr), dtype=np.uint64)
    kf = np.zeros((len(none), nr), dtype=np.uint64)
    for w, n in enumerate(none):
        present = nr - n
        pfn = np.uint64(0x100000 + w * nr) + np.arange(present, dtype=np.uint64)
        pm[w, :present] = np.uint64(PM_PRESENT | PM_MMAP_EXCLUSIVE) | pfn
        kf[w, :present] = np.uint64(KPF_ANON | KPF_LRU)
    return pm, kf


@pytest.mark.parametrize("g", [G16, G64])
def test_decisions_count_every_pte_of_the_window(g):
    nr = g.pmd_nr
    pm, kf = _windows(g, [0, 1, nr - 1, nr])
    v = decide(pm, kf, Limits(max_ptes_none=0))
    assert [R(int(c)) for c in v.codes] == [R.SUCCEED, R.EXCEED_NONE_PTE, R.EXCEED_NONE_PTE,
                                            R.PMD_NONE]
    assert v.present.tolist() == [nr, nr - 1, 1, 0] and v.none.tolist() == [0, 1, nr - 1, nr]
    # A limit above x86's 511 is one these kernels take: 600 empty PTEs pass at 600.
    pm, kf = _windows(g, [600, 601])
    v = decide(pm, kf, Limits(max_ptes_none=600))
    assert [R(int(c)) for c in v.codes] == [R.SUCCEED, R.EXCEED_NONE_PTE]
    # The zero page counts as empty, wherever in the window.
    pm, kf = _windows(g, [0])
    kf[0, nr - 5:] = np.uint64(KPF_ZERO_PAGE)
    assert decide(pm, kf, Limits(max_ptes_none=5)).codes.tolist() == [R.SUCCEED]
    assert decide(pm, kf, Limits(max_ptes_none=4)).codes.tolist() == [R.EXCEED_NONE_PTE]


@pytest.mark.parametrize("g", [G16, G64])
def test_windows_and_too_small_follow_the_pmd_size(g):
    size = g.pmd_size
    base = 64 * size
    assert g.aligned(base - 4096, base + 3 * size + 4096) == (base, base + 3 * size)
    flags = frozenset({"rd", "wr", "mr", "mw", "me", "ac", "hg"})
    control = CollapseControl(max_ptes_none=g.max_ptes_none)
    # One x86 window (2 MiB) of memory is no window here.
    small = Vma(base, base + (2 << 20), "rw-p", 0, 0, "", flags)
    assert ineligible(small, control, False, g) is Ineligible.TOO_SMALL
    whole = Vma(base, base + size, "rw-p", 0, 0, "", flags)
    assert ineligible(whole, control, False, g) is None


@pytest.mark.parametrize("g", [G16, G64])
def test_pagemap_entry_of_an_address_is_at_its_page_number(tmp_path, g):
    """One 8-byte entry per base page: the entry of address A is at (A >> page_shift) * 8."""
    pid = 4242
    (tmp_path / str(pid)).mkdir()
    pages = 64
    entries = np.arange(1, pages + 1, dtype=np.uint64) | np.uint64(PM_PRESENT)
    start = 40 * g.page_size
    image = np.zeros(40 + pages, dtype=np.uint64)
    image[40:] = entries
    (tmp_path / str(pid) / "pagemap").write_bytes(image.tobytes())
    with PageMap(str(tmp_path), pid, g.page_shift) as pm:
        got = pm.read(start + 3 * g.page_size, start + 7 * g.page_size)
    assert got.tolist() == entries[3:7].tolist()


def test_read_geometry_takes_the_kernels_pmd_size(tmp_path):
    thp = tmp_path / "kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "hpage_pmd_size").write_text(f"{G16.pmd_size}\n")
    g = read_geometry(str(tmp_path))
    assert g.pmd_size == G16.pmd_size  # the page size is this machine's own (sysconf)
