"""/proc/PID/pagemap: plain reads into numpy, and the PAGEMAP_SCAN ioctl (6.7+).

One entry of 8 bytes per base page: the entry of an address is at (address >> page_shift)
* 8, with the running kernel's page shift (kernel/geometry.py), 12 only with 4 KiB pages.
"""

import errno
import fcntl
import os
import struct

import numpy as np

from hugepaged.errors import Unsupported
from hugepaged.kernel.errors import process_errors

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# PAGEMAP_SCAN (include/uapi/linux/fs.h)
PAGEMAP_SCAN = 0xC0606610
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8
_PM_SCAN_ARG = struct.Struct("<12Q")
_REGIONS_PER_CALL = 8192


class PageMap:
    """An open pagemap of one process; reads return numpy uint64 arrays."""

    def __init__(self, proc_root: str, pid: int, page_shift: int) -> None:
        self.pid, self.page_shift = pid, page_shift
        with process_errors(pid):
            self.fd = os.open(f"{proc_root}/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._regions = np.empty((_REGIONS_PER_CALL, 3), dtype=np.uint64)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PageMap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """One entry per page of [start, end), in one pread (into `out` if given: a
        C-contiguous uint64 array of that many entries, any shape)."""
        n = (end - start) >> self.page_shift
        if out is None:
            out = np.empty(n, dtype=np.uint64)
        elif out.size != n or out.dtype != np.uint64 or not out.flags.c_contiguous:
            raise ValueError("out must be a C-contiguous uint64 array of one entry per page")
        with process_errors(self.pid):
            got = os.preadv(self.fd, [memoryview(out).cast("B")],
                            (start >> self.page_shift) * 8)
        if got != n * 8:  # the mm went away under us
            out.reshape(-1)[got // 8:] = 0
        return out

    def scan(self, start: int, end: int, anyof: int, returned: int) -> np.ndarray:
        """PAGEMAP_SCAN over [start, end): (n, 3) rows of start, end, categories."""
        chunks = []
        addr = start
        while addr < end:
            arg = bytearray(_PM_SCAN_ARG.pack(
                _PM_SCAN_ARG.size, 0, addr, end, 0, self._regions.ctypes.data,
                _REGIONS_PER_CALL, 0, 0, 0, anyof, returned))
            try:
                n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg, True)
            except OSError as err:
                if err.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise Unsupported("PAGEMAP_SCAN is not available (Linux 6.7+)") from err
                with process_errors(self.pid):
                    raise
            chunks.append(self._regions[:n].copy())
            walk_end = _PM_SCAN_ARG.unpack(arg)[4]
            if walk_end <= addr:
                break
            addr = walk_end
        if not chunks:
            return np.empty((0, 3), dtype=np.uint64)
        return np.concatenate(chunks)


def pagemap_scan_supported(proc_root: str, page_shift: int) -> bool:
    """Probe PAGEMAP_SCAN on our own pagemap."""
    try:
        with PageMap(proc_root, "self", page_shift) as pm:  # type: ignore[arg-type]
            pm.scan(0, 1 << page_shift, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
        return True
    except (Unsupported, OSError):
        return False
