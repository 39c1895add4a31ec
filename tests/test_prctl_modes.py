"""Every PR_SET_THP_DISABLE mode, honoured as the kernel's khugepaged honours it.

prctl(PR_SET_THP_DISABLE, 1, 0) turns THP off for the whole process (/proc/PID/status says
THP_enabled: 0); 6.18's prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED) keeps it
only in the process's MADV_HUGEPAGE VMAs, even at enabled=always, while status still says
THP_enabled: 1 (smaps THPeligible is 0 for the other VMAs).

The oracle: the kernel's own khugepaged, on the same layout in a twin process (an advised and
an unadvised region, each two 2 MiB windows of 4 KiB pages), at global `always` and
`madvise`, with the kernel's khugepaged run flat out for two full scans. hugepaged (a daemon
with the global policy, which is the kernel's, the kernel's khugepaged paused meanwhile)
must collapse exactly the windows the kernel collapses, and `scan` must name the reason.
A target with enabled=always does not override the opt-out: the daemon learns it from the
syscall tracepoint (the kernel at `madvise` shows it nowhere in /proc).
"""

from __future__ import annotations

import json
import time

import pytest

from kit.daemon_runner import Daemon, hugepaged_cli, settled
from kit.helpers import (
    KHUGEPAGED_PAUSED,
    Workload,
    khugepaged_full_scans,
    pmd_mapped_windows,
    proc_status,
    saved_thp,
    smaps_vma,
)

from .marks import ORACLE

pytestmark = ORACLE

EXCEPT_ADVISED = 2  # PR_THP_DISABLE_EXCEPT_ADVISED (1 << 1); the machine's headers lack it
MODES = {"none": {}, "disable": {"prctl_thp_disable": True},
         "except_advised": {"prctl_thp_disable": True, "prctl_thp_flags": EXCEPT_ADVISED}}
# The daemon's pace: its defaults come from the kernel's, which are paused here.
PACE = {"pages_to_scan": 4096, "scan_sleep_millisecs": 10}
LAYOUT = [{"name": "advised", "windows": 2, "hugepage": True},
          {"name": "plain", "windows": 2}]


def collapsed(w: Workload) -> dict[str, list[bool]]:
    return {n: pmd_mapped_windows(w.pid, r.start, r.end) for n, r in w.regions.items()}


def workloads() -> dict[str, Workload]:
    return {mode: Workload(regions=LAYOUT, **spec) for mode, spec in MODES.items()}


def hugepaged_run(enabled: str) -> tuple[dict, dict]:
    """What the daemon collapses (global policy = the kernel's) and what `scan` says, with
    the kernel's khugepaged paused (a sentinel registered first: a registration into an empty
    list would wake it for one pass)."""
    sentinel = Workload(regions=[{"name": "s", "windows": 1, "fill": "first:1",
                                  "hugepage": True}])
    with saved_thp(**KHUGEPAGED_PAUSED), sentinel:
        time.sleep(0.05)
        ws = workloads()
        try:
            for w in ws.values():
                w.start()
            _check_modes(ws)
            why = {}
            for mode, w in ws.items():
                res = hugepaged_cli("scan", "--pid", str(w.pid), "--json")
                assert res.returncode == 0, res.stderr
                why[mode] = json.loads(res.stdout)["processes"][0]["ineligible"]
            pids = [w.pid for w in ws.values()]
            with Daemon(pids=pids, sets={"enabled": enabled, **PACE}, log_level="info") as d:
                d.wait_for(lambda st: all(settled(st, p) for p in pids), timeout=30,
                           what="every process settled")
            out = {mode: collapsed(w) for mode, w in ws.items()}
            for w in ws.values():
                w.verify()
            return out, why
        finally:
            for w in ws.values():
                w.close()


def kernel_run() -> dict:
    """What the kernel's khugepaged collapses in two full scans, flat out."""
    ws = workloads()
    try:
        for w in ws.values():
            w.start()
        _check_modes(ws)
        khugepaged_full_scans(2, timeout=60)
        out = {mode: collapsed(w) for mode, w in ws.items()}
        for w in ws.values():
            w.verify()
        return out
    finally:
        for w in ws.values():
            w.close()


def _check_modes(ws: dict[str, Workload]) -> None:
    """The layout as the kernel reports it: status for the whole-process opt-out, smaps
    THPeligible computed with the mode."""
    assert proc_status(ws["disable"].pid)["THP_enabled"] == "0"
    assert proc_status(ws["except_advised"].pid)["THP_enabled"] == "1"


