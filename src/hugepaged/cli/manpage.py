"""`hugepaged manpage`: hugepaged(8) and hugepaged.toml(5) in roff, generated from the code.

hugepaged(8) comes from the argparse definitions (argparse-manpage), hugepaged.toml(5)
(cli/config_page.py) from the tables the configuration is checked against: every tunable of
tunables.SPECS, every daemon option of options.OPTIONS, every key of a [[target]] table.
Section 8: the daemon and its commands are for the administrator (as khugepaged's knobs are).
"""

import argparse
import re
import sys

from hugepaged import errors
from hugepaged.cli.roff import tp as _tp
from hugepaged.paths import CONFIG as DEFAULT_PATH
from hugepaged.paths import SOCKET as DEFAULT_SOCKET
from hugepaged.paths import STATE_FILE
from hugepaged.tunables import SPECS

SUMMARY = "collapse anonymous memory into transparent huge pages (khugepaged in userspace)"


PAGES = {"hugepaged": ("hugepaged.8", 8), "hugepaged.toml": ("hugepaged.toml.5", 5)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manpage", help="print a manual page (roff): hugepaged(8) or "
                                       "hugepaged.toml(5)",
                       description="Print a manual page, generated from hugepaged's own "
                                   "command definitions (hugepaged, section 8) or "
                                   "configuration tables (hugepaged.toml, section 5). View it "
                                   "with hugepaged manpage | man -l -; hugepaged install "
                                   "puts both where man finds them.")
    p.add_argument("page", nargs="?", choices=tuple(PAGES), default="hugepaged",
                   help="which page (default %(default)s)")
    p.set_defaults(run=run)




def _words(name: str) -> str:
    """ConfigError -> 'config error'."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def _error_classes(base: type = errors.HugepagedError) -> list[type]:
    import hugepaged.config  # noqa: F401  (defines ConfigError; not loaded by the parser)

    out = [base]
    for sub in base.__subclasses__():
        out.extend(_error_classes(sub))
    return out


def _exit_statuses() -> str:
    """One entry per exit status, from the error classes themselves."""
    by_status: dict[int, list[str]] = {}
    for c in _error_classes():
        doc = "any other error" if c is errors.HugepagedError \
            else (c.__doc__ or _words(c.__name__)).strip().splitlines()[0].rstrip(".")
        docs = by_status.setdefault(c.exit_status, [])
        if doc not in docs:
            docs.append(doc)
    out = _tp("0", "success")
    for status, docs in sorted(by_status.items()):
        out += _tp(str(status), "; ".join(docs))
    return out + _tp("130", "interrupted (SIGINT)")


def sections() -> list[tuple[str, str]]:
    tunables = "".join(_tp(s.name, f"{s.doc} ({s.describe()})"
                           + ("" if s.kernel else "; hugepaged only"))
                       for s in SPECS.values())
    return [
        ("tunables", ".PP\nSet in the configuration file, with \\fB\\-\\-set KEY=VALUE\\fR, or "
                     "live with \\fBhugepaged set\\fR. Names and refusals are the kernel's "
                     "(/sys/kernel/mm/transparent_hugepage/khugepaged).\n" + tunables),
        ("files", _tp(DEFAULT_PATH, "configuration (TOML): tunables, daemon options and "
                                    "targets; see hugepaged.toml(5)")
         + _tp(DEFAULT_SOCKET, "control socket of the daemon (status, get, set, top)")
         + _tp(STATE_FILE, "kernel khugepaged values saved while kernel_khugepaged=quiet; "
                           "restored by the next start or by hugepaged restore-kernel")),
        ("signals", _tp("SIGTERM, SIGINT", "stop; what was changed in the kernel is put back")
         + _tp("SIGHUP", "reload the configuration file; a file that does not parse is "
                         "refused and the running settings are kept")),
        ("environment", _tp("NOTIFY_SOCKET", "set by systemd (Type=notify): READY=1, STATUS=, "
                                             "STOPPING=1 are sent there")
         + _tp("WATCHDOG_USEC", "set by systemd (WatchdogSec=): WATCHDOG=1 is sent at half "
                                "of it")),
        ("exit status", _exit_statuses()),
        ("see also", "\\fBhugepaged.toml\\fR(5), \\fBprocess_madvise\\fR(2), "
                     "\\fBmadvise\\fR(2), "
                     "\\fBsystemd.service\\fR(5), \\fBproc\\fR(5)"),
    ]


def page(parser: argparse.ArgumentParser) -> str:
    """The man page of `parser` (the whole command's, handed down by main())."""
    from argparse_manpage.manpage import Manpage

    from hugepaged import __version__

    man = Manpage(parser)
    man.description = SUMMARY
    man.source = f"hugepaged {__version__}"
    man.manual = "hugepaged manual"
    man.section = 8
    for heading, content in sections():
        man.add_section(heading, "=", content.rstrip("\n"))
    return str(man)


def run(args: argparse.Namespace) -> int:
    from hugepaged.cli import config_page

    sys.stdout.write(page(args.parser) if args.page == "hugepaged" else config_page.page())
    return 0
