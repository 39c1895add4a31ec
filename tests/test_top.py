"""`hugepaged top`: frames rendered to text, `top --once` as a subprocess, and in tmux."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import replace

import numpy as np
import pytest

from hugepaged.kernel.procfs import Vma
from hugepaged.results import ScanResult
from hugepaged.scan.process import ProcessScan, VmaScan
from hugepaged.topview import Frame, render_text, rows_of
from kit.daemon_runner import Daemon, hugepaged_cli, hugepaged_cmd, settled
from kit.helpers import Workload, pmd_mapped_windows, saved_thp

from .marks import needs_root, needs_thp, require_tool

S, P, M, N = (ScanResult.SUCCEED, ScanResult.PMD_MAPPED, ScanResult.PMD_NONE,
              ScanResult.EXCEED_NONE_PTE)


def scan(pid: int, comm: str, codes: list[ScanResult], anon_kb: int, huge_kb: int) -> ProcessScan:
    start = 0x7F0000000000
    vma = Vma(start, start + len(codes) * (2 << 20), "rw-p", 0, 0, "")
    starts = np.arange(start, vma.end, 2 << 20, dtype=np.uint64)
    v = VmaScan(vma, None, starts, np.array([int(c) for c in codes], dtype=np.int8),
                np.zeros(len(codes), dtype=np.int64))
    return ProcessScan(pid, comm, anon_kb, huge_kb, [v])


SCANS = [
    scan(100, "small", [S], 4096, 0),
    scan(200, "postgres", [S, S, S, P, N], 20480, 2048),
    scan(300, "idle", [M, M], 1024, 0),
    scan(400, "java", [S, S, P, P], 16384, 4096),
]
STATUS = {
    "version": "0.1.0", "pid": 42, "state": "scanning", "uptime_seconds": 61.2,
    "cpu_seconds": 1.25, "registered": 2, "free_huge_blocks": 17,
    "counters": {"pages_collapsed": 9, "full_scans": 3, "passes": 40, "collapse_attempts": 11,
                 "alloc_backoffs": 1},
    "collapse_failures": {"EAGAIN": 2},
    "processes": [{"pid": 200, "comm": "postgres", "last_result": "SUCCEED", "target": "pg"},
                  {"pid": 400, "comm": "java", "last_result": "EXCEED_NONE_PTE"}],
    "tunables": {},
}


ROW = re.compile(r"^\s*(\d+)\s+\S+\s+\S+\s+[\d.]+[KMG]\s+[\d.]+[KMG]\s")


def table_pids(text: str) -> list[int]:
    return [int(m.group(1)) for m in map(ROW.match, text.splitlines()) if m]


def test_rows_are_ordered_by_collapsible_windows():
    rows = rows_of(SCANS, None)
    assert [r.pid for r in rows] == [200, 400, 100, 300]
    assert [r.collapsible for r in rows] == [3, 2, 1, 0]
    assert rows[0].collapsible_kb == 3 * 2048 and rows[0].eligible == 5
    assert rows[1].coverage == 25.0
    assert all(r.last_result == "-" and not r.registered for r in rows)


def test_frame_with_the_daemon():
    text = render_text(Frame(rows_of(SCANS, STATUS), STATUS, interval=2.0,
                             taken_at=1_800_000_000.0), width=150)
    lines = text.splitlines()
    assert lines[0].startswith("hugepaged top  ") and "every 2 s" in lines[0]
    assert "4 processes  anon 41.0M  THP 6.0M (14.6%)  collapsible 6 windows (12.0M)" in text
    assert "daemon pid 42 scanning, up 61 s, 1.25 s CPU" in text
    for part in ("registered 2", "pages_collapsed 9", "full_scans 3", "passes 40",
                 "attempts 11", "failures EAGAIN:2", "backoffs 1", "free huge blocks 17"):
        assert part in text, part
    header = next(line for line in lines if "COLLAPSIBLE" in line)
    assert header.split() == ["PID", "COMMAND", "TARGET", "ANON", "THP", "COVER", "ELIGIBLE",
                              "COLLAPSIBLE", "mTHP", "LAST"]
    assert table_pids(text) == [200, 400, 100, 300]
    row = next(line for line in lines if line.lstrip().startswith("200"))
    assert row.split() == ["200", "postgres*", "pg", "20.0M", "2.0M", "10.0%", "5", "3",
                           "(6.0M)", "-", "SUCCEED"]  # its target, from the daemon; mTHP not
    # counted here
    row = next(line for line in lines if line.lstrip().startswith("100"))
    assert row.split()[-1] == "-"  # not registered with the daemon
    assert "* registered with the daemon" in text


def test_frame_without_the_daemon_and_a_limit():
    text = render_text(Frame(rows_of(SCANS, None), None,
                             daemon_error="/run/hugepaged/hugepaged.sock: no such socket"),
                       width=100, limit=2)
    assert "daemon: not answering (/run/hugepaged/hugepaged.sock: no such socket); " \
           "scan only" in text
    assert table_pids(text) == [200, 400]
    assert "... 2 more" in text
    assert "registered with the daemon" not in text


def test_narrow_terminal_keeps_one_line_per_process():
    text = render_text(Frame(rows_of(SCANS, STATUS), STATUS), width=60)
    assert table_pids(text) == [200, 400, 100, 300]
    row = next(line for line in text.splitlines() if line.lstrip().startswith("200"))
    assert row.split()[3:8] == ["20.0M", "2.0M", "10.0%", "5", "3"]  # numbers never cut


def test_mthp_column_and_totals_by_size():
    rows = rows_of(SCANS, None)
    rows[0] = replace(rows[0], anon_mthp_kb=((16, 512), (64, 2432)))
    rows[1] = replace(rows[1], anon_mthp_kb=((64, 1024),))
    rows[2] = replace(rows[2], anon_mthp_kb=())
    text = render_text(Frame(rows, None), width=160)
    assert "  mTHP 16K:512K 64K:3.4M" in text.splitlines()[1]
    cells = {line.split()[0]: line.split()[-2] for line in text.splitlines()
             if table_pids(line)}
    assert cells == {"200": "2.9M", "400": "1.0M", "100": "0K", "300": "-"}
    assert "mTHP" not in render_text(Frame(rows_of(SCANS, None), None)).splitlines()[1]


def test_bad_arguments():
    r = hugepaged_cli("top", "--interval", "0")
    assert r.returncode == 2 and "--interval must be positive" in r.stderr
    r = hugepaged_cli("top", "--once", "--iterations", "2")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


@pytest.mark.kernel
@needs_root
@needs_thp
def test_top_once_and_with_a_daemon(tmp_path):
    regions = [{"name": "a", "windows": 6, "fill": "all", "hugepage": True},
               {"name": "b", "windows": 2, "fill": "first:8", "hugepage": True}]
    with saved_thp(enabled="never"), Workload(regions=regions) as w:
        sock = str(tmp_path / "none.sock")
        r = hugepaged_cli("top", "--once", "--pid", str(w.pid), "--socket", sock,
                          "--set", "enabled=madvise", "--set", "max_ptes_none=256")
        assert r.returncode == 0, r.stderr
        assert f"daemon: not answering ({sock}: no such socket" in r.stdout
        (row,) = [line for line in r.stdout.splitlines() if line.lstrip().startswith(str(w.pid))]
        cols = row.split()
        assert cols[1] == "python" and cols[2] == "-" and cols[6] == "8"  # 8 eligible windows
        assert cols[7:9] == ["6", "(12.0M)"] and cols[-1] == "-"
        assert cols[-2] == "0K"  # no mTHP: 4 KiB pages only
        assert "1 processes" in r.stdout and "collapsible 6 windows (12.0M)" in r.stdout
        # with the daemon: its counters, its tunables (max_ptes_none 256), its last result
        with Daemon([w.pid], sets={"enabled": "madvise", "max_ptes_none": "256"}) as d:
            # Settled: a visit after the collapses found nothing left, so the slot's last
            # result is that visit's (the collapsing visit can end on a SUCCEED).
            d.wait_for(lambda st: st["counters"]["pages_collapsed"] == 6
                       and settled(st, w.pid), what="6 collapses, then settled")
            r = hugepaged_cli("top", "--iterations", "2", "--interval", "0.2",
                              "--pid", str(w.pid), "--socket", d.socket)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("hugepaged top") == 2
        assert "pages_collapsed 6" in r.stdout
        rows = [line for line in r.stdout.splitlines() if line.lstrip().startswith(str(w.pid))]
        assert len(rows) == 2
        cols = rows[-1].split()
        assert cols[1] == "python*" and float(cols[5].rstrip("%")) > 0
        assert cols[2] == "-"  # the daemon has no target for it: the global policy
        assert cols[7] == "0"  # nothing left to collapse: the 6 full windows are huge now
        assert cols[-1] in ("PMD_MAPPED", "EXCEED_NONE_PTE")


@pytest.mark.kernel
@needs_root
@needs_thp
def test_top_config_decides_each_process_by_its_target(tmp_path):
    """COLLAPSIBLE by the policy the daemon would apply: the target's (enabled=always takes
    windows without MADV_HUGEPAGE) for the process it matches, the global one for the rest."""
    regions = [{"name": "a", "windows": 4, "hugepage": False}]
    with saved_thp(enabled="never"), Workload(regions=regions) as a, \
            Workload(regions=regions) as b:
        cfg = tmp_path / "hugepaged.toml"
        cfg.write_text(f'[[target]]\nname = "t"\npid = [{a.pid}]\nenabled = "always"\n')
        sock = str(tmp_path / "none.sock")
        r = hugepaged_cli("top", "--once", "--pid", str(a.pid), "--pid", str(b.pid),
                          "--socket", sock, "--set", "enabled=madvise", "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        rows = {int(line.split()[0]): line.split() for line in r.stdout.splitlines()
                if line.split() and line.split()[0] in (str(a.pid), str(b.pid))}
        assert rows[a.pid][2] == "t" and int(rows[a.pid][7]) >= 4
        assert rows[b.pid][2] == "-" and rows[b.pid][7] == "0"
        bad = hugepaged_cli("top", "--once", "--socket", sock, "--config",
                            str(tmp_path / "missing.toml"))
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad


@pytest.mark.kernel
@needs_root
@needs_thp
def test_top_with_a_daemon_decides_its_processes_by_the_daemons_targets(tmp_path):
    """Without --config, a process the daemon registered under a target is decided by that
    target (from status), so its TARGET and COLLAPSIBLE agree; the daemon's own bloat budget
    of 0 keeps it from collapsing the partly filled windows meanwhile."""
    regions = [{"name": "a", "windows": 4, "fill": "first:400"}]  # no MADV_HUGEPAGE
    with saved_thp(enabled="never"), Workload(regions=regions) as a, \
            Workload(regions=regions) as b:
        cfg = tmp_path / "hugepaged.toml"
        cfg.write_text(f'[[target]]\nname = "t"\npid = [{a.pid}]\nenabled = "always"\n'
                       'max_bloat_mb = 0\n')
        with Daemon([a.pid, b.pid], sets={"enabled": "madvise"}, config=str(cfg)) as d:
            d.wait_for(lambda st: settled(st, a.pid) and settled(st, b.pid),
                       what="both visited and settled")
            r = hugepaged_cli("top", "--once", "--pid", str(a.pid), "--pid", str(b.pid),
                              "--socket", d.socket)
            st = d.status()
        assert r.returncode == 0, r.stderr
        assert [t["policy"] for t in st["targets"]] == \
            [{"enabled": "always", "priority": 0, "max_bloat_mb": 0}]
        rows = {int(line.split()[0]): line.split() for line in r.stdout.splitlines()
                if line.split() and line.split()[0] in (str(a.pid), str(b.pid))}
        # The target's enabled=always: the region's 4 windows (and maybe some of the
        # interpreter's); the global madvise: none of b's.
        assert rows[a.pid][2] == "t" and int(rows[a.pid][7]) >= 4
        assert rows[b.pid][2] == "-" and rows[b.pid][7] == "0"
        assert st["targets"][0]["results"].get("EXCEED_BLOAT_BUDGET", 0) >= 4
        r = a.regions["a"]
        assert pmd_mapped_windows(a.pid, r.start, r.end) == [False] * 4
        a.verify()


@pytest.mark.kernel
@needs_root
@needs_thp
def test_top_live_in_tmux():
    require_tool("tmux", "apt-get install tmux")
    session = f"hugepaged-top-{os.getpid()}"
    region = {"name": "a", "windows": 3, "fill": "all", "hugepage": True}
    with saved_thp(enabled="never"), Workload(regions=[region]) as w:
        cmd = shlex.join(hugepaged_cmd("top", "--interval", "0.3", "--pid", str(w.pid),
                                       "--set", "enabled=madvise"))
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30",
                        f"{cmd}; echo EXITED $?; sleep 30"], check=True,
                       env={**os.environ, "TERM": "xterm-256color"})
        try:
            screen = ""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                        capture_output=True, text=True).stdout
                if str(w.pid) in screen and "COLLAPSIBLE" in screen:
                    break
                time.sleep(0.2)
            assert "hugepaged top" in screen and "every 0.3 s" in screen, screen
            (row,) = [line for line in screen.splitlines()
                      if line.lstrip().startswith(str(w.pid))]
            assert row.split()[7:9] == ["3", "(6.0M)"], row
            first = screen.splitlines()[0]
            time.sleep(1.2)  # the clock in the title moves: it refreshes
            again = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                   capture_output=True, text=True).stdout
            assert again.splitlines()[0] != first
            subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
            deadline = time.monotonic() + 10
            while "EXITED" not in screen and time.monotonic() < deadline:
                time.sleep(0.2)
                screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                        capture_output=True, text=True).stdout
            assert "EXITED 0" in screen, screen
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
