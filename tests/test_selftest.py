"""The kernel's own khugepaged selftest as a judge: its scenarios, under three collapsers.

tools/testing/selftests/mm/khugepaged.c, written anew in this project's style: the process
it collapses is tests/selftest_proc.py (one area at the selftest's fixed address, changed step
by step on command), and the verdicts are the selftest's own checks of the memory afterwards,
read here independently of hugepaged: is the area PMD-mapped (smaps AnonHugePages for anon,
ShmemPmdMapped for shmem and files on tmpfs, FilePmdMapped for other files, equal to the
number of windows expected huge), and is every page's value intact.

Each scenario runs under the selftest's settings (enabled=madvise, defrag=always,
shmem_enabled=advise, khugepaged max_ptes_none=511, max_ptes_swap=64, max_ptes_shared=256,
pages_to_scan=4096, scan_sleep_millisecs=alloc_sleep_millisecs=10; per-size: PMD inherit,
the `-s` order always for anon and for shmem, every other size never) in four contexts, two
of the kernel's and hugepaged's two faces of them:

- `madvise`: the selftest's madvise context, the process's own MADV_COLLAPSE (at
  enabled=never and shmem_enabled=never, as the selftest pushes for it);
- `hugepaged_force`: the same, with `hugepaged collapse --pid P --force` making the call
  from outside (process_madvise) where the process made it (the command's entry point
  called in this process);
- `khugepaged`: the selftest's khugepaged context, the kernel's khugepaged: MADV_HUGEPAGE,
  wait until the range is huge or full_scans has advanced by two, MADV_NOHUGEPAGE, refault
  shared memory and files (a file collapse only retracts the page tables);
- `hugepaged`: the same context with the kernel's khugepaged paused and a hugepaged daemon
  (`--pid` the process, the selftest's tunables as --set) started after MADV_HUGEPAGE; the
  wait ends when the range is huge, or when the daemon has finished a full scan and settled
  the process (found nothing left to do): its first full scan already began after the
  advice, which is what the selftest's second full scan of the kernel's makes sure of.

Where the selftest writes a file it drops that file's page cache and sets the disk's
read_ahead_kb to 0; here the file's cache alone is dropped (POSIX_FADV_DONTNEED) and the
mapping is MADV_RANDOM, so that nothing machine-wide changes. One deviation:
madvise_retracted_page_tables lets a first scan collapse and leave the PMD cleared, then
asks for the PMD; where that first scan (hugepaged's: MADV_COLLAPSE) installed the PMD
already, the second step is not asked for, and the note says so.

The judge: wherever the kernel's khugepaged passes a scenario here, the daemon passes it;
wherever MADV_COLLAPSE does, `hugepaged collapse --force` does; no collapser ever corrupts a
page. The outcome of every context is appended, one JSON line per case, to
$HUGEPAGED_SELFTEST_OUT when set (the README's table).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kit.daemon_runner import Daemon, settled
from kit.helpers import (
    KHUGEPAGED_PAUSED,
    KHUGEPAGED_RUNNING,
    THP_DIR,
    machine_lock,
    read_counter,
    read_knob,
    saved_thp,
    smaps_vma,
    thp_pages_by_folio,
    zram_available,
    zram_swap,
)

from . import marks

pytestmark = marks.ORACLE

PROC = Path(__file__).resolve().parent / "selftest_proc.py"
PAGE = os.sysconf("SC_PAGESIZE")
HPAGE = 2 << 20
NR = HPAGE // PAGE
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTNEED, MADV_PAGEOUT = 14, 15, 4, 21
# The kernel's khugepaged is waited for as long as the selftest waits (3 s): where its two
# full scans take longer (other processes' memory in its list), the selftest's verdict is a
# timeout too. The daemon's wait ends once it settled the process; 10 s bounds a failure.
KERNEL_WAIT = 3.0
DAEMON_WAIT = 10.0
PMD_KB = HPAGE >> 10
BASE = 1 << 30  # where tests/selftest_proc.py maps its area (the selftest's BASE_ADDR)


class Fatal(Exception):
    """The selftest's exit(EXIT_FAILURE): a broken precondition or corrupted memory."""


