"""`hugepaged run` for real: the daemon as a subprocess, real workload processes, the real kernel.

The kernel's own khugepaged is kept out (THP enabled=never for the kernel, `--set
enabled=madvise` for the daemon). The daemon is always targeted (`--pid`) except in the
discovery test, where it is told to ignore every process but the test's own (exclude_comm).
Workload contents are verified after every collapse.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from hugepaged.daemon import service as service_mod
from hugepaged.daemon.kernel_quiet import QUIET, KernelQuieter
from hugepaged.kernel import Kernel
from hugepaged.kernel.sysfs import ThpSysfs
from kit.daemon_runner import Daemon, hugepaged_cli, settled, slot_of
from kit.helpers import Workload, pmd_mapped_windows, read_knob, saved_thp

from .marks import kernel_test, needs_root

FAST = {"enabled": "madvise", "max_cpu_percent": 0, "scan_sleep_millisecs": 0}


def mapped(w: Workload, name: str) -> list[bool]:
    r = w.regions[name]
    return pmd_mapped_windows(w.pid, r.start, r.end)


def region_windows(w: Workload, name: str) -> list[int]:
    r = w.regions[name]
    return list(range(r.start, r.end, 2 << 20))


def log_time(rec: dict) -> float:
    return datetime.strptime(rec["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def go(d: Daemon) -> None:
    """Start scanning a daemon started with enabled=never and scan_sleep_millisecs=1.

    A long pass holds the loop, so the control socket answers only once it is over: to act
    during a pass, the test must be ready before the pass begins. Changing `enabled` wakes the
    slots, changing a sleep wakes the loop.
    """
    assert d.set("enabled", "madvise")["ok"]
    assert d.set("scan_sleep_millisecs", 0)["ok"]


def collapse_of(pid: int):
    return lambda rec: rec.get("event") == "collapse" and rec.get("pid") == pid


def no_tracebacks(d: Daemon) -> None:
    assert not [line for line in d.lines if "Traceback" in line], "\n".join(d.lines[-30:])


# --------------------------------------------------------------------------------------------
# The daemon collapses what the one-shot command would, window for window


LAYOUT = [
    {"name": "full", "windows": 21, "hugepage": True, "share_after_fork": 0},
    {"name": "sparse_ok", "windows": 5, "fill": "first:300", "hugepage": True,
     "share_after_fork": 0},
    {"name": "sparse_no", "windows": 5, "fill": "first:100", "hugepage": True,
     "share_after_fork": 0},
    {"name": "zeros", "windows": 3, "fill": "first:300", "zero_pages": "first:100",
     "hugepage": True, "share_after_fork": 0},
    {"name": "half", "windows": 3, "fill": "every:2", "hugepage": True, "share_after_fork": 0},
    {"name": "shared_no", "windows": 3, "hugepage": True, "share_after_fork": 300},
    {"name": "shared_ok", "windows": 3, "hugepage": True, "share_after_fork": 200},
    {"name": "plain", "windows": 4},
    {"name": "nohuge", "windows": 3, "nohugepage": True},
    {"name": "empty", "windows": 3, "fill": "none", "hugepage": True},
]
RULES = {"max_ptes_none": 256, "max_ptes_shared": 256, "max_ptes_swap": 64}
WANTED = {"full", "sparse_ok", "zeros", "half", "shared_ok"}


@kernel_test
def test_daemon_collapses_what_collapse_would():
    with saved_thp(enabled="never"), Workload(regions=LAYOUT, fork_child=True) as w:
        sets = [a for k, v in {"enabled": "madvise", **RULES}.items() for a in ("--set",
                                                                                 f"{k}={v}")]
        dry = hugepaged_cli("collapse", "--pid", str(w.pid), "--dry-run", "--json", *sets)
        assert dry.returncode == 0, dry.stderr
        would = {int(x["address"], 16) for x in json.loads(dry.stdout)["windows"]}
        expected = {a for name in WANTED for a in region_windows(w, name)}
        assert expected <= would  # (numpy's own MADV_HUGEPAGE arrays may add a few)
        # Six windows per pass: the cursor stops and resumes inside VMAs, many times over.
        with Daemon(pids=[w.pid], sets={**FAST, **RULES, "pages_to_scan": 6 * 512}) as d:
            st = d.wait_for(lambda st: settled(st, w.pid), timeout=30, what="a settled slot")
            done = d.collapsed(w.pid)
            assert len(done) == len(set(done))  # each window once
            assert set(done) == would
            assert st["counters"]["pages_collapsed"] == len(would)
            assert st["counters"]["collapse_attempts"] == len(would)
            assert st["results"]["EXCEED_NONE_PTE"] >= 5
            assert st["results"]["EXCEED_SHARED_PTE"] >= 3
            assert st["counters"]["full_scans"] >= 1
            no_tracebacks(d)
        for r in LAYOUT:
            assert mapped(w, r["name"]) == [r["name"] in WANTED] * r["windows"], r["name"]
        w.verify()


# --------------------------------------------------------------------------------------------
# Tunables changed live take effect on the next pass


@kernel_test
def test_live_tunables_take_effect_on_the_next_pass():
    n_win = 12
    with saved_thp(enabled="never"), \
            Workload(regions=[{"name": "s", "windows": n_win, "fill": "first:300",
                               "hugepage": True}]) as w, \
            Daemon(pids=[w.pid], sets={**FAST, "max_ptes_none": 0, "pages_to_scan": 4 * 512,
                                       "scan_sleep_millisecs": 300}) as d:
        wins = region_windows(w, "s")
        # max_ptes_none 0: 212 empty PTEs are too many; four windows examined per pass.
        st = d.wait_for(lambda st: settled(st, w.pid), timeout=20, what="first full scan")
        assert st["counters"]["pages_collapsed"] == 0
        assert st["results"]["EXCEED_NONE_PTE"] >= n_win

        # Raised: the next pass collapses. Lowered again as soon as one pass did: not one
        # more window is collapsed after that.
        r = d.cli("set", "max_ptes_none", "511")
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        d.wait_for(lambda st: st["counters"]["pages_collapsed"] > 0, timeout=10)
        assert d.set("max_ptes_none", 0)["ok"]
        # The control socket has its own thread: the change lands at once, mid-pass if a
        # pass is running (as a sysfs write does for the kernel's khugepaged).
        d.wait_for(lambda st: settled(st, w.pid), timeout=20, what="settled after lowering")
        n = d.get("pages_collapsed")
        assert 0 < n < n_win
        assert mapped(w, "s") == [True] * n + [False] * (n_win - n)
        assert d.collapsed(w.pid) == wins[:n]
        by_pass = [log_time(rec) for rec in d.events("collapse")]
        assert max(by_pass) - min(by_pass) >= 0.25 * (n // 4 - 1)  # one pass per 300 ms

        # pages_to_scan raised: the next pass covers every remaining window at once.
        assert d.set("pages_to_scan", 1 << 20)["ok"]
        assert d.set("max_ptes_none", 511)["ok"]
        d.wait_for(lambda st: st["counters"]["pages_collapsed"] == n_win, timeout=10)
        d.wait_log(lambda _: len(d.collapsed(w.pid)) == n_win, what="every collapse logged")
        last = [log_time(rec) for rec in d.events("collapse")][n:]
        assert len(last) == n_win - n and max(last) - min(last) < 0.25  # within one pass
        assert mapped(w, "s") == [True] * n_win
        no_tracebacks(d)
        w.verify()


@kernel_test
def test_a_sleep_change_wakes_the_loop_at_once():
    with saved_thp(enabled="never"), \
            Workload(regions=[{"name": "a", "windows": 6, "hugepage": True}]) as w, \
            Daemon(pids=[w.pid], sets={**FAST, "pages_to_scan": 512,
                                       "scan_sleep_millisecs": 3_600_000}) as d:
        d.wait_for(lambda st: st["counters"]["pages_collapsed"] == 1, timeout=10)
        time.sleep(0.5)
        assert d.get("pages_collapsed") == 1  # one window per pass, then an hour's sleep
        assert d.set("scan_sleep_millisecs", 20)["ok"]
        d.wait_for(lambda st: st["counters"]["pages_collapsed"] == 6, timeout=3)
        assert mapped(w, "a") == [True] * 6
        w.verify()


# --------------------------------------------------------------------------------------------
# Processes that go away


@kernel_test
def test_workload_exiting_mid_pass_leaves_the_daemon_running_and_its_slot_gone():
    with saved_thp(enabled="never"), \
            Workload(regions=[{"name": "big", "windows": 384, "hugepage": True}]) as big, \
            Workload(regions=[{"name": "small", "windows": 4, "hugepage": True}]) as small:
        with Daemon(pids=[big.pid, small.pid],
                    sets={**FAST, "enabled": "never", "scan_sleep_millisecs": 1,
                          "pages_to_scan": 1 << 20}) as d:
            # Killed at its first collapse: the pass is inside it, hundreds of windows to go.
            killed = d.when(collapse_of(big.pid), lambda rec: os.kill(big.pid, signal.SIGKILL))
            go(d)
            assert killed.wait(10), "\n".join(d.raw[-20:])
            st = d.wait_for(lambda st: slot_of(st, big.pid) is None, timeout=10,
                            what="the dead workload's slot gone")
            assert d.alive()
            assert len(d.collapsed(big.pid)) < 384  # it really was mid-pass
            st = d.wait_for(lambda st: settled(st, small.pid), timeout=10)
            assert st["registered"] == 1 and [p["pid"] for p in st["processes"]] == [small.pid]
            assert d.events("unregister", pid=big.pid)
            assert mapped(small, "small") == [True] * 4
            no_tracebacks(d)
        small.verify()


STORM = r"""
import ctypes, os, random, sys, time
ctypes.CDLL(None).prctl(15, b"hpstorm", 0, 0, 0)  # PR_SET_NAME: the children inherit it
heap = bytearray(8 << 20)  # some anonymous memory for each of them
for i in range(0, len(heap), 4096):
    heap[i] = 1
