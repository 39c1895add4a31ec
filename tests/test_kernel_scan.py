"""hugepaged's per-window decisions on real processes, both scan paths (PAGEMAP_SCAN and plain
pagemap), checked against layouts the workload builds and the independent helpers read back.

The kernel's own khugepaged is kept out (kernel `enabled=never` for the module); hugepaged is
given `enabled=madvise` (or `always`) so MADV_HUGEPAGE VMAs stay candidates for it.
"""

from __future__ import annotations

import os

import pytest

from hugepaged.collapse import collapse_window, retry_transient
from hugepaged.kernel import Kernel
from hugepaged.policy import CollapseControl
from hugepaged.results import ScanResult as R
from hugepaged.scan.process import ProcessScan, scan_process
from hugepaged.tunables import Tunables
from kit.helpers import (
    HPAGE,
    PM_PFN_MASK,
    Workload,
    drain_lru,
    exclusive_per_window,
    kpageflags,
    pagemap,
    pmd_mapped_windows,
    present_per_window,
    saved_thp,
    vm_flags,
)

from . import marks

pytestmark = marks.KERNEL

SCAN_PATHS = [pytest.param(True, id="pagemap_scan"), pytest.param(False, id="pagemap")]


class Skip:
    """Expected: the whole VMA is not a candidate; `word` must appear in the reason."""

    def __init__(self, word: str) -> None:
        self.word = word

    def __repr__(self) -> str:
        return f"Skip({self.word!r})"


MADV_COLLAPSE = 25
KPF_LRU = 1 << 5


def run_scan(kernel: Kernel, pid: int, use_scan: bool, force: bool = False,
             drain: bool = True, **values) -> ProcessScan:
    tunables = Tunables().with_values({"enabled": "madvise", **values})
    if drain:
        drain_lru()
    with kernel.kpageflags() as kpf:
        return scan_process(kernel, pid, CollapseControl.from_tunables(tunables, force=force),
                            kpf, use_pagemap_scan=use_scan)


def per_region(scan: ProcessScan, w: Workload) -> dict[str, list[R] | str]:
    """Each region's window codes, or its VMA's skip reason."""
    by_start = {v.vma.start: v for v in scan.vmas}
    out: dict[str, list[R] | str] = {}
    for name, r in w.regions.items():
        v = by_start[r.start]
        assert v.vma.end == r.end, f"region {name} is not one VMA"
        if v.skip is not None:
            assert v.codes.size == 0
            out[name] = v.skip
            continue
        assert v.starts.tolist() == [r.window_start(i) for i in range(r.windows)]
        out[name] = [R(int(c)) for c in v.codes]
    return out


def check(got: dict, want: dict) -> None:
    wrong = {}
    for name, exp in want.items():
        g = got[name]
        if isinstance(exp, Skip):
            ok = isinstance(g, str) and exp.word.lower() in g.lower()
        else:
            ok = g == exp
        if not ok:
            wrong[name] = (g, exp)
    assert not wrong, "region: (hugepaged, expected): " + repr(wrong)


# --------------------------------------------------------------------------------------------
# One process with every single-process layout

LAYOUT = [
    {"name": "full", "windows": 2, "fill": "all", "hugepage": True},
    {"name": "empty", "windows": 1, "fill": "none", "hugepage": True},
    {"name": "single", "windows": 1, "fill": "first:1", "hugepage": True},
    # 1 page written, the other 511 the shared zero page: zero pages count as none.
    {"name": "single_zero", "windows": 1, "fill": "first:1", "zero_pages": "first:511",
     "hugepage": True},
    {"name": "k400", "windows": 1, "fill": "first:400", "hugepage": True},  # 112 none
    # 100 empty + 12 zero = 112 none: passes at 112, fails at 111 only if zero counts as none.
    {"name": "k400_zero", "windows": 1, "fill": "first:400", "zero_pages": "first:12",
     "hugepage": True},
    {"name": "all_zero", "windows": 1, "fill": "none", "zero_pages": "first:512",
     "hugepage": True},
    {"name": "locked", "windows": 2, "fill": "all", "hugepage": True, "mlock": True},
    {"name": "nohuge", "windows": 1, "fill": "all", "nohugepage": True},
    {"name": "plain", "windows": 1, "fill": "all"},
    {"name": "pmd", "windows": 2, "fill": "all", "hugepage": True},  # window 0 collapsed first
]


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    return Kernel()


