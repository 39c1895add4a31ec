"""The registry (mm_slot list) and the pass (khugepaged_do_scan / khugepaged_scan_mm_slot).

The pass runs against a fixture kernel: a /proc whose processes, VMAs and per-window page
counts the test lays out, so that progress and cursor positions can be checked exactly against
khugepaged's accounting (progress++ on entry, +1 per VMA skipped, +HPAGE_PMD_NR per window,
stop once progress >= pages_to_scan). The slots still hold real pidfds of real (sleeping)
processes, so exits are the kernel's, not the fixture's.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import pytest

from hugepaged.collapse import MAX_BATCH, CollapseOutcome, Pace, result_of_errno
from hugepaged.collapse import path as collapse_path
from hugepaged.daemon import workers
from hugepaged.daemon.khugepaged import Khugepaged
from hugepaged.daemon.registry import RESCAN_MAX, RESCAN_MIN, SETTLE_MAX, SETTLE_MIN, Registry
from hugepaged.errors import ProcessGone
from hugepaged.kernel.geometry import Geometry
from hugepaged.kernel.procfs import PF_KTHREAD, ProcStat, ProcStatus, Vma
from hugepaged.kernel.sysfs import MmStats
from hugepaged.results import ScanResult
from hugepaged.scan.decide import Verdicts
from hugepaged.scan.eligibility import ineligible
from hugepaged.tunables import Tunables

HP = 2 << 20
NR = 512
BASE = 0x7F0000000000


# --------------------------------------------------------------------------------------------
# Real processes to hold pidfds of


@pytest.fixture
def sleepers():
    """spawn(n) -> n pids of real `sleep` processes; all killed at the end."""
    procs: list[subprocess.Popen] = []

    def spawn(n: int = 1) -> list[int]:
        new = [subprocess.Popen(["sleep", "300"]) for _ in range(n)]
        procs.extend(new)
        return [p.pid for p in new]

    def kill(pid: int) -> None:
        for p in procs:
            if p.pid == pid:
                p.kill()
                p.wait()

    spawn.kill = kill  # type: ignore[attr-defined]
    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------------------------
# The fixture kernel


def anon(start: int, windows: int, hg: bool = True, path: str = "") -> Vma:
    flags = {"rd", "wr", "mr", "mw", "me", "ac"} | ({"hg"} if hg else set())
    return Vma(start, start + windows * HP, "rw-p", 0, 0, path, frozenset(flags))


def filemap(start: int, pages: int = 16) -> Vma:
    return Vma(start, start + pages * 4096, "r--p", 0, 1234, "/usr/lib/libc.so.6",
               frozenset({"rd", "mr", "mw", "me"}))


@dataclass
class FakeProcess:
    comm: str
    vmas: list[Vma]
    present: dict[int, int] = field(default_factory=dict)  # window address -> pages present
    huge: set[int] = field(default_factory=set)
    zero: dict[int, int] = field(default_factory=dict)  # window address -> zero-page PTEs
    cgroup2: str = "/"
    minflt: int = 0
    flags: int = 0
    gone: bool = False
    vsize: int = 1 << 30

    def fill(self, vma: Vma, pages: int = NR) -> None:
        for a in range(vma.start, vma.end, HP):
            self.present[a] = pages


class FakeProcFS:
    def __init__(self) -> None:
        self.procs: dict[int, FakeProcess] = {}

    def _get(self, pid: int) -> FakeProcess:
        p = self.procs.get(pid)
        if p is None or p.gone:
            raise ProcessGone(f"pid {pid}: process has exited")
        return p

    def pids(self) -> list[int]:
        return sorted(pid for pid, p in self.procs.items() if not p.gone)

    def stat(self, pid: int) -> ProcStat:
        p = self._get(pid)
        return ProcStat(pid, p.comm, "S", p.flags, p.minflt, 0, 0, 0, 0,
                        sum(p.present.values()), p.vsize)

    def status(self, pid: int) -> ProcStatus:
        p = self._get(pid)
        return ProcStatus(p.comm, pid, True, 0, 0)

    def smaps(self, pid: int) -> list[Vma]:
        """The VMAs with their Anonymous and AnonHugePages kB as the windows are now."""
        p = self._get(pid)
        out = []
        for v in p.vmas:
            starts = range(v.start, v.end, HP) if v.size >= HP else []
            anon = sum(p.present.get(a, 0) for a in starts) * 4
            huge = sum(HP >> 10 for a in starts if a in p.huge)
            out.append(replace(v, anonymous_kb=anon, anon_huge_kb=huge))
        return out

    def smaps_each(self, pid: int):
        yield from self.smaps(pid)

    def cgroup2(self, pid: int) -> str:
        return self._get(pid).cgroup2

    def cgroups(self, pid: int) -> list[str]:
        return [self._get(pid).cgroup2]

    def maps_text(self, pid: int) -> str:
        return "".join(f"{v.start:x}-{v.end:x} {v.perms} 0 0:0 {v.inode}\n"
                       for v in self._get(pid).vmas)


class FakeMm:
    def __init__(self) -> None:
        self.free = 1000
        self.nodes = {0}  # with more: free_by_node, and the node every window's pages are on
        self.free_by_node: dict[int, int] = {}
        self.window_node = 0

    def free_huge_blocks(self, nodes: set[int] | None = None) -> int:
        if nodes is None:
            return self.free
        return sum(self.free_by_node.get(n, 0) for n in nodes)

    def numa_nodes(self) -> set[int]:
        return self.nodes

    def window_nodes(self, entries) -> set[int]:
        return {self.window_node}


class FakePageMap:
    def __enter__(self) -> FakePageMap:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read(self, start: int, end: int) -> np.ndarray:
        return np.zeros((end - start) // HP * NR, dtype=np.uint64)


class FakeKernel:
    def __init__(self) -> None:
        self.procfs = FakeProcFS()
        self.mm = FakeMm()
        self.scans: list[tuple[int, int, int]] = []  # (pid, start, end) of decide_range calls
        self.geometry = Geometry()
        # The kernel's per-size nr_anon: no mTHP folio on the machine, so nothing is counted;
        # its underused-THP shrinker off unless a test turns it on.
        self.shrinker: int | None = None  # the kernel's max_ptes_none while shrink_underused
        # PSI memory `some avg10`: the machine's and per cgroup2 group (none: no pressure).
        self.psi = 0.0
        self.psi_cgroups: dict[str, float] = {}
        self.pressure = SimpleNamespace(machine=lambda: self.psi,
                                        cgroup=lambda path: self.psi_cgroups.get(path))
        self.thp = SimpleNamespace(nr_anon=lambda: {16: 0, 64: 0, 2048: 0},
                                   shrink_underused=lambda: self.shrinker is not None,
                                   read=lambda name: self.shrinker)

    def pagemap(self, pid: int) -> FakePageMap:
        return FakePageMap()

    def kpageflags(self):
        return SimpleNamespace(close=lambda: None)

    def access_source(self, mark: bool = False) -> None:
        return None  # no access source: the young-bit check is not applied

    def drain_lru(self) -> None:
        self.drains = getattr(self, "drains", 0) + 1


class FakeScanner:
    """ProcessScanner over the fixture: a window's code from its present count and the limits;
    eligibility is the real one."""

    def __init__(self, kernel: FakeKernel, pid: int, kpf, control, referenced=None) -> None:
        self.kernel, self.pid, self.limits = kernel, pid, control

    def ineligible(self, vma, thp_disabled: bool):
        return ineligible(vma, self.limits, thp_disabled)

    def __enter__(self) -> FakeScanner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def range_key(self, vma, address: int):
        return None  # the fixture's memory is private: no file range to collapse once

    def decide_range(self, vma, start: int, end: int):
        self.kernel.scans.append((self.pid, start, end))
        p = self.kernel.procfs._get(self.pid)
        codes = []
        for a in range(start, end, HP):
            n = p.present.get(a, 0)
            if a in p.huge:
                codes.append(ScanResult.PMD_MAPPED)
            elif n == 0:
                codes.append(ScanResult.PMD_NONE)
            elif NR - n > self.limits.max_ptes_none:
                codes.append(ScanResult.EXCEED_NONE_PTE)
            else:
                codes.append(ScanResult.SUCCEED)
        none = np.array([NR - p.present.get(a, 0) for a in range(start, end, HP)])
        zeros = np.zeros(len(codes), dtype=np.int64)  # private memory: no mapped counts
        zero = np.array([p.zero.get(a, 0) for a in range(start, end, HP)], dtype=np.int64)
        return Verdicts(np.array(codes, dtype=np.int8), NR - none, none, zeros, zeros.copy(),
                        zero=zero)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(monkeypatch):
    """(kernel, clock, collapses, make_core): the fixture kernel with collapse_window faked."""
    kernel = FakeKernel()
    clock = Clock()
    collapses: list[tuple[int, int]] = []
    behaviour: dict = {"fail": {}, "hook": None}

    def fake_collapse(pidfd, pid, address, size, still_mapped):
        collapses.append((pid, address))
        if behaviour["hook"] is not None:
            behaviour["hook"](pid, address)
        p = kernel.procfs.procs.get(pid)
        if p is None or p.gone:
            raise ProcessGone(f"pid {pid}: process has exited")
        fail = behaviour["fail"].get(address)
        if fail is not None:
            return CollapseOutcome(address, fail, errno.ENOMEM, 0.0001)
        p.huge.add(address)
        return CollapseOutcome(address, ScanResult.SUCCEED, 0, 0.0001)

    def fake_run(pidfd, pid, addresses, size, redecide):
        out = []  # as collapse_run: stops after an allocation failure, and a process gone
        for a in addresses:  # part-way ends the run with what was done
            try:
                out.append(fake_collapse(pidfd, pid, a, size, lambda a=a: redecide(a)))
            except ProcessGone:
                if not out:
                    raise
                break
            if out[-1].result == ScanResult.ALLOC_HUGE_PAGE_FAIL:
                break
        return out

    monkeypatch.setattr(collapse_path, "collapse_run", fake_run)  # the one collapse path

    def make_core(**tunables) -> Khugepaged:
        t = Tunables(enabled="madvise", max_cpu_percent=0, **tunables)
        # The fake world's own CPU is not the daemon's: only what a test sets is charged.
        core = Khugepaged(kernel, t, clock=clock, cpu_clock=lambda: 0.0)
        core.scan.visitor.scanner = FakeScanner
        return core

    return SimpleNamespace(kernel=kernel, clock=clock, collapses=collapses,
                           behaviour=behaviour, make_core=make_core)


def layout(world, pid: int, windows: int = 10, comm: str = "app") -> tuple[FakeProcess, Vma]:
    """A process: a file mapping, an anon VMA without MADV_HUGEPAGE, the candidate VMA of
    `windows` full windows, and a stack: three VMAs a madvise-mode scan skips."""
    base = BASE + (pid % 1000) * (1 << 32)
    hg = anon(base + 64 * HP, windows)
    p = FakeProcess(comm, [filemap(base), anon(base + 8 * HP, 4, hg=False), hg,
                           anon(base + 512 * HP, 1, hg=False, path="[stack]")])
    p.fill(hg)
    p.fill(p.vmas[1])
    world.kernel.procfs.procs[pid] = p
    return p, hg


def examined(core: Khugepaged) -> int:
    return sum(core.counters.results.values())


# --------------------------------------------------------------------------------------------
# The registry


def test_registry_order_cursor_and_exit(sleepers):
    a, b, c = sleepers(3)
    reg = Registry()
    try:
        for pid in (a, b, c):
            assert reg.enter(pid, "sleep") is not None
        assert list(reg.slots) == [a, b, c] and len(reg) == 3 and b in reg
        assert reg.first_pid() == a and reg.next_pid(a) == b and reg.next_pid(c) is None
        assert reg.enter(b) is reg.slots[b]  # registered once
        reg.cursor.pid, reg.cursor.address = b, 0x200000
        assert reg.exit(b) and b not in reg
        assert (reg.cursor.pid, reg.cursor.address) == (c, 0)  # moved past it
        assert reg.next_pid(a) == c and reg.next_pid(c) is None
        (d,) = sleepers(1)
        reg.enter(d)
        assert reg.next_pid(c) == d and list(reg.slots) == [a, c, d]
        assert reg.exit(d)
        reg.cursor.pid = c
        assert reg.exit(c) and reg.cursor.pid is None  # the tail: back to the head
        assert not reg.exit(c)
    finally:
        reg.close()
    assert len(reg) == 0


def test_registry_refuses_itself_and_vanished_processes(sleepers):
    reg = Registry()
    try:
        assert reg.enter(os.getpid()) is None
        (pid,) = sleepers(1)
        sleepers.kill(pid)
        assert reg.enter(pid) is None  # reaped: no pidfd
        assert len(reg) == 0
    finally:
        reg.close()


def test_pidfd_notices_exit_and_exit_drops_the_slot(sleepers):
    a, b = sleepers(2)
    reg = Registry()
    try:
        reg.enter(a)
        reg.enter(b)
        assert not reg.slots[a].exited()
        os.kill(a, signal.SIGKILL)
        os.waitid(os.P_PID, a, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        assert reg.slots[a].exited()  # the pidfd, not the pid, says so
        assert reg.exit(a)
        assert list(reg.slots) == [b]
    finally:
        reg.close()


def test_settle_doubles_up_to_the_cap_and_wake_resets(sleepers):
    (pid,) = sleepers(1)
    reg = Registry()
    try:
        slot = reg.enter(pid)
        seen = []
        for _ in range(10):
            slot.settle(100.0)
            seen.append(slot.settled_for)
        assert seen[0] == SETTLE_MIN and seen[-1] == SETTLE_MAX
        assert all(b == min(SETTLE_MAX, 2 * a) for a, b in zip(seen, seen[1:], strict=False))
        assert slot.due == 100.0 + SETTLE_MAX
        slot.wake()
        assert (slot.settled_for, slot.due) == (0.0, 0.0)
        assert reg.next_due() == 0.0
    finally:
        reg.close()


# --------------------------------------------------------------------------------------------
# Feeds: discovery, kernel threads, ourselves, targeted mode


def test_discover_registers_user_processes_only(world, sleepers):
    a, b, kt = sleepers(3)
    layout(world, a)
    layout(world, b, comm="excluded-one")
    world.kernel.procfs.procs[kt] = FakeProcess("kworker/0:1", [], flags=PF_KTHREAD)
    world.kernel.procfs.procs[os.getpid()] = FakeProcess("hugepaged", [])
    core = world.make_core()
    import re
    core.membership.exclude_comm = re.compile(r"excluded-.*")
    core.discover()
    assert list(core.registry.slots) == [a]
    assert kt in core.membership.kthreads
    world.kernel.procfs.procs[a].gone = True  # gone from /proc: the walk drops it
    core.discover()
    assert len(core.registry) == 0
    core.close()


def test_targeted_mode_registers_only_the_given_pids(world, sleepers):
    a, b = sleepers(2)
    layout(world, a)
    layout(world, b)
    core = world.make_core()
    core.membership.only_pids = {b}
    core.discover()
    assert list(core.registry.slots) == [b]
    assert core.enter(a) is None
    core.close()


# --------------------------------------------------------------------------------------------
# The pass: progress accounting as khugepaged_scan_mm_slot's


def test_progress_accounting_is_the_kernels(world, sleepers):
    (pid,) = sleepers(1)
    p, hg = layout(world, pid, windows=10)
    core = world.make_core(pages_to_scan=3 * NR)
    core.discover()
    cur = core.registry.cursor

    # Pass 1: progress 1 on entry + 2 VMAs skipped = 3, then windows until >= 1536: three.
    assert core.do_scan()
    assert examined(core) == 3 and core.counters.pages_collapsed == 3
    assert (cur.pid, cur.address) == (pid, hg.start + 3 * HP)
    # Passes 2 and 3 resume at the cursor: 1 + 3 * 512 each, the skipped VMAs are behind it.
    core.do_scan()
    core.do_scan()
    assert examined(core) == 9 and cur.address == hg.start + 9 * HP
    assert core.counters.full_scans == 0
    # Pass 4: the last window (513), the stack VMA (514): the mm is done, the cursor wraps
    # (a full scan) and, as in khugepaged_do_scan, the same pass goes on from the head with
    # what is left (1022): 1 + 2 skipped + two windows.
    core.do_scan()
    assert core.counters.full_scans == 1
    assert core.counters.results == {"SUCCEED": 10, "PMD_MAPPED": 2}
    assert cur.address == hg.start + 2 * HP
    assert core.counters.passes == 4
    assert sorted(a for _, a in world.collapses) == list(range(hg.start, hg.end, HP))
    assert p.huge == set(range(hg.start, hg.end, HP))
    core.close()


def test_a_pass_never_reads_more_than_its_budget_needs(world, sleepers):
    """decide_range is asked for exactly the windows the budget still allows."""
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=40)
    core = world.make_core(pages_to_scan=5 * NR)
    core.discover()
    core.do_scan()
    # A visit reads 1, 2, 4, ... windows at a time (its first collapse comes sooner), and
    # never past the budget: here 1 + 2 + 2.
    assert world.kernel.scans == [(pid, hg.start, hg.start + HP),
                                  (pid, hg.start + HP, hg.start + 3 * HP),
                                  (pid, hg.start + 3 * HP, hg.start + 5 * HP)]
    core.close()


def test_settled_process_costs_one_unit_and_no_reads(world, sleepers):
    a, b = sleepers(2)
    layout(world, a, windows=2)
    layout(world, b, windows=2)
    core = world.make_core(pages_to_scan=65536)
    core.discover()
    core.do_scan()  # from the head to the tail: everything collapsed, both slots awake
    assert core.counters.pages_collapsed == 4 and core.counters.full_scans == 1
    slots = core.registry.slots
    assert [s.settled_for for s in slots.values()] == [0.0, 0.0]
    assert core.do_scan()  # looked at again: nothing left, both settle
    assert core.counters.results == {"SUCCEED": 4, "PMD_MAPPED": 4}
    assert [s.settled_for for s in slots.values()] == [SETTLE_MIN] * 2
    world.kernel.scans.clear()
    full = core.counters.full_scans
    assert not core.do_scan()  # nothing due: an idle pass, no page read
    assert world.kernel.scans == []
    assert core.counters.full_scans == full + 1
    # Due, but the fault counters did not move: no scan, the back-off doubles.
    world.clock.now += SETTLE_MIN
    assert not core.do_scan()
    assert world.kernel.scans == []
    assert all(s.settled_for == 2 * SETTLE_MIN for s in slots.values())
    # One process faults: only it is scanned again.
    world.kernel.procfs.procs[b].minflt += 1
    world.clock.now += 2 * SETTLE_MIN
    assert core.do_scan()
    assert {s[0] for s in world.kernel.scans} == {b}
    # The other maps something new (its size changes, no fault yet): scanned again too, where
    # no syscall tracepoints say that a MADV_HUGEPAGE came with it.
    world.kernel.scans.clear()
    world.kernel.procfs.procs[a].vsize += 64 << 20
    world.clock.now += 4 * SETTLE_MIN
    assert core.do_scan()
    assert {s[0] for s in world.kernel.scans} == {a}
    # Unchanged for RESCAN_MIN: scanned anyway (MADV_HUGEPAGE moves no counter) ...
    world.kernel.scans.clear()
    world.clock.now += RESCAN_MIN
    core.do_scan()
    assert {s[0] for s in world.kernel.scans} == {a, b}
    # ... and, as that found nothing, forced half as often from then on, down to RESCAN_MAX.
    assert all(s.rescan_every == 2 * RESCAN_MIN for s in slots.values())
    world.kernel.scans.clear()
    world.clock.now += RESCAN_MIN
    core.do_scan()
    assert world.kernel.scans == []
    world.clock.now += RESCAN_MIN
    core.do_scan()
    assert {s[0] for s in world.kernel.scans} == {a, b}
    for _ in range(10):
        world.clock.now += RESCAN_MAX
        core.do_scan()
    assert all(s.rescan_every == RESCAN_MAX for s in slots.values())
    # A collapse is activity: back to the shortest interval.
    slots[a].wake()
    assert slots[a].rescan_every == RESCAN_MIN
    core.close()


def test_tunable_change_wakes_settled_slots(world, sleepers):
    (pid,) = sleepers(1)
    p, hg = layout(world, pid, windows=4)
    p.fill(hg, pages=100)  # 412 empty PTEs
    core = world.make_core(max_ptes_none=0)
    core.discover()
    core.do_scan()
    assert core.counters.results["EXCEED_NONE_PTE"] == 4 and core.counters.pages_collapsed == 0
    slot = core.registry.slots[pid]
    assert slot.settled_for > 0
    core.set_tunables(core.tunables.with_values({"pages_to_scan": 1024}))
    assert slot.settled_for > 0  # the budget is not a rule about windows
    core.set_tunables(core.tunables.with_values({"max_ptes_none": 511}))
    assert slot.due == 0.0
    core.do_scan()
    assert core.counters.pages_collapsed == 2  # pages_to_scan 1024: the next pass, two windows
    core.close()


def test_new_process_enters_behind_the_cursor(world, sleepers):
    a, b = sleepers(2)
    layout(world, a, windows=8)
    core = world.make_core(pages_to_scan=2 * NR)
    core.discover()
    core.do_scan()
    assert core.registry.cursor.pid == a
    layout(world, b, windows=1)
    core.enter(b, settle=1.0)
    assert list(core.registry.slots) == [a, b]
    core.do_scan()
    assert all(pid == a for pid, _ in world.collapses)  # not due yet, and behind a anyway
    world.clock.now += 1.0
    for _ in range(5):
        core.do_scan()
    assert (b, core.kernel.procfs.procs[b].vmas[2].start) in world.collapses
    core.close()


# --------------------------------------------------------------------------------------------
# Exits during a pass


def test_process_exiting_mid_pass_is_dropped_and_the_pass_goes_on(world, sleepers):
    a, b = sleepers(2)
    pa, hga = layout(world, a, windows=8)
    _, hgb = layout(world, b, windows=2)
    core = world.make_core(pages_to_scan=65536)
    core.discover()

    def exit_a(pid, address):
        if pid == a and address == hga.start + 3 * HP:
            sleepers.kill(a)  # really gone: its pidfd polls readable
            pa.gone = True

    world.behaviour["hook"] = exit_a
    core.do_scan()
    assert a not in core.registry and b in core.registry
    assert {x for pid, x in world.collapses if pid == b} == set(range(hgb.start, hgb.end, HP))
    assert core.counters.pages_collapsed == 3 + 2
    core.close()


def test_exit_event_for_the_cursor_process_moves_the_cursor(world, sleepers):
    a, b = sleepers(2)
    layout(world, a, windows=8)
    layout(world, b, windows=8)
    core = world.make_core(pages_to_scan=2 * NR)
    core.discover()
    core.do_scan()
    assert core.registry.cursor.pid == a
    core.exit(a)  # the connector's exit event, between passes
    assert (core.registry.cursor.pid, core.registry.cursor.address) == (b, 0)
    core.exit(b)  # the tail: a full scan, as collect_mm_slot would count it
    assert core.registry.cursor.pid is None and core.counters.full_scans == 1
    assert not core.do_scan()
    core.close()


# --------------------------------------------------------------------------------------------
# Allocation back-off, defrag=0, CPU cap, stop


def test_alloc_failure_backs_off_and_resumes_at_the_same_window(world, sleepers):
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=4)
    core = world.make_core(alloc_sleep_millisecs=60000)
    core.discover()
    bad = hg.start + HP
    world.behaviour["fail"][bad] = ScanResult.ALLOC_HUGE_PAGE_FAIL
    assert core.do_scan()
    assert core.collapser.backoff_until == world.clock.now + 60.0
    assert core.counters.alloc_backoffs == 1
    assert core.counters.collapse_failures == {"ENOMEM": 1}
    assert (core.registry.cursor.pid, core.registry.cursor.address) == (pid, bad)
    # Inside the back-off not one collapse is tried.
    del world.behaviour["fail"][bad]
    n = len(world.collapses)
    core.do_scan()
    assert len(world.collapses) == n
    # Over: the pass goes on at that very window.
    world.clock.now = core.collapser.backoff_until
    core.do_scan()
    assert world.collapses[n] == (pid, bad)
    assert core.counters.pages_collapsed == 4
    core.close()


def test_workers_collapse_every_window_and_count_each_once(world, sleepers):
    """collapse_workers=2: batches go to the workers' lanes; their outcomes are counted on the
    daemon's thread when reaped, exactly once each, and a slot with batches in flight is not
    visited again until they are done."""
    pids = sleepers(3)
    hgs = [layout(world, pid, windows=workers.LANE_WINDOWS + 36)[1] for pid in pids]
    core = world.make_core(pages_to_scan=65536, collapse_workers=2)
    core.discover()
    core.do_scan()
    assert core.lanes.pool is not None and core.lanes.pool.lanes  # handed over, not all counted yet
    # A lane holds LANE_WINDOWS at most: the first pass left each process part-way and went
    # on to the next, so every process has work queued.
    assert set(core.lanes.pool.lanes) == set(pids) and core.lanes.stalled
    deadline = time.monotonic() + 10
    total = sum((hg.end - hg.start) // HP for hg in hgs)
    while core.lanes.pool.lanes or core.counters.pages_collapsed < total:
        assert time.monotonic() < deadline
        core.lanes.reap()
        if core.lanes.stalled or not core.lanes.pool.lanes:
            core.do_scan()  # resumes where each process was left
        time.sleep(0.001)
    want = {(pid, a) for pid, hg in zip(pids, hgs, strict=True)
            for a in range(hg.start, hg.end, HP)}
    assert set(world.collapses) == want and len(world.collapses) == len(want)
    assert core.counters.pages_collapsed == len(want) == core.counters.results["SUCCEED"]
    assert core.counters.collapse_attempts == len(want)
    core.do_scan()  # everything is PMD_MAPPED now: nothing is collapsed twice
    core.lanes.reap()
    assert len(world.collapses) == len(want)
    core.close()


@pytest.mark.parametrize("cap", [0, 50])
def test_uncapped_workers_start_their_lanes_next_batch_without_the_loop(world, sleepers, cap):
    """Uncapped, a worker whose batch collapsed every window starts its lane's next batch
    itself (the daemon's thread may be busy with a pass); under a CPU cap the daemon's thread
    starts each one, as the cap's pace allows."""
    pids = sleepers(2)
    for pid in pids:
        layout(world, pid, windows=workers.LANE_WINDOWS)
    core = world.make_core(pages_to_scan=65536, collapse_workers=2)
    if cap:
        core.set_tunables(core.tunables.with_values({"max_cpu_percent": cap}))
    core.discover()
    core.do_scan()  # hands windows over; then the loop does nothing more
    handed = core.lanes.handed
    deadline = time.monotonic() + (0.3 if cap else 5)
    while len(world.collapses) < handed and time.monotonic() < deadline:
        time.sleep(0.01)
    if cap:
        assert 0 < len(world.collapses) < handed  # the loop must start the next batches
    else:
        assert len(world.collapses) == handed > 2 * 16  # more than one batch a lane
    core.lanes.reap()
    core.close()


def test_result_of_enomem_depends_on_the_mapping():
    assert result_of_errno(errno.ENOMEM, lambda: ScanResult.SUCCEED) == \
        ScanResult.ALLOC_HUGE_PAGE_FAIL
    assert result_of_errno(errno.ENOMEM, lambda: None) == ScanResult.ALLOC_HUGE_PAGE_FAIL
    assert result_of_errno(errno.ENOMEM, lambda: ScanResult.VMA_NULL) == ScanResult.VMA_NULL


@pytest.mark.parametrize(("err", "now", "named"), [
    # EBUSY: a cgroup charge failure, or EXCEED_NONE_PTE (which MADV_COLLAPSE only meets in a
    # userfaultfd-armed VMA, and a re-decision shows); unknown without a re-decision.
    (errno.EBUSY, ScanResult.SUCCEED, ScanResult.CGROUP_CHARGE_FAIL),
    (errno.EBUSY, ScanResult.EXCEED_NONE_PTE, ScanResult.EXCEED_NONE_PTE),
    (errno.EBUSY, None, ScanResult.COLLAPSE_EBUSY),
    # EAGAIN: locked, off the LRU (visible), pinned, isolated, filled (not visible).
    (errno.EAGAIN, ScanResult.PAGE_LRU, ScanResult.PAGE_LRU),
    (errno.EAGAIN, ScanResult.PAGE_LOCK, ScanResult.PAGE_LOCK),
    (errno.EAGAIN, ScanResult.SUCCEED, ScanResult.COLLAPSE_EAGAIN),
    # EINVAL: the default; named only by a re-decision that shows one of its results.
    (errno.EINVAL, ScanResult.PAGE_ANON, ScanResult.PAGE_ANON),
    (errno.EINVAL, ScanResult.VMA_CHECK, ScanResult.VMA_CHECK),
    (errno.EINVAL, ScanResult.PTE_UFFD_WP, ScanResult.PTE_UFFD_WP),
    (errno.EINVAL, ScanResult.SUCCEED, ScanResult.COLLAPSE_EINVAL),
    (errno.EINVAL, ScanResult.PAGE_LRU, ScanResult.COLLAPSE_EINVAL),  # that would be EAGAIN
    (errno.EINVAL, None, ScanResult.COLLAPSE_EINVAL),
    (errno.EFAULT, ScanResult.PAGE_ANON, ScanResult.COLLAPSE_ERRNO),
])
def test_result_of_errno_names_only_what_the_errno_implies(err, now, named):
    assert result_of_errno(err, lambda: now) == named


BUDDY_NONE = """\
Node 0, zone      DMA      1      1      1      0      2      1      1      0      1      0      0
Node 0, zone    DMA32      3      4      2      3      2      4      4      3      5      0      0
Node 0, zone   Normal    120     80     40     20     10      5      3      2      1      0      0
"""


def test_backoff_ends_when_buddyinfo_shows_a_free_huge_block(tmp_path, world, sleepers):
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=2)
    buddy = tmp_path / "buddyinfo"
    buddy.write_text(BUDDY_NONE)
    world.kernel.mm = MmStats(str(tmp_path))
    core = world.make_core()
    core.discover()
    world.behaviour["fail"][hg.start] = ScanResult.ALLOC_HUGE_PAGE_FAIL
    core.do_scan()
    assert core.collapser.backoff_until > world.clock.now
    assert not core.collapser.end_backoff_if_free()  # orders 0..8 only: no 2 MiB block
    assert core.collapser.backoff_until > world.clock.now
    buddy.write_text(BUDDY_NONE.replace("2      1      0      0\n", "2      1      1      0\n"))
    assert world.kernel.mm.free_huge_blocks() == 1
    assert core.collapser.end_backoff_if_free()
    assert core.collapser.backoff_until == 0.0
    assert not core.collapser.end_backoff_if_free()  # nothing to end
    core.close()


