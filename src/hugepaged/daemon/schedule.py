"""The schedule: every deadline of the daemon in one place, keyed by its reason.

khugepaged_wait_work sleeps until the next pass, or the allocation back-off, whichever
applies; hugepaged's loop has more to wait for (the CPU cap, a target's share, the /proc walk,
fork events settling), and every one of them is a deadline here. The loop asks for the next
timeout; the parts that own a reason set and clear it; nothing else keeps a time to wake at.

The daemon's state is what its next pass waits for: the reason whose deadline binds.
"""

from __future__ import annotations

from collections.abc import Iterator

# Reasons a pass waits for (in the order their names are reported when two bind at once).
PASS = "pass"  # scan_sleep_millisecs after a pass, or a settled slot's due time
BACKOFF = "alloc-backoff"  # alloc_sleep_millisecs after a huge page allocation failed
CPU = "cpu-capped"  # the global CPU cap rests
SHARE = "share:"  # + target name: a visit waits for its target's CPU share
PRESSURE = "memory-pressure"  # a visit waits for memory pressure to fall
# Reasons the loop wakes for besides.
DISCOVER = "discover"  # the periodic /proc walk
ADMIT = "admit"  # fork events whose settle delay ends
BUDDY = "buddy"  # during a back-off: look for a free huge page this often

STATES = ("scanning", "idle", "alloc-backoff", "cpu-capped", "share-limited",
          "memory-pressure", "stopping")


class Schedule:
    """Deadlines (monotonic seconds) by reason; a reason without one is absent."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def set(self, reason: str, when: float) -> None:
        self._at[reason] = when

    def clear(self, reason: str) -> None:
        self._at.pop(reason, None)

    def at(self, reason: str) -> float | None:
        return self._at.get(reason)

    def until(self, reason: str, now: float) -> bool:
        """Whether the wait for `reason` is still running at `now`."""
        when = self._at.get(reason)
        return when is not None and now < when

    def due(self, reason: str, now: float) -> bool:
        when = self._at.get(reason)
        return when is None or when <= now

    def shares(self) -> Iterator[tuple[str, float]]:
        """(target, when) of the visits waiting for a target's CPU share."""
        for reason, when in list(self._at.items()):
            if reason.startswith(SHARE):
                yield reason[len(SHARE):], when

    def pass_at(self) -> float:
        """When the next pass may start: its own deadline, or later if the back-off or the
        CPU cap hold it."""
        return max(self._at.get(PASS, 0.0), self._at.get(BACKOFF, 0.0), self._at.get(CPU, 0.0))

    def next_wake(self, now: float) -> float:
        """The earliest time anything is due: the next pass, the /proc walk, fork events to
        admit (not before the CPU cap lets them in), the buddy poll of a back-off."""
        wake = self.pass_at()
        for reason in (DISCOVER, ADMIT, BUDDY):
            when = self._at.get(reason)
            if when is None:
                continue
            if reason == ADMIT:
                when = max(when, self._at.get(CPU, 0.0))
            wake = min(wake, when)
        return wake

    def state(self, now: float, scan_sleep: float) -> str:
        """What the next pass waits for: a running back-off or CPU cap, memory pressure or a
        target's share, a pass due within scan_sleep ("scanning"), or nothing soon ("idle").
        A visit held by pressure or a share is named before "scanning": passes keep coming
        every scan_sleep meanwhile, yet they wait for that, not for work."""
        if self.until(BACKOFF, now):
            return "alloc-backoff"
        if self.until(CPU, now):
            return "cpu-capped"
        if self.until(PRESSURE, now):
            return "memory-pressure"
        waiting = sorted(((when, name) for name, when in self.shares() if when > now))
        if waiting:
            return f"share-limited: {waiting[0][1]}"
        if self._at.get(PASS, 0.0) <= now + scan_sleep:
            return "scanning"
        return "idle"
