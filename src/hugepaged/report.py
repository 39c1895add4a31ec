"""Human tables and JSON for scan and collapse results. JSON shapes are versioned."""

import json
import sys
from collections import Counter
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from hugepaged.collapse import CollapseOutcome
from hugepaged.names import printable
from hugepaged.results import ScanResult, collapsible
from hugepaged.scan.process import ProcessScan
from hugepaged.scan.usage import ThpUsage

JSON_VERSION = 1
REFERENCED_UNKNOWN = ("referenced: unknown (no per-page access source on this machine: "
                      "LACK_REFERENCED_PAGE is not applied)")
REFERENCED_KNOWN = ("referenced: from idle page tracking (frames the daemon marked idle and "
                    "nothing touched since are not referenced)")


# Piped, a table is as wide as its widest row needs: rich fits tables to the console's width
# by cutting cells ("12…"), so the width is made larger than any row.
PIPED_WIDTH = 1 << 16


def console(markup: bool = True) -> Console:
    """The terminal's width on a terminal; piped, no width at all: lines never broken and
    no cell cut, so scripts (grep, awk, head) see every value whole."""
    tty = sys.stdout.isatty()
    return Console(width=None if tty else PIPED_WIDTH, highlight=False, soft_wrap=not tty,
                   markup=markup)


def human_kb(kb: int) -> str:
    for unit, div in (("G", 1 << 20), ("M", 1 << 10)):
        if kb >= div:
            return f"{kb / div:.1f}{unit}"
    return f"{kb}K"


def results_text(counts: Counter) -> str:
    return " ".join(f"{r.name}:{n}" for r, n in sorted(counts.items(), key=lambda i: -i[1]))


# Why memory is in no candidate window, and what would change that (hugepaged's own names).
HINTS = {
    "NO_MADV_HUGEPAGE": "enabled=madvise: a target with enabled=always would take it",
    "ENABLED_NEVER": "enabled=never",
    "THP_DISABLED_PRCTL": "the process set PR_SET_THP_DISABLE: even MADV_COLLAPSE is refused",
    "THP_EXCEPT_ADVISED_PRCTL": "the process set PR_SET_THP_DISABLE with "
                                "PR_THP_DISABLE_EXCEPT_ADVISED: THP only where it gave "
                                "MADV_HUGEPAGE, whatever a target says",
    "VM_NOHUGEPAGE": "MADV_NOHUGEPAGE: the application asked for small pages",
    "SHMEM_NEVER": "shmem_enabled=never: --set shmem_enabled=always would take it",
    "SHMEM_NO_MADV_HUGEPAGE": "shmem_enabled=advise and no MADV_HUGEPAGE",
    "SHMEM_DENIED": "the kernel's shmem_enabled=deny or hugepages-2048kB/shmem_enabled "
                    "refuses even MADV_COLLAPSE",
    "MISALIGNED": "address and file offset differ mod 2 MiB: mapped while shmem huge pages "
                  "were off; start it again at shmem_enabled=advise",
}


def ineligible_text(ineligible: dict[str, int]) -> str:
    """`not eligible: 1.2G NO_MADV_HUGEPAGE (hint), 8.0M THP_DISABLED_PRCTL (hint)`, largest
    first; empty when everything is in candidate windows."""
    if not ineligible:
        return ""
    parts = []
    for reason, kb in sorted(ineligible.items(), key=lambda i: -i[1]):
        hint = HINTS.get(str(reason))
        parts.append(f"{human_kb(kb)} {reason}" + (f" ({hint})" if hint else ""))
    return "not eligible: " + ", ".join(parts)


def _ineligible_json(s: ProcessScan) -> dict[str, int]:
    return {str(r): kb for r, kb in sorted(s.ineligible().items(), key=lambda i: -i[1])}


def scan_json(scans: list[ProcessScan], tunables: dict, skipped: list[str],
              target: str | None = None) -> dict[str, Any]:
    procs = [scan_record(s) for s in scans]
    total = Counter()
    why: Counter = Counter()
    thp = ThpUsage()
    for s in scans:
        total.update(s.results())
        why.update(_ineligible_json(s))
        if s.thp is not None:
            thp.add(s.thp)
    return {
        "version": JSON_VERSION, "tunables": tunables, "target": target,
        "referenced_known": bool(scans) and all(s.referenced_known for s in scans),
        "processes": procs,
        "total": {
            "processes": len(procs),
            "anon_kb": sum(p["anon_kb"] for p in procs),
            "anon_huge_kb": sum(p["anon_huge_kb"] for p in procs),
            "shmem_kb": sum(p["shmem_kb"] for p in procs),
            "thp": thp.as_dict(),
            "eligible_windows": sum(p["eligible_windows"] for p in procs),
            "collapsible": collapsible(total),
            "results": {r.name: n for r, n in sorted(total.items())},
            "ineligible": dict(why.most_common()),
        },
        "skipped": skipped,
    }


