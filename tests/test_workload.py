"""Tests of the test workload (kit/workload.py) and of the independent checks in helpers.py.

Real processes on the real kernel; root needed (PFNs in pagemap, /proc/kpageflags, THP knobs).
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import subprocess
import sys
import time

import numpy as np
import pytest

from kit.helpers import (
    HPAGE,
    KHUGEPAGED_DIR,
    PAGE,
    PAGES_PER_WINDOW,
    PM_EXCLUSIVE,
    PM_PFN_MASK,
    PM_PRESENT,
    WORKLOAD,
    Workload,
    anon_huge_kb,
    exclusive_per_window,
    kpageflags,
    pagemap,
    pmd_mapped_windows,
    present_per_window,
    proc_status,
    read_enabled,
    read_knob,
    saved_thp,
    smaps_vma,
    vm_flags,
)

from . import marks

pytestmark = marks.KERNEL

MADV_COLLAPSE = 25
KPF_ZERO_PAGE = 1 << 24
SYS_PROCESS_MADVISE = {"x86_64": 440, "aarch64": 440}.get(platform.machine())


def collapse(pid: int, start: int, end: int) -> None:
    """process_madvise(MADV_COLLAPSE) one window at a time (written here, not from hugepaged)."""
    if SYS_PROCESS_MADVISE is None:
        pytest.skip("process_madvise syscall number unknown here")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    pidfd = os.pidfd_open(pid)
    try:
        for addr in range(start, end, HPAGE):
            iov = Iovec(addr, HPAGE)
            rc = libc.syscall(ctypes.c_long(SYS_PROCESS_MADVISE), ctypes.c_int(pidfd),
                              ctypes.byref(iov), ctypes.c_size_t(1), ctypes.c_int(MADV_COLLAPSE),
                              ctypes.c_uint(0))
            if rc < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"process_madvise(COLLAPSE, {addr:#x}): {os.strerror(err)}")
    finally:
        os.close(pidfd)


def test_fill_all_is_4k_mapped(thp_never):
    with Workload(regions=[{"name": "a", "windows": 3, "fill": "all", "hugepage": True}]) as w:
        r = w.regions["a"]
        assert r.windows == 3 and r.end - r.start == 3 * HPAGE and r.start % HPAGE == 0
        assert r.touched == list(range(PAGES_PER_WINDOW)) and r.zero == []
        assert present_per_window(w.pid, r.start, r.end) == [512] * 3
        assert exclusive_per_window(w.pid, r.start, r.end) == [512] * 3
        assert pmd_mapped_windows(w.pid, r.start, r.end) == [False] * 3
        assert anon_huge_kb(w.pid, r.start) == 0
        vma = smaps_vma(w.pid, r.start)
        assert (vma["start"], vma["end"]) == (r.start, r.end)  # the VMA is exactly the region
        assert "hg" in vma["VmFlags"]
        w.verify()


def test_collapse_is_seen_by_independent_check(thp_never):
    """MADV_COLLAPSE from outside: the helpers see PMD mappings; the content survives."""
    spec = {"name": "a", "windows": 2, "fill": "first:100", "zero_pages": "first:5",
            "hugepage": True}
    with Workload(regions=[spec]) as w:
        r = w.regions["a"]
        collapse(w.pid, r.start, r.start + HPAGE)  # the first window only
        assert pmd_mapped_windows(w.pid, r.start, r.end) == [True, False]
        assert anon_huge_kb(w.pid, r.start) == 2048
        assert present_per_window(w.pid, r.start, r.end) == [512, 105]
        w.verify()


def test_first_n_and_zero_pages(thp_never):
    spec = {"name": "z", "windows": 2, "fill": "first:10", "zero_pages": "first:4"}
    with Workload(regions=[spec]) as w:
        r = w.regions["z"]
        assert r.touched == list(range(10)) and r.zero == [10, 11, 12, 13]
        assert present_per_window(w.pid, r.start, r.end) == [14, 14]
        assert exclusive_per_window(w.pid, r.start, r.end) == [10, 10]
        e = pagemap(w.pid, r.start, r.end).reshape(2, PAGES_PER_WINDOW)
        zero = e[:, 10:14]
        assert ((zero & np.uint64(PM_PRESENT)) != 0).all()
        assert ((zero & np.uint64(PM_EXCLUSIVE)) == 0).all()
        pfns = set((zero & np.uint64(PM_PFN_MASK)).ravel().tolist())
        assert len(pfns) == 1  # all the same frame: the shared zero page
        assert int(kpageflags(list(pfns))[0]) & KPF_ZERO_PAGE
        assert ((e[:, 14:] & np.uint64(PM_PRESENT)) == 0).all()
        assert pmd_mapped_windows(w.pid, r.start, r.end) == [False, False]
        w.verify()


def test_every_and_pages_patterns(thp_never):
    regions = [
        {"name": "every", "windows": 2, "fill": "every:3"},
        {"name": "pages", "windows": 1, "fill": "pages:[500,3,3,77]", "zero_pages": "first:2"},
        {"name": "none", "windows": 1, "fill": "none"},
    ]
    with Workload(regions=regions) as w:
        ev, pg, no = w.regions["every"], w.regions["pages"], w.regions["none"]
        assert ev.touched == list(range(0, 512, 3))
        assert present_per_window(w.pid, ev.start, ev.end) == [171, 171]
        assert pg.touched == [3, 77, 500] and pg.zero == [0, 1]
        e = pagemap(w.pid, pg.start, pg.end)
        present = np.flatnonzero((e & np.uint64(PM_PRESENT)) != 0).tolist()
        assert present == [0, 1, 3, 77, 500]
        assert present_per_window(w.pid, no.start, no.end) == [0]
        # Regions never share a VMA, even with equal flags.
        assert {(smaps_vma(w.pid, x.start)["start"], smaps_vma(w.pid, x.start)["end"])
                for x in (ev, pg, no)} == {(x.start, x.end) for x in (ev, pg, no)}
        w.verify()


def _poke(pid: int, addr: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        assert os.pwrite(fd, data, addr) == len(data)
    finally:
        os.close(fd)


def test_corruption_is_detected_and_touch_repairs(thp_never):
    with Workload(regions=[{"name": "c", "windows": 2, "fill": "first:8",
                            "zero_pages": "first:2"}]) as w:
        r = w.regions["c"]
        w.verify()
        _poke(w.pid, r.page_addr(1, 5) + 123, b"\xff")
        with pytest.raises(AssertionError, match=r"\['c', 1, 5\]"):
            w.verify()
        w.touch("c")
        w.verify()
        _poke(w.pid, r.page_addr(0, 9) + 8, b"\x01")  # a zero page, now a private copy
        with pytest.raises(AssertionError, match=r"\['c', 0, 9\]"):
            w.verify()


def test_fork_child_share_after_fork(thp_never):
    regions = [
        {"name": "s", "windows": 2, "fill": "first:64", "share_after_fork": 16,
         "hugepage": True},
        {"name": "all_shared", "windows": 1, "fill": "first:32"},
    ]
    with Workload(regions=regions, fork_child=True) as w:
        assert w.child_pid and w.child_pid != w.pid
        s, a = w.regions["s"], w.regions["all_shared"]
        assert present_per_window(w.pid, s.start, s.end) == [64, 64]
        assert exclusive_per_window(w.pid, s.start, s.end) == [48, 48]
        e = pagemap(w.pid, s.start, s.end).reshape(2, PAGES_PER_WINDOW)
        shared = ((e & np.uint64(PM_EXCLUSIVE)) == 0) & ((e & np.uint64(PM_PRESENT)) != 0)
        assert [np.flatnonzero(row).tolist() for row in shared] == [list(range(48, 64))] * 2
        assert exclusive_per_window(w.pid, a.start, a.end) == [0]
        assert present_per_window(w.pid, a.start, a.end) == [32]
        assert "hg" in vm_flags(w.pid, s.start)
        child_flags = vm_flags(w.child_pid, s.start)
        assert "nh" in child_flags and "hg" not in child_flags
        w.verify()
        child = w.child_pid
    assert not os.path.exists(f"/proc/{child}") or _is_zombie(child)


def _is_zombie(pid: int) -> bool:
    try:
        return proc_status(pid).get("State", "").startswith("Z")
    except FileNotFoundError:
        return True


def test_child_dies_with_parent(thp_never):
    w = Workload(regions=[{"name": "a", "windows": 1, "fill": "first:1"}], fork_child=True)
    with w:
        child_fd = os.pidfd_open(w.child_pid)
        try:
            w.proc.kill()
            ready, _, _ = select.select([child_fd], [], [], 5)
            assert ready, "the forked child outlived its parent"
        finally:
            os.close(child_fd)


def _status_text(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return f.read()


def test_prctl_thp_disable():
    with Workload(regions=[{"name": "a", "windows": 1, "fill": "first:2"}],
                  prctl_thp_disable=True) as w:
        assert "THP_enabled:\t0\n" in _status_text(w.pid)
    with Workload(regions=[{"name": "a", "windows": 1, "fill": "first:2"}]) as w:
        assert "THP_enabled:\t1\n" in _status_text(w.pid)


def test_faults_are_4k_even_under_always():
    """THP is off for the workload while it faults, so enabled=always cannot give it huge
    pages at fault time. (max_ptes_none=0 keeps the kernel's khugepaged from collapsing these
    partly filled windows meanwhile.)"""
    with saved_thp(enabled="always", max_ptes_none=0), Workload(regions=[
        {"name": "a", "windows": 2, "fill": "first:100", "zero_pages": "first:3"},
        {"name": "h", "windows": 2, "fill": "first:100", "hugepage": True},
    ]) as w:
        for r in w.regions.values():
            assert pmd_mapped_windows(w.pid, r.start, r.end) == [False, False]
        assert present_per_window(w.pid, w.regions["a"].start, w.regions["a"].end) == [103, 103]
        assert present_per_window(w.pid, w.regions["h"].start, w.regions["h"].end) == [100, 100]
        assert "THP_enabled:\t1\n" in _status_text(w.pid)


def test_vm_flags_mlock_hugepage_nohugepage(thp_never):
    regions = [
        {"name": "locked", "windows": 2, "fill": "first:3", "mlock": True},
        {"name": "hg", "windows": 1, "fill": "first:3", "hugepage": True},
        {"name": "nh", "windows": 1, "fill": "first:3", "nohugepage": True},
    ]
    with Workload(regions=regions) as w:
        lo, hg, nh = (w.regions[n] for n in ("locked", "hg", "nh"))
        assert "lo" in vm_flags(w.pid, lo.start)
        # mlock2(MLOCK_ONFAULT): locked, but the layout is unchanged.
        assert present_per_window(w.pid, lo.start, lo.end) == [3, 3]
        assert "hg" in vm_flags(w.pid, hg.start) and "nh" not in vm_flags(w.pid, hg.start)
        assert "nh" in vm_flags(w.pid, nh.start) and "hg" not in vm_flags(w.pid, nh.start)
        assert not {"hg", "nh", "lo"} & vm_flags(w.pid, w.regions["locked"].start - PAGE)
        w.verify()


def test_exit_on_stdin_eof_and_bad_spec():
    w = Workload(regions=[{"name": "a", "windows": 1, "fill": "first:1"}]).start()
    try:
        w.proc.stdin.close()
        assert w.proc.wait(timeout=5) == 0
    finally:
        w.close()
    bad = subprocess.run([sys.executable, str(WORKLOAD), '{"regions": [{"name": "x"}]}'],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "windows" in bad.stderr
    with pytest.raises(RuntimeError, match="share_after_fork"):
        Workload(regions=[{"name": "a", "windows": 1, "share_after_fork": 1}]).start()


def test_saved_thp_restores_on_error_and_interrupt():
    before_enabled = read_enabled()
    before_scan = read_knob("pages_to_scan")
    new_scan = "4097" if before_scan != "4097" else "4098"
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc), saved_thp(enabled="never", pages_to_scan=new_scan) as saved:
            assert saved == {"enabled": before_enabled, "pages_to_scan": before_scan}
            assert read_enabled() == "never"
            assert (KHUGEPAGED_DIR / "pages_to_scan").read_text().strip() == new_scan
            raise exc("boom")
        assert read_enabled() == before_enabled
        assert read_knob("pages_to_scan") == before_scan
    # A rejected write (EINVAL) restores what was already changed.
    with pytest.raises(OSError), saved_thp(enabled="never", max_ptes_none=512):
        pass
    assert read_enabled() == before_enabled
    with pytest.raises(ValueError), saved_thp(enabled="never", no_such_knob=1):
        pass
    assert read_enabled() == before_enabled


def test_big_region_is_quick(thp_never):
    t0 = time.monotonic()
    with Workload(regions=[{"name": "big", "windows": 128, "fill": "all"}]) as w:
        r = w.regions["big"]
        assert sum(present_per_window(w.pid, r.start, r.end)) == 128 * PAGES_PER_WINDOW
        w.verify()
    assert time.monotonic() - t0 < 10
