"""scan.eligibility: which VMAs are candidates (thp_vma_allowable_order) and of what kind."""

import os

import pytest

from hugepaged.kernel.geometry import Geometry
from hugepaged.kernel.procfs import Vma
from hugepaged.policy import CollapseControl
from hugepaged.results import Ineligible as I
from hugepaged.scan.eligibility import (
    DEV_ZERO,
    SPECIAL_FLAGS,
    MemoryKind,
    aligned_range,
    ineligible,
    memory_kind,
    uffd_armed,
)

HPAGE_PMD_SIZE = 2 << 20


def vma_skip_reason(v: Vma, enabled: str, thp_disabled: bool, force: bool = False):
    return ineligible(v, CollapseControl(enabled=enabled, is_khugepaged=not force),
                      thp_disabled)

MB = 1 << 20
BASE = 0x7F00_0000_0000  # 2 MiB aligned
ANON_FLAGS = frozenset(["rd", "wr", "mr", "mw", "me", "ac", "sd"])


def vma(start: int = BASE, size: int = 8 * MB, perms: str = "rw-p", path: str = "",
        inode: int = 0, flags: str | frozenset = ANON_FLAGS, offset: int = 0,
        fs: str | None = None, rdev: int = 0) -> Vma:
    """A VMA as ProcFS.smaps gives it: a file (inode) has a device and what it is (fs)."""
    if isinstance(flags, str):
        flags = ANON_FLAGS | frozenset(flags.split())
    dev = 0 if not inode else {"shmem": os.makedev(0, 1)}.get(fs, os.makedev(0, 99))
    return Vma(start=start, end=start + size, perms=perms, offset=offset, inode=inode,
               path=path, flags=frozenset(flags), dev=dev, fs=fs if inode else "", rdev=rdev)


# ---------------------------------------------------------------------------------------------
# enabled, hg, nh, PR_SET_THP_DISABLE


@pytest.mark.parametrize(("enabled", "flags", "expected"), [
    ("always", "", None),
    ("always", "hg", None),
    ("always", "nh", I.VM_NOHUGEPAGE),
    ("madvise", "", I.NO_MADV_HUGEPAGE),
    ("madvise", "hg", None),
    ("madvise", "nh", I.VM_NOHUGEPAGE),
    ("never", "", I.ENABLED_NEVER),
    ("never", "hg", I.ENABLED_NEVER),
    ("never", "nh", I.VM_NOHUGEPAGE),
])
def test_enabled_modes(enabled, flags, expected):
    assert vma_skip_reason(vma(flags=flags), enabled, thp_disabled=False) == expected


@pytest.mark.parametrize("enabled", ["always", "madvise", "never"])
@pytest.mark.parametrize("flags", ["", "hg", "nh"])
def test_pr_set_thp_disable_wins(enabled, flags):
    assert vma_skip_reason(vma(flags=flags), enabled, thp_disabled=True) == I.THP_DISABLED_PRCTL


@pytest.mark.parametrize("enabled", ["madvise", "never"])
def test_madv_collapse_ignores_the_mode_but_not_nohugepage(enabled):
    assert vma_skip_reason(vma(), enabled, False, force=True) is None
    assert vma_skip_reason(vma(flags="nh"), enabled, False, force=True) == I.VM_NOHUGEPAGE
    assert vma_skip_reason(vma(), enabled, True, force=True) == I.THP_DISABLED_PRCTL


# ---------------------------------------------------------------------------------------------
# What is private anonymous memory


@pytest.mark.parametrize("path", ["", "[heap]", "[stack]", "[anon:my buffer]", "[anon:x]",
                                  "[anon:with: colon]"])
def test_private_anonymous_kinds_are_candidates(path):
    v = vma(path=path, flags="hg")
    assert memory_kind(v) is MemoryKind.ANON
    assert vma_skip_reason(v, "madvise", False) is None
    assert vma_skip_reason(v, "always", False) is None