def scan_record(s: ProcessScan) -> dict[str, Any]:
    counts = s.results()
    return {
        "pid": s.pid, "comm": s.comm, "target": s.target,
        "anon_kb": s.anon_kb, "anon_huge_kb": s.anon_huge_kb,
        "coverage_pct": round(s.coverage, 1), "eligible_windows": s.eligible_windows,
        "collapsible": collapsible(counts),
        "results": {r.name: n for r, n in sorted(counts.items())},
        "ineligible": _ineligible_json(s),
        "shmem_kb": s.shmem_kb,
        "thp": s.thp.as_dict() if s.thp is not None else None,
    }


def pte_mapped_kb(u: ThpUsage | None) -> int:
    """THP kB mapped by PTEs (every folio size, 2 MiB ones too), anonymous and shmem."""
    if u is None:
        return 0
    return sum(u.anon_pte_kb.values()) + sum(u.shmem_pte_kb.values())


def thp_detail(s: ProcessScan) -> str:
    """One line of what the table cannot hold: THP by PTEs by folio size, file PMDs."""
    parts = []
    u = s.thp
    if u is not None:
        for label, sizes in (("anon by PTEs", u.anon_pte_kb), ("shmem by PTEs", u.shmem_pte_kb)):
            if sizes:
                parts.append(label + " " + " ".join(f"{human_kb(k)}:{human_kb(v)}"
                                                     for k, v in sorted(sizes.items())))
        if u.file_pmd_kb:
            parts.append(f"file PMD {human_kb(u.file_pmd_kb)}")
    return "; ".join(parts)


def print_scan(scans: list[ProcessScan], skipped: list[str], notes: tuple[str, ...] = ()
               ) -> None:
    table = Table(box=None, pad_edge=False)
    for col, just in (("PID", "right"), ("COMMAND", "left"), ("ANON", "right"),
                      ("THP", "right"), ("COVER", "right"), ("SHMEM", "right"),
                      ("SHM-THP", "right"), ("PTE-THP", "right"), ("WINDOWS", "right"),
                      ("COLLAPSIBLE", "right"), ("RESULTS", "left")):
        table.add_column(col, justify=just, no_wrap=col != "RESULTS")
    total = Counter()
    for s in scans:
        counts = s.results()
        total.update(counts)
        table.add_row(str(s.pid), Text(printable(s.comm)), human_kb(s.anon_kb),
                      human_kb(s.anon_huge_kb), f"{s.coverage:.1f}%", human_kb(s.shmem_kb),
                      human_kb(s.thp.shmem_pmd_kb if s.thp else 0),
                      human_kb(pte_mapped_kb(s.thp)), str(s.eligible_windows),
                      str(collapsible(counts)), results_text(counts))
    anon = sum(s.anon_kb for s in scans)
    huge = sum(s.anon_huge_kb for s in scans)
    table.add_row("", f"TOTAL ({len(scans)})", human_kb(anon), human_kb(huge),
                  f"{100.0 * huge / anon if anon else 0:.1f}%",
                  human_kb(sum(s.shmem_kb for s in scans)),
                  human_kb(sum(s.thp.shmem_pmd_kb for s in scans if s.thp)),
                  human_kb(sum(pte_mapped_kb(s.thp) for s in scans)),
                  str(sum(s.eligible_windows for s in scans)),
                  str(collapsible(total)), results_text(total))
    out = console()
    out.print(table)
    for s in scans:
        why = ineligible_text(_ineligible_json(s))
        if s.target is not None:  # the policy it was decided by, when not the global one
            why = f"target {s.target}" + (f"; {why}" if why else "")
        if why:
            out.print(f"pid {s.pid} ({printable(s.comm)}): {why}", markup=False)
        detail = thp_detail(s)
        if detail:
            out.print(f"{s.pid}: {detail}", markup=False)
    known = bool(scans) and all(s.referenced_known for s in scans)
    out.print(REFERENCED_KNOWN if known else REFERENCED_UNKNOWN)
    for note in notes:
        out.print(note, markup=False)
    for line in skipped:
        out.print(printable(line), markup=False)


