"""The kernel layer's parsers and readers, against fixture text and fixture trees under tmp_path.

Nothing here needs root or a particular kernel: every root path is a parameter.
"""

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hugepaged.errors import ProcessGone, Unsupported
from hugepaged.kernel.geometry import Geometry, read_geometry
from hugepaged.kernel.kpageflags import SPAN_GAP, KPageFlags
from hugepaged.kernel.pagemap import PAGE_IS_HUGE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED
from hugepaged.kernel.procfs import ProcFS, Vma, mapped_at, parse_smaps
from hugepaged.kernel.sysfs import MmStats, ThpSysfs, free_huge_blocks
from hugepaged.scan.anon import _runs, window_masks

MB = 1 << 20


def _smaps_entry(header: str, *, size_kb: int, rss_kb: int = 0, anon_kb: int = 0,
                 huge_kb: int = 0, eligible: int = 0, flags: str = "rd wr mr mw me ac") -> str:
    return f"""{header}
Size:             {size_kb:>6} kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:              {rss_kb:>6} kB
Pss:              {rss_kb:>6} kB
Pss_Dirty:        {anon_kb:>6} kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:    {anon_kb:>6} kB
Referenced:       {rss_kb:>6} kB
Anonymous:        {anon_kb:>6} kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:    {huge_kb:>6} kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           {eligible}
ProtectionKey:         0
VmFlags: {flags} 
"""  # noqa: W291 - the kernel ends VmFlags with a space


