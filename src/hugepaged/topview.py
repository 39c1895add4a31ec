"""`hugepaged top`'s frames: scan results and the daemon's status turned into one renderable.

Pure functions of their inputs (no /proc, no socket), so a frame can be rendered to text in
tests exactly as the terminal shows it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from hugepaged.names import printable
from hugepaged.report import human_kb
from hugepaged.results import collapsible
from hugepaged.scan.process import ProcessScan

HPAGE_KB = 2048
HEADER_LINES = 4  # title, totals, daemon line, table header
COLUMNS = (("PID", "right"), ("COMMAND", "left"), ("TARGET", "left"), ("ANON", "right"),
           ("THP", "right"), ("COVER", "right"), ("ELIGIBLE", "right"), ("COLLAPSIBLE", "right"),
           ("mTHP", "right"), ("LAST", "left"))


@dataclass(frozen=True)
class TopRow:
    """One process as `top` shows it."""

    pid: int
    comm: str
    anon_kb: int
    anon_huge_kb: int
    eligible: int
    collapsible: int
    last_result: str = "-"
    registered: bool = False
    target: str = "-"  # its target (top --config's, or the daemon's); "-": the global policy
    shmem_kb: int = 0  # resident shared memory, and of it PMD-mapped
    shmem_pmd_kb: int = 0
    # Anonymous mTHP: (folio kB, kB mapped) pairs; None where it was not counted (a row
    # beyond what is shown).
    anon_mthp_kb: tuple[tuple[int, int], ...] | None = None

    @property
    def mthp_cell(self) -> str:
        if self.anon_mthp_kb is None:
            return "-"
        return human_kb(sum(kb for _, kb in self.anon_mthp_kb))

    @property
    def coverage(self) -> float:
        return 100.0 * self.anon_huge_kb / self.anon_kb if self.anon_kb else 0.0

    @property
    def collapsible_kb(self) -> int:
        return self.collapsible * HPAGE_KB


@dataclass
class Frame:
    """Everything one refresh shows."""

    rows: list[TopRow]
    status: dict[str, Any] | None = None  # the daemon's `status`, when it answered
    daemon_error: str | None = None  # why it did not
    skipped: list[str] = field(default_factory=list)
    taken_at: float = field(default_factory=time.time)
    interval: float | None = None
    scan_seconds: float | None = None


def rows_of(scans: list[ProcessScan], status: dict[str, Any] | None) -> list[TopRow]:
    """Rows ordered by collapsible windows (most first), then anonymous memory."""
    known = {p["pid"]: p for p in (status or {}).get("processes", [])}
    rows = []
    for s in scans:
        counts = s.results()
        proc = known.get(s.pid)
        rows.append(TopRow(
            pid=s.pid, comm=s.comm, anon_kb=s.anon_kb, anon_huge_kb=s.anon_huge_kb,
            eligible=s.eligible_windows, collapsible=collapsible(counts),
            last_result=(proc.get("last_result") or "-") if proc else "-",
            registered=proc is not None,
            target=s.target or ((proc.get("target") or "-") if proc else "-"),
            shmem_kb=s.shmem_kb, shmem_pmd_kb=s.shmem_pmd_kb))
    rows.sort(key=lambda r: (-r.collapsible, -r.anon_kb, r.pid))
    return rows


def _totals(rows: list[TopRow]) -> str:
    anon = sum(r.anon_kb for r in rows)
    huge = sum(r.anon_huge_kb for r in rows)
    windows = sum(r.collapsible for r in rows)
    cover = 100.0 * huge / anon if anon else 0.0
    shmem = sum(r.shmem_kb for r in rows)
    shmem_pmd = sum(r.shmem_pmd_kb for r in rows)
    sizes: dict[int, int] = {}
    for r in rows:
        for size, kb in r.anon_mthp_kb or ():
            sizes[size] = sizes.get(size, 0) + kb
    mthp = " ".join(f"{human_kb(size)}:{human_kb(kb)}" for size, kb in sorted(sizes.items())
                    if kb)
    return (f"{len(rows)} processes  anon {human_kb(anon)}  THP {human_kb(huge)} ({cover:.1f}%)"
            f"  collapsible {windows} windows ({human_kb(windows * HPAGE_KB)})"
            f"  shmem {human_kb(shmem)} (PMD {human_kb(shmem_pmd)})"
            + (f"  mTHP {mthp}" if mthp else ""))


def daemon_line(status: dict[str, Any] | None, error: str | None) -> str:
    if status is None:
        why = f" ({error})" if error else ""
        return f"daemon: not answering{why}; scan only"
    c = status.get("counters", {})
    failures = status.get("collapse_failures") or {}
    failed = " ".join(f"{k}:{v}" for k, v in failures.items()) or "0"
    return (f"daemon pid {status.get('pid')} {status.get('state')}, up "
            f"{status.get('uptime_seconds', 0):.0f} s, {status.get('cpu_seconds', 0):.2f} s CPU"
            f" | registered {status.get('registered', 0)}"
            f"  pages_collapsed {c.get('pages_collapsed', 0)}"
            f"  full_scans {c.get('full_scans', 0)}  passes {c.get('passes', 0)}"
            f"  attempts {c.get('collapse_attempts', 0)}  failures {failed}"
            f"  backoffs {c.get('alloc_backoffs', 0)}"
            f"  free huge blocks {status.get('free_huge_blocks', '?')}")


def render(frame: Frame, limit: int | None = None) -> RenderableType:
    """The frame as a rich renderable: title, totals, daemon line, then the table."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(frame.taken_at))
    title = f"hugepaged top  {when}"
    if frame.interval:
        title += f"  every {frame.interval:g} s"
    if frame.scan_seconds is not None:
        title += f"  (scan {frame.scan_seconds:.2f} s)"
    shown = frame.rows if limit is None else frame.rows[:max(0, limit)]
    cells = [[str(r.pid), printable(r.comm) + ("*" if r.registered else ""), printable(r.target),
              human_kb(r.anon_kb),
              human_kb(r.anon_huge_kb), f"{r.coverage:.1f}%", str(r.eligible),
              f"{r.collapsible} ({human_kb(r.collapsible_kb)})" if r.collapsible else "0",
              r.mthp_cell,
              printable(r.last_result)] for r in shown]
    table = Table(box=None, pad_edge=False, expand=False, header_style="bold reverse")
    for i, (col, just) in enumerate(COLUMNS):
        # Numbers are never cut: on a narrow terminal COMMAND and LAST give way.
        shrinks = col in ("COMMAND", "TARGET", "LAST")
        width = max([len(col)] + [len(row[i]) for row in cells])
        table.add_column(col, justify=just, no_wrap=True, overflow="ellipsis",
                         min_width=min(width, 8) if shrinks else width)
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))  # cells are data, never markup
    parts: list[RenderableType] = [
        Text(title, style="bold"),
        Text(_totals(frame.rows)),
        Text(printable(daemon_line(frame.status, frame.daemon_error)),
             style="green" if frame.status else "yellow"),
        table,
    ]
    hidden = len(frame.rows) - len(shown)
    if hidden > 0:
        parts.append(Text(f"... {hidden} more"))
    if frame.status:
        parts.append(Text("* registered with the daemon; LAST is its last result there",
                          style="dim"))
    for line in frame.skipped:
        parts.append(Text(printable(line), style="dim"))
    return Group(*parts)


def render_text(frame: Frame, width: int = 120, limit: int | None = None) -> str:
    """The frame as plain text, as a terminal `width` columns wide shows it."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False,
            highlight=False).print(render(frame, limit))
    return buf.getvalue()
