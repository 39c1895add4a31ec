"""Shared memory on real processes: memfd and MAP_SHARED|MAP_ANONYMOUS regions decided by the
file rules, collapsed with real MADV_COLLAPSE calls, read back with helpers.py (pagemap,
kpageflags, smaps) and their contents verified after every collapse.

The kernel's shmem_enabled stays `never` (so nothing but hugepaged makes a shmem THP) and
hugepages-2048kB/shmem_enabled `inherit`; hugepaged is told shmem_enabled=always. The
workload maps every shared region at an address congruent to its file offset, so the kernel's
alignment does not depend on the mode.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest

from hugepaged.cli import main
from hugepaged.kernel import Kernel
from hugepaged.policy import CollapseControl
from hugepaged.results import Ineligible
from hugepaged.results import ScanResult as R
from hugepaged.scan.process import scan_process
from hugepaged.tunables import Tunables
from kit.daemon_runner import Daemon, settled
from kit.helpers import (
    Workload,
    drain_lru,
    pmd_mapped_windows,
    saved_thp,
    smaps_vma,
    zram_available,
    zram_swap,
)

from . import marks
from .test_metrics import families, samples, scrape

pytestmark = marks.KERNEL

POLICY = {"shmem_enabled": "always", "max_ptes_none": 511, "max_ptes_swap": 64}


@pytest.fixture(autouse=True)
def shmem_never():
    with saved_thp(**{"hugepages-2048kB/shmem_enabled": "inherit", "shmem_enabled": "never"}):
        yield


def vma_scan(pid: int, start: int, force: bool = False, **values):
    kernel = Kernel()
    control = CollapseControl.from_tunables(Tunables().with_values({**POLICY, **values}),
                                            force=force)
    drain_lru()
    with kernel.kpageflags() as kpf:
        scan = scan_process(kernel, pid, control, kpf)
    return next(v for v in scan.vmas if v.vma.start == start)


def results(pid: int, start: int, **values) -> list[R]:
    return [R(int(c)) for c in vma_scan(pid, start, **values).codes]


def collapse(capsys, pid: int, *args: str, **values) -> dict:
    sets = [a for k, v in {**POLICY, **values}.items() for a in ("--set", f"{k}={v}")]
    drain_lru()
    rc = main(["collapse", "--pid", str(pid), "--json", *sets, *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def attempted(doc: dict, region) -> list[str]:
    return [w["result"] for w in doc["windows"] if region.start <= int(w["address"], 16)
            < region.end]


@pytest.mark.parametrize("kind", ["memfd", "shared_anon"])
def test_max_ptes_none_boundary_and_empty_window(capsys, kind):
    none = 64
    spec = {"regions": [
        {"name": "at", "windows": 2, "kind": kind, "fill": f"first:{512 - none}"},
        {"name": "over", "windows": 1, "kind": kind, "fill": f"first:{512 - none - 1}"},
        {"name": "empty", "windows": 1, "kind": kind, "fill": "none"},
    ]}
    with Workload(spec) as w:
        at, over, empty = (w.regions[n] for n in ("at", "over", "empty"))
        assert results(w.pid, at.start, max_ptes_none=none) == [R.SUCCEED] * 2
        assert results(w.pid, over.start, max_ptes_none=none) == [R.EXCEED_NONE_PTE]
        assert results(w.pid, over.start, max_ptes_none=none + 1) == [R.SUCCEED]
        assert results(w.pid, empty.start) == [R.EXCEED_NONE_PTE]
        assert results(w.pid, empty.start, force=True) == [R.TRUNCATED]
        doc = collapse(capsys, w.pid, max_ptes_none=none)
        assert attempted(doc, at) == ["SUCCEED"] * 2
        assert attempted(doc, over) == attempted(doc, empty) == []
        assert pmd_mapped_windows(w.pid, at.start, at.end) == [True, True]
        assert pmd_mapped_windows(w.pid, over.start, over.end) == [False]
        assert smaps_vma(w.pid, at.start)["ShmemPmdMapped"] == 4096
        w.verify()
        assert results(w.pid, at.start) == [R.PMD_MAPPED] * 2


def kb(field: str) -> int:
    return int(field.split()[0])


def test_pages_in_the_cache_but_not_mapped_count(capsys):
    spec = {"regions": [{"name": "m", "windows": 1, "kind": "memfd", "fill": "first:50",
                         "cache_fill": "pages:" + json.dumps(list(range(50, 460)))}]}
    with Workload(spec) as w:
        m = w.regions["m"]
        v = vma_scan(w.pid, m.start, max_ptes_none=64)
        assert [R(int(c)) for c in v.codes] == [R.SUCCEED] and v.present.tolist() == [460]
        before = smaps_vma(w.pid, m.start)["Rss"]
        # enabled=never: the interpreter's own heap (numpy advises it) stays out of the sum
        doc = collapse(capsys, w.pid, max_ptes_none=64, enabled="never")
        assert attempted(doc, m) == ["SUCCEED"]
        assert pmd_mapped_windows(w.pid, m.start, m.end) == [True]
        w.verify()  # the 410 pages written through the file read back through it
        # The PMD maps all 512 pages: the 410 only in the cache and the 52 holes filled.
        grown = smaps_vma(w.pid, m.start)["Rss"] - before  # this mapping's: the process's
        # RssShmem moves with shared memory the interpreter touches meanwhile
        assert grown == (512 - 50) * 4 == doc["rss_growth_predicted_kb"]
        assert abs(doc["rss_growth_kb"] - grown) <= 64, doc


def test_misaligned_memfd_is_reported_and_not_attempted(capsys):
    spec = {"regions": [{"name": "x", "windows": 2, "kind": "memfd", "misalign": True}]}
    with Workload(spec) as w:
        x = w.regions["x"]
        assert vma_scan(w.pid, x.start).skip is Ineligible.MISALIGNED
        assert vma_scan(w.pid, x.start, force=True).skip is Ineligible.MISALIGNED
        doc = collapse(capsys, w.pid, "--force")
        assert attempted(doc, x) == []
        assert smaps_vma(w.pid, x.start)["ShmemPmdMapped"] == 0
        w.verify()


def test_shmem_enabled_deny_collapses_nothing(capsys):
    spec = {"regions": [{"name": "m", "windows": 1, "kind": "memfd"},
                        {"name": "s", "windows": 1, "kind": "shared_anon"}]}
    with Workload(spec) as w, saved_thp(shmem_enabled="deny"):
        for r in w.regions.values():
            assert vma_scan(w.pid, r.start, force=True).skip is Ineligible.SHMEM_DENIED
        doc = collapse(capsys, w.pid, "--force")
        for r in w.regions.values():
            assert attempted(doc, r) == []
            assert smaps_vma(w.pid, r.start)["ShmemPmdMapped"] == 0
        w.verify()


def test_advise_needs_vm_hugepage():
    spec = {"regions": [{"name": "plain", "windows": 1, "kind": "memfd"},
                        {"name": "hg", "windows": 1, "kind": "memfd", "hugepage": True}]}
    with Workload(spec) as w:
        plain, hg = w.regions["plain"], w.regions["hg"]
        assert vma_scan(w.pid, plain.start, shmem_enabled="advise").skip is \
            Ineligible.SHMEM_NO_MADV_HUGEPAGE
        assert results(w.pid, hg.start, shmem_enabled="advise") == [R.SUCCEED]
        # MADV_COLLAPSE's semantics ignore the mode.
        assert vma_scan(w.pid, plain.start, force=True, shmem_enabled="never").skip is None


@contextlib.contextmanager
def one_memfd_in_two_processes(**second) -> Iterator[tuple[Workload, Workload]]:
    """Two processes mapping one 2-window memfd: the second maps the first's file
    (`second`: more keys of its region, say its fill)."""
    first = {"regions": [{"name": "m", "windows": 2, "kind": "memfd"}]}
    with Workload(first) as a:
        attach = f"/proc/{a.pid}/fd/{a.regions['m'].fd}"
        spec = {"regions": [{"name": "m", "windows": 2, "kind": "memfd", **second,
                             "attach": attach}]}
        with Workload(spec) as b:
            yield a, b


def test_a_second_process_mapping_the_same_memfd(capsys):
    with one_memfd_in_two_processes() as (a, b):
        m, mb = a.regions["m"], b.regions["m"]
        assert results(b.pid, mb.start) == [R.SUCCEED] * 2
        assert attempted(collapse(capsys, a.pid), m) == ["SUCCEED"] * 2
        assert pmd_mapped_windows(a.pid, m.start, m.end) == [True, True]
        # The page cache holds one 2 MiB folio per range now: the kernel took the second
        # process's page tables away, so it maps nothing there until it touches it.
        assert smaps_vma(b.pid, mb.start)["ShmemPmdMapped"] == 0
        b.verify()  # its faults map the new huge pages, by PMD
        assert smaps_vma(b.pid, mb.start)["ShmemPmdMapped"] == 4096
        assert results(b.pid, mb.start) == [R.PMD_MAPPED] * 2
        a.verify()


def test_a_range_another_process_collapsed_and_this_one_never_touched(capsys):
    """hpage_collapse_scan_file reads the page cache only: a range that is one 2 MiB folio
    there is PTE_MAPPED_HUGEPAGE whether or not this process maps it. MADV_COLLAPSE then
    installs the PMD (collapse_pte_mapped_thp, install_pmd) where this process has no page
    table; the daemon, like the kernel's khugepaged, leaves it to the next fault."""
    with one_memfd_in_two_processes(fill="none") as (a, b):
        m, mb = a.regions["m"], b.regions["m"]
        assert results(b.pid, mb.start) == [R.SUCCEED] * 2  # 512 pages in the cache
        assert attempted(collapse(capsys, a.pid), m) == ["SUCCEED"] * 2
        assert pmd_mapped_windows(a.pid, m.start, m.end) == [True, True]
        assert results(b.pid, mb.start) == [R.PTE_MAPPED_HUGEPAGE] * 2
        assert results(b.pid, mb.start, force=True) == [R.PTE_MAPPED_HUGEPAGE] * 2
        assert smaps_vma(b.pid, mb.start)["Rss"] == 0  # the scan mapped nothing into it
        with Daemon(pids=[b.pid], sets={**POLICY, "max_cpu_percent": 0,
                                        "scan_sleep_millisecs": 0}) as d:
            st = d.wait_for(lambda st: settled(st, b.pid), timeout=30)
        assert st["results"].get("PTE_MAPPED_HUGEPAGE", 0) >= 2
        # (the workload's own heap, which numpy advises, is not under test)
        assert [r for r in d.events("collapse") if r["pid"] == b.pid
                and mb.start <= int(r["address"], 16) < mb.end] == []
        assert smaps_vma(b.pid, mb.start)["Rss"] == 0
        assert attempted(collapse(capsys, b.pid), mb) == ["SUCCEED"] * 2
        assert smaps_vma(b.pid, mb.start)["ShmemPmdMapped"] == 4096  # never touched
        assert pmd_mapped_windows(b.pid, mb.start, mb.end) == [True, True]
        assert results(b.pid, mb.start) == [R.PMD_MAPPED] * 2
        a.verify()


