"""Helpers for hugepaged's tests: real workload processes, kernel THP knobs, independent checks.

Never imports hugepaged: the checks here (pagemap + kpageflags, smaps) are written separately
from the product code on purpose, so that the tests do not share its mistakes.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORKLOAD = Path(__file__).resolve().parent / "workload.py"

PAGE = 4096
HPAGE = 2 * 1024 * 1024
PAGES_PER_WINDOW = HPAGE // PAGE

THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
KHUGEPAGED_DIR = THP_DIR / "khugepaged"


# --------------------------------------------------------------------------------------------
# Workload processes


@dataclass
class Region:
    name: str
    start: int
    end: int
    windows: int
    touched: list[int] = field(default_factory=list)
    zero: list[int] = field(default_factory=list)
    kind: str = "private"
    fd: int | None = None

    def window_start(self, i: int) -> int:
        return self.start + i * HPAGE

    def page_addr(self, window: int, page: int) -> int:
        return self.start + window * HPAGE + page * PAGE


class Workload:
    """A running ``kit/workload.py``; see that file for the spec.

    ``Workload({"regions": [...], "fork_child": True})`` or ``Workload(regions=[...])``.
    Use as a context manager; the process (and its forked child) are gone after the block.
    `preexec`: called in the child before it runs (to put it in a cgroup, say).
    """

    def __init__(self, spec: dict | None = None, *, timeout: float = 120.0, preexec=None,
                 **kwargs):
        spec = dict(spec or {})
        spec.update(kwargs)
        self.spec = spec
        self.timeout = timeout
        self.preexec = preexec
        self.proc: subprocess.Popen | None = None
        self.pid: int = 0
        self.child_pid: int | None = None
        self.regions: dict[str, Region] = {}
        self.setup_seconds: float | None = None
        self._child_pidfd: int | None = None
        self._stderr = None
        self._buf = b""

    # -- lifecycle

    def start(self) -> Workload:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKLOAD), json.dumps(self.spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            preexec_fn=self.preexec,
        )
        try:
            info = self._read_json(self.timeout)
        except BaseException:
            self.close()
            raise
        self.pid = info["pid"]
        self.child_pid = info.get("child_pid")
        self.setup_seconds = info.get("setup_seconds")
        if self.child_pid:
            # The child waits for its parent to die, so it is alive here: a pidfd taken now
            # can never signal a recycled pid later.
            with contextlib.suppress(ProcessLookupError):
                self._child_pidfd = os.pidfd_open(self.child_pid)
        self.regions = {
            name: Region(name=name, start=r["start"], end=r["end"],
                         windows=(r["end"] - r["start"]) // HPAGE,
                         touched=list(r["touched"]), zero=list(r["zero"]),
                         kind=r.get("kind", "private"), fd=r.get("fd"))
            for name, r in info["regions"].items()
        }
        return self

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(b"exit\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    if f is not None:
                        f.close()
        self._kill_child()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _kill_child(self) -> None:
        fd = self._child_pidfd
        if fd is None:
            return
        self._child_pidfd = None
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            # Readable once the child has exited (it dies with its parent anyway).
            select.select([fd], [], [], 5)
        finally:
            os.close(fd)

    # -- commands

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _read_json(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workload {self.proc.pid}: no answer in {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                self.proc.wait(timeout=5)
                raise RuntimeError(
                    f"workload exited with status {self.proc.returncode}: {self.stderr_text()}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def command(self, line: str, timeout: float | None = None) -> dict:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_json(self.timeout if timeout is None else timeout)

    def verify(self) -> None:
        """Raise AssertionError unless every written page and every zero page is intact."""
        answer = self.command("verify")
        if not answer.get("ok"):
            raise AssertionError(
                f"workload {self.pid} memory differs; first (region, window, page): "
                f"{answer.get('bad')}")

    def touch(self, name: str) -> None:
        answer = self.command(f"touch {name}")
        if not answer.get("ok"):
            raise RuntimeError(f"touch {name}: {answer}")


# --------------------------------------------------------------------------------------------
# Kernel THP knobs


def _knob_path(name: str) -> Path:
    if name in ("enabled", "shmem_enabled"):
        return THP_DIR / name
    if name == "thp_defrag":  # the global one; "defrag" is khugepaged's
        return THP_DIR / "defrag"
    if name in {"pages_collapsed", "full_scans"}:
        raise ValueError(f"{name} is a read-only counter")
    if re.fullmatch(r"hugepages-\d+kB/(shmem_)?enabled", name):  # a per-size control
        path = THP_DIR / name
        if not path.exists():
            raise ValueError(f"unknown THP knob {name!r}")
        return path
    path = KHUGEPAGED_DIR / name
    if "/" in name or not path.exists():
        raise ValueError(f"unknown THP knob {name!r}")
    return path


def _read_knob(path: Path) -> str:
    text = path.read_text().strip()
    m = re.search(r"\[(\w[\w+]*)\]", text)
    return m.group(1) if m else text


def _write_knob(path: Path, value) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read_enabled() -> str:
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled."""
    return _read_knob(THP_DIR / "enabled")


