"""hugepaged.toml(5): the configuration file's manual page, generated from the code's tables.

Keys, types, ranges, choices and defaults come from where the configuration is checked:
tunables.SPECS and Tunables (tunables), config.DaemonOptions (daemon options),
targets.MATCH_KEYS and POLICY_KEYS (a [[target]] table). Only the prose for the keys that
are not tunables lives here (OPTION_DOCS, TARGET_DOCS); a key without it raises, so a new
option cannot ship undocumented. Not a command of its own: `hugepaged manpage hugepaged.toml`.
"""

from dataclasses import MISSING, fields

from hugepaged import paths
from hugepaged.cli.manpage import _esc, _tp
from hugepaged.tunables import INHERITED, SPECS, UINT_MAX, Tunables

OPTION_DOCS = {
    "socket": "path of the control socket (status, get, set, top talk to the daemon there)",
    "socket_group": "a group whose members may use the control socket (mode 0660, the "
                    "peer's credentials checked); without it only root may",
    "metrics": "serve Prometheus metrics on HOST:PORT (a bare PORT or :PORT binds "
               "127.0.0.1); without it no port is opened",
    "metrics_top_processes": "per-process coverage metrics for the N largest registered "
                             "processes (0..100000; 0: none)",
    "log_format": "text: human lines; json: one object per line",
    "log_level": "the least severe level logged; info logs no line per window or process",
    "exclude_comm": "a regular expression: a process whose whole /proc/PID/comm matches is "
                    "not registered (checked at registration and at every exec)",
}
TARGET_DOCS = {
    "name": "the target's name: [a-z0-9_-], 1 to 32 characters, unique; the label in "
            "status, metrics and logs (required)",
    "comm": "match: a regular expression searched in /proc/PID/comm",
    "exe": "match: exactly /proc/PID/exe (an absolute path)",
    "cgroup": "match: a cgroup path prefix, by whole components, in any hierarchy of "
              "/proc/PID/cgroup (v2 and v1)",
    "pid": "match: a list of process ids",
    "enabled": "which private anonymous VMAs of the target's processes are candidates: "
               "always (MADV_HUGEPAGE or not; MADV_COLLAPSE ignores the kernel's mode, so "
               "this works on a madvise machine), madvise, never",
    "shmem_enabled": "the target's shared memory, by the kernel's shmem_enabled modes",
    "max_cpu_percent": "the target's share of the global max_cpu_percent cap, percent of "
                       "one core (0: no share of its own)",
    "priority": "higher is visited first in a pass (default 0)",
    "max_bloat_mb": "MiB of RSS the target's live processes may gain from collapses that "
                    "fill empty or zero-page PTEs; a collapse past it is refused",
}


def _option_keys() -> list[tuple[str, object, str]]:
    """(key, default, type name) of every daemon option, from DaemonOptions itself."""
    from hugepaged.config import DaemonOptions

    out = []
    for f in fields(DaemonOptions):
        default = f.default if f.default is not MISSING else None
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append((f.name, default, kind.replace(" | None", "")))
    return out


def _choices(key: str) -> tuple[str, ...]:
    import hugepaged.config as config

    return tuple(getattr(config, "_CHOICES", {}).get(key, ()))


def target_keys() -> tuple[str, ...]:
    from hugepaged.targets import MATCH_KEYS, POLICY_KEYS

    return ("name", *MATCH_KEYS, *POLICY_KEYS)


def _doc(table: dict[str, str], key: str, where: str) -> str:
    if key not in table:
        raise KeyError(f"hugepaged.toml(5): {where} '{key}' has no description "
                       "(cli/config_page.py)")
    return table[key]


def _tunables() -> str:
    defaults = Tunables()
    out = ""
    for s in SPECS.values():
        default = ("the kernel's current value" if s.name in INHERITED
                   else repr(getattr(defaults, s.name)).replace("'", '"'))
        kind = f"A string, {s.describe()}" if s.choices else s.describe().capitalize()
        out += _tp(s.name, f"{s.doc}. {kind}; default "
                           f"{default}" + ("" if s.kernel else "; hugepaged's own"))
    return out


