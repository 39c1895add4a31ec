"""The command line as a user meets it: `python -m hugepaged ...` in a subprocess.

Output shapes, exit statuses, one-line errors (never a traceback). Tests that scan or collapse a
real workload are kernel tests (root, the machine lock, the kernel's khugepaged kept out with
`enabled=never`); the refusals of bad input need neither.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit.helpers import (
    HPAGE,
    Workload,
    anon_huge_kb,
    drain_lru,
    pmd_mapped_windows,
)

from .marks import kernel_test, needs_thp

ROOT = os.geteuid() == 0


SCAN_KEYS = {"version", "tunables", "target", "referenced_known", "processes", "total",
             "skipped", "kernel_mthp_collapse"}
PROCESS_KEYS = {"pid", "comm", "target", "anon_kb", "anon_huge_kb", "coverage_pct",
                "eligible_windows", "collapsible", "results", "ineligible", "shmem_kb", "thp"}
TOTAL_KEYS = {"processes", "anon_kb", "anon_huge_kb", "eligible_windows", "collapsible",
              "results", "ineligible", "shmem_kb", "thp"}
COLLAPSE_KEYS = {"version", "pid", "comm", "dry_run", "force", "target", "max_cpu_percent",
                 "referenced_known", "windows", "collapsed", "would_collapse", "failed",
                 "skipped", "seconds", "rss_growth_kb", "rss_growth_predicted_kb", "ineligible"}
WINDOW_KEYS = {"address", "result", "errno", "ms", "attempts"}
MADVISE = ["--set", "enabled=madvise"]


def hugepaged(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hugepaged", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def assert_one_line_error(res: subprocess.CompletedProcess, status: int, *words: str) -> str:
    assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert res.stdout == ""
    return lines[0]


def absent_pid() -> int:
    """A valid pid (below pid_max) that no process has now; pid_max itself is refused as
    bad input (exit 2) before any process is looked for."""
    top = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(p for p in range(top - 1, 1, -1) if not Path(f"/proc/{p}").exists())


def hg_windows(pid: int) -> int:
    """Aligned 2 MiB windows in private anonymous VMAs with `hg` and without `nh`, from smaps
    (what enabled=madvise makes candidates), counted here without hugepaged's code."""
    total, start, end, path, anon_private = 0, 0, 0, "", False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(.*)$", line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                path = m.group(5).strip()
                anon_private = (m.group(3)[3] == "p" and m.group(4) == "0"
                                and (path in ("", "[heap]", "[stack]")
                                     or path.startswith("[anon:")))
            elif line.startswith("VmFlags:"):
                flags = set(line.split()[1:])
                if anon_private and "hg" in flags and "nh" not in flags:
                    lo = (start + HPAGE - 1) & ~(HPAGE - 1)
                    hi = end & ~(HPAGE - 1)
                    total += max(0, hi - lo) // HPAGE
    return total


LAYOUT = [
    {"name": "full", "windows": 2, "fill": "all", "hugepage": True},
    {"name": "k400", "windows": 1, "fill": "first:400", "hugepage": True},  # 112 none
    {"name": "single", "windows": 1, "fill": "first:1", "hugepage": True},
    {"name": "empty", "windows": 1, "fill": "none", "hugepage": True},
    {"name": "plain", "windows": 1, "fill": "all"},
]


# --------------------------------------------------------------------------------------------
# scan


