"""`hugepaged suggest`: [[target]] sections to paste, for the processes that would gain most.

On a `madvise` machine most applications never call MADV_HUGEPAGE, so neither the kernel nor
hugepaged's global policy gives them a huge page; a target with `enabled = "always"` does.
Which processes deserve one: those with the most anonymous memory that such a target would
take and the current configuration does not (its own targets included), by survey's cheap
look at every process (status, then smaps of the larger ones). The few proposed are then
scanned as the daemon would decide them under the proposed target (scan_processes, the
page-level checks), so each section says how many windows would collapse now. Processes are
grouped by what the section matches: the comm, or the exe where the comm is cut at 15
characters. Kernel threads, hugepaged itself and processes a configured target already
covers are left out; a process that turned THP off for itself (PR_SET_THP_DISABLE), which
no target can change, is named in a comment instead.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field

from hugepaged.cli.common import add_common, kernel_of, tunables_of
from hugepaged.paths import CONFIG as DEFAULT_PATH
from hugepaged.preflight import require_scan_support

COMM_LEN = 15  # TASK_COMM_LEN - 1: a longer program name is cut in /proc/PID/comm
REGEX_SPECIAL = set(".^$*+?{}[]\\|()")
PROPOSED = "suggested"  # the proposed target's name while it is judged


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suggest", help="propose [[target]] sections for the processes that "
                                       "would gain most",
                       description="Print [[target]] sections (TOML, to paste into the "
                                   "configuration file) giving enabled = \"always\" to the "
                                   "processes with the most anonymous memory a target would "
                                   "take and the configuration does not. Collapses nothing.")
    p.add_argument("--config", metavar="FILE",
                   help="the configuration whose targets and tunables apply (default "
                        "/etc/hugepaged/hugepaged.toml, may be absent)")
    p.add_argument("--limit", type=int, default=5, metavar="N",
                   help="at most N sections (default %(default)s)")
    p.add_argument("--min-mb", type=int, default=64, metavar="MIB",
                   help="only for at least MIB of memory to gain (default %(default)s)")
    add_common(p)
    p.set_defaults(run=run)


@dataclass
class Group:
    """The processes one [[target]] section would match."""

    key: str  # "comm" or "exe"
    value: str
    comm: str
    pids: list[int] = field(default_factory=list)
    gain_kb: int = 0
    anon_kb: int = 0
    huge_kb: int = 0


def regex_literal(text: str) -> str:
    """`text` as a regular expression matching exactly it (only what must be escaped is)."""
    return "".join("\\" + c if c in REGEX_SPECIAL else c for c in text)


def toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (non-ASCII kept as it is)."""
    return json.dumps(text, ensure_ascii=False)


def target_name(comm: str, taken: set[str]) -> str:
    """A valid, unused target name ([a-z0-9_-]{1,32}) from a program name."""
    base = re.sub(r"[^a-z0-9_-]+", "-", comm.lower()).strip("-")[:28] or "target"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def size_text(kb: int) -> str:
    from hugepaged.daemon.firstrun import size_text as text

    return text(kb)


def survey_groups(kernel, cfg, tunables) -> tuple[list[Group], list[tuple[int, str, int]]]:
    """(groups by what they gain, largest first; (pid, comm, kB) of THP-disabled ones)."""
    from hugepaged.policy import CollapseControl
    from hugepaged.scan.survey import candidates, judge, read_vmas, shmem_modes
    from hugepaged.targets import ProcessFacts, Target, control_under, first_match

    glob = CollapseControl.from_tunables(tunables)
    proposed = control_under(glob, Target(name=PROPOSED, enabled="always"))
    modes = shmem_modes(kernel)
    groups: dict[tuple[str, str], Group] = {}
    disabled = []
    for pid, comm, _ in candidates(kernel):
        if comm == "hugepaged":
            continue
        facts = ProcessFacts(kernel.procfs, pid, comm)
        if first_match(cfg.targets, facts) is not None:
            continue  # a configured target covers it already
        read = read_vmas(kernel, pid)
        if read is None:
            continue
        vmas, thp_disabled = read
        now = judge(pid, comm, vmas, thp_disabled, glob, modes, kernel.geometry)
        then = judge(pid, comm, vmas, thp_disabled, proposed, modes, kernel.geometry)
        if thp_disabled:
            disabled.append((pid, comm, now.small_kb))
            continue
        gain = then.takeable_kb - now.takeable_kb
        if gain <= 0:
            continue
        key = ("exe", facts.exe) if len(comm) >= COMM_LEN and facts.exe else ("comm", comm)
        g = groups.setdefault(key, Group(key[0], key[1], comm))
        g.pids.append(pid)
        g.gain_kb += gain
        g.anon_kb += then.anon_kb
        g.huge_kb += then.huge_kb
    return sorted(groups.values(), key=lambda g: -g.gain_kb), disabled


