"""pidfds and process_madvise(MADV_COLLAPSE) through ctypes.

ctypes and not a library: the stdlib has os.pidfd_open but no process_madvise, and no package
on PyPI wraps it; the call is one syscall with one iovec.
"""

import contextlib
import ctypes
import errno
import os
import platform
import select

from hugepaged.errors import Unsupported
from hugepaged.kernel.errors import process_errors

MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_COLLAPSE = 25
_SYS_PROCESS_MADVISE = {"x86_64": 440, "aarch64": 440, "arm64": 440, "riscv64": 440,
                        "ppc64le": 440, "s390x": 440}


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


# What a failed probe means, by errno: the call's own refusals first (see probe_collapse).
_PROBE_HINTS = {
    errno.ENOSYS: "no process_madvise syscall (Linux 5.10+), or a seccomp filter refuses it",
    errno.EINVAL: "MADV_COLLAPSE is not an advice this kernel knows for process_madvise "
                  "(mainline 6.1+, or a backport)",
    errno.EPERM: "not permitted: CAP_SYS_NICE is missing, or a seccomp filter "
                 "(SystemCallFilter=) refuses process_madvise",
}
# The advice was understood and the collapse itself failed: the feature is there.
_PROBE_UNDERSTOOD = (errno.ENOMEM, errno.EAGAIN, errno.EBUSY)


def _syscall_number() -> int:
    nr = _SYS_PROCESS_MADVISE.get(platform.machine())
    if nr is None:
        raise Unsupported(f"process_madvise syscall number unknown on {platform.machine()}")
    return nr


def probe_collapse(pmd_size: int) -> int:
    """Try what hugepaged stands on, instead of guessing from the kernel's version (a
    distribution kernel may carry a backport; a seccomp filter may refuse what the version
    promises): process_madvise(pidfd of our own, one window, MADV_COLLAPSE) on a scratch
    mapping with one page written. Returns 0 when the kernel collapsed it, else the errno
    of a collapse that was understood but failed (ENOMEM, EAGAIN, EBUSY: no huge page free
    just now, which is no reason to refuse); raises Unsupported naming the exact errno
    otherwise. THP disabled for ourselves (PR_SET_THP_DISABLE, inherited) would answer
    EINVAL whatever the kernel supports, so it is lifted for the probe and put back after:
    LruDrain lifts it for good, and says so, when the daemon first needs it."""
    import mmap

    nr = _syscall_number()
    size = 2 * pmd_size
    scratch = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    disabled = thp_disabled_for_self()
    pidfd = -1
    try:
        if disabled:
            _libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)
        base = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
        window = (base + pmd_size - 1) & ~(pmd_size - 1)
        scratch[window - base] = 1  # a present page: an empty window is EINVAL by itself
        pidfd = os.pidfd_open(os.getpid())
        iov = _IoVec(window, pmd_size)
        ret = _libc.syscall(nr, pidfd, ctypes.byref(iov), 1, MADV_COLLAPSE, 0)
        err = ctypes.get_errno() if ret < 0 else 0
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        if disabled:
            _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
        with contextlib.suppress(BufferError):  # a ctypes view may still pin it: GC frees it
            scratch.close()
    if err == 0 or err in _PROBE_UNDERSTOOD:
        return err
    name = errno.errorcode.get(err, str(err))
    hint = _PROBE_HINTS.get(err, os.strerror(err))
    raise Unsupported(f"process_madvise(MADV_COLLAPSE) on a page of hugepaged's own failed "
                      f"with {name}: {hint}")


PIDFD_THREAD = os.O_EXCL  # Linux 6.9: a pidfd for one thread, not its thread group


def pidfd_open(pid: int, thread: bool = False) -> int:
    with process_errors(pid):
        return os.pidfd_open(pid, PIDFD_THREAD if thread else 0)


def pidfd_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def process_madvise(pidfd: int, start: int, length: int, advice: int = MADV_COLLAPSE) -> int:
    """One iovec; returns bytes advised, or -errno (the caller maps errno to meaning)."""
    iov = _IoVec(start, length)
    ret = _libc.syscall(_syscall_number(), pidfd, ctypes.byref(iov), 1, advice, 0)
    if ret < 0:
        return -ctypes.get_errno()
    return ret


PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def thp_disabled_for_self() -> bool:
    """PR_GET_THP_DISABLE: whether THP is off for this very process (inherited or set)."""
    return _libc.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) > 0


def process_madvise_windows(pidfd: int, starts: list[int], length: int,
                            advice: int = MADV_COLLAPSE) -> int:
    """One iovec per window, in one call: bytes advised, or -errno if the first one failed.

    The kernel stops at the first iovec that fails and returns what it advised before it,
    so a short count means the window after the last full one failed (its errno is lost).
    """
    iov = (_IoVec * len(starts))(*[(s, length) for s in starts])
    ret = _libc.syscall(_syscall_number(), pidfd, iov, len(starts), advice, 0)
    if ret < 0:
        return -ctypes.get_errno()
    return ret


class LruDrain:
    """lru_add_drain_all() from userspace, as khugepaged_do_scan does before each pass.

    Freshly faulted pages wait in per-CPU batches before they reach an LRU list, and
    kpageflags shows them without LRU until then. MADV_COLLAPSE drains every CPU's batch
    before it looks at the range; on an empty window of our own (one whose VMA has an
    anon_vma, hence the page written next to it) it then fails with EINVAL and allocates
    nothing. Its precondition is THP allowed for our own process: with PR_SET_THP_DISABLE
    (inherited across fork and exec from whoever started us) madvise_collapse answers the
    same EINVAL before it drains anything, and every fresh page would read PAGE_LRU. So the
    flag is checked on every drain and cleared for ourselves (hugepaged's own memory has no
    reason to stay small); `cleared` counts how often that was needed.
    """

    def __init__(self, pmd_size: int) -> None:
        import mmap

        self.cleared = 0
        size = 3 * pmd_size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        first = (base + pmd_size - 1) & ~(pmd_size - 1)
        self._map[first - base] = 1  # gives the VMA its anon_vma
        self._empty = first + pmd_size - base  # offset of the untouched window
        self._size = pmd_size

    def _allow_thp(self) -> None:
        if not thp_disabled_for_self():
            return
        if _libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0) != 0 or thp_disabled_for_self():
            err = ctypes.get_errno()
            raise Unsupported("THP is disabled for hugepaged itself and cannot be re-enabled "
                              f"({os.strerror(err) if err else 'still disabled'}): "
                              "the LRU drain would not happen")
        self.cleared += 1

    def __call__(self) -> None:
        self._allow_thp()
        with contextlib.suppress(OSError):  # EINVAL is the answer; the drain has happened
            self._map.madvise(MADV_COLLAPSE, self._empty, self._size)