# ---------------------------------------------------------------------------------------------
# The process


class Proc:
    """A running tests/selftest_proc.py: commands in, one JSON answer each."""

    def __init__(self) -> None:
        self.p = subprocess.Popen([sys.executable, str(PROC)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.p.pid  # the one that answers (the forked child after `fork`)
        self.parent = self.p.pid
        self._buf = b""

    def cmd(self, line: str, timeout: float = 60.0) -> dict:
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()
        return self.answer(timeout)

    def answer(self, timeout: float = 60.0) -> dict:
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"selftest process: no answer to in {timeout} s")
            data = os.read(fd, 65536)
            if not data:
                raise Fatal(f"selftest process exited: {self.p.stderr.read().decode()}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def must(self, line: str) -> dict:
        reply = self.cmd(line)
        if not reply.get("ok"):
            raise Fatal(f"{line}: {reply}")
        return reply

    def madvise(self, advice: int, start: int, length: int) -> int:
        return self.cmd(f"madvise {advice} {start} {length}")["errno"]

    def validate(self, start: int, end: int) -> None:
        reply = self.cmd(f"validate {start} {end}")
        if not reply["ok"]:
            raise Fatal(f"page {reply['bad']} is corrupted")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.p.stdin.close()
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdout, self.p.stderr):
            f.close()


# ---------------------------------------------------------------------------------------------
# mem_ops


@dataclass
class Ops:
    """The selftest's mem_ops: how an area is set up, faulted and checked for huge pages."""

    name: str  # anon | shmem | file
    fs: str = ""  # file: "tmpfs" or "ext4"
    dir: str = ""

    @property
    def is_tmpfs(self) -> bool:
        return self.name == "file" and self.fs == "tmpfs"

    def setup(self, proc: Proc, nr: int) -> None:
        path = f" {self.dir}/collapse_test_file" if self.name == "file" else ""
        proc.must(f"setup {self.name} {nr}{path}")

    def fault(self, proc: Proc, start: int, end: int) -> None:
        proc.must(f"fault {start} {end}")

    def check_huge(self, proc: Proc, nr: int) -> bool:
        key = {"anon": "AnonHugePages", "shmem": "ShmemPmdMapped"}.get(
            self.name, "ShmemPmdMapped" if self.is_tmpfs else "FilePmdMapped")
        vma = smaps_vma(proc.pid, BASE)
        return vma["start"] == BASE and vma.get(key, 0) == nr * PMD_KB


# ---------------------------------------------------------------------------------------------
# collapse contexts


@dataclass
class Run:
    """What one scenario came to under one context: its failed steps and skips."""

    fails: list[str] = field(default_factory=list)
    skipped: str = ""
    fatal: str = ""
    note: str = ""
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if self.fatal:
            return "error"
        if self.skipped:
            return "skip"
        return "fail" if self.fails else "pass"


class Context:
    name = ""
    enforce_pte_scan_limits = True

    def __init__(self, run: Run) -> None:
        self.run = run

    def fail(self, msg: str) -> None:
        self.run.fails.append(msg)

    def check(self, ok: bool, msg: str) -> None:
        if not ok:
            self.fail(msg)

    def sanity(self, proc: Proc, ops: Ops) -> None:
        if not ops.check_huge(proc, 0):
            raise Fatal("Unexpected huge page")

    def collapse(self, msg: str, proc: Proc, nr: int, ops: Ops, expect: bool) -> None:
        raise NotImplementedError

    def wait_for_scan(self, proc: Proc, nr: int, ops: Ops) -> bool:
        """True on timeout."""
        raise NotImplementedError


def madvise_collapse_now(c: Context, msg: str, proc: Proc, nr: int, ops: Ops,
                         expect: bool) -> None:
    """__madvise_collapse: at enabled=never, shmem_enabled=never (so that no khugepaged
    interferes, and MADV_COLLAPSE is seen to ignore them)."""
    with saved_thp(enabled="never", shmem_enabled="never"):
        proc.madvise(MADV_HUGEPAGE, 0, nr * HPAGE)  # clears VM_NOHUGEPAGE
        err = proc.cmd(f"collapse 0 {nr * HPAGE}")["errno"]
        if bool(err) == expect:
            c.fail(f"{msg}: bad return value (errno {err})")
        elif not ops.check_huge(proc, nr if expect else 0):
            c.fail(f"{msg}: check_huge()")


class Madvise(Context):
    name = "madvise"
    enforce_pte_scan_limits = False

    def collapse(self, msg, proc, nr, ops, expect):
        self.sanity(proc, ops)
        madvise_collapse_now(self, msg, proc, nr, ops, expect)

    def wait_for_scan(self, proc, nr, ops):  # madvise_retracted_page_tables: the kernel's
        return Khugepaged.wait_for_scan(self, proc, nr, ops)


class HugepagedForce(Context):
    """The madvise context with `hugepaged collapse --pid P --force` as the collapser: the
    same call, MADV_COLLAPSE's semantics, made from outside through process_madvise."""

    name = "hugepaged_force"
    enforce_pte_scan_limits = False

    def collapse(self, msg, proc, nr, ops, expect):
        self.sanity(proc, ops)
        with saved_thp(enabled="never", shmem_enabled="never"):
            proc.madvise(MADV_HUGEPAGE, 0, nr * HPAGE)  # the process's own step
            doc = collapse_force(proc.pid)
            got = {int(w["address"], 16): w["result"] for w in doc["windows"]}
            ours = [got.get(BASE + i * HPAGE) for i in range(nr)]
            ok = all(r == "SUCCEED" for r in ours)  # as madvise(MADV_COLLAPSE) returns 0
            if ok != expect:
                self.fail(f"{msg}: bad return value ({ours})")
            elif not ops.check_huge(proc, nr if expect else 0):
                self.fail(f"{msg}: check_huge()")

    def wait_for_scan(self, proc, nr, ops):  # madvise_retracted_page_tables: the kernel's
        return Khugepaged.wait_for_scan(self, proc, nr, ops)


class Khugepaged(Context):
    name = "khugepaged"

    def collapse(self, msg, proc, nr, ops, expect):
        if self.wait_for_scan(proc, nr, ops):
            if expect:
                self.fail(f"{msg}: timeout")
            return
        if ops.name != "anon":
            ops.fault(proc, 0, nr * HPAGE)
        ok = ops.check_huge(proc, nr if expect else 0)
        self.check(ok, msg)
        if not ok and expect and ops.name != "anon":  # what the refault mapped, for the table
            folios = thp_pages_by_folio(proc.pid, BASE, BASE + nr * HPAGE)
            self.run.note = f"after the refault, pages mapped by PTEs from 2 MiB folios: " \
                            f"{folios.get(NR, 0)} of {nr * NR}"

    def wait_for_scan(self, proc, nr, ops):
        self.sanity(proc, ops)
        proc.madvise(MADV_HUGEPAGE, 0, nr * HPAGE)
        timed_out = True
        with saved_thp(**KHUGEPAGED_RUNNING):  # the pace only (see selftest_settings)
            target = read_counter("full_scans") + 2
            deadline = time.monotonic() + KERNEL_WAIT
            while time.monotonic() < deadline:
                if ops.check_huge(proc, nr) or read_counter("full_scans") >= target:
                    timed_out = False
                    break
                time.sleep(0.01)
        proc.madvise(MADV_NOHUGEPAGE, 0, nr * HPAGE)
        return timed_out


class Hugepaged(Khugepaged):
    name = "hugepaged"

    def wait_for_scan(self, proc, nr, ops):
        self.sanity(proc, ops)
        proc.madvise(MADV_HUGEPAGE, 0, nr * HPAGE)
        timed_out = True
        with Daemon(pids=[proc.pid], sets=daemon_policy(), log_level="info") as d:
            deadline = time.monotonic() + DAEMON_WAIT
            while time.monotonic() < deadline:
                st = d.status()
                if ops.check_huge(proc, nr) or (st["counters"]["full_scans"] >= 1
                                                and settled(st, proc.pid)):
                    timed_out = False
                    break
                time.sleep(0.02)
        proc.madvise(MADV_NOHUGEPAGE, 0, nr * HPAGE)
        return timed_out


def collapse_force(pid: int) -> dict:
    """`hugepaged collapse --pid PID --force --json`, run in this process (the command's own
    entry point and output; a new interpreter for each of some forty calls would cost 0.5 s
    apiece)."""
    from hugepaged.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["collapse", "--pid", str(pid), "--force", "--json"])
    if rc != 0:
        raise Fatal(f"hugepaged collapse: {rc} {err.getvalue().strip()}")
    return json.loads(out.getvalue())


