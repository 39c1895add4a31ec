#!/usr/bin/env python3
"""Scenario 4's idle processes: python idlers.py '{"count": 500}'

Forks `count` children. Each maps one 2 MiB-aligned 2 MiB region, MADV_HUGEPAGE, writes it (as
4 KiB pages: THP is off for the process while it writes), collapses it itself with
madvise(MADV_COLLAPSE) -- so it holds MADV_HUGEPAGE memory with nothing left to collapse --
and sleeps. Prints {"pids": [...], "collapsed": n} once all are ready; "exit" or EOF on stdin
ends them all (they also die with this process).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys

HPAGE = 2 << 20
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def child(ready_w: int) -> None:
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
        base = libc.mmap(None, 2 * HPAGE, 0x3, 0x22, -1, 0)
        start = (base + HPAGE - 1) & ~(HPAGE - 1)
        ctypes.memset(start, 0x5A, HPAGE)
        libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)
        libc.madvise(start, HPAGE, MADV_HUGEPAGE)
        ok = libc.madvise(start, HPAGE, MADV_COLLAPSE) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.close(ready_w)
        for fd in (0, 1):
            os.close(fd)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def main() -> int:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    count = int(json.loads(sys.argv[1]).get("count", 500)) if len(sys.argv) > 1 else 500
    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            child(ready_w)
        pids.append(pid)
    os.close(ready_w)
    got = b""
    while len(got) < count:
        chunk = os.read(ready_r, count - len(got))
        if not chunk:
            break
        got += chunk
    sys.stdout.write(json.dumps({"pids": pids, "collapsed": got.count(b"1")}) + "\n")
    sys.stdout.flush()
    try:
        for line in sys.stdin:
            if line.strip() == "exit":
                break
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
