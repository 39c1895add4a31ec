"""The container image, built and run for real.

deploy/build-image.sh makes a Debian base here with mmdebstrap, from the Debian archive (no
container registry), and builds deploy/Containerfile on it with buildah. `podman run` cannot
work in this sandbox (crun: `setrlimit RLIMIT_NOFILE: Operation not permitted`, the sandbox
has no CAP_SYS_RESOURCE), so the image runs with `buildah run --isolation chroot`: no OCI
runtime, but what the DaemonSet's pod spec grants, each checked on the running daemon from the
host: the host's PID and network namespaces (hostPID, hostNetwork), the container engine's
default seccomp profile (containers-common's, the rules RuntimeDefault has), /proc with the
engine's masked paths and /sys read-only, exactly the manifest's capabilities, no_new_privs
(allowPrivilegeEscalation: false, applied with setpriv from the image), and the manifest's
volumes. It runs the manifest's own command and arguments against a real host process, which
it collapses (checked from pagemap and kpageflags, contents verified), while it is scraped and
probed. Two things differ from a kubelet, each said where it happens: nsenter's --target is
this test's pid (this sandbox's pid 1 is not readable, not even by root), and the root file
system is writable under buildah, so the test checks instead that the daemon wrote nothing to
it (its overlay upper directory), which is what readOnlyRootFilesystem needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kit.helpers import Workload, pmd_mapped_windows, read_knob, saved_thp

from .marks import ROOT_REASON, kernel_test, require_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"
TAG = "localhost/hugepaged:test"
COMM = "hpcontainer"  # the workload's name: the only process the daemon may take
# Linux capability numbers, as /proc/PID/status's Cap* masks count them.
CAP_NAMES = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
             "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
             "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
             "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
             "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
             "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
             "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE")


def cap_names(mask: int) -> set[str]:
    return {name for bit, name in enumerate(CAP_NAMES) if mask >> bit & 1}


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def pod() -> tuple[dict, dict, str]:
    """The DaemonSet's pod spec, its one container, and the ConfigMap's hugepaged.toml."""
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container, docs["ConfigMap"]["data"]["hugepaged.toml"]


@dataclass
class Image:
    env: dict[str, str]  # CONTAINERS_STORAGE_CONF: buildah's store for this module only
    build_line: str  # build-image.sh's own timing line
    build_seconds: float

    def buildah(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        r = subprocess.run(["buildah", *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"buildah {' '.join(args)}: {r.stderr}"
        return r.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON + "; buildah and mmdebstrap build as root")
    require_tool("mmdebstrap", "apt-get install mmdebstrap")
    require_tool("buildah", "apt-get install buildah")
    store = tmp_path_factory.mktemp("containers")
    conf = store / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{store}/root"\n'
                    f'runroot = "{store}/run"\n')
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}
    t0 = time.monotonic()
    r = subprocess.run([str(DEPLOY / "build-image.sh"), TAG], env=env, capture_output=True,
                       text=True, timeout=900, stdin=subprocess.DEVNULL)
    img = Image(env, r.stdout.strip(), time.monotonic() - t0)
    try:
        assert r.returncode == 0, f"build-image.sh failed:\n{r.stdout}\n{r.stderr}"
        print(f"\n{img.build_line} ({img.build_seconds:.1f} s in all)")
        yield img
    finally:
        # Every working container (unmounted with it), every image, then the store itself.
        img.buildah("rm", "--all", check=False)
        img.buildah("rmi", "--all", "--force", check=False)
        shutil.rmtree(store, ignore_errors=True)


@contextlib.contextmanager
def working_container(img: Image, suffix: str = "main"):
    name = img.buildah("from", "--quiet", "--name", f"hugepaged-test-{os.getpid()}-{suffix}",
                       TAG).strip()
    try:
        yield name
    finally:
        img.buildah("rm", name, check=False)


def run_in(img: Image, ctr: str, *command: str, opts: list[str] = (),
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["buildah", "run", "--isolation", "chroot", *opts, ctr, "--",
                           *command], env=img.env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------------------------
# What the image is


def test_image_config_and_installed_files(image):
    from hugepaged import __version__
    from hugepaged.cli import build_parser
    from hugepaged.metrics import parse_listen

    info = json.loads(image.buildah("inspect", "--type", "image", TAG))["OCIv1"]["config"]
    entry, cmd = info["Entrypoint"], info["Cmd"]
    assert entry == ["hugepaged"]
    ns = build_parser().parse_args(cmd)
    assert ns.command == "run" and parse_listen(ns.metrics) == ("0.0.0.0", 9633)
    assert "9633/tcp" in info["ExposedPorts"] and "/run/hugepaged" in info["Volumes"]
    path = next(e for e in info["Env"] if e.startswith("PATH="))
    assert "/usr/local/bin" in path.split("=", 1)[1].split(":")
    with working_container(image) as ctr:
        # The entry point, as the image's config gives it, runs this repository's version.
        r = run_in(image, ctr, *entry, "--version")
        assert r.returncode == 0 and r.stdout.split() == ["hugepaged", __version__], r
        # Debian's python3 from the base made here, a venv under /opt, compiled bytecode
        # (the root file system is read-only at run time), the package data, no build tree.
        probe = ("import hugepaged, json, numpy, os, prometheus_client, rich, sys; "
                 "d = os.path.dirname(hugepaged.__file__); "
                 "print(json.dumps({'prefix': sys.prefix, 'version': list(sys.version_info[:2]),"
                 " 'package': d, 'unit': os.path.exists(d + '/data/hugepaged.service'),"
                 " 'pyc': sorted(os.listdir(d + '/__pycache__'))[:1],"
                 " 'build': os.path.exists('/build')}))")
        r = run_in(image, ctr, "/opt/hugepaged/bin/python3", "-c", probe)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["prefix"] == "/opt/hugepaged" and got["version"] >= [3, 11]
        assert got["package"].startswith("/opt/hugepaged/lib/python3")
        assert got["unit"] and got["pyc"] and not got["build"]
        r = run_in(image, ctr, "sh", "-c", "readlink -f /usr/local/bin/hugepaged; "
                   "nsenter --version; setpriv --version; . /etc/os-release; echo $ID")
        lines = r.stdout.splitlines()
        assert r.returncode == 0 and lines[0] == "/opt/hugepaged/bin/hugepaged", r
        assert lines[1].startswith("nsenter from util-linux") and lines[-1] == "debian"


# --------------------------------------------------------------------------------------------
# The image run as the DaemonSet runs it


def container_options(img: Image, ctr: str, container: dict, spec: dict,
                      volumes: dict[str, str]) -> list[str]:
    """buildah run options for the pod spec: capabilities and the volumes named in `volumes`
    (by the node's path). buildah's chroot isolation leaves out any volume under /sys."""
    sc = container["securityContext"]
    assert spec["hostPID"] and spec["hostNetwork"]  # buildah's chroot isolation shares both
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}  # buildah applies its default
    assert sc["capabilities"]["drop"] == ["ALL"]
    wanted = {c.upper() for c in sc["capabilities"]["add"]}
    # drop: [ALL] is every one of the engine's defaults dropped by name (buildah 1.28 with
    # chroot isolation applies `--cap-drop all` after the additions and leaves none).
    r = run_in(img, ctr, "grep", "^CapBnd:", "/proc/self/status")
    defaults = cap_names(int(r.stdout.split()[1], 16))
    opts = [f"--cap-drop=CAP_{c}" for c in sorted(defaults - wanted)]
    opts += [f"--cap-add=CAP_{c}" for c in sorted(wanted)]
    for m in container["volumeMounts"]:
        if m["name"] in volumes:  # (buildah 1.28 ignores a volume written with ":rw")
            ro = ":ro" if m.get("readOnly") else ""
            opts.append(f"--volume={volumes[m['name']]}:{m['mountPath']}{ro}")
    return opts


# The pod's container, made by hand where buildah cannot: it makes every mount under /sys
# read-only (the THP hostPath is read-write) and has no read-only root. What a runtime such
# as runc does for this pod spec, in a private mount namespace: the image's root read-only;
# a procfs of the host's PID namespace (hostPID) with the runtime's read-only and masked
# paths; a read-only sysfs (the host's network namespace: hostNetwork); a minimal /dev; the
# volumes; then chroot, the image's environment, no_new_privs and exactly the capabilities.
_POD_SH = r"""
set -eu
root=$1; shift
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t proc proc "$root/proc"
for p in sys sysrq-trigger irq bus fs; do
    [ -e "$root/proc/$p" ] && mount --bind "$root/proc/$p" "$root/proc/$p" \
        && mount -o remount,bind,ro "$root/proc/$p"
done
for p in kcore keys timer_list sched_debug; do
    [ -e "$root/proc/$p" ] && mount --bind /dev/null "$root/proc/$p"
done
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o nosuid,mode=755 tmpfs "$root/dev"
for d in null zero full random urandom tty; do
    touch "$root/dev/$d" && mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir "$root/dev/shm" "$root/dev/pts"
mount -t tmpfs -o nosuid,nodev,noexec tmpfs "$root/dev/shm"
while [ "$1" != "--" ]; do   # SRC DST ro|rw, one volume at a time
    mount --bind "$1" "$root$2"
    [ "$3" = ro ] && mount -o remount,bind,ro "$root$2"
    shift 3
done
shift
exec chroot "$root" "$@"
"""


class PodRunner:
    """The DaemonSet's container from the image's root file system, as described above."""

    def __init__(self, img: Image, ctr: str, container: dict, spec: dict,
                 volumes: dict[str, str]) -> None:
        info = json.loads(img.buildah("inspect", "--type", "container", ctr))
        self.env = info["OCIv1"]["config"]["Env"]
        self.root = img.buildah("mount", ctr).strip()
        sc = container["securityContext"]
        assert spec["hostPID"] and spec["hostNetwork"]  # the host's: nothing unshared
        assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        self.caps = {c.upper() for c in sc["capabilities"]["add"]}
        self.mounts: list[str] = []
        for m in container["volumeMounts"]:
            self.mounts += [volumes[m["name"]], m["mountPath"],
                            "ro" if m.get("readOnly") else "rw"]
            # A runtime makes a missing mount point in the root before it turns read-only.
            if not m["mountPath"].startswith(("/sys/", "/proc/")):
                os.makedirs(self.root + m["mountPath"], exist_ok=True)

    def exec_prefix(self) -> list[str]:
        """setpriv from the image: no_new_privs, exactly the capabilities, the image's env."""
        keep = ",".join(f"+{c.lower()}" for c in sorted(self.caps))
        return ["setpriv", "--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all",
                f"--bounding-set=-all,{keep}", "--", "env", "-i", *self.env]

    def argv(self, argv: list[str]) -> list[str]:
        # unshare and chroot exec: the process started is the container's process itself.
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _POD_SH,
                "pod", self.root, *self.mounts, "--", *self.exec_prefix(), *argv]

    def start(self, argv: list[str], out) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        """A new container of the same pod spec, to completion."""
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)

    def exec(self, pid: int, argv: list[str]) -> subprocess.CompletedProcess:
        """Run in the container of `pid` (its mount namespace and root), as `kubectl exec` and
        the kubelet's exec probes do."""
        return subprocess.run(["nsenter", "--target", str(pid), "--mount", "--root", "--wd",
                               "--", *self.exec_prefix(), *argv], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@kernel_test
def test_image_runs_as_the_daemonset_and_collapses_a_host_process(image, tmp_path):
    spec, container, toml = pod()
    command, args = container["command"], container["args"]
    # This sandbox's pid 1 is not readable (its /proc/1/ns is EACCES even for root): enter
    # the host's cgroup namespace through this test's own process instead, which is in it.
    assert command[:3] == ["nsenter", "--target", "1"]
    command = [*command[:2], str(os.getpid()), *command[3:]]
    # $(HOST_IP):9633 -> the loopback address and a port the kernel picks (the test's
    # network is the host's, shared with whatever else runs here).
    env = {"HOST_IP": "127.0.0.1"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    args = [re.sub(r"^127\.0\.0\.1:9633$", "127.0.0.1:0", a) for a in args]
    assert "127.0.0.1:0" in args
    # The node's paths for the volumes: the ConfigMap's file in a directory of its own (with
    # every process but the workload excluded, and a short pass interval), this test's own
    # directory for the node's /run/hugepaged, the real THP sysfs.
    config = tmp_path / "config"
    config.mkdir()
    (config / "hugepaged.toml").write_text(
        f"exclude_comm = '(?!{COMM}$).*'\nscan_sleep_millisecs = 200\n" + toml)
    run = tmp_path / "run"
    run.mkdir()
    by_name = {v["name"]: v for v in spec["volumes"]}
    assert by_name["config"]["configMap"]["name"] == "hugepaged"
    assert by_name["run"]["hostPath"]["path"] == "/run/hugepaged"
    volumes = {"config": str(config), "run": str(run),
               "thp": by_name["thp"]["hostPath"]["path"]}
    regions = [{"name": "a", "windows": 4, "hugepage": True},
               {"name": "b", "windows": 2}]  # not advised: enabled = "madvise" leaves it
    log = tmp_path / "container.log"
    with saved_thp(enabled="never"), Workload(regions=regions) as w, \
            working_container(image) as ctr, open(log, "w+") as out:
        w.command("comm " + COMM.encode().hex())
        kernels = read_knob("pages_to_scan")
        runner = PodRunner(image, ctr, container, spec, volumes)
        t0 = time.monotonic()
        proc = runner.start([*command, *args], out)
        try:
            st = wait_status(str(run / "hugepaged.sock"), proc, log)
            started = time.monotonic() - t0
            # The container's process is hugepaged itself (setpriv, env, nsenter exec it),
            # with the host's pid (hostPID), exactly the manifest's capabilities, and
            # no_new_privs, in the host's cgroup namespace (nsenter), chrooted in the image.
            assert st["pid"] == proc.pid
            status = proc_status(proc.pid)
            for mask in ("CapBnd", "CapPrm", "CapEff"):
                assert cap_names(int(status[mask], 16)) == runner.caps, (mask, status[mask])
            assert status["NoNewPrivs"] == "1"
            assert os.readlink(f"/proc/{proc.pid}/ns/cgroup") == \
                os.readlink("/proc/self/ns/cgroup")
            assert os.readlink(f"/proc/{proc.pid}/root") == runner.root
            # What it has: the process connector (NET_ADMIN, host network), the syscall
            # tracepoints (tracefs mounted by the daemon over the read-only /sys), and only
            # our workload.
            assert st["connector"] is True and st["madvise_source"] == "tracepoints", st
            # kernel_khugepaged = "quiet" through the read-write THP volume.
            assert read_knob("pages_to_scan") == "1"
            a, b = w.regions["a"], w.regions["b"]
            deadline = time.monotonic() + 60  # 0.9-1.8 s, 13.6 s seen at the pace of 5%
            while not all(pmd_mapped_windows(w.pid, a.start, a.end)):
                assert time.monotonic() < deadline, f"not collapsed: {log.read_text()[-2000:]}"
                assert proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.1)
            collapsed = time.monotonic() - t0
            assert pmd_mapped_windows(w.pid, b.start, b.end) == [False, False]
            w.verify()
            port = next(json.loads(ln)["port"] for ln in log.read_text().splitlines()
                        if '"metrics_listen"' in ln)
            m = scrape(port)
            assert m["hugepaged_pages_collapsed_total"][0][1] >= 4
            assert m["hugepaged_registered_processes"][0][1] == 1
            ((labels, ratio),) = m["hugepaged_process_thp_coverage_ratio"]
            assert labels == {"pid": str(w.pid), "comm": COMM} and ratio > 0
            # Both probes, run in the container as the kubelet runs them: exit 0.
            live = runner.exec(proc.pid, container["livenessProbe"]["exec"]["command"])
            assert live.returncode == 0 and f"pid {proc.pid}" in live.stdout, live
            ready = runner.exec(proc.pid, container["readinessProbe"]["exec"]["command"])
            assert ready.returncode == 0 and json.loads(ready.stdout)["pid"] == proc.pid
            # readOnlyRootFilesystem: a write to the image's root fails.
            touch = runner.exec(proc.pid, ["touch", "/opt/hugepaged/x"])
            assert "Read-only file system" in touch.stderr, touch
            rss_kb = int(proc_status(proc.pid)["VmHWM"].split()[0])
            # The kubelet stops a pod with SIGTERM to the container's process: the daemon.
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-2000:]
            # Stopped: the kernel's khugepaged is back; the liveness probe now fails (in a
            # new container of the same pod spec, the daemon's being gone).
            assert read_knob("pages_to_scan") == kernels
            dead = runner.run(container["livenessProbe"]["exec"]["command"])
            assert dead.returncode != 0 and "hugepaged.sock" in dead.stderr, dead
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        lines = log.read_text().splitlines()
    # The log is the ConfigMap's: JSON, one object per line, no warning or error (a missing
    # capability shows as one: connector or tracepoints unavailable, a process not readable).
    records = [json.loads(ln) for ln in lines]
    assert not [r for r in records if r["level"] in ("warning", "error")], records
    limit = container["resources"]["limits"]["memory"]
    print(f"\ncontainer: answered in {started:.1f} s, workload collapsed after "
          f"{collapsed:.1f} s; daemon peak RSS {rss_kb / 1024:.0f} MiB (limit {limit})")
    assert rss_kb * 1024 < mebibytes(container["resources"]["requests"]["memory"])


