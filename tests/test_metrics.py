"""Prometheus metrics: the exposition of a real daemon, scraped over HTTP and parsed."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hugepaged.collapse import CollapseOutcome
from hugepaged.config import DaemonOptions
from hugepaged.daemon.counters import LATENCY_BUCKETS, Counters
from hugepaged.daemon.registry import Registry
from hugepaged.daemon.targets import TargetStates
from hugepaged.errors import UsageError
from hugepaged.kernel import Kernel
from hugepaged.metrics import build_registry, parse_listen
from hugepaged.results import ScanResult
from hugepaged.tunables import Tunables
from kit.daemon_runner import Daemon, hugepaged_cli
from kit.helpers import Workload, saved_thp

from .marks import needs_root, needs_thp, require_tool


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, name: str) -> dict:
    """{(sample name, labels as a sorted tuple): value} of one family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fams[name].samples}


@pytest.mark.parametrize(("spec", "want"), [
    ("9633", ("127.0.0.1", 9633)),
    (":9633", ("127.0.0.1", 9633)),
    ("0.0.0.0:9633", ("0.0.0.0", 9633)),
    ("10.1.2.3:80", ("10.1.2.3", 80)),
    ("[::1]:9633", ("::1", 9633)),
    ("fd00::1:9633", ("fd00::1", 9633)),  # the DaemonSet's $(HOST_IP):9633 on IPv6
    ("localhost:0", ("localhost", 0)),
])
def test_parse_listen(spec, want):
    assert parse_listen(spec) == want


@pytest.mark.parametrize("spec", ["", "host:", "host:http", ":65536", "[::1]9633", "-1"])
def test_parse_listen_refuses(spec):
    with pytest.raises(UsageError):
        parse_listen(spec)


def fake_service(counters: Counters, top: int = 0):
    """What the collector reads of a Service, with real Counters and Registry."""
    core = SimpleNamespace(counters=counters, registry=Registry(),
                           membership=SimpleNamespace(targets=[], target_states=TargetStates()),
                           collapser=SimpleNamespace(splits=SimpleNamespace(
                               held_counts=lambda slots: {"split_backoff": 0, "underused": 0})))
    return SimpleNamespace(core=core, kernel=Kernel(), tunables=Tunables(),
                           options=DaemonOptions(metrics_top_processes=top),
                           state=lambda: "idle")


def test_histogram_is_cumulative_and_counters_come_from_counters():
    c = Counters()
    for seconds, result, err in [(0.0001, ScanResult.SUCCEED, 0), (0.003, ScanResult.SUCCEED, 0),
                                 (0.003, ScanResult.FAIL, 11), (0.2, ScanResult.SUCCEED, 0),
                                 (5.0, ScanResult.CGROUP_CHARGE_FAIL, 16)]:
        c.observe(CollapseOutcome(0, result, err, seconds))
    c.results.update({"SUCCEED": 3, "PMD_MAPPED": 7, "FAIL": 1})
    c.full_scans = 2
    fams = families(generate_latest(build_registry(fake_service(c))).decode())
    h = samples(fams, "hugepaged_collapse_duration_seconds")
    buckets = [h[("hugepaged_collapse_duration_seconds_bucket", (("le", le),))]
               for le in [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]]
    assert buckets == [1, 1, 1, 3, 3, 3, 3, 3, 4, 4, 5]  # cumulative, +Inf = count
    assert h[("hugepaged_collapse_duration_seconds_count", ())] == 5
    assert h[("hugepaged_collapse_duration_seconds_sum", ())] == pytest.approx(5.2061)
    assert samples(fams, "hugepaged_pages_collapsed")[("hugepaged_pages_collapsed_total", ())] == 3
    assert samples(fams, "hugepaged_full_scans")[("hugepaged_full_scans_total", ())] == 2
    assert samples(fams, "hugepaged_collapse_attempts")[
        ("hugepaged_collapse_attempts_total", ())] == 5
    fails = samples(fams, "hugepaged_collapse_failures")
    assert fails == {("hugepaged_collapse_failures_total", (("errno", "EAGAIN"),)): 1,
                     ("hugepaged_collapse_failures_total", (("errno", "EBUSY"),)): 1}
    windows = samples(fams, "hugepaged_scan_windows")
    assert windows[("hugepaged_scan_windows_total", (("result", "PMD_MAPPED"),))] == 7
    # top_processes 0: the per-process families are present and empty
    assert fams["hugepaged_process_thp_coverage_ratio"].samples == []


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} print them) listening on `port`."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, _, p = local.partition(":")
                if state == "0A" and int(p, 16) == port:
                    out.append(addr)
    return out


