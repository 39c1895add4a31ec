"""Every command README.md and bench/README.md show, run as a newcomer runs them.

A copy of the tree (what git tracks, as a fresh clone has it) and a fresh virtual environment
without the system's packages; the documented installs are the only ones (pip, from the
package index pip is configured with). Then each shown command, in the documents' order:
every line of a ```sh block, and every `$ ` line of another fenced block. What the test
supplies, since no document can: the pid (`--pid N` becomes a workload laid out as the README
says), and for the daemon a private socket and state file and `--pid` (`hugepaged run` is
never let loose on the other processes of a shared machine; the kernel is at enabled=never,
which the daemon inherits, so it collapses nothing under the commands that follow); the
commands that talk to the daemon get its socket. The quick benchmark is checked for its
clean start (`--help`) and, before the `bench` extra is installed, for its one-line message.
The README's test command is the suite itself and is not run here (tests/test_readme.py
checks that it is CI's).

The environment costs about 40 s on this machine (two pip installs from the local wheel
cache), which is why this is one test and not one per command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import venv
from pathlib import Path

from .daemon_runner import Daemon
from .helpers import Workload, saved_thp
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


def documented() -> list[tuple[str, list[str]]]:
    """Every command, once: a line of two commands gives both; an install both documents
    show runs the first time."""
    steps: list[tuple[str, list[str]]] = []
    for doc in DOCS:
        for command, output in shown((ROOT / doc).read_text()):
            for part in command.split(" && "):
                if (part.strip(), output) not in steps or kind(part.strip()) != "install":
                    steps.append((part.strip(), output))
    return steps


def kind(command: str) -> str:
    """How the test runs a documented command; "" for one it does not know."""
    if command == "#toml":
        return "toml"
    words = shlex.split(command.removeprefix("sudo "))
    if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
        return "install"
    if words[:2] == ["hugepaged", "run"]:
        return "daemon"
    if words[:2] == ["hugepaged", "unit"] and words[2:3] == [">"]:
        return "unit"
    if words[:1] == ["hugepaged"]:
        return "hugepaged"
    if words[:2] == ["python", "bench/compare.py"]:
        return "compare"
    return ""


def test_every_documented_command_is_one_this_test_runs():
    steps = documented()
    assert any(kind(c) == "install" for c, _ in steps), "no install command documented"
    assert any(c.endswith("'.[bench]'") for c, _ in steps), \
        "neither README says how to install the bench extra (matplotlib)"
    unknown = [c for c, _ in steps if not kind(c)]
    assert not unknown, f"the docs show commands this test does not run: {unknown}"


class Newcomer:
    """A fresh clone and virtual environment; runs documented commands in them."""

    def __init__(self, base: Path) -> None:
        self.tree, self.env_dir = base / "hugepaged", base / "venv"
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (self.tree / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, self.tree / name)
        venv.create(self.env_dir, with_pip=True)
        bin_dir = str(self.env_dir / "bin")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env["PATH"] = bin_dir + os.pathsep + self.env.get("PATH", "")

    def run(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(command.removeprefix("sudo "), shell=True, cwd=self.tree,
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def hugepaged(self) -> list[str]:
        exe = self.env_dir / "bin" / "hugepaged"
        assert exe.is_file(), "the documented install put no hugepaged command in the venv"
        return [str(exe)]


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


@kernel_test
def test_the_documented_commands_work_as_written_in_a_fresh_venv(tmp_path):
    new = Newcomer(tmp_path)
    r = new.run("python bench/compare.py --quick")  # before any install
    assert r.returncode == 1 and r.stderr.splitlines() == missing_line(
        "numpy, hugepaged, matplotlib"), r.stderr
    daemon: Daemon | None = None
    checked = set()
    with saved_thp(enabled="never"), Workload(regions=LAYOUT) as w:
        try:
            for command, output in documented():
                k = kind(command)
                if k == "install":
                    r = new.run(command)
                    assert r.returncode == 0, f"{command}: {r.stdout}{r.stderr}"
                    if command.endswith("'.[bench]'"):
                        continue
                    # the README's install alone: compare.py names what is missing, in a line
                    r = new.run("python bench/compare.py --quick")
                    assert r.returncode == 1, r.stderr
                    assert r.stderr.splitlines() == missing_line("matplotlib"), r.stderr
                elif k == "daemon":
                    words = shlex.split(command)[2:]
                    daemon = Daemon([w.pid], args=words, command=new.hugepaged(),
                                    env={"PYTHONPATH": None}, log_format=None,
                                    log_level=None).start()
                elif k == "hugepaged":
                    assert daemon is not None or shlex.split(command)[1] not in \
                        DAEMON_COMMANDS, f"{command}: the docs show no daemon started before"
                    line = with_test_values(command, w.pid, daemon and daemon.socket)
                    expect(command, output, new.run(line, timeout=60))
                elif k == "toml":
                    (new.tree / "hugepaged.toml").write_text("\n".join(output) + "\n")
                elif k == "unit":
                    check_unit(new, command, tmp_path / "unit")
                elif k == "compare":
                    r = new.run(command.removeprefix("sudo ").split(" --")[0] + " --help")
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
    assert checked >= {"install", "daemon", "unit", "hugepaged", "compare"}, checked


def check_unit(new: Newcomer, command: str, where: Path) -> None:
    """`hugepaged unit > FILE` into a directory of the test's (not /etc/systemd/system):
    the unit names the venv's command and passes `systemd-analyze verify` (with the man page
    its Documentation= names in a MANPATH, as tests/test_systemd.py verifies the shipped one)."""
    tool = require_tool("systemd-analyze", "part of systemd (apt-get install systemd)")
    unit = where / Path(shlex.split(command)[-1]).name
    (where / "man" / "man1").mkdir(parents=True)
    r = new.run(f"hugepaged unit > {shlex.quote(str(unit))}")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    exe = new.hugepaged()[0]
    text = unit.read_text()
    assert f"ExecStart={exe} run\n" in text and f"ExecStopPost=-{exe} restore-kernel\n" in text
    assert "/usr/local/bin/hugepaged" not in text
    r = new.run(f"hugepaged manpage > {shlex.quote(str(where / 'man' / 'man1' / 'hugepaged.1'))}")
    assert r.returncode == 0, r.stderr
    env = {**new.env, "MANPATH": str(where / "man"), "SYSTEMD_LOG_LEVEL": "notice"}
    r = subprocess.run([tool, "verify", unit.name], cwd=where, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and unit.name not in r.stdout + r.stderr, r.stdout + r.stderr
