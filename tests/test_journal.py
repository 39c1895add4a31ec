"""Under systemd the log carries journal priorities: every line starts with an sd-daemon
`<N>` prefix, read here the way journald reads a service's stderr stream (a line starting
`<digit>` and `>` gets that digit as PRIORITY=, and the prefix is stripped), so that
`journalctl -p warning` finds the warnings. journald is told nothing else: the daemon sees
$JOURNAL_STREAM naming its very stderr (device:inode), as systemd sets it."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import time

from hugepaged.logs import journal_stream, setup_logging
from kit.daemon_runner import _accepts, hugepaged_cmd
from kit.helpers import Workload

from .marks import kernel_test

PREFIX = re.compile(r"<([0-7])>")


def journald(line: str) -> tuple[int, str]:
    """(PRIORITY, MESSAGE) as journald stores a stream line (level_prefix=yes; a line with no
    prefix gets the stream's default, info)."""
    m = PREFIX.match(line)
    return (int(m.group(1)), line[m.end():]) if m else (6, line)


def stream_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_prefixes_for_each_level_and_no_timestamp(tmp_path):
    path = tmp_path / "stream"
    logger = logging.getLogger("hugepaged")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    with open(path, "w") as f:
        try:
            setup_logging("text", "debug", stream=f, environ={"JOURNAL_STREAM":
                                                              stream_id(f.fileno())})
            logger.debug("d")
            logger.info("i")
            logger.warning("w")
            logger.error("e")
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("x")
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
    lines = path.read_text().splitlines()
    assert all(PREFIX.match(line) for line in lines), lines  # a traceback's lines too
    got = [journald(line) for line in lines]
    assert got[:4] == [(7, "DEBUG: d"), (6, "INFO: i"), (4, "WARNING: w"), (3, "ERROR: e")]
    assert all(p == 3 for p, _ in got[4:]) and got[-1][1] == "ValueError: boom", got


def test_a_stream_that_is_not_the_journal_keeps_plain_lines(tmp_path):
    """A child that inherits $JOURNAL_STREAM but writes elsewhere (a pipe, a file) is not
    under the journal: timestamps, no prefix."""
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        assert journal_stream(a, {"JOURNAL_STREAM": stream_id(a.fileno())})
        assert not journal_stream(a, {"JOURNAL_STREAM": stream_id(b.fileno())})
        assert not journal_stream(a, {"JOURNAL_STREAM": "garbage"})
        assert not journal_stream(a, {})


def _thp_disabled() -> None:
    """PR_SET_THP_DISABLE, as a parent may leave it: the daemon lifts it for itself and warns."""
    import ctypes

    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)


class JournalDaemon:
    """`hugepaged run` with its stderr a pipe whose device:inode is in $JOURNAL_STREAM."""

    def __init__(self, tmp_path, pid: int, config) -> None:
        r, w = os.pipe()
        self.read_fd = r
        self.socket = str(tmp_path / "sock")
        env = {**os.environ, "JOURNAL_STREAM": stream_id(w)}
        self.proc = subprocess.Popen(
            hugepaged_cmd("run", "--pid", str(pid), "--socket", self.socket, "--state-file",
                          str(tmp_path / "state.json"), "--config", str(config),
                          "--set", "enabled=madvise"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w, env=env, cwd="/",
            preexec_fn=_thp_disabled)
        os.close(w)
        self.buf = b""

    def read_until(self, pred, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self.lines()):
            left = deadline - time.monotonic()
            assert left > 0, self.lines()
            if select.select([self.read_fd], [], [], left)[0]:
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    return
                self.buf += chunk

    def lines(self) -> list[str]:
        return self.buf.decode(errors="replace").splitlines()


@kernel_test
def test_the_daemon_logs_with_priorities_journalctl_can_filter(tmp_path):
    """info (the first-run line, `stopped`), warning (THP disabled for the daemon itself,
    inherited), error (a reload refused): each with its priority; every line prefixed."""
    config = tmp_path / "hugepaged.toml"
    config.write_text("max_ptes_none = 64\n")
    with Workload(regions=[{"name": "p", "windows": 2}]) as w:
        d = JournalDaemon(tmp_path, w.pid, config)
        try:
            deadline = time.monotonic() + 20
            while not _accepts(d.socket):
                assert d.proc.poll() is None and time.monotonic() < deadline, d.lines()
                time.sleep(0.02)
            d.read_until(lambda lines: any("THP was disabled" in x for x in lines))
            config.write_text("max_ptes_none = 512\n")  # the kernel refuses it: so does reload
            d.proc.send_signal(signal.SIGHUP)
            d.read_until(lambda lines: any("reload refused" in x for x in lines))
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(20) == 0
            d.read_until(lambda lines: False)
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            os.close(d.read_fd)
    lines = d.lines()
    assert lines and all(PREFIX.match(x) for x in lines), lines
    entries = [journald(x) for x in lines]
    assert not any(re.match(r"\d{4}-\d\d-\d\d", m) for _, m in entries), lines
    assert (6, "INFO: stopped") in entries, entries
    assert any(p == 6 and m.startswith("INFO: enabled=madvise: only MADV_HUGEPAGE memory")
               for p, m in entries), entries
    assert any(p == 3 and m.startswith("ERROR: reload refused") for p, m in entries), entries
    assert any(p == 4 and m.startswith("WARNING: THP was disabled for hugepaged itself")
               for p, m in entries), entries
    warnings = [m for p, m in entries if p <= 4]  # what `journalctl -p warning` shows
    assert all(m.startswith(("WARNING", "ERROR")) for m in warnings), warnings


def test_a_refused_start_is_an_error_in_the_journal(tmp_path):
    """Bad configuration: exit 2 and one line, PRIORITY=3 (before logging is set up)."""
    config = tmp_path / "bad.toml"
    config.write_text("max_ptes_none = 512\n")
    r, w = os.pipe()
    try:
        p = subprocess.run(hugepaged_cmd("run", "--config", str(config), "--socket",
                                         str(tmp_path / "s")),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w,
                           env={**os.environ, "JOURNAL_STREAM": stream_id(w)}, timeout=60)
        os.close(w)
        w = -1
        out = os.read(r, 65536).decode()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert p.returncode == 2
    (line,) = out.splitlines()
    prio, message = journald(line)
    assert prio == 3 and message.startswith("hugepaged: ") and "max_ptes_none" in message, line
