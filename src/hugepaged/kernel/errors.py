"""The one place that turns an OSError from /proc, /sys or a syscall into a project error."""

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from hugepaged.errors import AccessDenied, HugepagedError, ProcessGone


def translate(err: OSError, pid: int | None = None, what: str = "") -> HugepagedError | OSError:
    """ESRCH/ENOENT on a process become ProcessGone, EPERM/EACCES become AccessDenied."""
    subject = f"pid {pid}" if pid is not None else (what or "kernel interface")
    if pid is not None and err.errno in (errno.ESRCH, errno.ENOENT):
        return ProcessGone(f"pid {pid}: process has exited")
    if err.errno in (errno.EPERM, errno.EACCES):
        hint = "" if _is_root() else " (hugepaged needs root)"
        return AccessDenied(f"{subject}: permission denied{hint}")
    return err


@contextmanager
def process_errors(pid: int | None, what: str = "") -> Iterator[None]:
    """Translate errors raised while reading one process's files."""
    try:
        yield
    except OSError as err:
        mapped = translate(err, pid, what)
        if mapped is err:
            raise
        raise mapped from err


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
