"""Resource limits and advisory locks: the daemon's fds, and one daemon per socket/state file."""

import contextlib
import errno
import fcntl
import os
import resource


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


class LockHeld(Exception):
    """The lock file is held by another process; `owner` is the pid written in it, if any."""

    def __init__(self, path: str, owner: int | None) -> None:
        super().__init__(path)
        self.path, self.owner = path, owner


def try_lock(path: str) -> int:
    """flock(LOCK_EX | LOCK_NB) on `path` (created 0600), our pid written in it; the fd holds
    the lock until closed. The file is never unlinked: unlinking a lock file lets two
    processes each lock a different inode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        owner = _owner(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LockHeld(path, owner) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _owner(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None
