"""Resource limits, advisory locks and the daemon's own files (state file, lock files).

The daemon runs as root and keeps files at paths an admin chose (--state-file, --socket), maybe
in a directory others can write. There, another user could plant a symlink (root then writes
through it into a root-only file), a FIFO (a read blocks forever), a directory, or a lock file
of their own that they hold (start blocked, the blame on whatever pid they wrote in it). So:
every directory on the way must be root's or ours and not writable by others unless sticky
(/tmp is fine); a file is created O_EXCL|O_NOFOLLOW, opened O_NOFOLLOW|O_NONBLOCK, and must be
a regular file of ours; it is replaced by rename from a temporary file in the same directory;
and a held lock is blamed on the process the kernel says holds it (/proc/locks).
"""

import contextlib
import errno
import fcntl
import os
import resource
import secrets
import stat

from hugepaged.errors import UsageError


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (one pidfd per registered process);
    returns (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def nofile_soft() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# A state or lock path another user could change, or that is not a regular file, is bad
# input (UsageError, exit 2). No subclass: the man page lists the error classes' docstrings.
UnsafePath = UsageError


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_private_dir(directory: str, what: str) -> None:
    """Refuse `directory` if another user could replace what is in it: any directory on the
    way (symlinks followed) owned by someone other than root or us, or writable by others
    (every user, or a group other than root's) without the sticky bit."""
    euid = os.geteuid()
    path = os.path.abspath(directory or ".")
    prefixes = ["/"] + ["/".join(path.split("/")[:i]) for i in range(2, path.count("/") + 2)]
    for prefix in prefixes:
        try:
            st = os.stat(prefix)
        except OSError as err:
            raise UnsafePath(f"{what}: {prefix}: {err.strerror}") from None
        if st.st_uid not in (0, euid):
            raise UnsafePath(f"{what}: {prefix} belongs to uid {st.st_uid}: another user "
                             "could replace the files in it; choose a directory of root's")
        sticky = st.st_mode & stat.S_ISVTX
        if not sticky and (st.st_mode & stat.S_IWOTH or
                           (st.st_mode & stat.S_IWGRP and st.st_gid != 0)):
            who = "every user" if st.st_mode & stat.S_IWOTH else f"group {st.st_gid}"
            raise UnsafePath(f"{what}: {prefix} is writable by {who} without the sticky bit: "
                             "another user could replace the files in it")


def open_own(path: str, flags: int, create: bool) -> int | None:
    """An fd on `path`: created (mode 0600, O_EXCL) when absent and `create`, else opened
    without following a symlink or blocking on a FIFO; refused (UnsafePath) when it is not a
    regular file of ours. None when absent and not `create`."""
    base = flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if create:
        try:
            return os.open(path, base | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, base)
    except FileNotFoundError:
        if create:  # removed between the two opens: one more try, exclusive again
            return os.open(path, base | os.O_CREAT | os.O_EXCL, 0o600)
        return None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            with contextlib.suppress(OSError):
                raise UnsafePath(f"{path}: {_kind(os.lstat(path).st_mode)}, not a regular "
                                 "file") from None
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"{_kind(st.st_mode)}, not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
    if problem:
        os.close(fd)
        raise UnsafePath(f"{path}: {problem}; not used")
    return fd


def read_own(path: str, limit: int = 1 << 16) -> bytes | None:
    """The bytes of a regular file of ours (at most `limit`), or None when it is absent."""
    fd = open_own(path, os.O_RDONLY, create=False)
    if fd is None:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` at once: a new file (O_EXCL, 0600) in the same directory,
    synced, renamed over it. What was at `path` must be a regular file of ours, or nothing."""
    existing = open_own(path, os.O_RDONLY, create=False)
    if existing is not None:
        os.close(existing)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


class LockHeld(Exception):
    """The lock file is held by another process: `owner` its pid as /proc/locks says (None if
    the kernel does not say), with its name and uid where readable."""

    def __init__(self, path: str, owner: int | None, comm: str | None = None,
                 uid: int | None = None) -> None:
        super().__init__(path)
        self.path, self.owner, self.comm, self.uid = path, owner, comm, uid

    def describe(self) -> str:
        """" (pid N, NAME, uid U)" as far as known ("" when nothing is)."""
        if not self.owner:
            return ""
        parts = [f"pid {self.owner}"]
        if self.comm is not None:
            parts.append(repr(self.comm) if not self.comm.isprintable() else self.comm)
        if self.uid is not None and self.uid != os.geteuid():
            parts.append(f"uid {self.uid}")
        return f" ({', '.join(parts)})"


def try_lock(path: str, proc_root: str = "/proc") -> int:
    """flock(LOCK_EX | LOCK_NB) on `path` (a regular file of ours, created 0600 O_EXCL when
    absent); our pid is written in it for a reader's information; the fd holds the lock until
    closed. Raises LockHeld naming the holder the kernel reports. A lock file may be removed
    by whoever holds it (remove_lock): a process that opened it before, and locks the unlinked
    inode after, sees that `path` is no longer its file and tries again, so no two processes
    ever hold two inodes."""
    while True:
        fd = open_own(path, os.O_RDWR, create=True)
        assert fd is not None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            held = err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            holder = lock_holder(fd, proc_root) if held else None
            os.close(fd)
            if held:
                raise LockHeld(path, *holder) if holder else LockHeld(path, None) from None
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # removed (or replaced) between our open and our lock
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def remove_lock(path: str) -> bool:
    """Remove a lock file nobody holds (taken, unlinked, released); False if someone holds
    it, True if it is gone (or was never there)."""
    if not os.path.lexists(path):
        return True
    try:
        fd = try_lock(path)
    except LockHeld:
        return False
    try:
        os.unlink(path)
    finally:
        os.close(fd)
    return True


def lock_holder(fd: int, proc_root: str = "/proc") -> tuple[int, str | None, int | None] | None:
    """(pid, comm, uid) of the process holding a flock on the file of `fd`, from /proc/locks
    (what the file says is anyone's to write)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(f"{proc_root}/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or "->" in fields[1] or fields[1] != "FLOCK" or fields[5] != inode:
            continue
        try:
            pid = int(fields[4])
        except ValueError:
            continue
        if pid <= 0:
            return None
        return (pid, *_who(pid, proc_root))
    return None


def _who(pid: int, proc_root: str) -> tuple[str | None, int | None]:
    comm = uid = None
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open(f"{proc_root}/{pid}/status", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("Name:"):
                comm = line.split(":", 1)[1].strip()
            elif line.startswith("Uid:"):
                uid = int(line.split()[2])  # the effective uid
    return comm, uid
