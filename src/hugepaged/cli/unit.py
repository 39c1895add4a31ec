"""`hugepaged unit`: the shipped systemd unit, its Exec lines naming this installation.

The shipped unit says /usr/local/bin/hugepaged, which is right only for a system-wide pip
install; a virtualenv or pipx puts the command elsewhere. Installed with
`hugepaged unit > /etc/systemd/system/hugepaged.service`.
"""

import argparse
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

SHIPPED_EXE = "/usr/local/bin/hugepaged"
# ProtectHome=yes hides these; an installation inside them needs them readable.
HOMES = ("/home/", "/root/", "/run/user/")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("unit", help="print the systemd unit with this installation's path",
                       description="Print hugepaged.service with ExecStart and ExecStopPost "
                                   "naming this installation's hugepaged command. Install it "
                                   "with: hugepaged unit > "
                                   "/etc/systemd/system/hugepaged.service")
    p.set_defaults(run=run)


def executable() -> str:
    """This installation's command, as an Exec line's first word: the console script that
    runs now, else the one beside the interpreter (`python -m hugepaged`), else the
    interpreter itself with `-m hugepaged`."""
    candidates = [sys.argv[0], shutil.which(sys.argv[0]) or "",
                  os.path.join(os.path.dirname(sys.executable), "hugepaged")]
    for path in candidates:
        p = Path(path)
        if p.name == "hugepaged" and p.is_file() and os.access(p, os.X_OK):
            return _quoted(str(p.resolve()))
    return f"{_quoted(sys.executable)} -m hugepaged"  # a venv's python is a link: kept


def _quoted(path: str) -> str:
    """systemd splits an Exec line at white space unless the word is double-quoted."""
    return f'"{path}"' if any(c.isspace() for c in path) else path


def unit_text() -> str:
    text = resources.files("hugepaged").joinpath("data/hugepaged.service").read_text()
    exe = executable()
    text = text.replace(SHIPPED_EXE, exe)
    if any(where.startswith(HOMES) for where in (exe.strip('"'), sys.prefix + "/")):
        text = text.replace("ProtectHome=yes", "# This installation lives in a home directory, "
                            "which ProtectHome=yes would hide.\nProtectHome=read-only")
    return text


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(unit_text())
    return 0