def windows_now(kernel, pids: list[int], control) -> tuple[int, int]:
    """(windows that would collapse now, windows in all) under `control`, by the scan."""
    from hugepaged.results import collapsible
    from hugepaged.scan.process import scan_processes

    scans, _ = scan_processes(kernel, pids, lambda pid: control, explicit=False)
    return (sum(collapsible(s.results()) for s in scans),
            sum(s.eligible_windows for s in scans))


def section(g: Group, name: str, windows: int, pmd_kb: int) -> str:
    n = len(g.pids)
    pids = ", ".join(map(str, g.pids[:5])) + (" ..." if n > 5 else "")
    match = f"comm = {toml_string('^' + regex_literal(g.value) + '$')}" if g.key == "comm" \
        else f"exe = {toml_string(g.value)}"
    return (f"# {g.comm}: {n} process{'es' if n != 1 else ''} (pid {pids}), "
            f"{size_text(g.anon_kb)} anonymous, {size_text(g.huge_kb)} huge; under this "
            f"target {windows} windows ({size_text(windows * pmd_kb)}) would collapse now\n"
            f"[[target]]\nname = {toml_string(name)}\n{match}\nenabled = \"always\"\n")


def run(args: argparse.Namespace) -> int:
    from hugepaged.config import load_config
    from hugepaged.errors import UsageError
    from hugepaged.policy import CollapseControl
    from hugepaged.targets import Target, control_under

    if args.limit < 1 or args.min_mb < 0:
        raise UsageError("--limit must be at least 1 and --min-mb at least 0")
    kernel = kernel_of(args)
    cfg = load_config(args.config)
    tunables = tunables_of(args, kernel, cfg.tunables)
    require_scan_support(kernel)
    groups, disabled = survey_groups(kernel, cfg, tunables)
    groups = [g for g in groups if g.gain_kb >= args.min_mb * 1024][:args.limit]
    pmd_kb = kernel.geometry.pmd_size >> 10
    taken = {t.name for t in cfg.targets}
    where = args.config or DEFAULT_PATH
    print(f"# hugepaged suggest: [[target]] sections for the processes with the most "
          f"anonymous memory\n# a target would take (enabled = \"always\") and this "
          f"configuration does not (enabled={tunables.enabled}, "
          f"{len(cfg.targets)} target(s)).\n# Paste into {where} and reload: "
          "systemctl reload hugepaged")
    if not groups:
        print(f"# nothing to suggest: no process has {args.min_mb} MiB to gain")
    for g in groups:
        name = target_name(g.comm, taken)
        control = control_under(CollapseControl.from_tunables(tunables),
                                Target(name=name, enabled="always"))
        windows, _ = windows_now(kernel, g.pids, control)
        print()
        print(section(g, name, windows, pmd_kb), end="")
    for pid, comm, kb in disabled:
        if kb >= args.min_mb * 1024:
            print(f"\n# not proposed: pid {pid} ({comm}), {size_text(kb)}: it set "
                  "PR_SET_THP_DISABLE, which even MADV_COLLAPSE obeys")
    return 0
