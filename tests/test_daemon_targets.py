"""The daemon's targets on the fixture kernel of test_registry: a policy resolved per slot,
the order of the pass by priority, a target's CPU share, its bloat budget, `never`.

The fixture gives exact control over page counts and clocks; the same behaviours are shown
on the real kernel with Redis and real workloads in test_targets_kernel.py.
"""

from __future__ import annotations

import logging

import pytest

from hugepaged.results import ScanResult
from hugepaged.targets import Target

from .test_registry import HP, NR, layout, sleepers, world  # noqa: F401  (fixtures)


def core_with(world, targets: list[Target], **tunables):  # noqa: F811
    core = world.make_core(**tunables)
    core.set_targets(targets)
    return core


def test_each_slot_gets_its_targets_policy_and_the_rest_the_global_one(world, sleepers):  # noqa: F811
    a, b, c = sleepers(3)
    layout(world, a, comm="redis-server")
    layout(world, b, comm="java")
    layout(world, c, comm="other")
    core = core_with(world, [Target("redis", comm="^redis-server$", enabled="always",
                                    max_ptes_none=64, priority=10, max_bloat_mb=8),
                             Target("jvm", comm="java", max_cpu_percent=3),
                             Target("late", comm="redis")])  # first match wins
    core.discover()
    ca, cb, cc = (core.membership.control_for(core.registry.slots[p]) for p in (a, b, c))
    assert (ca.target, ca.enabled, ca.max_ptes_none, ca.priority, ca.max_bloat_kb) == (
        "redis", "always", 64, 10, 8192)
    assert (ca.max_ptes_swap, ca.max_ptes_shared) == (core.membership.control.max_ptes_swap,
                                                      core.membership.control.max_ptes_shared)
    assert (cb.target, cb.enabled, cb.max_cpu_percent) == ("jvm", "madvise", 3)
    assert cc == core.membership.control and cc.target is None
    # A change of the global tunables reaches the targets' policies where they set nothing.
    core.set_tunables(core.tunables.with_values({"max_ptes_swap": 7}))
    assert core.membership.control_for(core.registry.slots[a]).max_ptes_swap == 7
    assert core.membership.control_for(core.registry.slots[a]).max_ptes_none == 64
    # Reload: matched again, everyone woken.
    core.set_targets([Target("jvm", comm="java", enabled="never")])
    assert core.membership.control_for(core.registry.slots[a]) == core.membership.control
    assert core.membership.control_for(core.registry.slots[b]).enabled == "never"
    core.close()


def test_a_reload_logs_one_info_line_per_change_of_target(world, sleepers, caplog):  # noqa: F811
    pids = sleepers(3)
    for pid in pids:
        layout(world, pid, comm="java")
    core = core_with(world, [])
    core.discover()
    caplog.set_level(logging.DEBUG, logger="hugepaged")
    core.set_targets([Target("jvm", comm="java")])
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [r.getMessage() for r in info] == ["targets reloaded: 3 process(es) None -> jvm"]
    debug = [r for r in caplog.records if getattr(r, "event", None) == "target"]
    assert sorted(r.pid for r in debug) == sorted(pids)
    assert all(r.levelno == logging.DEBUG for r in debug)
    core.close()


def test_a_reload_logs_each_change_of_a_targets_settings(world, sleepers, caplog):  # noqa: F811
    """An edit that moves no process (a setting, a match key) is confirmed in the log too,
    one line per change; start-up logs none of them."""
    (pid,) = sleepers(1)
    layout(world, pid, comm="java")
    caplog.set_level(logging.INFO, logger="hugepaged")
    core = core_with(world, [Target("jvm", comm="java", max_cpu_percent=3),
                             Target("old", comm="nothing")])
    core.discover()
    assert [r for r in caplog.records if getattr(r, "event", None) == "target_changed"] == []
    core.set_targets([Target("jvm", comm="java", max_cpu_percent=4, enabled="always"),
                      Target("new", pid=(1,), priority=5)], source="reload")
    changes = [r.getMessage() for r in caplog.records
               if getattr(r, "event", None) == "target_changed"]
    assert changes == ["target jvm: enabled: (global) -> always (reload)",
                       "target jvm: max_cpu_percent: 3 -> 4 (reload)",
                       "target new: added (pid=(1,)) (reload)",
                       "target old: removed (reload)"]
    assert core.membership.control_for(core.registry.slots[pid]).max_cpu_percent == 4
    core.close()


