#!/usr/bin/env python3
"""A real process with a chosen anonymous-memory layout, for hugepaged's tests and benchmarks.

Standalone on purpose: stdlib and numpy only, never imports hugepaged.

Usage: ``python kit/workload.py SPEC_JSON``

SPEC_JSON::

    {"regions": [REGION, ...], "prctl_thp_disable": false, "prctl_thp_flags": 0,
     "fork_child": false}

prctl_thp_disable leaves PR_SET_THP_DISABLE on after setup; prctl_thp_flags is its arg3
(2: PR_THP_DISABLE_EXCEPT_ADVISED, 6.18: THP only in MADV_HUGEPAGE regions).

REGION (only "name" and "windows" are required)::

    {"name": "a",                # unique
     "windows": 4,               # number of 2 MiB windows
     "fill": "all",              # "all" | "none" | "first:N" | "every:K" | "pages:[i,j,...]"
                                 # (4 KiB page indexes 0..511 inside EACH window; default "all")
     "zero_pages": "first:Z",    # read-fault the first Z untouched pages of each window
                                 # (for fill "first:N" those are pages N..N+Z-1): zero page
     "hugepage": false,          # MADV_HUGEPAGE after filling
     "nohugepage": false,        # MADV_NOHUGEPAGE after filling
     "mlock": false,             # mlock2(MLOCK_ONFAULT) after filling: locks, does not populate
     "share_after_fork": S,      # with fork_child: S filled pages per window stay shared
     "kind": "private",          # "private" | "memfd" | "shared_anon" (MAP_SHARED|MAP_ANONYMOUS)
     "misalign": false,          # shared kinds: map 4 KiB past a 2 MiB boundary at file offset
                                 # 0, so no address is congruent to its offset modulo 2 MiB
     "cache_fill": "none",       # memfd: pages (same syntax as fill, disjoint from it) written
                                 # through the file only: in the page cache, never mapped
     "pageout": "none",          # after filling: MADV_PAGEOUT of these pages (swap, if on)
     "cold": false,              # after filling: MADV_COLD of the region (deactivated:
                                 # PG_referenced and the PTEs' young bits cleared, as
                                 # reclaim's aging does)
     "thp_fault": false,         # fault this region in with THP allowed (mTHP sizes the
                                 # kernel has on give large folios); default: 4 KiB pages
     "attach": PATH}             # memfd: map the file at PATH (say /proc/P/fd/N of another
                                 # workload) instead of a new memfd; same name, same content

Layout: each region is an anonymous private mapping of exactly windows * 2 MiB, 2 MiB-aligned,
with a one-page PROT_NONE guard on each side so that it never merges with a neighbouring VMA.
Shared kinds are one MAP_SHARED mapping of a memfd (offset 0) or of shared anonymous memory,
2 MiB-aligned unless "misalign", with the same guard pages; the fork_child shares them (it
keeps them mapped and does not MADV_NOHUGEPAGE them).
Pages are faulted in as 4 KiB pages (the process has PR_SET_THP_DISABLE set while it fills, so
this holds even under enabled=always or with mTHP sizes on); MADV_HUGEPAGE / MADV_NOHUGEPAGE /
mlock come afterwards, each on exactly the region.

Content of a written page: 512 little-endian uint64 words,
``word[w] = (seed ^ (g * 0x9E3779B97F4A7C15)) + w  (mod 2**64)`` where seed is the first 8
bytes of blake2b(name) and g = window * 512 + page is the page's index in the region.

fork_child: after filling, the process forks; the child applies MADV_NOHUGEPAGE to its copies
(so the kernel's khugepaged never collapses them), closes stdin/stdout and sleeps until its parent
dies (PR_SET_PDEATHSIG SIGKILL). For a region with share_after_fork S the parent then rewrites
(same content) its first len(touched) - S touched pages of each window, which breaks their
copy-on-write sharing; the last S touched pages stay shared with the child. Regions without
share_after_fork stay fully shared.

Then one JSON line on stdout::

    {"pid": P, "child_pid": C | null, "setup_seconds": T,
     "regions": {"a": {"start": S, "end": E, "windows": W, "touched": [...], "zero": [...],
                       "kind": K, "fd": memfd number or null, "cache": [...]}}}

and commands on stdin, one per line, one JSON line answered for each:
    verify       -> {"ok": true} | {"ok": false, "bad": [[name, window, page], ...]}
                    (checks touched pages' pattern and that zero pages read as zeros; never reads
                    pages that were not faulted in, so it does not change the layout;
                    cache_fill pages are read back through the file)
    touch NAME   -> {"ok": true}: rewrite the pattern of all touched pages of NAME
    purge NAME K -> {"ok": true}: MADV_DONTNEED the last K touched pages of every window of
                    NAME (an allocator giving memory back: a huge page there is split);
                    they are no longer touched (verify skips them)
    name HEX     -> {"ok": true}: prctl(PR_SET_NAME, bytes.fromhex(HEX)) (the process
                    connector reports this one as a comm event)
    comm HEX     -> {"ok": true}: write bytes.fromhex(HEX) to /proc/self/comm (a name is data:
                    any bytes, newlines and escape sequences included)
    hugepage NAME, nohugepage NAME -> {"ok": true, "time": T}: MADV_HUGEPAGE / MADV_NOHUGEPAGE
                    on NAME now (T: time.time() right after the call)
    remap NAME   -> {"ok": true}: replace region NAME by a fresh private anonymous mapping at the
                    same address (mmap MAP_FIXED: no MADV_HUGEPAGE), refaulted as 4 KiB pages
                    with the same pattern, so verify still checks it
    pin NAME W P -> {"ok": true}: vmsplice page P of window W of NAME into a pipe kept open, so
                    the pipe's buffer holds a reference on the page (the kernel's collapse then
                    finds an unexpected reference count: SCAN_PAGE_COUNT, EAGAIN)
    unpin        -> {"ok": true}: drain and close those pipes (the references are dropped)
    thp_disable A F -> {"ok": true, "get": G}: prctl(PR_SET_THP_DISABLE, A, F) now, G what
                    PR_GET_THP_DISABLE answers after it (kept across `remap`)
    exit         -> {"ok": true}, then exit 0.   EOF on stdin: exit 0.
Errors in the spec: message on stderr, exit status 2.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import sys
import time

# One thread is enough, and keeps fork() clean.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

PAGE = 4096
HPAGE = 2 * 1024 * 1024
PAGES_PER_WINDOW = HPAGE // PAGE  # 512
WORDS_PER_PAGE = PAGE // 8  # 512
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_WORDS = np.arange(WORDS_PER_PAGE, dtype=np.uint64)

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTNEED = 4
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_WRITE = 23
MLOCK_ONFAULT = 1
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
PR_SET_NAME = 15
PR_GET_THP_DISABLE = 42

# Pages handled per numpy operation when filling or verifying (4 MiB: stays in cache).
CHUNK_PAGES = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
for _fn in ("munmap", "madvise", "mprotect"):
    getattr(_libc, _fn).restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mlock2.restype = ctypes.c_int
_libc.mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class SpecError(ValueError):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl({option}, {arg2}, {arg3})")


# PR_SET_THP_DISABLE's (arg2, arg3) as the process has it outside its own faulting.
THP_MODE = [0, 0]


def restore_thp_mode() -> None:
    prctl(PR_SET_THP_DISABLE, *THP_MODE)


def madvise(addr: int, length: int, advice: int) -> None:
    _check(_libc.madvise(addr, length, advice), f"madvise({addr:#x}, {length}, {advice})")


def map_region(windows: int) -> int:
    """Map windows * 2 MiB, 2 MiB-aligned, with a PROT_NONE guard page on each side."""
    length = windows * HPAGE
    total = length + 2 * HPAGE
    base = _libc.mmap(None, total, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if base is None or base == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap({total}): {os.strerror(err)}")
    start = (base + PAGE + HPAGE - 1) & ~(HPAGE - 1)
    end = start + length
    # Keep one guard page each side, give the rest back.
    if start - PAGE > base:
        _check(_libc.munmap(base, start - PAGE - base), "munmap head")
    if base + total > end + PAGE:
        _check(_libc.munmap(end + PAGE, base + total - end - PAGE), "munmap tail")
    _check(_libc.mprotect(start - PAGE, PAGE, PROT_NONE), "mprotect guard")
    _check(_libc.mprotect(end, PAGE, PROT_NONE), "mprotect guard")
    return start


def map_shared(windows: int, kind: str, misalign: bool, fd: int) -> int:
    """A MAP_SHARED mapping of windows * 2 MiB with a PROT_NONE guard page on each side,
    at a 2 MiB boundary (plus one page if misaligned)."""
    length = windows * HPAGE
    base = map_region(windows + 2)  # a reservation, replaced below
    start = base + HPAGE + (PAGE if misalign else 0)
    flags = MAP_SHARED | MAP_FIXED | (MAP_ANONYMOUS if kind == "shared_anon" else 0)
    got = _libc.mmap(start, length, PROT_READ | PROT_WRITE, flags, fd, 0)
    if got != start:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap shared {kind}: {os.strerror(err)}")
    _check(_libc.munmap(base, start - PAGE - base), "munmap head")
    tail = base + (windows + 2) * HPAGE
    if tail > start + length + PAGE:
        _check(_libc.munmap(start + length + PAGE, tail - start - length - PAGE), "munmap tail")
    return start


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SpecError(f"{what}: not an integer: {text!r}") from None


def parse_fill(fill: str) -> list[int]:
    if fill == "all":
        return list(range(PAGES_PER_WINDOW))
    if fill == "none":
        return []
    kind, _, arg = fill.partition(":")
    if kind == "first":
        n = _int(arg, "fill first:N")
        if not 0 <= n <= PAGES_PER_WINDOW:
            raise SpecError(f"fill {fill!r}: N must be 0..512")
        return list(range(n))
    if kind == "every":
        k = _int(arg, "fill every:K")
        if k < 1:
            raise SpecError(f"fill {fill!r}: K must be >= 1")
        return list(range(0, PAGES_PER_WINDOW, k))
    if kind == "pages":
        try:
            pages = json.loads(arg)
        except json.JSONDecodeError:
            raise SpecError(f"fill {fill!r}: pages:[i,j,...] expected") from None
        if not isinstance(pages, list) or not all(
            isinstance(p, int) and 0 <= p < PAGES_PER_WINDOW for p in pages
        ):
            raise SpecError(f"fill {fill!r}: page indexes must be integers 0..511")
        return sorted(set(pages))
    raise SpecError(f"unknown fill {fill!r}")


class Region:
    def __init__(self, spec: dict):
        if not isinstance(spec, dict):
            raise SpecError("a region must be an object")
        unknown = set(spec) - {"name", "windows", "fill", "zero_pages", "hugepage", "nohugepage",
                               "mlock", "share_after_fork", "kind", "misalign", "cache_fill",
                               "pageout", "thp_fault", "attach", "cold"}
        if unknown:
            raise SpecError(f"region {spec.get('name')!r}: unknown keys {sorted(unknown)}")
        self.name = spec.get("name")
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise SpecError(f"region name must be a non-empty string without spaces: {self.name!r}")
        self.windows = spec.get("windows")
        if not isinstance(self.windows, int) or self.windows < 1:
            raise SpecError(f"region {self.name}: windows must be a positive integer")
        self.hugepage = bool(spec.get("hugepage", False))
        self.nohugepage = bool(spec.get("nohugepage", False))
        if self.hugepage and self.nohugepage:
            raise SpecError(f"region {self.name}: hugepage and nohugepage together")
        self.mlock = bool(spec.get("mlock", False))
        self.touched = parse_fill(spec.get("fill", "all"))
        zero = spec.get("zero_pages")
        self.zero: list[int] = []
        if zero is not None:
            kind, _, arg = str(zero).partition(":")
            if kind != "first":
                raise SpecError(f"region {self.name}: zero_pages must be 'first:Z'")
            z = _int(arg, "zero_pages first:Z")
            free = [p for p in range(PAGES_PER_WINDOW) if p not in set(self.touched)]
            if not 0 <= z <= len(free):
                raise SpecError(f"region {self.name}: only {len(free)} untouched pages for "
                                f"zero_pages {zero!r}")
            self.zero = free[:z]
        share = spec.get("share_after_fork")
        self.share_after_fork: int | None = None
        if share is not None:
            if not isinstance(share, int) or not 0 <= share <= len(self.touched):
                raise SpecError(f"region {self.name}: share_after_fork must be 0.."
                                f"{len(self.touched)} (the filled pages per window)")
            self.share_after_fork = share
        self.kind = spec.get("kind", "private")
        if self.kind not in ("private", "memfd", "shared_anon"):
            raise SpecError(f"region {self.name}: kind must be private, memfd or shared_anon")
        self.misalign = bool(spec.get("misalign", False))
        self.cache = parse_fill(spec.get("cache_fill", "none"))
        self.pageout = parse_fill(spec.get("pageout", "none"))
        self.cold = bool(spec.get("cold", False))
        if self.kind == "private" and (self.misalign or self.cache):
            raise SpecError(f"region {self.name}: misalign and cache_fill need a shared kind")
        if self.cache and (self.kind != "memfd" or set(self.cache) & set(self.touched)):
            raise SpecError(f"region {self.name}: cache_fill needs kind memfd and pages "
                            "disjoint from fill")
        self.thp_fault = bool(spec.get("thp_fault", False))
        self.attach = spec.get("attach")
        if self.attach is not None and self.kind != "memfd":
            raise SpecError(f"region {self.name}: attach needs kind memfd")
        self.fd = -1
        seed = hashlib.blake2b(self.name.encode(), digest_size=8).digest()
        self.seed = np.uint64(int.from_bytes(seed, "little"))
        self.start = 0
        self.end = 0
        self.view: np.ndarray | None = None  # (windows, 512 pages, 512 words) uint64

    @property
    def length(self) -> int:
        return self.windows * HPAGE

    def map(self) -> None:
        if self.kind == "private":
            self.start = map_region(self.windows)
        else:
            if self.attach is not None:
                self.fd = os.open(self.attach, os.O_RDWR)
            elif self.kind == "memfd":
                self.fd = os.memfd_create(self.name, 0)
                os.ftruncate(self.fd, self.length)
            self.start = map_shared(self.windows, self.kind, self.misalign, self.fd)
        self.end = self.start + self.length
        buf = (ctypes.c_char * self.length).from_address(self.start)
        self.view = np.frombuffer(buf, dtype=np.uint64).reshape(
            self.windows, PAGES_PER_WINDOW, WORDS_PER_PAGE)

    def remap(self) -> None:
        """A fresh mapping over the same range (a new VMA without the old one's flags)."""
        got = _libc.mmap(self.start, self.length, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        if got != self.start:
            raise OSError(ctypes.get_errno(), "mmap MAP_FIXED")
        prctl(PR_SET_THP_DISABLE, 1)
        try:
            self.populate()
            self.write()
        finally:
            restore_thp_mode()

    def purge(self, k: int) -> None:
        """An allocator giving memory back: MADV_DONTNEED of the last k touched pages of every
        window (a huge page there is split, its PMD replaced by PTEs); they are no longer
        touched, so verify() checks only what is left."""
        gone, self.touched = self.touched[-k:], self.touched[:-k]
        for w in range(self.windows):
            for p in gone:
                madvise(self.start + w * HPAGE + p * PAGE, PAGE, MADV_DONTNEED)

    def _chunks(self, npages: int):
        per = max(1, CHUNK_PAGES // max(1, npages))
        for w0 in range(0, self.windows, per):
            yield w0, min(self.windows, w0 + per)

    def _heads(self, w0: int, w1: int, pages: list[int]) -> np.ndarray:
        """seed ^ (g * GOLDEN) for pages (indexes in a window) of windows w0..w1-1: (w, pages)."""
        g = (np.arange(w0, w1, dtype=np.uint64)[:, None] * np.uint64(PAGES_PER_WINDOW)
             + np.asarray(pages, dtype=np.uint64)[None, :])
        return self.seed ^ (g * GOLDEN)

    def expected(self, w0: int, w1: int, pages: list[int]) -> np.ndarray:
        """The pattern of pages (indexes in a window) of windows w0..w1-1: (w, pages, 512)."""
        return self._heads(w0, w1, pages)[:, :, None] + _WORDS

    def _page_index(self, pages: list[int]):
        """A basic slice when pages are evenly spaced (writes in place, fast), else a list."""
        if not pages:
            return pages
        if len(pages) == 1:
            return slice(pages[0], pages[0] + 1)
        step = pages[1] - pages[0]
        if step > 0 and pages == list(range(pages[0], pages[-1] + 1, step)):
            return slice(pages[0], pages[-1] + 1, step)
        return pages

    def populate(self) -> None:
        """Fault in the touched pages in runs with MADV_POPULATE_WRITE: same 4 KiB pages as
        write faults (THP is off for the process meanwhile) but several times faster."""
        runs: list[tuple[int, int]] = []
        for p in self.touched:
            if runs and runs[-1][1] == p:
                runs[-1] = (runs[-1][0], p + 1)
            else:
                runs.append((p, p + 1))
        if runs == [(0, PAGES_PER_WINDOW)]:
            madvise(self.start, self.length, MADV_POPULATE_WRITE)
            return
        runs = [(a, b) for a, b in runs if b - a >= 8]
        for w in range(self.windows):
            base = self.start + w * HPAGE
            for a, b in runs:
                madvise(base + a * PAGE, (b - a) * PAGE, MADV_POPULATE_WRITE)

    def write(self, pages: list[int] | None = None) -> None:
        pages = self.touched if pages is None else pages
        if not pages:
            return
        idx = self._page_index(pages)
        with np.errstate(over="ignore"):
            for w0, w1 in self._chunks(len(pages)):
                heads = self._heads(w0, w1, pages)[:, :, None]
                if isinstance(idx, slice):
                    np.add(heads, _WORDS, out=self.view[w0:w1, idx, :])
                else:
                    self.view[w0:w1, idx, :] = heads + _WORDS

    def fill(self) -> None:
        self.populate()
        self.write()
        self.write_cache()
        self.read_fault_zero()

    def write_cache(self) -> None:
        """Write the cache_fill pages through the file: page cache, no mapping."""
        if not self.cache:
            return
        with np.errstate(over="ignore"):
            data = self.expected(0, self.windows, self.cache)
        for w in range(self.windows):
            for i, p in enumerate(self.cache):
                os.pwrite(self.fd, data[w, i].tobytes(), (w * PAGES_PER_WINDOW + p) * PAGE)

    def page_out(self) -> None:
        for w in range(self.windows):
            for p in self.pageout:
                madvise(self.start + w * HPAGE + p * PAGE, PAGE, MADV_PAGEOUT)

    def _verify_cache(self, limit: int) -> list[list]:
        bad: list[list] = []
        with np.errstate(over="ignore"):
            data = self.expected(0, self.windows, self.cache)
        for w in range(self.windows):
            for i, p in enumerate(self.cache):
                got = os.pread(self.fd, PAGE, (w * PAGES_PER_WINDOW + p) * PAGE)
                if got != data[w, i].tobytes() and len(bad) < limit:
                    bad.append([self.name, w, p])
        return bad

    def read_fault_zero(self) -> None:
        if self.zero:
            idx = self._page_index(self.zero)
            for w0, w1 in self._chunks(len(self.zero)):
                int(self.view[w0:w1, idx, 0].sum())

    def verify(self, limit: int) -> list[list]:
        bad: list[list] = self._verify_cache(limit) if self.cache else []
        with np.errstate(over="ignore"):
            if self.touched:
                idx = self._page_index(self.touched)
                pages = np.asarray(self.touched)
                for w0, w1 in self._chunks(len(self.touched)):
                    wrong = (self.view[w0:w1, idx, :] != self.expected(w0, w1, self.touched))
                    for w, p in np.argwhere(wrong.any(axis=2))[: limit - len(bad)]:
                        bad.append([self.name, int(w0 + w), int(pages[p])])
                    if len(bad) >= limit:
                        return bad
            if self.zero:
                idx = self._page_index(self.zero)
                pages = np.asarray(self.zero)
                for w0, w1 in self._chunks(len(self.zero)):
                    wrong = self.view[w0:w1, idx, :] != 0
                    for w, p in np.argwhere(wrong.any(axis=2))[: limit - len(bad)]:
                        bad.append([self.name, int(w0 + w), int(pages[p])])
                    if len(bad) >= limit:
                        return bad
        return bad

    def report(self) -> dict:
        return {"start": self.start, "end": self.end, "windows": self.windows,
                "touched": self.touched, "zero": self.zero, "kind": self.kind,
                "fd": self.fd if self.fd >= 0 else None, "cache": self.cache}


def parse_spec(text: str) -> tuple[list[Region], bool, bool]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"spec is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError("spec must be a JSON object")
    unknown = set(spec) - {"regions", "prctl_thp_disable", "prctl_thp_flags", "fork_child"}
    if unknown:
        raise SpecError(f"unknown spec keys {sorted(unknown)}")
    raw = spec.get("regions", [])
    if not isinstance(raw, list):
        raise SpecError("regions must be a list")
    regions = [Region(r) for r in raw]
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise SpecError(f"duplicate region names in {names}")
    fork_child = bool(spec.get("fork_child", False))
    if not fork_child and any(r.share_after_fork is not None for r in regions):
        raise SpecError("share_after_fork needs fork_child")
    flags = spec.get("prctl_thp_flags", 0)
    if not isinstance(flags, int) or flags < 0:
        raise SpecError("prctl_thp_flags must be a non-negative integer")
    if spec.get("prctl_thp_disable", False):
        THP_MODE[:] = [1, flags]
    elif flags:
        raise SpecError("prctl_thp_flags needs prctl_thp_disable")
    return regions, bool(spec.get("prctl_thp_disable", False)), fork_child


def run_child(regions: list[Region], parent: int, ready_w: int) -> None:
    """The forked child: keep the copies shared, never let khugepaged touch them, wait."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(0)
        for r in regions:
            if r.kind == "private":
                madvise(r.start, r.length, MADV_NOHUGEPAGE)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.write(ready_w, b"1")
        os.close(ready_w)
        while True:
            signal.pause()
    except BaseException as e:  # the child must never return into the parent's code
        try:
            os.write(2, f"workload child: {e!r}\n".encode())
        finally:
            os._exit(1)


def setup(regions: list[Region], thp_disable: bool, fork_child: bool) -> int | None:
    # Keep THP off while faulting, so that every fault gives a 4 KiB page whatever the global
    # and mTHP settings are; PR_SET_THP_DISABLE stays on only if the spec asks for it.
    prctl(PR_SET_THP_DISABLE, 1)
    for r in regions:
        r.map()
    for r in regions:
        if not r.thp_fault:
            r.fill()
    if not thp_disable or THP_MODE[1]:
        restore_thp_mode()
    for r in regions:
        if r.thp_fault:
            r.fill()
    for r in regions:
        if r.hugepage:
            madvise(r.start, r.length, MADV_HUGEPAGE)
        if r.nohugepage:
            madvise(r.start, r.length, MADV_NOHUGEPAGE)
        if r.mlock:
            _check(_libc.mlock2(r.start, r.length, MLOCK_ONFAULT), f"mlock2 {r.name}")
        r.page_out()
        if r.cold:
            madvise(r.start, r.length, MADV_COLD)
    if not fork_child:
        return None
    sys.stdout.flush()
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        run_child(regions, parent, ready_w)
    os.close(ready_w)
    if os.read(ready_r, 1) != b"1":
        raise RuntimeError("the forked child failed before it was ready")
    os.close(ready_r)
    for r in regions:
        if r.share_after_fork is not None:
            r.write(r.touched[: len(r.touched) - r.share_after_fork])
    return pid


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def pin_page(addr: int) -> tuple[int, int]:
    """vmsplice one page into a new pipe; the pipe's buffer keeps a reference on it."""
    r, w = os.pipe()
    iov = _IOVec(addr, PAGE)
    _libc.vmsplice.restype = ctypes.c_ssize_t
    if _libc.vmsplice(w, ctypes.byref(iov), ctypes.c_size_t(1), 0) != PAGE:
        _check(-1, "vmsplice")
    return r, w


def unpin_pages(pipes: list[tuple[int, int]]) -> None:
    for r, w in pipes:
        os.read(r, PAGE)
        os.close(r)
        os.close(w)
    pipes.clear()


def serve(regions: list[Region]) -> None:
    by_name = {r.name: r for r in regions}
    pipes: list[tuple[int, int]] = []
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if not cmd:
            continue
        if cmd == "verify":
            bad: list[list] = []
            for r in regions:
                bad += r.verify(limit=16 - len(bad))
                if len(bad) >= 16:
                    break
            reply({"ok": True} if not bad else {"ok": False, "bad": bad})
        elif cmd == "touch":
            if arg not in by_name:
                reply({"ok": False, "error": f"no region {arg!r}"})
                continue
            by_name[arg].write()
            reply({"ok": True})
        elif cmd == "remap":
            if arg not in by_name:
                reply({"ok": False, "error": f"no region {arg!r}"})
                continue
            by_name[arg].remap()
            reply({"ok": True})
        elif cmd == "purge":
            name, _, k = arg.partition(" ")
            if name not in by_name:
                reply({"ok": False, "error": f"no region {name!r}"})
                continue
            by_name[name].purge(int(k))
            reply({"ok": True})
        elif cmd == "comm":
            with open("/proc/self/comm", "wb") as f:
                f.write(bytes.fromhex(arg))
            reply({"ok": True})
        elif cmd == "name":
            name = ctypes.create_string_buffer(bytes.fromhex(arg))
            _check(_libc.prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0),
                   "prctl(PR_SET_NAME)")
            reply({"ok": True})
        elif cmd in ("hugepage", "nohugepage"):
            if arg not in by_name:
                reply({"ok": False, "error": f"no region {arg!r}"})
                continue
            r = by_name[arg]
            madvise(r.start, r.length, MADV_HUGEPAGE if cmd == "hugepage" else MADV_NOHUGEPAGE)
            reply({"ok": True, "time": time.time()})
        elif cmd == "pin":
            name, window, page = (arg.split() + ["", "", ""])[:3]
            if name not in by_name:
                reply({"ok": False, "error": f"no region {name!r}"})
                continue
            r = by_name[name]
            pipes.append(pin_page(r.start + (int(window) * PAGES_PER_WINDOW + int(page)) * PAGE))
            reply({"ok": True})
        elif cmd == "thp_disable":
            a2, a3 = (int(x) for x in (arg.split() + ["0", "0"])[:2])
            prctl(PR_SET_THP_DISABLE, a2, a3)
            THP_MODE[:] = [a2, a3]
            reply({"ok": True, "get": _libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)})
        elif cmd == "unpin":
            unpin_pages(pipes)
            reply({"ok": True})
        elif cmd == "exit":
            reply({"ok": True})
            return
        else:
            reply({"ok": False, "error": f"unknown command {cmd!r}"})


def main(argv: list[str]) -> int:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the prctl took effect
        return 1
    if len(argv) != 2:
        sys.stderr.write("usage: workload.py SPEC_JSON\n")
        return 2
    try:
        regions, thp_disable, fork_child = parse_spec(argv[1])
    except SpecError as e:
        sys.stderr.write(f"workload: bad spec: {e}\n")
        return 2
    t0 = time.monotonic()
    child = setup(regions, thp_disable, fork_child)
    reply({"pid": os.getpid(), "child_pid": child,
           "setup_seconds": round(time.monotonic() - t0, 4),
           "regions": {r.name: r.report() for r in regions}})
    with contextlib.suppress(BrokenPipeError):
        serve(regions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