def test_order_10_block_counts_twice(tmp_path):
    (tmp_path / "buddyinfo").write_text(BUDDY_NONE.replace("0      0\n", "0      3\n"))
    assert MmStats(str(tmp_path)).free_huge_blocks() == 3 * 2 * 2  # DMA32 and Normal


def test_defrag_0_collapses_only_while_a_free_block_exists(world, sleepers):
    (pid,) = sleepers(1)
    layout(world, pid, windows=2)
    core = world.make_core(defrag=0)
    core.discover()
    world.kernel.mm.free = 0
    core.do_scan()
    assert world.collapses == [] and core.collapser.backoff_until > 0
    world.kernel.mm.free = 1
    assert core.collapser.end_backoff_if_free()
    core.do_scan()
    assert len(world.collapses) == 2
    core.close()


def test_backoff_and_defrag_0_look_at_the_windows_node(world, sleepers):
    """Two NUMA nodes (a fixture: this VM has one): a collapse allocates on the node holding
    most of the window's pages, so only a free block there lets defrag=0 collapse or ends
    the back-off; free blocks on the other node are no use to it."""
    (pid,) = sleepers(1)
    layout(world, pid, windows=2)
    mm = world.kernel.mm
    mm.nodes, mm.window_node, mm.free_by_node = {0, 1}, 1, {0: 50, 1: 0}
    core = world.make_core(defrag=0)
    core.discover()
    core.do_scan()
    assert world.collapses == [] and core.collapser.backoff_until > 0
    assert core.collapser.backoff_nodes == {1}
    assert not core.collapser.end_backoff_if_free()
    mm.free_by_node[1] = 1
    assert core.collapser.end_backoff_if_free()
    core.do_scan()
    assert len(world.collapses) == 2
    core.close()


