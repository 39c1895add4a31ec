"""scan.shmem: the file rules of hpage_collapse_scan_file and shmem eligibility.

The eligibility model is checked against the running kernel itself: for every combination of
shmem_enabled, hugepages-2048kB/shmem_enabled, VM_HUGEPAGE and kind of shared memory, smaps
THPeligible (sysfs enforced, as khugepaged) and MADV_COLLAPSE (not enforced) must say what
pmd_allowed() says.
"""

import contextlib
import ctypes
import errno
import itertools
import os

import numpy as np
import pytest

from hugepaged.kernel.procfs import Vma
from hugepaged.results import ScanResult as R
from hugepaged.scan.shmem import (
    FileLimits,
    Folios,
    ShmemKind,
    ShmemModes,
    decide_file,
    misaligned,
    pmd_allowed,
    refusal,
    shmem_kind,
    within_size,
)
from kit.helpers import HPAGE, THP_DIR, libc, saved_thp, smaps_vma

from .marks import KERNEL

SIZE_KNOB = "hugepages-2048kB/shmem_enabled"


# ---------------------------------------------------------------------------------------------
# The per-range decision


def decide(present, swap=None, limits=None, **folios):
    limits = limits or FileLimits()
    present = np.asarray(present, dtype=np.int64)
    swap = np.zeros_like(present) if swap is None else np.asarray(swap, dtype=np.int64)
    f = Folios.none(present.size)
    for name, value in folios.items():
        setattr(f, name, np.asarray(value, dtype=bool))
    return [R(int(c)) for c in decide_file(present, swap, f, limits)]


@pytest.mark.parametrize("none", [0, 1, 64, 255, 511])
def test_max_ptes_none_boundary(none):
    limits = FileLimits(max_ptes_none=none)
    at, over = 512 - none, 512 - none - 1
    assert decide([at, over], limits=limits) == [R.SUCCEED, R.EXCEED_NONE_PTE]


def test_empty_range_khugepaged_and_madv_collapse():
    assert decide([0]) == [R.EXCEED_NONE_PTE]
    assert decide([0], limits=FileLimits(khugepaged=False)) == [R.TRUNCATED]
    # Only swap entries: collapse_file swaps them in, nothing is truncated.
    assert decide([0], [3], limits=FileLimits(khugepaged=False)) == [R.SUCCEED]


def test_madv_collapse_ignores_both_limits():
    limits = FileLimits(max_ptes_none=0, max_ptes_swap=0, khugepaged=False)
    assert decide([1, 100], [0, 400], limits=limits) == [R.SUCCEED, R.SUCCEED]


def test_swap_limit_and_swapped_pages_are_not_present():
    limits = FileLimits(max_ptes_none=511, max_ptes_swap=8)
    assert decide([500, 500, 0], [8, 9, 8], limits=limits) == \
        [R.SUCCEED, R.EXCEED_SWAP_PTE, R.EXCEED_NONE_PTE]
    # max_ptes_none counts what is present: swapped pages do not help reach it.
    assert decide([256], [256], limits=FileLimits(max_ptes_none=255, max_ptes_swap=511)) == \
        [R.EXCEED_NONE_PTE]


def test_folio_results_in_the_kernels_order():
    # Smaller large folios (shmem mTHP) are collapsed with the rest since 6.12: no verdict.
    assert decide([512, 512, 512, 512], huge=[1, 0, 0, 0], pmd_mapped=[0, 1, 0, 0],
                  compound=[0, 0, 1, 0], off_lru=[0, 0, 0, 1]) == \
        [R.PTE_MAPPED_HUGEPAGE, R.PMD_MAPPED, R.SUCCEED, R.PAGE_LRU]
    # A 2 MiB folio at the range's start is met first, before any swap limit.
    assert decide([512], [100], huge=[1]) == [R.PTE_MAPPED_HUGEPAGE]


def test_unknown_swap_is_never_over_a_limit():
    assert decide([512, 0], [-1, -1], limits=FileLimits(max_ptes_swap=0)) == \
        [R.SUCCEED, R.EXCEED_NONE_PTE]


# ---------------------------------------------------------------------------------------------
# Eligibility, pure


def test_alignment_rule():
    base = 0x7F00_0000_0000
    assert not misaligned(base, 0, HPAGE)
    assert misaligned(base + 0x1000, 0, HPAGE)
    assert not misaligned(base + 0x1000, 0x1000, HPAGE)  # the file offset moves with the address
    assert misaligned(base - 0x1000, 0, HPAGE)  # QEMU's guest RAM, 4 KiB short of a boundary


def test_within_size():
    assert within_size(0, HPAGE, HPAGE)
    assert not within_size(0, HPAGE - 4096, HPAGE)
    assert within_size(HPAGE, 2 * HPAGE, HPAGE)
    assert not within_size(2 * HPAGE, 2 * HPAGE, HPAGE)


@pytest.mark.parametrize(("fs", "path", "nlink", "kind"), [
    ("shmem", "/dev/zero (deleted)", -1, ShmemKind.ANON),
    ("shmem", "/memfd:pool (deleted)", -1, ShmemKind.ANON),
    ("shmem", "/SYSV0000abcd (deleted)", -1, ShmemKind.FILE),
    ("tmpfs", "/dev/shm/segment", 1, ShmemKind.FILE),
    ("tmpfs", "/srv/any/where", 1, ShmemKind.FILE),
    ("tmpfs", "/dev/shm/segment (deleted)", 0, ShmemKind.ANON),  # unlinked: anon rules
    ("tmpfs", "/dev/shm/x (deleted)", 1, ShmemKind.FILE),  # a name is no evidence
    ("tmpfs", "/dev/shm/segment", -1, ShmemKind.FILE),  # link count unknown
])
def test_kinds(fs, path, nlink, kind):
    v = Vma(0, HPAGE, "rw-s", 0, 7, path, dev=os.makedev(0, 99), fs=fs, nlink=nlink)
    assert shmem_kind(v) is kind