def daemon_policy() -> dict:
    """The selftest's settings as hugepaged's tunables: the khugepaged limits as the
    scenario has them now (some change them), its pace, its modes."""
    out = {k: read_knob(k) for k in ("max_ptes_none", "max_ptes_swap", "max_ptes_shared")}
    # max_memory_pressure off: the kernel's khugepaged has no such pause, and the swap cases'
    # own pageouts (or a test before them that thrashed) can hold PSI above the default 10%
    # for longer than the selftest waits.
    return {**out, "enabled": "madvise", "shmem_enabled": "advise", "pages_to_scan": NR * 8,
            "scan_sleep_millisecs": 10, "alloc_sleep_millisecs": 10, "defrag": 1,
            "max_memory_pressure": 0}


# ---------------------------------------------------------------------------------------------
# The scenarios, in the selftest's order


def alloc_hpage(proc: Proc, ops: Ops) -> None:
    """A PMD-mapped huge page in a VMA marked VM_HUGEPAGE, filled with the pattern."""
    ops.setup(proc, 1)
    ops.fault(proc, 0, HPAGE)
    if proc.cmd(f"collapse 0 {HPAGE}")["errno"] or not ops.check_huge(proc, 1):
        raise Fatal("Allocate huge page: MADV_COLLAPSE")
    if proc.madvise(MADV_HUGEPAGE, 0, HPAGE):
        raise Fatal("MADV_HUGEPAGE")


