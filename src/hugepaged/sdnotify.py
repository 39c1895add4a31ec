"""The sd_notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams to systemd.

systemd passes $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace) and, with
WatchdogSec=, $WATCHDOG_USEC (and $WATCHDOG_PID). Each message is one datagram of
newline-separated KEY=VALUE assignments. Without $NOTIFY_SOCKET everything here is a no-op,
so the daemon behaves the same outside systemd.

Why not a library: what one would replace is SdNotify's sendto() (the rest, when to kick the
watchdog, how the loop's sleep is capped for it, what STATUS says, is the daemon's own).
systemd-python and cysystemd are extensions built against libsystemd (pip needs a compiler
and libsystemd's headers on a stock machine); the pure-Python sdnotify (last released 2017)
sends a string and reads neither WATCHDOG_USEC nor WATCHDOG_PID. None is worth a dependency
for one datagram.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("hugepaged")
STATUS_INTERVAL = 5.0  # STATUS= is sent at most this often (it changes after every pass)


def socket_address(value: str) -> str | bytes:
    """$NOTIFY_SOCKET as an address for socket.connect: '@name' is the abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET={value!r}: neither an absolute path nor '@name'")
    return value


def watchdog_seconds(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog timeout meant for this process (sd_watchdog_enabled), or None."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    target = environ.get("WATCHDOG_PID")
    if target and int(target) != (os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class SdNotify:
    """A notifier; called as the Service's `notify(ready=..., status=..., ...)`."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog  # the timeout (WatchdogSec); kicks go at half of it
        self.sock: socket.socket | None = None
        if address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SdNotify:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET")
        if not value:
            return cls(None)
        try:
            address = socket_address(value)
        except ValueError as err:
            log.warning("%s: not notifying systemd", err, extra={"event": "sd_notify_error"})
            return cls(None)
        return cls(address, watchdog_seconds(env))

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, **fields: object) -> bool:
        """Send one datagram of KEY=VALUE lines (keys upper-cased); False if it failed."""
        if self.sock is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:
                raise ValueError(f"{key}: a value cannot hold a newline")
            lines.append(f"{key.upper()}={text}")
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as err:  # systemd gone or socket full: never fatal for the daemon
            log.debug("sd_notify failed: %s", err, extra={"event": "sd_notify_error"})
            return False
        return True

    def __call__(self, *, ready: bool = False, status: str | None = None,
                 watchdog: bool = False, stopping: bool = False, reloading: bool = False,
                 **extra: object) -> bool:
        fields: dict[str, object] = {}
        if reloading:
            fields["RELOADING"] = 1
            fields["MONOTONIC_USEC"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if ready:
            fields["READY"] = 1
        if stopping:
            fields["STOPPING"] = 1
        if watchdog:
            fields["WATCHDOG"] = 1
        if status is not None:
            fields["STATUS"] = status
        fields.update(extra)
        return self.send(**fields)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Keeper:
    """Watchdog kicks and STATUS lines from the service loop, at the right pace.

    `tick(service)` is called on every wake-up of the loop; it kicks the watchdog once half
    of WATCHDOG_USEC has passed since the last kick, sends a changed STATUS at most every
    STATUS_INTERVAL, and sets `service.max_sleep` so that the loop's select never sleeps
    past the next kick (an idle daemon otherwise sleeps up to a minute).
    """

    def __init__(self, notifier: SdNotify, describe: Callable[[object], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier, self.describe, self.clock = notifier, describe, clock
        self.period = notifier.watchdog / 2 if notifier.watchdog else None
        self.last_kick = clock()
        self.last_status = ""
        self.last_status_at = float("-inf")

    def time_left(self, now: float) -> float | None:
        if self.period is None:
            return None
        return max(0.0, self.last_kick + self.period - now)

    def tick(self, service) -> None:
        now = self.clock()
        fields: dict[str, object] = {}
        if self.period is not None and now >= self.last_kick + self.period:
            fields["watchdog"] = True
            self.last_kick = now
        if now - self.last_status_at >= STATUS_INTERVAL:
            text = self.describe(service)
            if text != self.last_status:
                fields["status"] = text
                self.last_status, self.last_status_at = text, now
        if fields:
            self.notifier(**fields)
        service.max_sleep = self.time_left(now)


def describe(service) -> str:
    """The one-line STATUS= that `systemctl status hugepaged` shows."""
    c, reg = service.core.counters, service.core.registry
    return (f"{service.state()}: {len(reg)} processes registered, "
            f"{c.pages_collapsed} pages collapsed, {c.full_scans} full scans")


def attach(service, notifier: SdNotify) -> Keeper | None:
    """Wire a notifier into a Service: its `notify` callback and a loop tick."""
    service.notify = notifier
    if not notifier.enabled:
        return None
    keeper = Keeper(notifier, describe)
    service.ticks.append(keeper.tick)
    service.max_sleep = keeper.time_left(keeper.clock())
    return keeper
