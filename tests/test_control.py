"""The control socket: protocol, server, client and the commands that use them.

The first half runs a ControlServer in-process against a stand-in daemon; the second talks to a
real `hugepaged run` (marked `kernel`), including malformed messages and a non-root peer.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from hugepaged.cli import main as cli_main
from hugepaged.control import server as server_mod
from hugepaged.control.client import request as client_request
from hugepaged.control.protocol import MAX_MESSAGE, ProtocolError, decode_request, encode
from hugepaged.control.server import ControlServer
from hugepaged.errors import DaemonUnreachable, InvalidTunable
from hugepaged.tunables import Tunables, parse
from kit.daemon_runner import Daemon, request
from kit.helpers import KHUGEPAGED_DIR, read_knob, saved_thp

from .marks import kernel_test, needs_root

NOBODY = 65534


# --------------------------------------------------------------------------------------------
# Protocol


@pytest.mark.parametrize(("data", "words"), [
    (b"", "malformed message"),
    (b"garbage", "malformed message"),
    (b"\xff\xfe\x00", "malformed message"),
    (b"[1, 2]", "expected an object with a 'cmd' string"),
    (b'{"cmd": 3}', "expected an object with a 'cmd' string"),
    (b'{"key": "x"}', "expected an object with a 'cmd' string"),
    (b"[" * 4000, "nested too deeply"),
    (b'{"cmd": "status", "pad": "' + b"x" * MAX_MESSAGE + b'"}', "too large"),
])
def test_decode_refuses(data, words):
    with pytest.raises(ProtocolError, match=words):
        decode_request(data)


def test_encode_is_one_line():
    data = encode({"ok": True, "value": "a\nb"})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {"ok": True, "value": "a\nb"}
    assert decode_request(b'{"cmd": "get", "key": "max_ptes_none"}')["cmd"] == "get"


# --------------------------------------------------------------------------------------------
# Server, in-process


class Target:
    """Stands in for the Service: tunables refused exactly as the daemon refuses them."""

    def __init__(self) -> None:
        self.tunables = Tunables()
        self.calls = 0

    def status(self) -> dict:
        self.calls += 1
        if self.calls == 99:
            raise RuntimeError("boom")
        return {"state": "idle"}

    def get(self, key: str):
        if key not in self.tunables.as_dict():
            raise InvalidTunable(f"unknown key '{key}'")
        return getattr(self.tunables, key)

    def set(self, key: str, value: str) -> None:
        self.tunables = self.tunables.with_values({key: value})


@pytest.fixture
def served():
    """(server, target): a ControlServer answering from a thread until the test ends.

    Its directory is a fresh 0755 one under /tmp, reachable by any user, so the socket's own
    mode is what decides who may connect.
    """
    target = Target()
    where = tempfile.mkdtemp(prefix="hugepaged-ctl-")
    os.chmod(where, 0o755)
    srv = ControlServer(os.path.join(where, "hugepaged.sock"), target)
    srv.start()  # its own thread, as the daemon runs it
    yield srv, target
    srv.close()
    shutil.rmtree(where, ignore_errors=True)


def test_socket_is_0600_and_replaces_a_stale_one(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("stale")
    srv = ControlServer(str(path), Target())
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        srv.close()
    assert not path.exists()


@needs_root
def test_socket_group_makes_it_0660(tmp_path):
    group = grp.getgrgid(NOBODY).gr_name  # nogroup
    srv = ControlServer(str(tmp_path / "s.sock"), Target(), group=group)
    try:
        st = os.stat(tmp_path / "s.sock")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY and st.st_uid == 0
    finally:
        srv.close()


def test_allowed_is_root_or_the_group(tmp_path, monkeypatch):
    srv = ControlServer(str(tmp_path / "s.sock"), Target())
    try:
        creds = {"v": (1, 0, {0})}
        monkeypatch.setattr(server_mod, "peer_credentials", lambda conn: creds["v"])
        assert srv.allowed(None)
        creds["v"] = (1, 1000, {1000, 27})
        assert not srv.allowed(None)
        srv.gid = 27
        assert srv.allowed(None)
        creds["v"] = (1, 1000, {1000})
        assert not srv.allowed(None)
    finally:
        srv.close()


def test_requests_and_refusals(served):
    srv, target = served
    ask = lambda msg: request(srv.path, msg)  # noqa: E731
    assert ask({"cmd": "status"}) == {"ok": True, "status": {"state": "idle"}}
    assert ask({"cmd": "get", "key": "max_ptes_none"}) == {"ok": True, "value": 511}
    assert ask({"cmd": "set", "key": "max_ptes_none", "value": "7"}) == {"ok": True, "value": 7}
    assert ask({"cmd": "set", "key": "max_ptes_none", "value": 8})["value"] == 8
    refusals = [
        (b"garbage\n", "malformed message"),
        (b"\xff\n", "malformed message"),
        (b"[" * 4000 + b"\n", "nested too deeply"),
        (b"x" * (MAX_MESSAGE + 10), "too large"),
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"cmd": "get"}\n', "'get' needs a 'key' string"),
        (b'{"cmd": "set", "key": "max_ptes_none"}\n', "'set' needs a 'value' string"),
        (b'{"cmd": "set", "key": "max_ptes_none", "value": true}\n', "needs a 'value'"),
        (b'{"cmd": "set", "key": "max_ptes_none", "value": 1.5}\n', "needs a 'value'"),
        (b'{"cmd": "set", "key": "max_ptes_none", "value": "512"}\n',
         "max_ptes_none: invalid value '512' (an integer 0..511)"),
        (b'{"cmd": "get", "key": "bogus"}\n', "unknown key 'bogus'"),
    ]
    for data, words in refusals:
        reply = request(srv.path, data)
        assert reply["ok"] is False and words in reply["error"], (data[:40], reply)
    assert target.tunables.max_ptes_none == 8  # nothing changed
    target.calls = 98
    reply = ask({"cmd": "status"})  # the stand-in raises: an error reply, not a dead server
    assert reply["ok"] is False and "internal error: RuntimeError: boom" in reply["error"]
    assert ask({"cmd": "status"})["ok"]


def test_a_silent_or_vanishing_client_does_not_hang_the_server(served):
    srv, _ = served
    with socket.socket(socket.AF_UNIX) as s:  # connects, says nothing
        s.connect(srv.path)
        s.settimeout(5)
        t0 = time.monotonic()
        reply = json.loads(s.recv(4096))
        assert reply == {"ok": False, "error": "timed out waiting for a request"}
        assert time.monotonic() - t0 < server_mod.CLIENT_TIMEOUT + 1
    with socket.socket(socket.AF_UNIX) as s:  # connects and goes away at once
        s.connect(srv.path)
    with socket.socket(socket.AF_UNIX) as s:  # a megabyte: refused after 4 KiB, not read
        s.connect(srv.path)
        s.settimeout(5)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"{" * (1 << 20))
    assert request(srv.path, {"cmd": "status"})["ok"]


def test_client_errors(served, tmp_path):
    srv, _ = served
    with pytest.raises(DaemonUnreachable, match="is `hugepaged run` running"):
        client_request(str(tmp_path / "absent.sock"), {"cmd": "status"})
    with pytest.raises(InvalidTunable, match="invalid value '512'"):
        client_request(srv.path, {"cmd": "set", "key": "max_ptes_none", "value": "512"})
    with pytest.raises(InvalidTunable, match="unknown key"):
        client_request(srv.path, {"cmd": "get", "key": "bogus"})
    assert client_request(srv.path, {"cmd": "get", "key": "enabled"})["value"] == "madvise"


# --------------------------------------------------------------------------------------------
# Whatever answers on the socket path: the client checks the reply like any other input


@contextlib.contextmanager
def fake_daemon(reply: bytes):
    """A Unix socket that answers every request with `reply` (raw bytes), then closes."""
    where = tempfile.mkdtemp(prefix="hugepaged-fake-")
    path = os.path.join(where, "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(0.02)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        shutil.rmtree(where, ignore_errors=True)


MALFORMED_REPLIES = [
    b"", b"garbage\n", b"\xff\xfe\n", b"[]\n", b"null\n", b"7\n", b'"ok"\n',
    b"[" * 100000 + b"\n", b"{}\n", b'{"ok": "yes"}\n', b'{"ok": true}\n',
    b'{"ok": true, "value": null, "status": null}\n',
    b'{"ok": true, "value": [1], "status": []}\n',
    b'{"ok": true, "value": true, "status": {"tunables": {}}}\n',
    b'{"ok": false, "error": {"x": 1}}\n', b'{"ok": false, "error": "x", "kind": 3}\n',
]


@pytest.mark.parametrize("reply", MALFORMED_REPLIES, ids=range(len(MALFORMED_REPLIES)))
@pytest.mark.parametrize("cmd", [["status"], ["status", "--json"], ["get", "max_ptes_none"],
                                 ["set", "max_ptes_none", "5"]], ids=" ".join)
def test_a_malformed_reply_is_a_one_line_error(capsys, cmd, reply):
    """Tracebacks once (AttributeError on `[]`, KeyError on `{"ok": true}`, RecursionError):
    now exit 6 with one line naming the socket."""
    with fake_daemon(reply) as path:
        code = cli_main([*cmd, "--socket", path])
    out, err = capsys.readouterr()
    assert code == 6, (code, out, err)
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"hugepaged: {path}: "), err


def test_a_status_missing_what_the_text_needs_is_a_one_line_error(capsys):
    with fake_daemon(b'{"ok": true, "status": {"tunables": {}, "counters": {}}}\n') as path:
        code = cli_main(["status", "--socket", path])
    _, err = capsys.readouterr()
    assert code == 6 and err.startswith(f"hugepaged: {path}: malformed status"), err


def test_get_prints_the_value_as_data(capsys):
    """An escape sequence or a newline in a value is printed escaped, as names are."""
    with fake_daemon(b'{"ok": true, "value": "\\u001b[2Jred\\nline\\u0007"}\n') as path:
        assert cli_main(["get", "enabled", "--socket", path]) == 0
    out, _ = capsys.readouterr()
    assert out == "\\x1b[2Jred\\x0aline\\x07\n"
    with fake_daemon(b'{"ok": false, "error": "no\\nway\\u001b[31m"}\n') as path:
        assert cli_main(["get", "enabled", "--socket", path]) == 6
    _, err = capsys.readouterr()
    assert err == "hugepaged: no\\x0away\\x1b[31m\n"


def test_a_reply_that_never_ends_is_cut_off(monkeypatch):
    """A server that trickles bytes without a newline cannot hold the client past its
    deadline (each read alone would have reset the timeout)."""
    from hugepaged.control import client as client_mod

    monkeypatch.setattr(client_mod, "DEADLINE", 1.0)
    where = tempfile.mkdtemp(prefix="hugepaged-fake-")
    path = os.path.join(where, "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            for _ in range(40):
                conn.sendall(b"{")
                time.sleep(0.1)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(DaemonUnreachable, match="no whole reply within 1 s"):
            client_request(path, {"cmd": "status"})
    finally:
        listener.close()
        thread.join(5)
        shutil.rmtree(where, ignore_errors=True)
    assert time.monotonic() - t0 < 2.5


# --------------------------------------------------------------------------------------------
# As another user: fork, drop to nobody, run Python code already loaded (the interpreter itself
# may not be reachable for nobody, e.g. under /root)


def as_nobody(fn) -> tuple[int, str]:
    """Run fn() in a forked child as uid/gid 65534; (its return value, its stdout+stderr).

    The interpreter and its site-packages live under /root here, which nobody cannot read: the
    modules the commands import only when they run are imported before the drop.
    """
    import hugepaged.control.client
    import hugepaged.report  # noqa: F401

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = int(fn() or 0)
        except BaseException as err:  # noqa: BLE001
            print(f"child: {type(err).__name__}: {err}", file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@needs_root
def test_server_refuses_a_non_root_peer(served):
    srv, _ = served
    code, out = as_nobody(lambda: print(json.dumps(request(srv.path, {"cmd": "status"}))))
    assert code == 99 and "PermissionError" in out, out  # 0600: the file system says no first
    os.chmod(srv.path, 0o666)  # let it through to the peer check
    code, out = as_nobody(lambda: print(json.dumps(request(srv.path, {"cmd": "status"}))))
    assert code == 0, out
    assert json.loads(out) == {"ok": False, "error": "permission denied", "kind": "denied"}


@needs_root
def test_run_as_non_root_exits_3_with_one_line(tmp_path):
    os.chmod(tmp_path, 0o777)
    code, out = as_nobody(lambda: cli_main(["run", "--socket", str(tmp_path / "s.sock")]))
    assert code == 3, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hugepaged: hugepaged needs root"), out
    assert not (tmp_path / "s.sock").exists()


@needs_root
@pytest.mark.parametrize("may_set", [False, True])
def test_socket_group_reads_and_sets_only_when_allowed(tmp_path, may_set):
    """A member of socket_group could once `set kernel_khugepaged quiet` or lift the CPU cap:
    now the group reads (status, get) and only root sets, unless socket_group_may_set."""
    config = tmp_path / "hugepaged.toml"
    config.write_text(f'socket_group = "{grp.getgrgid(NOBODY).gr_name}"\n'
                      f"socket_group_may_set = {str(may_set).lower()}\n")
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with Daemon(pids=[sleeper.pid], config=str(config)) as d:
            before = d.get("max_cpu_percent")
            code, out = as_nobody(lambda: cli_main(["get", "max_cpu_percent",
                                                    "--socket", d.socket]))
            assert (code, out) == (0, f"{before}\n")
            code, out = as_nobody(lambda: cli_main(["status", "--json", "--socket", d.socket]))
            assert code == 0 and json.loads(out)["pid"] == d.pid, out
            code, out = as_nobody(lambda: cli_main(["set", "max_cpu_percent", "0",
                                                    "--socket", d.socket]))
            if may_set:
                assert (code, out) == (0, "") and d.get("max_cpu_percent") == 0
            else:
                assert code == 6, out
                assert out.startswith("hugepaged: permission denied: only root may set"), out
                assert out.count("\n") == 1 and d.get("max_cpu_percent") == before
            assert d.set("max_cpu_percent", 7)["ok"]  # root sets either way
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------------------------
# The real daemon


@pytest.fixture
def daemon():
    """A real daemon targeting one sleeping process (nothing to collapse), kernel THP off."""
    target = subprocess.Popen(["sleep", "300"])
    try:
        with saved_thp(enabled="never"), Daemon(pids=[target.pid],
                                                 sets={"enabled": "madvise"}) as d:
            yield d
    finally:
        target.kill()
        target.wait()


@kernel_test
def test_daemon_survives_malformed_messages(daemon):
    before = daemon.status()["tunables"]
    bad = [b"garbage\n", b"not json at all", b"\x00\xff\xfe\n", b"[" * 4000 + b"\n",
           b"x" * 5000, b"{" * (1 << 20), b'{"cmd": "reboot"}\n', b'{"cmd": "set"}\n',
           b'{"cmd": "set", "key": "max_ptes_none"}\n', b'{"cmd": "get"}\n', b"\n",
           b'{"cmd": "set", "key": "max_ptes_none", "value": "600"}\n', b"null\n"]
    for data in bad:
        reply = daemon.request(data)
        assert reply["ok"] is False and reply["error"], (data[:30], reply)
    for _ in range(3):  # and some that say nothing at all
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(daemon.socket)
    assert daemon.alive()
    st = daemon.status()
    assert st["tunables"] == before
    assert not daemon.events("control_error")
    assert st["state"] in ("idle", "scanning")


@kernel_test
def test_socket_mode_and_non_root_peer(daemon):
    before = daemon.get("max_ptes_none")
    st = os.stat(daemon.socket)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    code, out = as_nobody(lambda: cli_main(["status", "--socket", daemon.socket]))
    assert code == 6 and "Permission denied" in out, out
    os.chmod(daemon.socket, 0o666)
    code, out = as_nobody(lambda: cli_main(["get", "max_ptes_none", "--socket", daemon.socket]))
    assert code == 6 and out.strip() == "hugepaged: permission denied", out
    code, out = as_nobody(lambda: cli_main(["set", "max_ptes_none", "1",
                                            "--socket", daemon.socket]))
    assert code == 6 and out.strip() == "hugepaged: permission denied", out
    assert daemon.get("max_ptes_none") == before


@kernel_test
def test_get_set_status_commands(daemon):
    r = daemon.cli("get", "max_ptes_none")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{read_knob('max_ptes_none')}\n", "")
    r = daemon.cli("get", "enabled")
    assert r.stdout == "madvise\n"
    r = daemon.cli("set", "max_ptes_none", "64")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert daemon.cli("get", "max_ptes_none").stdout == "64\n"
    r = daemon.cli("set", "max_ptes_none", "512")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "hugepaged: max_ptes_none: invalid value '512' (an integer 0..511)\n"
    r = daemon.cli("set", "pages_collapsed", "5")
    assert r.returncode == 2 and "read-only" in r.stderr
    assert daemon.cli("get", "max_ptes_none").stdout == "64\n"
    assert daemon.cli("get", "pages_collapsed").stdout == "0\n"
    r = daemon.cli("get", "bogus")
    assert r.returncode != 0 and "unknown key 'bogus'" in r.stderr
    r = daemon.cli("status", "--json")
    st = json.loads(r.stdout)
    assert st["tunables"]["max_ptes_none"] == 64 and st["pid"] == daemon.pid
    for key in ("state", "uptime_seconds", "cpu_seconds", "counters", "results", "registered",
                "processes", "cursor"):
        assert key in st
    r = daemon.cli("status")
    assert r.returncode == 0 and "max_ptes_none" in r.stdout and "pages_collapsed" in r.stdout
    # the cursor as an operator reads it: where the pass is, or that none runs
    assert re.search(r"^cursor: (none \(between passes\)|pid \d+ at 0x[0-9a-f]+)$",
                     r.stdout, re.M), r.stdout


# (An empty write never reaches the kernel's store(): write(2) of 0 bytes returns 0.)
SYSFS_CASES = ["0", "1", "511", "512", "-1", "+5", "007", "5\n", "5 ", " 5", "abc", "1.5",
               "0x10", "1\n\n", "4294967295", "4294967296", "99999999999999999999"]


@kernel_test
@pytest.mark.parametrize("knob", ["max_ptes_none", "pages_to_scan", "scan_sleep_millisecs",
                                  "defrag"])
def test_set_accepts_and_refuses_exactly_what_sysfs_does(daemon, knob):
    """Each value is written to the kernel's own knob and to the daemon: same verdict."""
    path = KHUGEPAGED_DIR / knob
    with saved_thp(**{knob: read_knob(knob)}):
        for value in SYSFS_CASES:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, value.encode())
                kernel_ok = True
            except OSError:
                kernel_ok = False
            finally:
                os.close(fd)
            reply = daemon.set(knob, value)
            assert reply["ok"] is kernel_ok, (knob, value, reply)
            if kernel_ok:
                assert reply["value"] == parse(knob, value) == int(read_knob(knob))
