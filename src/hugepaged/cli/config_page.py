"""hugepaged.toml(5): the configuration file's manual page, generated from the code's tables.

Keys, types, ranges, choices, defaults and the tunables' and options' prose come from where
the configuration is checked: tunables.SPECS, options.OPTIONS, targets.TARGET_FIELDS (every
key of a [[target]] table). Only the prose for the target keys that are not tunables lives
here (TARGET_DOCS); a key without it raises, so a new one cannot ship undocumented.
Not a command of its own: `hugepaged manpage hugepaged.toml`.
"""

import json

from hugepaged import paths
from hugepaged.cli.roff import esc as _esc
from hugepaged.cli.roff import tp as _tp
from hugepaged.kernel.geometry import running_geometry
from hugepaged.tunables import SPECS, UINT_MAX

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
    "priority": "higher is visited first in a pass",
    "max_bloat_mb": "MiB of RSS the target's live processes may gain from collapses that "
                    "fill empty or zero-page PTEs; a collapse past it is refused",
    "min_coverage": "percent (0..100) of the target's processes' anonymous memory promised "
                    "in huge pages: while it is short, they are visited before every other "
                    "process; short for longer than coverage_deadline, the promise is broken "
                    "(a warning naming the last obstacle, a counter, a metric)",
    "coverage_deadline": "seconds (1..86400) the target may be short of min_coverage before "
                         "its promise counts as broken",
}


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def target_keys() -> tuple[str, ...]:
    from hugepaged.targets import KEYS

    return KEYS


def _target_default(key: str) -> object:
    """The default of a [[target]] key, from the table Target is made from (None: unset)."""
    from hugepaged.targets import TARGET_FIELDS

    row = next(f for f in TARGET_FIELDS if f[0] == key)
    return row[2] if len(row) > 2 else None


def _doc(table: dict[str, str], key: str, where: str) -> str:
    if key not in table:
        raise KeyError(f"hugepaged.toml(5): {where} '{key}' has no description "
                       "(cli/config_page.py)")
    return table[key]


def _tunables() -> str:
    geometry = running_geometry()
    out = ""
    for s in SPECS.values():
        default = ("the kernel's current value" if s.inherited
                   else json.dumps(s.default_for(geometry)))
        kind = f"A string, {s.describe(geometry)}" if s.type is str \
            else cap(s.describe(geometry))
        out += _tp(s.name, f"{s.doc}. {kind}; default {default}"
                   + ("" if s.kernel else "; hugepaged's own"))
    return out


def _options() -> str:
    from hugepaged.options import OPTIONS

    out = ""
    for o in OPTIONS.values():
        if o.choices:
            what = "one of " + ", ".join(json.dumps(c) for c in o.choices)
        elif o.range is not None:
            what = f"an integer {o.range[0]}..{o.range[1]}"
        else:
            what = "an integer" if o.type is int else "a string"
        shown = "none" if o.default is None else json.dumps(o.default)
        flag = f"; on the command line {o.cli}" if o.flag else ""
        out += _tp(o.name, f"{o.doc}. {cap(what)}; default {shown}{flag}")
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
            spec = SPECS[key]
            doc = TARGET_DOCS.get(key) or f"the target's own {key}: {spec.doc}"
            doc += f". {cap(spec.describe())}"
        else:
            doc = _doc(TARGET_DOCS, key, "target key")
            if key == "priority":
                doc += f". An integer {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]}"
            elif key == "max_bloat_mb":
                doc += f". An integer 0..{UINT_MAX}; default: no limit"
        default = _target_default(key)
        if default is not None:
            doc += f"; default {json.dumps(default)}"
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