n = int(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
kids = []
for i in range(n):
    pid = os.fork()
    if pid == 0:
        if i % 2:
            os.execv("/bin/true", ["true"])
        time.sleep(random.random() * 0.3)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
print("done", flush=True)
sys.stdin.readline()
"""


@kernel_test
def test_a_storm_of_short_lived_processes_leaves_no_slot_behind(tmp_path):
    """Discovery mode (process connector and /proc walk), every process but ours excluded."""
    cfg = tmp_path / "hugepaged.toml"
    cfg.write_text("exclude_comm = '(?!hpstorm).*'\n")  # fullmatch: all but hpstorm*
    helper = subprocess.Popen([sys.executable, "-c", STORM, "200"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout.readline() == "ready\n"
        with saved_thp(enabled="never"), Daemon(config=str(cfg),
                                                sets={"enabled": "madvise"}) as d:
            st = d.wait_for(lambda st: st["registered"] >= 1, timeout=10)
            assert st["connector"] is True
            assert [p["pid"] for p in st["processes"]] == [helper.pid]
            helper.stdin.write("go\n")
            helper.stdin.flush()
            peak = 1
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = d.status()  # fork events wait out their settle delay as "pending"
                peak = max(peak, st["registered"] + st.get("pending", 0))
                if select.select([helper.stdout], [], [], 0.02)[0]:
                    break
            assert helper.stdout.readline() == "done\n"
            st = d.wait_for(lambda st: st["registered"] == 1, timeout=10,
                            what="every child's slot gone")
            assert [p["pid"] for p in st["processes"]] == [helper.pid]
            def pids(records, event):
                return {r["pid"] for r in records if r.get("event") == event}

            # The status answered first; the log lines of the last exits may still be in the
            # pipe to the log reader.
            d.wait_log(lambda recs: pids(recs, "register") - {helper.pid}
                       <= pids(recs, "unregister"), timeout=5)
            # The storm was seen; children that exit within the settle delay (all of them
            # here: 0.3 s at most) never cost a pidfd or a /proc read, so none registered.
            assert peak > 1
            helper.stdin.write("exit\n")
            helper.stdin.flush()
            helper.wait(10)
            d.wait_for(lambda st: st["registered"] == 0, timeout=10)
            assert d.alive()
            assert d.get("pages_collapsed") == 0
            no_tracebacks(d)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()


# --------------------------------------------------------------------------------------------
# Signals and the kernel's khugepaged


def khugepaged_knobs() -> dict[str, str]:
    return {k: read_knob(k) for k in QUIET}


@kernel_test
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_0_within_a_second_and_restores_the_kernel(sig):
    original = khugepaged_knobs()
    assert original != {k: str(v) for k, v in QUIET.items()}
    with saved_thp(enabled="never", **original), \
            Workload(regions=[{"name": "a", "windows": 256, "hugepage": True}]) as w:
        with Daemon(pids=[w.pid], sets={**FAST, "enabled": "never", "scan_sleep_millisecs": 1,
                                        "pages_to_scan": 1 << 20,
                                        "kernel_khugepaged": "quiet"}) as d:
            assert khugepaged_knobs() == {k: str(v) for k, v in QUIET.items()}
            sent = {}

            def signal_it(rec: dict) -> None:  # in the middle of the pass
                sent["at"] = time.monotonic()
                d.send(sig)

            signalled = d.when(collapse_of(w.pid), signal_it)
            go(d)
            assert signalled.wait(10)
            rc = d.wait_exit(10)
            took = time.monotonic() - sent["at"]
            assert rc == 0 and took < 1.0, (rc, took)
            assert khugepaged_knobs() == original
            assert d.events("kernel_restore")
            no_tracebacks(d)
            collapsed = d.collapsed(w.pid)
            assert 0 < len(collapsed) < 256
        # Every window is whole: collapsed exactly where the log says, untouched elsewhere.
        assert [a for a, m in zip(region_windows(w, "a"), mapped(w, "a"), strict=True)
                if m] == sorted(collapsed)
        w.verify()


@kernel_test
def test_sigkill_with_quiet_leaves_a_state_file_that_restore_kernel_and_the_next_start_use(
        tmp_path):
    state_file = tmp_path / "kernel-khugepaged.json"  # one for the three daemons below
    at = {"state_file": str(state_file)}
    restore = ("restore-kernel", "--state-file", str(state_file))
    original = khugepaged_knobs()
    quiet = {k: str(v) for k, v in QUIET.items()}
    target = subprocess.Popen(["sleep", "300"])
    try:
        with saved_thp(enabled="never", **original):
            # 1. SIGKILL: nothing can restore; the state file holds the kernel's values.
            with Daemon(pids=[target.pid], sets={"enabled": "madvise",
                                                 "kernel_khugepaged": "quiet"}, **at) as d:
                assert khugepaged_knobs() == quiet
                assert json.loads(state_file.read_text()) == {k: int(v)
                                                              for k, v in original.items()}
                d.stop(signal.SIGKILL)
            assert khugepaged_knobs() == quiet and state_file.exists()
            r = hugepaged_cli(*restore)
            assert (r.returncode, r.stdout) == (0, "restored\n"), r.stderr
            assert khugepaged_knobs() == original and not state_file.exists()
            r = hugepaged_cli(*restore)
            assert (r.returncode, r.stdout) == (0, "nothing to restore\n")

            # 2. SIGKILL again; this time the next start (even with "leave") puts them back.
            with Daemon(pids=[target.pid], sets={"enabled": "madvise",
                                                 "kernel_khugepaged": "quiet"}, **at) as d:
                assert khugepaged_knobs() == quiet
                d.stop(signal.SIGKILL)
            assert khugepaged_knobs() == quiet
            with Daemon(pids=[target.pid], sets={"enabled": "madvise"}, **at) as d:
                assert khugepaged_knobs() == original and not state_file.exists()
                assert d.events("kernel_restore")
                rc = d.stop()
                assert rc == 0
            assert khugepaged_knobs() == original

            # 3. A normal stop of a quiet daemon leaves nothing behind: no state, no lock.
            with Daemon(pids=[target.pid], sets={"enabled": "madvise",
                                                 "kernel_khugepaged": "quiet"}, **at) as d:
                assert khugepaged_knobs() == quiet
                assert Path(f"{state_file}.lock").exists()
                assert d.stop() == 0
            assert khugepaged_knobs() == original
            assert sorted(p.name for p in tmp_path.iterdir()
                          if p.name.startswith(state_file.name)) == []
    finally:
        target.kill()
        target.wait()


# --------------------------------------------------------------------------------------------
# KernelQuieter and the service's rollback, against a fixture sysfs


@pytest.fixture
def fake_thp(tmp_path) -> ThpSysfs:
    d = tmp_path / "sys" / "kernel" / "mm" / "transparent_hugepage"
    (d / "khugepaged").mkdir(parents=True)
    (d / "enabled").write_text("always [madvise] never\n")
    for k, v in {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000,
                 "alloc_sleep_millisecs": 60000, "max_ptes_none": 511, "max_ptes_swap": 64,
                 "max_ptes_shared": 256, "defrag": 1, "pages_collapsed": 0,
                 "full_scans": 0}.items():
        (d / "khugepaged" / k).write_text(f"{v}\n")
    return ThpSysfs(str(tmp_path / "sys"))


def test_quieter_saves_restores_and_recovers(fake_thp, tmp_path):
    state = tmp_path / "run" / "state.json"
    q = KernelQuieter(fake_thp, str(state))
    q.quiet()
    assert fake_thp.snapshot(tuple(QUIET)) == QUIET
    assert json.loads(state.read_text()) == {"pages_to_scan": 4096,
                                             "scan_sleep_millisecs": 10000}
    q.restore()
    assert fake_thp.snapshot(tuple(QUIET)) == {"pages_to_scan": 4096,
                                               "scan_sleep_millisecs": 10000}
    assert not state.exists()
    q.restore()  # twice is harmless

    # A run that died quiet: the next one must save the kernel's values, not the quiet ones.
    dead = KernelQuieter(fake_thp, str(state))
    dead.quiet()
    dead._release()  # what its exit does to the lock
    q2 = KernelQuieter(fake_thp, str(state))
    q2.quiet()
    assert q2.saved == {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000}
    q2.restore()
    assert fake_thp.read("scan_sleep_millisecs") == 10000
    assert not KernelQuieter(fake_thp, str(state)).recover()


@needs_root
def test_a_crash_of_the_loop_still_restores_the_kernel(fake_thp, tmp_path, monkeypatch):
    state = tmp_path / "state.json"
    sleeper = subprocess.Popen(["sleep", "300"])
    kernel = Kernel(sys_root=str(Path(fake_thp.dir).parents[2]))
    svc = service_mod.Service(kernel, None, {"kernel_khugepaged": "quiet",
                                             "enabled": "madvise"}, pids=[sleeper.pid],
                              state_file=str(state))
    seen = {}

    def crash() -> bool:
        seen["knobs"] = fake_thp.snapshot(tuple(QUIET))
        seen["state"] = state.exists()
        raise RuntimeError("the loop crashed")

    monkeypatch.setattr(svc.core, "do_scan", crash)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        with pytest.raises(RuntimeError, match="the loop crashed"):
            svc.run()
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        for s, h in handlers.items():
            signal.signal(s, h)
        sleeper.kill()
        sleeper.wait()
    assert seen == {"knobs": QUIET, "state": True}
    assert fake_thp.snapshot(tuple(QUIET)) == {"pages_to_scan": 4096,
                                               "scan_sleep_millisecs": 10000}
    assert not state.exists()
