"""`hugepaged collapse` on real processes: real MADV_COLLAPSE calls, outcomes read back with the
independent helpers (pagemap + kpageflags, smaps), page contents verified after every collapse.

The command runs in-process (cli.main) for speed; tests/test_cli.py runs it as a subprocess.
The kernel's own khugepaged is kept out (kernel `enabled=never`); hugepaged is told
`enabled=madvise` so MADV_HUGEPAGE VMAs are still its candidates.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from hugepaged.cli import main
from hugepaged.collapse import (
    TRANSIENT_BACKOFF,
    collapse_run,
    collapse_window,
    retry_transient,
    window_now,
)
from hugepaged.kernel import Kernel
from hugepaged.policy import CollapseControl
from hugepaged.results import ScanResult as R
from kit.helpers import (
    HPAGE,
    Workload,
    anon_huge_kb,
    drain_lru,
    pmd_mapped_windows,
    present_per_window,
    vm_flags,
)

from . import marks

pytestmark = marks.KERNEL

DEFAULTS = ["--set", "enabled=madvise", "--set", "max_ptes_none=511",
            "--set", "max_ptes_shared=256", "--set", "max_ptes_swap=64"]


@pytest.fixture
def collapse(capsys):
    """Run `hugepaged collapse --json` on a pid (kernel-independent defaults, then `args`)."""
    def run(pid: int, *args: str) -> dict:
        drain_lru()
        rc = main(["collapse", "--pid", str(pid), "--json", *DEFAULTS, *args])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert err == ""
        return json.loads(out)
    return run


def in_regions(doc: dict, w: Workload) -> dict[str, list[str]]:
    """The per-window results of `doc`, by region (windows outside the regions dropped)."""
    got: dict[str, list[str]] = {}
    for win in doc["windows"]:
        a = int(win["address"], 16)
        for name, r in w.regions.items():
            if r.start <= a < r.end:
                got.setdefault(name, []).append(win["result"])
    return got


def pmd_map(w: Workload) -> dict[str, list[bool]]:
    return {n: pmd_mapped_windows(w.pid, r.start, r.end) for n, r in w.regions.items()}


def test_collapse_pass(thp_never, collapse):
    """One pass: full, single-page and partly filled windows and mlocked memory collapse;
    the empty window, VM_NOHUGEPAGE and the non-MADV_HUGEPAGE VMA stay; a second pass finds
    everything PMD_MAPPED."""
    regions = [
        {"name": "full", "windows": 3, "fill": "all", "hugepage": True},
        {"name": "empty", "windows": 1, "fill": "none", "hugepage": True},
        {"name": "single", "windows": 1, "fill": "first:1", "hugepage": True},
        {"name": "k400", "windows": 1, "fill": "first:400", "zero_pages": "first:12",
         "hugepage": True},
        {"name": "nohuge", "windows": 1, "fill": "all", "nohugepage": True},
        {"name": "plain", "windows": 1, "fill": "all"},
        {"name": "locked", "windows": 2, "fill": "all", "hugepage": True, "mlock": True},
    ]
    with Workload(regions=regions) as w:
        doc = collapse(w.pid)
        w.verify()
        assert doc["pid"] == w.pid and not doc["dry_run"] and not doc["force"]
        assert in_regions(doc, w) == {"full": ["SUCCEED"] * 3, "single": ["SUCCEED"],
                                      "k400": ["SUCCEED"], "locked": ["SUCCEED"] * 2}
        assert doc["collapsed"] == len(doc["windows"]) >= 7
        assert doc["failed"] == {}
        assert doc["skipped"].get("PMD_NONE", 0) >= 1
        assert pmd_map(w) == {"full": [True] * 3, "empty": [False], "single": [True],
                              "k400": [True], "nohuge": [False], "plain": [False],
                              "locked": [True, True]}
        for name, kb in (("full", 3 * 2048), ("single", 2048), ("k400", 2048),
                         ("locked", 2 * 2048), ("nohuge", 0), ("plain", 0), ("empty", 0)):
            assert anon_huge_kb(w.pid, w.regions[name].start) == kb, name
        # The single page's window grew by 511 pages, k400's by 100 empty + 12 zero pages.
        assert doc["rss_growth_kb"] >= (511 + 112) * 4
        assert present_per_window(w.pid, w.regions["empty"].start, w.regions["empty"].end) == [0]
        assert "lo" in vm_flags(w.pid, w.regions["locked"].start)

        again = collapse(w.pid)
        w.verify()
        assert in_regions(again, w) == {}
        # (Windows outside the regions may appear: numpy MADV_HUGEPAGEs its big temporaries.)
        assert again["failed"] == {}
        assert again["skipped"].get("PMD_MAPPED", 0) >= 7
        assert again["skipped"].get("PMD_NONE", 0) >= 1
        assert pmd_map(w) == {"full": [True] * 3, "empty": [False], "single": [True],
                              "k400": [True], "nohuge": [False], "plain": [False],
                              "locked": [True, True]}


def test_max_ptes_none_boundary_then_force(thp_never, collapse):
    regions = [
        {"name": "single", "windows": 1, "fill": "first:1", "hugepage": True},
        {"name": "k400", "windows": 1, "fill": "first:400", "hugepage": True},
        {"name": "k400_zero", "windows": 1, "fill": "first:400", "zero_pages": "first:12",
         "hugepage": True},
    ]
    with Workload(regions=regions) as w:
        doc = collapse(w.pid, "--set", "max_ptes_none=111")
        w.verify()
        assert in_regions(doc, w) == {}
        assert doc["skipped"].get("EXCEED_NONE_PTE", 0) >= 3
        assert pmd_map(w) == {"single": [False], "k400": [False], "k400_zero": [False]}

        doc = collapse(w.pid, "--set", "max_ptes_none=112")
        w.verify()
        assert in_regions(doc, w) == {"k400": ["SUCCEED"], "k400_zero": ["SUCCEED"]}
        assert pmd_map(w) == {"single": [False], "k400": [True], "k400_zero": [True]}

        doc = collapse(w.pid, "--set", "max_ptes_none=510")
        w.verify()
        assert in_regions(doc, w) == {}
        assert doc["skipped"].get("EXCEED_NONE_PTE", 0) >= 1
        assert pmd_map(w)["single"] == [False]

        # --force: MADV_COLLAPSE's semantics, max_ptes_* ignored.
        doc = collapse(w.pid, "--force", "--set", "max_ptes_none=0")
        w.verify()
        assert doc["force"] is True
        assert in_regions(doc, w) == {"single": ["SUCCEED"]}
        assert pmd_map(w) == {"single": [True], "k400": [True], "k400_zero": [True]}
        assert present_per_window(w.pid, w.regions["single"].start,
                                  w.regions["single"].end) == [512]


def test_single_page_at_511(thp_never, collapse):
    with Workload(regions=[{"name": "one", "windows": 1, "fill": "pages:[300]",
                            "hugepage": True}]) as w:
        doc = collapse(w.pid)
        w.verify()
        assert in_regions(doc, w) == {"one": ["SUCCEED"]}
        assert pmd_map(w) == {"one": [True]}
        assert anon_huge_kb(w.pid, w.regions["one"].start) == 2048


def test_dry_run_collapses_nothing(thp_never, collapse):
    regions = [{"name": "full", "windows": 2, "fill": "all", "hugepage": True},
               {"name": "single", "windows": 1, "fill": "first:1", "hugepage": True}]
    with Workload(regions=regions) as w:
        doc = collapse(w.pid, "--dry-run")
        w.verify()
        assert doc["dry_run"] is True
        # What would be collapsed is listed ...
        assert in_regions(doc, w) == {"full": ["SUCCEED"] * 2, "single": ["SUCCEED"]}
        # ... but nothing was.
        assert pmd_map(w) == {"full": [False, False], "single": [False]}
        assert doc["rss_growth_kb"] == 0
        for r in w.regions.values():
            assert anon_huge_kb(w.pid, r.start) == 0
        doc = collapse(w.pid, "--dry-run", "--force", "--set", "max_ptes_none=0")
        w.verify()
        assert in_regions(doc, w) == {"full": ["SUCCEED"] * 2, "single": ["SUCCEED"]}
        assert pmd_map(w) == {"full": [False, False], "single": [False]}


def test_nohugepage_refused_even_with_force(thp_never, collapse):
    regions = [{"name": "nohuge", "windows": 2, "fill": "all", "nohugepage": True},
               {"name": "hg", "windows": 1, "fill": "all", "hugepage": True}]
    with Workload(regions=regions) as w:
        doc = collapse(w.pid, "--force")
        w.verify()
        assert in_regions(doc, w) == {"hg": ["SUCCEED"]}
        assert pmd_map(w) == {"nohuge": [False, False], "hg": [True]}
        # And the kernel itself refuses MADV_COLLAPSE there: EINVAL, mapped to VMA_CHECK.
        out = _collapse_direct(w.pid, w.regions["nohuge"].start)
        w.verify()
        assert (out.result, out.errno) == (R.VMA_CHECK, errno.EINVAL)
        assert pmd_map(w)["nohuge"] == [False, False]


def test_prctl_thp_disable_refused_even_with_force(thp_never, collapse):
    regions = [{"name": "a", "windows": 2, "fill": "all", "hugepage": True}]
    with Workload(regions=regions, prctl_thp_disable=True) as w:
        for extra in ([], ["--force"], ["--set", "enabled=always"]):
            doc = collapse(w.pid, *extra)
            w.verify()
            assert doc["windows"] == [] and doc["collapsed"] == 0, extra
        out = _collapse_direct(w.pid, w.regions["a"].start)
        w.verify()
        assert (out.result, out.errno) == (R.VMA_CHECK, errno.EINVAL)
        assert pmd_map(w) == {"a": [False, False]}


def test_enabled_modes(thp_never, collapse):
    """madvise: only MADV_HUGEPAGE VMAs; always: the others too; never: nothing."""
    regions = [{"name": "hg", "windows": 1, "fill": "all", "hugepage": True},
               {"name": "plain", "windows": 2, "fill": "all"}]
    with Workload(regions=regions) as w:
        doc = collapse(w.pid, "--set", "enabled=never")
        w.verify()
        assert doc["windows"] == [] and pmd_map(w) == {"hg": [False], "plain": [False] * 2}

        doc = collapse(w.pid, "--set", "enabled=madvise")
        w.verify()
        assert in_regions(doc, w) == {"hg": ["SUCCEED"]}
        assert pmd_map(w) == {"hg": [True], "plain": [False] * 2}

        doc = collapse(w.pid, "--set", "enabled=always")
        w.verify()
        assert in_regions(doc, w) == {"plain": ["SUCCEED"] * 2}
        assert pmd_map(w) == {"hg": [True], "plain": [True] * 2}
        assert anon_huge_kb(w.pid, w.regions["plain"].start) == 2 * 2048


def test_a_pinned_page_is_eagain_and_asked_again(thp_never, collapse):
    """A page a pipe holds (vmsplice) fails the collapse with EAGAIN; the command asks that
    window again after its back-offs, reports it truthfully, and collapses the other."""
    regions = [{"name": "a", "windows": 2, "fill": "all", "hugepage": True}]
    with Workload(regions=regions) as w:
        assert w.command("pin a 0 7")["ok"]
        doc = collapse(w.pid)
        w.verify()
        first, second = doc["windows"]
        assert (first["result"], first["errno"]) == ("COLLAPSE_EAGAIN", "EAGAIN")
        assert first["attempts"] > 1 + len(TRANSIENT_BACKOFF)
        assert (second["result"], second["attempts"]) == ("SUCCEED", 1)
        assert pmd_map(w) == {"a": [False, True]}
        assert w.command("unpin")["ok"]
        doc = collapse(w.pid)
        w.verify()
        assert in_regions(doc, w) == {"a": ["SUCCEED"]}
        assert pmd_map(w) == {"a": [True, True]}


def test_a_page_released_during_the_backoff_collapses(thp_never):
    """The retry is real: the pipe lets the page go while the command waits, and the window
    asked again collapses."""
    regions = [{"name": "a", "windows": 3, "fill": "all", "hugepage": True}]
    with Workload(regions=regions) as w:
        r = w.regions["a"]
        assert w.command("pin a 1 100")["ok"]
        addresses = [r.window_start(i) for i in range(3)]
        pidfd = os.pidfd_open(w.pid)
        waits: list[float] = []

        def unpin(delay: float) -> None:
            waits.append(delay)
            assert w.command("unpin")["ok"]

        def again(todo: list[int]):
            return collapse_run(pidfd, w.pid, todo, HPAGE, lambda a: None)
        try:
            drain_lru()
            first = again(addresses)
            assert [o.result for o in first] == [R.SUCCEED, R.COLLAPSE_EAGAIN, R.SUCCEED]
            done = retry_transient(first, again, sleep=unpin)
        finally:
            os.close(pidfd)
        w.verify()
        assert waits == [TRANSIENT_BACKOFF[0]]
        assert [(o.address, o.result) for o in done] == [(a, R.SUCCEED) for a in addresses]
        assert done[1].attempts == first[1].attempts + 1
        assert pmd_map(w) == {"a": [True] * 3}


def test_shared_with_forked_child_boundary(thp_never, collapse):
    regions = [
        {"name": "s40", "windows": 2, "fill": "all", "share_after_fork": 40, "hugepage": True},
        {"name": "own", "windows": 1, "fill": "all", "share_after_fork": 0, "hugepage": True},
    ]
    with Workload(regions=regions, fork_child=True) as w:
        doc = collapse(w.pid, "--set", "max_ptes_shared=39")
        w.verify()
        assert in_regions(doc, w) == {"own": ["SUCCEED"]}
        assert doc["skipped"].get("EXCEED_SHARED_PTE", 0) >= 2
        assert pmd_map(w) == {"s40": [False, False], "own": [True]}

        doc = collapse(w.pid, "--set", "max_ptes_shared=40")
        w.verify()
        assert in_regions(doc, w) == {"s40": ["SUCCEED"] * 2}
        assert pmd_map(w) == {"s40": [True, True], "own": [True]}
        # The child's copies are untouched: still 4 KiB, still there.
        s = w.regions["s40"]
        assert present_per_window(w.child_pid, s.start, s.end) == [512, 512]
        assert pmd_mapped_windows(w.child_pid, s.start, s.end) == [False, False]


def _collapse_direct(pid: int, address: int, redecide: bool = True):
    """One MADV_COLLAPSE; a failure named with a re-decision of the window (or without)."""
    kernel = Kernel()
    pidfd = os.pidfd_open(pid)
    try:
        with kernel.kpageflags() as kpf:
            again = (lambda: window_now(kernel, pid, kpf, CollapseControl(), address)) \
                if redecide else (lambda: None)
            return collapse_window(pidfd, pid, address, HPAGE, again)
    finally:
        os.close(pidfd)


def test_einval_is_named_only_as_far_as_the_window_tells(thp_never):
    """EINVAL is madvise_collapse_errno's default for most results: without a re-decision it
    names none of them; re-deciding the window tells why (not eligible now: VMA_CHECK; nothing
    mapped: PMD_NONE)."""
    regions = [{"name": "nohuge", "windows": 1, "fill": "all", "nohugepage": True},
               {"name": "empty", "windows": 1, "fill": "none", "hugepage": True}]
    with Workload(regions=regions) as w:
        nohuge = w.regions["nohuge"].start
        assert (_collapse_direct(w.pid, nohuge, redecide=False).result,
                _collapse_direct(w.pid, nohuge).result) == (R.COLLAPSE_EINVAL, R.VMA_CHECK)
        empty = w.regions["empty"].start  # nothing mapped, no page table
        out = _collapse_direct(w.pid, empty)
        assert (out.result, out.errno) == (R.PMD_NONE, errno.EINVAL)
        w.verify()


def test_a_batch_gives_every_window_its_own_outcome(thp_never):
    """Several windows in one process_madvise call (one iovec each): the kernel stops at the
    first that fails, so the ones before it are collapsed, that one is named alone, and the
    rest go in the next call."""
    regions = [{"name": "a", "windows": 3, "fill": "all", "hugepage": True},
               {"name": "bad", "windows": 1, "fill": "all", "nohugepage": True},
               {"name": "b", "windows": 2, "fill": "all", "hugepage": True}]
    kernel = Kernel()
    with Workload(regions=regions) as w:
        a, bad, b = (w.regions[n] for n in ("a", "bad", "b"))
        addresses = [a.window_start(i) for i in range(3)] + [bad.start] + \
            [b.window_start(i) for i in range(2)]
        pidfd = os.pidfd_open(w.pid)
        try:
            with kernel.kpageflags() as kpf:
                def run(todo):
                    return collapse_run(pidfd, w.pid, todo, HPAGE, lambda x: window_now(
                        kernel, w.pid, kpf, CollapseControl(), x))
                # A page held for a moment (EAGAIN) is not what this test is about.
                outs = retry_transient(run(addresses), run)
        finally:
            os.close(pidfd)
        assert [(o.address, o.result) for o in outs] == \
            [(x, R.VMA_CHECK if x == bad.start else R.SUCCEED) for x in addresses]
        assert outs[3].errno == errno.EINVAL
        assert pmd_map(w) == {"a": [True] * 3, "bad": [False], "b": [True] * 2}
        w.verify()
