"""LACK_REFERENCED_PAGE from idle page tracking (/sys/kernel/mm/page_idle/bitmap).

This machine's kernel has no CONFIG_IDLE_PAGE_TRACKING, so the bitmap is a fixture: a
regular file laid out as the kernel's (one bit per PFN, bit pfn % 64 of 64-bit word
pfn // 64). The test plays the kernel's part in it: a bit it sets is a frame marked idle
that nothing touched since; a bit it clears is a frame whose PTE the kernel found young.
Everything else is real: real processes, their real PFNs from pagemap, real collapses by
the daemon, contents verified. One difference from the kernel's bitmap: a write to a file
replaces whole words, where the kernel ignores the 0 bits; so the tests let the daemon
mark one window only, whose words no other write touches.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hugepaged.kernel.pageidle import PageIdle, open_page_idle
from kit.daemon_runner import Daemon, settled
from kit.helpers import (
    HPAGE,
    KHUGEPAGED_PAUSED,
    Workload,
    drain_lru,
    khugepaged_full_scans,
    pagemap,
    pmd_mapped_windows,
    saved_thp,
)

from .hugepaged_fixture import fixture_command
from .marks import kernel_test

PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
BITMAP_BYTES = 4 << 20  # PFNs up to 2**25: 128 GiB of RAM, more than this machine has
FAST = {"enabled": "madvise", "max_cpu_percent": 0, "scan_sleep_millisecs": 0}


def fixture_cli(*args: str) -> subprocess.CompletedProcess:
    """`hugepaged ARGS...` with --page-idle, which only the tests' entry point offers."""
    return subprocess.run(fixture_command(*args), capture_output=True, text=True, timeout=60,
                          cwd="/", stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------------------------
# The fixture bitmap, read and written by the test's own code


def new_bitmap(tmp_path: Path) -> Path:
    path = tmp_path / "bitmap"
    with open(path, "wb") as f:
        f.truncate(BITMAP_BYTES)
    return path


def set_bits(path: Path, pfns, idle: bool) -> None:
    """Mark (idle=True) or touch (idle=False) these frames, as the kernel would show them."""
    words = np.fromfile(path, dtype="<u8")
    for pfn in pfns:
        bit = np.uint64(1) << np.uint64(pfn % 64)
        words[pfn // 64] = words[pfn // 64] | bit if idle else words[pfn // 64] & ~bit
    words.tofile(path)


def idle_bits(path: Path, pfns) -> list[bool]:
    words = np.fromfile(path, dtype="<u8")
    return [bool((int(words[p // 64]) >> (p % 64)) & 1) for p in pfns]


def mapped(w: Workload, name: str) -> list[bool]:
    r = w.regions[name]
    return pmd_mapped_windows(w.pid, r.start, r.end)


def frames(w: Workload, name: str, window: int = 0) -> list[int]:
    """The PFNs of one window's present pages (the tests' own pagemap read)."""
    start = w.regions[name].window_start(window)
    pm = pagemap(w.pid, start, start + HPAGE)
    return [int(e) & PFN_MASK for e in pm if int(e) & PRESENT]


# --------------------------------------------------------------------------------------------
# The kernel layer on the fixture


def test_bits_are_the_kernels_layout(tmp_path):
    path = new_bitmap(tmp_path)
    pfns = np.array([[1, 63, 64, 1000], [5000, 0, 0, 1 << 24]], dtype=np.uint64)
    idle = PageIdle(str(path))
    try:
        idle.mark(pfns[:, :2])  # 1, 63, 5000 (0 is no frame)
        assert idle_bits(path, [1, 63, 64, 1000, 5000]) == [True, True, False, False, True]
        set_bits(path, [1000, 1 << 24], idle=True)
        got = idle.idle(pfns)
        assert got.shape == pfns.shape
        assert got.tolist() == [[True, True, False, True], [True, False, False, True]]
        # Past the bitmap's end (a frame the kernel does not have): not idle, no error.
        assert idle.idle(np.array([BITMAP_BYTES * 8 + 5], dtype=np.uint64)).tolist() == [False]
    finally:
        idle.close()


def test_no_bitmap_no_source(tmp_path):
    assert open_page_idle(str(tmp_path / "absent")) is None


# --------------------------------------------------------------------------------------------
# scan reads the bits and marks nothing, and agrees with the kernel's khugepaged; collapse
# (MADV_COLLAPSE) has no young-bit check

SENTINEL = [{"name": "sentinel", "windows": 1, "fill": "first:1", "hugepage": True}]


@kernel_test
def test_scan_agrees_with_khugepaged_on_a_cold_window(tmp_path):
    """MADV_COLD clears what the kernel reads as referenced (the PTEs' young bits and
    PG_referenced), for real; the fixture shows the young bits as idle page tracking would
    after the daemon's mark. The warm window's pages keep PG_referenced (kpageflags), which
    is enough for both: the fixture marks its frames idle too."""
    path = new_bitmap(tmp_path)
    layout = [{"name": "warm", "windows": 1, "hugepage": True},
              {"name": "cold", "windows": 1, "hugepage": True, "cold": True}]
    # A registered process first, so that the workload's registration does not wake the
    # paused khugepaged for a pass (see test_oracle).
    with saved_thp(enabled="madvise", max_ptes_none=511, **KHUGEPAGED_PAUSED), \
            Workload(regions=SENTINEL):
        time.sleep(0.1)
        with Workload(regions=layout) as w:
            drain_lru()  # MADV_COLD deactivates through a per-CPU batch
            set_bits(path, frames(w, "cold") + frames(w, "warm"), idle=True)
            before = path.read_bytes()
            res = fixture_cli("scan", "--pid", str(w.pid), "--json", "--page-idle", str(path))
            assert res.returncode == 0, res.stderr
            doc = json.loads(res.stdout)
            assert doc["referenced_known"] is True
            results = doc["processes"][0]["results"]
            assert results.get("LACK_REFERENCED_PAGE") == 1, results
            assert results.get("SUCCEED", 0) >= 1, results
            assert path.read_bytes() == before  # scan marked nothing
            text = fixture_cli("scan", "--pid", str(w.pid), "--page-idle", str(path))
            assert "referenced: from idle page tracking" in text.stdout

            # The kernel's khugepaged: it collapses the warm window and leaves the cold one.
            khugepaged_full_scans(2)
            assert mapped(w, "warm") == [True]
            assert mapped(w, "cold") == [False]
            w.verify()

            res = fixture_cli("collapse", "--pid", str(w.pid), "--page-idle", str(path))
            assert res.returncode == 0, res.stderr
            assert mapped(w, "cold") == [True]
            w.verify()


# --------------------------------------------------------------------------------------------
# The daemon marks the windows it leaves and, on its next visit, leaves the untouched ones


@kernel_test
def test_daemon_marks_what_it_leaves_and_skips_it_until_touched(tmp_path):
    path = new_bitmap(tmp_path)
    with saved_thp(enabled="never"), \
            Workload(regions=[{"name": "warm", "windows": 2, "hugepage": True},
                              {"name": "sparse", "windows": 1, "fill": "first:100",
                               "hugepage": True, "cold": True}]) as w:
        sparse, warm = frames(w, "sparse"), frames(w, "warm", 0) + frames(w, "warm", 1)
        assert len(sparse) == 100
        # Visit 1: the full windows collapse (never marked, and PG_referenced); the sparse
        # one (MADV_COLD: PG_referenced cleared) fails on its empty PTEs and is marked.
        with Daemon(pids=[w.pid], sets={**FAST, "max_ptes_none": 64},
                    args=["--page-idle", str(path)], command=fixture_command()) as d:
            assert d.status()["referenced_source"] == "page_idle"
            st = d.wait_for(lambda st: settled(st, w.pid), timeout=30, what="first visit")
            assert st["results"].get("EXCEED_NONE_PTE", 0) >= 1
            assert mapped(w, "warm") == [True, True]
            assert all(idle_bits(path, sparse))  # marked by the daemon
            assert not any(idle_bits(path, warm))  # collapsed windows are not marked

            # Visit 2, the rules relaxed: nothing touched the sparse window since it was
            # marked, so khugepaged's young-bit check leaves it.
            assert d.set("max_ptes_none", 511)["ok"]
            st = d.wait_for(lambda st: st["results"].get("LACK_REFERENCED_PAGE", 0) >= 1,
                            timeout=30, what="LACK_REFERENCED_PAGE")
            assert mapped(w, "sparse") == [False]
            assert all(idle_bits(path, sparse))  # marked again

            # One page touched (the kernel found its PTE young): the next visit collapses.
            set_bits(path, sparse[40:41], idle=False)
            assert d.set("max_ptes_none", 510)["ok"]  # new rules wake the slot
            d.wait_for(lambda st: st["counters"]["pages_collapsed"] >= 3, timeout=30,
                       what="the touched window collapsed")
            assert mapped(w, "sparse") == [True]
        w.verify()


@pytest.mark.skipif(not Path("/sys/kernel/mm/page_idle/bitmap").exists(),
                    reason="this kernel has no idle page tracking (CONFIG_IDLE_PAGE_TRACKING): "
                           "the fixture tests above stand in for it")
@kernel_test
def test_the_kernels_bitmap_where_it_exists():
    with Workload(regions=[{"name": "a", "windows": 1}]) as w:
        pfns = np.array(frames(w, "a"), dtype=np.uint64)
        idle = open_page_idle("/sys/kernel/mm/page_idle/bitmap")
        assert idle is not None
        try:
            idle.mark(pfns)
            assert idle.idle(pfns).all()
            w.touch("a")
            assert not idle.idle(pfns).any()
        finally:
            idle.close()