SMAPS = "".join([
    _smaps_entry("5611223f7000-5611223f8000 r-xp 00001000 fe:00 26723"
                 "                      /root/.pyenv/versions/3.11.7/bin/python3.11",
                 size_kb=4, rss_kb=4, flags="rd ex mr mw me"),
    _smaps_entry("561122c00000-561123000000 rw-p 00000000 00:00 0"
                 "                          [heap]",
                 size_kb=4096, rss_kb=3000, anon_kb=3000, eligible=1),
    _smaps_entry("7f0000000000-7f0000a00000 rw-p 00000000 00:00 0 ",
                 size_kb=10240, rss_kb=10240, anon_kb=10240, huge_kb=4096, eligible=1,
                 flags="rd wr mr mw me ac sd hg"),
    _smaps_entry("7f0000a00000-7f0000c01000 rw-p 00000000 00:00 0"
                 "                          [anon:jemalloc arena: 0]",
                 size_kb=2052, rss_kb=8, anon_kb=8, flags="rd wr mr mw me ac nh"),
    _smaps_entry("7f9fc5a00000-7f9fc5c00000 rw-s 00200000 00:1e 4711"
                 "                       /tmp/my data: v2 (deleted)",
                 size_kb=2048, rss_kb=12, flags="rd wr sh mr mw me ms"),
    _smaps_entry("7f9fc5c1c000-7f9fc5c1e000 rw-p 00033000 fe:00 338944"
                 "                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                 size_kb=8, rss_kb=8, anon_kb=8),
    _smaps_entry("7ffd8c9f2000-7ffd8ca13000 rw-p 00000000 00:00 0"
                 "                          [stack]",
                 size_kb=132, rss_kb=36, anon_kb=36, flags="rd wr mr mw me gd ac"),
    _smaps_entry("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0"
                 "                  [vsyscall]",
                 size_kb=4, flags="ex"),
])


def test_parse_smaps():
    vmas = parse_smaps(SMAPS)
    assert [v.path for v in vmas] == [
        "/root/.pyenv/versions/3.11.7/bin/python3.11", "[heap]", "",
        "[anon:jemalloc arena: 0]", "/tmp/my data: v2 (deleted)",
        "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "[stack]", "[vsyscall]",
    ]
    exe, heap, anon, named, shared, ld, stack, vsyscall = vmas
    assert exe == Vma(start=0x5611223F7000, end=0x5611223F8000, perms="r-xp", offset=0x1000,
                      inode=26723, path="/root/.pyenv/versions/3.11.7/bin/python3.11",
                      flags=frozenset({"rd", "ex", "mr", "mw", "me"}), rss_kb=4,
                      anonymous_kb=0, anon_huge_kb=0, thp_eligible=False,
                      dev=os.makedev(0xFE, 0))
    # The device is the header's major:minor (hex); what it is, only ProcFS.smaps says.
    assert (anon.dev, shared.dev, shared.fs) == (0, os.makedev(0, 0x1E), None)
    assert (heap.start, heap.end, heap.size) == (0x561122C00000, 0x561123000000, 4 * MB)
    assert (heap.rss_kb, heap.anonymous_kb, heap.thp_eligible) == (3000, 3000, True)
    assert anon.path == "" and anon.inode == 0 and anon.perms == "rw-p"
    assert (anon.anonymous_kb, anon.anon_huge_kb, anon.thp_eligible) == (10240, 4096, True)
    assert anon.flags == frozenset({"rd", "wr", "mr", "mw", "me", "ac", "sd", "hg"})
    assert "nh" in named.flags and named.size == 2 * MB + 0x1000
    assert (shared.perms, shared.offset, shared.inode) == ("rw-s", 0x200000, 4711)
    assert ld.anonymous_kb == 8
    assert "gd" in stack.flags
    assert (vsyscall.start, vsyscall.end) == (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000)
    assert vsyscall.flags == frozenset({"ex"})


def test_parse_smaps_edge_cases():
    assert parse_smaps("") == []
    # Old kernels: no THPeligible, no VmFlags.
    text = "00400000-00600000 rw-p 00000000 00:00 0\nRss:  8 kB\nAnonymous:  8 kB\n"
    (v,) = parse_smaps(text)
    assert (v.rss_kb, v.anonymous_kb, v.thp_eligible, v.flags) == (8, 8, None, frozenset())
    # Headers only (a maps text) parse too.
    maps = "00400000-00600000 rw-p 00000000 00:00 0\n00600000-00800000 r--p 00001000 08:01 7 /x\n"
    assert [(v.start, v.path) for v in parse_smaps(maps)] == [(0x400000, ""), (0x600000, "/x")]


MAPS = """\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
00651000-00652000 r--p 00051000 08:02 173521      /usr/bin/dbus-daemon
00e03000-00e24000 rw-p 00000000 00:00 0           [heap]
7f0000000000-7f0000a00000 rw-p 00000000 00:00 0
7ffd8c9f2000-7ffd8ca13000 rw-p 00000000 00:00 0   [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""


@pytest.mark.parametrize(("address", "inside"), [
    (0, False),
    (0x400000, True),
    (0x451FFF, True),
    (0x452000, False),  # end is exclusive
    (0x650FFF, False),
    (0x651000, True),
    (0xE03000, True),
    (0x7F0000000000, True),
    (0x7F00009FFFFF, True),
    (0x7F0000A00000, False),
    (0x7FFD8CA12FFF, True),
    (0xFFFFFFFFFF600000, True),
    (0xFFFFFFFFFF601000, False),
])
def test_mapped_at(address, inside):
    assert mapped_at(MAPS, address) is inside


def test_mapped_at_empty():
    assert mapped_at("", 0x400000) is False


BUDDYINFO = """\
Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3 
Node 0, zone    DMA32      2      3      0      2      3      2      1      4      4      2    752 
Node 0, zone   Normal      0      2      1     19    104    136    139     85     52     29    535 
Node 1, zone   Normal     10     20     30     40     50     60     70     80     90      5      0 
"""  # noqa: W291 - as the kernel prints it


def test_free_huge_blocks():
    # order 9 counts 1, order 10 counts 2; ZONE_DMA never (its reserve keeps user pages out).
    dma32, normal0, normal1 = 2 + 2 * 752, 29 + 2 * 535, 5
    assert free_huge_blocks(BUDDYINFO) == dma32 + normal0 + normal1
    assert free_huge_blocks(BUDDYINFO, order=10) == 752 + 535
    assert free_huge_blocks(BUDDYINFO.splitlines()[0]) == 0
    assert free_huge_blocks("") == 0
    # Orders below 9 never count, however many.
    assert free_huge_blocks("Node 0, zone Normal 9 9 9 9 9 9 9 9 9 0 0") == 0
    # order 0 counts pages.
    line = "Node 0, zone Normal 1 1 0 0 0 0 0 0 0 0 1"
    assert free_huge_blocks(line, order=0) == 1 + 2 + 1024


def test_mm_stats_reads_fixture_files(tmp_path):
    (tmp_path / "buddyinfo").write_text(BUDDYINFO)
    mm = MmStats(str(tmp_path))
    assert mm.free_huge_blocks() == free_huge_blocks(BUDDYINFO)


# ---------------------------------------------------------------------------------------------
# ProcFS on a fixture tree


def _stat_line(pid: int, comm: str, flags: int = 0x400040) -> str:
    # fields 3.. of proc(5): state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss
    rest = ["S", "1", str(pid), str(pid), "0", "-1", str(flags), "11", "12", "13", "14", "15",
            "16", "17", "18", "20", "0", "3", "0", "4242", "99999", "777",
            "18446744073709551615"] + ["0"] * 27
    return f"{pid} ({comm}) {' '.join(rest)}\n"


STATUS = """\
Name:\t{name}
Umask:\t0022
State:\tS (sleeping)
Tgid:\t{pid}
Ngid:\t0
Pid:\t{pid}
PPid:\t1
VmPeak:\t  123456 kB
VmRSS:\t    2052 kB
RssAnon:\t     156 kB
RssFile:\t    1896 kB
{thp}Threads:\t1
"""


@pytest.fixture
def proc(tmp_path):
    def add(pid: int, comm: str, thp: str | None = "1", name: str | None = None,
            flags: int = 0x400040) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(_stat_line(pid, comm, flags))
        thp_line = "" if thp is None else f"THP_enabled:\t{thp}\n"
        (d / "status").write_text(STATUS.format(name=name or comm, pid=pid, thp=thp_line))
        (d / "smaps").write_text(SMAPS)
        (d / "maps").write_text(MAPS)

    add(1, "systemd")
    add(123, "a) (b c)", thp="0", name="a) (b c)")
    add(456, "python3 (x)", thp=None)
    add(2, "kthreadd", flags=0x00208040)
    for other in ("self", "sys", "acpi", "123abc"):
        (tmp_path / other).mkdir()
    (tmp_path / "buddyinfo").write_text(BUDDYINFO)
    return ProcFS(str(tmp_path))


def test_pids(proc):
    assert proc.pids() == [1, 2, 123, 456]


@pytest.mark.parametrize(("pid", "comm"), [(1, "systemd"), (123, "a) (b c)"),
                                           (456, "python3 (x)")])
def test_stat_comm_with_spaces_and_parentheses(proc, pid, comm):
    st_ = proc.stat(pid)
    assert (st_.pid, st_.comm, st_.state) == (pid, comm, "S")
    assert (st_.flags, st_.minflt, st_.majflt) == (0x400040, 11, 13)
    assert (st_.utime, st_.stime, st_.starttime, st_.rss_pages) == (15, 16, 4242, 777)
    assert st_.vsize == 99999
    assert not st_.is_kernel_thread


def test_stat_kernel_thread(proc):
    assert proc.stat(2).is_kernel_thread


def test_status(proc):
    s = proc.status(123)
    assert (s.name, s.tgid, s.thp_enabled, s.vm_rss_kb, s.rss_anon_kb) == \
        ("a) (b c)", 123, False, 2052, 156)
    assert proc.status(1).thp_enabled is True
    # No THP_enabled line (older kernels): assume enabled.
    assert proc.status(456).thp_enabled is True


MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:30 / /srv/cache rw,relatime shared:5 - tmpfs tmpfs rw,size=1024k,huge=within_size
26 22 0:31 / /dev/shm rw,nosuid,nodev shared:6 - tmpfs tmpfs rw,size=1024k
"""


def test_smaps_and_maps_through_procfs(proc, tmp_path):
    """ProcFS.smaps says what backs each VMA from its device and the process's mountinfo
    (where that is unreadable: ours); never from the path."""
    got = proc.smaps(1)
    assert [dataclasses.replace(v, fs=None) for v in got] == parse_smaps(SMAPS)
    # No mountinfo in this tree: a file's device is unknown ("?"), no file is "".
    assert [v.fs for v in got] == ["?", "", "", "", "?", "?", "", ""]
    (tmp_path / "1" / "mountinfo").write_text(MOUNTINFO)
    fs = {v.path: (v.fs, v.mount_huge) for v in proc.smaps(1)}
    assert fs["[heap]"] == ("", None)
    assert fs["/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"] == ("ext4", None)
    # 00:1e is 0:30: the tmpfs at /srv/cache, whatever the path smaps prints.
    assert fs["/tmp/my data: v2 (deleted)"] == ("tmpfs", "within_size")
    (tmp_path / "1" / "mountinfo").write_text(MOUNTINFO.replace(
        "- tmpfs tmpfs rw,size=1024k,huge=within_size", "- fuse.sshfs host:/ rw"))
    fs = {v.path: (v.fs, v.mount_huge) for v in proc.smaps(1)}
    assert fs["/tmp/my data: v2 (deleted)"] == ("fuse.sshfs", None)
    assert mapped_at(proc.maps_text(1), 0x400000)


def test_gone_process(proc):
    with pytest.raises(ProcessGone):
        proc.stat(999)
    with pytest.raises(ProcessGone):
        proc.status(999)


# ---------------------------------------------------------------------------------------------
# ThpSysfs on a fixture tree


@pytest.fixture
def sysroot(tmp_path):
    thp = tmp_path / "kernel/mm/transparent_hugepage"
    (thp / "khugepaged").mkdir(parents=True)
    (thp / "enabled").write_text("always [madvise] never\n")
    (thp / "defrag").write_text("always defer defer+madvise [madvise] never\n")
    (thp / "shmem_enabled").write_text("always within_size advise [never] deny force\n")
    (thp / "hpage_pmd_size").write_text("2097152\n")
    knobs = {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000,
             "alloc_sleep_millisecs": 60000, "max_ptes_none": 511, "max_ptes_swap": 64,
             "max_ptes_shared": 256, "defrag": 1, "pages_collapsed": 12, "full_scans": 3}
    for name, value in knobs.items():
        (thp / "khugepaged" / name).write_text(f"{value}\n")
        if name in COUNTERS:  # read-only in sysfs: that is how the kernel tells them apart
            (thp / "khugepaged" / name).chmod(0o444)
    return tmp_path


KNOBS = ("pages_to_scan", "scan_sleep_millisecs", "alloc_sleep_millisecs", "max_ptes_none",
         "max_ptes_swap", "max_ptes_shared", "defrag")
COUNTERS = ("pages_collapsed", "full_scans")


def _file(root, name: str) -> str:
    sub = "khugepaged/" if name in KNOBS + COUNTERS else ""
    return (root / "kernel/mm/transparent_hugepage" / f"{sub}{name}").read_text()


def test_thp_sysfs_reads(sysroot):
    thp = ThpSysfs(str(sysroot))
    assert thp.available()
    thp.require()
    assert thp.enabled() == "madvise"
    assert thp.read("shmem_enabled") == "never"
    assert thp.read("max_ptes_none") == 511
    assert thp.read_raw("defrag") == "1"  # khugepaged/defrag, not the top-level defrag
    assert thp.page_fault_defrag() == "madvise"  # the top-level defrag
    assert read_geometry(str(sysroot)) == Geometry(os.sysconf("SC_PAGE_SIZE"), 2 << 20)
    assert thp.current() == {
        "enabled": "madvise", "shmem_enabled": "never", "pages_to_scan": 4096,
        "scan_sleep_millisecs": 10000, "alloc_sleep_millisecs": 60000, "max_ptes_none": 511,
        "max_ptes_swap": 64, "max_ptes_shared": 256, "defrag": 1}
    assert thp.khugepaged() == {
        "pages_to_scan": 4096, "scan_sleep_millisecs": 10000, "alloc_sleep_millisecs": 60000,
        "max_ptes_none": 511, "max_ptes_swap": 64, "max_ptes_shared": 256, "defrag": 1,
        "pages_collapsed": 12, "full_scans": 3,
    }


def test_thp_sysfs_missing(tmp_path, sysroot):
    empty = ThpSysfs(str(tmp_path / "nothing"))
    assert not empty.available()
    with pytest.raises(Unsupported):
        empty.require()
    (sysroot / "kernel/mm/transparent_hugepage/hpage_pmd_size").unlink()
    page = os.sysconf("SC_PAGE_SIZE")  # a page table of page/8 entries maps one PMD
    assert read_geometry(str(sysroot)).pmd_size == page * (page // 8)


def test_thp_sysfs_write_and_snapshot(sysroot):
    thp = ThpSysfs(str(sysroot))
    thp.write("max_ptes_none", 0)
    assert _file(sysroot, "max_ptes_none") == "0\n"
    thp.write("enabled", "always")
    assert thp.enabled() == "always"
    snap = thp.snapshot()
    assert snap == {"enabled": "always", "pages_to_scan": 4096, "scan_sleep_millisecs": 10000,
                    "alloc_sleep_millisecs": 60000, "max_ptes_none": 0, "max_ptes_swap": 64,
                    "max_ptes_shared": 256, "defrag": 1}


class RecordingSysfs(ThpSysfs):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.writes: list[tuple[str, object]] = []

    def write(self, name, value):
        self.writes.append((name, value))
        super().write(name, value)


def test_restore_writes_only_what_changed_and_enabled_last(sysroot):
    thp = RecordingSysfs(str(sysroot))
    saved = thp.snapshot()
    thp.write("enabled", "never")
    thp.write("max_ptes_none", 7)
    thp.write("pages_to_scan", 1)
    thp.writes.clear()
    thp.restore(saved)
    assert thp.snapshot() == saved
    assert {n for n, _ in thp.writes} == {"enabled", "max_ptes_none", "pages_to_scan"}
    assert thp.writes[-1] == ("enabled", "madvise")
    # Untouched files were not rewritten.
    assert _file(sysroot, "max_ptes_swap") == "64\n"


def test_changed_sets_and_restores(sysroot):
    thp = ThpSysfs(str(sysroot))
    before = thp.snapshot()
    with thp.changed(enabled="never", max_ptes_none=0, pages_to_scan=8) as saved:
        assert saved == {"enabled": "madvise", "max_ptes_none": 511, "pages_to_scan": 4096}
        assert (thp.enabled(), thp.read("max_ptes_none"), thp.read("pages_to_scan")) == \
            ("never", 0, 8)
    assert thp.snapshot() == before
    # enabled not among the values set: still saved, and not rewritten (it keeps the
    # kernel's bracketed form).
    enabled = sysroot / "kernel/mm/transparent_hugepage/enabled"
    enabled.write_text("always [madvise] never\n")
    with thp.changed(max_ptes_swap=0) as saved:
        assert saved == {"max_ptes_swap": 64, "enabled": "madvise"}
        assert thp.read("max_ptes_swap") == 0
    assert thp.snapshot() == before
    assert enabled.read_text() == "always [madvise] never\n"


def test_changed_restores_on_exception(sysroot):
    thp = ThpSysfs(str(sysroot))
    before = thp.snapshot()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), thp.changed(enabled="always", max_ptes_shared=0, defrag=0):
        assert thp.read("max_ptes_shared") == 0
        raise Boom
    assert thp.snapshot() == before


class FailingSysfs(ThpSysfs):
    """Refuses to set max_ptes_swap to 0, like a kernel refusing a write."""

    def write(self, name, value):
        if name == "max_ptes_swap" and value == 0:
            raise OSError(22, "Invalid argument")
        super().write(name, value)


def test_changed_restores_when_a_write_fails(sysroot):
    thp = FailingSysfs(str(sysroot))
    before = thp.snapshot()
    with pytest.raises(OSError), thp.changed(max_ptes_none=3, max_ptes_swap=0):
        pytest.fail("the block must not run")
    assert thp.snapshot() == before
    assert _file(sysroot, "max_ptes_none") == "511\n"


# ---------------------------------------------------------------------------------------------
# kpageflags


NFRAMES = 1 << 14


@pytest.fixture
def kpageflags(tmp_path):
    table = np.random.default_rng(7).integers(1, 2**63, size=NFRAMES, dtype=np.uint64)
    table[::97] = 0  # some frames really have no flags
    table.tofile(tmp_path / "kpageflags")
    with KPageFlags(proc_root=str(tmp_path)) as kpf:
        yield kpf, table


def _expected(table: np.ndarray, pfns: np.ndarray) -> np.ndarray:
    p = pfns.astype(np.int64)
    return np.where(p != 0, table[p], np.uint64(0)).astype(np.uint64)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 512), (2, 3, 4), (1, 1)])
