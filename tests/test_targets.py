"""Targets: the `[[target]]` tables of the configuration file, every refusal, and matching
real processes by comm, exe, cgroup (v1 and v2) and pid."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hugepaged.config import ConfigError, parse_config
from hugepaged.kernel.procfs import ProcFS, parse_cgroups
from hugepaged.targets import ProcessFacts, Target, cgroup_under, first_match
from kit.daemon_runner import hugepaged_cli

from .marks import needs_root

FULL = '''\
max_ptes_none = 200

[[target]]
name = "redis"               # the label in status, metrics and logs
comm = "^redis-server$"
enabled = "always"
max_ptes_none = 64
max_ptes_swap = 8
max_ptes_shared = 0
priority = 10
max_cpu_percent = 3
max_bloat_mb = 256

[[target]]
name = "pod-a_1"
cgroup = "/kubepods.slice/kubepods-burstable.slice"
exe = "/usr/bin/java"
pid = [1234, 5678]
enabled = "never"
shmem_enabled = "always"
'''


def test_the_issues_shape_parses():
    cfg = parse_config(FULL, "h.toml")
    assert cfg.tunables == {"max_ptes_none": "200"}  # a target's keys are not global ones
    redis, pod = cfg.targets
    assert (redis.name, redis.comm, redis.enabled, redis.max_ptes_none, redis.max_ptes_swap,
            redis.max_ptes_shared, redis.priority, redis.max_cpu_percent,
            redis.max_bloat_mb) == ("redis", "^redis-server$", "always", 64, 8, 0, 10, 3, 256)
    assert (pod.cgroup, pod.exe, pod.pid, pod.enabled) == (
        "/kubepods.slice/kubepods-burstable.slice", "/usr/bin/java", (1234, 5678), "never")
    assert (pod.priority, pod.max_ptes_none, pod.max_bloat_mb) == (0, None, None)
    assert redis.max_bloat_kb == 256 * 1024
    # What the target sets over the global policy; the rest stays the global one.
    assert (redis.shmem_enabled, pod.shmem_enabled) == (None, "always")
    assert pod.overrides() == {"target": "pod-a_1", "priority": 0, "max_cpu_percent": None,
                               "max_bloat_kb": None, "by_cgroup": True, "enabled": "never",
                               "shmem_enabled": "always"}


HEAD = '# targets\n[[target]]\nname = "t"\n'  # the target's keys start on line 4


@pytest.mark.parametrize(("text", "line", "words"), [
    (HEAD + 'comm = "(redis"\n', 4, "comm: invalid regular expression '(redis'"),
    (HEAD + 'comm = "a"\nmax_ptes_none = 512\n', 5, "max_ptes_none: invalid value '512'"),
    (HEAD + 'comm = "a"\nmax_ptes_swap = -1\n', 5, "max_ptes_swap: invalid value '-1'"),
    (HEAD + 'comm = "a"\nmax_ptes_shared = 1.5\n', 5, "expected an integer 0..511"),
    (HEAD + 'comm = "a"\nmax_ptes_none = true\n', 5, "expected an integer 0..511"),
    (HEAD + 'comm = "a"\nenabled = "sometimes"\n', 5, "one of always, madvise, never"),
    (HEAD + 'comm = "a"\nshmem_enabled = "inherit"\n', 5, "shmem_enabled: invalid value"),
    (HEAD + 'comm = "a"\nshmem_enabled = 1\n', 5, "shmem_enabled: expected one of always"),
    (HEAD + 'comm = "a"\nmax_cpu_percent = 101\n', 5, "max_cpu_percent: invalid value '101'"),
    (HEAD + 'comm = "a"\npriority = 1001\n', 5, "priority: invalid value 1001"),
    (HEAD + 'comm = "a"\npriority = "high"\n', 5, "priority: invalid value 'high'"),
    (HEAD + 'comm = "a"\nmax_bloat_mb = -4\n', 5, "max_bloat_mb: invalid value -4"),
    (HEAD + 'comm = "a"\nmax_bloat_mb = 4294967296\n', 5, "max_bloat_mb: invalid value"),
    (HEAD + 'comm = "a"\nmax_ptes_nonne = 3\n', 5, "unknown key 'max_ptes_nonne'"),
    (HEAD + 'comm = "a"\npages_to_scan = 3\n', 5, "unknown key 'pages_to_scan'"),
    (HEAD + 'comm = 5\n', 4, "comm: expected a regular expression"),
    (HEAD + 'comm = "' + "a" * 4097 + '"\n', 4, "comm: regular expression too long"),
    (HEAD + 'comm = "a"\nmax_ptes_none = "64"\n', 5, "max_ptes_none: expected an integer"),
    (HEAD + 'comm = "a"\nenabled = 1\n', 5, "enabled: expected one of always, madvise"),
    (HEAD + 'exe = "redis-server"\n', 4, "exe: expected an absolute path"),
    (HEAD + 'cgroup = "system.slice"\n', 4, "cgroup: expected an absolute path"),
    (HEAD + 'pid = []\n', 4, "pid: expected a non-empty list"),
    (HEAD + 'pid = [0]\n', 4, "pid: expected a non-empty list"),
    (HEAD + 'pid = 12\n', 4, "pid: expected a non-empty list"),
    (HEAD + 'pid = ["12"]\n', 4, "pid: expected a non-empty list"),
    (HEAD + 'enabled = "always"\n', 2, "target t: needs at least one match key"),
    ('\n[[target]]\ncomm = "a"\n', 2, "target 1: 'name' is required"),
    ('[[target]]\nname = "Redis"\ncomm = "a"\n', 2, "name: invalid value 'Redis'"),
    ('[[target]]\nname = ""\ncomm = "a"\n', 2, "name: invalid value ''"),
    ('[[target]]\nname = "a234567890123456789012345678901234"\ncomm = "a"\n', 2,
     "name: invalid value"),
    ('[[target]]\nname = "a b"\ncomm = "a"\n', 2, "name: invalid value 'a b'"),
    ('[[target]]\nname = "t"\ncomm = "a"\n\n[[target]]\nname = "t"\npid = [1]\n', 6,
     "target t: name already used by an earlier target"),
    ('target = 3\n', 1, "target: expected [[target]] tables"),
    ('[target]\nname = "t"\n', 1, "target: expected [[target]] tables"),
    ('[[target]]\nname = "t"\ncomm = "a"\n[[target]]\nname = "u"\ncomm = "b"\n'
     'max_ptes_none = 600\n', 7, "target u: max_ptes_none: invalid value '600'"),
    ('[[target]]\nname = "t"\ncomm = "a"\ncomm = "b"\n', 4, "Cannot overwrite a value"),
])
def test_every_refusal_names_file_and_line(text, line, words):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "/etc/hugepaged/hugepaged.toml")
    msg = str(exc.value)
    assert msg.startswith("/etc/hugepaged/hugepaged.toml")
    assert f"line {line}:" in msg or f"line {line}," in msg, msg
    assert words in msg, msg
    assert "\n" not in msg
    assert exc.value.exit_status == 2


def test_at_most_64_targets():
    text = "".join(f'[[target]]\nname = "t{i}"\npid = [{i + 1}]\n' for i in range(65))
    with pytest.raises(ConfigError, match="at most 64 targets"):
        parse_config(text, "h.toml")
    assert len(parse_config(text.rsplit("[[target]]", 1)[0], "h.toml").targets) == 64


@needs_root
def test_run_refuses_a_bad_target_with_exit_2_and_starts_nothing(tmp_path):
    cfg = tmp_path / "h.toml"
    cfg.write_text('[[target]]\nname = "redis"\ncomm = "^redis-server($"\n')
    sock = tmp_path / "s"
    r = hugepaged_cli("run", "--config", str(cfg), "--socket", str(sock))
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"hugepaged: {cfg}, line 3: target redis: comm: invalid regular "
                           "expression '^redis-server($'"), line
    assert not sock.exists()


# --------------------------------------------------------------------------------------------
# Matching


def test_cgroup_prefix_is_by_whole_components():
    assert cgroup_under("/system.slice/redis.service", "/system.slice/redis.service")
    assert cgroup_under("/system.slice/redis.service/x", "/system.slice/redis.service/")
    assert not cgroup_under("/system.slice/redis.service2", "/system.slice/redis.service")
    assert cgroup_under("/anything", "/")
    assert not cgroup_under("/system.slice", "/system.slice/redis.service")


def test_parse_cgroups_v1_and_v2_lines():
    text = ("12:memory:/kubepods/burstable/pod1/abc\n"
            "3:cpu,cpuacct:/x:y\n"  # a path may hold a colon
            "1:name=systemd:/system.slice\n"
            "0::/kubepods.slice/kubepods-pod2.slice\n")
    assert parse_cgroups(text) == ["/kubepods/burstable/pod1/abc", "/x:y", "/system.slice",
                                   "/kubepods.slice/kubepods-pod2.slice"]


@pytest.fixture
def sleeper():
    """A real process: Popen returns once its exec is done, so comm and exe are sleep's."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _facts(pid: int) -> ProcessFacts:
    fs = ProcFS()
    return ProcessFacts(fs, pid, fs.stat(pid).comm)