@pytest.mark.kernel
@needs_root
@needs_thp
def test_scrape_a_real_daemon(tmp_path):
    big = {"name": "big", "windows": 6, "fill": "all", "hugepage": True}
    small = {"name": "small", "windows": 2, "fill": "all", "hugepage": True}
    cfg = tmp_path / "hugepaged.toml"
    with saved_thp(enabled="never"), Workload(regions=[big]) as w1, \
            Workload(regions=[small]) as w2:
        cfg.write_text(f'[[target]]\nname = "big"\npid = [{w1.pid}]\nmax_bloat_mb = 64\n'
                       '[[target]]\nname = "unused"\npid = [1]\n')
        with Daemon([w1.pid, w2.pid], sets={"enabled": "madvise"}, config=str(cfg),
                    args=["--metrics", ":0", "--metrics-top-processes", "1"]) as d:
            scrape_checks(d, w1)


def scrape_checks(d: Daemon, w1: Workload) -> None:
    """What one scrape of a daemon that collapsed w1's 6 windows (and 2 more) shows."""
    port = d.wait_event("metrics_listen")["port"]
    assert d.wait_event("metrics_listen")["host"] == "127.0.0.1"
    assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only
    # The cursor wraps (a full scan) only after the last visit ends, a moment after its
    # collapse is counted.
    st = d.wait_for(lambda s: s["counters"]["pages_collapsed"] >= 8
                    and s["counters"]["full_scans"] >= 1, what="8 collapses, a full scan")
    text = scrape(port)
    fams = families(text)
    st = d.status()

    def one(family: str, sample: str | None = None, **labels) -> float:
        want = tuple(sorted(labels.items()))
        return samples(fams, family)[(sample or family, want)]

    assert one("hugepaged_pages_collapsed", "hugepaged_pages_collapsed_total") \
        == st["counters"]["pages_collapsed"] == 8
    assert one("hugepaged_collapse_attempts", "hugepaged_collapse_attempts_total") \
        == st["counters"]["collapse_attempts"]
    assert one("hugepaged_full_scans", "hugepaged_full_scans_total") >= 1
    assert one("hugepaged_scan_windows", "hugepaged_scan_windows_total",
               result="SUCCEED") == 8
    assert one("hugepaged_registered_processes") == 2
    assert one("hugepaged_free_huge_blocks") >= 0
    assert one("hugepaged_cpu_seconds", "hugepaged_cpu_seconds_total") > 0
    assert one("hugepaged_tunable", name="pages_to_scan") == st["tunables"]["pages_to_scan"]
    assert one("hugepaged_settings_info", enabled="madvise",
               shmem_enabled=st["tunables"]["shmem_enabled"],
               kernel_khugepaged="leave", on_split="back_off", collapse_cpus="") == 1
    assert sum(s.value for s in fams["hugepaged_state"].samples) == 1
    assert fams["hugepaged_collapse_duration_seconds"].type == "histogram"
    count = one("hugepaged_collapse_duration_seconds",
                "hugepaged_collapse_duration_seconds_count")
    assert count == st["counters"]["collapse_attempts"]
    assert one("hugepaged_collapse_duration_seconds",
               "hugepaged_collapse_duration_seconds_bucket", le="+Inf") == count
    # --metrics-top-processes 1: only the largest process has coverage series
    cover = fams["hugepaged_process_thp_coverage_ratio"].samples
    assert [s.labels["pid"] for s in cover] == [str(w1.pid)]
    anon = one("hugepaged_process_anon_bytes", pid=str(w1.pid), comm="python")
    huge = one("hugepaged_process_anon_huge_bytes", pid=str(w1.pid), comm="python")
    assert huge == 6 * 2 * 1024 * 1024 and anon >= huge
    assert cover[0].value == pytest.approx(huge / anon)
    assert "process_cpu_seconds_total" in text  # the client's standard process metrics
    # Per target: the target's name is the only label, one series per configured target.
    assert one("hugepaged_target_processes", target="big") == 1
    assert one("hugepaged_target_processes", target="unused") == 0
    assert one("hugepaged_target_pages_collapsed", "hugepaged_target_pages_collapsed_total",
               target="big") == 6
    assert one("hugepaged_target_anon_huge_bytes", target="big") == 6 * 2 * 1024 * 1024
    assert one("hugepaged_target_bloat_bytes", target="big") == 0  # full windows
    assert one("hugepaged_target_bloat_limit_bytes", target="big") == 64 << 20
    for name, fam in fams.items():
        if name.startswith("hugepaged_target_"):
            assert all(set(x.labels) == {"target"} for x in fam.samples), name

    promtool = require_tool("promtool", "apt-get install prometheus")
    check = subprocess.run([promtool, "check", "metrics"], input=text,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout + check.stderr == ""  # no lint complaint either


@needs_root
@needs_thp
def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = hugepaged_cli("run", "--pid", str(os.getpid()), "--socket", str(tmp_path / "s"),
                          "--metrics", str(port))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"hugepaged: --metrics {port}: cannot listen on 127.0.0.1:{port}")


