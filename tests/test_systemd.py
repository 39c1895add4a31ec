"""systemd: the shipped unit (systemd-analyze verify) and sd_notify over real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest

from hugepaged.sdnotify import Keeper, SdNotify, attach, socket_address, watchdog_seconds
from kit.daemon_runner import Daemon, hugepaged_cli
from kit.helpers import THP_DIR, Workload, saved_thp

from .marks import require_tool

UNIT = resources.files("hugepaged").joinpath("data/hugepaged.service")
SYSTEMD = "part of systemd (apt-get install systemd)"
# A comment and the relaxed value where this installation's code lives in a hidden place.
RELAXED = re.compile(r"# This installation's code is in .*, which (\w+)=yes would \w+\.\n"
                     r"\1=(?:read-only|no)\n")


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


# --------------------------------------------------------------------------------------------
# The unit file


def test_unit_is_package_data():
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'hugepaged = \[[^\]]*"data/\*"', pyproject)
    assert UNIT.is_file()


def test_unit_settings():
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == "/usr/local/bin/hugepaged run"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["ExecStopPost"] == "-/usr/local/bin/hugepaged restore-kernel"
    assert one["Restart"] == "on-failure" and one["Nice"] == "19"
    assert one["WatchdogSec"] == "30"
    caps = set(one["CapabilityBoundingSet"].split())
    assert caps == {"CAP_SYS_ADMIN", "CAP_SYS_NICE", "CAP_SYS_PTRACE", "CAP_NET_ADMIN",
                    "CAP_CHOWN"}
    assert one["RuntimeDirectory"] == "hugepaged"  # the default socket's directory
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    # what must stay reachable: every process in /proc, kpageflags, writable THP knobs
    assert one.get("ProtectProc", "default") == "default"
    assert one.get("ProcSubset", "all") == "all"
    assert one.get("ProtectKernelTunables", "no") == "no"
    assert "AF_NETLINK" in one["RestrictAddressFamilies"]
    assert "PrivateNetwork" not in one  # --metrics and the process connector


@pytest.fixture
def unit_dir(tmp_path) -> Path:
    """The unit as `hugepaged unit` prints it for this environment, and its man pages in a
    MANPATH (Documentation=man:hugepaged(8) man:hugepaged.toml(5) is checked by verify)."""
    exe = Path(sys.executable).parent / "hugepaged"
    assert exe.exists(), exe
    r = hugepaged_cli("unit")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert f"ExecStart={exe} run\n" in r.stdout, r.stdout
    shipped = RELAXED.sub(lambda m: f"{m.group(1)}=yes\n", r.stdout)
    assert shipped.replace(str(exe), "/usr/local/bin/hugepaged") == UNIT.read_text()  # but
    (tmp_path / "hugepaged.service").write_text(r.stdout)  # for the path and the sandbox
    for page, section in (("hugepaged", "8"), ("hugepaged.toml", "5")):
        d = tmp_path / "man" / f"man{section}"
        d.mkdir(parents=True)
        r = hugepaged_cli("manpage", page)
        assert r.returncode == 0, r.stderr
        (d / f"{page}.{section}").write_text(r.stdout)
    return tmp_path


def test_systemd_analyze_verify(unit_dir):
    tool = require_tool("systemd-analyze", SYSTEMD)
    env = {**os.environ, "MANPATH": str(unit_dir / "man"), "SYSTEMD_LOG_LEVEL": "notice"}
    r = subprocess.run([tool, "verify", "hugepaged.service"], cwd=unit_dir, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hugepaged.service" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_systemd_analyze_security(unit_dir):
    tool = require_tool("systemd-analyze", SYSTEMD)
    r = subprocess.run([tool, "security", "--offline=yes", "--no-pager",
                        "hugepaged.service"], cwd=unit_dir, capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for hugepaged.service: ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    # A root daemon with CAP_SYS_ADMIN; 10 is "UNSAFE", the hardening brings it to "OK".
    assert float(m.group(1)) <= 4.0, r.stdout


# --------------------------------------------------------------------------------------------
# sd_notify against real datagram sockets


def bound(kind: str, tmp_path: Path) -> tuple[socket.socket, str]:
    """A bound AF_UNIX datagram socket and the $NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        value = str(tmp_path / "notify")
        sock.bind(value)
    else:
        name = f"hugepaged-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind(b"\0" + name.encode())
        value = "@" + name
    sock.settimeout(5)
    return sock, value


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    sock, value = bound(request.param, tmp_path)
    yield sock, value
    sock.close()


@pytest.fixture
def abstract_listener(tmp_path):
    sock, value = bound("abstract", tmp_path)
    yield sock, value
    sock.close()


def messages(sock: socket.socket, n: int = 1) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        data = sock.recv(4096).decode()
        out.append(dict(line.split("=", 1) for line in data.split("\n")))
    return out