def check_swap(proc: Proc, size: int) -> bool:
    return smaps_vma(proc.pid, BASE).get("Swap", 0) == size >> 10


def collapse_full(c: Context, ops: Ops, proc: Proc) -> None:
    nr = 4
    ops.setup(proc, nr)
    ops.fault(proc, 0, nr * HPAGE)
    c.collapse("Collapse multiple fully populated PTE table", proc, nr, ops, True)
    proc.validate(0, nr * HPAGE)


def collapse_empty(c: Context, ops: Ops, proc: Proc) -> None:
    ops.setup(proc, 1)
    c.collapse("Do not collapse empty PTE table", proc, 1, ops, False)


def collapse_single_pte_entry(c: Context, ops: Ops, proc: Proc) -> None:
    ops.setup(proc, 1)
    ops.fault(proc, 0, PAGE)
    c.collapse("Collapse PTE table with single PTE entry present", proc, 1, ops, True)


def collapse_max_ptes_none(c: Context, ops: Ops, proc: Proc, order: int) -> None:
    max_ptes_none = NR // 2
    fault_nr = (1 << order) if ops.name == "anon" else 1
    with saved_thp(max_ptes_none=max_ptes_none):
        ops.setup(proc, 1)
        if ops.is_tmpfs:  # shmem pages are always in the page cache
            c.run.skipped = "tmpfs"
            return
        n = (NR - max_ptes_none - fault_nr) * PAGE
        ops.fault(proc, 0, n)
        c.collapse("Maybe collapse with max_ptes_none exceeded", proc, 1, ops,
                   not c.enforce_pte_scan_limits)
        proc.validate(0, n)
        if c.enforce_pte_scan_limits:
            n = (NR - max_ptes_none) * PAGE
            ops.fault(proc, 0, n)
            c.collapse("Collapse with max_ptes_none PTEs empty", proc, 1, ops, True)
            proc.validate(0, n)


