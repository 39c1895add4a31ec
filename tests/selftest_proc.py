#!/usr/bin/env python3
"""The process of the kernel's khugepaged selftest (tools/testing/selftests/mm/khugepaged.c),
written anew: one area of memory at a fixed address, changed step by step on command.

Standalone on purpose: stdlib only, never imports hugepaged (the collapser under test must not
share code with the process it collapses).

Usage: ``python tests/selftest_proc.py``, then one command per line on stdin, one JSON line
answered for each (offsets are bytes from the area's start, as the selftest's are):

    setup KIND NR [PATH]  anon | shmem | file: NR 2 MiB windows at BASE (1 GiB). anon is
                          MAP_PRIVATE|MAP_ANONYMOUS; shmem a memfd mapped MAP_SHARED; file a
                          new file PATH, written with the pattern, reopened read-only and
                          mapped MAP_PRIVATE, PROT_READ|PROT_EXEC (the selftest's layout),
                          its page cache dropped and the mapping MADV_RANDOM (no readahead)
    fault A B             the selftest's fill_memory (anon, shmem: one int per page, the page
                          index + 0xdead0000) or MADV_POPULATE_READ (file) over [A, B)
    madvise ADV A LEN     madvise(BASE + A, LEN, ADV) -> {"ok", "errno"}
    collapse A LEN        MADV_COLLAPSE, retried once on EAGAIN (madvise_collapse_retry)
    validate A B          the pattern of every page of [A, B) -> {"ok", "bad": page index}
    extreme               collapse_compound_extreme's construction: 512 times fault a THP
                          at BASE, keep one more of its pages beside the ones kept so far
                          (two mremaps); the area is then one window of 512 different THPs
    fork                  fork(): the child answers {"pid": child} and takes the commands
                          from here on; `exit` in the child ends it, and the parent then
                          answers {"ok", "status"} (its exit status)
    cleanup               unmap the area (close and unlink a file)
    exit                  -> {"ok": true}, then exit 0
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys

PAGE = os.sysconf("SC_PAGESIZE")
HPAGE = 2 << 20
NR = HPAGE // PAGE
BASE = 1 << 30
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_RANDOM, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 1, 14, 15
MADV_POPULATE_READ, MADV_COLLAPSE = 22, 25
PR_SET_PDEATHSIG = 1
MAGIC = 0xDEAD0000

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> int:
    """0 or the errno."""
    return 0 if libc.madvise(addr, length, advice) == 0 else ctypes.get_errno()


def page_words(start: int, end: int) -> bytes:
    """fill_memory's values for pages start..end-1, as the first 4 bytes of each page."""
    return b"".join(((i + MAGIC) & 0xFFFFFFFF).to_bytes(4, "little") + bytes(PAGE - 4)
                    for i in range(start, end))


