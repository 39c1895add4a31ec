"""`hugepaged install` / `uninstall`: the unit, the man pages and the completions land where
systemd, man, bash-completion and zsh look for them (each tool asked, not assumed), the unit
passes `systemd-analyze verify` because of it, and uninstall takes back exactly what install
put there, the kernel's khugepaged settings included. The unit's sandbox is checked against
where this very interpreter lives, in a private mount namespace set up as systemd would."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hugepaged.cli.unit import sandbox_changes, unit_text
from hugepaged.errors import UsageError
from kit.daemon_runner import hugepaged_cli

from .hugepaged_fixture import fixture_command
from .marks import needs_root, require_tool

SYSTEMD = "part of systemd (apt-get install systemd)"
PREFIX = "usr/local"
FILES = ["etc/systemd/system/hugepaged.service", f"{PREFIX}/share/man/man8/hugepaged.8",
         f"{PREFIX}/share/man/man5/hugepaged.toml.5",
         f"{PREFIX}/share/bash-completion/completions/hugepaged",
         f"{PREFIX}/share/zsh/site-functions/_hugepaged", "var/lib/hugepaged/installed.json"]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def verify(root: Path, manpath: Path) -> subprocess.CompletedProcess:
    tool = require_tool("systemd-analyze", SYSTEMD)
    env = {**os.environ, "MANPATH": str(manpath), "SYSTEMD_LOG_LEVEL": "notice"}
    return subprocess.run([tool, "verify", str(root / FILES[0])], env=env, capture_output=True,
                          text=True, timeout=60)


def test_install_puts_each_file_where_its_tool_looks_and_uninstall_takes_exactly_them(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").mkdir()  # a directory that was there before: uninstall keeps it
    r = hugepaged_cli("install", "--root", str(root))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for f in FILES:
        assert (root / f).is_file(), f
    link = root / PREFIX / "bin" / "hugepaged"
    assert link.is_symlink() and os.access(link, os.X_OK)  # this installation's command
    man_dir = root / PREFIX / "share" / "man"

    # systemd: the Documentation= pages exist where man looks, so verify passes; without
    # them (an empty MANPATH) it fails, which is what a fresh install used to give
    ok = verify(root, man_dir)
    assert ok.returncode == 0 and "hugepaged" not in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    bad = verify(root, tmp_path)
    assert bad.returncode != 0 and "man hugepaged(8)" in bad.stderr, bad.stderr
    # man: both pages, by section
    man = require_tool("man", "apt-get install man-db")
    env = {**os.environ, "MANPATH": str(man_dir)}
    for section, page in (("8", "hugepaged"), ("5", "hugepaged.toml")):
        r = subprocess.run([man, "-w", section, page], env=env, capture_output=True, text=True)
        assert r.stdout.strip() == str(man_dir / f"man{section}" / f"{page}.{section}"), r
    # bash-completion's own loader finds it through XDG_DATA_DIRS
    loader = Path("/usr/share/bash-completion/bash_completion")
    if not loader.exists():
        require_tool("bash-completion-loader", "apt-get install bash-completion")
    program = (f"source {loader}; __load_completion hugepaged && complete -p hugepaged")
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True,
                       text=True, env={**os.environ, "XDG_DATA_DIRS": str(root / PREFIX / "share"),
                                       "HOME": str(tmp_path)}, timeout=30)
    assert r.returncode == 0 and "_shtab_hugepaged" in r.stdout and r.stdout.rstrip().endswith(
        " hugepaged"), r.stdout + r.stderr
    # zsh: compinit finds _hugepaged in the site-functions directory of its default fpath
    zsh = require_tool("zsh", "apt-get install zsh")
    site = root / PREFIX / "share" / "zsh" / "site-functions"
    program = (f"fpath=({site} $fpath); autoload -U compinit && "
               f"compinit -u -d {tmp_path}/zcompdump; print -r -- $_comps[hugepaged]")
    r = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.stdout.strip() == "_hugepaged", r.stdout + r.stderr

    # uninstall: exactly what install put there; the tree is as it was
    r = hugepaged_cli("uninstall", "--root", str(root))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert tree(root) == ["etc"], tree(root)
    r = hugepaged_cli("uninstall", "--root", str(root))
    assert r.returncode == 2 and "no record of an installation" in r.stderr, r.stderr


def test_a_file_changed_since_install_is_kept(tmp_path):
    root = tmp_path
    assert hugepaged_cli("install", "--root", str(root)).returncode == 0
    unit = root / FILES[0]
    unit.write_text(unit.read_text() + "# the admin's\n")
    r = hugepaged_cli("uninstall", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert f"kept {unit} (changed since it was installed)" in r.stdout.splitlines()
    assert tree(root) == ["etc", "etc/systemd", "etc/systemd/system", FILES[0]]
    assert hugepaged_cli("install", "--root", str(root / "absent")).returncode == 2


# --------------------------------------------------------------------------------------------
# The kernel's knobs: restore-kernel, and uninstall doing what it does


def fixture_sys(tmp_path: Path) -> Path:
    d = tmp_path / "sys" / "kernel" / "mm" / "transparent_hugepage" / "khugepaged"
    d.mkdir(parents=True)
    (d.parent / "enabled").write_text("always [madvise] never\n")
    for k, v in {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000}.items():
        (d / k).write_text(f"{v}\n")
    return tmp_path / "sys"


def left_quiet(sys_root: Path, state: Path) -> None:
    """What a daemon killed while quiet leaves: quiet knobs, a state file, a lock file."""
    from hugepaged.daemon.kernel_quiet import KernelQuieter
    from hugepaged.kernel.sysfs import ThpSysfs

    dead = KernelQuieter(ThpSysfs(str(sys_root)), str(state))
    dead.quiet()
    dead._release()  # what SIGKILL does to the lock
    assert state.exists() and Path(f"{state}.lock").exists()


def fixture_cli(*args: str) -> subprocess.CompletedProcess:
    """`hugepaged ARGS...` with a fixture /sys (tests/hugepaged_fixture.py)."""
    return subprocess.run(fixture_command(*args), capture_output=True, text=True, timeout=60,
                          cwd="/", stdin=subprocess.DEVNULL)


def knobs(sys_root: Path) -> dict[str, str]:
    d = sys_root / "kernel" / "mm" / "transparent_hugepage" / "khugepaged"
    return {k: (d / k).read_text().strip() for k in ("pages_to_scan", "scan_sleep_millisecs")}


@needs_root
def test_restore_kernel_leaves_no_state_file_and_no_lock(tmp_path):
    sys_root = fixture_sys(tmp_path)
    state = tmp_path / "run" / "kernel-khugepaged.json"
    r = fixture_cli("restore-kernel", "--state-file", str(state), "--sys-root", str(sys_root))
    assert (r.returncode, r.stdout) == (0, "nothing to restore\n"), r.stderr
    assert not (tmp_path / "run").exists()  # not even a lock file to look
    left_quiet(sys_root, state)
    assert knobs(sys_root) == {"pages_to_scan": "1", "scan_sleep_millisecs": "4294967295"}
    r = fixture_cli("restore-kernel", "--state-file", str(state), "--sys-root", str(sys_root))
    assert (r.returncode, r.stdout) == (0, "restored\n"), r.stderr
    assert knobs(sys_root) == {"pages_to_scan": "4096", "scan_sleep_millisecs": "10000"}
    assert os.listdir(tmp_path / "run") == []


@needs_root
def test_restore_kernel_leaves_a_running_daemons_lock_alone(tmp_path):
    from hugepaged.kernel.limits import remove_lock, try_lock

    lock = tmp_path / "state.json.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hugepaged.kernel.limits import try_lock; "
        f"try_lock({str(lock)!r}); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert remove_lock(str(lock)) is False and lock.exists()
        r = fixture_cli("restore-kernel", "--state-file", str(tmp_path / "state.json"),
                          "--sys-root", str(fixture_sys(tmp_path)))
        assert r.returncode == 0 and r.stdout.startswith(
            f"nothing to restore: a running hugepaged (pid {holder.pid}, "), r.stdout
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert remove_lock(str(lock)) is True and not lock.exists()
    fd = try_lock(str(lock))  # and a new lock is taken as before
    os.close(fd)


@needs_root
def test_uninstall_restores_the_kernels_knobs(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    sys_root = fixture_sys(tmp_path)
    state = tmp_path / "run" / "kernel-khugepaged.json"
    assert hugepaged_cli("install", "--root", str(root)).returncode == 0
    left_quiet(sys_root, state)
    r = fixture_cli("uninstall", "--root", str(root), "--state-file", str(state),
                      "--sys-root", str(sys_root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "kernel khugepaged settings: restored"
    assert knobs(sys_root) == {"pages_to_scan": "4096", "scan_sleep_millisecs": "10000"}
    assert os.listdir(tmp_path / "run") == [] and tree(root) == []


# --------------------------------------------------------------------------------------------
# The unit's sandbox, from where the code really lives


def test_sandbox_follows_where_the_code_lives():
    assert sandbox_changes(["/opt/hugepaged/bin/hugepaged", "/usr/bin/python3.11"]) == {}
    home = sandbox_changes(["/opt/hugepaged", "/root/.pyenv/versions/3.11.7"])
    assert home == {"ProtectHome": ("read-only", ["/root/.pyenv/versions/3.11.7"])}
    assert sandbox_changes(["/tmp/venv", "/home/me/src/hugepaged"]) == {
        "PrivateTmp": ("no", ["/tmp/venv"]), "ProtectHome": ("read-only",
                                                             ["/home/me/src/hugepaged"])}
    assert sandbox_changes(["/rooted/x", "/tmpfoo"]) == {}  # whole components only
    with pytest.raises(UsageError, match="/dev/shm/venv: hugepaged's code lives under /dev"):
        sandbox_changes(["/dev/shm/venv"])
    text = unit_text(["/tmp/venv/bin/python3"])
    assert "\nPrivateTmp=no\n" in text and "\nPrivateTmp=yes\n" not in text
    assert "\nProtectHome=yes\n" in text


def exec_line(unit: str) -> list[str]:
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))[:-1]  # without `run`


def setting(unit: str, key: str) -> str:
    return [x for x in unit.splitlines() if x.startswith(f"{key}=")][-1].split("=", 1)[1]


def sandboxed(command: list[str], protect_home: str, private_tmp: str) -> subprocess.Popen:
    """`command --version` in a private mount namespace laid out as systemd lays out the
    service's for these two settings: ProtectHome=yes hides /home, /root and /run/user
    (an empty tmpfs over each), read-only makes them read-only; PrivateTmp=yes gives an
    empty /tmp and /var/tmp."""
    unshare = require_tool("unshare", "apt-get install util-linux")
    steps = []
    for d in ("/home", "/root", "/run/user"):
        if not os.path.isdir(d):
            continue
        if protect_home == "yes":
            steps.append(f"mount -t tmpfs tmpfs {d}")
        elif protect_home == "read-only":
            steps.append(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}")
    if private_tmp == "yes":
        steps += ["mount -t tmpfs tmpfs /tmp", "mount -t tmpfs tmpfs /var/tmp"]
    script = " && ".join([*steps, shlex.join([*command, "--version"])])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as the unit runs it
    return subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, env=env, cwd="/")


@needs_root
def test_the_generated_unit_can_exec_this_installation_in_its_sandbox():
    """The unit `hugepaged unit` writes for this very interpreter starts in its sandbox;
    where the code lives somewhere the shipped settings hide, those settings would not."""
    r = subprocess.run([sys.executable, "-m", "hugepaged", "unit"], capture_output=True,
                       text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    unit = r.stdout
    command = exec_line(unit)
    home, tmp = setting(unit, "ProtectHome"), setting(unit, "PrivateTmp")
    ran = sandboxed(command, home, tmp)
    assert ran.returncode == 0 and ran.stdout.startswith("hugepaged "), ran.stdout + ran.stderr
    if (home, tmp) != ("yes", "yes"):  # the shipped sandbox, for contrast
        shipped = sandboxed(command, "yes", "yes")
        assert shipped.returncode != 0, shipped.stdout


def test_installed_record_is_json_naming_only_what_was_written(tmp_path):
    assert hugepaged_cli("install", "--root", str(tmp_path)).returncode == 0
    record = json.loads((tmp_path / FILES[-1]).read_text())
    assert sorted(record["files"]) == sorted("/" + f for f in FILES[:-1])
    assert list(record["links"]) == [f"/{PREFIX}/bin/hugepaged"]