def collapse_swapin_single_pte(c: Context, ops: Ops, proc: Proc) -> None:
    ops.setup(proc, 1)
    ops.fault(proc, 0, HPAGE)
    proc.madvise(MADV_PAGEOUT, 0, PAGE)
    if not check_swap(proc, PAGE):
        c.fail("Swapout one page")
        return
    c.collapse("Collapse with swapping in single PTE entry", proc, 1, ops, True)
    proc.validate(0, HPAGE)


def collapse_max_ptes_swap(c: Context, ops: Ops, proc: Proc) -> None:
    max_ptes_swap = int(read_knob("max_ptes_swap"))
    ops.setup(proc, 1)
    ops.fault(proc, 0, HPAGE)
    proc.madvise(MADV_PAGEOUT, 0, (max_ptes_swap + 1) * PAGE)
    if not check_swap(proc, (max_ptes_swap + 1) * PAGE):
        c.fail(f"Swapout {max_ptes_swap + 1} of {NR} pages")
        return
    c.collapse("Maybe collapse with max_ptes_swap exceeded", proc, 1, ops,
               not c.enforce_pte_scan_limits)
    proc.validate(0, HPAGE)
    if c.enforce_pte_scan_limits:
        ops.fault(proc, 0, HPAGE)
        proc.madvise(MADV_PAGEOUT, 0, max_ptes_swap * PAGE)
        if not check_swap(proc, max_ptes_swap * PAGE):
            c.fail(f"Swapout {max_ptes_swap} of {NR} pages")
            return
        c.collapse("Collapse with max_ptes_swap pages swapped out", proc, 1, ops, True)
        proc.validate(0, HPAGE)


def collapse_single_pte_entry_compound(c: Context, ops: Ops, proc: Proc) -> None:
    alloc_hpage(proc, ops)
    if ops.is_tmpfs:  # MADV_DONTNEED does not evict tmpfs pages
        c.run.skipped = "tmpfs"
        return
    proc.madvise(MADV_NOHUGEPAGE, 0, HPAGE)
    proc.madvise(MADV_DONTNEED, PAGE, HPAGE - PAGE)
    c.check(ops.check_huge(proc, 0), "Split huge page leaving single PTE mapping compound page")
    c.collapse("Collapse PTE table with single PTE mapping compound page", proc, 1, ops, True)
    proc.validate(0, PAGE)


def collapse_full_of_compound(c: Context, ops: Ops, proc: Proc) -> None:
    alloc_hpage(proc, ops)
    proc.madvise(MADV_NOHUGEPAGE, 0, PAGE)
    proc.madvise(MADV_NOHUGEPAGE, 0, HPAGE)
    c.check(ops.check_huge(proc, 0), "Split huge page leaving single PTE page table full of "
            "compound pages")
    c.collapse("Collapse PTE table full of compound pages", proc, 1, ops, True)
    proc.validate(0, HPAGE)


def collapse_compound_extreme(c: Context, ops: Ops, proc: Proc) -> None:
    ops.setup(proc, 1)
    proc.must("extreme")
    ops.fault(proc, 0, HPAGE)
    c.check(not ops.check_huge(proc, 1), "Construct PTE page table full of different "
            "PTE-mapped compound pages")
    c.collapse("Collapse PTE table full of different compound pages", proc, 1, ops, True)
    proc.validate(0, HPAGE)


@contextlib.contextmanager
def forked(proc: Proc):
    """The rest runs in a forked child (its answers, its pid) until it exits."""
    proc.pid = proc.must("fork")["pid"]
    try:
        yield
    finally:
        proc.cmd("exit")  # the child's answer
        status = proc.answer()  # the parent's, once the child is gone
        proc.pid = proc.parent
        if status.get("status"):
            raise Fatal(f"child exited with {status}")