@pytest.mark.parametrize("enabled", ["always", "madvise"])
def test_prctl_modes_against_the_kernels_khugepaged(enabled):
    with saved_thp(enabled=enabled, max_ptes_none=511):
        ours, why = hugepaged_run(enabled)
        kernels = kernel_run()
    assert ours == kernels
    # The kernel's verdicts, spelled out: the opt-out wins over `always`; MADV_HUGEPAGE over
    # the opt-out; nothing over the whole-process disable.
    pmd = {m: {n: all(v) for n, v in r.items()} for m, r in kernels.items()}
    assert pmd == {"none": {"advised": True, "plain": enabled == "always"},
                   "disable": {"advised": False, "plain": False},
                   "except_advised": {"advised": True, "plain": False}}
    # `scan` names the reason (before anything was collapsed).
    assert set(why["disable"]) == {"THP_DISABLED_PRCTL"}
    assert why["disable"]["THP_DISABLED_PRCTL"] >= 4 * 2048
    plain = "THP_EXCEPT_ADVISED_PRCTL" if enabled == "always" else "NO_MADV_HUGEPAGE"
    assert why["except_advised"].get(plain, 0) >= 2 * 2048, why["except_advised"]
    assert "THP_EXCEPT_ADVISED_PRCTL" not in why["none"]


def test_thp_eligible_is_the_kernels_witness():
    """At the kernel's `always` smaps THPeligible is 0 for an unadvised VMA of an
    EXCEPT_ADVISED process and 1 for its advised one: what hugepaged reads the mode from."""
    with saved_thp(enabled="always", **KHUGEPAGED_PAUSED), Workload(
            regions=LAYOUT, **MODES["except_advised"]) as w:
        assert smaps_vma(w.pid, w.regions["plain"].start)["THPeligible"] == "0"
        assert smaps_vma(w.pid, w.regions["advised"].start)["THPeligible"] == "1"


def test_a_target_does_not_override_the_opt_out(tmp_path):
    """Kernel at `madvise`: nothing in /proc shows EXCEPT_ADVISED. A target with
    enabled=always takes unadvised memory, except in the process that opted out while the
    daemon watched (the syscall tracepoint carries the flag); a twin without it is taken."""
    spec = {"regions": [{"name": "a", "windows": 2, "nohugepage": True}]}
    with saved_thp(enabled="madvise", **KHUGEPAGED_PAUSED), Workload(spec) as optout, \
            Workload(spec) as twin:
        pids = [optout.pid, twin.pid]
        cfg = tmp_path / "hugepaged.toml"
        cfg.write_text(f'[[target]]\nname = "t"\npid = {pids}\nenabled = "always"\n')
        # Unpaced: the syscall records are read only while the CPU cap allows work, and the
        # target's first collapses (the processes' heaps) may spend it for a while.
        with Daemon(pids=pids, config=str(cfg), sets={**PACE, "max_cpu_percent": 0}) as d:
            assert d.status()["madvise_source"] == "tracepoints"
            d.wait_for(lambda st: all(settled(st, p) for p in pids), timeout=30,
                       what="both settled (VM_NOHUGEPAGE)")
            assert optout.command(f"thp_disable 1 {EXCEPT_ADVISED}")["get"] == 3
            d.wait_event("prctl", pid=optout.pid)
            for w in (optout, twin):  # a fresh VMA over the region: no more VM_NOHUGEPAGE
                assert w.command("remap a")["ok"]
            r = twin.regions["a"]
            deadline = time.monotonic() + 30
            while not all(pmd_mapped_windows(twin.pid, r.start, r.end)):
                assert time.monotonic() < deadline, "the twin was not collapsed"
                time.sleep(0.05)
            # remap ends with prctl(PR_SET_THP_DISABLE, 1, EXCEPT_ADVISED) again: that record
            # wakes the slot (before it is logged), so a settled slot after it was visited.
            d.wait_log(lambda recs: len([x for x in recs if x.get("event") == "prctl"
                                         and x.get("pid") == optout.pid
                                         and x.get("flags") == EXCEPT_ADVISED]) >= 2,
                       what="the remap's prctl traced")
            d.wait_for(lambda st: settled(st, optout.pid), timeout=30, what="opt-out settled")
            r = optout.regions["a"]
            assert not any(pmd_mapped_windows(optout.pid, r.start, r.end))
            # (its heap went before the prctl: the target took unadvised memory there too)
            assert [a for a in d.collapsed(optout.pid) if r.start <= a < r.end] == []
        optout.verify()
        twin.verify()