def test_kpageflags_read_random(kpageflags, shape):
    kpf, table = kpageflags
    rng = np.random.default_rng(sum(shape))
    pfns = rng.integers(0, NFRAMES, size=shape, dtype=np.uint64)
    pfns.flat[::5] = 0  # zeros (absent pages) stay 0
    got = kpf.read(pfns)
    assert got.shape == pfns.shape and got.dtype == np.uint64
    np.testing.assert_array_equal(got, _expected(table, pfns))


def test_kpageflags_read_special_inputs(kpageflags):
    kpf, table = kpageflags
    zeros = np.zeros((2, 512), dtype=np.uint64)
    assert kpf.read(zeros).shape == (2, 512) and not kpf.read(zeros).any()
    assert kpf.read(np.zeros(0, dtype=np.uint64)).shape == (0,)
    # Duplicates, descending order, pfn 1 and the last frame, int64 input.
    pfns = np.array([NFRAMES - 1, 5, 5, 1, 0, NFRAMES - 1, 2, 3, 4], dtype=np.int64)
    np.testing.assert_array_equal(kpf.read(pfns), _expected(table, pfns))
    # Consecutive frames as a 4 KiB-mapped window has, from one span.
    window = np.arange(4096, 4096 + 512, dtype=np.uint64).reshape(1, 512)
    np.testing.assert_array_equal(kpf.read(window), table[4096:4608].reshape(1, 512))
    # Frames far apart: more than SPAN_GAP, so several spans.
    far = np.array([10, 10 + SPAN_GAP + 2, 10 + 5 * SPAN_GAP, 9000], dtype=np.uint64)
    np.testing.assert_array_equal(kpf.read(far), table[far.astype(np.int64)])


