"""A cap on the CPU spent in collapses: a token bucket refilled at max_cpu_percent of a core."""

WINDOW_SECONDS = 5.0
# Once the bucket runs dry, collapses rest until it is this full again, so that each pass
# pays its fixed cost (reading the page state) for a batch of collapses, not for one.
RESUME_FRACTION = 0.25


class CpuBudget:
    """Tokens are CPU-seconds; a collapse may start while the bucket is not empty."""

    def __init__(self, percent: int, now: float, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self.tokens = 0.0
        self.resting = False
        self.stamp = now
        self.percent = 0
        self.set_percent(percent)
        self.tokens = self.capacity

    def set_percent(self, percent: int) -> None:
        uncapped = self.percent == 0
        self.percent = percent
        self.rate = percent / 100.0
        self.capacity = self.rate * self.window
        # From no cap to a cap: start with a full bucket, as at start-up; otherwise keep what
        # is left (a debt stays a debt).
        self.tokens = self.capacity if uncapped else min(self.tokens, self.capacity)

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def allows(self, now: float) -> bool:
        if self.percent == 0:
            return True
        self._refill(now)
        if self.tokens <= 0:
            self.resting = True
        elif self.resting and self.tokens >= self.capacity * RESUME_FRACTION:
            self.resting = False
        return not self.resting

    def charge(self, cpu_seconds: float) -> None:
        self.tokens -= cpu_seconds

    def wait(self, now: float) -> float:
        """Seconds until collapses may start again."""
        if self.allows(now):
            return 0.0
        return (self.capacity * RESUME_FRACTION - self.tokens) / self.rate