@kernel_test
def test_scan_json_shape(thp_never):
    with Workload(regions=LAYOUT) as w:
        drain_lru()
        res = hugepaged("scan", "--pid", str(w.pid), "--json", *MADVISE,
                        "--set", "max_ptes_none=200")
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        doc = json.loads(res.stdout)
        assert set(doc) == SCAN_KEYS
        assert doc["version"] == 1
        assert doc["referenced_known"] is False
        assert doc["skipped"] == []
        assert doc["tunables"]["enabled"] == "madvise"
        assert doc["tunables"]["max_ptes_none"] == 200
        assert {"max_ptes_swap", "max_ptes_shared", "pages_to_scan"} <= set(doc["tunables"])
        (p,) = doc["processes"]
        assert set(p) == PROCESS_KEYS
        assert p["pid"] == w.pid
        assert p["comm"] == Path(f"/proc/{w.pid}/comm").read_text().strip()
        assert p["anon_kb"] >= (2 * 512 + 400 + 1 + 512) * 4
        assert p["anon_huge_kb"] == 0 and p["coverage_pct"] == 0.0
        # full x2 and k400 SUCCEED, single EXCEED_NONE_PTE, empty PMD_NONE; the interpreter's
        # own memory may add windows (numpy MADV_HUGEPAGEs big arrays).
        res_counts = p["results"]
        assert res_counts.get("SUCCEED", 0) >= 3
        assert res_counts.get("EXCEED_NONE_PTE", 0) >= 1
        assert res_counts.get("PMD_NONE", 0) >= 1
        assert all(isinstance(n, int) and n > 0 for n in res_counts.values())
        assert sum(res_counts.values()) == p["eligible_windows"] == hg_windows(w.pid)
        assert p["collapsible"] == res_counts.get("SUCCEED", 0)
        assert set(doc["total"]) == TOTAL_KEYS
        assert doc["total"]["processes"] == 1
        for k in ("anon_kb", "anon_huge_kb", "eligible_windows", "collapsible", "results",
                  "shmem_kb", "thp"):
            assert doc["total"][k] == p[k], k

        # After collapsing the SUCCEED windows: coverage and PMD_MAPPED.
        assert hugepaged("collapse", "--pid", str(w.pid), *MADVISE,
                         "--set", "max_ptes_none=200").returncode == 0
        w.verify()
        doc = json.loads(hugepaged("scan", "--pid", str(w.pid), "--json", *MADVISE,
                                   "--set", "max_ptes_none=200").stdout)
        (p,) = doc["processes"]
        assert p["anon_huge_kb"] >= 3 * 2048
        assert p["results"].get("PMD_MAPPED", 0) >= 3
        assert p["coverage_pct"] == round(100.0 * p["anon_huge_kb"] / p["anon_kb"], 1)


@kernel_test
def test_scan_human_table(thp_never):
    with Workload(regions=LAYOUT) as w:
        drain_lru()
        res = hugepaged("scan", "--pid", str(w.pid), *MADVISE, "--set", "max_ptes_none=200")
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        lines = res.stdout.splitlines()
        mine = [ln for ln in lines if ln.split() and ln.split()[0] == str(w.pid)]
        assert len(mine) == 1, res.stdout
        # The plain VMA of LAYOUT has no MADV_HUGEPAGE: said, with its size.
        (why,) = [ln for ln in lines if ln.startswith(f"pid {w.pid} (python): not eligible: ")]
        assert "NO_MADV_HUGEPAGE (enabled=madvise: a target with enabled=always would take " \
               "it)" in why, why
        assert "SUCCEED:" in mine[0] and "EXCEED_NONE_PTE:" in mine[0]
        assert any(ln.split() and ln.split()[0] == "TOTAL" for ln in lines), res.stdout
        assert "referenced" in res.stdout  # says LACK_REFERENCED_PAGE is not applied


@kernel_test
def test_scan_every_process(thp_never):
    with Workload(regions=LAYOUT) as w:
        res = hugepaged("scan", "--json", *MADVISE)
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        doc = json.loads(res.stdout)
        pids = [p["pid"] for p in doc["processes"]]
        assert w.pid in pids
        assert len(pids) == len(set(pids)) == doc["total"]["processes"]
        assert doc["total"]["anon_kb"] == sum(p["anon_kb"] for p in doc["processes"])
        assert all(isinstance(s, str) and "\n" not in s for s in doc["skipped"])
        table = hugepaged("scan", *MADVISE)
        assert table.returncode == 0 and "TOTAL" in table.stdout and str(w.pid) in table.stdout