def read_knob(name: str) -> str:
    return _read_knob(_knob_path(name))


def write_knob(name: str, value) -> None:
    """Write one THP knob (the names of _saved_thp); the caller restores it (saved_thp)."""
    _write_knob(_knob_path(name), value)


def knob_snapshot() -> dict[str, str]:
    """Every THP knob a test may change (by the names of _saved_thp), and the swap devices:
    what a kernel test must leave as it found it."""
    names = ["enabled", "shmem_enabled", "thp_defrag"]
    names += sorted(p.name for p in KHUGEPAGED_DIR.iterdir()
                    if p.name not in {"pages_collapsed", "full_scans"})
    for size in sorted(THP_DIR.glob("hugepages-*kB")):
        names += [f"{size.name}/{f}" for f in ("enabled", "shmem_enabled")
                  if (size / f).exists()]
    out = {n: read_knob(n) for n in names}
    out["nr_hugepages"] = NR_HUGEPAGES.read_text().strip()
    with open("/proc/swaps") as f:
        out["swaps"] = " ".join(sorted(line.split()[0] for line in f.readlines()[1:]))
    return out


def restore_knobs(saved: dict[str, str]) -> None:
    """Write back the knobs of a knob_snapshot() that differ now (swap is only reported)."""
    now = knob_snapshot()
    for name, value in saved.items():
        if name == "nr_hugepages" and now.get(name) != value:
            _write_knob(NR_HUGEPAGES, value)
        elif name not in ("swaps", "nr_hugepages") and now.get(name) != value:
            write_knob(name, value)


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def meminfo_kb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class HugetlbPool:
    """The hugetlb pool as a taker of free 2 MiB blocks. Pool pages are neither free nor
    movable: while held, no allocation or compaction can use their blocks."""

    def __init__(self, keep_free_mib: int) -> None:
        self.keep_free_mib = keep_free_mib
        self.saved = NR_HUGEPAGES.read_text().strip()

    def grow(self, n: int) -> int:
        """Ask the kernel for n more pool pages (it takes free blocks and compacts movable
        memory into more, stopping where it cannot, or where MemFree would go under
        keep_free_mib); the pool's size."""
        room = (meminfo_kb("MemFree") - self.keep_free_mib * 1024) // 2048
        _write_knob(NR_HUGEPAGES, int(NR_HUGEPAGES.read_text()) + max(0, min(n, room)))
        return int(NR_HUGEPAGES.read_text())

    def release(self) -> None:
        """Give the pool back (its size as found), SIGINT held off meanwhile."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            _write_knob(NR_HUGEPAGES, self.saved)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def hugetlb_pool(keep_free_mib: int) -> Iterator[HugetlbPool]:
    """A HugetlbPool, given back afterwards whatever happens (under the machine lock)."""
    with machine_lock():
        pool = HugetlbPool(keep_free_mib)
        try:
            yield pool
        finally:
            pool.release()


def read_counter(name: str) -> int:
    """One of khugepaged's counters: pages_collapsed or full_scans."""
    return int((KHUGEPAGED_DIR / name).read_text())


