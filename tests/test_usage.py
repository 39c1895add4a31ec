"""scan.usage: every kind of THP a process maps, against the kernel's own figures.

PMD-mapped kB against smaps (AnonHugePages, ShmemPmdMapped); THP mapped by PTEs, by folio
size, against helpers.thp_pages_by_folio (kpageflags read page by page, walked to each
folio's head, as tools/mm/thpmaps tells a folio's order).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hugepaged.cli import main
from hugepaged.kernel import Kernel
from hugepaged.scan.usage import folio_pages, head_sizes
from kit.daemon_runner import Daemon, hugepaged_cli, settled
from kit.helpers import (
    HPAGE,
    THP_DIR,
    Workload,
    drain_lru,
    saved_thp,
    smaps_vma,
    thp_pages_by_folio,
)

from . import marks
from .test_metrics import families, samples, scrape

pytestmark = marks.KERNEL
PAGE_KB = 4


def usage_of(pid: int, start: int):
    from hugepaged.scan.usage import thp_usage

    kernel = Kernel()
    vma = next(v for v in kernel.procfs.smaps(pid) if v.start == start)
    with kernel.kpageflags() as kpf:
        return thp_usage(kernel, pid, [vma], kpf)


def expected_pte_kb(pid: int, r, pmd_kb: int) -> dict[int, int]:
    out = {}
    for pages, n in thp_pages_by_folio(pid, r.start, r.end).items():
        kb = n * PAGE_KB - (pmd_kb if pages == 512 else 0)
        if kb:
            out[pages * PAGE_KB] = kb
    return out


@pytest.mark.skipif(not (THP_DIR / "hugepages-64kB/enabled").exists(), reason="no mTHP")
def test_anonymous_mthp_and_pmd_mapped():
    spec = {"regions": [{"name": "m", "windows": 2, "thp_fault": True, "fill": "first:300"},
                        {"name": "p", "windows": 2, "hugepage": True}]}
    with saved_thp(**{"hugepages-64kB/enabled": "always", "enabled": "never"}), \
            Workload(spec) as w:
        m, p = w.regions["m"], w.regions["p"]
        drain_lru()
        assert main(["collapse", "--pid", str(w.pid), "--set", "enabled=madvise"]) == 0
        um, up = usage_of(w.pid, m.start), usage_of(w.pid, p.start)
        assert dict(um.anon_pte_kb) == expected_pte_kb(w.pid, m, 0) == {64: 2 * 304 * PAGE_KB}
        assert up.anon_pmd_kb == smaps_vma(w.pid, p.start)["AnonHugePages"] == 4096
        assert dict(up.anon_pte_kb) == expected_pte_kb(w.pid, p, 4096) == {}
        w.verify()


def process_mthp_kb(pid: int) -> dict[int, int]:
    """kB in anonymous folios smaller than 2 MiB per folio kB, over every private anonymous
    VMA of the process (helpers.thp_pages_by_folio, page by page)."""
    out: dict[int, int] = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if fields[1][3] != "p" or fields[4] != "0" or not (
                    path in ("", "[heap]", "[stack]") or path.startswith("[anon:")):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            for pages, n in thp_pages_by_folio(pid, lo, hi).items():
                if 1 < pages < 512:
                    out[pages * PAGE_KB] = out.get(pages * PAGE_KB, 0) + n * PAGE_KB
    return out


def _human(kb: int) -> str:
    """As `top` prints a size (report.human_kb), written out here."""
    return f"{kb / 1024:.1f}M" if kb >= 1024 else f"{kb}K"


@pytest.mark.skipif(not (THP_DIR / "hugepages-64kB/enabled").exists(), reason="no mTHP")
def test_anonymous_mthp_in_top_and_the_metrics(tmp_path):
    """64 KiB folios faulted by a real process: `top`'s mTHP column and the daemon's
    per-process gauge equal what kpageflags, walked page by page, says it maps."""
    spec = {"regions": [{"name": "m", "windows": 2, "thp_fault": True, "fill": "first:300"}]}
    with saved_thp(**{"hugepages-64kB/enabled": "always", "enabled": "never"}), \
            Workload(spec) as w:
        m = w.regions["m"]
        assert expected_pte_kb(w.pid, m, 0) == {64: 2 * 304 * PAGE_KB}
        want = process_mthp_kb(w.pid)  # the interpreter's own heap has 64 KiB folios too
        assert set(want) == {64} and want[64] >= 2 * 304 * PAGE_KB
        r = hugepaged_cli("top", "--once", "--pid", str(w.pid),
                          "--socket", str(tmp_path / "none.sock"))
        assert r.returncode == 0, r.stderr
        (row,) = [line for line in r.stdout.splitlines() if line.lstrip().startswith(str(w.pid))]
        assert row.split()[-2] == _human(want[64])
        assert f"  mTHP 64K:{_human(want[64])}" in r.stdout
        with Daemon([w.pid], args=["--metrics", ":0", "--metrics-top-processes", "1"]) as d:
            d.wait_for(lambda st: settled(st, w.pid), timeout=30)
            fams = families(scrape(d.wait_event("metrics_listen")["port"]))
        by_size = {dict(labels)["size"]: v for (_, labels), v in samples(
            fams, "hugepaged_process_anon_mthp_bytes").items()
            if dict(labels)["pid"] == str(w.pid)}
        assert by_size == {"64kB": want[64] * 1024}
        nr_anon = {dict(labels)["size"]: v for (_, labels), v in samples(
            fams, "hugepaged_thp_nr_anon").items()}
        assert nr_anon["64kB"] >= 2 * 304 // 16  # the machine's count holds this process's
        assert process_mthp_kb(w.pid) == want  # nothing changed them meanwhile
        w.verify()


def test_shmem_pmd_and_a_2m_folio_mapped_by_ptes(capsys):
    first = {"regions": [{"name": "m", "windows": 2, "kind": "memfd"}]}
    with saved_thp(**{"hugepages-2048kB/shmem_enabled": "inherit", "shmem_enabled": "never"}), \
            Workload(first) as a:
        m = a.regions["m"]
        drain_lru()
        assert main(["collapse", "--pid", str(a.pid), "--set", "shmem_enabled=always"]) == 0
        capsys.readouterr()
        # A second process maps the same file 4 KiB off: it can only map the 2 MiB folios
        # by PTEs.
        second = {"regions": [{"name": "m", "windows": 2, "kind": "memfd", "misalign": True,
                               "attach": f"/proc/{a.pid}/fd/{m.fd}", "fill": "none"}]}
        with Workload(second) as b:
            mb = b.regions["m"]
            ua = usage_of(a.pid, m.start)
            assert ua.shmem_pmd_kb == smaps_vma(a.pid, m.start)["ShmemPmdMapped"] == 4096
            assert dict(ua.shmem_pte_kb) == {}
            _read_all(b)
            ub = usage_of(b.pid, mb.start)
            want = expected_pte_kb(b.pid, mb, 0)
            assert smaps_vma(b.pid, mb.start)["ShmemPmdMapped"] == 0
            assert ub.shmem_pte_kb[2048] == want[2048] > 0
            assert sum(ub.shmem_pte_kb.values()) + ub.shmem_partial_kb == sum(want.values())
            drain_lru()
            assert main(["scan", "--pid", str(b.pid), "--json"]) == 0
            doc = json.loads(capsys.readouterr().out)
            assert doc["processes"][0]["thp"]["shmem_pte_kb"].get("2048kB") == \
                ub.shmem_pte_kb[2048]
            a.verify()


def _read_all(w: Workload) -> None:
    """Make the workload fault its (unwritten) region in by reading through its verify."""
    r = w.regions["m"]
    # fill "none": verify reads nothing; read the mapping from outside instead.
    with open(f"/proc/{w.pid}/mem", "rb") as f:
        for a in range(r.start, r.end, 4096):
            f.seek(a)
            f.read(1)


def test_folio_pages_pure():
    present = np.uint64(1 << 63)
    head, tail, thp = np.uint64(1 << 15), np.uint64(1 << 16), np.uint64(1 << 22)
    frames = {1024 + i: thp | (head if i == 0 else tail) for i in range(16)}
    frames |= {4096 + i: thp | (head if i == 0 else tail) for i in range(512)}
    pfns = list(range(1024, 1040)) + [7] + list(range(4096, 4096 + 100))
    pm = np.array([present | np.uint64(p) for p in pfns], dtype=np.uint64)
    flags = np.array([frames.get(p, 0) for p in pfns], dtype=np.uint64)

    def read(a):
        return np.vectorize(lambda p: frames.get(int(p), 0), otypes=[np.uint64])(a)

    counts, partial = folio_pages(pm, flags, read, 512)
    assert dict(counts) == {16: 16, 512: 100} and partial == 0
    assert head_sizes(read(np.array([[1024 + i for i in range(1, 512)]]))).tolist() == [16]
    assert HPAGE // 4096 == 512