def test_match_on_comm_exe_and_pid_of_a_real_process(sleeper):
    pid = sleeper.pid
    exe = os.path.realpath("/bin/sleep")
    facts = _facts(pid)
    assert facts.comm == "sleep" and facts.exe == exe
    targets = [Target("by-pid-other", pid=(pid + 100000,)),
               Target("and-fails", comm="^sleep$", exe="/usr/bin/nothing"),
               Target("by-comm", comm="^sle+p$", exe=exe),
               Target("later", pid=(pid,))]
    assert first_match(targets, facts).name == "by-comm"  # AND of keys; first match wins
    assert first_match(targets[3:], facts).name == "later"
    assert first_match([Target("x", comm="^leep")], facts) is None  # searched, anchors hold
    assert first_match([Target("x", comm="lee")], facts) is not None
    assert first_match([Target("x", exe=exe + "2")], facts) is None


def _mount_of(kind: str) -> Path | None:
    """A writable cgroup hierarchy: cgroup2 (`unified`) or a v1 controller."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, opts, *_ = line.split()
        if kind == "v2" and fstype == "cgroup2":
            return Path(where)
        if kind == "v1" and fstype == "cgroup" and "pids" in opts.split(","):
            return Path(where)
    return None


@needs_root
@pytest.mark.parametrize("kind", ["v2", "v1"])
def test_match_on_cgroup_in_any_hierarchy(kind, sleeper):
    mount = _mount_of(kind)
    if mount is None:
        pytest.skip(f"no cgroup {kind} hierarchy mounted on this machine")
    name = f"hugepaged-test-{uuid.uuid4().hex[:8]}"
    base = mount / name
    (base / "app").mkdir(parents=True)
    try:
        (base / "app" / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        paths = ProcFS().cgroups(sleeper.pid)
        assert any(p.endswith(f"/{name}/app") for p in paths), paths
        prefix = next(p for p in paths if p.endswith(f"/{name}/app")).rsplit("/app", 1)[0]
        facts = _facts(sleeper.pid)
        assert first_match([Target("pod", cgroup=prefix)], facts) is not None
        assert first_match([Target("pod", cgroup=prefix + "/app")], facts) is not None
        assert first_match([Target("pod", cgroup=prefix + "/ap")], facts) is None
        assert first_match([Target("pod", cgroup=prefix, comm="^nope$")], facts) is None
    finally:
        sleeper.kill()
        sleeper.wait()
        for d in (base / "app", base):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:  # the killed process leaves the cgroup a moment later
                    time.sleep(0.05)


def test_a_process_that_exits_matches_nothing_and_raises_nothing(sleeper):
    facts = ProcessFacts(ProcFS(), sleeper.pid, "sleep")
    sleeper.kill()
    sleeper.wait()
    assert facts.exe is None and facts.cgroups == []
    assert first_match([Target("x", exe="/bin/sleep"), Target("y", cgroup="/")], facts) is None


def test_reload_applies_new_targets_or_keeps_the_running_ones(tmp_path):
    from hugepaged.daemon.service import Service
    from hugepaged.kernel import Kernel

    sys_root = tmp_path / "sys"
    thp = sys_root / "kernel" / "mm" / "transparent_hugepage"
    (thp / "khugepaged").mkdir(parents=True)
    (thp / "enabled").write_text("always [madvise] never\n")
    for key, value in {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000,
                       "alloc_sleep_millisecs": 60000, "max_ptes_none": 511,
                       "max_ptes_swap": 64, "max_ptes_shared": 256, "defrag": 1,
                       "pages_collapsed": 0, "full_scans": 0}.items():
        (thp / "khugepaged" / key).write_text(f"{value}\n")
    cfg = tmp_path / "h.toml"
    cfg.write_text('[[target]]\nname = "a"\ncomm = "x"\n')
    svc = Service(Kernel(sys_root=str(sys_root)), str(cfg), {})
    assert [t.name for t in svc.config.targets] == ["a"]
    cfg.write_text('[[target]]\nname = "b"\ncomm = "y"\n[[target]]\nname = "a"\npid = [7]\n')
    svc.reload()
    assert [t.name for t in svc.config.targets] == ["b", "a"]
    for bad in ('[[target]]\nname = "c"\ncomm = "("\n', '[[target]]\nname = "c"\n',
                '[[target]]\nname = "c"\npid = [1]\nmax_bloat_mb = -1\n'):
        cfg.write_text(bad)
        svc.reload()
        assert [t.name for t in svc.config.targets] == ["b", "a"]


def test_pacer_keeps_the_running_average_at_its_share():
    from hugepaged.collapse import Pacer

    p = Pacer(25, now=100.0)
    p.charge(0.01)  # a window that took 10 ms of CPU (and of wall time)
    assert p.wait(100.01) == pytest.approx(0.03)  # 10 ms is 25% of 40 ms
    p.charge(0.05)  # a slow one: 50 ms, ending at 100.09
    assert p.wait(100.09) == pytest.approx(0.15)  # 60 ms of CPU over 240 ms
    assert not p.allows(100.09) and p.allows(100.24)
    unpaced = Pacer(0, now=100.0)
    unpaced.charge(1.0)
    assert unpaced.wait(100.0) == 0.0


def test_meter_charges_all_the_threads_cpu_since_the_last_charge():
    from hugepaged.collapse import Pacer, ThreadMeter

    cpu = [10.0]
    p = Pacer(10, now=0.0)
    meter = ThreadMeter(p, clock=lambda: cpu[0])
    cpu[0] += 0.2  # the scan before the first collapse counts too
    meter.charge()
    assert p.cpu == pytest.approx(0.2) and p.wait(0.0) == pytest.approx(2.0)
    meter.charge()  # nothing spent since: nothing more
    assert p.wait(2.0) == 0.0


def test_controls_of_daemon_follow_its_targets_by_pid():
    """top's view of the daemon's policy: a registered process by its target's settings
    (status "policy"), others the global policy; a status without policies gives None."""
    from hugepaged.policy import CollapseControl
    from hugepaged.targets import controls_of_daemon

    status = {"targets": [{"name": "t", "policy": {"enabled": "always", "max_ptes_none": 64,
                                                   "priority": 5, "max_bloat_mb": 1}}],
              "processes": [{"pid": 10, "target": "t"}, {"pid": 11, "target": None}]}
    base = CollapseControl()
    control_for = controls_of_daemon(status, base)
    t = control_for(10)
    assert (t.target, t.enabled, t.max_ptes_none, t.priority, t.max_bloat_kb) == \
        ("t", "always", 64, 5, 1024)
    assert control_for(11) == base and control_for(12) == base
    del status["targets"][0]["policy"]
    assert controls_of_daemon(status, base) is None