# The kernel's khugepaged as an oracle: paused while a test lays out its workload, then run
# flat out (in this order of writes: the sleep's write wakes it) for two full scans.
KHUGEPAGED_PAUSED = {"pages_to_scan": 1, "scan_sleep_millisecs": 4294967295}
KHUGEPAGED_RUNNING = {"pages_to_scan": 65536, "scan_sleep_millisecs": 0}


def khugepaged_full_scans(n: int = 2, timeout: float = 30.0) -> float:
    """Run the kernel's khugepaged until full_scans has advanced by n; its seconds."""
    start, t0 = read_counter("full_scans"), time.monotonic()
    with saved_thp(**KHUGEPAGED_RUNNING):
        while read_counter("full_scans") < start + n:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"khugepaged's full_scans went {start} -> "
                                     f"{read_counter('full_scans')} in {timeout} s")
            time.sleep(0.01)
    return time.monotonic() - t0


_LOCK_PATH = "/run/lock/hugepaged-tests.lock"
_lock_state = {"depth": 0, "fd": -1}


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """Serialise everything that changes or depends on the kernel's THP state.

    Reentrant within a process; across processes (parallel test runs, benchmarks) an flock.
    """
    if _lock_state["depth"] == 0:
        os.makedirs(os.path.dirname(_LOCK_PATH), exist_ok=True)
        fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _lock_state["fd"] = fd
    _lock_state["depth"] += 1
    try:
        yield
    finally:
        _lock_state["depth"] -= 1
        if _lock_state["depth"] == 0:
            os.close(_lock_state["fd"])  # closing drops the flock
            _lock_state["fd"] = -1


@contextlib.contextmanager
def saved_thp(**values) -> Iterator[dict[str, str]]:
    """Like _saved_thp, holding the machine lock throughout."""
    with machine_lock(), _saved_thp(**values) as saved:
        yield saved


@contextlib.contextmanager
def _saved_thp(**values) -> Iterator[dict[str, str]]:
    """Set THP knobs for the block and restore them afterwards, whatever happens.

    Keys: ``enabled``, ``thp_defrag`` (the global defrag) and any knob name under
    khugepaged/ (``pages_to_scan``, ``max_ptes_none``, ``defrag``, ...). Yields the saved values.
    """
    paths = {name: _knob_path(name) for name in values}  # every name checked before any write
    saved: dict[str, str] = {}
    try:
        for name, value in values.items():
            saved[name] = _read_knob(paths[name])
            _write_knob(paths[name], value)
        yield dict(saved)
    finally:
        # Restore with SIGINT held off, so that a second Ctrl-C cannot cut it short.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        errors = []
        try:
            for name in reversed(list(saved)):
                try:
                    _write_knob(paths[name], saved[name])
                except OSError as e:
                    errors.append(f"{name}={saved[name]}: {e}")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if errors:
            raise RuntimeError(f"could not restore THP knobs: {errors}")


# --------------------------------------------------------------------------------------------
# Independent checks: pagemap, kpageflags, smaps

PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61
PM_EXCLUSIVE = 1 << 56
PM_PFN_MASK = (1 << 55) - 1

KPF_ANON = 1 << 12
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24