@pytest.mark.parametrize(("perms", "path", "inode", "fs", "kind"), [
    ("rw-s", "/dev/zero (deleted)", 4056, "shmem", MemoryKind.SHMEM),  # MAP_SHARED|ANONYMOUS
    ("rw-s", "[anon_shmem:named]", 4057, "shmem", MemoryKind.SHMEM),  # named shared anon
    ("rw-s", "/SYSV00000000 (deleted)", 32768, "shmem", MemoryKind.SHMEM),  # SysV shm
    ("rw-s", "/dev/shm/seg", 77, "tmpfs", MemoryKind.SHMEM),  # POSIX shm on tmpfs
    ("rw-s", "/srv/cache/seg", 77, "tmpfs", MemoryKind.SHMEM),  # any tmpfs mount
    ("rw-p", "/srv/cache/seg", 77, "tmpfs", MemoryKind.SHMEM),  # mapped privately
    ("r--p", "/usr/lib/x86_64-linux-gnu/libc.so.6", 1835300, "ext4", MemoryKind.FILE),
    ("rw-p", "/usr/lib/x86_64-linux-gnu/libc.so.6", 1835300, "ext4", MemoryKind.FILE),
    ("rw-s", "/tmp/data.bin", 12, "ext4", MemoryKind.FILE),  # shared file mapping
    # Names are no evidence: a FUSE file called like POSIX shm, a memfd-like name on ext4,
    # a device mounted nowhere we can see, a record nobody resolved.
    ("rw-s", "/dev/shm/x (deleted)", 12, "fuse.sshfs", MemoryKind.FILE),
    ("rw-s", "/memfd:x (deleted)", 12, "ext4", MemoryKind.FILE),
    ("rw-s", "/dev/shm/seg", 77, "?", MemoryKind.FILE),
    ("rw-s", "/dev/shm/seg", 77, None, MemoryKind.FILE),
    ("rw-p", "/memfd:buffer (deleted)", 5, "shmem", MemoryKind.SHMEM),  # memfd, private
    ("r--p", "[vvar]", 0, "", MemoryKind.SPECIAL),
    ("r-xp", "[vdso]", 0, "", MemoryKind.SPECIAL),
    ("--xp", "[vsyscall]", 0, "", MemoryKind.SPECIAL),
    ("rw-p", "[uprobes]", 0, "", MemoryKind.SPECIAL),
    ("rw-s", "", 0, "", MemoryKind.SPECIAL),  # shared and no file: not a kind we know
])
def test_not_private_anonymous(perms, path, inode, fs, kind):
    v = vma(perms=perms, path=path, inode=inode, flags="hg", fs=fs)
    assert memory_kind(v) is kind
    # Shared memory goes by shmem_enabled (the policy's default: never), not enabled.
    reason = {MemoryKind.SHMEM: I.SHMEM_NEVER, MemoryKind.FILE: I.FILE_BACKED,
              MemoryKind.SPECIAL: I.SPECIAL}[kind]
    for enabled in ("always", "madvise"):
        assert vma_skip_reason(v, enabled, False) == reason
    if kind is MemoryKind.SHMEM:
        always = CollapseControl(shmem_enabled="always")
        assert ineligible(v, always, False) is None
        assert ineligible(vma(start=BASE + 4096, perms=perms, path=path, inode=inode, fs=fs),
                          always, False) is I.MISALIGNED
        # Smaller than a huge page, aligned or not: too small (no restart would help).
        for start in (BASE, BASE + 4096):
            assert ineligible(vma(start=start, size=2 * MB - 4096, perms=perms,
                                  path=path, inode=inode, fs=fs), always, False) \
                is I.TOO_SMALL


@pytest.mark.parametrize(("perms", "fs", "rdev", "kind"), [
    ("rw-p", "devtmpfs", DEV_ZERO, MemoryKind.ANON),  # private /dev/zero: anonymous memory
    ("rw-p", "tmpfs", DEV_ZERO, MemoryKind.ANON),  # its node on a container's tmpfs /dev
    ("rw-s", "tmpfs", DEV_ZERO, MemoryKind.FILE),  # (shared, the kernel would give shmem)
    ("rw-p", "tmpfs", os.makedev(1, 3), MemoryKind.FILE),  # /dev/null's node on a tmpfs
    ("rw-p", "devtmpfs", 0, MemoryKind.FILE),  # a regular file on devtmpfs
])
def test_device_nodes(perms, fs, rdev, kind):
    v = vma(perms=perms, path="/dev/zero", inode=4, fs=fs, rdev=rdev, flags="hg")
    assert memory_kind(v) is kind
    if kind is MemoryKind.ANON:
        assert vma_skip_reason(v, "madvise", False) is None
        assert vma_skip_reason(vma(perms=perms, path="/dev/zero", inode=4, fs=fs, rdev=rdev),
                               "madvise", False) is I.NO_MADV_HUGEPAGE


@pytest.mark.parametrize("flag", sorted(SPECIAL_FLAGS))
def test_special_mappings(flag):
    assert {"io", "pf", "mm", "de", "ht"} == SPECIAL_FLAGS
    v = vma(flags=f"hg {flag}")
    assert memory_kind(v) is MemoryKind.SPECIAL
    assert vma_skip_reason(v, "always", False) == I.SPECIAL
    assert vma_skip_reason(v, "madvise", False) == I.SPECIAL


