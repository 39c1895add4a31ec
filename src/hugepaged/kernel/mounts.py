"""What backs a mapping, as the kernel reports it: the device of the mapped file, never its path.

/proc/PID/smaps prints, for a VMA with a file, the file's device (major:minor) and inode, then
a path. The path is no evidence of anything: any user can create `/dev/shm/x (deleted)` on any
filesystem (a FUSE one that never answers, say), and a private mapping of /dev/zero is
anonymous memory to the kernel whatever it is called. The device is the kernel's own answer:

- 0:0 with inode 0: no file at all (private anonymous memory, [heap], [stack], [vdso], ...);
- the device of the kernel's internal shmem mount, learnt once by fstat of a memfd of our own:
  memfds, MAP_SHARED|MAP_ANONYMOUS (shown as "/dev/zero (deleted)"), SysV segments and other
  kernel-made shmem files live there, and nothing a user names;
- any other device: the filesystem mounted from it, from /proc/PID/mountinfo (the process's
  own mount namespace: a container's tmpfs is listed there, not in ours). Every tmpfs mount
  counts as shared memory, with its own huge= option (a superblock option: every bind mount
  of it shows the same). A device listed nowhere (a lazily unmounted filesystem) stays
  unknown, which decides nothing in favour of touching it.

A device node on a memory filesystem (/dev is devtmpfs, or a container's tmpfs) is a device,
not memory: for VMAs there, `stat` of /proc/PID/map_files/START-END gives the node's rdev
(/dev/zero is 1:5) and link count. That is the only call made on the mapped file, and only
where the filesystem is tmpfs or devtmpfs, whose inodes live in memory: it cannot block.
Nothing here ever opens a mapped file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# st_dev of the kernel's internal shmem mount (shm_mnt), probed once: None until then,
# 0 where it cannot be learnt (no memfd_create).
_SHMEM_DEV: list[int] = []
MEMORY_FS = frozenset({"tmpfs", "devtmpfs"})
SHMEM_FS = "shmem"  # hugepaged's name for the kernel's internal mount (its fstype is tmpfs)


def shmem_device() -> int:
    """The device number of the kernel's internal shmem mount (0 if it cannot be learnt)."""
    if not _SHMEM_DEV:
        try:
            fd = os.memfd_create("hugepaged-shmem-dev", os.MFD_CLOEXEC)
        except (OSError, AttributeError):
            _SHMEM_DEV.append(0)
        else:
            try:
                _SHMEM_DEV.append(os.fstat(fd).st_dev)
            finally:
                os.close(fd)
    return _SHMEM_DEV[0]


@dataclass(frozen=True)
class Mount:
    """A mounted filesystem: its type and, for tmpfs, its huge= option (never if absent)."""

    fstype: str
    huge: str | None = None


def parse_mountinfo(text: str) -> dict[int, Mount]:
    """device -> Mount from /proc/PID/mountinfo (`ID PARENT MAJ:MIN ROOT POINT OPTS ... -
    FSTYPE SOURCE SUPEROPTS`)."""
    out: dict[int, Mount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 3 or not tail:
            continue
        major, colon, minor = fields[2].partition(":")
        if not colon or not major.isdigit() or not minor.isdigit():
            continue
        fstype = tail[0]
        huge = None
        if fstype == "tmpfs":
            opts = tail[2].split(",") if len(tail) > 2 else []
            huge = next((o[5:] for o in opts if o.startswith("huge=")), "never")
        out.setdefault(os.makedev(int(major), int(minor)), Mount(fstype, huge))
    return out


class Backing:
    """Resolves the devices of one process's VMAs (ProcFS.smaps); mountinfo read once, on
    the first device that needs it."""

    def __init__(self, proc_root: str, pid: int) -> None:
        self.proc_root, self.pid = proc_root, pid
        self.shmem_dev = shmem_device()
        self._mounts: dict[int, Mount] | None = None

    def mounts(self) -> dict[int, Mount]:
        if self._mounts is None:
            self._mounts = {}
            for who in (self.pid, "self"):
                try:
                    with open(f"{self.proc_root}/{who}/mountinfo", encoding="utf-8",
                              errors="replace") as f:
                        self._mounts = parse_mountinfo(f.read())
                    break
                except OSError:
                    continue
        return self._mounts

    def annotate(self, vma: dict) -> None:
        """Add fs, mount_huge, rdev and nlink to one parsed smaps header (a dict)."""
        dev = vma.get("dev", 0)
        if dev == 0 and vma.get("inode", 0) == 0:
            vma["fs"] = ""  # no file
            return
        if self.shmem_dev and dev == self.shmem_dev:
            vma["fs"] = SHMEM_FS
            return
        mount = self.mounts().get(dev)
        if mount is None:
            vma["fs"] = "?"
            return
        vma["fs"], vma["mount_huge"] = mount.fstype, mount.huge
        if mount.fstype in MEMORY_FS:
            self._node(vma)

    def _node(self, vma: dict) -> None:
        """rdev and link count of the mapped inode (memory filesystems only: see above)."""
        path = f"{self.proc_root}/{self.pid}/map_files/{vma['start']:x}-{vma['end']:x}"
        try:
            st = os.stat(path)
        except OSError:
            return  # gone, or not ours to follow: stays unknown
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            vma["rdev"] = st.st_rdev or -1
        vma["nlink"] = st.st_nlink
