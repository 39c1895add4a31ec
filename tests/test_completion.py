"""Shell completion and the man page, generated from build_parser(): nothing can drift."""

from __future__ import annotations

import argparse
import os
import re
import subprocess

import pytest

from hugepaged.cli import COMMANDS, build_parser
from hugepaged.cli.completion import script, subparsers
from hugepaged.cli.manpage import page
from hugepaged.tunables import SPECS
from kit.daemon_runner import hugepaged_cli

from .marks import require_tool


def commands() -> dict[str, argparse.ArgumentParser]:
    return dict(subparsers(build_parser()))


def options(p: argparse.ArgumentParser) -> list[str]:
    """Every option but the built-in -h/--help."""
    return [o for a in p._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction) for o in a.option_strings]


def test_every_module_is_a_command():
    assert len(commands()) == len(COMMANDS)
    assert {"top", "completion", "manpage"} <= commands().keys()


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_script_names_every_command_and_option(shell):
    text = script(shell, build_parser())
    for name, sub in commands().items():
        assert name in text, name
        for opt in options(sub):
            # tcsh's complete lists them without dashes: c/--/(config dry-run ...)/
            assert (opt.lstrip("-") if shell == "tcsh" else opt) in text, f"{shell}: {opt}"
    assert "version" in text


def test_cli_prints_the_script():
    r = hugepaged_cli("completion", "bash")
    assert r.returncode == 0 and r.stdout == script("bash", build_parser())
    assert hugepaged_cli("completion", "fish").returncode == 2