def test_deny_and_force_are_global_and_win():
    for kind, hg, force in itertools.product(ShmemKind, (False, True), (False, True)):
        deny = ShmemModes("deny", "always", "always")
        assert not pmd_allowed(deny, kind, hugepage=hg, force=force)
    assert pmd_allowed(ShmemModes("force", "inherit", "never"), ShmemKind.FILE,
                       hugepage=False, force=False)
    # Under force the per-size control counts only as inherit.
    assert not pmd_allowed(ShmemModes("force", "always"), ShmemKind.ANON, hugepage=True,
                           force=True)


def test_madv_collapse_ignores_the_mode_but_not_the_per_size_never():
    assert pmd_allowed(ShmemModes("never", "inherit"), ShmemKind.ANON, hugepage=False,
                       force=True)
    assert not pmd_allowed(ShmemModes("always", "never"), ShmemKind.ANON, hugepage=True,
                           force=True)
    # The file rules have no per-size control; a tmpfs mount's huge=never does not stop it.
    assert pmd_allowed(ShmemModes("never", "never", "never"), ShmemKind.FILE,
                       hugepage=False, force=True)


def test_refusal_names_the_mode():
    assert refusal(ShmemModes("advise"), ShmemKind.ANON, hugepage=False, force=False) == \
        "advise"
    assert refusal(ShmemModes("never"), ShmemKind.ANON, hugepage=True, force=False) == "never"
    assert refusal(ShmemModes("always"), ShmemKind.ANON, hugepage=False, force=False) is None


# ---------------------------------------------------------------------------------------------
# Eligibility against the running kernel

_libc = libc  # kit/helpers' prototypes (mmap, munmap, madvise), and System V's here
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmdt.argtypes = [ctypes.c_void_p]
MAP_SHARED, MAP_ANONYMOUS, MAP_FIXED = 0x01, 0x20, 0x10
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


@contextlib.contextmanager
def aligned_shared(kind: str):
    """A 4 MiB shared mapping at a 2 MiB-aligned address, offset 0, first 2 MiB written."""
    size = 2 * HPAGE
    res = _libc.mmap(None, 2 * size, 0, 0x22, -1, 0)
    addr = (res + HPAGE - 1) & ~(HPAGE - 1)
    path = None
    try:
        if kind == "sysv":
            shmid = _libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600)
            _libc.munmap(addr, size)
            got = _libc.shmat(shmid, addr, 0)
            _libc.shmctl(shmid, IPC_RMID, None)
        elif kind == "anon":
            got = _libc.mmap(addr, size, 3, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        else:
            if kind == "memfd":
                fd = os.memfd_create("rules")
            else:
                path = f"/dev/shm/hugepaged-rules-{os.getpid()}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, size)
            got = _libc.mmap(addr, size, 3, MAP_SHARED | MAP_FIXED, fd, 0)
            os.close(fd)
        assert got == addr
        ctypes.memset(addr, 7, HPAGE)
        yield addr
    finally:
        if kind == "sysv":
            _libc.shmdt(addr)
        _libc.munmap(res, 2 * size)
        if path:
            os.unlink(path)


def mount_huge(path: str) -> str:
    """huge= of the tmpfs mount at `path` (never when absent), from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.split()[4] == path:
            opts = line.split(" - ")[1].split()[2].split(",")
            return next((o[5:] for o in opts if o.startswith("huge=")), "never")
    raise LookupError(path)


KINDS = {"anon": ShmemKind.ANON, "memfd": ShmemKind.ANON, "sysv": ShmemKind.FILE,
         "tmpfs": ShmemKind.FILE}


@pytest.mark.parametrize("size_mode", ["inherit", "never", "always", "advise", "within_size"])
@pytest.mark.parametrize("mode", ["never", "advise", "always", "within_size", "deny", "force"])
@pytest.mark.skipif(not (THP_DIR / SIZE_KNOB).exists(), reason="no per-size shmem controls")
def test_eligibility_matches_the_kernel(mode, size_mode):
    # force is accepted only while the PMD size inherits; the per-size mode is set after.
    with saved_thp(**{SIZE_KNOB: "inherit", "shmem_enabled": mode}):
        try:
            with saved_thp(**{SIZE_KNOB: size_mode}):
                _check_all_kinds(mode, size_mode)
        except OSError as e:
            assert e.errno == errno.EINVAL
            pytest.skip(f"the kernel refuses {SIZE_KNOB}={size_mode} under {mode}")


for _mark in KERNEL:
    test_eligibility_matches_the_kernel = _mark(test_eligibility_matches_the_kernel)


def _check_all_kinds(mode: str, size_mode: str) -> None:
    wrong = []
    for kind, hg in itertools.product(KINDS, (False, True)):
        modes = ShmemModes(mode, size_mode, mount_huge("/dev/shm") if kind == "tmpfs" else None)
        with aligned_shared(kind) as addr:
            if hg:
                assert _libc.madvise(addr, 2 * HPAGE, 14) == 0
            eligible = smaps_vma(os.getpid(), addr)["THPeligible"] == "1"
            collapsed = _libc.madvise(addr, HPAGE, 25) == 0
        want = (pmd_allowed(modes, KINDS[kind], hugepage=hg, force=False),
                pmd_allowed(modes, KINDS[kind], hugepage=hg, force=True))
        if (eligible, collapsed) != want:
            wrong.append((kind, hg, "kernel", (eligible, collapsed), "model", want))
    assert not wrong