def test_cpu_cap_stops_the_pass_until_the_pace_allows(world, sleepers):
    (pid,) = sleepers(1)
    layout(world, pid, windows=4)
    core = world.make_core()
    core.set_tunables(core.tunables.with_values({"max_cpu_percent": 5}))
    core.discover()
    core.collapser.budget.until = world.clock.now + 0.2  # 10 ms of CPU spent at 5%
    assert core.do_scan()
    assert world.collapses == []
    assert core.schedule.at("cpu-capped") == pytest.approx(world.clock.now + 0.2)
    world.clock.now += 0.2
    core.do_scan()
    assert len(world.collapses) >= 1  # the pace allows again: collapses start again
    world.clock.now += 1.0
    core.do_scan()
    assert len(world.collapses) == 4
    core.close()


def test_a_pass_the_cap_stopped_goes_on_when_the_cap_allows_not_a_scan_sleep_later(
        world, sleepers):
    """scan_sleep_millisecs is the rest after a pass that spent its pages_to_scan; a pass
    the cap stopped is due when the cap's rest ends (with both, a 3 GiB Redis got one
    collapse every 100 ms whatever the cap: 9 a second at 6% of a core against 20%)."""
    (pid,) = sleepers(1)
    layout(world, pid, windows=4)
    core = world.make_core(scan_sleep_millisecs=10000)
    core.set_tunables(core.tunables.with_values({"max_cpu_percent": 5}))
    core.discover()
    core.collapser.budget.until = world.clock.now + 0.2  # the cap rests 200 ms
    core.run_pass()
    assert world.collapses == []
    assert core.schedule.pass_at() == pytest.approx(world.clock.now + 0.2)
    assert core.schedule.state(world.clock.now, 10.0) == "cpu-capped"
    world.clock.now += 0.2
    core.run_pass()  # the cap allows: this pass collapses, and spends its budget or not
    assert len(world.collapses) >= 1
    core.close()