@pytest.fixture(scope="module")
def layout():
    with saved_thp(enabled="never"), Workload(regions=LAYOUT) as w:
        r = w.regions["pmd"]
        pidfd = os.pidfd_open(w.pid)
        try:
            # (asked again after a moment's EAGAIN, as `hugepaged collapse` does)
            out, = retry_transient([collapse_window(pidfd, w.pid, r.start, HPAGE)],
                                   lambda t: [collapse_window(pidfd, w.pid, t[0], HPAGE)])
        finally:
            os.close(pidfd)
        assert out.result == R.SUCCEED, out
        assert pmd_mapped_windows(w.pid, r.start, r.end) == [True, False]
        w.verify()
        yield w


def expected_layout(enabled: str, max_ptes_none: int) -> dict:
    if enabled == "never":
        return {name: Skip("never") for name in (s["name"] for s in LAYOUT)
                if name != "nohuge"} | {"nohuge": Skip("NOHUGEPAGE")}

    def none_ok(n: int) -> R:
        return R.SUCCEED if n <= max_ptes_none else R.EXCEED_NONE_PTE

    return {
        "full": [R.SUCCEED] * 2,
        "empty": [R.PMD_NONE],
        "single": [none_ok(511)],
        "single_zero": [none_ok(511)],
        "k400": [none_ok(112)],
        "k400_zero": [none_ok(112)],
        "all_zero": [R.EXCEED_NONE_PTE],  # 512 none can never be <= 511
        "locked": [R.SUCCEED] * 2,
        "nohuge": Skip("NOHUGEPAGE"),
        "plain": [R.SUCCEED] if enabled == "always" else Skip("HUGEPAGE"),
        "pmd": [R.PMD_MAPPED, R.SUCCEED],
    }


@pytest.mark.parametrize("use_scan", SCAN_PATHS)
@pytest.mark.parametrize(("enabled", "max_ptes_none"), [
    ("madvise", 511), ("madvise", 510), ("madvise", 112), ("madvise", 111), ("madvise", 0),
    ("always", 511), ("always", 111), ("never", 511),
])
def test_layout_decisions(layout, kernel, use_scan, enabled, max_ptes_none):
    scan = run_scan(kernel, layout.pid, use_scan, enabled=enabled, max_ptes_none=max_ptes_none)
    check(per_region(scan, layout), expected_layout(enabled, max_ptes_none))


def test_layout_is_what_the_decisions_assume(layout):
    """The independent view of the layout, so the expectations above rest on facts."""
    w = layout
    counts = {n: present_per_window(w.pid, r.start, r.end) for n, r in w.regions.items()}
    assert counts["single_zero"] == [512] and counts["all_zero"] == [512]
    assert counts["k400_zero"] == [412] and counts["k400"] == [400]
    assert counts["empty"] == [0] and counts["single"] == [1]
    assert "lo" in vm_flags(w.pid, w.regions["locked"].start)
    assert "nh" in vm_flags(w.pid, w.regions["nohuge"].start)
    assert not {"hg", "nh"} & vm_flags(w.pid, w.regions["plain"].start)
    for name, r in w.regions.items():
        want = [True, False] if name == "pmd" else [False] * r.windows
        assert pmd_mapped_windows(w.pid, r.start, r.end) == want, name
    w.verify()


@pytest.mark.parametrize("use_scan", SCAN_PATHS)
def test_present_counts_exclude_zero_pages(layout, kernel, use_scan):
    """VmaScan.present counts normal pages: present PTEs minus zero-page PTEs."""
    scan = run_scan(kernel, layout.pid, use_scan, enabled="always")
    by_start = {v.vma.start: v for v in scan.vmas}
    for name, r in layout.regions.items():
        v = by_start[r.start]
        if v.skip is not None:
            continue
        want = [n - len(r.zero) for n in present_per_window(layout.pid, r.start, r.end)]
        assert v.present.tolist() == want, name


