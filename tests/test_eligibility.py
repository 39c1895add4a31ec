"""scan.eligibility: which VMAs are candidates (the anonymous half of thp_vma_allowable_order)."""

import pytest

from hugepaged.kernel.procfs import Vma
from hugepaged.scan.eligibility import (
    HPAGE_PMD_SIZE,
    SPECIAL_FLAGS,
    aligned_range,
    is_private_anon,
    uffd_armed,
    vma_skip_reason,
)

MB = 1 << 20
BASE = 0x7F00_0000_0000  # 2 MiB aligned
ANON_FLAGS = frozenset(["rd", "wr", "mr", "mw", "me", "ac", "sd"])


def vma(start: int = BASE, size: int = 8 * MB, perms: str = "rw-p", path: str = "",
        inode: int = 0, flags: str | frozenset = ANON_FLAGS, offset: int = 0) -> Vma:
    if isinstance(flags, str):
        flags = ANON_FLAGS | frozenset(flags.split())
    return Vma(start=start, end=start + size, perms=perms, offset=offset, inode=inode,
               path=path, flags=frozenset(flags))


# ---------------------------------------------------------------------------------------------
# enabled, hg, nh, PR_SET_THP_DISABLE


@pytest.mark.parametrize(("enabled", "flags", "expected"), [
    ("always", "", None),
    ("always", "hg", None),
    ("always", "nh", "VM_NOHUGEPAGE"),
    ("madvise", "", "no VM_HUGEPAGE"),
    ("madvise", "hg", None),
    ("madvise", "nh", "VM_NOHUGEPAGE"),
    ("never", "", "enabled=never"),
    ("never", "hg", "enabled=never"),
    ("never", "nh", "VM_NOHUGEPAGE"),
])
def test_enabled_modes(enabled, flags, expected):
    assert vma_skip_reason(vma(flags=flags), enabled, thp_disabled=False) == expected


@pytest.mark.parametrize("enabled", ["always", "madvise", "never"])
@pytest.mark.parametrize("flags", ["", "hg", "nh"])
def test_pr_set_thp_disable_wins(enabled, flags):
    assert vma_skip_reason(vma(flags=flags), enabled, thp_disabled=True) == "PR_SET_THP_DISABLE"


# ---------------------------------------------------------------------------------------------
# What is private anonymous memory


@pytest.mark.parametrize("path", ["", "[heap]", "[stack]", "[anon:my buffer]", "[anon:x]",
                                  "[anon:with: colon]"])
def test_private_anonymous_kinds_are_candidates(path):
    v = vma(path=path, flags="hg")
    assert is_private_anon(v)
    assert vma_skip_reason(v, "madvise", False) is None
    assert vma_skip_reason(v, "always", False) is None


@pytest.mark.parametrize(("perms", "path", "inode"), [
    ("rw-s", "/dev/zero (deleted)", 4056),  # MAP_SHARED|MAP_ANONYMOUS
    ("rw-s", "[anon_shmem:named]", 4057),  # named shared anonymous memory
    ("rw-s", "", 0),  # shared, whatever it is called
    ("rw-s", "/SYSV00000000 (deleted)", 32768),  # SysV shm
    ("r--p", "/usr/lib/x86_64-linux-gnu/libc.so.6", 1835300),  # private file mapping
    ("rw-p", "/usr/lib/x86_64-linux-gnu/libc.so.6", 1835300),  # written, still a file
    ("rw-s", "/tmp/data.bin", 12),  # shared file mapping
    ("rw-p", "/memfd:buffer (deleted)", 5),  # memfd mapped privately: shmem-backed
    ("r--p", "[vvar]", 0),
    ("r-xp", "[vdso]", 0),
    ("--xp", "[vsyscall]", 0),
    ("rw-p", "[uprobes]", 0),
])
def test_not_private_anonymous(perms, path, inode):
    v = vma(perms=perms, path=path, inode=inode, flags="hg")
    assert not is_private_anon(v)
    for enabled in ("always", "madvise"):
        assert vma_skip_reason(v, enabled, False) == "not private anonymous"


@pytest.mark.parametrize("flag", sorted(SPECIAL_FLAGS))
def test_special_mappings(flag):
    assert {"io", "pf", "mm", "de", "ht"} == SPECIAL_FLAGS
    v = vma(flags=f"hg {flag}")
    assert vma_skip_reason(v, "always", False) == "special mapping"
    assert vma_skip_reason(v, "madvise", False) == "special mapping"


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
    assert HPAGE_PMD_SIZE == 2 * MB
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
    assert vma_skip_reason(v, "always", False) == "no aligned 2 MiB window"


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
    expected = None if hend > hstart else "no aligned 2 MiB window"
    assert vma_skip_reason(v, "always", False) == expected


def test_custom_window_size():
    v = vma(start=BASE + 0x1000, size=8 * MB)
    assert aligned_range(v, size=1 << 30) == (BASE + (1 << 30), BASE + (1 << 30))
    assert aligned_range(v, size=64 * 1024) == (BASE + 64 * 1024, BASE + 8 * MB)


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
        "VM_NOHUGEPAGE" if "nh" in flags else None)