# --------------------------------------------------------------------------------------------
# Each capability the manifest adds is needed: the same container with one of them dropped


NOBODY = 65534
# A process of another user (nobody): 4 MiB of private memory in 4 KiB pages, advised.
_NOBODY_SRC = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
H = 2 << 20
m = mmap.mmap(-1, 3 * H, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
start = -(-base // H) * H
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE while filling: 4 KiB pages
for i in range(0, 2 * H, 4096):
    m[start - base + i] = 1
libc.prctl(41, 0, 0, 0, 0)
assert libc.madvise(start, 2 * H, 14) == 0  # MADV_HUGEPAGE
print(start, flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def nobody_workload(comm: str):
    """(pid, start, end) of a process of user nobody with 2 advised windows."""
    python = "/usr/bin/python3"  # Debian's: the test's own may live where nobody cannot go
    if not os.access(python, os.X_OK):
        pytest.fail(f"{python} is missing: the process of another user needs it")
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                             "--clear-groups", python, "-c", _NOBODY_SRC, comm],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        start = int(proc.stdout.readline())
        yield proc.pid, start, start + 4 * 1024 * 1024
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Case:
    dropped: str | None
    comm: str
    log: Path
    proc: subprocess.Popen | None = None
    ctr: str = ""
    run: Path | None = None

    def records(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def event(self, event: str, **match) -> bool:
        return any(r.get("event") == event and all(r.get(k) == v for k, v in match.items())
                   for r in self.records())


@kernel_test
def test_each_capability_is_needed(image, tmp_path):
    """The image's daemon under the engine's default seccomp profile, once with the
    manifest's capabilities and once without each of them (all at once, each with its own
    workloads: one of root, one of nobody). What each one's absence breaks:
    SYS_ADMIN   PFNs and kpageflags read as nothing (no collapse, and no error either), and
                perf_event_open of the tracepoints is refused: "tracepoints unavailable"
    SYS_NICE    process_madvise on another process: EPERM, every process dropped
    SYS_PTRACE  the default seccomp profile allows process_madvise only with it: the
                daemon's start-up probe of MADV_COLLAPSE (on a page of its own) fails with
                EPERM and it exits (the kernel alone lets SYS_ADMIN read other users' maps)
    DAC_READ_SEARCH  nobody's /proc/PID/pagemap (mode 0400): that process dropped
    NET_ADMIN   the process connector: refused, the daemon walks /proc instead
    And the DaemonSet's `nsenter --cgroup` needs two of them itself: SYS_ADMIN (setns) and
    SYS_PTRACE (the target's /proc/PID/ns/cgroup, a process with more capabilities).
    """
    spec, container, _ = pod()
    wanted = {c.upper() for c in container["securityContext"]["capabilities"]["add"]}
    cases = [Case(None, "hpcapall", tmp_path / "all.log")] + \
        [Case(c, f"hpcap{i}", tmp_path / f"{c}.log") for i, c in enumerate(sorted(wanted))]
    with contextlib.ExitStack() as stack:
        stack.enter_context(saved_thp(enabled="never"))
        work = {}
        for case in cases:
            w = stack.enter_context(Workload(regions=[{"name": "a", "windows": 2,
                                                       "hugepage": True}]))
            w.command("comm " + case.comm.encode().hex())
            work[case.comm] = (w, stack.enter_context(nobody_workload(case.comm)))
        for case in cases:
            ctr = case.ctr = stack.enter_context(working_container(image, case.comm))
            # One read-write directory for the configuration and the socket: buildah 1.28
            # gives a second volume at the image's VOLUME path an anonymous volume instead.
            # kernel_khugepaged stays "leave" here: no THP volume, no knob written.
            case.run = tmp_path / case.comm
            case.run.mkdir()
            (case.run / "hugepaged.toml").write_text(
                f"exclude_comm = '(?!{case.comm}$).*'\nenabled = \"madvise\"\n"
                "scan_sleep_millisecs = 200\nlog_format = \"json\"\n")
            opts = container_options(image, ctr, container, spec, {})
            opts = [o for o in opts if o != f"--cap-add=CAP_{case.dropped}"]
            opts.append(f"--volume={case.run}:/srv/hugepaged")
            if case.dropped:
                opts.append(f"--cap-drop=CAP_{case.dropped}")
            command = ["setpriv", "--no-new-privs", "--", "hugepaged", "run", "--config",
                       "/srv/hugepaged/hugepaged.toml", "--socket",
                       "/srv/hugepaged/hugepaged.sock"]
            out = stack.enter_context(open(case.log, "w"))
            case.proc = subprocess.Popen(
                ["buildah", "run", "--isolation", "chroot", *opts, ctr, "--", *command],
                env=image.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            stack.callback(stop_container, case)

        def outcome(case: Case) -> str | None:
            """What this case shows, once it shows it; None while it is still unclear."""
            w, (nb_pid, nb_start, nb_end) = work[case.comm]
            a = w.regions["a"]
            root_done = all(pmd_mapped_windows(w.pid, a.start, a.end))
            nobody_done = all(pmd_mapped_windows(nb_pid, nb_start, nb_end))
            if case.proc.poll() is not None:
                return "exited" if case.proc.returncode else "exited 0"
            dropped = {r["pid"] for r in case.records() if r.get("event") == "dropped"}
            if case.event("connector_unavailable"):
                return "no connector"
            if case.event("tracepoints_unavailable"):
                return "no tracepoints"
            if w.pid in dropped and nb_pid in dropped:
                return "both dropped"
            if nb_pid in dropped and root_done:
                return "nobody dropped"
            if root_done and nobody_done:
                return "both collapsed"
            return None

        expected = {None: "both collapsed", "SYS_ADMIN": "no tracepoints",
                    "SYS_NICE": "both dropped", "SYS_PTRACE": "exited",
                    "DAC_READ_SEARCH": "nobody dropped", "NET_ADMIN": "no connector"}
        got: dict[str | None, str] = {}
        deadline = time.monotonic() + 60
        while len(got) < len(cases) and time.monotonic() < deadline:
            for case in cases:
                if case.dropped not in got and (seen := outcome(case)) is not None:
                    got[case.dropped] = seen
            time.sleep(0.2)
        logs = {c.dropped: c.log.read_text()[-600:] for c in cases
                if got.get(c.dropped) != expected[c.dropped]}
        assert got == expected, logs
        ptrace = next(c for c in cases if c.dropped == "SYS_PTRACE")
        assert "failed with EPERM" in ptrace.log.read_text() and ptrace.proc.returncode == 4
        # Without SYS_ADMIN, a full scan collapses nothing and says nothing about it.
        sys_admin = next(c for c in cases if c.dropped == "SYS_ADMIN")
        st = wait_status(str(sys_admin.run / "hugepaged.sock"), sys_admin.proc, sys_admin.log)
        deadline = time.monotonic() + 20
        while st["counters"]["full_scans"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            st = wait_status(str(sys_admin.run / "hugepaged.sock"), sys_admin.proc,
                             sys_admin.log)
        w, _ = work[sys_admin.comm]
        a = w.regions["a"]
        assert st["counters"]["full_scans"] >= 1 and st["counters"]["pages_collapsed"] == 0, st
        assert not st["collapse_failures"] and not any(pmd_mapped_windows(w.pid, a.start,
                                                                          a.end))
        full = cases[0]
        assert not [r for r in full.records() if r["level"] in ("warning", "error")]
        for case in cases:
            w, _ = work[case.comm]
            w.verify()
        # The DaemonSet's command enters the host's cgroup namespace first.
        ctr = cases[0].ctr
        enter = ["nsenter", "--target", str(os.getpid()), "--cgroup", "--", "true"]
        opts = container_options(image, ctr, container, spec, {})
        assert run_in(image, ctr, *enter, opts=opts).returncode == 0
        for cap, error in (("SYS_ADMIN", "reassociate to namespace 'ns/cgroup' failed: "
                                         "Operation not permitted"),
                           ("SYS_PTRACE", "/ns/cgroup: Permission denied")):
            r = run_in(image, ctr, *enter, opts=[o for o in opts if o != f"--cap-add=CAP_{cap}"]
                       + [f"--cap-drop=CAP_{cap}"])
            assert r.returncode != 0 and error in r.stderr, (cap, r.stderr)


def stop_container(case: Case) -> None:
    """SIGTERM to the daemon (a child of buildah's chroot helper), then wait for buildah."""
    proc = case.proc
    if proc is None or proc.poll() is not None:
        return
    for pid in descendants(proc.pid):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            if f.read().strip().startswith("hugepaged"):
                os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
    return out


def mebibytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) << (20 if unit == "Mi" else 30)


def wait_status(sock: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> dict:
    """The daemon's status over the node's end of its control socket, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run([sys.executable, "-m", "hugepaged", "status", "--json", "--socket",
                            sock], capture_output=True, text=True, timeout=30, cwd="/")
        if r.returncode == 0:
            return json.loads(r.stdout)
        assert proc.poll() is None, f"container exited {proc.returncode}: {log.read_text()}"
        assert time.monotonic() < deadline, f"no answer in {timeout} s: {log.read_text()}"
        time.sleep(0.2)