def test_other_flags_do_not_matter():
    v = vma(flags="hg dd lo sr ac mg sd um")  # VM_DONTDUMP, VM_LOCKED, ..., uffd-missing
    assert vma_skip_reason(v, "madvise", False) is None


def test_combined_reasons_still_skip():
    assert vma_skip_reason(vma(flags="nh io"), "always", False) is not None
    assert vma_skip_reason(vma(path="[vdso]", flags="nh"), "always", False) is not None
    assert vma_skip_reason(vma(size=MB, flags="nh"), "always", False) is not None


# ---------------------------------------------------------------------------------------------
# Size and alignment


def test_aligned_range_of_an_aligned_vma():
    assert aligned_range(vma(size=8 * MB)) == (BASE, BASE + 8 * MB)
    assert aligned_range(vma(size=2 * MB)) == (BASE, BASE + 2 * MB)


def test_aligned_range_of_an_unaligned_vma():
    v = vma(start=BASE + 0x1000, size=8 * MB)
    assert aligned_range(v) == (BASE + 2 * MB, BASE + 8 * MB)
    v = vma(start=BASE + 2 * MB - 0x1000, size=4 * MB + 0x2000)
    assert aligned_range(v) == (BASE + 2 * MB, BASE + 6 * MB)
    v = vma(start=BASE + 0x1000, size=4 * MB - 0x2000)  # ends just short of BASE + 4 MiB
    assert aligned_range(v) == (BASE + 2 * MB, BASE + 2 * MB)


@pytest.mark.parametrize(("start", "size"), [
    (BASE, 0x1000),
    (BASE, 2 * MB - 0x1000),
    (BASE + 0x1000, 2 * MB),  # 2 MiB long but straddles a boundary
    (BASE + MB, 2 * MB),
    (BASE + 0x1000, 4 * MB - 0x2000),
    (BASE + 0x201000, 0x1000),  # hend < hstart before clamping
])
def test_smaller_than_one_aligned_window(start, size):
    v = vma(start=start, size=size)
    hstart, hend = aligned_range(v)
    assert hstart == hend
    assert hstart % HPAGE_PMD_SIZE == 0
    assert vma_skip_reason(v, "always", False) == I.TOO_SMALL


@pytest.mark.parametrize("start_off", [0, 0x1000, MB, 2 * MB - 0x1000])
@pytest.mark.parametrize("size", [2 * MB, 2 * MB + 0x1000, 6 * MB + 0x3000, 1 << 30])
def test_aligned_range_properties(start_off, size):
    v = vma(start=BASE + start_off, size=size)
    hstart, hend = aligned_range(v)
    assert hstart % HPAGE_PMD_SIZE == 0 and hend % HPAGE_PMD_SIZE == 0
    assert v.start <= hstart <= hend <= v.end
    # No further whole window fits on either side.
    assert hstart - HPAGE_PMD_SIZE < v.start
    assert hend + HPAGE_PMD_SIZE > v.end
    expected = None if hend > hstart else I.TOO_SMALL
    assert vma_skip_reason(v, "always", False) == expected


def test_window_size_comes_from_the_geometry():
    v = vma(start=BASE + 0x1000, size=8 * MB)
    gib = Geometry(page_size=4096, pmd_size=1 << 30)
    assert aligned_range(v, gib) == (BASE + (1 << 30), BASE + (1 << 30))
    small = Geometry(page_size=4096, pmd_size=64 * 1024)
    assert aligned_range(v, small) == (BASE + 64 * 1024, BASE + 8 * MB)
    arm64_64k = Geometry(page_size=64 * 1024, pmd_size=512 * MB)
    assert arm64_64k.pmd_nr == 8192 and arm64_64k.pmd_shift == 29
    assert ineligible(vma(size=8 * MB), CollapseControl(enabled="always"), False,
                      arm64_64k) == I.TOO_SMALL


# ---------------------------------------------------------------------------------------------
# userfaultfd


@pytest.mark.parametrize(("flags", "armed"), [
    ("", False),
    ("um", True),  # VM_UFFD_MISSING
    ("uw", True),  # VM_UFFD_WP
    ("ui", True),  # VM_UFFD_MINOR
    ("um uw", True),
    ("hg nh mg", False),
])
def test_uffd_armed(flags, armed):
    v = vma(flags=flags)
    assert uffd_armed(v) is armed
    # Armed VMAs stay candidates: the per-window rule (no none PTE) decides.
    assert vma_skip_reason(v, "always", False) == (
        I.VM_NOHUGEPAGE if "nh" in flags else None)
