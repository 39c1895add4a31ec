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

# Reading one more frame is far cheaper than one more pread (see bench/bench_scan.py), so gaps
# of up to this many frames are read through rather than split into two reads.
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
        """Flags for each pfn in `pfns` (any shape, any order; 0 stays 0).

        The frames of an address range come in runs of consecutive PFNs, so the work is per
        run, not per frame: runs are sorted by their first frame and merged into spans
        (bridging holes of up to SPAN_GAP frames), each span is one pread, and every frame's
        flags are then gathered from the spans' buffer in the input's own order.
        """
        shape = np.shape(pfns)
        flat = np.ascontiguousarray(pfns).reshape(-1)
        flat = flat.view(np.int64) if flat.dtype == np.uint64 else flat.astype(np.int64)
        nnz = np.count_nonzero(flat)
        if nnz == 0:
            return np.zeros(shape, dtype=np.uint64)
        nz = None if nnz == flat.size else np.flatnonzero(flat)
        vals = flat if nz is None else flat[nz]
        # Runs [first, first + length) of consecutive frames, in input order.
        run_at = np.flatnonzero(np.diff(vals) != 1) + 1
        run_at = np.concatenate(([0], run_at))
        run_len = np.diff(np.append(run_at, vals.size))
        run_first = vals[run_at]
        # Spans over the runs sorted by first frame; `reach` is the furthest end so far.
        order = np.argsort(run_first)
        s_first = run_first[order]
        reach = np.maximum.accumulate(s_first + run_len[order])
        new_span = np.empty(order.size, dtype=bool)
        new_span[0] = True
        np.greater(s_first[1:], reach[:-1] + SPAN_GAP, out=new_span[1:])
        span_at = np.flatnonzero(new_span)
        starts = s_first[span_at]
        ends = reach[np.append(span_at[1:] - 1, order.size - 1)]
        lens = ends - starts
        offsets = np.cumsum(lens) - lens
        buf = np.empty(int(lens.sum()), dtype=np.uint64)
        view = memoryview(buf).cast("B")
        with process_errors(None, "/proc/kpageflags"):
            for s, o, n in zip(starts.tolist(), offsets.tolist(), lens.tolist(), strict=True):
                got = os.preadv(self.fd, [view[o * 8:(o + n) * 8]], s * 8)
                if got != n * 8:  # past the last frame: nothing to report there
                    buf[o + got // 8:o + n] = 0
        # Where each run starts in buf, then each frame: its run's start plus its place in it.
        span_of = np.cumsum(new_span) - 1
        pos = np.empty(order.size, dtype=np.int64)
        pos[order] = s_first + (offsets - starts)[span_of]
        # idx steps by one inside a run and jumps to the run's position at its first frame.
        idx = np.ones(vals.size, dtype=np.int64)
        idx[0] = pos[0]
        idx[run_at[1:]] = pos[1:] - pos[:-1] - run_len[:-1] + 1
        np.cumsum(idx, out=idx)
        if nz is None:
            return np.take(buf, idx).reshape(shape)
        out = np.zeros(flat.size, dtype=np.uint64)
        out[nz] = np.take(buf, idx)
        return out.reshape(shape)