def collapse_json(scan: ProcessScan, outcomes: list[CollapseOutcome], *, dry_run: bool,
                  force: bool, seconds: float, rss_growth_kb: int, rss_predicted_kb: int,
                  target: str | None = None, max_cpu_percent: int = 0,
                  refused: dict[int, str] | None = None) -> dict[str, Any]:
    failed = Counter(o.result.name for o in outcomes if o.result != ScanResult.SUCCEED)
    # Every window not tried, by its result; hugepaged's own refusals (a target's bloat
    # budget) by theirs.
    tried = {o.address for o in outcomes}
    refused = refused or {}
    skipped = Counter(refused.get(a, r.name) for a, r in scan.windows() if a not in tried)
    return {
        "version": JSON_VERSION, "pid": scan.pid, "comm": scan.comm,
        "dry_run": dry_run, "force": force, "target": target,
        "max_cpu_percent": max_cpu_percent, "referenced_known": scan.referenced_known,
        "windows": [{"address": hex(o.address), "result": o.result.name,
                     "errno": o.errno_name or None, "ms": round(o.seconds * 1000, 3),
                     "attempts": o.attempts}
                    for o in outcomes],
        "collapsed": 0 if dry_run else sum(o.result == ScanResult.SUCCEED for o in outcomes),
        "would_collapse": len(outcomes) if dry_run else None,
        "failed": dict(failed), "skipped": dict(skipped),
        "seconds": round(seconds, 4), "rss_growth_kb": rss_growth_kb,
        "rss_growth_predicted_kb": rss_predicted_kb,
        "ineligible": _ineligible_json(scan),
    }


def print_collapse(doc: dict[str, Any], verbose: bool) -> None:
    out = console()
    if verbose:
        for w in doc["windows"]:
            err = f" ({w['errno']})" if w["errno"] else ""
            out.print(f"  {w['address']}  {w['result']}{err}  {w['ms']:.2f} ms", markup=False)
    verb = "would collapse" if doc["dry_run"] else "collapsed"
    n = doc["would_collapse"] if doc["dry_run"] else doc["collapsed"]
    rss = f"RSS +{doc['rss_growth_predicted_kb']} kB" if doc["dry_run"] else \
        f"RSS +{doc['rss_growth_kb']} kB (predicted +{doc['rss_growth_predicted_kb']} kB)"
    target = f", target {doc['target']}" if doc.get("target") else ""
    out.print(f"pid {doc['pid']} ({printable(doc['comm'])}){target}: {verb} {n} window(s) in "
              f"{doc['seconds']:.3f} s, {rss}", markup=False)
    if doc["failed"]:
        out.print("  failed:  " + " ".join(f"{k}:{v}" for k, v in doc["failed"].items()))
    if doc["skipped"]:
        out.print("  skipped: " + " ".join(f"{k}:{v}" for k, v in doc["skipped"].items()))
    why = ineligible_text(doc["ineligible"])
    if why:
        out.print("  " + why)


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


# The per-target policy columns of status: (header, key); what a target leaves out is the
# global value, shown with a "*".
POLICY_COLUMNS = (("ENABLED", "enabled"), ("SHMEM", "shmem_enabled"),
                  ("NONE", "max_ptes_none"), ("SWAP", "max_ptes_swap"),
                  ("SHARED", "max_ptes_shared"))


def targets_table(targets: list[dict[str, Any]], tunables: dict[str, Any]) -> Table:
    """One row per configured target, in the configuration file's order: the policy as it
    applies to its processes (its own settings, the global ones marked *), its coverage."""
    table = Table(box=None, pad_edge=False)
    left = ("TARGET", "ENABLED", "SHMEM")
    for col in ("TARGET", "PRIO", *(h for h, _ in POLICY_COLUMNS), "PROCS", "ANON", "THP",
                "COVER", "COLLAPSED", "BLOAT", "CPU"):
        table.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    for t in targets:
        policy = t.get("policy")
        if policy is None:  # a daemon from before status carried the policy
            policy = {k: t.get(k) for _, k in POLICY_COLUMNS if t.get(k) is not None}
        applied = [str(policy[k]) if k in policy else f"{tunables.get(k, '-')}*"
                   for _, k in POLICY_COLUMNS]
        limit = t["bloat_limit_kb"]
        bloat = human_kb(t["bloat_used_kb"]) + "/" + (human_kb(limit) if limit is not None
                                                      else "-")
        cpu = f"{t['cpu_seconds']:.2f} s" + (f" ({t['max_cpu_percent']}%)"
                                             if t["max_cpu_percent"] else "")
        table.add_row(t["name"], str(t["priority"]), *applied, str(t["processes"]),
                      human_kb(t["anon_kb"]), human_kb(t["anon_huge_kb"]),
                      f"{t['coverage_pct']:.1f}%", str(t["windows_collapsed"]), bloat, cpu)
    return table


