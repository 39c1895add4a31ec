"""Logs: one JSON object per line with --log-format json; nothing per window at info."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from hugepaged.daemon.khugepaged import Counters, Khugepaged
from hugepaged.daemon.summary import Summary
from hugepaged.kernel import Kernel
from hugepaged.logs import setup_logging
from hugepaged.tunables import Tunables
from kit.daemon_runner import Daemon
from kit.helpers import Workload, saved_thp

from .marks import needs_root, needs_thp

WINDOWS = 4


def json_lines(text: str) -> list[dict]:
    """Every line must be one JSON object with time, level and message."""
    out = []
    for line in text.splitlines():
        doc = json.loads(line)
        assert isinstance(doc, dict), line
        assert {"time", "level", "message"} <= doc.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), line
        out.append(doc)
    return out


@pytest.fixture
def json_log():
    """The hugepaged logger writing JSON at debug level into a buffer."""
    buf = io.StringIO()
    logger = logging.getLogger("hugepaged")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    setup_logging("json", "debug", stream=buf)
    try:
        yield buf
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.kernel
@needs_root
@needs_thp
def test_json_debug_log_of_a_real_daemon(tmp_path):
    cfg = tmp_path / "hugepaged.toml"
    cfg.write_text("max_ptes_swap = 64\n")
    region = {"name": "a", "windows": WINDOWS, "fill": "all", "hugepage": True}
    with saved_thp(enabled="never"), Workload(regions=[region]) as w, \
            Daemon([w.pid], config=str(cfg), sets={"enabled": "madvise"}) as d:
        reg = d.wait_event("register", pid=w.pid)
        assert reg["comm"] == "python" and reg["level"] == "debug"  # per process: debug
        d.wait_log(lambda recs: sum(r.get("event") == "collapse" for r in recs) >= WINDOWS,
                   what="a collapse record per window")
        for rec in d.events("collapse"):
            assert rec["level"] == "debug"
            assert rec["pid"] == w.pid and rec["comm"] == "python"
            assert rec["result"] == "SUCCEED" and rec["errno"] is None
            assert int(rec["address"], 16) % (2 << 20) == 0
            assert w.regions["a"].start <= int(rec["address"], 16) < w.regions["a"].end
            assert isinstance(rec["duration_ms"], float) and rec["duration_ms"] > 0
        # a tunable changed over the control socket, then by a reload (SIGHUP)
        old = d.get("max_ptes_none")  # inherited from the kernel
        new = 100 if old != 100 else 101
        assert d.set("max_ptes_none", new)["ok"]
        change = d.wait_event("tunable", key="max_ptes_none")
        assert (change["old"], change["value"], change["source"]) == (old, new,
                                                                       "control socket")
        cfg.write_text("max_ptes_swap = 10\n")
        d.send(signal.SIGHUP)
        change = d.wait_event("tunable", key="max_ptes_swap")
        assert (change["old"], change["value"], change["source"]) == (64, 10, "reload")
        # the process goes away
        w.close()
        assert d.wait_event("unregister", pid=w.pid)["level"] == "debug"
        assert d.stop() == 0
    records = json_lines(d.stderr())  # every line of the whole run, not only the ones above
    assert records[-1]["event"] == "stop"
    events = [r.get("event") for r in records]
    assert events.count("collapse") == WINDOWS
    # the run's summary (at its stop, well within the minute): what the lines above say
    (summary,) = [r for r in records if r.get("event") == "summary"]
    assert summary["level"] == "info"
    assert {k: summary[k] for k in ("registered", "gone", "collapsed", "failures",
                                    "backoffs")} == {"registered": 1, "gone": 1,
                                                     "collapsed": WINDOWS, "failures": 0,
                                                     "backoffs": 0}


@pytest.mark.kernel
@needs_root
@needs_thp
def test_default_text_log_has_nothing_per_window():
    windows = 16
    region = {"name": "a", "windows": windows, "fill": "all", "hugepage": True}
    with saved_thp(enabled="never"), Workload(regions=[region]) as w, \
            Daemon([w.pid], sets={"enabled": "madvise"}, log_format=None, log_level=None) as d:
        d.wait_for(lambda st: st["counters"]["pages_collapsed"] == windows
                   and st["counters"]["full_scans"] >= 2, what="all collapsed")
        assert d.stop() == 0
    lines = d.stderr().splitlines()
    assert lines, "nothing logged"
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} hugepaged (INFO|WARNING): ",
                        line), line
    assert not any("collapse pid" in line for line in lines)
    assert not any("registered pid" in line for line in lines)  # per process: debug
    assert any(f"{windows} collapsed" in line for line in lines), lines  # the summary
    assert len(lines) < windows, lines  # summary, stopped, ...: not one per window


@needs_root
def test_backoff_records(json_log):
    """An allocation back-off and its end, as the daemon logs them (JSON)."""
    kernel = Kernel()
    core = Khugepaged(kernel, Tunables(alloc_sleep_millisecs=60000))
    try:
        core.collapser.back_off(SimpleNamespace(pid=1234), 0x7F0000200000,
                                "huge page allocation failed")
        kernel.mm.free_huge_blocks = lambda nodes=None: 1  # a 2 MiB block is free again
        assert core.collapser.end_backoff_if_free()
    finally:
        core.close()
    first, second = json_lines(json_log.getvalue())
    assert first["event"] == "backoff" and first["level"] == "info"
    assert (first["pid"], first["address"], first["ms"], first["reason"]) == \
        (1234, "0x7f0000200000", 60000, "huge page allocation failed")
    assert second["event"] == "backoff_end"


def test_text_and_level(json_log):
    buf = io.StringIO()
    logger = logging.getLogger("hugepaged")
    setup_logging("text", "info", stream=buf)
    logger.debug("collapse pid 1 0x0: SUCCEED", extra={"event": "collapse"})
    logger.info("registered pid 1 (init)", extra={"event": "register", "pid": 1})
    (line,) = buf.getvalue().splitlines()
    assert line.endswith("hugepaged INFO: registered pid 1 (init)")


# --------------------------------------------------------------------------------------------
# Log volume: one summary a minute at info, the per-process lines at debug


def test_summary_every_minute_and_only_when_something_happened(json_log):
    counters = Counters()
    now = [1000.0]
    summary = Summary(counters, clock=lambda: now[0])
    counters.registered, counters.gone = 3, 1
    now[0] += 59.0
    summary.tick()
    assert json_log.getvalue() == ""  # not yet a minute
    now[0] += 1.0
    summary.tick()
    counters.registered += 2
    counters.gone += 4
    counters.pages_collapsed += 7
    counters.collapse_failures["EAGAIN"] += 2
    counters.alloc_backoffs += 1
    now[0] += 30.0
    summary.tick()  # half a minute since the last line: nothing
    now[0] += 30.0
    summary.tick()
    now[0] += 120.0
    summary.tick()  # two quiet minutes: no line
    first, second = json_lines(json_log.getvalue())
    assert first["event"] == "summary" and first["level"] == "info"
    assert first["message"] == ("in the last 60 s: 3 registered, 1 gone, 0 collapsed, "
                                "0 failed collapses, 0 back-offs")
    assert {k: second[k] for k in ("seconds", "registered", "gone", "collapsed", "failures",
                                   "backoffs")} == {"seconds": 60, "registered": 2, "gone": 4,
                                                    "collapsed": 7, "failures": 2,
                                                    "backoffs": 1}
    counters.gone += 1
    now[0] += 5.0
    summary.flush()  # at the daemon's stop: the rest, however short the time
    assert json_lines(json_log.getvalue())[-1]["gone"] == 1


FORK_STORM = r"""
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(15, b"hpstorm", 0, 0, 0)  # PR_SET_NAME: the children inherit it
n = int(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
alive = 0
for i in range(n):
    if os.fork() == 0:
        time.sleep(2.5 + (i % 10) * 0.02)  # past the 1 s settle, and the cap's wait: registered
        os._exit(0)
    alive += 1
    if alive >= 500:  # at most 500 at a time
        os.wait()
        alive -= 1
while alive:
    os.wait()
    alive -= 1
print(f"done {time.monotonic() - t0:.1f}", flush=True)
sys.stdin.readline()
"""


@pytest.mark.kernel
@needs_root
def test_a_fork_storm_gives_a_few_info_lines_and_a_summary_that_counts_it(tmp_path):
    """2,000 short processes in a few seconds, the daemon in discovery mode with every
    process but the storm's excluded. Logged at debug, so that each registration and exit
    is there to count; what info would print is the records at info and above."""
    cfg = tmp_path / "hugepaged.toml"
    cfg.write_text("exclude_comm = '(?!hpstorm).*'\n")
    storm = subprocess.Popen([sys.executable, "-c", FORK_STORM, "2000"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert storm.stdout.readline() == "ready\n"
        with saved_thp(enabled="never"), Daemon(config=str(cfg)) as d:
            d.wait_for(lambda st: st["registered"] == 1, timeout=15)
            storm.stdin.write("go\n")
            storm.stdin.flush()
            done = storm.stdout.readline()
            assert done.startswith("done"), done
            assert float(done.split()[1]) < 20, done  # a storm, not a drizzle
            d.wait_for(lambda st: st["registered"] == 1, timeout=30, what="the storm gone")
            storm.stdin.write("exit\n")
            storm.stdin.flush()
            storm.wait(10)
            d.wait_for(lambda st: st["registered"] == 0, timeout=10)
            assert d.stop() == 0
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait()
    records = json_lines(d.stderr())
    registered = [r for r in records if r.get("event") == "register"]
    gone = [r for r in records if r.get("event") == "unregister"]
    assert len(registered) >= 20, len(registered)  # the storm was seen (admission is budgeted)
    assert {r["level"] for r in registered + gone} == {"debug"}
    info = [r for r in records if r["level"] != "debug"]
    assert len(info) <= 5, [r["message"] for r in info]  # a few, not one per process
    summaries = [r for r in info if r.get("event") == "summary"]
    assert summaries, [r["message"] for r in info]
    assert sum(r["registered"] for r in summaries) == len(registered)
    assert sum(r["gone"] for r in summaries) == len(gone) == len(registered)
    assert sum(r["collapsed"] for r in summaries) == 0  # nothing was MADV_HUGEPAGE


def readable(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            f.read(1)
    except PermissionError:
        return False
    return True


@pytest.mark.kernel
@needs_root
def test_an_unreadable_process_is_dropped_once_and_not_called_gone():
    """pid 1 of this machine's container cannot be read even by root (its mm is another
    user namespace's). Elsewhere there may be no such process, and nothing to test."""
    if readable(1):
        pytest.skip("pid 1 is readable here: no process that is alive but unreadable")
    with saved_thp(enabled="never"), Daemon([1], sets={"enabled": "madvise"}) as d:
        dropped = d.wait_event("dropped", pid=1)
        assert dropped["level"] == "warning"
        assert dropped["message"] == f"pid 1 ({dropped['comm']}): dropped: not readable"
        d.wait_for(lambda st: st["registered"] == 0)
        assert d.stop() == 0
    records = json_lines(d.stderr())
    assert [r["message"] for r in records if r.get("pid") == 1 and r["level"] != "debug"] \
        == [dropped["message"]]  # once, and no "gone" for a process that lives
    assert not [r for r in records if r.get("event") == "unregister"
                and r.get("reason") == "gone"]
    (summary,) = [r for r in records if r.get("event") == "summary"]
    assert (summary["registered"], summary["gone"]) == (1, 1)
