"""The daemon's event loop: one thread, one selector over the event sources, one sleep.

Sources: signals (through a wake-up pipe), the process connector (fork, exec, exit), the
syscall tracepoints (MADV_HUGEPAGE and friends, daemon/advice.py), the collapse workers'
finished batches, and the control thread's wake-ups. Between them the loop sleeps until the
schedule's next deadline (daemon/schedule.py); every wake-up ends in a sleep that the
schedule bounds from below, so no source can make it spin.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time

from hugepaged.errors import HugepagedError
from hugepaged.kernel.connector import ProcConnector

from . import advice
from . import schedule as sched
from .membership import NEW_PROCESS_SETTLE

log = logging.getLogger("hugepaged")
DISCOVER_INTERVAL = 10.0  # /proc walk without the connector
DISCOVER_INTERVAL_CONNECTED = 60.0  # with it: only for missed events
# The syscall rings are read while the CPU cap owes less than this: a flood of advice then
# costs about the cap, and the few milliseconds a pass or a wake-up leaves owing do not stop
# the listening (each wake-up to listen again would be charged, and owe again: a spin).
LISTEN_SLACK = 0.25
BUDDY_POLL = 0.25  # during an allocation back-off: free huge pages are taken within this


class Phases:
    """The loop thread's CPU, attributed to what it was spent on (counters.ACTIVITIES):
    each call charges the time since the last one to an activity."""

    def __init__(self, counters, clock=time.thread_time) -> None:
        self.counters, self.clock = counters, clock
        self.mark = clock()

    def spent(self, activity: str, less: float = 0.0) -> None:
        """What was spent since the last mark, less `less` (counted elsewhere already)."""
        now = self.clock()
        self.counters.cpu[activity] += max(0.0, now - self.mark - less)
        self.mark = now


class EventLoop:
    """The selector and the sources, for one run of a Service."""

    def __init__(self, service) -> None:
        self.service, self.core = service, service.core
        self.sel = selectors.DefaultSelector()
        self.connector: ProcConnector | None = None
        self.tracer = None  # kernel.tracepoints.SyscallTracer where the tracepoints exist
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._listening = True  # the connector and the syscall rings are in the selector

    # --- set-up and tear-down ----------------------------------------------------------
    def open(self) -> None:
        svc = self.service
        svc.wake_fd = self._signal_w

        def stop(signum, frame):  # noqa: ARG001
            svc.stop_requested = True
            self.core.stopping = True

        def hup(signum, frame):  # noqa: ARG001
            svc.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        signal.set_wakeup_fd(self._signal_w)
        self.sel.register(self._signal_r, selectors.EVENT_READ, "signal")
        try:
            self.connector = ProcConnector()
            self.sel.register(self.connector, selectors.EVENT_READ, "connector")
        except OSError as err:
            log.warning("process connector unavailable (%s): relying on the /proc walk", err,
                        extra={"event": "connector_unavailable"})
        self.sel.register(self.core.lanes.wake_pipe[0], selectors.EVENT_READ, "workers")
        self._open_tracer()

    def _open_tracer(self) -> None:
        from hugepaged.kernel.tracepoints import SyscallTracer

        try:
            self.tracer = SyscallTracer(self.service.kernel.sys_root)
        except (HugepagedError, OSError) as err:
            log.warning("syscall tracepoints unavailable (%s): MADV_HUGEPAGE is seen at the "
                        "next rescan, a new mapping by the size in the fingerprint", err,
                        extra={"event": "tracepoints_unavailable"})
            return
        for fd in self.tracer.fds():
            self.sel.register(fd, selectors.EVENT_READ, "syscalls")
        self.core.trace_layouts()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        if self.connector is not None:
            self.connector.close()
        self.sel.close()
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
        os.close(self._signal_r)
        os.close(self._signal_w)

    # --- the loop --------------------------------------------------------------------
    def serve(self) -> None:
        svc, core, schedule = self.service, self.core, self.core.schedule
        interval = DISCOVER_INTERVAL_CONNECTED if self.connector else DISCOVER_INTERVAL
        schedule.set(sched.DISCOVER, 0.0)
        phases = self.phases = Phases(core.counters)
        while not svc.stop_requested:
            now = time.monotonic()
            if svc.reload_requested:
                svc.reload_requested = False
                svc.notify(reloading=True)
                svc.reload()
                svc.notify(ready=True)
            phases.spent("loop")
            if schedule.due(sched.DISCOVER, now):
                core.discover()
                schedule.set(sched.DISCOVER, now + interval)
            core.admit(now)
            phases.spent("registration")
            self._take_wakeup()
            core.poll_backoff(now, BUDDY_POLL)
            if core.pass_due(now):
                collapsed = core.collapser.sync_cpu
                core.run_pass()
                phases.spent("scan", less=core.collapser.sync_cpu - collapsed)
                self._take_wakeup()
                for hook in svc.hooks:
                    hook(svc)
            for tick in svc.ticks:
                tick(svc)
            # Everything this thread spent is charged (scanning, registration, the /proc
            # walk, the records; its collapses charged as they ran). The control and metrics
            # threads are not, so that a client polling status cannot starve the scan.
            core.collapser.meter.charge()
            self._wait(max(0.0, schedule.next_wake(now) - time.monotonic()))

    def _take_wakeup(self) -> None:
        """A wakeup() from the control thread (a pass may have run since it came)."""
        svc = self.service
        with svc.lock:
            if svc.woken:
                svc.woken = False
                self.core.kick()

    def _wait(self, timeout: float) -> None:
        if self.service.max_sleep is not None:
            timeout = min(timeout, self.service.max_sleep)
        owed = self.core.collapser.budget.wait(time.monotonic())
        allowed = owed <= LISTEN_SLACK
        self._listen(allowed)
        if not allowed and self.tracer is not None:
            # Not reading the rings while the cap rests: listen again when it has nearly
            # ended, not at the next pass (seconds away, or minutes for a settled process).
            timeout = min(timeout, owed - LISTEN_SLACK)
        self.phases.spent("loop")
        ready = self.sel.select(timeout)
        if any(key.data == "syscalls" for key, _ in ready):
            self._on_syscalls()  # every ring at once, however many polled ready
        for key, _ in ready:
            if key.data == "signal":
                self._drain_signals()
            elif key.data == "workers":
                self.core.workers_done(time.monotonic())
            elif key.data == "connector":
                self._on_events()
        self.phases.spent("events")

    def _listen(self, allowed: bool) -> None:
        """The syscall records, which any process can make arrive by the hundred thousand a
        second, are read only while the CPU cap owes little (LISTEN_SLACK): a flood of advice
        then costs about the cap, and what the rings lose meanwhile the lost-records fallback
        catches up.
        (The connector is always read: the kernel bounds forks and execs, and its events cost
        a dictionary entry each until they settle.)"""
        if allowed == self._listening:
            return
        self._listening = allowed
        for fileobj, data in [(fd, "syscalls") for fd in (self.tracer.fds() if self.tracer
                                                          else ())]:
            if allowed:
                self.sel.register(fileobj, selectors.EVENT_READ, data)
            else:
                self.sel.unregister(fileobj)

    def _drain_signals(self) -> None:
        while True:
            try:
                if not os.read(self._signal_r, 4096):
                    break
            except BlockingIOError:
                break

    # --- the sources -----------------------------------------------------------------
    def _on_syscalls(self) -> None:
        core, now, lost = self.core, time.monotonic(), self.tracer.lost
        for ev in self.tracer.events():
            when = advice.on_syscall(core.membership, ev, now)
            if when is not None:
                core.schedule.set(sched.PASS, min(core.schedule.at(sched.PASS) or 0.0, when))
        if self.tracer.lost != lost and advice.on_lost(core.membership, self.tracer.lost - lost,
                                                       now):
            core.kick()

    def _on_events(self) -> None:
        now, members = time.monotonic(), self.core.membership
        for ev in self.connector.events():
            if ev.what == "exit":
                members.exited(ev.pid)
            elif ev.what in ("exec", "comm") and ev.pid in members.registry:
                members.changed_event(ev.pid, now, ev.what == "exec")  # resolved once, soon
            elif ev.what != "comm":
                members.forked(ev.pid, now + NEW_PROCESS_SETTLE)
        first = members.next_admit()
        if first is not None:
            self.core.schedule.set(sched.ADMIT, first)
