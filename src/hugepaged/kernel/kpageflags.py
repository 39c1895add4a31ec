"""/proc/kpageflags read for just the frames a decision needs, in coalesced spans."""

import os

import numpy as np

from hugepaged.kernel.errors import process_errors

KPF_LOCKED = 1 << 0
KPF_REFERENCED = 1 << 2
KPF_LRU = 1 << 5
KPF_ANON = 1 << 12
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_HUGE = 1 << 17
KPF_NOPAGE = 1 << 20
KPF_KSM = 1 << 21
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24

# Reading a frame costs ~110 ns, a pread ~1-2 us: bridge gaps up to this many frames.
SPAN_GAP = 16


class KPageFlags:
    """An open /proc/kpageflags (root only)."""

    def __init__(self, proc_root: str = "/proc") -> None:
        with process_errors(None, "/proc/kpageflags"):
            self.fd = os.open(f"{proc_root}/kpageflags", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "KPageFlags":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, pfns: np.ndarray) -> np.ndarray:
        """Flags for each pfn in `pfns` (any shape, any order; 0 stays 0)."""
        flat = pfns.ravel()
        uniq = np.unique(flat[flat != 0]).astype(np.int64)
        if uniq.size == 0:
            return np.zeros_like(pfns, dtype=np.uint64)
        starts, ends = spans(uniq, SPAN_GAP)
        buf = np.empty(int((ends - starts).sum()), dtype=np.uint64)
        view = memoryview(buf).cast("B")
        pos = 0
        with process_errors(None, "/proc/kpageflags"):
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                os.preadv(self.fd, [view[pos * 8:(pos + e - s) * 8]], s * 8)
                pos += e - s
        # Map each unique pfn to its slot in buf, then each input pfn to its unique pfn.
        offsets = np.concatenate(([0], np.cumsum(ends - starts)[:-1]))
        span_of = np.searchsorted(starts, uniq, side="right") - 1
        flags_uniq = buf[offsets[span_of] + (uniq - starts[span_of])]
        out = np.zeros(flat.shape, dtype=np.uint64)
        nz = flat != 0
        out[nz] = flags_uniq[np.searchsorted(uniq, flat[nz].astype(np.int64))]
        return out.reshape(pfns.shape)


def spans(sorted_pfns: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut sorted unique pfns into [start, end) spans, bridging holes of up to `gap` frames."""
    breaks = np.flatnonzero(np.diff(sorted_pfns) > gap + 1) + 1
    starts = sorted_pfns[np.concatenate(([0], breaks))]
    ends = sorted_pfns[np.concatenate((breaks - 1, [sorted_pfns.size - 1]))] + 1
    return starts.astype(np.int64), ends.astype(np.int64)