def test_pace_spreads_work_evenly_saves_no_credit_and_carries_no_debt_past_its_window():
    now = [0.0]
    p = Pace(5, clock=lambda: now[0], window=10.0)
    assert p.allows(0.0) and p.wait(0.0) == 0.0  # nothing owed: work may start
    p.charge(0.003)  # a collapse of 3 ms at 5%: the next one 60 ms later, not sooner
    assert not p.allows(0.0) and p.wait(0.0) == pytest.approx(0.06)
    assert p.allows(0.06)
    now[0] = 100.0  # an idle spell: nothing saved up for later
    p.charge(0.003)
    assert p.wait(100.0) == pytest.approx(0.06)
    p.charge(3.0)  # a start-up burn of 3 s: at 5% that would be 60 s; the debt stops at 10
    assert p.wait(100.0) == pytest.approx(10.0)
    # Beside a batch in flight that will cost 5 ms: only once that is paid for too.
    assert not p.allows_more(110.0, 0.005) and p.allows_more(110.1, 0.005)
    p.charge(1.0)
    p.forgive(100.0)  # a back-off ended because memory came free: work may start now
    assert p.allows(100.0)
    p.set_percent(0)  # no cap
    p.charge(100.0)
    assert p.allows(100.0) and p.wait(100.0) == 0.0
    p.set_percent(10)  # a cap again: a fresh start, not the debt run up without one
    assert p.allows(100.0)
    p.charge(0.01)
    p.set_percent(5)  # from one cap to another: what is owed stays owed
    assert not p.allows(100.0) and p.wait(100.0) == pytest.approx(0.1)