def test_notify_protocol(listener):
    sock, value = listener
    n = SdNotify.from_environ({"NOTIFY_SOCKET": value})
    assert n.enabled and n.watchdog is None
    assert n(ready=True, status="scanning")
    assert n(watchdog=True)
    assert n(stopping=True)
    assert n(reloading=True)
    ready, kick, stop, reload_ = messages(sock, 4)
    assert ready == {"READY": "1", "STATUS": "scanning"}
    assert kick == {"WATCHDOG": "1"}
    assert stop == {"STOPPING": "1"}
    assert reload_["RELOADING"] == "1"
    assert abs(int(reload_["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 5_000_000
    with pytest.raises(ValueError):
        n(status="two\nlines")
    n.close()


def test_without_notify_socket_nothing_is_sent():
    n = SdNotify.from_environ({})
    assert not n.enabled
    assert n(ready=True) is False
    assert SdNotify.from_environ({"NOTIFY_SOCKET": "relative/path"}).enabled is False


def test_a_vanished_socket_is_not_fatal(tmp_path):
    n = SdNotify(str(tmp_path / "gone"))
    assert n(ready=True) is False


def test_addresses_and_watchdog_env():
    assert socket_address("@x") == b"\0x"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "2"}, pid=2) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_seconds({}) is None


def test_keeper_kicks_at_half_the_timeout_and_caps_the_sleep(listener):
    sock, value = listener
    now = [100.0]
    n = SdNotify.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "10000000"})
    k = Keeper(n, lambda svc: f"idle: {svc.n} processes", clock=lambda: now[0])
    svc = SimpleNamespace(n=1, max_sleep=None)
    k.tick(svc)  # no kick yet, the first STATUS
    assert messages(sock) == [{"STATUS": "idle: 1 processes"}]
    assert svc.max_sleep == 5.0
    now[0] = 103.0
    k.tick(svc)  # nothing due: nothing sent
    assert svc.max_sleep == pytest.approx(2.0)
    now[0] = 105.0
    svc.n = 2
    k.tick(svc)
    assert messages(sock) == [{"WATCHDOG": "1", "STATUS": "idle: 2 processes"}]
    assert svc.max_sleep == 5.0
    now[0] = 106.0
    svc.n = 3
    k.tick(svc)  # STATUS is rate-limited (5 s)
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_attach_wires_notify_and_the_tick(listener):
    _, value = listener
    svc = SimpleNamespace(notify=None, ticks=[], max_sleep=None)
    n = SdNotify.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"})
    keeper = attach(svc, n)
    assert svc.notify is n and svc.ticks == [keeper.tick]
    assert svc.max_sleep == pytest.approx(1.0, abs=0.05)
    svc2 = SimpleNamespace(notify=None, ticks=[], max_sleep=None)
    assert attach(svc2, SdNotify(None)) is None and svc2.ticks == []


# --------------------------------------------------------------------------------------------
# The real daemon under a fake systemd


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(not (THP_DIR / "enabled").exists(), reason="kernel without THP")
def test_real_daemon_notifies_and_kicks_the_watchdog_while_idle(abstract_listener):
    sock, value = abstract_listener
    # An idle daemon (one process with nothing to collapse) sleeps 5 s and more between
    # passes; with WatchdogSec=1 it must still kick every 0.5 s.
    env = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"}
    quiet = {"name": "a", "windows": 1, "fill": "first:1"}  # no MADV_HUGEPAGE: not eligible
    with saved_thp(enabled="never"), Workload(regions=[quiet]) as w, \
            Daemon([w.pid], sets={"enabled": "madvise"}, env=env) as d:
        first = messages(sock)[0]
        assert first["READY"] == "1" and first["STATUS"] == "scanning"
        kicks = []
        deadline = time.monotonic() + 1.8
        statuses = []
        while time.monotonic() < deadline:
            msg = messages(sock)[0]
            if "WATCHDOG" in msg:
                kicks.append(time.monotonic())
            if "STATUS" in msg:
                statuses.append(msg["STATUS"])
        assert len(kicks) >= 3, kicks
        gaps = [b - a for a, b in zip(kicks, kicks[1:], strict=False)]
        assert max(gaps) < 0.75, gaps  # half of WATCHDOG_USEC, plus scheduling slack
        assert any("processes registered" in s for s in statuses), statuses
        assert d.status()["state"] == "idle"
        d.send(signal.SIGHUP)
        got = [messages(sock)[0] for _ in range(4)]
        assert any("RELOADING" in m for m in got), got
        i = next(i for i, m in enumerate(got) if "RELOADING" in m)
        assert any(m.get("READY") == "1" for m in got[i + 1:]), got
        d.send(signal.SIGTERM)
        rest = []
        while not any("STOPPING" in m for m in rest):
            rest += messages(sock)
        assert d.stop() == 0