def pagemap(pid: int, start: int, end: int) -> np.ndarray:
    """The raw pagemap entries (uint64) of [start, end), one per 4 KiB page."""
    n = (end - start) // PAGE
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, n * 8, (start // PAGE) * 8)
    finally:
        os.close(fd)
    if len(data) != n * 8:
        raise OSError(f"short pagemap read for {pid}: {len(data)} of {n * 8} bytes")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def kpageflags(pfns) -> np.ndarray:
    """/proc/kpageflags words for the given PFNs."""
    pfns = [int(p) for p in np.atleast_1d(pfns)]
    out = np.zeros(len(pfns), dtype=np.uint64)
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        for i, pfn in enumerate(pfns):
            out[i] = int.from_bytes(os.pread(fd, 8, pfn * 8), "little")
    finally:
        os.close(fd)
    return out


def _per_window(entries: np.ndarray) -> np.ndarray:
    if entries.size % PAGES_PER_WINDOW:
        raise ValueError("range is not a whole number of 2 MiB windows")
    return entries.reshape(-1, PAGES_PER_WINDOW)


def present_per_window(pid: int, start: int, end: int) -> list[int]:
    e = _per_window(pagemap(pid, start, end))
    return [int(c) for c in ((e & np.uint64(PM_PRESENT)) != 0).sum(axis=1)]


def exclusive_per_window(pid: int, start: int, end: int) -> list[int]:
    """Present pages with the exclusively-mapped bit (56) set, per 2 MiB window."""
    e = _per_window(pagemap(pid, start, end))
    present = (e & np.uint64(PM_PRESENT)) != 0
    excl = (e & np.uint64(PM_EXCLUSIVE)) != 0
    return [int(c) for c in (present & excl).sum(axis=1)]


def pmd_mapped_windows(pid: int, start: int, end: int) -> list[bool]:
    """Per 2 MiB window of [start, end): is it mapped by one PMD-sized anonymous THP?

    All 512 entries present, PFNs consecutive from a 512-aligned first PFN, and that first frame
    has KPF_COMPOUND_HEAD and KPF_THP (and is not the huge zero page). Needs root (PFNs).
    """
    if start % HPAGE or end % HPAGE:
        raise ValueError("start and end must be 2 MiB-aligned")
    e = _per_window(pagemap(pid, start, end))
    present = ((e & np.uint64(PM_PRESENT)) != 0).all(axis=1)
    pfn = e & np.uint64(PM_PFN_MASK)
    if present.any() and not pfn[present].any():
        raise PermissionError("pagemap shows no PFNs: CAP_SYS_ADMIN needed")
    steps = np.arange(PAGES_PER_WINDOW, dtype=np.uint64)
    consecutive = (pfn == pfn[:, :1] + steps).all(axis=1)
    aligned = (pfn[:, 0] % np.uint64(PAGES_PER_WINDOW)) == 0
    candidate = present & consecutive & aligned
    result = [False] * len(candidate)
    idx = np.flatnonzero(candidate)
    if idx.size:
        flags = kpageflags(pfn[idx, 0])
        for i, f in zip(idx, flags, strict=True):
            f = int(f)
            result[int(i)] = bool(f & KPF_COMPOUND_HEAD and f & KPF_THP
                                  and not f & KPF_ZERO_PAGE)
    return result


def thp_pages_by_folio(pid: int, start: int, end: int) -> dict[int, int]:
    """Pages of [start, end) mapped from THP folios, by folio size in pages.

    Page by page: a mapped frame with KPF_THP is walked back to its COMPOUND_HEAD and the
    folio's size is one plus the tails after the head (the way tools/mm/thpmaps tells a
    folio's order). Slow; for test-sized ranges.
    """
    e = pagemap(pid, start, end)
    present = (e & np.uint64(PM_PRESENT)) != 0
    pfns = (e & np.uint64(PM_PFN_MASK))[present]
    flags = {int(p): int(f) for p, f in zip(pfns, kpageflags(pfns), strict=True)}

    def flag(pfn: int) -> int:
        if pfn not in flags:
            flags[pfn] = int(kpageflags([pfn])[0])
        return flags[pfn]

    sizes: dict[int, int] = {}  # head pfn -> size
    out: dict[int, int] = {}
    for pfn in (int(p) for p in pfns):
        f = flag(pfn)
        if not f & KPF_THP or not f & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL):
            continue
        head = pfn
        while not flag(head) & KPF_COMPOUND_HEAD:
            head -= 1
        if head not in sizes:
            n = 1
            while n < PAGES_PER_WINDOW and flag(head + n) & KPF_COMPOUND_TAIL:
                n += 1
            sizes[head] = n
        out[sizes[head]] = out.get(sizes[head], 0) + 1
    return out


