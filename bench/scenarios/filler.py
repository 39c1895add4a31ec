#!/usr/bin/env python3
"""Scenario 2's filler: fragment physical memory so that no free 2 MiB block is left.

Standalone (stdlib + numpy), run as root: python filler.py '{"headroom_mib": 3072}'

1. With THP off for the process, fault in 4 KiB pages (MADV_POPULATE_WRITE, 256 MiB at a
   time) until MemFree would drop under headroom_mib. Memory is never filled further than
   that, and this process has oom_score_adj 1000: if memory runs short it is the one to go.
2. Read the PFNs from /proc/self/pagemap and keep ONE page of every physical 2 MiB block it
   holds; pin each kept page by vmsplice()ing it into a pipe (the pipe's page reference makes
   it unmovable: compaction can neither migrate it nor empty its block), then MADV_DONTNEED
   everything else. The freed memory is all still usable, but only as blocks of order < 9.
3. The free 2 MiB blocks that remain (the headroom, and whatever compaction can still
   assemble) are taken as whole THPs with MADV_HUGEPAGE faults (needs THP enabled=madvise at
   this point) until a fault falls back to 4 KiB and /proc/buddyinfo shows no free block of
   order >= 9 outside ZONE_DMA; one page of each THP is pinned the same way. Then
   MADV_NOHUGEPAGE and PR_SET_THP_DISABLE, so that no khugepaged spends time on this process.

Then it prints one JSON line and waits; "exit" or EOF on stdin ends it, and with it every
pin: its blocks are free again (the headroom's as whole 2 MiB blocks).
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

PAGE = 4096
HPAGE = 2 << 20
MIB = 1 << 20
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_WRITE = 23
PROT_RW = 0x3
MAP_PRIVATE_ANON_NORESERVE = 0x02 | 0x20 | 0x4000
F_SETPIPE_SZ = 1031
PIPE_PAGES = 256  # 1 MiB pipes: within the default pipe-max-size
PM_PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1
KPF_COMPOUND_HEAD = 1 << 15
KPF_THP = 1 << 22

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.vmsplice.restype = ctypes.c_ssize_t
libc.vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]


def check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> None:
    check(libc.madvise(addr, length, advice), f"madvise({addr:#x}, {length}, {advice})")


def meminfo_kb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def buddyinfo() -> dict[str, list[int]]:
    zones = {}
    with open("/proc/buddyinfo") as f:
        for line in f:
            parts = line.split()
            zones[f"{parts[1].rstrip(',')}:{parts[3]}"] = [int(x) for x in parts[4:]]
    return zones


def free_huge(zones: dict[str, list[int]]) -> int:
    """Free order>=9 blocks outside ZONE_DMA (lowmem_reserve keeps user pages out of it)."""
    return sum(c << (o - 9) for z, counts in zones.items() if not z.endswith(":DMA")
               for o, c in enumerate(counts) if o >= 9)


def mmap_aligned(length: int) -> int:
    base = libc.mmap(None, length + HPAGE, PROT_RW, MAP_PRIVATE_ANON_NORESERVE, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return (base + HPAGE - 1) & ~(HPAGE - 1)


class Pins:
    """Pages held by pipe buffers: vmsplice takes a page reference for each."""

    def __init__(self) -> None:
        self.pipes: list[tuple[int, int]] = []
        self.used = PIPE_PAGES
        self.count = 0

    def pin(self, addrs: list[int]) -> None:
        i = 0
        while i < len(addrs):
            if self.used == PIPE_PAGES:
                r, w = os.pipe()
                import fcntl
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_PAGES * PAGE)
                self.pipes.append((r, w))
                self.used = 0
            n = min(PIPE_PAGES - self.used, len(addrs) - i)
            iov = (ctypes.c_uint64 * (2 * n))()
            for k in range(n):
                iov[2 * k] = addrs[i + k]
                iov[2 * k + 1] = PAGE
            got = libc.vmsplice(self.pipes[-1][1], iov, n, 0)
            if got != n * PAGE:
                raise OSError(ctypes.get_errno(), f"vmsplice pinned {got} of {n * PAGE} bytes")
            self.used += n
            self.count += n
            i += n


def pagemap(fd: int, start: int, npages: int) -> np.ndarray:
    out = np.empty(npages, dtype=np.uint64)
    got = os.preadv(fd, [memoryview(out).cast("B")], (start // PAGE) * 8)
    if got != npages * 8:
        raise OSError(f"short pagemap read: {got}")
    return out


def take_free_blocks(pins: Pins, pm_fd: int, kpf: int, limit: int,
                     floor_kb: int = 1 << 20) -> tuple[int, int]:
    """Free 2 MiB blocks taken as THPs (MADV_HUGEPAGE faults; needs THP enabled=madvise),
    one page of each pinned, until a fault falls back to 4 KiB pages 64 times, buddyinfo
    shows none left, `limit` bytes are mapped, or MemFree would go under `floor_kb`:
    (THPs taken, fallbacks)."""
    r2 = mmap_aligned(limit)
    madvise(r2, limit, MADV_HUGEPAGE)
    buf = (ctypes.c_char * limit).from_address(r2)
    thps, fallbacks, off = 0, 0, 0
    while off < limit and free_huge(buddyinfo()) > 0 and fallbacks < 64:
        if meminfo_kb("MemFree") < floor_kb:  # never below the floor (default 1 GiB)
            break
        buf[off] = b"\x01"
        e = int(pagemap(pm_fd, r2 + off, 1)[0])
        pfn = e & PFN_MASK
        flags = int.from_bytes(os.pread(kpf, 8, pfn * 8), "little") if pfn else 0
        if pfn % 512 == 0 and flags & KPF_COMPOUND_HEAD and flags & KPF_THP:
            pins.pin([r2 + off])
            thps += 1
        else:
            fallbacks += 1
        off += HPAGE
    # Out of every khugepaged's way: the kernel's scans this process (registered by the
    # MADV_HUGEPAGE above) at a cost of one progress unit per VMA.
    if off < limit:
        check(libc.munmap(ctypes.c_void_p(r2 + off), ctypes.c_size_t(limit - off)), "munmap")
    if off:
        madvise(r2, off, MADV_NOHUGEPAGE)
    return thps, fallbacks


def main() -> int:
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PDEATHSIG")
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    headroom_kb = int(args.get("headroom_mib", 3072)) * 1024
    step = int(args.get("step_mib", 256)) * MIB
    max_thp = int(args.get("max_thp_mib", 8192)) * MIB
    t0 = time.monotonic()
    info: dict = {"pid": os.getpid(), "buddyinfo_before": buddyinfo(),
                  "mem_free_mib_before": meminfo_kb("MemFree") >> 10}

    # 1. 4 KiB pages up to the headroom
    check(libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0), "THP_DISABLE")
    size = meminfo_kb("MemTotal") * 1024
    r1 = mmap_aligned(size)
    madvise(r1, size, MADV_NOHUGEPAGE)
    filled = 0
    while filled + step <= size and meminfo_kb("MemFree") - step // 1024 > headroom_kb:
        madvise(r1 + filled, step, MADV_POPULATE_WRITE)
        filled += step
    info["filled_mib"] = filled // MIB
    info["fill_seconds"] = round(time.monotonic() - t0, 2)
    info["mem_free_mib_at_peak"] = meminfo_kb("MemFree") >> 10

    # 2. one pinned page per physical 2 MiB block, the rest freed
    pm_fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    npages = filled // PAGE
    entries = pagemap(pm_fd, r1, npages)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    pfns = entries & np.uint64(PFN_MASK)
    if present.any() and not pfns[present].any():
        raise PermissionError("no PFNs in pagemap: run as root")
    idx_present = np.flatnonzero(present)
    _, first = np.unique(pfns[idx_present] >> np.uint64(9), return_index=True)
    keep = np.sort(idx_present[first])
    del entries, pfns, present, idx_present
    pins = Pins()
    pins.pin([r1 + int(i) * PAGE for i in keep])
    prev = 0
    for i in keep.tolist() + [npages]:
        if i > prev:
            madvise(r1 + prev * PAGE, (i - prev) * PAGE, MADV_DONTNEED)
        prev = i + 1
    info["blocks_pinned_4k"] = int(keep.size)
    info["fragment_seconds"] = round(time.monotonic() - t0, 2)

    # 3. the remaining free 2 MiB blocks, as pinned THPs (THP allowed again for the faults:
    # step 1's PR_SET_THP_DISABLE would make every one of them fall back to 4 KiB)
    kpf = os.open("/proc/kpageflags", os.O_RDONLY)
    floor_kb = int(args.get("floor_mib", 1024)) * 1024
    check(libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0), "THP_ENABLE")
    thps, fallbacks = take_free_blocks(pins, pm_fd, kpf, max_thp, floor_kb)
    check(libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0), "THP_DISABLE")
    info.update({"thp_taken": thps, "thp_fallbacks": fallbacks,
                 "pinned_pages": pins.count, "pipes": len(pins.pipes),
                 "buddyinfo_after": buddyinfo(), "free_huge_blocks_after": free_huge(buddyinfo()),
                 "mem_free_mib_after": meminfo_kb("MemFree") >> 10,
                 "setup_seconds": round(time.monotonic() - t0, 2)})
    with open("/proc/pagetypeinfo") as f:
        info["pagetypeinfo"] = f.read()
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    hold = bool(args.get("hold"))
    while True:
        # "hold": free blocks that appear later (another process exits, compaction) are
        # taken too, so the fragmentation lasts on a machine others share.
        r, _, _ = select.select([sys.stdin], [], [], 0.2 if hold else None)
        if not r:
            if free_huge(buddyinfo()) > 0 and meminfo_kb("MemFree") >= floor_kb:
                check(libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0), "THP_ENABLE")
                taken, _ = take_free_blocks(pins, pm_fd, kpf, 256 * MIB, floor_kb)
                check(libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0), "THP_DISABLE")
                info["thp_taken_later"] = info.get("thp_taken_later", 0) + taken
            continue
        line = sys.stdin.readline()
        if not line or line.strip() == "exit":
            return 0
        if line.strip() == "buddyinfo":
            sys.stdout.write(json.dumps({"buddyinfo": buddyinfo()}) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