# --------------------------------------------------------------------------------------------
# Refusals: bad tunables, no such process, not root


BAD_SETS = [
    ("foo=1", ["foo"]),
    ("max_ptes_none=512", ["max_ptes_none", "0..511"]),
    ("max_ptes_shared=-1", ["max_ptes_shared", "0..511"]),
    ("pages_to_scan=0", ["pages_to_scan", "1..4294967295"]),
    ("scan_sleep_millisecs=4294967296", ["scan_sleep_millisecs", "0..4294967295"]),
    ("enabled=sometimes", ["enabled", "always", "madvise", "never"]),
    ("max_ptes_none", ["max_ptes_none"]),
]


@needs_thp
@pytest.mark.parametrize(("command", "assignment", "words"),
                         [("scan", a, w) for a, w in BAD_SETS]
                         + [("collapse", a, w) for a, w in BAD_SETS[1:4]],
                         ids=[f"scan:{a}" for a, _ in BAD_SETS]
                         + [f"collapse:{a}" for a, _ in BAD_SETS[1:4]])
def test_invalid_set_exits_2(command, assignment, words):
    # An absent pid: if the tunable were checked after the process, the status would be 5.
    res = hugepaged(command, "--pid", str(absent_pid()), "--set", "max_ptes_none=10",
                    "--set", assignment)
    assert_one_line_error(res, 2, *words)


@needs_thp
@pytest.mark.parametrize("command", [["scan", "--json"], ["collapse"], ["collapse", "--force"]])
def test_no_such_pid_exits_5(command):
    res = hugepaged(*command, "--pid", str(absent_pid()))
    if not ROOT:
        assert_one_line_error(res, 3)
        return
    assert_one_line_error(res, 5, str(absent_pid()))


@needs_thp
@pytest.mark.parametrize("command", [["scan"], ["scan", "--json"],
                                     ["collapse", "--pid", "1"], ["collapse", "--pid", "self"]])
