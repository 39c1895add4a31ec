"""/sys/kernel/mm/page_idle/bitmap: which frames were accessed since they were marked idle.

The kernel's khugepaged counts a PTE as referenced when its young bit (or the folio's young
or referenced flag) is set. Userspace cannot read a PTE's young bit, but idle page tracking
(CONFIG_IDLE_PAGE_TRACKING) gives the same fact over an interval: writing a frame's bit
clears its PTEs' young bits and marks it idle; reading the bit later says whether any PTE
mapping it was young since (the kernel walks the frame's rmap at the read).

The bitmap is an array of 64-bit words, one bit per PFN (bit pfn % 64 of word pfn // 64),
read and written in whole words at 8-byte-aligned offsets. Writing sets the idle flag of
the frames whose bits are 1 and ignores the 0 bits, so marking one frame never unmarks
another. A frame never marked reads as not idle, that is referenced, which is the
kernel's view of a freshly faulted page (its PTE is young).
"""

import os

import numpy as np

from hugepaged.errors import AccessDenied
from hugepaged.kernel.errors import process_errors
from hugepaged.kernel.kpageflags import KPF_REFERENCED
from hugepaged.kernel.pagemap import PM_PFN_MASK, PM_PRESENT

_WORD = 8  # bytes per word of 64 frames
_U = np.uint64


def bitmap_path(sys_root: str) -> str:
    return f"{sys_root}/kernel/mm/page_idle/bitmap"


class PageIdle:
    """An open page_idle bitmap (root only; absent without CONFIG_IDLE_PAGE_TRACKING)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with process_errors(None, path):
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def idle(self, pfns: np.ndarray) -> np.ndarray:
        """Per pfn (any shape; 0 means no frame): still idle since it was marked."""
        flat = np.asarray(pfns, dtype=_U).reshape(-1)
        out = np.zeros(flat.size, dtype=bool)
        real = flat != 0
        if not real.any():
            return out.reshape(np.shape(pfns))
        words, inverse = np.unique(flat[real] >> _U(6), return_inverse=True)
        values = np.zeros(words.size, dtype=_U)
        with process_errors(None, self.path):
            for a, b in _runs(words):
                buf = os.pread(self.fd, (b - a) * _WORD, int(words[a]) * _WORD)
                got = np.frombuffer(buf, dtype=_U, count=len(buf) // _WORD)
                values[a:a + got.size] = got  # past the last frame: nothing is idle
        bits = flat[real] & _U(63)
        out[real] = ((values[inverse] >> bits) & _U(1)) != 0
        return out.reshape(np.shape(pfns))

    def mark(self, pfns: np.ndarray) -> None:
        """Mark these frames idle (0 entries are skipped): one write per run of words."""
        flat = np.asarray(pfns, dtype=_U).reshape(-1)
        flat = flat[flat != 0]
        if flat.size == 0:
            return
        words, inverse = np.unique(flat >> _U(6), return_inverse=True)
        values = np.zeros(words.size, dtype=_U)
        np.bitwise_or.at(values, inverse, _U(1) << (flat & _U(63)))
        with process_errors(None, self.path):
            for a, b in _runs(words):
                os.pwrite(self.fd, values[a:b].tobytes(), int(words[a]) * _WORD)


def _runs(words: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) index ranges of consecutive word numbers in sorted unique `words`."""
    breaks = np.flatnonzero(np.diff(words) != 1) + 1
    firsts = np.concatenate(([0], breaks))
    lasts = np.concatenate((breaks, [words.size]))
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


def open_page_idle(path: str) -> PageIdle | None:
    """The bitmap where this kernel has idle page tracking and we may use it, else None."""
    if not os.path.exists(path):
        return None
    try:
        return PageIdle(path)
    except (AccessDenied, OSError):  # not ours to use: no access source, as where absent
        return None


class PageIdleSource:
    """kernel/access.py's AccessSource over the page_idle bitmap.

    The daemon (`mark`) marks the frames of a window it leaves idle, and its next visit reads
    which of them were touched since; a frame it never marked reads as referenced, as a
    freshly faulted page's young PTE does for the kernel. `scan` reads only: it marks nothing,
    so it changes no young bit the daemon or reclaim relies on. PG_referenced (kpageflags)
    counts too, as folio_test_referenced does for the kernel."""

    name = "page_idle"

    def __init__(self, idle: PageIdle, mark: bool = False) -> None:
        self.idle, self.mark = idle, mark

    def referenced(self, pagemap: np.ndarray, kflags: np.ndarray) -> np.ndarray:
        pfns = _present_pfns(pagemap)
        return ~self.idle.idle(pfns) | ((kflags & _U(KPF_REFERENCED)) != 0)

    def leave(self, pagemap: np.ndarray) -> None:
        if self.mark and pagemap.size:
            self.idle.mark(_present_pfns(pagemap))

    def close(self) -> None:
        self.idle.close()


def _present_pfns(pagemap: np.ndarray) -> np.ndarray:
    return np.where(pagemap >= _U(PM_PRESENT), pagemap & _U(PM_PFN_MASK), _U(0))
