"""The syscall tracepoints through perf_event_open, with real processes calling madvise and prctl.

This machine has the syscall tracepoints once tracefs is mounted; the tracer mounts it if it is
absent and unmounts it only if it mounted it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hugepaged.errors import Unsupported
from hugepaged.kernel.tracepoints import (
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    PR_SET_THP_DISABLE,
    SyscallTracer,
    TraceFS,
    parse_format,
)

from . import marks

pytestmark = marks.KERNEL
TRACING = Path("/sys/kernel/tracing")

CHILD = r"""
import ctypes, mmap, os, sys
if len(sys.argv) > 2:
    os.sched_setaffinity(0, {int(sys.argv[2])})
libc = ctypes.CDLL(None, use_errno=True)
m = mmap.mmap(-1, 4 << 20)
for _ in range(int(sys.argv[1])):
    m.madvise(14)                      # MADV_HUGEPAGE: traced
    m.madvise(4)                       # MADV_DONTNEED: filtered out in the kernel
m.madvise(15)                          # MADV_NOHUGEPAGE: traced
libc.prctl(41, 1, 2, 0, 0)             # PR_SET_THP_DISABLE 1, EXCEPT_ADVISED: traced
libc.prctl(15, b"child", 0, 0, 0)      # PR_SET_NAME: filtered out
print(os.getpid(), ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
"""
EXTRA = 2  # records after the loop's: MADV_NOHUGEPAGE, PR_SET_THP_DISABLE
# The calls the child makes (a Python's start-up makes MAP_FIXED mmaps by the dozen: the
# dynamic loader's; test_a_map_fixed_mmap_is_seen looks at those).
CALLS = ("madvise", "prctl")


def _child(n: int = 1, cpu: int | None = None, address: bool = False):
    extra = [] if cpu is None else [str(cpu)]
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), *extra], capture_output=True,
                         text=True, timeout=30, check=True)
    pid, addr = (int(x) for x in out.stdout.split())
    return (pid, addr) if address else pid


def _drain(tracer: SyscallTracer, pid: int, want: int, timeout: float = 5.0) -> list:
    got, t0 = [], time.monotonic()
    while len(got) < want and time.monotonic() - t0 < timeout:
        select.select(tracer.fds(), [], [], 0.1)
        got += [e for e in tracer.events() if e.pid == pid]
    return got


def _tracefs_mounted() -> bool:
    return (TRACING / "events").is_dir()


@pytest.fixture
def tracer():
    t = SyscallTracer(sources=CALLS)
    try:
        yield t
    finally:
        t.close()


def test_madvise_hugepage_and_thp_disable_are_seen(tracer):
    assert _tracefs_mounted()
    pid, addr = _child(address=True)
    got = _drain(tracer, pid, 3)
    assert [(e.what, e.value, e.arg) for e in got] == [
        ("madvise", MADV_HUGEPAGE, 0), ("madvise", MADV_NOHUGEPAGE, 0),
        ("prctl", PR_SET_THP_DISABLE, 1)]
    assert all(e.tid == pid for e in got)
    assert [(e.start, e.length) for e in got[:2]] == [(addr, 4 << 20)] * 2  # the range
    assert got[2].flags == 2  # PR_THP_DISABLE_EXCEPT_ADVISED, the call's arg3
    time.sleep(0.1)
    assert [e for e in tracer.events() if e.pid == pid] == []  # the filter left the rest out


def test_a_map_fixed_mmap_and_a_moving_mremap_are_seen():
    """The two calls that change a memory map's VM flags where /proc/PID/maps may show no
    difference (a mapping replaced in place, one moved): daemon/visit.py relies on them."""
    t = SyscallTracer(sources=("mmap", "mremap"))
    try:
        code = (
            "import ctypes, mmap\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.mmap.restype = ctypes.c_void_p\n"
            "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,"
            " ctypes.c_int, ctypes.c_long]\n"
            "libc.mremap.restype = ctypes.c_void_p\n"
            "libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,"
            " ctypes.c_int]\n"
            "a = libc.mmap(None, 1 << 21, 3, 0x22, -1, 0)\n"
            "assert libc.mmap(a, 1 << 21, 3, 0x32, -1, 0) == a\n"  # MAP_FIXED over itself
            "assert libc.mremap(a, 1 << 21, 1 << 22, 1) not in (None, 2**64 - 1)\n")
        p = subprocess.Popen([sys.executable, "-c", code])
        assert p.wait(30) == 0
        got = _drain(t, p.pid, 10_000, timeout=1.0)
        mine = [e for e in got if e.what == "mmap" and e.value & 0x10]
        assert mine, "no MAP_FIXED mmap seen"
        assert any(e.value == 0x32 for e in mine)  # MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED
        assert [e.value for e in got if e.what == "mremap"] == [1]  # MREMAP_MAYMOVE
        assert all(e.value & 0x10 for e in got if e.what == "mmap")  # the filter: FIXED only
        assert all(e.start and e.length for e in mine)  # the range replaced
        assert any(e.length == 1 << 21 for e in mine if e.value == 0x32)
    finally:
        t.close()


def test_ring_wraps_and_counts_lost_records():
    t = SyscallTracer(ring_pages=1, sources=CALLS)  # 4 KiB rings: ~50 records each
    try:
        pid = _child(30)
        got = _drain(t, pid, 30 + EXTRA)
        assert len(got) == 30 + EXTRA and t.lost == 0
        pid = _child(30)  # continues past the end of the ring: read across the wrap
        got = _drain(t, pid, 30 + EXTRA)
        assert len(got) == 30 + EXTRA and t.lost == 0
        pid = _child(400)  # more than a ring holds, unread
        time.sleep(0.2)
        got = [e for e in t.events() if e.pid == pid]
        assert 0 < len(got) < 400 + EXTRA
        # The kernel writes the count of what it dropped with the next record it can write
        # into that CPU's ring: one more call on every CPU.
        for cpu in sorted(os.sched_getaffinity(0)):
            pid = _child(1, cpu)
            assert len(_drain(t, pid, 1 + EXTRA)) == 1 + EXTRA
        assert t.lost > 0
    finally:
        t.close()


def test_mounts_tracefs_only_if_absent_and_unmounts_only_what_it_mounted():
    was = _tracefs_mounted()
    fs = TraceFS()
    assert _tracefs_mounted()
    assert fs.mounted_by_us == (not was)
    inner = TraceFS()  # mounted now: a second user must not unmount it
    assert not inner.mounted_by_us
    inner.close()
    assert _tracefs_mounted()
    fs.close()
    assert _tracefs_mounted() == was


def test_missing_tracefs_is_unsupported(tmp_path):
    (tmp_path / "kernel/tracing").mkdir(parents=True)
    with pytest.raises(Unsupported, match="tracefs is not mounted"):
        SyscallTracer(sys_root=str(tmp_path))  # a fixture root is never mounted over
    assert not os.listdir(tmp_path / "kernel/tracing")


def test_parse_format():
    text = """name: sys_enter_madvise
ID: 726
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:unsigned long start;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int behavior;\toffset:32;\tsize:8;\tsigned:0;
"""
    tp = parse_format("sys_enter_madvise", text)
    assert tp.id == 726
    assert tp.fields["behavior"] == (32, 8) and tp.fields["start"] == (16, 8)
    raw = bytes(32) + (14).to_bytes(8, "little")
    assert tp.field(raw, "behavior") == 14
    with pytest.raises(ValueError):
        parse_format("x", "format:\n")
