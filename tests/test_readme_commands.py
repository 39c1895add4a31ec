"""Every command README.md and bench/README.md show, run as a newcomer runs them.

A copy of the tree (what git tracks, as a fresh clone has it). The set-up commands run as on
a stock Debian: PATH is root's default, so `python3` is the distribution's (which PEP 668
marks externally managed, as on Debian 12 and Ubuntu 24.04), and what they would write
outside the tree goes into the test's own: `/opt/hugepaged`, `/opt/pipx` and the root that
`hugepaged install --root` writes below (its `/usr/local/bin` first on PATH, as the install's
link puts `hugepaged` there). `systemctl enable --now hugepaged` starts the daemon the way the
installed unit says (its ExecStart), `systemctl reload` sends it SIGHUP; the installed unit
must pass `systemd-analyze verify` with only the man pages install put in place. The pipx
line runs in a root of its own (it is the other way to install, not a second one). `apt-get
install` lines are not run: their packages must be in the README's test command (CI installs
them) and installed. A developer's commands (`pip install -e '.[bench]'`, `python
bench/compare.py`) run in a fresh virtual environment without the system's packages. Every
TOML block is the configuration the next `--config hugepaged.toml` reads, and each is also
checked by starting a daemon with it (the README's examples must work as written here).
Then each shown command, in the documents' order: every line of a ```sh block, and every
`$ ` line of another fenced block. What the test supplies, since no document can: the pid
(`--pid N` becomes a workload laid out as the README says), and for the daemon a private
socket and state file and `--pid` (a daemon is never let loose on the other processes of a
shared machine; the kernel is at enabled=never, which the daemon inherits, so it collapses
nothing under the commands that follow); the commands that talk to the daemon get its
socket. The quick benchmark is checked for its clean start (`--help`) and, before the `bench`
extra is installed, for its one-line message. The README's test command is the suite itself
and is not run here (tests/test_readme.py checks that it is CI's).

The environment costs about a minute on this machine (the venv and pipx installs, and the
bench extra, from the local pip cache), which is why this is one test and not one per
command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tomllib
import venv
from pathlib import Path

from kit.daemon_runner import Daemon
from kit.helpers import Workload, saved_thp

from .marks import kernel_test, require_tool

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "bench/README.md")
FENCE = re.compile(r"^(<!-- test-command -->\s*\n)?```(\w*)\n(.*?)^```", re.M | re.S)
DAEMON_COMMANDS = {"status", "get", "set", "top"}
RESULT_COUNT = re.compile(r"\b[A-Z][A-Z_]+:\d+|collapsed \d+ window")
# The README's example process (its pid there): 64 full windows and 8 holding 16 pages each,
# MADV_HUGEPAGE. Other sections show other processes; their commands get it too, for a clean
# run, but their counts are not its.
EXAMPLE_PID = re.search(r"^\$ hugepaged \w+ --pid (\d+)", (ROOT / "README.md").read_text(),
                        re.M).group(1)
LAYOUT = [{"name": "full", "windows": 64, "fill": "all", "hugepage": True},
          {"name": "sparse", "windows": 8, "fill": "first:16", "hugepage": True}]
STOCK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # root's, Debian
# Paths the set-up writes outside the tree, and where the test puts them instead.
MOVED = ("/opt/hugepaged", "/opt/pipx", "/usr/local/bin", "/etc/hugepaged")
SYSTEMCTL = {"daemon-reload", "enable --now hugepaged", "reload hugepaged"}


def readme_test_packages() -> set[str]:
    block = re.search(r"<!-- test-command -->\s*```sh\n(.+?)\n```",
                      (ROOT / "README.md").read_text(), re.S).group(1)
    return set(re.search(r"apt-get install ([^>&]+)", block).group(1).split())


def shown(text: str) -> list[tuple[str, list[str]]]:
    """(command, the output shown under it), in order; the marked test command left out."""
    out: list[tuple[str, list[str]]] = []
    for m in FENCE.finditer(text):
        marked, lang, body = m.groups()
        if marked:
            continue
        lines = body.splitlines()
        if lang == "toml":  # the configuration the next `--config hugepaged.toml` reads
            out.append(("#toml", lines))
            continue
        if lang == "sh":
            out += [(line.strip(), []) for line in lines if line.strip()]
            continue
        for line in lines:
            if line.startswith("$ "):
                out.append((line[2:].strip(), []))
            elif out and out[-1][0] and any(b.startswith("$ ") for b in lines):
                out[-1][1].append(line)
    return out


def documented() -> list[tuple[str, list[str], str]]:
    """(command, output, the whole line it is part of): every command, once; a line of two
    commands gives both; an install both documents show runs the first time."""
    steps: list[tuple[str, list[str], str]] = []
    for doc in DOCS:
        for line, output in shown((ROOT / doc).read_text()):
            for part in line.split(" && "):
                part = part.strip()
                if kind(part) != "install" or all(part != c for c, _, _ in steps):
                    steps.append((part, output, line))
    return steps


def kind(command: str) -> str:
    """How the test runs a documented command; "" for one it does not know."""
    if command == "#toml":
        return "toml"
    words = shlex.split(command.removeprefix("sudo "))
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value before a command
        words = words[1:]
    if words[:2] == ["apt-get", "install"]:
        return "apt"
    if words[:3] == ["python3", "-m", "venv"]:
        return "venv"
    if words[:2] == ["pipx", "install"]:
        return "pipx"
    if words[:1] == ["systemctl"]:
        return "systemctl"
    if (words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]
            or (words[:1] and words[0].endswith("/bin/pip") and words[1:2] == ["install"])):
        return "install"
    name = os.path.basename(words[0]) if words else ""
    if name == "hugepaged" and words[1:2] == ["run"]:
        return "daemon"
    if name == "hugepaged" and words[1:2] == ["unit"] and words[2:3] == [">"]:
        return "unit"
    if name == "hugepaged":
        return "hugepaged"
    if words[:2] == ["python", "bench/compare.py"]:
        return "compare"
    return ""


def test_every_documented_command_is_one_this_test_runs():
    steps = documented()
    kinds = {kind(c) for c, _, _ in steps}
    assert {"apt", "venv", "install", "pipx", "systemctl", "hugepaged", "toml"} <= kinds, kinds
    assert any(c.endswith("'.[bench]'") for c, _, _ in steps), \
        "neither README says how to install the bench extra (matplotlib)"
    unknown = [c for c, _, _ in steps if not kind(c)]
    assert not unknown, f"the docs show commands this test does not run: {unknown}"
    verbs = {" ".join(shlex.split(c)[1:]) for c, _, _ in steps if kind(c) == "systemctl"}
    assert verbs <= SYSTEMCTL, verbs - SYSTEMCTL


class Machine:
    """A fresh clone, and the places outside it the set-up writes to, all below `base`."""

    def __init__(self, base: Path, tree: Path | None = None) -> None:
        self.base = base
        self.tree = tree or base / "hugepaged"
        self.root = base / "root"  # what `hugepaged install --root` writes below
        self.root.mkdir(parents=True)
        if tree is None:
            files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                   check=True).stdout.decode().split("\0")
            for name in filter(None, files):
                if (ROOT / name).is_file():
                    (self.tree / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, self.tree / name)
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.places = {"/opt/hugepaged": base / "opt" / "hugepaged",
                       "/opt/pipx": base / "opt" / "pipx",
                       "/usr/local/bin": self.root / "usr" / "local" / "bin",
                       "/etc/hugepaged": self.root / "etc" / "hugepaged"}
        self.stock = {**clean, "PATH": f"{self.places['/usr/local/bin']}:{STOCK_PATH}"}
        self.dev_dir = base / "dev-venv"
        self.dev = {**clean, "PATH": f"{self.dev_dir / 'bin'}:{clean.get('PATH', '')}"}

    def moved(self, command: str) -> str:
        """The command with the set-up's paths moved below `base`, and `--root` for
        `hugepaged install`."""
        words = shlex.split(command.removeprefix("sudo "))
        out = []
        for w in words:
            for path in MOVED:
                if w == path or w.startswith(path + "/") or "=" + path in w:
                    w = w.replace(path, str(self.places[path]), 1)
            out.append(w)
        name = os.path.basename(out[0]) if out else ""
        if name == "hugepaged" and out[1:2] == ["install"]:
            out += ["--root", str(self.root)]
        return shlex.join(out)

    def run(self, command: str, env: dict, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        assignments = {}
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            assignments[key] = value
        return subprocess.run(shlex.join(words), shell=True, cwd=self.tree,
                              env={**env, **assignments}, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def unit(self) -> Path:
        return self.root / "etc" / "systemd" / "system" / "hugepaged.service"

    def exec_start(self) -> list[str]:
        line = next(x for x in self.unit().read_text().splitlines()
                    if x.startswith("ExecStart="))
        return shlex.split(line.removeprefix("ExecStart="))

    def config(self) -> str | None:
        path = self.places["/etc/hugepaged"] / "hugepaged.toml"
        return str(path) if path.exists() else None


def with_test_values(command: str, pid: int, socket: str | None) -> str:
    """The documented command with the test's pid, and the daemon's socket where it talks to
    the daemon."""
    words = shlex.split(command)
    for i, w in enumerate(words[:-1]):
        if w == "--pid":
            words[i + 1] = str(pid)
    if socket is not None and words[1] in DAEMON_COMMANDS:
        words += ["--socket", socket]
    return shlex.join(words)


def expect(command: str, output: list[str], r: subprocess.CompletedProcess) -> None:
    """Exit 0, or 2 with the very error line the document shows; never a traceback; for the
    example process, the counts the document shows (SUCCEED:64, collapsed 64 window(s))."""
    errors = [line for line in output if line.startswith("hugepaged: ")]
    what = f"{command!r}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, what
    if errors:
        assert r.returncode == 2 and r.stderr.splitlines() == errors, what
    else:
        assert r.returncode == 0, what
    if f"--pid {EXAMPLE_PID} " in command:  # the README's example: the counts it shows
        shown_counts = set(RESULT_COUNT.findall("\n".join(output)))
        assert shown_counts <= set(RESULT_COUNT.findall(r.stdout)), (shown_counts, what)


def missing_line(packages: str) -> list[str]:
    return [f"compare.py: needs {packages}, which {'are' if ',' in packages else 'is'} not "
            "installed: pip install -e '.[bench]' (in the repository's root)"]


def check_apt(command: str) -> None:
    """Not run: each package is one CI installs (the README's test command) and here."""
    packages = [w for w in shlex.split(command)[2:] if not w.startswith("-")]
    missing = set(packages) - readme_test_packages()
    assert not missing, f"{command}: {missing} not in the README's test command"
    for p in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                           text=True)
        assert r.stdout.endswith("installed"), f"{p} is not installed: run the test command"