def test_not_root_exits_3(command):
    """hugepaged run as nobody: one line, status 3.

    The interpreter lives under /root here, which nobody cannot read, so the child imports
    hugepaged as root and then drops to uid/gid 65534 (and no groups, no capabilities) before
    the command runs: the same code path as a non-root `hugepaged`. The modules a command
    imports only when it runs are imported before the drop too, for the same reason.
    """
    if not ROOT:
        res = hugepaged(*[a.replace("self", str(os.getpid())) for a in command])
        assert_one_line_error(res, 3)
        return
    argv = [str(os.getpid()) if a == "self" else a for a in command]
    code = (
        "import os, sys\n"
        "from hugepaged.cli import main\n"
        "import gettext, locale, hugepaged.report, hugepaged.scan.process, hugepaged.collapse\n"
        "import hugepaged.kernel.madvise\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "assert os.geteuid() == 65534\n"
        f"sys.exit(main({argv!r}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd="/")
    line = assert_one_line_error(res, 3)
    assert "root" in line


# --------------------------------------------------------------------------------------------
# collapse


@kernel_test
def test_collapse_json_counts(thp_never):
    with Workload(regions=LAYOUT) as w:
        drain_lru()
        res = hugepaged("collapse", "--pid", str(w.pid), "--json", *MADVISE,
                        "--set", "max_ptes_none=200")
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        w.verify()
        doc = json.loads(res.stdout)
        assert set(doc) == COLLAPSE_KEYS
        assert doc["version"] == 1 and doc["pid"] == w.pid
        assert doc["dry_run"] is False and doc["force"] is False
        assert doc["referenced_known"] is False
        for win in doc["windows"]:
            assert set(win) == WINDOW_KEYS
            assert win["result"] == "SUCCEED" and win["errno"] is None
            assert isinstance(win["ms"], float | int) and win["ms"] >= 0
        ours = {int(x["address"], 16) for x in doc["windows"]}
        r = w.regions
        assert {a for a in ours if any(x.start <= a < x.end for x in r.values())} == {
            r["full"].start, r["full"].start + HPAGE, r["k400"].start}
        assert doc["collapsed"] == len(doc["windows"]) >= 3
        assert doc["failed"] == {}
        assert doc["skipped"].get("EXCEED_NONE_PTE", 0) >= 1  # single
        assert doc["skipped"].get("PMD_NONE", 0) >= 1  # empty
        assert "SUCCEED" not in doc["skipped"]
        assert doc["rss_growth_kb"] >= 112 * 4  # k400's 112 empty pages filled
        assert doc["seconds"] >= 0
        assert pmd_mapped_windows(w.pid, r["full"].start, r["full"].end) == [True, True]
        assert pmd_mapped_windows(w.pid, r["k400"].start, r["k400"].end) == [True]
        assert pmd_mapped_windows(w.pid, r["single"].start, r["single"].end) == [False]
        assert pmd_mapped_windows(w.pid, r["plain"].start, r["plain"].end) == [False]
        assert anon_huge_kb(w.pid, r["full"].start) == 2 * 2048

        # The human summary of a second pass: nothing left but the skipped ones.
        drain_lru()
        res = hugepaged("collapse", "--pid", str(w.pid), *MADVISE, "--set", "max_ptes_none=200")
        assert res.returncode == 0 and res.stderr == ""
        assert f"pid {w.pid}" in res.stdout and "skipped:" in res.stdout
        assert "PMD_MAPPED:" in res.stdout and "EXCEED_NONE_PTE:1" in res.stdout
        w.verify()


@kernel_test
def test_collapse_dry_run_json(thp_never):
    with Workload(regions=LAYOUT) as w:
        drain_lru()
        res = hugepaged("collapse", "--pid", str(w.pid), "--json", "--dry-run", *MADVISE,
                        "--set", "max_ptes_none=200")
        assert res.returncode == 0, res.stderr
        w.verify()
        doc = json.loads(res.stdout)
        assert doc["dry_run"] is True
        assert len(doc["windows"]) >= 3
        assert doc["collapsed"] == 0 and doc["would_collapse"] == len(doc["windows"])
        for r in w.regions.values():
            assert not any(pmd_mapped_windows(w.pid, r.start, r.end)), r.name
        assert doc["rss_growth_kb"] == 0


@kernel_test
@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_process_exits_between_scan_and_collapse(thp_never, reap, monkeypatch, capsys):
    """Deterministic: the scan step is wrapped to kill the workload right after it."""
    import hugepaged.scan.process as scan_mod
    from hugepaged.cli import main

    real_scan = scan_mod.scan_process
    with Workload(regions=LAYOUT) as w:
        def scan_then_kill(*args, **kwargs):
            scan = real_scan(*args, **kwargs)
            w.proc.kill()
            if reap:
                w.proc.wait()
            else:
                deadline = time.monotonic() + 5
                while not Path(f"/proc/{w.pid}/stat").read_text().split(") ")[1].startswith(
                        "Z"):
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
            return scan

        monkeypatch.setattr(scan_mod, "scan_process", scan_then_kill)
        rc = main(["collapse", "--pid", str(w.pid), "--json", *MADVISE])
        out, err = capsys.readouterr()
    assert rc in (0, 5), (rc, out, err)
    if rc == 5:
        assert out == ""
        assert len(err.strip().splitlines()) == 1 and str(w.pid) in err, err
    else:
        json.loads(out)


@kernel_test
def test_process_killed_mid_collapse(thp_never):
    """A subprocess `hugepaged collapse` whose target dies while it works: no traceback.

    The command is stopped (SIGSTOP) once the first window is PMD-mapped, the target is killed
    and reaped, then the command continues.
    """
    with Workload(regions=[{"name": "big", "windows": 192, "fill": "all",
                            "hugepage": True}]) as w:
        r = w.regions["big"]
        drain_lru()
        proc = subprocess.Popen([sys.executable, "-m", "hugepaged", "collapse", "--pid",
                                 str(w.pid), "--json", *MADVISE],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stopped = False
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if pmd_mapped_windows(w.pid, r.start, r.start + HPAGE)[0]:
                    proc.send_signal(signal.SIGSTOP)
                    stopped = True
                    break
                time.sleep(0.001)
            mid = stopped and not all(pmd_mapped_windows(w.pid, r.start, r.end))
            w.proc.kill()
            w.proc.wait()
        finally:
            if stopped:
                proc.send_signal(signal.SIGCONT)
            out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode in (0, 5), (proc.returncode, err)
    if proc.returncode == 5:
        assert out == "" and len(err.strip().splitlines()) == 1 and str(w.pid) in err, err
    assert mid, "the collapse finished before the target could be killed mid-way"


def test_piped_lines_are_never_broken():
    """Piped, a long line (a "not eligible" list, top's daemon line) stays one line, so
    scripts that grep it find all of it."""
    code = ("from hugepaged.report import console\n"
            "console().print('pid 1 (x): not eligible: ' + ', '.join(['1.0M FILE_BACKED'] * 20))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(r.stdout.splitlines()) == 1 and r.stdout.count("FILE_BACKED") == 20, r.stdout


def test_building_the_command_line_loads_no_heavy_module():
    """A CLI must start fast: the parser of every subcommand is built (as for --version or
    --help) without numpy, rich, or the configuration and target modules, which the
    commands import where they use them."""
    code = ("import sys\n"
            "from hugepaged.cli import build_parser\n"
            "build_parser()\n"
            "heavy = ('numpy', 'rich', 'hugepaged.config', 'hugepaged.targets', "
            "'hugepaged.scan', 'hugepaged.daemon.service')\n"
            "print(sorted({m.split('.')[0] if not m.startswith('hugepaged') else m "
            "for m in sys.modules if m.startswith(heavy)}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("cmd", [
    ["run", "--page-idle", "/tmp/hugepaged-no-such-bitmap", "--config", "/nonexistent.toml"],
    ["scan", "--proc-root", "/tmp"], ["scan", "--sys-root", "/tmp"],
    ["collapse", "--pid", "1", "--dry-run", "--page-idle", "/etc/shadow"],
    ["top", "--iterations", "1", "--proc-root", "/tmp"],
    ["restore-kernel", "--sys-root", "/tmp"], ["restore-kernel", "--proc-root", "/tmp"],
])
def test_the_installed_command_offers_no_fixture_roots(cmd):
    """A root command told to mark idle bits in a file of the caller's choosing wrote it, and
    one given a 0600 file quoted it in an error: only tests/hugepaged_fixture.py has them."""
    res = hugepaged(*cmd)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "unrecognized arguments" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.exists("/tmp/hugepaged-no-such-bitmap")


THREADED = ("import threading, time, os, sys\n"
            "t = threading.Thread(target=time.sleep, args=(60,), daemon=True); t.start()\n"
            "print(t.native_id, flush=True); sys.stdin.read()\n")


@pytest.mark.parametrize("cmd", [["scan"], ["collapse", "--dry-run"], ["top", "--iterations", "1"],
                                 ["run", "--config", "/nonexistent.toml"]], ids=lambda c: c[0])
def test_pid_of_a_thread_or_a_kernel_thread_says_what_it_is(cmd):
    """Once: `collapse --pid TID` and `--pid 2` said "process has exited", `scan --pid TID`
    showed the thread as a process."""
    proc = subprocess.Popen([sys.executable, "-c", THREADED], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        tid = int(proc.stdout.readline())
        res = hugepaged(cmd[0], "--pid", str(tid), *cmd[1:])
        assert_one_line_error(res, 2, f"--pid {tid}: a thread of process {proc.pid}, not a "
                                      f"process (give --pid {proc.pid})")
    finally:
        proc.kill()
        proc.wait()
    res = hugepaged(cmd[0], "--pid", "2", *cmd[1:])
    assert_one_line_error(res, 2, "--pid 2: kthreadd is a kernel thread")
