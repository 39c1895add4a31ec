#!/usr/bin/env python3
"""Scenario 3's TLB-sensitive workload: random 8-byte reads over a few GiB, throughput per second.

Standalone (stdlib + numpy): python tlbreader.py '{"gib": 2}'

Set-up, with THP off for the process (PR_SET_THP_DISABLE) so that everything is 4 KiB pages:
a 2 MiB-aligned anonymous region of `gib` GiB, every uint64 word i set to i * GOLDEN; an index
buffer of random word offsets and an output buffer, both in their own MADV_NOHUGEPAGE mappings
(numpy's own allocations would ask for huge pages themselves). Then THP is allowed again,
without MADV_HUGEPAGE yet, and it prints {"pid", "start", "end"}.

Then it reads: each round gathers BATCH random words (np.take into the output buffer), and every
second or so prints {"t": CLOCK_MONOTONIC, "reads_per_s": ...}. Commands on stdin:
    hugepage  MADV_HUGEPAGE on the region (now it is khugepaged's / hugepaged's to collapse);
              answers {"hugepage": t}
    verify    stops reading, checks every word, answers {"verify": true|false}, resumes
    exit      exits (EOF too)
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

try:  # numpy asks for huge pages on its own big allocations; this workload must not
    np._core.multiarray._set_madvise_hugepage(False)
except AttributeError:
    np.core.multiarray._set_madvise_hugepage(False)

HPAGE = 2 << 20
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
BATCH = 1 << 20
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_WRITE = 23
PROT_RW = 0x3
MAP_FLAGS = 0x02 | 0x20 | 0x4000  # private, anonymous, noreserve

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def madvise(addr: int, length: int, advice: int) -> None:
    if libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise {advice}: {os.strerror(err)}")


def mapping(length: int, huge_ok: bool) -> tuple[int, np.ndarray]:
    base = libc.mmap(None, length + HPAGE, PROT_RW, MAP_FLAGS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    start = (base + HPAGE - 1) & ~(HPAGE - 1)
    if not huge_ok:
        madvise(start, length, MADV_NOHUGEPAGE)
    madvise(start, length, MADV_POPULATE_WRITE)
    buf = (ctypes.c_char * length).from_address(start)
    return start, np.frombuffer(buf, dtype=np.uint64)


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    length = int(float(args.get("gib", 2)) * (1 << 30)) // HPAGE * HPAGE
    libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    start, data = mapping(length, huge_ok=True)
    chunk = 1 << 24
    for i in range(0, data.size, chunk):
        n = min(chunk, data.size - i)
        np.multiply(np.arange(i, i + n, dtype=np.uint64), GOLDEN, out=data[i:i + n])
    _, idx = mapping(BATCH * 8, huge_ok=False)
    _, out = mapping(BATCH * 8, huge_ok=False)
    idx_i = idx.view(np.int64)
    idx_i[:] = np.random.default_rng(12345).integers(0, data.size, BATCH, dtype=np.int64)
    libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)
    reply({"pid": os.getpid(), "start": start, "end": start + length})

    reads, t_last = 0, time.monotonic()
    stdin = sys.stdin.fileno()
    while True:
        np.take(data, idx_i, out=out)
        reads += BATCH
        now = time.monotonic()
        if now - t_last >= 1.0:
            reply({"t": now, "reads_per_s": reads / (now - t_last)})
            reads, t_last = 0, now
        r, _, _ = select.select([stdin], [], [], 0)
        if not r:
            continue
        line = sys.stdin.readline()
        cmd = line.strip()
        if not line or cmd == "exit":
            return 0
        if cmd == "hugepage":
            madvise(start, length, MADV_HUGEPAGE)
            reply({"hugepage": time.monotonic()})
        elif cmd == "verify":
            ok = True
            for i in range(0, data.size, chunk):
                n = min(chunk, data.size - i)
                if not np.array_equal(data[i:i + n],
                                      np.arange(i, i + n, dtype=np.uint64) * GOLDEN):
                    ok = False
                    break
            reply({"verify": ok})
            reads, t_last = 0, time.monotonic()
        else:
            reply({"error": f"unknown command {cmd!r}"})


if __name__ == "__main__":
    sys.exit(main())