@pytest.mark.parametrize("use_scan", SCAN_PATHS)
def test_force_scan_ignores_limits_not_nohugepage(layout, kernel, use_scan):
    """MADV_COLLAPSE semantics: max_ptes_* and enabled ignored, VM_NOHUGEPAGE still refused."""
    scan = run_scan(kernel, layout.pid, use_scan, force=True, enabled="never", max_ptes_none=0)
    got = per_region(scan, layout)
    check(got, {
        "full": [R.SUCCEED] * 2, "empty": [R.PMD_NONE], "single": [R.SUCCEED],
        "single_zero": [R.SUCCEED], "k400": [R.SUCCEED], "k400_zero": [R.SUCCEED],
        "locked": [R.SUCCEED] * 2, "plain": [R.SUCCEED], "nohuge": Skip("NOHUGEPAGE"),
        "pmd": [R.PMD_MAPPED, R.SUCCEED],
    })


# --------------------------------------------------------------------------------------------
# Pages shared with a forked child

SHARED = [
    {"name": "s40", "windows": 1, "fill": "all", "share_after_fork": 40, "hugepage": True},
    {"name": "s300", "windows": 1, "fill": "all", "share_after_fork": 300, "hugepage": True},
    # Shared pages 360..399, empty 400..511: whichever limit is crossed first names it.
    {"name": "mixed", "windows": 1, "fill": "first:400", "share_after_fork": 40,
     "hugepage": True},
    {"name": "own", "windows": 2, "fill": "all", "share_after_fork": 0, "hugepage": True},
    {"name": "cow", "windows": 1, "fill": "all", "hugepage": True},  # all 512 stay shared
]


@pytest.fixture(scope="module")
def forked():
    with saved_thp(enabled="never"), Workload(regions=SHARED, fork_child=True) as w:
        excl = {n: exclusive_per_window(w.pid, r.start, r.end) for n, r in w.regions.items()}
        assert excl == {"s40": [472], "s300": [212], "mixed": [360], "own": [512, 512],
                        "cow": [0]}
        yield w


def first_fail(shared_at: int, n_shared: int, limit_shared: int,
               none_at: int, n_none: int, limit_none: int) -> R:
    """The kernel's walk: the PTE index at which each count first exceeds its limit."""
    fails = []
    if n_shared > limit_shared:
        fails.append((shared_at + limit_shared, R.EXCEED_SHARED_PTE))
    if n_none > limit_none:
        fails.append((none_at + limit_none, R.EXCEED_NONE_PTE))
    return min(fails)[1] if fails else R.SUCCEED


@pytest.mark.parametrize("use_scan", SCAN_PATHS)
@pytest.mark.parametrize(("max_ptes_none", "max_ptes_shared"), [
    (511, 40), (511, 39), (511, 256), (511, 0), (511, 300), (511, 299),
    (111, 39), (111, 40), (112, 40),
])
def test_shared_boundary(forked, kernel, use_scan, max_ptes_none, max_ptes_shared):
    scan = run_scan(kernel, forked.pid, use_scan, max_ptes_none=max_ptes_none,
                    max_ptes_shared=max_ptes_shared)

    def shared_ok(n: int) -> R:
        return R.SUCCEED if n <= max_ptes_shared else R.EXCEED_SHARED_PTE

    check(per_region(scan, forked), {
        "s40": [shared_ok(40)],
        "s300": [shared_ok(300)],
        "mixed": [first_fail(360, 40, max_ptes_shared, 400, 112, max_ptes_none)],
        "own": [R.SUCCEED] * 2,
        "cow": [shared_ok(512)],
    })


@pytest.mark.parametrize("use_scan", SCAN_PATHS)
def test_forked_child_is_not_a_candidate(forked, kernel, use_scan):
    """The child set MADV_NOHUGEPAGE on its copies: every region is skipped there."""
    scan = run_scan(kernel, forked.child_pid, use_scan, enabled="always")
    by_start = {v.vma.start: v for v in scan.vmas}
    for name, r in forked.regions.items():
        assert "NOHUGEPAGE" in (by_start[r.start].skip or ""), name
    forked.verify()


# --------------------------------------------------------------------------------------------
# PR_SET_THP_DISABLE


