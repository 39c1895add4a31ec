"""`hugepaged run`: the khugepaged() thread as a system daemon.

The scan loop is one thread with one selector: the process connector and signals wake its
sleep. The control socket is served on a thread of its own (control/server.py), so no client
can stall a pass; a valid change of either sleep writes to the loop's wake-up pipe, so it
takes effect at once (wakeup_khugepaged).
"""

import contextlib
import logging
import os
import resource
import selectors
import signal
import threading
import time
from typing import Any

from hugepaged import __version__
from hugepaged.config import Config, DaemonOptions, check_pattern, load_config
from hugepaged.errors import HugepagedError, InvalidTunable
from hugepaged.kernel import Kernel
from hugepaged.kernel.connector import ProcConnector
from hugepaged.kernel.limits import nofile_soft
from hugepaged.kernel.madvise import pidfd_open
from hugepaged.tunables import NAMES, Tunables, parse, resolve

from . import advice
from .kernel_quiet import STATE_FILE, KernelQuieter
from .khugepaged import Khugepaged
from .summary import Summary
from .targets import summaries

log = logging.getLogger("hugepaged")
DISCOVER_INTERVAL = 10.0  # /proc walk without the connector
DISCOVER_INTERVAL_CONNECTED = 60.0  # with it: only for missed events
IDLE_MIN = 5.0  # an idle pass (nothing due, nothing done) is not repeated sooner
BUDDY_POLL = 1.0  # during an allocation back-off
NEW_PROCESS_SETTLE = 1.0  # "insert behind the cursor, to let the area settle down"
COUNTERS = ("pages_collapsed", "full_scans")
# fds kept free of pidfds: control clients, /proc files, pagemap, kpageflags, metrics.
FD_RESERVE = 128
ADMIT_BATCH = 256  # deferred fork events turned into slots per wake-up of the loop