def print_status(st: dict[str, Any]) -> None:
    out = console(markup=False)
    c = st["counters"]
    out.print(f"hugepaged {st['version']} pid {st['pid']}: {st['state']}, up "
              f"{st['uptime_seconds']:.0f} s, {st['cpu_seconds']:.2f} s CPU, "
              f"{st['registered']} processes registered, "
              f"{st['free_huge_blocks']} free huge pages")
    cur = st["cursor"]
    out.print("cursor: none (between passes)" if cur["pid"] is None
              else f"cursor: pid {cur['pid']} at {cur['address']}")
    if "madvise_source" in st:
        out.print(f"MADV_HUGEPAGE seen by: {st['madvise_source']}")
    if "referenced_source" in st:
        out.print(f"referenced pages (LACK_REFERENCED_PAGE) seen by: {st['referenced_source']}")
    out.print("  ".join(f"{name} {value}" for name, value in c.items()))  # every counter
    from hugepaged.scan.mthp_kernel import describe as mthp_note

    note = mthp_note(st.get("kernel_mthp_collapse") or {})
    if note:
        out.print(note)
    if st.get("cpu_by_activity"):
        out.print("CPU by activity: " + ", ".join(
            f"{what} {seconds:.2f} s" for what, seconds in st["cpu_by_activity"].items()))
    if st["results"]:
        out.print("results: " + " ".join(f"{k}:{v}" for k, v in st["results"].items()))
    if st["collapse_failures"]:
        out.print("collapse failures: "
                  + " ".join(f"{k}:{v}" for k, v in st["collapse_failures"].items()))
    if st.get("targets"):
        out.print(targets_table(st["targets"], st["tunables"]))
        out.print("* the global value (TUNABLE below): the target does not set it")
    table = Table(box=None, pad_edge=False, title=None)
    table.add_column("TUNABLE")
    table.add_column("VALUE", justify="right")
    for k, v in st["tunables"].items():
        table.add_row(k, str(v))
    out.print(table)


def print_vmas(s: ProcessScan) -> None:
    """One line per VMA of one process: kind, size, resident, THP, and why it is no
    candidate or what its windows came to."""
    from hugepaged.scan.eligibility import memory_kind

    table = Table(box=None, pad_edge=False)
    for col, just in (("START", "left"), ("END", "left"), ("KIND", "left"), ("SIZE", "right"),
                      ("RSS", "right"), ("PMD", "right"), ("WINDOWS", "right"),
                      ("RESULT", "left"), ("PATH", "left")):
        table.add_column(col, justify=just, no_wrap=col != "RESULT")
    for v in s.vmas:
        m = v.vma
        if v.skip is not None:
            what = v.skip.value
        else:
            vals, nums = np.unique(v.codes, return_counts=True)
            what = results_text(Counter({ScanResult(int(c)): int(n)
                                         for c, n in zip(vals, nums, strict=True)}))
        pmd = m.anon_huge_kb + m.shmem_pmd_kb + m.file_pmd_kb
        table.add_row(f"{m.start:x}", f"{m.end:x}", memory_kind(m).value,
                      human_kb(m.size >> 10), human_kb(m.rss_kb), human_kb(pmd),
                      str(v.codes.size), what, Text(printable(m.path)))
    out = console()
    out.print(f"pid {s.pid} ({printable(s.comm)})", markup=False)
    out.print(table)


def vmas_json(s: ProcessScan) -> list[dict[str, Any]]:
    from hugepaged.scan.eligibility import memory_kind

    out = []
    for v in s.vmas:
        m = v.vma
        vals, nums = np.unique(v.codes, return_counts=True)
        out.append({"start": hex(m.start), "end": hex(m.end), "kind": memory_kind(m).value,
                    "path": m.path, "rss_kb": m.rss_kb, "anon_huge_kb": m.anon_huge_kb,
                    "shmem_pmd_kb": m.shmem_pmd_kb, "file_pmd_kb": m.file_pmd_kb,
                    "ineligible": v.skip.value if v.skip is not None else None,
                    "results": {ScanResult(int(c)).name: int(n)
                                for c, n in zip(vals, nums, strict=True)}})
    return out