def _options() -> str:
    out = ""
    for key, default, kind in _option_keys():
        choices = _choices(key)
        what = ("one of " + ", ".join(f'"{c}"' for c in choices)) if choices else \
            ("an integer" if kind == "int" else "a string")
        shown = "none" if default is None else (f'"{default}"' if isinstance(default, str)
                                                else str(default))
        out += _tp(key, f"{_doc(OPTION_DOCS, key, 'option')}. {what[0].upper()}{what[1:]}; "
                        f"default {shown}")
    return out


def _targets() -> str:
    from hugepaged.targets import MAX_TARGETS, PRIORITY_RANGE, TUNABLE_KEYS

    out = (".PP\nEach [[target]] table names processes (at least one match key; every key "
           "given must match) and gives them a policy of their own; what it leaves out is "
           "the global value. Targets are tried in the file's order and the first that "
           f"matches wins; at most {MAX_TARGETS}. The daemon matches a process when it "
           "registers, when it execs and on every reload.\n")
    for key in target_keys():
        if key in TUNABLE_KEYS:
            doc = TARGET_DOCS.get(key) or f"the target's own {key}: {SPECS[key].doc}"
            doc += f". {SPECS[key].describe()[0].upper()}{SPECS[key].describe()[1:]}"
        else:
            doc = _doc(TARGET_DOCS, key, "target key")
            if key == "priority":
                doc += f". An integer {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]}"
            elif key == "max_bloat_mb":
                doc += f". An integer 0..{UINT_MAX}; default: no limit"
        out += _tp(key, doc)
    return out


EXAMPLE = """\
# /etc/hugepaged/hugepaged.toml
max_cpu_percent = 5
kernel_khugepaged = "quiet"

[[target]]
name = "redis"
comm = "^redis-server$"
enabled = "always"
max_ptes_none = 64
"""


def page() -> str:
    from argparse_manpage.compat import get_reproducible_date

    from hugepaged import __version__

    example = "".join(_esc(line) + "\n" for line in EXAMPLE.splitlines())
    return (
        f'.TH HUGEPAGED.TOML "5" "{get_reproducible_date()}" "hugepaged {__version__}" '
        '"hugepaged manual"\n'
        ".SH NAME\nhugepaged.toml \\- configuration file of hugepaged(8)\n"
        f".SH SYNOPSIS\n{_esc(paths.CONFIG)}\n"
        ".SH DESCRIPTION\n"
        "TOML. The tunables by the kernel's names "
        "(/sys/kernel/mm/transparent_hugepage/khugepaged), the daemon's options, and "
        "[[target]] tables. The file may be absent; \\fB\\-\\-config FILE\\fR names another, "
        "which must exist. Precedence, lowest first: hugepaged's defaults, the kernel's "
        "current values (for the tunables the kernel has), this file, \\fB\\-\\-set\\fR, "
        "\\fBhugepaged set\\fR. Integers are TOML integers and words TOML strings; every "
        "value is refused as the kernel's sysfs refuses it. A refused file is one error "
        "line naming file and line: exit 2 at start; on SIGHUP the running configuration "
        "is kept.\n"
        ".SH TUNABLES\n" + _tunables()
        + ".SH DAEMON OPTIONS\n.PP\nRead at start and on SIGHUP; the command line's "
          "options of the same names win.\n" + _options()
        + ".SH TARGETS\n" + _targets()
        + ".SH EXAMPLE\n.PP\n.nf\n" + example + ".fi\n"
        + ".SH FILES\n" + _tp(paths.CONFIG, "the default configuration file")
        + ".SH SEE ALSO\n\\fBhugepaged\\fR(8), \\fBhugepaged suggest\\fR proposes targets "
          "for the processes that would gain most\n"
    )