_VMA_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s")


def smaps_vma(pid: int, addr: int) -> dict:
    """The /proc/PID/smaps entry of the VMA containing addr.

    Returns {"start", "end", "header", "VmFlags": set of flags, and every "Key": int kB (or str)}.
    """
    vma: dict | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _VMA_HEADER.match(line)
            if m:
                if vma is not None:
                    break
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                if lo <= addr < hi:
                    vma = {"start": lo, "end": hi, "header": line.rstrip("\n")}
                continue
            if vma is None:
                continue
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "VmFlags":
                vma["VmFlags"] = set(value.split())
            elif value.endswith(" kB"):
                vma[key] = int(value[:-3])
            else:
                vma[key] = value
    if vma is None:
        raise LookupError(f"no VMA of {pid} contains {addr:#x}")
    return vma


def anon_huge_kb(pid: int, start: int) -> int:
    """AnonHugePages (kB) of the VMA containing start, from /proc/PID/smaps."""
    return int(smaps_vma(pid, start).get("AnonHugePages", 0))


def vm_flags(pid: int, addr: int) -> set[str]:
    return smaps_vma(pid, addr).get("VmFlags", set())


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


# libc with the prototypes of the memory calls the helpers and tests make themselves.
libc = _libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_COLLAPSE = 25


def drain_lru() -> None:
    """lru_add_drain_all(), as the kernel's khugepaged does at the start of every pass.

    A freshly faulted page sits in a per-CPU LRU batch (KPF_LRU clear) until that batch is
    drained. madvise_collapse() drains every CPU first, so collapsing one page of our own
    memory does it. Tests start from the state khugepaged would see;
    test_kernel_scan.test_fresh_page_in_lru_batch checks hugepaged without it.
    """
    base = _libc.mmap(None, 2 * HPAGE, 3, 0x22, -1, 0)  # PROT_READ|WRITE, PRIVATE|ANONYMOUS
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        addr = (base + HPAGE - 1) & ~(HPAGE - 1)
        ctypes.c_char.from_address(addr).value = b"x"
        if _libc.madvise(addr, HPAGE, MADV_COLLAPSE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"MADV_COLLAPSE (to drain LRU batches): {os.strerror(err)}")
    finally:
        _libc.munmap(base, 2 * HPAGE)


ZRAM = Path("/sys/block/zram0")


def zram_available() -> bool:
    return ZRAM.is_dir() and Path("/dev/zram0").exists() and subprocess.run(
        ["which", "mkswap"], capture_output=True).returncode == 0


@contextlib.contextmanager
def zram_swap(size: str = "1G") -> Iterator[None]:
    """/dev/zram0 as a swap device for the block, under the machine lock; swapped off and
    reset afterwards, also when the block fails. Refuses if zram0 is in use already."""
    with machine_lock():
        if (ZRAM / "disksize").read_text().strip() != "0" or "/dev/zram0" in Path(
                "/proc/swaps").read_text():
            raise RuntimeError("/dev/zram0 is in use already")
        try:
            (ZRAM / "disksize").write_text(size)
            subprocess.run(["mkswap", "/dev/zram0"], check=True, capture_output=True)
            subprocess.run(["swapon", "/dev/zram0"], check=True, capture_output=True)
            yield
        finally:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                subprocess.run(["swapoff", "/dev/zram0"], capture_output=True)
                (ZRAM / "reset").write_text("1")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