def check_installed_unit(m: Machine) -> None:
    """The unit install wrote names the installation's command and passes `systemd-analyze
    verify` with only the man pages install put in place (Documentation=)."""
    tool = require_tool("systemd-analyze", "part of systemd (apt-get install systemd)")
    command = m.exec_start()
    assert command[1:] == ["run"] and Path(command[0]).is_file(), command
    assert not command[0].startswith(str(m.root)), command  # the venv's, not a link
    env = {**m.stock, "MANPATH": str(m.root / "usr/local/share/man"),
           "SYSTEMD_LOG_LEVEL": "notice"}
    r = subprocess.run([tool, "verify", str(m.unit())], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "hugepaged" not in r.stdout + r.stderr, r.stdout + r.stderr


def check_config(m: Machine, path: Path, pid: int, lines: list[str]) -> None:
    """A documented configuration, verbatim: a daemon starts with it and stops cleanly."""
    d = Daemon([pid], args=["--config", str(path)], command=m.exec_start()[:1],
               env={"PYTHONPATH": None}, log_format=None, log_level=None)
    try:
        d.start()
        assert d.stop(signal.SIGTERM) == 0, d.stderr()
    finally:
        d.close()
    assert "Traceback" not in d.stderr(), "\n".join(lines) + "\n" + d.stderr()


def run_pipx(base: Path, tree: Path, line: str) -> None:
    """The pipx line as a whole, in a root of its own (the other way to install): pipx puts
    the command on PATH, whose `hugepaged install` writes a unit naming pipx's venv, which
    verifies."""
    require_tool("pipx", "apt-get install pipx")
    m = Machine(base, tree=tree)
    for part in line.split(" && "):
        r = m.run(m.moved(part.strip()), m.stock)
        assert r.returncode == 0, f"{part}: {r.stdout}{r.stderr}"
    assert str(m.places["/opt/pipx"]) in m.exec_start()[0], m.exec_start()
    check_installed_unit(m)
    r = m.run("hugepaged --version", m.stock)
    assert r.returncode == 0 and r.stdout.startswith("hugepaged "), r.stdout + r.stderr


@kernel_test
def test_the_documented_commands_work_as_written(tmp_path):
    m = Machine(tmp_path)
    venv.create(m.dev_dir, with_pip=True)
    r = m.run("python bench/compare.py --quick", m.dev)  # before any install
    assert r.returncode == 1 and r.stderr.splitlines() == missing_line(
        "numpy, hugepaged, matplotlib"), r.stderr
    daemon: Daemon | None = None
    checked = set()
    done_lines = set()
    toml = m.tree / "hugepaged.toml"
    with saved_thp(enabled="never"), Workload(regions=LAYOUT) as w:
        try:
            for command, output, line in documented():
                k = kind(command)
                if line in done_lines:
                    continue
                if k == "apt":
                    check_apt(command)
                elif k in ("venv", "install"):
                    dev = not shlex.split(command)[0].startswith("/")  # pip, python -m pip
                    r = m.run(m.moved(command), m.dev if dev else m.stock)
                    assert r.returncode == 0, f"{command}: {r.stdout}{r.stderr}"
                    if k == "install" and not command.endswith("'.[bench]'"):
                        # the README's install alone: compare.py names what is missing
                        python = Path(shlex.split(m.moved(command))[0]).parent / "python"
                        r = m.run(f"{python} bench/compare.py --quick", m.stock)
                        assert r.returncode == 1, r.stderr
                        assert r.stderr.splitlines() == missing_line("matplotlib"), r.stderr
                elif k == "pipx":
                    run_pipx(tmp_path / "pipx", m.tree, line)
                    done_lines.add(line)
                elif k == "systemctl":
                    verb = " ".join(shlex.split(command)[1:])
                    if verb == "enable --now hugepaged":
                        check_installed_unit(m)
                        cfg = m.config()
                        daemon = Daemon([w.pid], args=["--config", cfg] if cfg else [],
                                        command=m.exec_start()[:1], env={"PYTHONPATH": None},
                                        log_format=None, log_level=None).start()
                    elif verb == "reload hugepaged":
                        assert daemon is not None, "reload before the daemon was started"
                        daemon.send(signal.SIGHUP)
                elif k == "daemon":
                    words = shlex.split(command)[2:]
                    daemon = Daemon([w.pid], args=words, command=m.exec_start()[:1],
                                    env={"PYTHONPATH": None}, log_format=None,
                                    log_level=None).start()
                elif k == "hugepaged":
                    assert daemon is not None or shlex.split(command)[1] not in \
                        DAEMON_COMMANDS, f"{command}: the docs show no daemon started before"
                    line_ = with_test_values(m.moved(command), w.pid,
                                             daemon and daemon.socket)
                    r = m.run(line_, m.stock, timeout=60)
                    expect(command, output, r)
                    if shlex.split(command)[1] == "suggest":  # TOML to paste, as it is
                        tomllib.loads(r.stdout)
                elif k == "toml":
                    toml.write_text("\n".join(output) + "\n")
                    check_config(m, toml, w.pid, output)
                elif k == "unit":
                    r = m.run(f"hugepaged unit > {shlex.quote(str(m.unit()))}", m.stock)
                    assert r.returncode == 0 and r.stderr == "", r.stderr
                elif k == "compare":
                    r = m.run(command.removeprefix("sudo ").split(" --")[0] + " --help", m.dev)
                    assert r.returncode == 0 and r.stdout.startswith("usage: compare.py"), \
                        r.stdout + r.stderr
                checked.add(k)
            if daemon is not None:
                assert daemon.stop(signal.SIGTERM) == 0, daemon.stderr()
                assert "Traceback" not in daemon.stderr(), daemon.stderr()
        finally:
            if daemon is not None:
                daemon.close()
        w.verify()  # the README's collapse changed no byte of the process's memory
    assert checked >= {"apt", "venv", "install", "pipx", "systemctl", "hugepaged", "toml",
                       "compare"}, checked
