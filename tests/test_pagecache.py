"""kernel.pagecache: another process's shared memory, counted from its page cache.

Real workload processes with memfd and MAP_SHARED|MAP_ANONYMOUS regions; the expected counts
come from the layout the workload was told to make (and pagemap, read by helpers.py).
"""

import os

import pytest

from hugepaged.errors import ProcessGone
from hugepaged.kernel.pagecache import MappedFile, VmaGone, cachestat_supported
from kit.helpers import HPAGE, PAGES_PER_WINDOW, Workload, present_per_window

from . import marks

pytestmark = marks.KERNEL

LAYOUT = {"regions": [
    {"name": "m", "windows": 4, "kind": "memfd", "fill": "first:300",
     "cache_fill": "pages:[400,401,402,511]"},
    {"name": "s", "windows": 2, "kind": "shared_anon", "fill": "every:2"},
]}


@pytest.fixture(scope="module")
def workload():
    with Workload(LAYOUT) as w:
        yield w


def counts(w, name, source):
    r = w.regions[name]
    with MappedFile("/proc", w.pid, r.start, r.end) as f:
        method = f.ranges_cachestat if source == "cachestat" else f.ranges_mincore
        return method(0, r.windows, HPAGE)


@pytest.mark.parametrize("source", ["cachestat", "mincore"])
def test_counts_every_page_of_the_cache_mapped_or_not(workload, source):
    if source == "cachestat" and not cachestat_supported():
        pytest.skip("no cachestat(2) on this kernel")
    m = counts(workload, "m", source)
    assert m[:, 0].tolist() == [304] * 4  # 300 mapped + 4 written through the file only
    # The process maps only the 300: the other 4 are in the cache but not in its pagemap.
    r = workload.regions["m"]
    assert present_per_window(workload.pid, r.start, r.end) == [300] * 4
    s = counts(workload, "s", source)
    assert s[:, 0].tolist() == [PAGES_PER_WINDOW // 2] * 2
    swap = m[:, 1].tolist() + s[:, 1].tolist()
    assert swap == ([0] * 6 if source == "cachestat" else [-1] * 6)


def test_reading_faults_nothing_in(workload):
    r = workload.regions["m"]
    before = present_per_window(workload.pid, r.start, r.end)
    rss = _rss_kb(workload.pid)
    for source in ("cachestat", "mincore"):
        counts(workload, "m", source)
    assert present_per_window(workload.pid, r.start, r.end) == before
    assert _rss_kb(workload.pid) == rss
    workload.verify()


def test_file_identity_is_shared_by_every_mapping_of_it():
    spec = {"regions": [{"name": "m", "windows": 1, "kind": "memfd"}], "fork_child": True}
    with Workload(spec) as w:
        r = w.regions["m"]
        with MappedFile("/proc", w.pid, r.start, r.end) as a, \
                MappedFile("/proc", w.child_pid, r.start, r.end) as b:
            assert a.id == b.id and a.id.size == HPAGE
            assert os.stat(f"/proc/{w.pid}/fd/{r.fd}").st_ino == a.id.ino


def test_a_gone_mapping_or_process_is_a_clean_error(workload):
    r = workload.regions["m"]
    with pytest.raises(VmaGone):
        MappedFile("/proc", workload.pid, r.start, r.end + 4096)
    with pytest.raises(ProcessGone):
        MappedFile("/proc", 2**22 + 12345, r.start, r.end)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError("VmRSS")