@pytest.fixture(scope="module")
def kpageflags_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("kpf")
    table = (np.arange(NFRAMES, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    table.tofile(root / "kpageflags")
    with KPageFlags(str(root)) as kpf:
        yield kpf, table


@given(st.lists(st.one_of(st.just(0), st.integers(1, NFRAMES - 1),
                          st.integers(2000, 2100)), min_size=1, max_size=300))
@settings(max_examples=150, deadline=None)
def test_kpageflags_read_property(kpageflags_module, pfns):
    kpf, table = kpageflags_module
    arr = np.array(pfns, dtype=np.uint64)
    np.testing.assert_array_equal(kpf.read(arr), _expected(table, arr))


def test_kpageflags_read_past_the_last_frame(kpageflags):
    # /proc/kpageflags ends at the last frame (a short read): frames past it report 0.
    kpf, table = kpageflags
    pfns = np.array([3, NFRAMES - 2, NFRAMES - 1, NFRAMES, NFRAMES + 5, 4 * NFRAMES],
                    dtype=np.uint64)
    got = kpf.read(pfns)
    np.testing.assert_array_equal(got[:3], table[[3, NFRAMES - 2, NFRAMES - 1]])
    assert got[3:].tolist() == [0, 0, 0]


def test_kpageflags_close_twice(tmp_path):
    np.zeros(4, dtype=np.uint64).tofile(tmp_path / "kpageflags")
    kpf = KPageFlags(str(tmp_path))
    fd = kpf.fd
    kpf.close()
    kpf.close()
    assert kpf.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


# ---------------------------------------------------------------------------------------------
# scan.mm helpers: PAGEMAP_SCAN regions to per-window masks, and read runs


START = 0x7F0000000000


def _regions(*rows: tuple[int, int, int]) -> np.ndarray:
    if not rows:
        return np.empty((0, 3), dtype=np.uint64)
    return np.array([(START + a, START + b, c) for a, b, c in rows], dtype=np.uint64)


def test_window_masks():
    P, S, H = PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_HUGE
    regions = _regions(
        (0x1000, 0x3000, P),  # inside window 0
        (2 * MB - 0x1000, 2 * MB + 0x1000, S),  # straddles windows 0 and 1
        (4 * MB, 6 * MB, P | H),  # window 2, PMD-mapped
        (6 * MB + 0x5000, 10 * MB, P),  # windows 3 and 4, ends on a boundary
        (14 * MB, 16 * MB, P | H),  # window 7, PMD-mapped
    )
    touched, huge = window_masks(regions, START, 8, 21)
    assert touched.tolist() == [True, True, True, True, True, False, False, True]
    assert huge.tolist() == [False, False, True, False, False, False, False, True]
    assert touched.dtype == bool and huge.dtype == bool


def test_window_masks_edges():
    touched, huge = window_masks(_regions(), START, 4, 21)
    assert not touched.any() and not huge.any() and touched.shape == (4,)
    # One region covering every window; several regions in one window.
    touched, huge = window_masks(_regions((0, 8 * MB, PAGE_IS_PRESENT)), START, 4, 21)
    assert touched.all() and not huge.any()
    rows = [(i * 0x1000, i * 0x1000 + 0x1000, PAGE_IS_PRESENT) for i in range(0, 512, 2)]
    touched, _ = window_masks(_regions(*rows), START, 2, 21)
    assert touched.tolist() == [True, False]
    # The last page of the last window.
    touched, _ = window_masks(_regions((4 * MB - 0x1000, 4 * MB, PAGE_IS_SWAPPED)), START, 2, 21)
    assert touched.tolist() == [False, True]


@pytest.mark.parametrize(("idx", "runs"), [
    ([], []),
    ([0], [(0, 1)]),
    ([5], [(5, 6)]),
    ([0, 1, 2], [(0, 3)]),
    ([0, 1, 2, 5, 6, 9], [(0, 3), (5, 7), (9, 10)]),
    ([3, 5, 7], [(3, 4), (5, 6), (7, 8)]),
    ([1, 2, 3, 100, 511], [(1, 4), (100, 101), (511, 512)]),
])
def test_runs(idx, runs):
    got = _runs(np.array(idx, dtype=np.int64))
    assert got == runs
    assert all(isinstance(a, int) and isinstance(b, int) for a, b in got)
    # From np.flatnonzero, as MmScanner calls it.
    mask = np.zeros(512, dtype=bool)
    mask[idx] = True
    assert _runs(np.flatnonzero(mask)) == runs


# --- per-size controls (fixture trees: every combination, and a kernel without them) ---

@pytest.mark.parametrize(("global_mode", "pmd_mode", "want"), [
    ("always", "inherit", "always"), ("madvise", "inherit", "madvise"),
    ("never", "inherit", "never"),
    ("always", "never", "never"), ("madvise", "never", "never"), ("never", "never", "never"),
    ("always", "madvise", "madvise"), ("madvise", "madvise", "madvise"),
    ("never", "madvise", "madvise"),
    ("always", "always", "always"), ("madvise", "always", "always"),
    ("never", "always", "always"),
    ("madvise", None, "madvise"), ("never", None, "never"),
])
def test_effective_enabled_combines_global_and_pmd_size(sysroot, global_mode, pmd_mode, want):
    thp_dir = sysroot / "kernel/mm/transparent_hugepage"
    words = ["always", "madvise", "never"]
    (thp_dir / "enabled").write_text(
        " ".join(f"[{w}]" if w == global_mode else w for w in words) + "\n")
    if pmd_mode is not None:
        (thp_dir / "hugepages-2048kB").mkdir()
        sizes = ["always", "inherit", "madvise", "never"]
        (thp_dir / "hugepages-2048kB/enabled").write_text(
            " ".join(f"[{w}]" if w == pmd_mode else w for w in sizes) + "\n")
    thp = ThpSysfs(str(sysroot))
    assert thp.pmd_enabled() == pmd_mode
    assert thp.effective_enabled() == want


# ---------------------------------------------------------------------------------------------
# The kernel's own mTHP collapse (Linux 7.2), probed on a fixture tree and on this kernel


def _mthp_tree(root, collapse_stats: bool, sizes: dict[int, str]):
    thp = root / "kernel/mm/transparent_hugepage"
    (thp / "khugepaged").mkdir(parents=True)
    (thp / "hpage_pmd_size").write_text("2097152\n")
    (thp / "khugepaged" / "max_ptes_none").write_text("511\n")
    for kb, mode in {**sizes, 2048: "inherit"}.items():
        d = thp / f"hugepages-{kb}kB"
        (d / "stats").mkdir(parents=True)
        words = ["always", "inherit", "madvise", "never"]
        (d / "enabled").write_text(" ".join(f"[{w}]" if w == mode else w for w in words) + "\n")
        if collapse_stats and kb < 2048:
            (d / "stats" / "collapse_exceed_none_pte").write_text("0\n")


def test_the_kernels_mthp_collapse_is_probed_not_read_from_a_version(tmp_path):
    from hugepaged.kernel import Kernel
    from hugepaged.scan.mthp_kernel import describe, kernel_mthp_collapse

    _mthp_tree(tmp_path / "new", True, {64: "madvise", 16: "never"})
    new = kernel_mthp_collapse(Kernel(sys_root=str(tmp_path / "new")))
    assert new == {"supported": True, "sizes": {"64kB": "madvise"}, "max_ptes_none": 511,
                   "refused": False}
    assert "collapses to 64kB (madvise) itself" in describe(new)
    refused = kernel_mthp_collapse(Kernel(sys_root=str(tmp_path / "new")), max_ptes_none=100)
    assert refused["refused"] and "collapses nothing to those sizes" in describe(refused)
    _mthp_tree(tmp_path / "old", False, {64: "madvise"})
    assert kernel_mthp_collapse(Kernel(sys_root=str(tmp_path / "old"))) == {"supported": False}
    # This 6.18 kernel has per-size controls but no mTHP collapse in its khugepaged.
    this = kernel_mthp_collapse(Kernel())
    assert this == {"supported": False} and describe(this) is None