@pytest.mark.skipif(not zram_available(), reason="no /dev/zram0 or mkswap")
def test_swapped_shmem_pages_against_max_ptes_swap(capsys):
    spec = {"regions": [{"name": "m", "windows": 2, "kind": "memfd", "pageout": "first:100"}]}
    with zram_swap(), Workload(spec) as w:
        m = w.regions["m"]
        v = vma_scan(w.pid, m.start, max_ptes_swap=99)
        assert v.codes.tolist() == [int(R.EXCEED_SWAP_PTE)] * 2
        assert results(w.pid, m.start, max_ptes_swap=100) == [R.SUCCEED] * 2
        assert attempted(collapse(capsys, w.pid, max_ptes_swap=99), m) == []
        assert attempted(collapse(capsys, w.pid, max_ptes_swap=100), m) == ["SUCCEED"] * 2
        assert pmd_mapped_windows(w.pid, m.start, m.end) == [True, True]
        w.verify()  # the swapped pages came back in the collapse


def test_the_daemon_collapses_a_file_range_once():
    """Two processes map one memfd: the daemon collapses each range once (for whichever it
    meets first); the other is not asked, and maps the huge pages by PMD once it touches."""
    with one_memfd_in_two_processes() as (a, b):
        with Daemon(pids=[a.pid, b.pid], sets={
                **POLICY, "max_cpu_percent": 0, "scan_sleep_millisecs": 0,
                "pages_to_scan": 65536},
                args=["--metrics", ":0", "--metrics-top-processes", "2"]) as d:
            d.wait_for(lambda st: settled(st, a.pid) and settled(st, b.pid), timeout=30)
            fams = families(scrape(d.wait_event("metrics_listen")["port"]))
            pmd = {dict(labels)["pid"]: v for (_, labels), v in samples(
                fams, "hugepaged_process_shmem_pmd_bytes").items()}
            for w in (a, b):  # the gauge is smaps ShmemPmdMapped
                kb = sum(smaps_vma(w.pid, r.start)["ShmemPmdMapped"]
                         for r in w.regions.values())
                assert pmd[str(w.pid)] == kb * 1024
            events = [r for r in d.events("collapse") if any(
                r["pid"] == w.pid and w.regions["m"].start <= int(r["address"], 16)
                < w.regions["m"].end for w in (a, b))]
            assert sorted(r["result"] for r in events) == ["SUCCEED"] * 2
            assert len({r["pid"] for r in events}) == 1
            assert d.status()["results"].get("PTE_MAPPED_HUGEPAGE", 0) >= 2
        for w in (a, b):
            w.verify()
            assert smaps_vma(w.pid, w.regions["m"].start)["ShmemPmdMapped"] == 4096
