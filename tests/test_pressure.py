"""Memory pressure on the fixture kernel of test_registry: collapses pause while PSI memory
`some avg10` is above max_memory_pressure and resume below it; a target matched by cgroup is
judged by its process's own cgroup2 group. With real pressure in a memory cgroup at its limit:
test_pressure_kernel.py."""

from __future__ import annotations

import logging

from hugepaged.kernel.pressure import parse_some_avg10
from hugepaged.targets import Target

from .test_daemon_targets import core_with
from .test_registry import layout, sleepers, world  # noqa: F401  (fixtures)


def test_parse_psi():
    text = ("some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n"
            "full avg10=2.00 avg60=1.00 avg300=0.00 total=45\n")
    assert parse_some_avg10(text) == 12.5


def test_machine_pressure_pauses_collapses_and_they_resume(world, sleepers, caplog):  # noqa: F811
    (pid,) = sleepers(1)
    layout(world, pid, windows=4)
    core = world.make_core(pages_to_scan=65536, max_memory_pressure=20)
    core.discover()
    world.kernel.psi = 35.0
    with caplog.at_level(logging.INFO, logger="hugepaged"):
        core.run_pass()
        core.run_pass()  # nothing else due: the next pass comes when the pause is re-checked
        assert world.collapses == []
        assert core.schedule.state(world.clock.now, 0.0) == "memory-pressure"
        world.kernel.psi = 5.0
        world.clock.now += 1.0
        core.run_pass()
    assert len(world.collapses) == 4
    lines = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "pressure"]
    assert len(lines) == 2 and "paused" in lines[0] and "resumed" in lines[1], lines


def test_zero_never_pauses(world, sleepers):  # noqa: F811
    (pid,) = sleepers(1)
    layout(world, pid, windows=2)
    core = world.make_core(pages_to_scan=65536, max_memory_pressure=0)
    core.discover()
    world.kernel.psi = 99.0
    core.run_pass()
    assert len(world.collapses) == 2


def test_a_target_by_cgroup_is_judged_by_its_own_cgroup(world, sleepers):  # noqa: F811
    """The machine is under pressure, but the target's own cgroup is not: it goes on; the
    process judged by the machine waits. Then the target's cgroup comes under pressure."""
    a, b = sleepers(2)
    for pid in (a, b):
        layout(world, pid, windows=2)
    world.kernel.procfs.procs[a].cgroup2 = "/db"
    core = core_with(world, [Target("db", cgroup="/db", max_memory_pressure=20)],
                     pages_to_scan=65536, max_memory_pressure=20)
    core.discover()
    world.kernel.psi, world.kernel.psi_cgroups["/db"] = 50.0, 1.0
    core.run_pass()
    assert {p for p, _ in world.collapses} == {a}
    world.collapses.clear()
    world.kernel.procfs.procs[a].huge.clear()
    world.kernel.procfs.procs[a].minflt += 1
    world.kernel.psi, world.kernel.psi_cgroups["/db"] = 1.0, 50.0
    world.clock.now += 5.0
    core.run_pass()
    assert {p for p, _ in world.collapses} == {b}