def test_stopping_ends_the_pass_at_the_current_window(world, sleepers):
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=MAX_BATCH + 4)
    core = world.make_core(pages_to_scan=65536)
    core.discover()

    def stop_after_two(pid_, address):
        if len(world.collapses) == 2:
            core.stopping = True

    world.behaviour["hook"] = stop_after_two
    core.do_scan()
    # The call in flight finished, no new one started: a visit's calls take 1, 2, 4, ...
    # windows, so the stop came in the second call, of windows 1 and 2.
    assert len(world.collapses) == 3
    assert core.registry.cursor.address == hg.start + 3 * HP
    core.close()


def test_a_paced_pass_keeps_its_verdicts_for_the_next_and_skips_no_window(world, sleepers):
    """Under a CPU cap a pass collapses one call's windows and keeps what it decided beyond
    them: the next passes take those verdicts instead of reading the page state again, and
    every window is collapsed exactly once."""
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=20)
    core = world.make_core(pages_to_scan=65536, max_stall_ms=0)  # one window a call
    core.set_tunables(core.tunables.with_values({"max_cpu_percent": 5}))
    core.discover()
    passes = 0
    while len(world.collapses) < 20 and passes < 200:
        core.do_scan()
        world.clock.now += 0.05
        passes += 1
    want = [(pid, a) for a in range(hg.start, hg.end, HP)]
    assert world.collapses == want  # each once, in address order: none skipped and left
    # for a later visit
    reads = [s for s in world.kernel.scans if s[0] == pid and hg.start <= s[1] < hg.end]
    assert len(reads) < len(want) // 2, (len(reads), passes)
    core.close()