def test_exec_resolves_the_slot_again(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    p, _ = layout(world, pid, comm="bash")
    core = core_with(world, [Target("redis", comm="^redis-server$", enabled="always")])
    core.discover()
    slot = core.registry.slots[pid]
    assert core.membership.control_for(slot).target is None
    p.comm = "redis-server"  # what exec does to /proc/PID/stat
    core.membership.on_exec(pid)
    assert slot.comm == "redis-server" and core.membership.control_for(slot).target == "redis"
    core.close()


def test_enabled_always_takes_windows_without_madv_hugepage(world, sleepers):  # noqa: F811
    a, b = sleepers(2)
    layout(world, a)  # one MADV_HUGEPAGE VMA of 10 windows, one plain anon VMA of 4
    layout(world, b)
    core = core_with(world, [Target("all", pid=(a,), enabled="always")])
    core.discover()
    core.do_scan()
    per = {pid: sum(1 for p, _ in world.collapses if p == pid) for pid in (a, b)}
    assert per == {a: 14, b: 10}
    core.close()


def test_a_target_at_never_is_left_alone(world, sleepers):  # noqa: F811
    a, b = sleepers(2)
    layout(world, a)
    layout(world, b)
    core = core_with(world, [Target("hands-off", pid=(a,), enabled="never")])
    core.discover()
    world.kernel.scans.clear()
    core.do_scan()
    assert {p for p, _ in world.collapses} == {b}
    assert not [s for s in world.kernel.scans if s[0] == a]  # not even read
    core.close()


def test_higher_priority_is_visited_first_then_cursor_order(world, sleepers):  # noqa: F811
    low1, high, low2 = sleepers(3)
    for pid in (low1, high, low2):
        layout(world, pid, windows=4)
    core = core_with(world, [Target("hi", pid=(high,), priority=5)])
    core.discover()
    core.do_scan()
    order = []
    for pid, _ in world.collapses:
        if not order or order[-1] != pid:
            order.append(pid)
    assert order == [high, low1, low2]
    core.close()


def test_a_due_higher_priority_slot_comes_before_the_next_lower_one(world, sleepers):  # noqa: F811
    low1, low2, high = sleepers(3)
    for pid in (low1, low2, high):
        layout(world, pid, windows=4)
    core = core_with(world, [Target("hi", pid=(high,), priority=5)])
    core.discover()
    hs = core.registry.slots[high]
    hs.due = world.clock.now + 100  # not due at first: the low ones are visited
    core.set_tunables(core.tunables.with_values({"pages_to_scan": 4 * NR}))
    core.do_scan()  # low1's windows, and the pass stops
    assert {p for p, _ in world.collapses} == {low1}
    hs.due = 0.0  # e.g. an exec woke it
    world.collapses.clear()
    core.set_tunables(core.tunables.with_values({"pages_to_scan": 100 * NR}))
    core.do_scan()
    seen = []
    for pid, _ in world.collapses:
        if pid not in seen:
            seen.append(pid)
    assert seen == [high, low2]  # before low2, although low2 is next in the cursor's order
    core.close()


def test_bloat_budget_stops_sparse_windows_and_full_ones_still_collapse(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    p, hg = layout(world, pid, windows=10)
    sparse = list(range(hg.start, hg.start + 6 * HP, HP))
    for a in sparse:
        p.present[a] = NR - 256  # 256 empty PTEs: 1 MiB of new RSS per collapse
    core = core_with(world, [Target("b", pid=(pid,), max_bloat_mb=3, max_ptes_none=511)])
    core.discover()
    core.do_scan()
    done = {a for _, a in world.collapses}
    assert len(done & set(sparse)) == 3  # 3 MiB: the budget
    assert set(range(hg.start, hg.end, HP)) - set(sparse) <= done  # full ones: all
    state = core.membership.target_states.get("b")
    assert state.bloat_used_kb == 3 * 1024
    assert state.results["EXCEED_BLOAT_BUDGET"] == 3
    assert core.counters.results[ScanResult.EXCEED_BLOAT_BUDGET.name] == 3
    core.exit(pid)  # an exited process's share is forgotten
    assert state.bloat_used_kb == 0
    core.close()


def test_a_reload_moves_a_process_bloat_to_its_new_target(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    p, hg = layout(world, pid, windows=4)
    for a in range(hg.start, hg.end, HP):
        p.present[a] = NR - 256  # each collapse adds 1 MiB
    core = core_with(world, [Target("a", pid=(pid,), max_bloat_mb=2)])
    core.discover()
    core.do_scan()
    assert core.membership.target_states.get("a").bloat_used_kb == 2 * 1024
    # Reload: the process now matches "b"; the 2 MiB its collapses added go with it, and "a"
    # (kept, matching no one) has nothing charged any more.
    core.set_targets([Target("a", pid=(1,), max_bloat_mb=2),
                      Target("b", pid=(pid,), max_bloat_mb=3)])
    assert core.membership.target_states.get("a").bloat_used_kb == 0
    assert core.membership.target_states.get("b").bloat_used_kb == 2 * 1024
    before = len(world.collapses)
    core.registry.slots[pid].wake()
    core.do_scan()
    assert len(world.collapses) - before == 1  # 1 MiB left in b's budget
    assert core.membership.target_states.get("b").bloat_used_kb == 3 * 1024
    # Back to the global policy (no budget), then to "b" again: still counted.
    core.set_targets([Target("b", pid=(1,), max_bloat_mb=3)])
    assert core.membership.target_states.get("b").bloat_used_kb == 0
    core.set_targets([Target("b", pid=(pid,), max_bloat_mb=3)])
    assert core.membership.target_states.get("b").bloat_used_kb == 3 * 1024
    core.close()


def test_a_targets_cpu_share_leaves_its_slot_and_the_pass_goes_on(world, sleepers):  # noqa: F811
    a, b = sleepers(2)
    layout(world, a, windows=4)
    layout(world, b, windows=4)
    core = core_with(world, [Target("capped", pid=(a,), max_cpu_percent=2)])
    core.discover()
    state = core.membership.target_states.get("capped")
    state.budget.until = world.clock.now + 0.5  # over its share
    core.do_scan()
    assert {p for p, _ in world.collapses} == {b}  # a waits, b goes ahead
    slot = core.registry.slots[a]
    advised = next(v for v in slot.visit[1] if "hg" in v.flags)
    assert slot.due > world.clock.now and slot.resume >= advised.start
    for _ in range(8):  # its share spaces its collapses: a pass each, now
        world.clock.now += 60
        core.do_scan()
    assert sum(1 for p, _ in world.collapses if p == a) == 4  # resumed: every window once
    assert len({x for x in world.collapses if x[0] == a}) == 4
    core.close()


def test_a_pass_that_worked_comes_back_when_a_share_does_not_a_scan_sleep_later(
        world, sleepers):  # noqa: F811
    """A pass that collapsed and left a visit for its target's share: the next pass is due
    when the share is back, if that is before scan_sleep_millisecs (the share is the
    target's pace; with a sleep on top, one max_stall_ms call a pass held a 10% target to
    3-4% of a core)."""
    (a,) = sleepers(1)
    layout(world, a, windows=8)
    core = core_with(world, [Target("capped", pid=(a,), max_cpu_percent=10)])
    core.set_tunables(core.tunables.with_values({"max_cpu_percent": 50,
                                                 "scan_sleep_millisecs": 10000}))
    core.discover()
    share = core.membership.target_states.get("capped").budget
    share.until = world.clock.now + 0.05  # 50 ms over its share
    core.run_pass()
    slot = core.registry.slots[a]
    assert slot.resume
    assert core.schedule.pass_at() == pytest.approx(world.clock.now + 0.05)
    core.close()


def test_a_slot_waiting_for_its_share_is_what_the_daemon_waits_for(world, sleepers):  # noqa: F811
    """While a visit waits for its target's share, the schedule holds that wait (the state
    says which share binds), the next pass comes when the share is back, and the global cap,
    which nothing was charged to meanwhile, does not hold it up then."""
    (a,) = sleepers(1)
    layout(world, a, windows=8)
    core = core_with(world, [Target("capped", pid=(a,), max_cpu_percent=2)])
    core.set_tunables(core.tunables.with_values({"max_cpu_percent": 50}))
    core.discover()
    share = core.membership.target_states.get("capped").budget
    share.until = world.clock.now + 0.5  # over its share
    core.run_pass()  # the visit leaves for the share
    core.run_pass()  # nothing else due: the next pass is when the share is back
    slot = core.registry.slots[a]
    assert slot.resume and dict(core.schedule.shares()) == {"capped": slot.due}
    assert core.schedule.pass_at() == pytest.approx(slot.due)
    assert core.schedule.state(world.clock.now, 0.0) == "share-limited: capped"
    world.clock.now = slot.due
    assert core.collapser.budget.allows(world.clock.now)
    core.do_scan()
    assert any(p == a for p, _ in world.collapses)
    core.close()

