"""The page cache behind a shared mapping of another process, read without touching a page.

hpage_collapse_scan_file decides a shared-memory window by what the file's page cache holds
at the window's 512 offsets, whether or not this process maps those pages: a page present in
the cache counts, a swap entry in the cache (shmem's swapped-out page) counts as swap, a hole
is "none". Two ways to see that from userspace, on the file opened through
/proc/PID/map_files/START-END:

- cachestat(2) (Linux 6.5+): counts for a byte range. For shmem, filemap_cachestat counts
  every swap entry in the cache as `evicted` (it is an xarray value entry, like a shadow), so
  per range: present = nr_cache, swapped = nr_evicted. One call per 2 MiB range. The chosen
  source.
- mincore(2) on a PROT_NONE MAP_SHARED mapping of the file made here: one byte per page,
  resident or not, one call per chunk. It cannot tell a swapped page from a hole (both read
  as not resident), so it is the fallback where cachestat is missing.

Neither faults a page in nor changes its LRU position.

What neither tells is the size of the folio that holds a page: a range another process
collapsed is one 2 MiB folio in the cache (hpage_collapse_scan_file says PTE_MAPPED_HUGEPAGE
there), and a process that maps none of it shows no frame in its pagemap. `frames()` learns
the frame of a page that is in the cache by mapping that one page into hugepaged itself with
MAP_POPULATE, reading its own pagemap and unmapping it: the page is mapped here for a moment
and marked accessed once, as a read of the file would; nothing is allocated where the page is
present (the caller asks only for those), and a page past the end of the file is no frame
(populating reports no SIGBUS).
"""

import ctypes
import errno
import mmap
import os
import platform
from dataclasses import dataclass

import numpy as np

from hugepaged.errors import ProcessGone, Unsupported
from hugepaged.kernel.errors import process_errors
from hugepaged.kernel.pagemap import PM_PFN_MASK, PM_PRESENT

_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451, "arm64": 451, "riscv64": 451,
                  "ppc64le": 451, "s390x": 451}
PROT_NONE = 0
PROT_READ = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


class VmaGone(LookupError):
    """The mapping went away (munmap, mremap) while the process lives on: skip the VMA."""


@dataclass(frozen=True)
class CacheStat:
    """struct cachestat: pages of a range by state (the kernel's field names)."""

    nr_cache: int
    nr_dirty: int
    nr_writeback: int
    nr_evicted: int
    nr_recently_evicted: int


@dataclass(frozen=True)
class FileId:
    """Which file a mapping shows: the key for one collapse per range of a file."""

    dev: int
    ino: int
    size: int


class MappedFile:
    """The file behind one VMA of a process, opened through /proc/PID/map_files.

    Only ever for shared memory: a VMA whose device is the kernel's internal shmem mount or
    a tmpfs mount, as the kernel reports it (scan.eligibility.memory_kind, kernel/mounts.py),
    whose page cache is in memory and whose open cannot block. No other user file is opened:
    a file of a FUSE filesystem whose server stopped answering would hang the opener in D
    state, whatever the file is called."""

    def __init__(self, proc_root: str, pid: int, start: int, end: int) -> None:
        self.pid = pid
        path = f"{proc_root}/{pid}/map_files/{start:x}-{end:x}"
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not os.path.isdir(f"{proc_root}/{pid}"):
                raise ProcessGone(f"pid {pid}: process has exited") from None
            raise VmaGone(f"pid {pid}: no mapping {start:#x}-{end:#x} any more") from None
        except OSError as err:
            with process_errors(pid, path):
                raise err from None
        st = os.fstat(self.fd)
        self.id = FileId(st.st_dev, st.st_ino, st.st_size)
        self._range = _Range()
        self._stat = _Stat()
        self._nr = _SYS_CACHESTAT.get(platform.machine())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "MappedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cachestat(self, offset: int, length: int) -> CacheStat:
        """cachestat(2) of [offset, offset + length) of the file."""
        if self._nr is None:
            raise Unsupported(f"cachestat syscall number unknown on {platform.machine()}")
        self._range.off, self._range.len = offset, length
        ret = _libc.syscall(self._nr, self.fd, ctypes.byref(self._range),
                            ctypes.byref(self._stat), 0)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                raise Unsupported("cachestat(2) is not available (Linux 6.5+)")
            raise OSError(err, f"cachestat: {os.strerror(err)}")
        s = self._stat
        return CacheStat(s.nr_cache, s.nr_dirty, s.nr_writeback, s.nr_evicted,
                         s.nr_recently_evicted)

    def ranges_cachestat(self, offset: int, nranges: int, size: int) -> np.ndarray:
        """(nranges, 2) int64: pages present and swapped in each range of `size` bytes."""
        out = np.zeros((nranges, 2), dtype=np.int64)
        for i in range(nranges):
            s = self.cachestat(offset + i * size, size)
            out[i] = s.nr_cache, s.nr_evicted
        return out

    def resident(self, offset: int, length: int) -> np.ndarray:
        """mincore(2) over a PROT_NONE MAP_SHARED mapping of the range: bool per page."""
        npages = length // mmap.PAGESIZE
        addr = _libc.mmap(None, length, PROT_NONE, mmap.MAP_SHARED, self.fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of the mapped file: {os.strerror(err)}")
        try:
            vec = np.zeros(npages, dtype=np.uint8)
            if _libc.mincore(addr, length, vec.ctypes.data) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}")
        finally:
            _libc.munmap(addr, length)
        return (vec & 1).astype(bool)

    def frames(self, proc_root: str, offsets: list[int]) -> np.ndarray:
        """uint64 frame (PFN) of the page-cache page at each page-aligned byte offset, 0
        where none is mapped (not in the cache, past the end of the file). See the module
        docstring: ask only for pages the cache holds."""
        out = np.zeros(len(offsets), dtype=np.uint64)
        if not offsets:
            return out
        pagemap = os.open(f"{proc_root}/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for i, offset in enumerate(offsets):
                addr = _libc.mmap(None, mmap.PAGESIZE, PROT_READ,
                                  mmap.MAP_SHARED | mmap.MAP_POPULATE, self.fd, offset)
                if addr is None or addr == _MAP_FAILED:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mmap of the mapped file: {os.strerror(err)}")
                try:
                    entry = int.from_bytes(os.pread(pagemap, 8, addr // mmap.PAGESIZE * 8),
                                           "little")
                finally:
                    _libc.munmap(addr, mmap.PAGESIZE)
                if entry & PM_PRESENT:
                    out[i] = entry & PM_PFN_MASK
        finally:
            os.close(pagemap)
        return out

    def ranges_mincore(self, offset: int, nranges: int, size: int) -> np.ndarray:
        """(nranges, 2) int64 like ranges_cachestat; swapped is -1 (mincore cannot tell)."""
        per = size // mmap.PAGESIZE
        res = self.resident(offset, nranges * size).reshape(nranges, per)
        out = np.full((nranges, 2), -1, dtype=np.int64)
        out[:, 0] = res.sum(axis=1)
        return out


def cachestat_supported(probe_fd: int | None = None) -> bool:
    """Whether cachestat(2) works here, probed on a memfd of our own."""
    fd = os.memfd_create("hugepaged-probe", os.MFD_CLOEXEC) if probe_fd is None else probe_fd
    try:
        nr = _SYS_CACHESTAT.get(platform.machine())
        if nr is None:
            return False
        rng, st = _Range(0, mmap.PAGESIZE), _Stat()
        return _libc.syscall(nr, fd, ctypes.byref(rng), ctypes.byref(st), 0) == 0
    finally:
        if probe_fd is None:
            os.close(fd)
