"""Syscall tracepoints through perf_event_open: MADV_HUGEPAGE and PR_SET_THP_DISABLE, as they
happen, in every process.

The kernel registers an mm with its khugepaged the moment MADV_HUGEPAGE is given
(khugepaged_enter_vma in hugepage_madvise), and a prctl(PR_SET_THP_DISABLE) takes the mm out of
its view. Neither moves a fault counter, so from /proc alone hugepaged would notice them only at
its next forced rescan. The syscall tracepoints (CONFIG_FTRACE_SYSCALLS) show both: one perf
event per CPU and tracepoint (pid -1: every process), a filter in the kernel so only the advice
and option values we care about are recorded, and a mmap'd ring buffer per event whose fd polls
readable when a record arrives. stdlib ctypes only: no compiler, no BPF.

A sys_enter record comes before the syscall does its work: the caller must allow for that.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import re
import struct
from dataclasses import dataclass

from hugepaged.errors import Unsupported

MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
PR_SET_THP_DISABLE = 41
MREMAP_MOVES = (1, 3, 5, 7)  # MREMAP_MAYMOVE alone, with MREMAP_FIXED, MREMAP_DONTUNMAP
MAP_FIXED = 0x10
PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_TID = 1 << 1
PERF_SAMPLE_RAW = 1 << 10
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_FILTER = 0x40082406  # _IOW('$', 6, char *)
ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
ATTR_DISABLED = 1 << 0
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "arm64": 241, "riscv64": 241,
                        "ppc64le": 319, "s390x": 331}
MNT_DETACH = 2
# The ring's header page: data_head and data_tail (struct perf_event_mmap_page).
_HEAD_OFF, _TAIL_OFF = 1024, 1032
_HEADER = struct.Struct("<IHH")
_SAMPLE = struct.Struct("<III")  # pid, tid, raw size
_Q = struct.Struct("<Q")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


@dataclass(frozen=True)
class SyscallEvent:
    """One traced call: 'madvise' (value = the advice, over [start, start + length)),
    'prctl' (value = the option, arg = its arg2, flags = its arg3: PR_SET_THP_DISABLE's
    PR_THP_DISABLE_EXCEPT_ADVISED), 'mremap' or 'mmap' (value = its flags), by thread `tid`
    of process `pid`."""

    what: str
    pid: int
    tid: int
    value: int
    arg: int = 0
    start: int = 0
    length: int = 0
    flags: int = 0


@dataclass(frozen=True)
class Tracepoint:
    """A tracepoint's id and its fields' (offset, size) from its tracefs `format` file."""

    name: str
    id: int
    fields: dict[str, tuple[int, int]]

    def field(self, raw: bytes, name: str) -> int:
        off, size = self.fields[name]
        return int.from_bytes(raw[off:off + size], "little")


_FIELD = re.compile(r"field:[^;]*?(\w+)(?:\[\d*\])?;\s*offset:(\d+);\s*size:(\d+);")


def parse_format(name: str, text: str) -> Tracepoint:
    """A tracefs `format` file: its ID line and its field lines."""
    m = re.search(r"^ID:\s*(\d+)", text, re.M)
    if m is None:
        raise ValueError(f"{name}: no ID in its format file")
    fields = {f: (int(o), int(s)) for f, o, s in _FIELD.findall(text)}
    return Tracepoint(name, int(m.group(1)), fields)


class TraceFS:
    """Where tracefs is, mounted by us if it was not (and unmounted by us only then)."""

    def __init__(self, sys_root: str = "/sys", mount: bool = True) -> None:
        self.dir = f"{sys_root}/kernel/tracing"
        self.mounted_by_us = False
        # Only over a real sysfs (a mount point), never into a fixture tree.
        if not os.path.isdir(f"{self.dir}/events") and mount and os.path.isdir(self.dir) \
                and os.path.ismount(sys_root):
            self.mounted_by_us = \
                _libc.mount(b"nodev", self.dir.encode(), b"tracefs", 0, None) == 0
        if not os.path.isdir(f"{self.dir}/events"):
            raise Unsupported(f"{self.dir}: tracefs is not mounted")

    def tracepoint(self, category: str, name: str) -> Tracepoint:
        path = f"{self.dir}/events/{category}/{name}/format"
        try:
            with open(path) as f:
                return parse_format(name, f.read())
        except FileNotFoundError as err:
            raise Unsupported(f"{path} is missing (no CONFIG_FTRACE_SYSCALLS?)") from err

    def close(self) -> None:
        if self.mounted_by_us:
            _libc.umount2(self.dir.encode(), MNT_DETACH)
            self.mounted_by_us = False


def online_cpus(sys_root: str = "/sys") -> list[int]:
    """/sys/devices/system/cpu/online, e.g. '0-3,6'."""
    with open(f"{sys_root}/devices/system/cpu/online") as f:
        text = f.read().strip()
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _attr(tp_id: int) -> ctypes.Array:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("<IIQQQQQI", buf, 0, PERF_TYPE_TRACEPOINT, ATTR_SIZE, tp_id, 1,
                     PERF_SAMPLE_TID | PERF_SAMPLE_RAW, 0, ATTR_DISABLED, 1)
    return buf


def perf_event_open(tp_id: int, cpu: int) -> int:
    nr = _SYS_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise Unsupported(f"perf_event_open syscall number unknown on {platform.machine()}")
    fd = _libc.syscall(nr, _attr(tp_id), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(tracepoint {tp_id}, cpu {cpu}): "
                           f"{os.strerror(err)}")
    return fd


def _ioctl(fd: int, request: int, arg) -> None:
    if _libc.ioctl(fd, request, arg) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")


class _Ring:
    """One perf event's fd and its mmap'd ring buffer."""

    def __init__(self, fd: int, tp: Tracepoint, pages: int) -> None:
        self.fd, self.tp = fd, tp
        self.page = mmap.PAGESIZE
        self.size = pages * self.page
        self.map = mmap.mmap(fd, self.page + self.size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)

    def records(self) -> tuple[list[tuple[int, int, bytes]], int]:
        """Everything written since the last call: ([(pid, tid, raw)], records lost)."""
        head = _Q.unpack_from(self.map, _HEAD_OFF)[0]
        tail = _Q.unpack_from(self.map, _TAIL_OFF)[0]
        if head == tail:
            return [], 0
        start, n = self.page + tail % self.size, head - tail
        end = start + n
        if end <= self.page + self.size:
            data = self.map[start:end]
        else:  # wrapped around the end of the ring
            data = self.map[start:self.page + self.size] + \
                self.map[self.page:self.page + end - self.page - self.size]
        _Q.pack_into(self.map, _TAIL_OFF, head)
        out, lost, off = [], 0, 0
        while off + _HEADER.size <= len(data):
            kind, _misc, size = _HEADER.unpack_from(data, off)
            if size == 0:
                break
            if kind == PERF_RECORD_SAMPLE:
                pid, tid, raw_size = _SAMPLE.unpack_from(data, off + 8)
                raw = data[off + 8 + _SAMPLE.size:off + 8 + _SAMPLE.size + raw_size]
                out.append((pid, tid, raw))
            elif kind == PERF_RECORD_LOST:
                lost += _Q.unpack_from(data, off + 16)[0]
            off += size
        return out, lost

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


RANGES = {"madvise": ("start", "len_in"), "mmap": ("addr", "len")}


class SyscallTracer:
    """madvise(MADV_HUGEPAGE), prctl(PR_SET_THP_DISABLE), a moving mremap and a MAP_FIXED
    mmap in every process, per CPU.

    fds() go into a selector; events() drains every ring. Raises Unsupported (or OSError)
    where the tracepoints or perf_event_open are not to be had, so the caller falls back.
    """

    # mremap moving a mapping (MREMAP_MAYMOVE, with FIXED or DONTUNMAP): the VMAs a kept
    # memory map names may be elsewhere now. mmap with MAP_FIXED: a fresh mapping may
    # replace one in place, bounds and permissions alike, its flags (VM_HUGEPAGE) not
    # (/proc/PID/maps shows no difference). Values are compared with ==; a mask (an int, not
    # a tuple) is tested with &.
    SOURCES = {"madvise": ("sys_enter_madvise", "behavior", (MADV_HUGEPAGE, MADV_NOHUGEPAGE)),
               "prctl": ("sys_enter_prctl", "option", (PR_SET_THP_DISABLE,)),
               "mremap": ("sys_enter_mremap", "flags", MREMAP_MOVES),
               "mmap": ("sys_enter_mmap", "flags", MAP_FIXED)}

    def __init__(self, sys_root: str = "/sys", ring_pages: int = 8,
                 values: dict[str, tuple[int, ...] | int] | None = None,
                 sources: tuple[str, ...] | None = None) -> None:
        self.tracefs = TraceFS(sys_root)
        self.rings: list[tuple[str, _Ring]] = []
        self.lost = 0
        try:
            for what, (event, field, default) in self.SOURCES.items():
                if sources is not None and what not in sources:
                    continue
                tp = self.tracefs.tracepoint("syscalls", event)
                wanted = (values or {}).get(what, default)
                expr = (f"{field} & {wanted}" if isinstance(wanted, int) else
                        " || ".join(f"{field} == {v}" for v in wanted)).encode()
                for cpu in online_cpus(sys_root):
                    fd = perf_event_open(tp.id, cpu)
                    try:
                        _ioctl(fd, PERF_EVENT_IOC_SET_FILTER, ctypes.c_char_p(expr))
                        ring = _Ring(fd, tp, ring_pages)
                    except BaseException:
                        os.close(fd)
                        raise
                    self.rings.append((what, ring))
            for _, ring in self.rings:
                _ioctl(ring.fd, PERF_EVENT_IOC_ENABLE, None)
        except BaseException:
            self.close()
            raise

    def fds(self) -> list[int]:
        return [ring.fd for _, ring in self.rings]

    def events(self) -> list[SyscallEvent]:
        out: list[SyscallEvent] = []
        for what, ring in self.rings:
            records, lost = ring.records()
            self.lost += lost
            field = self.SOURCES[what][1]
            # The range, where the call has one: madvise's (start, len_in), mmap's (addr, len).
            names = RANGES.get(what)
            ranged = names is not None and set(names) <= ring.tp.fields.keys()
            flagged = what == "prctl" and "arg3" in ring.tp.fields
            for pid, tid, raw in records:
                arg = ring.tp.field(raw, "arg2") if what == "prctl" else 0
                start, length = (ring.tp.field(raw, names[0]), ring.tp.field(raw, names[1])) \
                    if ranged else (0, 0)
                flags = ring.tp.field(raw, "arg3") if flagged else 0
                out.append(SyscallEvent(what, pid, tid, ring.tp.field(raw, field) & 0xFFFFFFFF,
                                        arg, start, length, flags))
        return out

    def close(self) -> None:
        for _, ring in self.rings:
            with contextlib.suppress(OSError):
                ring.close()
        self.rings = []
        self.tracefs.close()
