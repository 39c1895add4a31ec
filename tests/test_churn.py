"""Split churn on the fixture kernel of test_registry: a window the daemon collapsed that
comes back split is counted once per split and held back (60 s, doubling; for good with
on_split = "leave"; while underused for the kernel's shrinker). The same on the real kernel,
with a process that purges part of a collapsed window, is in test_churn_kernel.py."""

from __future__ import annotations

import logging

from hugepaged.daemon.churn import SPLIT_BACKOFF_MIN
from hugepaged.daemon.targets import summaries
from hugepaged.results import ScanResult
from hugepaged.targets import Target

from .test_daemon_targets import core_with
from .test_registry import HP, NR, layout, sleepers, world  # noqa: F401  (fixtures)


def split(wld, pid: int, address: int, freed: int = 16, zero: int = 0) -> None:
    """The allocator frees `freed` pages of a collapsed window (MADV_DONTNEED splits the
    PMD): the window is PTE-mapped again, with holes; `zero` of them map the zero page."""
    p = wld.kernel.procfs.procs[pid]
    p.huge.discard(address)
    p.present[address] = NR - freed
    p.zero[address] = zero
    p.minflt += 1  # the process's counters move: it is visited again


def visit(wld, core, seconds: float = 2.0) -> None:
    wld.clock.now += seconds
    core.do_scan()


def test_a_split_window_is_counted_and_held_back_doubling(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=4)
    core = world.make_core(pages_to_scan=65536)
    core.discover()
    core.do_scan()
    assert core.counters.pages_collapsed == 4
    w = hg.start + HP
    split(world, pid, w)
    for _ in range(3):  # visits within the hold: counted once, not collapsed
        visit(world, core)
    assert core.counters.pages_split_after_collapse == 1
    assert core.counters.pages_collapsed == 4 and w not in world.kernel.procfs.procs[pid].huge
    assert core.counters.results["SPLIT_BACKOFF"] >= 1
    assert core.collapser.splits.held_counts(core.registry.slots.values()) == \
        {"split_backoff": 1, "underused": 0}
    visit(world, core, SPLIT_BACKOFF_MIN)  # the hold is over: collapsed again
    assert core.counters.pages_collapsed == 5
    split(world, pid, w)  # split again: held twice as long
    visit(world, core)
    visit(world, core, SPLIT_BACKOFF_MIN)
    assert core.counters.pages_split_after_collapse == 2 and core.counters.pages_collapsed == 5
    visit(world, core, SPLIT_BACKOFF_MIN)
    assert core.counters.pages_collapsed == 6
    core.close()


def test_on_split_leave_never_collapses_it_again_and_counts_per_target(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=2)
    core = core_with(world, [Target("jemalloc", pid=(pid,), on_split="leave")],
                     pages_to_scan=65536)
    core.discover()
    core.do_scan()
    split(world, pid, hg.start)
    visit(world, core)
    visit(world, core, 100 * SPLIT_BACKOFF_MIN)
    assert core.counters.pages_collapsed == 2 and core.counters.pages_split_after_collapse == 1
    assert core.membership.target_states.get("jemalloc").splits == 1
    core.close()


def test_a_window_the_kernels_shrinker_split_waits_for_its_zero_share_to_fall(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=2)
    world.kernel.shrinker = 64  # shrink_underused on, the kernel's max_ptes_none at 64
    core = world.make_core(pages_to_scan=65536)  # hugepaged's own max_ptes_none: 511
    core.discover()
    core.do_scan()
    w = hg.start
    split(world, pid, w, freed=300, zero=300)  # 300 zero-filled pages: the shrinker's work
    visit(world, core)
    visit(world, core, 10 * SPLIT_BACKOFF_MIN)  # time alone does not release it
    assert core.counters.pages_collapsed == 2
    assert core.counters.results["UNDERUSED_SPLIT"] >= 1
    assert core.collapser.splits.held_counts(core.registry.slots.values())["underused"] == 1
    p = world.kernel.procfs.procs[pid]
    p.present[w], p.zero[w], p.minflt = NR - 10, 10, p.minflt + 1  # written again
    visit(world, core)
    assert core.counters.pages_collapsed == 3
    core.close()


def test_a_window_freed_whole_is_forgotten_not_counted(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    _, hg = layout(world, pid, windows=2)
    core = world.make_core(pages_to_scan=65536)
    core.discover()
    core.do_scan()
    p = world.kernel.procfs.procs[pid]
    p.huge.discard(hg.start)
    p.present[hg.start] = 0  # MADV_DONTNEED of the whole window: PMD_NONE, no split
    p.minflt += 1
    visit(world, core)
    assert core.counters.pages_split_after_collapse == 0
    assert hg.start not in core.registry.slots[pid].collapsed
    assert core.counters.results[ScanResult.PMD_NONE.name] >= 1
    core.close()


# --------------------------------------------------------------------------------------------
# Coverage promises (daemon/promise.py)


def test_a_promise_short_of_coverage_ranks_first_then_breaks_and_says_why(world, sleepers,  # noqa: F811
                                                                          caplog):
    low, other = sleepers(2)
    _, hg = layout(world, low, windows=4)
    layout(world, other, windows=4)
    p = world.kernel.procfs.procs[low]
    for a in range(hg.start, hg.end, HP):
        p.present[a] = NR - 100  # sparse: each collapse would add 400 kB
    core = core_with(world, [
        Target("db", pid=(low,), priority=-5, min_coverage=90, coverage_deadline=5,
               max_bloat_mb=0),
        Target("web", pid=(other,), priority=5)], pages_to_scan=65536)
    core.discover()
    core.do_scan()  # the first look: db is short of its promise
    core.scan.promises.evaluate(force=True)
    st = core.membership.target_states.get("db")
    assert st.short and st.promise == "pending"
    assert core.registry.first_pid() == low  # short: it ranks above web's priority 5
    with caplog.at_level(logging.WARNING, logger="hugepaged"):
        for _ in range(8):
            world.clock.now += 1.0
            core.do_scan()
            core.scan.promises.evaluate(force=True)
    assert st.promise == "broken" and st.broken == 1
    broken = [r for r in caplog.records if getattr(r, "event", "") == "promise_broken"]
    assert len(broken) == 1 and "bloat budget" in broken[0].getMessage()
    row = next(r for r in summaries(core.membership.targets, core.membership.target_states,
                                    list(core.registry.slots.values())) if r["name"] == "db")
    assert row["promise"]["state"] == "broken" and "bloat" in row["promise"]["obstacle"]
    core.close()


def test_a_kept_promise_gives_back_its_rank(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    layout(world, pid, windows=4)
    core = core_with(world, [Target("db", pid=(pid,), enabled="always", min_coverage=90,
                                    coverage_deadline=5)], pages_to_scan=65536)
    core.discover()
    core.do_scan()
    core.scan.promises.evaluate(force=True)
    core.do_scan()  # its windows were collapsed; the next visit reads its coverage
    core.scan.promises.evaluate(force=True)
    st = core.membership.target_states.get("db")
    assert st.promise == "kept" and not st.short
    assert core.registry.slots[pid].priority == 0
    core.close()
