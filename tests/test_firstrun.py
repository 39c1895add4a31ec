"""The daemon's first words on a machine where its configuration can take nothing: one info
line per reason, with sizes, from real processes (status and smaps, no page walk)."""

from __future__ import annotations

import re

import pytest

from hugepaged.daemon.firstrun import explain
from hugepaged.kernel import Kernel
from hugepaged.targets import Target
from hugepaged.tunables import Tunables
from kit.daemon_runner import Daemon
from kit.helpers import Workload, proc_status

from .marks import kernel_test

MIB = 1024
SIZE = re.compile(r"([\d.]+) (MiB|GiB)")


def mib(line: str) -> float:
    value, unit = SIZE.search(line).groups()
    return float(value) * (1024 if unit == "GiB" else 1)


def rss_anon_mib(*pids: int) -> float:
    return sum(int(proc_status(p)["RssAnon"].split()[0]) for p in pids) / MIB


def one(lines: list[str], prefix: str) -> str:
    got = [line for line in lines if line.startswith(prefix)]
    assert len(got) == 1, (prefix, lines)
    return got[0]


@pytest.fixture(scope="module")
def workloads():
    """Three processes: plain memory (no MADV_HUGEPAGE), a process that turned THP off for
    itself, one that asked for small pages."""
    plain = Workload(regions=[{"name": "p", "windows": 8}]).start()
    off = Workload(regions=[{"name": "o", "windows": 4}], prctl_thp_disable=True).start()
    small = Workload(regions=[{"name": "s", "windows": 6, "nohugepage": True}]).start()
    try:
        yield plain, off, small
    finally:
        for w in (plain, off, small):
            w.close()


@kernel_test
def test_each_reason_is_one_line_with_its_size(workloads):
    plain, off, small = workloads
    pids = {plain.pid, off.pid, small.pid}
    lines = explain(Kernel(), Tunables(enabled="madvise"), [], None, pids)
    mode = one(lines, "enabled=madvise: only MADV_HUGEPAGE memory is taken; ")
    assert "of anonymous memory in 2 processes (python) is not advised: see targets" in mode
    # plain's 16 MiB and both interpreters' own heaps; never more than they hold
    assert 16 <= mib(mode) <= rss_anon_mib(plain.pid, small.pid)
    prctl = one(lines, "PR_SET_THP_DISABLE: ")
    assert "in 1 process (python) is refused even to MADV_COLLAPSE" in prctl
    assert 8 <= mib(prctl) <= rss_anon_mib(off.pid)
    nohuge = one(lines, "MADV_NOHUGEPAGE: ")
    assert 12 <= mib(nohuge) <= rss_anon_mib(small.pid) and "asked for small pages" in nohuge
    assert lines.index(mode) == 0  # the largest reason first
    assert len(lines) == 3, lines


@kernel_test
def test_never_excluded_and_a_target_that_matches_nothing(workloads):
    plain, _, _ = workloads
    ghost = Target(name="ghost", comm="^no-such-program$", enabled="always")
    lines = explain(Kernel(), Tunables(enabled="never"), [ghost], None, {plain.pid})
    assert one(lines, "enabled=never: no anonymous memory is taken; ")
    assert one(lines, "target ghost (comm='^no-such-program$'): matches no process")
    lines = explain(Kernel(), Tunables(enabled="madvise"), [], re.compile("pyth.*"),
                    {plain.pid})
    excluded = one(lines, "exclude_comm 'pyth.*': ")
    assert "in 1 process (python) is excluded" in excluded and mib(excluded) >= 16


@kernel_test
def test_nothing_is_said_when_the_configuration_can_take_something(workloads):
    plain, off, _ = workloads
    mine = Target(name="mine", pid=(plain.pid,), enabled="always")
    assert explain(Kernel(), Tunables(enabled="madvise"), [mine], None, {plain.pid}) == []
    # a target cannot lift the process's own PR_SET_THP_DISABLE
    theirs = Target(name="theirs", pid=(off.pid,), enabled="always")
    lines = explain(Kernel(), Tunables(enabled="madvise"), [theirs], None, {off.pid})
    assert [line.split(":")[0] for line in lines] == ["PR_SET_THP_DISABLE"], lines


@kernel_test
def test_the_daemon_says_it_at_start_and_not_under_a_target(workloads, tmp_path):
    plain, _, _ = workloads
    with Daemon([plain.pid], sets={"enabled": "madvise"}) as d:
        d.stop()
    said = [r for r in d.records if r.get("event") == "first_run"]
    assert len(said) == 1 and said[0]["level"] == "info", d.stderr()
    assert said[0]["message"].startswith("enabled=madvise: only MADV_HUGEPAGE memory is taken")
    config = tmp_path / "hugepaged.toml"
    config.write_text(f'[[target]]\nname = "mine"\npid = [{plain.pid}]\nenabled = "always"\n')
    with Daemon([plain.pid], sets={"enabled": "madvise"}, config=str(config)) as d:
        d.stop()
    assert not [r for r in d.records if r.get("event") == "first_run"], d.stderr()
