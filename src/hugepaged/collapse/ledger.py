"""The bloat ledger (hugepaged's own, not the kernel's): the RSS collapses added, against a limit.

A collapse fills a window's empty and zero-page PTEs with new pages (a page each), so a
sparse heap collapsed grows. A target's `max_bloat_mb` bounds what its collapses may add; the
ledger keeps the added kB per live process (a process that exits takes its share with it) and
answers whether one more window fits. The daemon keeps one per target, the one-shot command
one for its process: the same rule, so `collapse --target` refuses what the daemon would.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BloatLedger:
    """kB added per pid, and the limit (None: unlimited)."""

    limit_kb: int | None = None
    added: dict[int, int] = field(default_factory=dict)  # pid -> kB added, live ones only

    @property
    def used_kb(self) -> int:
        return sum(self.added.values())

    def allows(self, kb: int) -> bool:
        """Whether a window whose collapse adds `kb` of RSS stays within the limit (one that
        adds nothing always does)."""
        if self.limit_kb is None or kb == 0:
            return True
        return self.used_kb + kb <= self.limit_kb

    def charge(self, pid: int, kb: int) -> None:
        if kb:
            self.added[pid] = self.added.get(pid, 0) + kb

    def forget(self, pid: int) -> None:
        self.added.pop(pid, None)

    def adopt(self, pid: int, kb: int) -> None:
        """A process that has just come under this ledger brings the RSS its collapses added."""
        self.forget(pid)
        self.charge(pid, kb)

    def plan(self, pid: int, windows: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """(addresses kept, addresses refused) of (address, kB added) windows in order, each
        charged as if it were collapsed: what a run with this ledger would try."""
        kept, refused = [], []
        for address, kb in windows:
            if self.allows(kb):
                self.charge(pid, kb)
                kept.append(address)
            else:
                refused.append(address)
        return kept, refused