def collapse_fork(c: Context, ops: Ops, proc: Proc) -> None:
    ops.setup(proc, 1)
    ops.fault(proc, 0, PAGE)
    c.check(ops.check_huge(proc, 0), "Allocate small page")
    with forked(proc):
        c.check(ops.check_huge(proc, 0), "Share small page over fork()")
        ops.fault(proc, PAGE, 2 * PAGE)
        c.collapse("Collapse PTE table with single page shared with parent process", proc, 1,
                   ops, True)
        proc.validate(0, PAGE)
    c.check(ops.check_huge(proc, 0), "Check if parent still has small page")
    proc.validate(0, PAGE)


def collapse_fork_compound(c: Context, ops: Ops, proc: Proc) -> None:
    alloc_hpage(proc, ops)
    with forked(proc):
        c.check(ops.check_huge(proc, 1), "Share huge page over fork()")
        proc.madvise(MADV_NOHUGEPAGE, 0, PAGE)
        proc.madvise(MADV_NOHUGEPAGE, 0, HPAGE)
        c.check(ops.check_huge(proc, 0), "Split huge page PMD in child process")
        ops.fault(proc, 0, PAGE)
        with saved_thp(max_ptes_shared=NR - 1):
            c.collapse("Collapse PTE table full of compound pages in child", proc, 1, ops,
                       True)
        proc.validate(0, HPAGE)
    c.check(ops.check_huge(proc, 1), "Check if parent still has huge page")
    proc.validate(0, HPAGE)


def collapse_max_ptes_shared(c: Context, ops: Ops, proc: Proc) -> None:
    max_ptes_shared = int(read_knob("max_ptes_shared"))
    alloc_hpage(proc, ops)
    with forked(proc):
        c.check(ops.check_huge(proc, 1), "Share huge page over fork()")
        ops.fault(proc, 0, (NR - max_ptes_shared - 1) * PAGE)
        c.check(ops.check_huge(proc, 0), f"Trigger CoW on page {NR - max_ptes_shared - 1}")
        c.collapse("Maybe collapse with max_ptes_shared exceeded", proc, 1, ops,
                   not c.enforce_pte_scan_limits)
        if c.enforce_pte_scan_limits:
            ops.fault(proc, 0, (NR - max_ptes_shared) * PAGE)
            c.check(ops.check_huge(proc, 0), f"Trigger CoW on page {NR - max_ptes_shared}")
            c.collapse("Collapse with max_ptes_shared PTEs shared", proc, 1, ops, True)
        proc.validate(0, HPAGE)
    c.check(ops.check_huge(proc, 1), "Check if parent still has huge page")
    proc.validate(0, HPAGE)


def madvise_collapse_existing_thps(c: Context, ops: Ops, proc: Proc) -> None:
    ops.setup(proc, 1)
    ops.fault(proc, 0, HPAGE)
    c.collapse("Collapse fully populated PTE table", proc, 1, ops, True)
    proc.validate(0, HPAGE)
    # c.collapse() would find a huge page and complain: straight to MADV_COLLAPSE.
    madvise_collapse_now(c, "Re-collapse PMD-mapped hugepage", proc, 1, ops, True)
    proc.validate(0, HPAGE)


def madvise_retracted_page_tables(c: Context, ops: Ops, proc: Proc) -> None:
    ops.setup(proc, 1)
    ops.fault(proc, 0, HPAGE)
    # Let the scanner (the context's own: the kernel's, or hugepaged) collapse first.
    if c.wait_for_scan(proc, 1, ops):
        c.fail("Collapse and leave PMD cleared: timeout")
        return
    if ops.check_huge(proc, 1):
        # hugepaged's collapse is MADV_COLLAPSE, which installs the PMD itself: the state
        # this scenario ends in is there already (the kernel's khugepaged clears the PMD).
        c.run.note = "PMD installed by the first scan"
    else:
        c.collapse("Install huge PMD from page cache", proc, 1, ops, True)
    proc.validate(0, HPAGE)


# ---------------------------------------------------------------------------------------------
# Settings, runs and the judge


