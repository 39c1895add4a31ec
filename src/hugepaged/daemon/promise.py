"""Coverage promises (hugepaged's own; KubeVirt's "guaranteed" huge pages are the anchor).

A target may promise `min_coverage` percent of its processes' anonymous memory in huge pages
within `coverage_deadline` seconds of falling short. While it is short the daemon works its
processes first (they rank above every priority); when the deadline passes with it still
short, the promise is broken: logged at warning with the last obstacle its collapses met (no
free huge page, its bloat budget, memory pressure, the CPU cap or its share, windows held
after splits), counted, and exported, until it is kept again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("hugepaged")
EVERY = 1.0  # seconds between two looks at the targets' coverage
BOOST = 10_000  # added to the priority of a short target's processes (priorities: +-1000)
DEADLINE = 60  # seconds, where a target promises coverage and names no coverage_deadline


class Promises:
    """Looks at each promising target's coverage after passes, at most every EVERY s."""

    def __init__(self, membership, clock: Callable[[], float]) -> None:
        self.membership, self.clock = membership, clock
        self._last = float("-inf")

    def evaluate(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < EVERY:
            return
        self._last = now
        members = self.membership
        slots = list(members.registry.slots.values())
        for t in members.targets:
            st = members.target_states.get(t.name)
            if t.min_coverage is None or st is None:
                continue
            mine = [s for s in slots if getattr(s.target, "name", None) == t.name]
            anon = sum(s.anon_kb for s in mine)
            if not anon:  # nothing visited yet (or nothing to cover): nothing to judge
                continue
            huge = min(anon, sum(s.anon_huge_kb for s in mine))
            st.coverage = 100.0 * huge / anon
            self._judge(t, st, now)
            if st.short != (st.coverage < t.min_coverage):
                st.short = not st.short
                members.rerank(t.name)

    def _judge(self, t, st, now: float) -> None:
        if st.coverage >= t.min_coverage:
            if st.promise == "broken":
                log.info("target %s: promise kept again: %.1f%% huge (promised %d%%)", t.name,
                         st.coverage, t.min_coverage,
                         extra={"event": "promise_kept", "target": t.name,
                                "coverage_pct": round(st.coverage, 1)})
            st.promise, st.short_since = "kept", None
            return
        if st.short_since is None:
            st.short_since = now
        deadline = t.coverage_deadline or DEADLINE
        if now - st.short_since <= deadline:
            st.promise = "pending"
            return
        if st.promise != "broken":
            st.broken += 1
            why = st.obstacle or "no collapsible window found (not eligible?)"
            log.warning("target %s: promise broken: %.1f%% huge after %d s short of %d%%: %s",
                        t.name, st.coverage, deadline, t.min_coverage, why,
                        extra={"event": "promise_broken", "target": t.name,
                               "coverage_pct": round(st.coverage, 1),
                               "promised_pct": t.min_coverage, "why": why})
        st.promise = "broken"