class Service:
    """Owns the loop, the sockets and the rollback of what it changed in the kernel."""

    def __init__(self, kernel: Kernel, config_path: str | None, overrides: dict[str, str],
                 options: dict[str, Any] | None = None, notify=None,
                 pids: list[int] | None = None, state_file: str = STATE_FILE) -> None:
        self.kernel, self.config_path, self.overrides = kernel, config_path, overrides
        self.cli_options = options or {}
        self.notify = notify or (lambda **kw: None)
        self.config = self._load()
        self.core = Khugepaged(kernel, self.tunables_from(self.config))
        self.core.only_pids = set(pids) if pids else None
        self.core.registry.capacity = max(16, nofile_soft() - FD_RESERVE)
        self._pin(pids or [])
        self._set_exclude()
        self.core.set_targets(self.config.targets)
        self.started = time.monotonic()
        self.stop_requested = self.reload_requested = False
        self.next_pass = 0.0
        self.connector: ProcConnector | None = None
        self.tracer = None  # kernel.tracepoints.SyscallTracer where the tracepoints exist
        self.quieter = KernelQuieter(kernel.thp, state_file)
        self.running = False
        self.hooks: list = []  # called after each pass
        self.ticks: list = []  # called on every wake-up of the loop (sd_notify watchdog)
        self.summary = Summary(self.core.counters)  # the info line a minute
        self.ticks.append(self.summary.tick)
        self.max_sleep: float | None = None  # cap on the loop's sleep (watchdog interval)
        # The control thread changes settings while the loop runs: both hold this around
        # what they change (never across a pass, so a request never waits for one).
        self.lock = threading.Lock()
        self._woken = False  # a wakeup() from the control thread, seen by the loop
        self._wake_w = -1
        # Fork events wait here for their settle delay before they cost a pidfd or a /proc
        # read: a process that exits first never does. Insertion order is due order.
        self.pending: dict[int, float] = {}

    def _pin(self, pids: list[int]) -> None:
        """Targeted mode follows the processes named now, not their pid numbers: each is
        pinned by a pidfd, and a later process given the same pid is not it."""
        for pid in pids:
            if pid not in self.core.registry.pinned:
                self.core.registry.pinned[pid] = pidfd_open(pid)

    # --- configuration ---------------------------------------------------------------
    def _load(self) -> Config:
        cfg = load_config(self.config_path)
        for key, value in self.cli_options.items():
            if value is not None:
                setattr(cfg.options, key, value)
        return cfg

    def tunables_from(self, cfg: Config) -> Tunables:
        return resolve(self.kernel.thp.current(), cfg.tunables, self.overrides)

    def _set_exclude(self) -> None:
        pattern = self.config.options.exclude_comm
        self.core.exclude_comm = check_pattern(pattern) if pattern else None

    @property
    def options(self) -> DaemonOptions:
        return self.config.options

    @property
    def tunables(self) -> Tunables:
        return self.core.tunables

    def reload(self) -> None:
        """SIGHUP: a file that does not parse is refused and the running settings kept."""
        try:
            cfg = self._load()
            tunables = self.tunables_from(cfg)
        except (HugepagedError, OSError, ValueError) as err:
            log.error("reload refused, configuration kept: %s", err,
                      extra={"event": "reload_refused", "error": str(err)})
            return
        old = self.config
        self.config = cfg
        try:
            self._set_exclude()
        except HugepagedError as err:
            self.config = old
            log.error("reload refused, configuration kept: %s", err,
                      extra={"event": "reload_refused", "error": str(err)})
            return
        try:
            self._apply(tunables, source="reload")
        except HugepagedError as err:
            self.config = old
            self._set_exclude()
            log.error("reload refused, configuration kept: %s", err,
                      extra={"event": "reload_refused", "error": str(err)})
            return
        self.core.set_targets(cfg.targets, source="reload")

    def _apply(self, new: Tunables, source: str) -> None:
        with self.lock:
            self._apply_locked(new, source)

    def _apply_locked(self, new: Tunables, source: str) -> None:
        old = self.core.tunables
        if old.kernel_khugepaged != new.kernel_khugepaged and self.running:
            # First, so that a refusal (another daemon holds the state file) changes nothing.
            if new.kernel_khugepaged == "quiet":
                self.quieter.quiet()
            else:
                self.quieter.restore()
        for key in NAMES:
            if getattr(old, key) != getattr(new, key):
                log.info("%s: %s -> %s (%s)", key, getattr(old, key), getattr(new, key), source,
                         extra={"event": "tunable", "key": key, "old": getattr(old, key),
                                "value": getattr(new, key), "source": source})
        self.core.set_tunables(new)
        rules = ("enabled", "shmem_enabled", "defrag", "max_ptes_none", "max_ptes_swap",
                 "max_ptes_shared")
        if any(getattr(old, k) != getattr(new, k) for k in rules):
            self._kick()  # as a write to the kernel's `enabled` wakes khugepaged
        if (old.scan_sleep_millisecs, old.alloc_sleep_millisecs) != \
           (new.scan_sleep_millisecs, new.alloc_sleep_millisecs):
            self.wakeup()

    # --- the control interface -------------------------------------------------------
    def get(self, key: str) -> int | str:
        if key in COUNTERS:
            return getattr(self.core.counters, key)
        if key not in NAMES:
            raise InvalidTunable(f"unknown key '{key}' (known: {', '.join(NAMES + COUNTERS)})")
        return getattr(self.core.tunables, key)

    def set(self, key: str, value: str) -> None:
        if key in COUNTERS:
            raise InvalidTunable(f"{key}: read-only counter")
        parse(key, value)  # refused exactly like sysfs, before anything changes
        self._apply(self.core.tunables.with_values({key: value}), source="control socket")

    def wakeup(self) -> None:
        """wakeup_khugepaged: the next pass starts now; a sleep change ends a back-off."""
        self.core.backoff_until = 0.0
        self.core.cpu_wait_until = 0.0
        self._kick()

    def _kick(self) -> None:
        """The next pass starts now; the loop may be asleep in select (another thread)."""
        self.next_pass = 0.0
        self._woken = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):  # a full pipe wakes the loop just the same
                os.write(self._wake_w, b"w")

    def state(self) -> str:
        now = time.monotonic()
        if self.stop_requested:
            return "stopping"
        if now < self.core.backoff_until:
            return "alloc-backoff"
        if now < self.core.cpu_wait_until:
            return "cpu-capped"
        if self.next_pass <= now + self.tunables.scan_sleep_millisecs / 1e3:
            return "scanning"
        # Resting while a visit waits for its target's CPU share is being capped, not idle.
        return "cpu-capped" if self.core.registry.next_resume() is not None else "idle"

    def status(self) -> dict[str, Any]:
        """Built on the control thread while the loop runs: every container the loop changes
        is copied in one C-level call (atomic under the GIL) before it is walked."""
        c, reg = self.core.counters, self.core.registry
        slots = list(reg.slots.values())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "version": __version__, "pid": os.getpid(), "state": self.state(),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
            "tunables": self.tunables.as_dict(),
            "counters": {"pages_collapsed": c.pages_collapsed, "full_scans": c.full_scans,
                         "passes": c.passes, "collapse_attempts": c.collapse_attempts,
                         "collapse_cpu_seconds": round(c.collapse_cpu_seconds, 4),
                         "alloc_backoffs": c.alloc_backoffs},
            "results": dict(sorted(c.results.items())),
            "collapse_failures": dict(c.collapse_failures),
            "registered": len(slots),
            "registry_capacity": reg.capacity,
            "registry_refused": reg.refused,
            "pending": len(self.pending),
            "targets": summaries(self.core.targets, self.core.target_states, slots),
            "processes": [{"pid": s.pid, "comm": s.comm, "last_result": s.last_result,
                           "target": self.core.control_for(s).target,
                           "settled_seconds": s.settled_for} for s in slots],
            "cursor": {"pid": reg.cursor.pid, "address": hex(reg.cursor.address)},
            "free_huge_blocks": self.kernel.mm.free_huge_blocks(),
            "connector": self.connector is not None,
            "madvise_source": "tracepoints" if self.tracer is not None else "fingerprint",
            "referenced_source": "page_idle" if self.core.referenced is not None else "none",
        }

    # --- the loop ----------------------------------------------------------------------
    def _signals(self, wake_fd: int) -> None:
        def stop(signum, frame):  # noqa: ARG001
            self.stop_requested = self.core.stopping = True

        def hup(signum, frame):  # noqa: ARG001
            self.reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        signal.set_wakeup_fd(wake_fd)

    def _open_connector(self) -> None:
        try:
            self.connector = ProcConnector()
        except OSError as err:
            log.warning("process connector unavailable (%s): relying on the /proc walk", err,
                        extra={"event": "connector_unavailable"})

    def _open_tracer(self) -> None:
        from hugepaged.kernel.tracepoints import SyscallTracer

        try:
            self.tracer = SyscallTracer(self.kernel.sys_root)
        except (HugepagedError, OSError) as err:
            log.warning("syscall tracepoints unavailable (%s): MADV_HUGEPAGE is seen at the "
                        "next rescan, a new mapping by the size in the fingerprint", err,
                        extra={"event": "tracepoints_unavailable"})

    def _on_syscalls(self) -> None:
        now, lost = time.monotonic(), self.tracer.lost
        for ev in self.tracer.events():
            due = advice.on_syscall(self.core, ev, now)
            if due is not None:
                self.next_pass = min(self.next_pass, due)
        if self.tracer.lost != lost:
            advice.on_lost(self.core, self.tracer.lost - lost)
            self.next_pass = 0.0

    def _on_workers(self) -> None:
        """A worker finished a batch: its outcomes are counted now; a pass that stopped for a
        full queue goes on."""
        core = self.core
        core.reap()
        if core.pool is None:
            return
        if core.pool.waiting():  # held back by the CPU cap: due when it allows them
            self.next_pass = min(self.next_pass, max(core.cpu_wait_until, time.monotonic()))
        if core.queue_stalled:  # room in a lane again: top it up
            core.queue_stalled = False
            self.next_pass = 0.0
        elif not core.pool.lanes:  # all done: what was decided meanwhile is looked at next
            self.next_pass = min(self.next_pass,
                                 time.monotonic() + self.tunables.scan_sleep_millisecs / 1e3)

    def _on_events(self) -> None:
        now = time.monotonic()
        core = self.core
        for ev in self.connector.events():
            slot = core.registry.slots.get(ev.pid)
            if ev.what == "exit":
                self.pending.pop(ev.pid, None)
                # The event is the leader thread's: the process lives on while any of its
                # threads does, and its pidfd polls readable only once all have exited.
                if slot is None or slot.exited():
                    core.exit(ev.pid)
            elif ev.what == "exec" and slot is not None:
                self._resolve_at_exec(slot, now)
            elif ev.pid not in self.pending and (core.only_pids is None
                                                 or ev.pid in core.only_pids):
                self.pending[ev.pid] = now + NEW_PROCESS_SETTLE

    def _resolve_at_exec(self, slot, now: float) -> None:
        """A new program: its name, exclusion and target resolved again (on_exec)."""
        self.core.on_exec(slot.pid)
        if slot.pid in self.core.registry:
            slot.due = now + NEW_PROCESS_SETTLE

    def _admit(self, now: float) -> None:
        """Fork and exec events whose settle delay has passed become slots, a batch at a
        time and only within the CPU budget."""
        if not self.pending:
            return
        if not self.core.budget.allows(now):
            self.core.cpu_wait_until = max(self.core.cpu_wait_until,
                                           now + self.core.budget.wait(now))
            return
        admitted = 0
        for pid, due in list(self.pending.items())[:ADMIT_BATCH]:
            if due > now:
                break
            del self.pending[pid]
            if self.core.enter(pid):
                admitted += 1
        if admitted:
            self.next_pass = min(self.next_pass, now)

    def _charge_cpu(self) -> None:
        """Everything the scan loop spends goes to the CPU budget (scanning, registration,
        the /proc walk, connector and syscall records): the loop thread's CPU since the last
        charge (its collapses charged it as they ran; the workers' batches are charged as
        they are taken back). The control and metrics threads are not charged, so that a
        client polling `status` cannot starve the scan."""
        self.core.meter.charge()

    def run(self, control=None) -> int:
        """Serve until SIGTERM/SIGINT; everything changed in the kernel is put back."""
        quieter = self.quieter
        quieter.recover()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_w = wfd
        sel = selectors.DefaultSelector()
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # set_user_nice(current, 19)
            self._signals(wfd)
            sel.register(rfd, selectors.EVENT_READ, "signal")
            self._open_connector()
            if self.connector is not None:
                sel.register(self.connector, selectors.EVENT_READ, "connector")
            sel.register(self.core.wake_pipe[0], selectors.EVENT_READ, "workers")
            self._open_tracer()
            for fd in self.tracer.fds() if self.tracer is not None else ():
                sel.register(fd, selectors.EVENT_READ, "syscalls")
            if self.tunables.kernel_khugepaged == "quiet":
                quieter.quiet()
            self.running = True
            if control is not None:
                control.start()  # its own thread: no client can stall the loop
            import hugepaged.scan.process  # noqa: F401 - numpy: start-up, not the cap's
            self.core.meter.reset()
            self.notify(ready=True, status="scanning")
            self._loop(sel, rfd)
        finally:
            with self.lock:
                self.running = False
            self.notify(stopping=True, status="stopping")
            signal.set_wakeup_fd(-1)
            self._wake_w = -1
            with self.lock:
                quieter.restore()
            if self.connector is not None:
                self.connector.close()
            sel.close()
            if self.tracer is not None:
                self.tracer.close()
                self.tracer = None
            os.close(rfd)
            os.close(wfd)
            self.core.close()
        self.summary.flush()
        log.info("stopped", extra={"event": "stop"})
        return 0

    def _loop(self, sel: selectors.BaseSelector, rfd: int) -> None:
        interval = DISCOVER_INTERVAL_CONNECTED if self.connector else DISCOVER_INTERVAL
        next_discover = 0.0
        core = self.core
        while not self.stop_requested:
            now = time.monotonic()
            if self.reload_requested:
                self.reload_requested = False
                self.notify(reloading=True)
                self.reload()
                self.notify(ready=True)
            if now >= next_discover:
                core.discover()
                next_discover = now + interval
            self._admit(now)
            if self._woken:
                self._woken, self.next_pass = False, 0.0
            if now < core.backoff_until and core.end_backoff_if_free():
                self.next_pass = 0.0
            if now >= self.next_pass and now >= core.backoff_until \
                    and now >= core.cpu_wait_until:
                if core.budget.allows(now):
                    worked = core.do_scan()
                    after = self._after_pass(worked, time.monotonic())
                    with self.lock:
                        self.next_pass = 0.0 if self._woken else after
                        self._woken = False
                    for hook in self.hooks:
                        hook(self)
                else:  # scanning is paid from the same budget as collapses
                    core.cpu_wait_until = self.next_pass = now + core.budget.wait(now)
            for tick in self.ticks:
                tick(self)
            self._charge_cpu()
            # A pass is not due before the CPU budget allows one (the cap may have been hit by
            # registration rather than by a pass): never wake just to find it still resting.
            wake = min(max(self.next_pass, core.cpu_wait_until), next_discover)
            if self.pending:
                wake = min(wake, max(next(iter(self.pending.values())), core.cpu_wait_until,
                                     now + 0.01))
            if now < core.backoff_until:
                wake = min(wake, now + BUDDY_POLL)
            timeout = max(0.0, wake - time.monotonic())
            if self.max_sleep is not None:
                timeout = min(timeout, self.max_sleep)
            ready = sel.select(timeout)
            if any(key.data == "syscalls" for key, _ in ready):
                self._on_syscalls()  # every ring at once, however many polled ready
            for key, _ in ready:
                if key.data == "signal":
                    while True:
                        try:
                            if not os.read(rfd, 512):
                                break
                        except BlockingIOError:
                            break
                elif key.data == "workers":
                    self._on_workers()
                elif key.data == "connector":
                    self._on_events()

    def _after_pass(self, worked: bool, now: float) -> float:
        core = self.core
        if now < core.backoff_until:
            return core.backoff_until
        if now < core.cpu_wait_until:
            return core.cpu_wait_until
        if core.queue_stalled:
            return now + BUDDY_POLL  # a finished batch wakes the loop before that
        sleep = self.tunables.scan_sleep_millisecs / 1000.0
        if worked:
            return now + sleep
        due = core.registry.next_due()
        idle = max(now + max(sleep, IDLE_MIN), due if due is not None else now + IDLE_MIN)
        # A visit that waits for its target's CPU share is taken up when the share is back:
        # resting IDLE_MIN instead left a target at a few percent a third of what it may use.
        waiting = core.registry.next_resume()
        return idle if waiting is None else min(idle, max(now + sleep, waiting))