def selftest_settings(order: int) -> dict:
    """The selftest's default_settings (thp_settings pushes every per-size control).

    While the kernel's khugepaged is waited for it runs flat out (pages_to_scan=65536,
    scan_sleep_millisecs=0) instead of at the selftest's pace (4096 every 10 ms): every
    process on this shared machine that ever gave MADV_HUGEPAGE is in its list, and at that
    pace its two full scans took longer than the selftest's 3 s wait. The pace decides no
    window's fate; hugepaged's daemon gets the selftest's pace."""
    out: dict = {"enabled": "madvise", "thp_defrag": "always", "shmem_enabled": "advise",
                 "defrag": 1, "alloc_sleep_millisecs": 10, "scan_sleep_millisecs": 10,
                 "max_ptes_none": NR - 1, "max_ptes_swap": NR // 8,
                 "max_ptes_shared": NR // 2, "pages_to_scan": NR * 8}
    pmd_dir = f"hugepages-{PMD_KB}kB"
    for d in sorted(THP_DIR.glob("hugepages-*kB")):
        kb = int(d.name[10:-2])
        size_order = (kb * 1024 // PAGE).bit_length() - 1
        mode = "inherit" if d.name == pmd_dir else "always" if size_order == order else "never"
        for knob in ("enabled", "shmem_enabled"):
            if (d / knob).exists():
                out[f"{d.name}/{knob}"] = mode
    return out


SCENARIOS = {
    "collapse_full": (collapse_full, ("anon", "file", "shmem")),
    "collapse_empty": (collapse_empty, ("anon",)),
    "collapse_single_pte_entry": (collapse_single_pte_entry, ("anon", "file", "shmem")),
    "collapse_max_ptes_none": (collapse_max_ptes_none, ("anon", "file")),
    "collapse_single_pte_entry_compound": (collapse_single_pte_entry_compound,
                                           ("anon", "file")),
    "collapse_full_of_compound": (collapse_full_of_compound, ("anon", "file", "shmem")),
    "collapse_compound_extreme": (collapse_compound_extreme, ("anon",)),
    "collapse_swapin_single_pte": (collapse_swapin_single_pte, ("anon",)),
    "collapse_max_ptes_swap": (collapse_max_ptes_swap, ("anon",)),
    "collapse_fork": (collapse_fork, ("anon",)),
    "collapse_fork_compound": (collapse_fork_compound, ("anon",)),
    "collapse_max_ptes_shared": (collapse_max_ptes_shared, ("anon",)),
    "madvise_collapse_existing_thps": (madvise_collapse_existing_thps,
                                       ("anon", "file", "shmem")),
    "madvise_retracted_page_tables": (madvise_retracted_page_tables, ("file", "shmem")),
}
SWAP = {"collapse_swapin_single_pte", "collapse_max_ptes_swap"}
CONTEXTS = (Madvise, HugepagedForce, Khugepaged, Hugepaged)
# Scenarios whose area is made one PMD-mapped THP (alloc_hpage's MADV_COLLAPSE, or a fault
# with MADV_HUGEPAGE) before anything is collapsed: the `-s` fault size is gone by then.
HUGE_FIRST = {"collapse_single_pte_entry_compound", "collapse_full_of_compound",
              "collapse_compound_extreme", "collapse_fork_compound",
              "collapse_max_ptes_shared"}


def cases():
    """(scenario, mem, order): every scenario the selftest runs for a memory type at order 0
    (4 KiB faults) and at order 2 (`-s 2`: 16 KiB mTHP faults), where the order changes
    anything: files are written through write() into a huge=advise tmpfs, so their page
    cache is the same at either order, and HUGE_FIRST areas are one THP before any
    collapse. Files on ext4 once: no collapser can take them here."""
    for name, (_, mems) in SCENARIOS.items():
        for mem in mems:
            for order in (0, 2):
                if order and (mem == "file" or name in HUGE_FIRST):
                    continue
                yield pytest.param(name, mem, order, id=f"{name}-{mem}-s{order}")
    yield pytest.param("collapse_full", "file-ext4", 0, id="collapse_full-file-ext4-s0")


@pytest.fixture(scope="module", autouse=True)
def _one_stretch():
    """The machine lock once for the module (about a minute), not once per case: between
    cases other users of the lock would keep a case waiting far longer than it runs."""
    with machine_lock():
        yield


@pytest.fixture(scope="module")
def tmpfs_dir():
    """A tmpfs of our own, mounted huge=advise (the selftest's requirement for its tmpfs
    file cases), at a path outside /dev/shm; unmounted afterwards."""
    d = tempfile.mkdtemp(prefix="hugepaged-selftest-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=advise,size=64m", "tmpfs", d],
                   check=True, capture_output=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False, capture_output=True)
        os.rmdir(d)


def run_one(ctx_cls, scenario: str, ops: Ops, order: int) -> Run:
    run = Run()
    fn = SCENARIOS[scenario][0]
    t0 = time.monotonic()
    proc = Proc()
    try:
        c = ctx_cls(run)
        if scenario == "collapse_max_ptes_none":
            fn(c, ops, proc, order)
        else:
            fn(c, ops, proc)
    except Fatal as e:
        run.fatal = str(e)
    finally:
        proc.close()
        run.seconds = round(time.monotonic() - t0, 2)
        if ops.name == "file":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{ops.dir}/collapse_test_file")
    return run


@contextlib.contextmanager
def context_settings(ctx_cls):
    """The kernel's khugepaged runs at the selftest's pace, except under hugepaged: paused
    there, after a first process registered (registering into an empty list would wake it
    for one pass)."""
    if ctx_cls is not Hugepaged:
        yield
        return
    with saved_thp(**KHUGEPAGED_PAUSED):
        sentinel = Proc()
        try:
            sentinel.must("setup anon 1")
            sentinel.must(f"fault 0 {PAGE}")
            sentinel.madvise(MADV_HUGEPAGE, 0, HPAGE)
            time.sleep(0.05)
            yield
        finally:
            sentinel.close()


@pytest.mark.parametrize(("scenario", "mem", "order"), list(cases()))
def test_selftest_case(scenario, mem, order, tmpfs_dir, tmp_path):
    if order and not (THP_DIR / f"hugepages-{(PAGE << order) >> 10}kB").is_dir():
        pytest.skip(f"no {(PAGE << order) >> 10} KiB mTHP size on this kernel")
    if scenario in SWAP and not zram_available():
        pytest.skip("no /dev/zram0 or mkswap: the swap cases need a swap device")
    ops = Ops("file", "ext4", str(tmp_path)) if mem == "file-ext4" \
        else Ops(mem, "tmpfs", tmpfs_dir)
    swap = zram_swap("256M") if scenario in SWAP else contextlib.nullcontext()
    runs: dict[str, Run] = {}
    with saved_thp(**selftest_settings(order)), swap:
        for ctx_cls in CONTEXTS:
            with context_settings(ctx_cls):
                runs[ctx_cls.name] = run_one(ctx_cls, scenario, ops, order)
    outcomes = {k: r.outcome for k, r in runs.items()}
    notes = {k: [*r.fails, r.note] if r.note and r.fails else r.fails or r.fatal or r.skipped
             or r.note for k, r in runs.items()}
    out = os.environ.get("HUGEPAGED_SELFTEST_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"scenario": scenario, "mem": mem, "order": order,
                                "outcomes": outcomes, "notes": notes,
                                "seconds": {k: r.seconds for k, r in runs.items()}}) + "\n")
    corrupted = {k: r.fatal for k, r in runs.items() if "corrupted" in r.fatal}
    assert not corrupted, f"memory corrupted: {corrupted}"
    # hugepaged's two faces against the kernel's two collapsers: the daemon where the
    # kernel's khugepaged passes, `collapse --force` where MADV_COLLAPSE does.
    if outcomes["khugepaged"] == "pass":
        assert outcomes["hugepaged"] == "pass", f"{outcomes}; {notes}"
    if outcomes["madvise"] == "pass":
        assert outcomes["hugepaged_force"] == "pass", f"{outcomes}; {notes}"
