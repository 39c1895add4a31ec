"""The daemon's first words: when its configuration can take nothing on this machine, why.

A daemon that registers every process and then collapses nothing, silently, is correct on a
`madvise` machine where no process asked for huge pages, and useless to an admin who expected
huge pages: nothing tells them that a target is the way to give a named process its own
policy. So, once at start, from survey's cheap look (status and smaps, no page walk), the
memory no policy can take is summed by reason, and when nothing at all can be taken each
reason of at least one huge page's size gets one info line, largest first: the mode
(`enabled=madvise`, `enabled=never`), processes that turned THP off for themselves
(PR_SET_THP_DISABLE) or asked for small pages (MADV_NOHUGEPAGE), exclude_comm, and targets
that match no running process. When something can be taken, nothing is said: the counters
and the minute summary tell the rest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from hugepaged.kernel import Kernel
from hugepaged.policy import CollapseControl
from hugepaged.scan.survey import Look, survey
from hugepaged.targets import ProcessFacts, Target, control_under, first_match
from hugepaged.tunables import Tunables

log = logging.getLogger("hugepaged")
SEE_TARGETS = "see targets (hugepaged suggest proposes them)"


def size_text(kb: int) -> str:
    for unit, div in (("GiB", 1 << 20), ("MiB", 1 << 10)):
        if kb >= div:
            return f"{kb / div:.1f} {unit}"
    return f"{kb} KiB"


def _who(looks: list[tuple[str, int]]) -> str:
    """'4 processes (java, redis-server, postgres, +1 more)', the largest named first."""
    names = []
    for comm, _ in sorted(looks, key=lambda x: -x[1]):
        if comm not in names:
            names.append(comm)
    shown = ", ".join(names[:3]) + (f", +{len(names) - 3} more" if len(names) > 3 else "")
    n = len(looks)
    return f"{n} process{'es' if n != 1 else ''} ({shown})"


def _reason_line(reason: str, kb: int, who: str) -> str:
    size = size_text(kb)
    if reason == "NO_MADV_HUGEPAGE":
        return (f"enabled=madvise: only MADV_HUGEPAGE memory is taken; {size} of anonymous "
                f"memory in {who} is not advised: {SEE_TARGETS}")
    if reason == "ENABLED_NEVER":
        return (f"enabled=never: no anonymous memory is taken; {size} in {who} would be "
                f"with enabled=always or madvise: {SEE_TARGETS}")
    if reason == "THP_DISABLED_PRCTL":
        return (f"PR_SET_THP_DISABLE: {size} of anonymous memory in {who} is refused even "
                "to MADV_COLLAPSE (the process turned THP off for itself)")
    if reason == "VM_NOHUGEPAGE":
        return (f"MADV_NOHUGEPAGE: {size} of anonymous memory in {who} asked for small "
                "pages")
    return f"{reason}: {size} of anonymous memory in {who} is in no candidate window"


def reasons(looks: list[Look], excluded: list[Look], targets: Iterable[Target],
            pmd_kb: int, exclude_pattern: str | None = None) -> list[str]:
    """The lines to say, largest reason first; none when something can be taken."""
    if sum(x.takeable_kb for x in looks) >= pmd_kb:
        return []
    by_reason: dict[str, list[tuple[str, int]]] = {}
    for x in looks:
        for reason, kb in x.not_taken_kb.items():
            by_reason.setdefault(reason, []).append((x.comm, kb))
    sized = sorted(((sum(kb for _, kb in v), r, v) for r, v in by_reason.items()),
                   key=lambda t: -t[0])
    lines = [_reason_line(r, kb, _who(v)) for kb, r, v in sized if kb >= pmd_kb]
    huge = sum(x.candidate_huge_kb for x in looks)
    if huge >= pmd_kb:
        lines.append(f"{size_text(huge)} of the memory this configuration takes is huge "
                     "already; nothing else is")
    out_kb = sum(x.small_kb for x in excluded)
    if out_kb >= pmd_kb:
        lines.append(f"exclude_comm {exclude_pattern!r}: {size_text(out_kb)} of anonymous "
                     f"memory in {_who([(x.comm, x.small_kb) for x in excluded])} is excluded")
    matched = {x.target for x in looks} | {x.target for x in excluded}
    for t in targets:
        if t.name not in matched:
            lines.append(f"target {t.name} ({t.describe()}): matches no process with "
                         f"{size_text(pmd_kb)} of anonymous memory")
    if not lines:
        lines.append(f"no process has {size_text(pmd_kb)} of anonymous memory that is not "
                     "huge: nothing to take yet")
    return lines


def explain(kernel: Kernel, tunables: Tunables, targets: list[Target],
            exclude_comm: re.Pattern | None = None,
            only_pids: Iterable[int] | None = None) -> list[str]:
    """Why this configuration can take nothing here (empty if it can take something): each
    process judged under the policy the daemon would give it (its first matching target's,
    else the global one)."""
    glob = CollapseControl.from_tunables(tunables)

    def control_for(pid: int, comm: str) -> CollapseControl:
        if not targets:
            return glob
        return control_under(glob, first_match(targets, ProcessFacts(kernel.procfs, pid, comm)))

    pids = sorted(only_pids) if only_pids is not None else None
    looks = survey(kernel, control_for, pids)
    kept = [x for x in looks if exclude_comm is None or not exclude_comm.fullmatch(x.comm)]
    excluded = [x for x in looks if x not in kept]
    return reasons(kept, excluded, targets, kernel.geometry.pmd_size >> 10,
                   exclude_comm.pattern if exclude_comm is not None else None)


def log_first_run(kernel: Kernel, tunables: Tunables, targets: list[Target],
                  exclude_comm: re.Pattern | None = None,
                  only_pids: Iterable[int] | None = None) -> list[str]:
    """explain(), one info line per reason (event "first_run"); never fatal: a machine we
    cannot survey is one we say nothing about."""
    try:
        lines = explain(kernel, tunables, targets, exclude_comm, only_pids)
    except (OSError, ValueError) as err:
        log.debug("first-run survey failed: %s", err, extra={"event": "first_run_error"})
        return []
    for line in lines:
        log.info("%s", line, extra={"event": "first_run"})
    return lines
