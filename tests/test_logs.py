"""Logs: one JSON object per line with --log-format json; nothing per window at info."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from types import SimpleNamespace

import pytest

from hugepaged.daemon.khugepaged import Khugepaged
from hugepaged.kernel import Kernel
from hugepaged.logs import setup_logging
from hugepaged.tunables import Tunables

from .daemon_runner import Daemon
from .helpers import Workload, saved_thp
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
        assert reg["comm"] == "python" and reg["level"] == "info"
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
        assert d.wait_event("unregister", pid=w.pid)["level"] == "info"
        assert d.stop() == 0
    records = json_lines(d.stderr())  # every line of the whole run, not only the ones above
    assert records[-1]["event"] == "stop"
    events = [r.get("event") for r in records]
    assert events.count("collapse") == WINDOWS


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
    assert len(lines) < windows, lines  # registered, stopped, ...: not one per window


@needs_root
def test_backoff_records(json_log):
    """An allocation back-off and its end, as the daemon logs them (JSON)."""
    kernel = Kernel()
    core = Khugepaged(kernel, Tunables(alloc_sleep_millisecs=60000))
    try:
        core._back_off(SimpleNamespace(pid=1234), 0x7F0000200000, "huge page allocation failed")
        kernel.mm.free_huge_blocks = lambda nodes=None: 1  # a 2 MiB block is free again
        assert core.end_backoff_if_free()
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
