"""MADV_HUGEPAGE seen at once: processes that faulted, went quiet and then advised their memory.

The kernel registers an mm with its khugepaged inside madvise(MADV_HUGEPAGE). hugepaged sees the
call through the syscall tracepoints (this machine has them) and wakes the slot. The kernel is
kept at enabled=never for these tests, so its khugepaged neither runs nor registers anyone, and
hugepaged gets enabled=madvise on its command line.
"""

from __future__ import annotations

import time

import pytest

from hugepaged.daemon.advice import apply_advice, on_syscall
from hugepaged.daemon.khugepaged import Khugepaged
from hugepaged.kernel import Kernel
from hugepaged.kernel.procfs import Vma
from hugepaged.kernel.tracepoints import (
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    PR_SET_THP_DISABLE,
    SyscallEvent,
)
from hugepaged.tunables import Tunables
from kit.daemon_runner import Daemon, settled
from kit.helpers import Workload, pmd_mapped_windows, saved_thp

from . import marks

pytestmark = marks.KERNEL
REGION = [{"name": "heap", "windows": 16, "fill": "all"}]  # no MADV_HUGEPAGE yet


def _covered(w: Workload) -> bool:
    r = w.regions["heap"]
    return all(pmd_mapped_windows(w.pid, r.start, r.end))


@pytest.mark.parametrize("workers", [1, 2])
def test_four_quiet_processes_advised_together_are_all_covered_quickly(workers):
    with saved_thp(enabled="never"):
        works = [Workload(regions=REGION).start() for _ in range(4)]
        try:
            pids = [w.pid for w in works]
            sets = {"enabled": "madvise", "max_cpu_percent": 0, "collapse_workers": workers}
            with Daemon(pids=pids, sets=sets) as d:
                st = d.wait_for(lambda s: all(settled(s, p) for p in pids), timeout=30,
                                what="all four settled")
                assert st["madvise_source"] == "tracepoints"
                assert "MADV_HUGEPAGE seen by: tracepoints" in d.cli("status").stdout
                time.sleep(2.5)  # settle back-offs grow past a second: nothing is due now
                assert not any(_covered(w) for w in works)
                t0 = time.monotonic()
                for w in works:
                    w.command("hugepage heap")
                while not all(_covered(w) for w in works):
                    assert time.monotonic() - t0 < 10, \
                        f"not all covered in 10 s: {[_covered(w) for w in works]}"
                    time.sleep(0.02)
                seconds = time.monotonic() - t0
                seen = {r["pid"] for r in d.events("madvise")}
                assert seen >= set(pids)
            for w in works:
                w.verify()
            print(f"four processes advised together, {workers} worker(s): all covered in "
                  f"{seconds:.2f} s")
        finally:
            for w in works:
                w.close()


def test_advice_at_the_default_cap_is_acted_on_within_a_poll():
    """At the default CPU cap a pass's scanning leaves the pace resting for a moment, and the
    syscall rings are not read meanwhile (a flood of advice costs at most the cap); the loop
    must listen again when the rest ends, not at its next pass (seconds later, or minutes
    for a settled process): bench_advise's default scenario once saw no collapse in 60 s."""
    with saved_thp(enabled="never"), Workload(regions=REGION) as w, \
            Daemon(pids=[w.pid], sets={"enabled": "madvise"}) as d:
        d.wait_for(lambda s: settled(s, w.pid), timeout=30, what="settled")
        assert d.status()["tunables"]["max_cpu_percent"] > 0
        time.sleep(3.0)
        t0 = time.monotonic()
        w.command("hugepage heap")
        r = w.regions["heap"]
        while not any(pmd_mapped_windows(w.pid, r.start, r.end)):
            assert time.monotonic() - t0 < 3.0, d.status()["counters"]
            time.sleep(0.02)
        print(f"first collapse {time.monotonic() - t0:.3f} s after the advice")
        w.verify()


