"""The kernel's own khugepaged as the oracle for hugepaged's decisions, window for window.

One workload holds many layouts (full windows, first:K windows around max_ptes_none, zero-page
windows, windows shared with a forked child around max_ptes_shared, mlocked memory,
VM_NOHUGEPAGE, no MADV_HUGEPAGE, an already PMD-mapped window). The kernel is at
enabled=madvise from before the workload starts (a MADV_HUGEPAGE given at `never` would not
register the process), but its scanning is paused (pages_to_scan=1, a ~49-day sleep) while
hugepaged decides with the same max_ptes_*. Then the kernel's khugepaged is let loose
(pages_to_scan=65536, scan_sleep_millisecs=0: the write wakes it) until full_scans has advanced
by 2, and the windows it collapsed must be exactly hugepaged's SUCCEED windows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from hugepaged.collapse import collapse_window, retry_transient
from hugepaged.kernel import Kernel
from hugepaged.policy import CollapseControl
from hugepaged.results import ScanResult as R
from hugepaged.scan.process import scan_process
from hugepaged.tunables import Tunables
from kit.helpers import (
    HPAGE,
    KHUGEPAGED_DIR,
    KHUGEPAGED_PAUSED,
    KHUGEPAGED_RUNNING,
    Workload,
    drain_lru,
    exclusive_per_window,
    pagemap,
    pmd_mapped_windows,
    present_per_window,
    saved_thp,
)

from . import marks

pytestmark = marks.ORACLE

PAUSED, RUNNING = KHUGEPAGED_PAUSED, KHUGEPAGED_RUNNING
FULL_SCANS_TIMEOUT = 30.0

# Every region sets share_after_fork (0: all its pages are made private again), because with a
# forked child a region without it stays wholly shared.
LAYOUT = [
    {"name": "full", "windows": 4, "fill": "all", "share_after_fork": 0},
    {"name": "k412", "windows": 1, "fill": "first:412", "share_after_fork": 0},  # 100 none
    {"name": "k411", "windows": 1, "fill": "first:411", "share_after_fork": 0},  # 101 none
    {"name": "k413", "windows": 1, "fill": "first:413", "share_after_fork": 0},  # 99 none
    {"name": "k1", "windows": 1, "fill": "first:1", "share_after_fork": 0},
    {"name": "every2", "windows": 1, "fill": "every:2", "share_after_fork": 0},  # 256 none
    # 50 empty + 50 zero-page PTEs = 100 none; 51 + 50 = 101; 212 zero and nothing empty.
    {"name": "zero100", "windows": 1, "fill": "first:412", "zero_pages": "first:50",
     "share_after_fork": 0},
    {"name": "zero101", "windows": 1, "fill": "first:411", "zero_pages": "first:50",
     "share_after_fork": 0},
    {"name": "zero212", "windows": 1, "fill": "first:300", "zero_pages": "first:212",
     "share_after_fork": 0},
    {"name": "empty", "windows": 1, "fill": "none", "share_after_fork": 0},
    {"name": "s20", "windows": 2, "fill": "all", "share_after_fork": 20},
    {"name": "s21", "windows": 2, "fill": "all", "share_after_fork": 21},
    {"name": "s400", "windows": 1, "fill": "all", "share_after_fork": 400},
    # 92 none and 20 / 21 shared (pages 400..419, the none are 420..511).
    {"name": "mixed20", "windows": 1, "fill": "first:420", "share_after_fork": 20},
    {"name": "mixed21", "windows": 1, "fill": "first:420", "share_after_fork": 21},
    {"name": "locked", "windows": 2, "fill": "all", "mlock": True, "share_after_fork": 0},
    {"name": "pre", "windows": 2, "fill": "all", "share_after_fork": 0},  # window 0 collapsed
    {"name": "nohuge", "windows": 2, "fill": "all", "nohugepage": True, "share_after_fork": 0},
    {"name": "plain", "windows": 2, "fill": "all", "share_after_fork": 0, "hugepage": False},
]
for _r in LAYOUT:
    _r.setdefault("hugepage", not _r.get("nohugepage", False))


def _pages(fill: str) -> list[int]:
    if fill == "all":
        return list(range(512))
    if fill == "none":
        return []
    kind, _, n = fill.partition(":")
    return list(range(int(n))) if kind == "first" else list(range(0, 512, int(n)))


def expected(spec: dict, max_ptes_none: int, max_ptes_shared: int) -> list[R] | None:
    """hugepaged's verdicts for one region of LAYOUT, worked out from its spec: the kernel's
    walk stops at the first PTE where the none (empty or zero-page) or the shared count
    exceeds its limit. None: not a candidate (VM_NOHUGEPAGE, or no MADV_HUGEPAGE)."""
    if not spec["hugepage"]:
        return None
    touched = _pages(spec["fill"])
    zero = int(spec.get("zero_pages", "first:0").partition(":")[2])
    if not touched and not zero:
        code = R.PMD_NONE
    else:
        nones = [p for p in range(512) if p not in set(touched)]
        shared = touched[len(touched) - spec["share_after_fork"]:]
        fails = []
        if len(nones) > max_ptes_none:
            fails.append((nones[max_ptes_none], R.EXCEED_NONE_PTE))
        if len(shared) > max_ptes_shared:
            fails.append((shared[max_ptes_shared], R.EXCEED_SHARED_PTE))
        code = min(fails)[1] if fails else R.SUCCEED
    codes = [code] * spec["windows"]
    if spec["name"] == "pre":
        codes[0] = R.PMD_MAPPED
    return codes


def full_scans() -> int:
    return int((KHUGEPAGED_DIR / "full_scans").read_text())


def vmstat() -> dict[str, int]:
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f) if k.startswith("thp_")}


def page_state(w: Workload, names) -> dict[str, list[dict[str, int]]]:
    """Per window: present, exclusive, swap-type entries; for a failure message."""
    out = {}
    for n in names:
        r = w.regions[n]
        e = pagemap(w.pid, r.start, r.end).reshape(-1, 512)
        present = (e & np.uint64(1 << 63)) != 0
        excl = (e & np.uint64(1 << 56)) != 0
        swap = (e & np.uint64(1 << 62)) != 0
        out[n] = [{"present": int(p.sum()), "exclusive": int((p & x).sum()),
                   "swap": int(s.sum()), "first_shared": int(np.argmax(p & ~x))}
                  for p, x, s in zip(present, excl, swap, strict=True)]
    return out


def hugepaged_verdicts(kernel: Kernel, w: Workload, use_scan: bool, limits: tuple[int, int]):
    tunables = Tunables().with_values({"enabled": "madvise", "max_ptes_none": limits[0],
                                       "max_ptes_shared": limits[1]})
    with kernel.kpageflags() as kpf:
        scan = scan_process(kernel, w.pid, CollapseControl.from_tunables(tunables), kpf,
                            use_pagemap_scan=use_scan)
    by_start = {v.vma.start: v for v in scan.vmas}
    verdicts = {}
    for name, r in w.regions.items():
        v = by_start[r.start]
        assert v.vma.end == r.end
        verdicts[name] = None if v.skip else [R(int(c)) for c in v.codes]
    return scan, verdicts


@pytest.mark.parametrize(("max_ptes_none", "max_ptes_shared"), [(100, 20), (511, 256), (0, 0)])
def test_khugepaged_agrees_window_for_window(max_ptes_none, max_ptes_shared):
    kernel = Kernel()
    knobs = {"enabled": "madvise", "defrag": 1, "max_ptes_none": max_ptes_none,
             "max_ptes_shared": max_ptes_shared, "max_ptes_swap": 64, **PAUSED}
    # A registered process first, so that the workload's registration does not find the
    # kernel's list empty and wake khugepaged for a pass (of one window, maybe ours, before the
    # fork: seen as 100 pages shared with the child afterwards). Registering takes a VMA that
    # has been faulted in (an anon_vma), hence one page.
    sentinel = [{"name": "sentinel", "windows": 1, "fill": "first:1", "hugepage": True}]
    with saved_thp(**knobs), Workload(regions=sentinel):
        time.sleep(0.1)  # the pass the sleep write triggered has long finished
        with Workload(regions=LAYOUT, fork_child=True) as w:
            _run_oracle(kernel, w, (max_ptes_none, max_ptes_shared))


def _run_oracle(kernel: Kernel, w: Workload, limits: tuple[int, int]) -> None:
    want = {spec["name"]: expected(spec, *limits) for spec in LAYOUT}
    pre = w.regions["pre"]
    pidfd = os.pidfd_open(w.pid)
    try:
        # (asked again after a moment's EAGAIN, as `hugepaged collapse` does)
        out, = retry_transient([collapse_window(pidfd, w.pid, pre.start, HPAGE)],
                               lambda t: [collapse_window(pidfd, w.pid, t[0], HPAGE)])
        assert out.result == R.SUCCEED, out
    finally:
        os.close(pidfd)
    w.verify()
    before = {n: pmd_mapped_windows(w.pid, r.start, r.end) for n, r in w.regions.items()}
    assert before == {n: [n == "pre" and i == 0 for i in range(r.windows)]
                      for n, r in w.regions.items()}, "khugepaged ran while it was paused"
    # A window collapsed before the fork and split by the writes after it would pass the
    # check above: so every window must also hold exactly the pages the workload faulted.
    present = {n: present_per_window(w.pid, r.start, r.end) for n, r in w.regions.items()}
    assert present == {n: [512 if n == "pre" and i == 0 else len(r.touched) + len(r.zero)
                           for i in range(r.windows)] for n, r in w.regions.items()}, \
        "khugepaged ran while it was paused"
    # The layout, read independently.
    excl = {n: exclusive_per_window(w.pid, w.regions[n].start, w.regions[n].end)
            for n in ("s20", "s21", "s400", "mixed20", "mixed21", "k412", "zero100")}
    assert excl == {"s20": [492, 492], "s21": [491, 491], "s400": [112], "mixed20": [400],
                    "mixed21": [399], "k412": [412], "zero100": [412]}

    # hugepaged decides, both scan paths, with the kernel's tunables.
    drain_lru()
    scans = {}
    for use_scan in (True, False):
        scans[use_scan], verdicts = hugepaged_verdicts(kernel, w, use_scan, limits)
        if verdicts != want:
            wrong = {n: (verdicts[n], want[n]) for n in want if verdicts[n] != want[n]}
            state = page_state(w, wrong)
            again = hugepaged_verdicts(kernel, w, use_scan, limits)[1]
            pytest.fail(f"use_pagemap_scan={use_scan}: region: (hugepaged, expected) {wrong}; "
                        f"page state now: {state}; hugepaged again: "
                        f"{ {n: again[n] for n in wrong} }")
    assert dict(scans[True].windows()) == dict(scans[False].windows())
    # `hugepaged scan` with no --set takes enabled and max_ptes_* from the kernel: same counts.
    cli = subprocess.run([sys.executable, "-m", "hugepaged", "scan", "--pid", str(w.pid),
                          "--json"],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)
    assert doc["tunables"]["enabled"] == "madvise"
    assert (doc["tunables"]["max_ptes_none"], doc["tunables"]["max_ptes_shared"]) == limits
    assert doc["processes"][0]["results"] == {
        r.name: n for r, n in sorted(scans[True].results().items())}

    # The kernel's turn.
    stats0, scans0 = vmstat(), full_scans()
    t0 = time.monotonic()
    with saved_thp(**RUNNING):
        while full_scans() < scans0 + 2:
            if time.monotonic() - t0 > FULL_SCANS_TIMEOUT:
                pytest.fail(f"khugepaged's full_scans went {scans0} -> {full_scans()} in "
                            f"{FULL_SCANS_TIMEOUT} s")
            time.sleep(0.01)
        after = {n: pmd_mapped_windows(w.pid, r.start, r.end) for n, r in w.regions.items()}
    seconds = time.monotonic() - t0
    stats = {k: v - stats0.get(k, 0) for k, v in vmstat().items() if v != stats0.get(k, 0)}
    w.verify()

    disagree = []
    for name, r in w.regions.items():
        verdicts = want[name] or [None] * r.windows
        for i, (verdict, was, now) in enumerate(zip(verdicts, before[name], after[name],
                                                    strict=True)):
            kernel_collapsed = now and not was
            if was:
                ok = now and verdict == R.PMD_MAPPED
            else:
                ok = kernel_collapsed == (verdict == R.SUCCEED)
            if not ok:
                disagree.append(f"{name}[{i}] @ {r.window_start(i):#x}: hugepaged "
                                f"{verdict.name if verdict else 'not a candidate'}, kernel "
                                f"{'collapsed' if kernel_collapsed else 'left it'}")
    summary = Counter(v.name if v else "not a candidate" for name, vs in want.items()
                      for v in (vs or [None] * w.regions[name].windows))
    print(f"oracle {limits}: windows {dict(summary)}; khugepaged took {seconds:.2f} s; "
          f"vmstat deltas {stats}")
    assert not disagree, ("hugepaged and khugepaged disagree:\n  " + "\n  ".join(disagree)
                          + f"\nvmstat deltas: {stats}")
    # And afterwards hugepaged sees the kernel's huge pages as PMD_MAPPED.
    drain_lru()
    _, verdicts = hugepaged_verdicts(kernel, w, True, limits)
    for name, vs in want.items():
        if vs is not None:
            assert verdicts[name] == [R.PMD_MAPPED if v == R.SUCCEED else v for v in vs], name