class Area:
    def __init__(self) -> None:
        self.kind = ""
        self.size = 0
        self.fd = -1
        self.path = ""
        self.child = False  # the forked child of `fork`: it exits with os._exit

    def map(self, length: int, prot: int, flags: int, fd: int = -1) -> None:
        got = libc.mmap(BASE, length, prot, flags | MAP_FIXED_NOREPLACE, fd, 0)
        if got in (None, MAP_FAILED) or got != BASE:
            raise fail(f"mmap at {BASE:#x}")

    def setup(self, kind: str, nr: int, path: str = "") -> None:
        self.kind, self.size = kind, nr * HPAGE
        if kind == "anon":
            self.map(self.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        elif kind == "shmem":
            self.fd = os.memfd_create("khugepaged-selftest-collapse-shmem", 0)
            os.ftruncate(self.fd, self.size)
            self.map(self.size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd)
        elif kind == "file":
            self.path = path
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_EXCL, 0o600)
            try:
                os.write(fd, page_words(0, self.size // PAGE))
                os.fsync(fd)
            finally:
                os.close(fd)
            self.fd = os.open(path, os.O_RDONLY)
            self.map(self.size, PROT_READ | PROT_EXEC, MAP_PRIVATE, self.fd)
            # The selftest drops the page cache and sets the disk's read_ahead_kb to 0, so
            # that only the pages it faults are in the cache: this file's cache alone here
            # (tmpfs keeps its pages: they are the file), and no readahead on this mapping.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if madvise(BASE, self.size, MADV_RANDOM):
                raise fail("MADV_RANDOM")
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def fault(self, start: int, end: int) -> None:
        if self.kind == "file":
            if madvise(BASE + start, end - start, MADV_POPULATE_READ):
                raise fail("MADV_POPULATE_READ")
            return
        for i in range(start // PAGE, end // PAGE):
            ctypes.c_uint32.from_address(BASE + i * PAGE).value = (i + MAGIC) & 0xFFFFFFFF

    def validate(self, start: int, end: int) -> int | None:
        """The first page of [start, end) whose value is not the pattern's."""
        for i in range(start // PAGE, end // PAGE):
            if ctypes.c_uint32.from_address(BASE + i * PAGE).value != (i + MAGIC) & 0xFFFFFFFF:
                return i
        return None

    def cleanup(self) -> None:
        libc.munmap(BASE, self.size)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path:
            os.unlink(self.path)
            self.path = ""


def collapse_retry(addr: int, length: int) -> int:
    """madvise_collapse_retry: one more try right away on EAGAIN. 0 or the errno."""
    err = madvise(addr, length, MADV_COLLAPSE)
    if err == errno.EAGAIN:
        err = madvise(addr, length, MADV_COLLAPSE)
    return err


def huge_at(addr: int) -> bool:
    """A PMD-size THP maps [addr, addr + 2 MiB): its first frame a THP head at a 512-frame
    boundary, its last page the head's 511th frame (the construction's own sanity check;
    pagemap and kpageflags: a few reads, where smaps would walk every VMA 512 times)."""
    def pfn(a: int) -> int:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(a // PAGE * 8)
            e = int.from_bytes(f.read(8), "little")
        return e & ((1 << 55) - 1) if e >> 63 else 0

    head = pfn(addr)
    if not head or head % NR or pfn(addr + HPAGE - PAGE) != head + NR - 1:
        return False
    with open("/proc/kpageflags", "rb") as f:
        f.seek(head * 8)
        flags = int.from_bytes(f.read(8), "little")
    return bool(flags & (1 << 15) and flags & (1 << 22))  # COMPOUND_HEAD, THP


def extreme(area: Area) -> None:
    """collapse_compound_extreme's loop: a page table full of pages of 512 different THPs."""
    data = page_words(0, NR)
    for i in range(NR):
        madvise(BASE, HPAGE, MADV_HUGEPAGE)
        ctypes.memmove(BASE, data, HPAGE)
        if not huge_at(BASE):
            raise RuntimeError(f"step {i}: no huge page allocated at fault")
        madvise(BASE, HPAGE, MADV_NOHUGEPAGE)
        got = libc.mremap(BASE - i * PAGE, i * PAGE + HPAGE, (i + 1) * PAGE,
                          MREMAP_MAYMOVE | MREMAP_FIXED, BASE + 2 * HPAGE)
        if got in (None, MAP_FAILED):
            raise fail("mremap+unmap")
        got = libc.mremap(BASE + 2 * HPAGE, (i + 1) * PAGE, (i + 1) * PAGE + HPAGE,
                          MREMAP_MAYMOVE | MREMAP_FIXED, BASE - (i + 1) * PAGE)
        if got in (None, MAP_FAILED):
            raise fail("mremap+alloc")
    # The selftest's area ends up at BASE - 512 pages = BASE - HPAGE: move it back to BASE,
    # so that every later command keeps its offsets (the selftest works on the returned p).
    libc.munmap(BASE, HPAGE)
    got = libc.mremap(BASE - HPAGE, HPAGE, HPAGE, MREMAP_MAYMOVE | MREMAP_FIXED, BASE)
    if got in (None, MAP_FAILED):
        raise fail("mremap back")


def reply(obj: dict) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def read_line() -> str:
    """One command line, read unbuffered: after fork the parent must not hold input that
    was meant for the child."""
    out = bytearray()
    while True:
        b = os.read(0, 1)
        if not b:
            return ""
        if b == b"\n":
            return out.decode()
        out += b


def serve(area: Area) -> None:
    while True:
        line = read_line()
        if not line:
            return
        cmd, *args = line.split()
        try:
            if cmd == "setup":
                area.setup(args[0], int(args[1]), args[2] if len(args) > 2 else "")
                reply({"ok": True, "base": BASE, "pid": os.getpid()})
            elif cmd == "fault":
                area.fault(int(args[0]), int(args[1]))
                reply({"ok": True})
            elif cmd == "madvise":
                err = madvise(BASE + int(args[1]), int(args[2]), int(args[0]))
                reply({"ok": err == 0, "errno": err})
            elif cmd == "collapse":
                err = collapse_retry(BASE + int(args[0]), int(args[1]))
                reply({"ok": err == 0, "errno": err})
            elif cmd == "validate":
                bad = area.validate(int(args[0]), int(args[1]))
                reply({"ok": bad is None, "bad": bad})
            elif cmd == "extreme":
                extreme(area)
                reply({"ok": True})
            elif cmd == "fork":
                child = os.fork()
                if child == 0:
                    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                    area.child = True
                    reply({"ok": True, "pid": os.getpid()})
                    continue
                _, status = os.waitpid(child, 0)
                reply({"ok": True, "status": os.waitstatus_to_exitcode(status)})
            elif cmd == "cleanup":
                area.cleanup()
                reply({"ok": True})
            elif cmd == "exit":
                reply({"ok": True})
                return
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except (OSError, ValueError, IndexError, RuntimeError) as e:
            reply({"ok": False, "error": str(e)})


def main() -> int:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return 1
    area = Area()
    serve(area)
    if area.child:
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