@pytest.mark.parametrize("use_scan", SCAN_PATHS)
def test_prctl_thp_disable_skips_everything(kernel, use_scan):
    regions = [{"name": "a", "windows": 2, "fill": "all", "hugepage": True},
               {"name": "b", "windows": 1, "fill": "first:1"}]
    with saved_thp(enabled="never"), Workload(regions=regions, prctl_thp_disable=True) as w:
        for force, enabled in ((False, "madvise"), (False, "always"), (True, "always")):
            scan = run_scan(kernel, w.pid, use_scan, force=force, enabled=enabled)
            assert scan.eligible_windows == 0
            assert all("THP_DISABLE" in (v.skip or "") for v in scan.vmas), \
                {hex(v.vma.start): v.skip for v in scan.vmas}
        # The same layout without the prctl is a candidate: the prctl is what skips it.
        with Workload(regions=regions) as w2:
            scan = run_scan(kernel, w2.pid, use_scan, enabled="always")
            check(per_region(scan, w2), {"a": [R.SUCCEED] * 2, "b": [R.SUCCEED]})
        w.verify()


def test_both_paths_agree_on_whole_process(layout, kernel):
    """Every window of every VMA (the interpreter's own memory too) decided the same way."""
    a = run_scan(kernel, layout.pid, True, enabled="always")
    b = run_scan(kernel, layout.pid, False, enabled="always")
    assert dict(a.windows()) == dict(b.windows())
    assert a.eligible_windows == b.eligible_windows > 0


def test_fresh_page_in_lru_batch(kernel):
    """A page just faulted in is not on an LRU list yet (it waits in a per-CPU batch), so
    /proc/kpageflags shows it without KPF_LRU. The kernel never sees that state when it decides:
    khugepaged_do_scan() and madvise_collapse() both call lru_add_drain_all() first. So the
    window is SUCCEED for the kernel, and must be for hugepaged too, not PAGE_LRU."""
    with saved_thp(enabled="never"), Workload(regions=[
            {"name": "one", "windows": 1, "fill": "pages:[300]", "hugepage": True}]) as w:
        r = w.regions["one"]

        def on_lru() -> bool:
            e = pagemap(w.pid, r.start, r.end)[300]
            return bool(int(kpageflags(e & PM_PFN_MASK)[0]) & KPF_LRU)

        lru_before = on_lru()
        got = {path: per_region(run_scan(kernel, w.pid, path, drain=False), w)["one"]
               for path in (True, False)}
        drain_lru()
        assert on_lru(), "lru_add_drain_all did not put the page on an LRU list"
        after = {path: per_region(run_scan(kernel, w.pid, path), w)["one"]
                 for path in (True, False)}
        w.verify()
        assert after == {True: [R.SUCCEED], False: [R.SUCCEED]}
        assert got == after, (
            f"hugepaged (by use_pagemap_scan) said {got} while the page waited in a per-CPU "
            f"LRU batch (KPF_LRU then: {lru_before}); the kernel drains before it decides")


def _thp_disabled_child() -> None:  # between fork and exec: what a parent's prctl leaves
    import ctypes

    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE, inherited by the exec


def test_lru_drain_with_thp_disabled_for_hugepaged_itself():
    """MADV_COLLAPSE refuses before it drains when THP is off for the caller: hugepaged started
    by a parent with PR_SET_THP_DISABLE re-enables it for itself, says so, and still decides
    a fresh page SUCCEED, not PAGE_LRU."""
    import json
    import subprocess
    import sys

    probe = ("import ctypes, logging; logging.basicConfig(); from hugepaged.kernel import "
             "Kernel; libc = ctypes.CDLL(None); before = libc.prctl(42, 0, 0, 0, 0); "
             "k = Kernel(); k.drain_lru(); k.drain_lru(); "
             "print(before, libc.prctl(42, 0, 0, 0, 0), k._drain.cleared)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, preexec_fn=_thp_disabled_child)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0", "1"]  # disabled, cleared once, stays cleared
    assert "THP was disabled for hugepaged itself" in out.stderr
    with saved_thp(enabled="never"), Workload(regions=[
            {"name": "one", "windows": 1, "fill": "pages:[300]", "hugepage": True}]) as w:
        cli = subprocess.run([sys.executable, "-m", "hugepaged", "scan", "--pid", str(w.pid),
                              "--json", "--set", "enabled=madvise"], capture_output=True,
                             text=True, timeout=60, preexec_fn=_thp_disabled_child)
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["processes"][0]["results"] == {"SUCCEED": 1}
        w.verify()
