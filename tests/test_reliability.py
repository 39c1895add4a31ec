"""Issue 11: hostile input, names that are data, bad command-line values.

The daemon and the CLI run as subprocesses; processes are real; what is checked is what a user
sees (exit status, stderr, stdout) and that the daemon is still there afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from .daemon_runner import Daemon, hugepaged_cli
from .helpers import Workload, anon_huge_kb, saved_thp
from .marks import kernel_test, needs_root


def one_line_error(r: subprocess.CompletedProcess, status: int = 2) -> str:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hugepaged: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# --------------------------------------------------------------------------------------------
# 1. The configuration file


def _huge_int() -> bytes:
    return b"max_ptes_none = " + b"9" * 5000 + b"\n"


BAD_FILES = {
    "not-utf8": (b"max_ptes_none = 100 # caf\xe9\n", "line 1: not UTF-8"),
    "5000-digit integer": (b"enabled = 'madvise'\n" + _huge_int(), "line 2"),
    "string for an integer": (b'max_ptes_none = "100"\n', "expected an integer 0..511"),
    "10 MB regex": (b'exclude_comm = "' + b"a|" * (5 << 20) + b'a"\n', "too large"),
    "long regex": (b'exclude_comm = "' + b"a|" * 3000 + b'a"\n', "too long"),
    "bad regex": (b'\nexclude_comm = "(a"\n', "line 2: exclude_comm: invalid regular"),
    "empty socket": (b'socket = ""\n', "socket: empty path"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_malformed_config_is_refused_at_start_with_one_line(tmp_path, name):
    data, words = BAD_FILES[name]
    path = tmp_path / "h.toml"
    path.write_bytes(data)
    t0 = time.monotonic()
    r = hugepaged_cli("run", "--config", str(path), "--socket", str(tmp_path / "s.sock"))
    line = one_line_error(r)
    assert time.monotonic() - t0 < 5
    assert str(path) in line and words in line, line


def test_a_fifo_or_a_device_as_config_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        t0 = time.monotonic()
        r = hugepaged_cli("run", "--config", path, "--socket", str(tmp_path / "s.sock"),
                          timeout=10)
        line = one_line_error(r)
        assert "not a regular file" in line and time.monotonic() - t0 < 5, line


@needs_root
@pytest.mark.parametrize("name", ["not-utf8", "5000-digit integer", "string for an integer",
                                  "10 MB regex", "fifo"])
def test_sighup_with_a_malformed_config_keeps_the_daemon_and_its_settings(tmp_path, name):
    path = tmp_path / "h.toml"
    path.write_text("max_ptes_none = 100\n")
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with Daemon(pids=[sleeper.pid], config=str(path)) as d:
            assert d.get("max_ptes_none") == 100
            if name == "fifo":
                path.unlink()
                os.mkfifo(path)
            else:
                path.write_bytes(BAD_FILES[name][0])
            d.send(signal.SIGHUP)
            d.wait_log(lambda recs: any(r.get("event") == "reload_refused" for r in recs),
                       timeout=10)
            assert d.alive() and d.get("max_ptes_none") == 100
            refused = d.events("reload_refused")[0]
            assert str(path) in refused["error"] and "\n" not in refused["error"]
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------------------------
# 2. Command-line values


@pytest.mark.parametrize("args", [
    ["scan", "--pid", "0"], ["scan", "--pid", "-5"], ["scan", "--pid", "4194305"],
    ["collapse", "--pid", "0"], ["top", "--once", "--pid", "-1"],
    ["run", "--pid", "4194305", "--socket", "/tmp/hugepaged-never.sock"],
])
def test_pids_outside_1_to_pid_max_are_refused(args):
    line = one_line_error(hugepaged_cli(*args))
    assert "not a process id" in line, line


def test_pid_max_itself_is_refused_and_below_it_is_a_pid():
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    line = one_line_error(hugepaged_cli("scan", "--pid", str(pid_max)))
    assert f"(1..{pid_max - 1})" in line


@pytest.mark.parametrize("cmd", [["status"], ["get", "full_scans"], ["set", "defrag", "1"],
                                 ["run"], ["top", "--once"]])
def test_an_empty_socket_path_is_refused(cmd):
    line = one_line_error(hugepaged_cli(*cmd, "--socket", ""))
    assert "--socket: empty path" in line


@pytest.mark.parametrize(("assignment", "shown"), [
    (" max_ptes_none=5", "unknown tunable ' max_ptes_none'"),
    ("max_ptes_none =5", "unknown tunable 'max_ptes_none '"),
    ("enabled=always\n\n", r"invalid value 'always\n'"),
    ("enabled=al\x1b[2Jways", r"invalid value 'al\x1b[2Jways'"),
])
def test_set_is_refused_exactly_and_the_error_is_one_escaped_line(assignment, shown):
    line = one_line_error(hugepaged_cli("scan", "--pid", str(os.getpid()), "--set", assignment))
    assert shown in line and "\x1b" not in line, line


# --------------------------------------------------------------------------------------------
# 3. Names are data

HOSTILE = {
    "markup close": b"[/]",
    "markup style": b"[red]x",
    "markup link": b"[link=x]a",
    "forged line": b"x)\nERROR: fake",
    "escape sequence": b"\x1b[31mRED\x1b[0m"[:15],
}


def _shows_name_safely(text: str, raw: bytes) -> None:
    assert "\x1b" not in text and "MarkupError" not in text and "Traceback" not in text
    name = raw.decode()
    if "\n" in name:  # /proc/PID/status escapes it as \n, hugepaged as \x0a: one line either way
        assert "x)\\x0aERROR: fake" in text or "x)\\nERROR: fake" in text, text
        assert not any(line.startswith("ERROR: fake") for line in text.splitlines())
    elif "\x1b" in name:
        assert name.replace("\x1b", "\\x1b") in text, text
    else:
        assert name in text, text  # markup shown literally, not interpreted


@kernel_test
@pytest.mark.parametrize("name", list(HOSTILE))
def test_scan_top_and_collapse_print_any_name_literally(name):
    raw = HOSTILE[name]
    with saved_thp(enabled="never"), \
            Workload(regions=[{"name": "a", "windows": 2, "hugepage": True}]) as w:
        assert w.command(f"comm {raw.hex()}")["ok"]
        r = hugepaged_cli("scan")
        assert r.returncode == 0, r.stderr
        _shows_name_safely(r.stdout, raw)
        r = hugepaged_cli("top", "--once", "--socket", "/nonexistent/hugepaged.sock")
        assert r.returncode == 0, r.stderr
        _shows_name_safely(r.stdout, raw)
        r = hugepaged_cli("collapse", "--pid", str(w.pid), "--set", "enabled=madvise")
        assert r.returncode == 0, r.stderr
        _shows_name_safely(r.stdout, raw)
        assert "collapsed 2 window(s)" in r.stdout
        assert anon_huge_kb(w.pid, w.regions["a"].start) == 4096
        w.verify()


@needs_root
def test_the_text_log_escapes_a_name_that_would_forge_a_line():
    raw = HOSTILE["forged line"]
    with Workload(regions=[{"name": "a", "windows": 1}]) as w:
        assert w.command(f"comm {raw.hex()}")["ok"]
        with Daemon(pids=[w.pid], args=["--log-format", "text"]) as d:
            deadline = time.monotonic() + 10
            while not any("registered pid" in line for line in d.lines):
                assert time.monotonic() < deadline, d.lines
                time.sleep(0.05)
            st = d.status()
            assert st["processes"][0]["comm"] == raw.decode()  # JSON carries it as it is
        lines = [line for line in d.lines if str(w.pid) in line or "fake" in line]
        assert any("registered pid" in line and "x)\\x0aERROR: fake" in line for line in lines)
        assert not any(line.startswith("ERROR: fake") for line in d.lines), d.lines


def test_status_prints_a_name_and_an_error_as_data(tmp_path):
    # A fake daemon answers status with hostile strings; the client prints them literally.
    import json
    import socket

    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    status = {"version": "[red]0", "pid": 1, "state": "[/]", "uptime_seconds": 1,
              "cpu_seconds": 0, "registered": 0, "free_huge_blocks": 0,
              "cursor": {"pid": None, "address": "0x0"},
              "counters": {"pages_collapsed": 0, "full_scans": 0, "passes": 0,
                           "collapse_attempts": 0, "alloc_backoffs": 0},
              "results": {"[/]": 1}, "collapse_failures": {}, "tunables": {"k": "[/]"},
              "processes": []}

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(json.dumps({"ok": True, "status": status}).encode() + b"\n")

    t = threading.Thread(target=serve)
    t.start()
    r = hugepaged_cli("status", "--socket", path)
    t.join(5)
    srv.close()
    assert r.returncode == 0, r.stderr
    assert "[red]0" in r.stdout and "[/]" in r.stdout
