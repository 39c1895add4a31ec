"""/proc readers: the process list, maps/smaps, status, stat. The root is a parameter."""

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from hugepaged.errors import HugepagedError, ProcessGone
from hugepaged.kernel.errors import process_errors, translate

PF_KTHREAD = 0x00200000
# prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED, 0, 0) (6.18): THP only in the
# process's MADV_HUGEPAGE VMAs; PR_GET_THP_DISABLE then answers 3. Not in older C headers.
PR_THP_DISABLE_EXCEPT_ADVISED = 1 << 1
THP_PRCTL_REMEMBERED = 4096  # processes whose traced PR_SET_THP_DISABLE is kept, at most


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/smaps with the fields hugepaged decides on."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    flags: frozenset[str] = field(default_factory=frozenset)
    rss_kb: int = 0
    anonymous_kb: int = 0
    anon_huge_kb: int = 0
    shmem_pmd_kb: int = 0
    file_pmd_kb: int = 0
    thp_eligible: bool | None = None
    # What backs it, as the kernel reports it (kernel/mounts.py; never from the path):
    # dev: the header's major:minor (os.makedev), 0 with no file. fs: "" no file, "shmem" the
    # kernel's internal shmem mount, else the mountinfo fstype of dev ("tmpfs", "ext4",
    # "fuse.x"), "?" a device mounted nowhere we can see, None not resolved (a record made
    # by hand). mount_huge: a tmpfs mount's huge= option. rdev, nlink: the mapped inode's,
    # read on memory filesystems only (rdev 0: not a device node; nlink -1: unknown).
    dev: int = 0
    fs: str | None = None
    mount_huge: str | None = None
    rdev: int = 0
    nlink: int = -1

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat hugepaged uses (times in clock ticks)."""

    pid: int
    comm: str
    state: str
    flags: int
    minflt: int
    majflt: int
    utime: int
    stime: int
    starttime: int
    rss_pages: int
    vsize: int = 0  # bytes mapped (statm's size): a new mapping changes it

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


@dataclass(frozen=True)
class ProcStatus:
    """The fields of /proc/PID/status hugepaged uses."""

    name: str
    tgid: int
    thp_enabled: bool
    vm_rss_kb: int
    rss_anon_kb: int


class ProcFS:
    """Reads /proc (or a fixture tree laid out like it)."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root
        # pid -> (start time, mode) of PR_SET_THP_DISABLE calls the syscall tracepoint saw:
        # the one source of PR_THP_DISABLE_EXCEPT_ADVISED where smaps cannot show it
        # (/proc/PID/status says THP_enabled: 1 for it).
        self._thp_prctl: dict[int, tuple[int, int]] = {}

    def note_thp_disable(self, pid: int, disable: int, flags: int) -> None:
        """A traced prctl(PR_SET_THP_DISABLE, disable, flags) of `pid`: remember what
        PR_GET_THP_DISABLE answers after it. A call the kernel refuses (EINVAL: flags without
        disabling, unknown flags) changes nothing; the start time keeps a reused pid out."""
        if (not disable and flags) or flags & ~PR_THP_DISABLE_EXCEPT_ADVISED:
            return
        if not disable:
            self._thp_prctl.pop(pid, None)
            return
        try:
            start = self.stat(pid).starttime
        except HugepagedError:
            return
        self._thp_prctl.pop(pid, None)
        while len(self._thp_prctl) >= THP_PRCTL_REMEMBERED:  # the oldest noted goes first
            del self._thp_prctl[next(iter(self._thp_prctl))]
        self._thp_prctl[pid] = (start, 1 | flags)

    def thp_prctl(self, pid: int) -> int:
        """The PR_SET_THP_DISABLE mode last traced for `pid` (0: none seen)."""
        entry = self._thp_prctl.get(pid)
        if entry is None:
            return 0
        try:
            alive = self.stat(pid).starttime == entry[0]
        except HugepagedError:
            alive = False
        if not alive:
            self._thp_prctl.pop(pid, None)
            return 0
        return entry[1]

    def path(self, pid: int | str, name: str) -> str:
        return f"{self.root}/{pid}/{name}"

    def exists(self, pid: int) -> bool:
        return os.path.isdir(f"{self.root}/{pid}")

    def tasks(self, pid: int) -> list[int]:
        """The thread ids of a thread group (/proc/PID/task)."""
        with process_errors(pid):
            return sorted(int(t) for t in os.listdir(f"{self.root}/{pid}/task") if t.isdigit())

    def pid_max(self) -> int:
        """/proc/sys/kernel/pid_max: pids are 1..pid_max-1 (4194304 if unreadable, the
        kernel's PID_MAX_LIMIT on 64-bit)."""
        try:
            with open(f"{self.root}/sys/kernel/pid_max") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 4194304

    def pids(self) -> list[int]:
        """Every thread-group leader's pid, ascending."""
        return sorted(int(d) for d in os.listdir(self.root) if d.isdigit())

    def read_text(self, pid: int, name: str) -> str:
        with process_errors(pid), open(self.path(pid, name), encoding="utf-8",
                                       errors="replace") as f:
            return f.read()

    def stat(self, pid: int) -> ProcStat:
        """Parse /proc/PID/stat; the comm may hold spaces and parentheses."""
        text = self.read_text(pid, "stat")
        lpar, rpar = text.index("("), text.rindex(")")
        rest = text[rpar + 2:].split()
        return ProcStat(
            pid=int(text[:lpar]), comm=text[lpar + 1:rpar], state=rest[0],
            flags=int(rest[6]), minflt=int(rest[7]), majflt=int(rest[9]),
            utime=int(rest[11]), stime=int(rest[12]), starttime=int(rest[19]),
            rss_pages=int(rest[21]), vsize=int(rest[20]),
        )

    def status(self, pid: int) -> ProcStatus:
        fields: dict[str, str] = {}
        for line in self.read_text(pid, "status").splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()

        def kb(key: str) -> int:
            return int(fields.get(key, "0 kB").split()[0])

        return ProcStatus(
            name=fields.get("Name", "?"), tgid=int(fields.get("Tgid", "0")),
            # Absent on kernels before THP_enabled was added: assume enabled.
            thp_enabled=fields.get("THP_enabled", "1") != "0",
            vm_rss_kb=kb("VmRSS"), rss_anon_kb=kb("RssAnon"),
        )

    def maps_text(self, pid: int) -> str:
        return self.read_text(pid, "maps")

    def smaps(self, pid: int) -> list[Vma]:
        """The VMAs of smaps, each with what backs it (kernel/mounts.py). Parsed as it is
        read: a process of 60,000 mappings has 45 MB of smaps text, and holding it (and its
        lines) at once is what the daemon's peak RSS would be made of."""
        from hugepaged.kernel.mounts import Backing

        return list(self.smaps_each(pid, Backing(self.root, pid).annotate))

    def smaps_each(self, pid: int, backing: Callable[[dict], None] | None = None
                   ) -> Iterator[Vma]:
        """smaps' VMAs one at a time, for a caller that keeps few of them (the daemon's
        visit keeps the VMAs that can hold a window); default `backing`: kernel/mounts.py."""
        if backing is None:
            from hugepaged.kernel.mounts import Backing

            backing = Backing(self.root, pid).annotate
        with process_errors(pid), open(self.path(pid, "smaps"), encoding="utf-8",
                                       errors="replace") as f:
            yield from iter_smaps(f, backing)

    def exe(self, pid: int) -> str | None:
        """readlink /proc/PID/exe; None where there is none (a kernel thread, a zombie)."""
        try:
            return os.readlink(self.path(pid, "exe"))
        except FileNotFoundError:
            if self.exists(pid):  # the link is dangling, the process is still there
                return None
            raise ProcessGone(f"pid {pid}: process has exited") from None
        except OSError as err:
            raise translate(err, pid) from err

    def cgroup_relative(self, path: str) -> str | None:
        """A cgroup as /proc/PID/cgroup names it: `path` with its cgroup mount point (v1 or
        v2, from /proc/self/mountinfo) taken off, or `path` itself if no mount holds it;
        None if it names no existing cgroup directory."""
        with open(f"{self.root}/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        points = []
        for line in lines:
            left, sep, right = line.partition(" - ")
            if sep and right.split()[:1] in (["cgroup"], ["cgroup2"]):
                points.append(left.split()[4])
        for point in sorted(points, key=len, reverse=True):
            if path == point or path.startswith(point.rstrip("/") + "/"):
                return "/" + path[len(point):].strip("/") if os.path.isdir(path) else None
        if any(os.path.isdir(p.rstrip("/") + path) for p in points):
            return path
        return None

    def cgroup2(self, pid: int) -> str | None:
        """The process's group in the cgroup2 hierarchy (the `0::` line), or None."""
        for line in self.read_text(pid, "cgroup").splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
        return None

    def cgroups(self, pid: int) -> list[str]:
        """The cgroup path of each hierarchy in /proc/PID/cgroup (v2 `0::/p`, v1 `N:ctl:/p`)."""
        return parse_cgroups(self.read_text(pid, "cgroup"))


_SMAPS_KEYS = {"Rss": "rss_kb", "Anonymous": "anonymous_kb", "AnonHugePages": "anon_huge_kb",
               "ShmemPmdMapped": "shmem_pmd_kb", "FilePmdMapped": "file_pmd_kb"}


def _parse_header(line: str) -> dict:
    parts = line.split(None, 5)
    start, _, end = parts[0].partition("-")
    major, _, minor = parts[3].partition(":")
    return {
        "start": int(start, 16), "end": int(end, 16), "perms": parts[1],
        "offset": int(parts[2], 16), "dev": os.makedev(int(major, 16), int(minor or "0", 16)),
        "inode": int(parts[4]), "path": parts[5].strip() if len(parts) > 5 else "",
    }


def parse_smaps(text: str | Iterable[str],
                backing: Callable[[dict], None] | None = None) -> list[Vma]:
    """Parse smaps text (or its lines, as a file gives them) into Vma records (header line,
    then 'Key: value' lines); `backing` adds what backs each VMA to its header's fields
    before the record is made."""
    return list(iter_smaps(text, backing))


def iter_smaps(text: str | Iterable[str],
               backing: Callable[[dict], None] | None = None) -> Iterator[Vma]:
    """parse_smaps, one record at a time."""
    current: dict | None = None
    for line in text.splitlines() if isinstance(text, str) else text:
        key, sep, value = line.partition(":")
        if sep and " " not in key and "-" not in key:
            if current is None:
                continue
            if key in _SMAPS_KEYS:
                current[_SMAPS_KEYS[key]] = int(value.split()[0])
            elif key == "VmFlags":
                current["flags"] = frozenset(value.split())
            elif key == "THPeligible":
                current["thp_eligible"] = value.strip() == "1"
            continue
        if current is not None:
            yield Vma(**current)
        current = _parse_header(line)
        if backing is not None:
            backing(current)
    if current is not None:
        yield Vma(**current)


def parse_cgroups(text: str) -> list[str]:
    """One path per line `hierarchy-ID:controllers:path`; the path may itself hold colons."""
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2]:
            paths.append(parts[2])
    return paths


def mapped_at(maps_text: str, address: int) -> bool:
    """Whether `address` lies inside any VMA of a /proc/PID/maps text."""
    for line in maps_text.splitlines():
        span = line.split(None, 1)[0]
        lo, _, hi = span.partition("-")
        if int(lo, 16) <= address < int(hi, 16):
            return True
    return False
