"""`hugepaged unit`: the shipped systemd unit, its Exec lines naming this installation.

The shipped unit says /usr/local/bin/hugepaged, which is right only for a system-wide pip
install; a virtualenv or pipx puts the command elsewhere. `hugepaged install` writes it to
/etc/systemd/system; `hugepaged unit > /etc/systemd/system/hugepaged.service` does the same
by hand.

The unit's sandbox hides parts of the file system from the service: ProtectHome=yes hides
/home, /root and /run/user; PrivateTmp=yes gives it an empty /tmp and /var/tmp;
PrivateDevices=yes a /dev of its own. An installation that lives there (a pyenv or uv
interpreter under /root, a venv under /tmp, an editable install from a home directory) would
not start: exec fails with status 203 or Python cannot find its modules. So every place the
service reads code from is resolved (symlinks followed: a venv's python is a link to the
interpreter it was made from) and the unit is relaxed only as far as needed: ProtectHome=
read-only, PrivateTmp=no. Under /dev, /proc or /sys nothing can be relaxed: refused.
"""

import argparse
import os
import shutil
import sys
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

from hugepaged.errors import UsageError

SHIPPED_EXE = "/usr/local/bin/hugepaged"
HOMES = ("/home", "/root", "/run/user")  # hidden by ProtectHome=yes
TMPS = ("/tmp", "/var/tmp")  # replaced by PrivateTmp=yes
REFUSED = ("/dev", "/proc", "/sys")  # PrivateDevices=yes; no installation belongs there
MODULES = ("hugepaged", "numpy", "rich", "prometheus_client")  # what the daemon imports


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("unit", help="print the systemd unit with this installation's path",
                       description="Print hugepaged.service with ExecStart and ExecStopPost "
                                   "naming this installation's hugepaged command, and its "
                                   "sandbox relaxed where this installation lives (a home "
                                   "directory: ProtectHome=read-only; /tmp: PrivateTmp=no). "
                                   "hugepaged install puts it in /etc/systemd/system.")
    p.set_defaults(run=run)


def executable() -> str:
    """This installation's command, as an Exec line's first word: the console script that
    runs now, else the one beside the interpreter (`python -m hugepaged`), else the
    interpreter itself with `-m hugepaged`."""
    path = command_path()
    if path is not None:
        return _quoted(path)
    return f"{_quoted(sys.executable)} -m hugepaged"  # a venv's python is a link: kept


def command_path() -> str | None:
    """The console script's resolved path, or None when there is none (`python -m`)."""
    candidates = [sys.argv[0], shutil.which(sys.argv[0]) or "",
                  os.path.join(os.path.dirname(sys.executable), "hugepaged")]
    for path in candidates:
        p = Path(path)
        if p.name == "hugepaged" and p.is_file() and os.access(p, os.X_OK):
            return str(p.resolve())
    return None


def _quoted(path: str) -> str:
    """systemd splits an Exec line at white space unless the word is double-quoted."""
    return f'"{path}"' if any(c.isspace() for c in path) else path


def code_paths() -> list[str]:
    """Every place the service reads code from, symlinks resolved: the command, the
    interpreter binary, its prefixes (the venv, the installation the venv was made from),
    and the packages the daemon imports (an editable install lives in its source tree)."""
    paths = [command_path(), sys.executable, sys.prefix, sys.base_prefix]
    for name in MODULES:
        spec = find_spec(name)
        if spec is not None and spec.origin:
            paths.append(os.path.dirname(spec.origin))
    out: list[str] = []
    for p in paths:
        if p:
            real = os.path.realpath(p)
            if real not in out:
                out.append(real)
    return out


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


def sandbox_changes(paths: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{setting: (value, the paths that need it)}; UsageError where nothing can help."""
    for p in paths:
        if _under(p, REFUSED):
            raise UsageError(f"{p}: hugepaged's code lives under "
                             f"{next(r for r in REFUSED if _under(p, (r,)))}, which the "
                             "service's sandbox replaces: install it elsewhere "
                             "(python3 -m venv /opt/hugepaged)")
    out: dict[str, tuple[str, list[str]]] = {}
    home = [p for p in paths if _under(p, HOMES)]
    if home:
        out["ProtectHome"] = ("read-only", home)
    tmp = [p for p in paths if _under(p, TMPS)]
    if tmp:
        out["PrivateTmp"] = ("no", tmp)
    return out


def unit_text(paths: list[str] | None = None) -> str:
    text = resources.files("hugepaged").joinpath("data/hugepaged.service").read_text()
    text = text.replace(SHIPPED_EXE, executable())
    why = {"ProtectHome": "hide", "PrivateTmp": "replace"}
    for key, (value, where) in sandbox_changes(code_paths() if paths is None
                                               else paths).items():
        shown = ", ".join(where[:3]) + (" ..." if len(where) > 3 else "")
        old = f"{key}=yes\n"
        assert old in text, key
        text = text.replace(old, f"# This installation's code is in {shown}, which {key}=yes "
                                 f"would {why[key]}.\n{key}={value}\n")
    return text


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(unit_text())
    return 0