def test_madvise_registers_an_unknown_process_and_prctl_is_recorded():
    kernel = Kernel()
    core = Khugepaged(kernel, Tunables())
    m = core.membership
    try:
        with Workload(regions=REGION) as w:
            assert w.pid not in core.registry
            due = on_syscall(m, SyscallEvent("madvise", w.pid, w.pid, MADV_HUGEPAGE), 100.0)
            slot = core.registry.slots[w.pid]
            assert due == slot.due and 100.0 < due < 100.1 and slot.settled_for == 0
            slot.settle(200.0)
            slot.visit = (True, [])
            assert on_syscall(m, SyscallEvent("prctl", w.pid, w.pid, PR_SET_THP_DISABLE, 1),
                              300.0) is None
            assert slot.visit is None and slot.settled_for > 0  # disabled: nothing to wake for
            due = on_syscall(m, SyscallEvent("prctl", w.pid, w.pid, PR_SET_THP_DISABLE, 0),
                             300.0)
            assert due is not None and slot.settled_for == 0
            # Another advice value or a process that is gone changes nothing.
            assert on_syscall(m, SyscallEvent("madvise", w.pid, w.pid, 4), 300.0) is None
        core.exit(w.pid)
        assert on_syscall(m, SyscallEvent("madvise", w.pid, w.pid, MADV_HUGEPAGE),
                          400.0) is None  # exited before its record was read: not registered
        assert w.pid not in core.registry
    finally:
        core.close()


def test_madvise_with_its_range_is_applied_at_once_and_nohugepage_forgets_the_map():
    kernel = Kernel()
    core = Khugepaged(kernel, Tunables())
    m = core.membership
    try:
        with Workload(regions=REGION) as w:
            r = w.regions["heap"]
            ev = SyscallEvent("madvise", w.pid, w.pid, MADV_HUGEPAGE, start=r.start,
                              length=r.end - r.start - 100)  # rounded up to a page
            assert on_syscall(m, ev, 100.0) == 100.0  # no wait for the call to land
            slot = core.registry.slots[w.pid]
            assert slot.advice == [(r.start, r.end)]
            # An unaligned start is refused by madvise: nothing to apply, the old wait.
            bad = SyscallEvent("madvise", w.pid, w.pid, MADV_HUGEPAGE, start=r.start + 1,
                               length=4096)
            assert on_syscall(m, bad, 200.0) == pytest.approx(200.005)
            assert slot.advice == [(r.start, r.end)]
            slot.last_map = ((), True, [])
            assert on_syscall(m, SyscallEvent("madvise", w.pid, w.pid, MADV_NOHUGEPAGE,
                                                 start=r.start, length=4096), 300.0) is None
            assert slot.last_map is None and slot.advice == []
    finally:
        core.close()


def test_apply_advice_sets_the_flags_hugepage_madvise_sets_and_splits_at_the_range():
    mib = 1 << 20
    a = Vma(0x10 * mib, 0x20 * mib, "rw-p", 0, 0, "", frozenset({"rd", "wr", "nh"}),
            anonymous_kb=16 * 1024)
    b = Vma(0x30 * mib, 0x40 * mib, "rw-p", 0, 0, "", frozenset({"rd", "wr"}))
    out = apply_advice([a, b], 0x18 * mib, 0x34 * mib)
    assert [(v.start // mib, v.end // mib) for v in out] == [
        (0x10, 0x18), (0x18, 0x20), (0x30, 0x34), (0x34, 0x40)]
    assert [("hg" in v.flags, "nh" in v.flags) for v in out] == [
        (False, True), (True, False), (True, False), (False, False)]
    assert out[0].anonymous_kb + out[1].anonymous_kb == a.anonymous_kb
    assert all({"rd", "wr"} <= v.flags for v in out)
    assert apply_advice(out, 0x18 * mib, 0x20 * mib) == out  # already advised: unchanged
    assert apply_advice([b], 0, 0x10 * mib) == [b]  # outside every VMA
