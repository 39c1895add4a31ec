"""Log lines rate-limited by kind: a fault that repeats for every process (the fd limit, a
kernel that refuses something) is said once a minute with a count, not thousands of times."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

EVERY = 60.0


class RateLimited:
    """log(key, level, msg, ...) says `msg` at most once per EVERY seconds per key; the next
    line of that key says how many were left out meanwhile."""

    def __init__(self, logger: logging.Logger, every: float = EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every, self.clock = logger, every, clock
        self._last: dict[object, float] = {}
        self._left_out: dict[object, int] = {}

    def log(self, key: object, level: int, msg: str, *args, extra: dict | None = None) -> bool:
        """True if the line was logged."""
        now = self.clock()
        if now - self._last.get(key, float("-inf")) < self.every:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        left_out = self._left_out.pop(key, 0)
        if left_out:
            msg += f" ({left_out} like it left out in the last {self.every:.0f} s)"
        self._last[key] = now
        self.logger.log(level, msg, *args, extra={**(extra or {}), "left_out": left_out})
        return True