# --------------------------------------------------------------------------------------------
# The endpoint under abuse: any local user can connect to 127.0.0.1


def thread_nices(pid: int) -> dict[int, int]:
    """tid -> nice of every thread of `pid` (/proc/PID/task/TID/stat field 19)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
            out[int(tid)] = int(text[text.rindex(")") + 2:].split()[16])
    return out


def http(port: int, request: bytes) -> tuple[bytes, bytes]:
    """(head, body) of one raw HTTP exchange."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


@needs_root
@needs_thp
def test_idle_connections_and_scrape_loops_cost_no_thread_and_one_render_a_second(tmp_path):
    """Once: a thread per connection, at nice 0 (273 idle connections = 276 threads), and
    every scrape rendered anew (3 loops by user nobody: 190% of a core)."""
    sleeper = subprocess.Popen(["sleep", "120"])
    idle: list[socket.socket] = []
    try:
        with Daemon([sleeper.pid], args=["--metrics", ":0"]) as d:
            port = d.wait_event("metrics_listen")["port"]
            scrape(port)  # the server is up and has served once
            before = thread_nices(d.pid)
            for _ in range(200):  # more than the 128 open at once: the oldest make room
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            t0 = time.monotonic()
            first = scrape(port)  # answered at once: the oldest idle one made room
            second = scrape(port)
            assert time.monotonic() - t0 < 1.0 and first == second  # one render, reused
            nices = thread_nices(d.pid)
            assert len(nices) == len(before), (before, nices)  # no thread per connection
            # Every thread at the daemon's nice 19 but the control socket's (nice 0 on
            # purpose: operators' latency).
            assert sorted(nices.values())[1:] == [19] * (len(nices) - 1), nices
            time.sleep(1.1)
            assert scrape(port) != second  # rendered again after a second
            # Idle connections are closed once they had 3 s to send a request.
            time.sleep(3.5)
            for s in idle[-20:]:
                s.settimeout(2)
                assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
        sleeper.kill()
        sleeper.wait()


@needs_root
@needs_thp
def test_the_endpoint_answers_only_get_and_head_of_the_metrics(tmp_path):
    import gzip

    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        with Daemon([sleeper.pid], args=["--metrics", ":0"]) as d:
            port = d.wait_event("metrics_listen")["port"]
            head, body = http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                                    b"Accept-Encoding: gzip\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Encoding: gzip" in head
            assert b"hugepaged_pages_collapsed_total" in gzip.decompress(body)
            head, body = http(port, b"GET / HTTP/1.1\r\nAccept: application/openmetrics-text;"
                                    b" version=1.0.0\r\n\r\n")
            assert b"Content-Type: application/openmetrics-text" in head and \
                body.endswith(b"# EOF\n")
            head, body = http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b""
            for request, status in [(b"GET /etc/passwd HTTP/1.1\r\n\r\n", b"404"),
                                    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
                                    (b"hello\r\n\r\n", b"400"),
                                    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000, b"431")]:
                head, _ = http(port, request)
                assert head.split()[1] == status, (request[:30], head)
            assert d.alive() and not d.events("metrics_error")
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_root
@needs_thp
def test_a_flood_of_requests_is_accepted_at_a_bounded_rate(tmp_path):
    """Past a burst of 256, 50 connections a second: 350 requests at once cannot all be
    answered in less than (350 - 256) / 50 = 1.9 s, however fast the machine (the 94 past
    the burst wait in the listen backlog of 128: no connect is retried)."""
    from hugepaged.metrics_http import MAX_BURST, MAX_RATE

    sleeper = subprocess.Popen(["sleep", "120"])
    conns: list[socket.socket] = []
    try:
        with Daemon([sleeper.pid], args=["--metrics", ":0"]) as d:
            port = d.wait_event("metrics_listen")["port"]
            t0 = time.monotonic()
            for _ in range(350):
                s = socket.create_connection(("127.0.0.1", port), timeout=20)
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                conns.append(s)
            for s in conns:
                assert s.recv(12) == b"HTTP/1.1 200"
            assert time.monotonic() - t0 >= (350 - MAX_BURST) / MAX_RATE * 0.9
    finally:
        for s in conns:
            s.close()
        sleeper.kill()
        sleeper.wait()
