"""The kind of a mapping is what the kernel says backs it, never what it is called.

Real mappings of each kind in a real process, read by `hugepaged scan --vmas --json`:
private /dev/zero (anonymous memory to the kernel), shared /dev/zero and a memfd (the
kernel's internal shmem mount), files on tmpfs mounts of our own outside /dev/shm (each by
its own huge= option, which the kernel's THPeligible confirms), and a file called
`/dev/shm/x (deleted)` that is not shared memory at all (an ext4 directory bound over
/dev/shm in the process's own mount namespace): hugepaged must call it a file and never
open it (inotify on the file would see an open; a FUSE file whose server hangs would have
hung the scan in D state).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import tempfile

import pytest

from kit.daemon_runner import hugepaged_cli
from kit.helpers import HPAGE, KHUGEPAGED_PAUSED, pmd_mapped_windows, saved_thp, smaps_vma

from .marks import KERNEL

pytestmark = KERNEL

MAPPER = r"""
import ctypes, json, mmap, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
SIZE, H = 4 << 20, 2 << 20
spec = json.loads(sys.argv[1])
if spec.get("bind"):  # our own mount namespace (unshare -m): an ext4 dir over /dev/shm
    subprocess.run(["mount", "--bind", spec["bind"], "/dev/shm"], check=True)
out = {}
for name, (path, shared) in spec["maps"].items():
    if path == "memfd":
        fd = os.memfd_create(name)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    if path != "/dev/zero":
        os.ftruncate(fd, SIZE)
    res = libc.mmap(None, SIZE + H, 0, 0x22, -1, 0)  # a reservation, for 2 MiB alignment
    addr = (res + H - 1) & ~(H - 1)
    got = libc.mmap(addr, SIZE, 3, (0x01 if shared else 0x02) | 0x10, fd, 0)
    assert got == addr, ctypes.get_errno()
    os.close(fd)
    ctypes.memset(addr, 7, SIZE)  # faulted first: 4 KiB pages where the kernel's mode says
    libc.madvise(addr, SIZE, 14)  # MADV_HUGEPAGE
    out[name] = addr
print(json.dumps({"pid": os.getpid(), "maps": out}), flush=True)
sys.stdin.read()
"""


class Mapper:
    def __init__(self, maps: dict, bind: str | None = None) -> None:
        cmd = [sys.executable, "-c", MAPPER, json.dumps({"maps": maps, "bind": bind})]
        if bind:
            cmd = ["unshare", "--mount", "--propagation", "private", *cmd]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(self.p.stderr.read())
        info = json.loads(line)
        self.pid, self.maps = info["pid"], info["maps"]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(10)
        self.p.stdout.close()
        self.p.stderr.close()


def scan_vmas(pid: int, *args: str) -> dict[int, dict]:
    res = hugepaged_cli("scan", "--pid", str(pid), "--vmas", "--json", *args, timeout=60)
    assert res.returncode == 0, res.stderr
    return {int(v["start"], 16): v for v in json.loads(res.stdout)["vmas"][str(pid)]}


@pytest.fixture
def tmpfs():
    """Mount tmpfs file systems of our own (huge= as asked) in temporary directories."""
    made = []

    def mount(huge: str) -> str:
        d = tempfile.mkdtemp(prefix=f"hugepaged-kind-{huge}-")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"huge={huge},size=16m", "tmpfs", d],
                       check=True, capture_output=True)
        made.append(d)
        return d

    yield mount
    for d in made:
        subprocess.run(["umount", "-l", d], check=False, capture_output=True)
        os.rmdir(d)


def test_each_kind_from_what_backs_it(tmpfs):
    always, never = tmpfs("always"), tmpfs("never")
    maps = {"zero_private": ["/dev/zero", False], "zero_shared": ["/dev/zero", True],
            "memfd": ["memfd", True], "tmpfs_always": [f"{always}/seg", True],
            "tmpfs_never": [f"{never}/seg", True]}
    # The kernel's shmem modes at never, hugepaged's too: only the mounts' own huge= differ.
    # The kernel's khugepaged paused: it would collapse the advised private mapping itself.
    with saved_thp(enabled="madvise", shmem_enabled="never", **KHUGEPAGED_PAUSED):
        m = Mapper(maps)
        try:
            vmas = scan_vmas(m.pid, "--set", "shmem_enabled=never")
            kinds = {n: vmas[a]["kind"] for n, a in m.maps.items()}
            assert kinds == {"zero_private": "anon", "zero_shared": "shmem", "memfd": "shmem",
                             "tmpfs_always": "shmem", "tmpfs_never": "shmem"}
            why = {n: vmas[a]["ineligible"] for n, a in m.maps.items()}
            # Private /dev/zero is anonymous memory with MADV_HUGEPAGE: a candidate (it was
            # SHMEM_NEVER by its name); each tmpfs file by its own mount, as the kernel says.
            assert why == {"zero_private": None, "zero_shared": "SHMEM_NEVER",
                           "memfd": "SHMEM_NEVER", "tmpfs_always": None,
                           "tmpfs_never": "SHMEM_NEVER"}
            # (A fault of the advised mapping may have been given a huge page already.)
            got = vmas[m.maps["zero_private"]]["results"]
            assert set(got) <= {"SUCCEED", "PMD_MAPPED"} and sum(got.values()) == 2, got
            eligible = {n: smaps_vma(m.pid, m.maps[n])["THPeligible"]
                        for n in ("tmpfs_always", "tmpfs_never", "zero_private")}
            assert eligible == {"tmpfs_always": "1", "tmpfs_never": "0", "zero_private": "1"}
            # And it collapses as the anonymous memory it is.
            res = hugepaged_cli("collapse", "--pid", str(m.pid), "--json")
            assert res.returncode == 0, res.stderr
            a = m.maps["zero_private"]
            assert pmd_mapped_windows(m.pid, a, a + 2 * HPAGE) == [True, True]
        finally:
            m.close()


IN_OPEN, IN_ACCESS = 0x20, 0x01
_libc = ctypes.CDLL(None, use_errno=True)


def inotify(path: str) -> int:
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    assert _libc.inotify_add_watch(fd, path.encode(), IN_OPEN | IN_ACCESS) >= 0
    return fd


def events(fd: int) -> list[int]:
    out = []
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 4096)
        off = 0
        while off < len(data):
            _wd, mask, _cookie, length = struct.unpack_from("iIII", data, off)
            out.append(mask)
            off += 16 + length
    return out


def test_a_file_called_like_posix_shm_is_a_file_and_is_not_opened(tmp_path):
    """/dev/shm in the process's own mount namespace is an ext4 directory: its file
    `/dev/shm/x (deleted)` (a name any user can give) is a file, decided without a look."""
    src = tmp_path / "fake-shm"
    src.mkdir()
    m = Mapper({"fake": ["/dev/shm/x (deleted)", True]}, bind=str(src))
    watch = inotify(str(src / "x (deleted)"))
    try:
        vma = smaps_vma(m.pid, m.maps["fake"])
        assert vma["header"].endswith("/dev/shm/x (deleted)")
        vmas = scan_vmas(m.pid)
        v = vmas[m.maps["fake"]]
        assert (v["kind"], v["ineligible"]) == ("file", "FILE_BACKED")
        res = hugepaged_cli("collapse", "--pid", str(m.pid), "--json")
        assert res.returncode == 0, res.stderr
        assert events(watch) == [], "hugepaged opened or read a user's file"
    finally:
        os.close(watch)
        m.close()