def complete_bash(tmp_path, words: list[str]) -> list[str]:
    """What bash offers after typing `words` (the last one may be partial)."""
    bash = require_tool("bash", "apt-get install bash")
    (tmp_path / "hugepaged.bash").write_text(script("bash", build_parser()))
    line = " ".join(words)
    program = f"""
source {tmp_path / 'hugepaged.bash'}
COMP_WORDS=({' '.join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={line!r}
COMP_POINT={len(line)}
_shtab_hugepaged hugepaged "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run([bash, "--norc", "--noprofile", "-c", program], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [w.strip() for w in r.stdout.splitlines() if w.strip()]


def test_bash_completes_for_real(tmp_path):
    assert set(complete_bash(tmp_path, ["hugepaged", ""])) >= set(commands())
    assert complete_bash(tmp_path, ["hugepaged", "res"]) == ["restore-kernel"]
    assert set(complete_bash(tmp_path, ["hugepaged", "run", "--metr"])) == {
        "--metrics", "--metrics-top-processes"}
    assert set(complete_bash(tmp_path, ["hugepaged", "run", "--log-format", ""])) == {
        "text", "json"}
    assert set(complete_bash(tmp_path, ["hugepaged", "completion", ""])) == {
        "bash", "zsh", "tcsh"}
    pids = complete_bash(tmp_path, ["hugepaged", "scan", "--pid", ""])
    assert "1" in pids and all(p.isdigit() for p in pids)
    (tmp_path / "conf.toml").write_text("")
    got = complete_bash(tmp_path, ["hugepaged", "run", "--config", str(tmp_path / "co")])
    assert str(tmp_path / "conf.toml") in got


def test_zsh_script_loads(tmp_path):
    zsh = require_tool("zsh", "apt-get install zsh")
    (tmp_path / "_hugepaged").write_text(script("zsh", build_parser()))
    r = subprocess.run([zsh, "-n", str(tmp_path / "_hugepaged")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # installed as zsh expects: a file named _hugepaged in $fpath, found by compinit
    program = (f"fpath=({tmp_path} $fpath); autoload -U compinit && "
               f"compinit -u -d {tmp_path}/zcompdump; print -r -- $_comps[hugepaged]")
    r = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "_hugepaged"


def unescaped_page() -> str:
    return page(build_parser()).replace("\\-", "-")


def test_man_page_names_every_command_option_and_tunable():
    text = unescaped_page()
    assert text.startswith(".TH HUGEPAGED \"8\"")
    for name, sub in commands().items():
        assert f"hugepaged {name}" in text, name
        for opt in options(sub):
            assert opt in text, f"{name} {opt}"
    for key in SPECS:
        assert key in text, key
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "TUNABLES", "FILES", "SIGNALS",
                    "ENVIRONMENT", "EXIT STATUS", "SEE ALSO"):
        assert f".SH {section}" in text, section


def test_man_page_renders_without_warnings(tmp_path):
    groff = require_tool("groff", "apt-get install groff-base")
    (tmp_path / "hugepaged.1").write_text(page(build_parser()))
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(tmp_path / "hugepaged.1")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    man = require_tool("man", "apt-get install man-db")
    r = subprocess.run([man, "-l", str(tmp_path / "hugepaged.1")], capture_output=True,
                       text=True, timeout=30, env={**os.environ, "MANPAGER": "cat",
                                                   "MANWIDTH": "100"})
    assert r.returncode == 0, r.stderr
    words = " ".join(r.stdout.split())
    assert "hugepaged - collapse anonymous memory" in words
    assert "hugepaged top" in words and "--metrics-top-processes" in words


def test_cli_prints_the_man_page():
    r = hugepaged_cli("manpage")
    assert r.returncode == 0 and r.stdout == page(build_parser())


# --------------------------------------------------------------------------------------------
# hugepaged.toml(5)


def config_sections() -> dict[str, str]:
    """Section name -> its roff text, of the configuration page."""
    from hugepaged.cli.config_page import page as config_page

    text = config_page().replace("\\-", "-")
    parts = re.split(r"^\.SH (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def terms(roff: str) -> list[str]:
    return re.findall(r"^\.TP\n\\fB(.+?)\\fR$", roff, re.M)


def test_config_page_documents_every_key_the_configuration_accepts():
    """Keys from what the parser accepts, not from the page's own lists: a tunable is any
    SPECS key; an option any DaemonOptions field; a target key whatever the parser names
    when it refuses an unknown one."""
    from dataclasses import fields

    from hugepaged.config import ConfigError, DaemonOptions, parse_config
    from hugepaged.kernel.geometry import running_geometry

    s = config_sections()
    assert terms(s["TUNABLES"]) == list(SPECS)
    assert terms(s["DAEMON OPTIONS"]) == [f.name for f in fields(DaemonOptions)]
    with pytest.raises(ConfigError) as refused:
        parse_config('[[target]]\nname = "x"\ncomm = "y"\nbogus = 1\n', "t.toml")
    known = re.search(r"\(known: (.+)\)", str(refused.value)).group(1).split(", ")
    assert sorted(terms(s["TARGETS"])) == sorted(known)
    for key, spec in SPECS.items():  # each with its range or choices
        body = s["TUNABLES"].split(f"\\fB{key}\\fR\n", 1)[1].split(".TP", 1)[0]
        lo, hi = spec.bounds(running_geometry()) if spec.type is int else (None, None)
        assert (spec.choices[0] if spec.choices else f"{lo}..{hi}" if lo is not None
                else "CPU") in body, key
    assert '"text", "json"' in s["DAEMON OPTIONS"]  # log_format's choices
    example = re.search(r"^\.nf\n(.*?)^\.fi$", s["EXAMPLE"], re.M | re.S).group(1)
    cfg = parse_config(example, "example.toml")  # the page's example is a valid file
    assert [t.name for t in cfg.targets] == ["redis"]


def test_config_page_renders_without_warnings(tmp_path):
    groff = require_tool("groff", "apt-get install groff-base")
    r = hugepaged_cli("manpage", "hugepaged.toml")
    assert r.returncode == 0 and r.stdout.startswith('.TH HUGEPAGED.TOML "5"'), r.stderr
    (tmp_path / "hugepaged.toml.5").write_text(r.stdout)
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(tmp_path / "hugepaged.toml.5")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_an_undocumented_key_stops_the_page(monkeypatch):
    from hugepaged.cli import config_page

    monkeypatch.delitem(config_page.TARGET_DOCS, "priority")
    with pytest.raises(KeyError, match="target key .priority. has no description"):
        config_page.page()
