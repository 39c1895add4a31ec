"""`hugepaged run`: the khugepaged() thread as a system daemon.

The Service holds the configuration, applies changes of it (SIGHUP, the control socket),
answers the control socket and puts back what it changed in the kernel when it stops. The
event loop (daemon/loop.py) runs the core; the control socket is served on a thread of its
own (control/server.py), so no client can stall a pass; a valid change of either sleep wakes
the loop at once (wakeup_khugepaged).
"""

import contextlib
import logging
import os
import resource
import threading
import time
from typing import Any

from hugepaged import __version__
from hugepaged.config import Config, DaemonOptions, check_pattern, load_config
from hugepaged.errors import HugepagedError, InvalidTunable
from hugepaged.kernel import Kernel
from hugepaged.kernel.limits import nofile_soft
from hugepaged.scan.mthp_kernel import kernel_mthp_collapse
from hugepaged.tunables import NAMES, Tunables, parse, resolve

from .counters import COUNTERS
from .kernel_quiet import STATE_FILE, KernelQuieter
from .khugepaged import RULES, Khugepaged
from .summary import Summary
from .targets import summaries

log = logging.getLogger("hugepaged")
# fds kept free of pidfds: control clients, /proc files, pagemap, kpageflags, metrics.
FD_RESERVE = 128
COUNTER_NAMES = tuple(name for name, _ in COUNTERS)


class Service:
    """Owns the configuration, the control interface and the rollback of what it changed in
    the kernel; the loop (daemon/loop.py) owns the event sources."""

    def __init__(self, kernel: Kernel, config_path: str | None, overrides: dict[str, str],
                 options: dict[str, Any] | None = None, notify=None,
                 pids: list[int] | None = None, state_file: str = STATE_FILE) -> None:
        self.kernel, self.config_path, self.overrides = kernel, config_path, overrides
        self.cli_options = options or {}
        self.notify = notify or (lambda **kw: None)
        self.config = self._load()
        self.core = Khugepaged(kernel, self.tunables_from(self.config))
        self.core.membership.pin(pids or [])
        self.core.registry.capacity = max(16, nofile_soft() - FD_RESERVE)
        self._set_exclude()
        self.core.set_targets(self.config.targets)
        self.started = time.monotonic()
        self.stop_requested = self.reload_requested = False
        self.quieter = KernelQuieter(kernel.thp, state_file)
        self.running = False
        self.loop = None  # daemon/loop.py's EventLoop while run() runs
        self.hooks: list = []  # called after each pass
        self.ticks: list = []  # called on every wake-up of the loop (sd_notify watchdog)
        self.summary = Summary(self.core.counters)  # the info line a minute
        self.ticks.append(self.summary.tick)
        self.max_sleep: float | None = None  # cap on the loop's sleep (watchdog interval)
        # The control thread changes settings while the loop runs: both hold this around
        # what they change (never across a pass, so a request never waits for one).
        self.lock = threading.Lock()
        self.woken = False  # a wakeup() from the control thread, seen by the loop
        self.wake_fd = -1  # the loop's wake-up pipe while it runs

    # --- configuration ---------------------------------------------------------------
    def _load(self) -> Config:
        cfg = load_config(self.config_path)
        for key, value in self.cli_options.items():
            if value is not None:
                setattr(cfg.options, key, value)
        return cfg

    def tunables_from(self, cfg: Config) -> Tunables:
        return resolve(self.kernel.thp.current(), cfg.tunables, self.overrides,
                       geometry=self.kernel.geometry)

    def _set_exclude(self) -> None:
        pattern = self.config.options.exclude_comm
        self.core.membership.exclude_comm = check_pattern(pattern) if pattern else None

    @property
    def options(self) -> DaemonOptions:
        return self.config.options

    @property
    def tunables(self) -> Tunables:
        return self.core.tunables

    def reload(self) -> None:
        """SIGHUP: a file that does not parse is refused and the running settings kept."""
        old = self.config
        try:
            cfg = self._load()
            tunables = self.tunables_from(cfg)
            self.config = cfg
            self._set_exclude()
            self._apply(tunables, source="reload")
        except (HugepagedError, OSError, ValueError) as err:
            self.config = old
            self._set_exclude()
            log.error("reload refused, configuration kept: %s", err,
                      extra={"event": "reload_refused", "error": str(err)})
            return
        self.core.set_targets(cfg.targets, source="reload")

    def _apply(self, new: Tunables, source: str) -> None:
        with self.lock:
            old = self.core.tunables
            if old.kernel_khugepaged != new.kernel_khugepaged and self.running:
                # First, so that a refusal (another daemon holds the state file) changes
                # nothing.
                if new.kernel_khugepaged == "quiet":
                    self.quieter.quiet()
                else:
                    self.quieter.restore()
            for key in NAMES:
                if getattr(old, key) != getattr(new, key):
                    log.info("%s: %s -> %s (%s)", key, getattr(old, key), getattr(new, key),
                             source, extra={"event": "tunable", "key": key,
                                            "old": getattr(old, key),
                                            "value": getattr(new, key), "source": source})
            self.core.set_tunables(new)
            if any(getattr(old, k) != getattr(new, k) for k in (*RULES, "defrag")):
                self._kick()  # as a write to the kernel's `enabled` wakes khugepaged
            if (old.scan_sleep_millisecs, old.alloc_sleep_millisecs) != \
               (new.scan_sleep_millisecs, new.alloc_sleep_millisecs):
                self.wakeup()

    # --- the control interface -------------------------------------------------------
    def get(self, key: str) -> int | str | float:
        if key in COUNTER_NAMES:
            return getattr(self.core.counters, key)
        if key not in NAMES:
            raise InvalidTunable(f"unknown key '{key}' "
                                 f"(known: {', '.join(NAMES + COUNTER_NAMES)})")
        return getattr(self.core.tunables, key)

    def set(self, key: str, value: str) -> None:
        if key in COUNTER_NAMES:
            raise InvalidTunable(f"{key}: read-only counter")
        parse(key, value, self.kernel.geometry)  # refused exactly like sysfs, first
        self._apply(self.core.tunables.with_values({key: value}, self.kernel.geometry),
                    source="control socket")

    def wakeup(self) -> None:
        """wakeup_khugepaged: the next pass starts now; a sleep change ends a back-off."""
        self.core.wakeup()
        self._kick()

    def _kick(self) -> None:
        """The next pass starts now; the loop may be asleep in select (another thread)."""
        self.core.kick()
        self.woken = True
        if self.wake_fd >= 0:
            with contextlib.suppress(OSError):  # a full pipe wakes the loop just the same
                os.write(self.wake_fd, b"w")

    def state(self) -> str:
        if self.stop_requested:
            return "stopping"
        return self.core.schedule.state(time.monotonic(),
                                        self.tunables.scan_sleep_millisecs / 1e3)

    def status(self) -> dict[str, Any]:
        """Built on the control thread while the loop runs: every container the loop changes
        is copied in one C-level call (atomic under the GIL) before it is walked."""
        core, reg = self.core, self.core.registry
        slots = list(reg.slots.values())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        snap = core.counters.snapshot()
        loop = self.loop
        return {
            "version": __version__, "pid": os.getpid(), "state": self.state(),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 3),
            "tunables": self.tunables.as_dict(),
            **snap,
            "registered": len(slots),
            "registry_capacity": reg.capacity,
            "registry_refused": reg.refused,
            "pending": len(core.membership.pending),
            "targets": summaries(core.membership.targets, core.membership.target_states,
                                 slots),
            "processes": [{"pid": s.pid, "comm": s.comm, "last_result": s.last_result,
                           "target": core.membership.control_for(s).target,
                           "settled_seconds": s.settled_for} for s in slots],
            "cursor": {"pid": reg.cursor.pid, "address": hex(reg.cursor.address)},
            "held_windows": core.collapser.splits.held_counts(slots),
            "kernel_shrinker": self._shrinker(),
            "kernel_mthp_collapse": kernel_mthp_collapse(self.kernel),
            "free_huge_blocks": self.kernel.mm.free_huge_blocks(),
            "connector": loop is not None and loop.connector is not None,
            "madvise_source": "tracepoints" if loop is not None and loop.tracer is not None
            else "fingerprint",
            "referenced_source": core.referenced.name if core.referenced is not None
            else "none",
        }

    def _shrinker(self) -> dict[str, Any]:
        """The kernel's underused-THP shrinker, as the split watch reads it (daemon/churn)."""
        try:
            split = self.kernel.mm.vmstat().get("thp_underused_split_page")
        except OSError:
            split = None
        limit = self.core.collapser.splits.shrinker_limit()
        return {"shrink_underused": limit is not None, "max_ptes_none": limit,
                "thp_underused_split_page": split}

    # --- running ---------------------------------------------------------------------
    def run(self, control=None) -> int:
        """Serve until SIGTERM/SIGINT; everything changed in the kernel is put back."""
        from .loop import EventLoop

        self.quieter.recover()
        self.loop = EventLoop(self)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # set_user_nice(current, 19)
            self.loop.open()
            if self.tunables.kernel_khugepaged == "quiet":
                self.quieter.quiet()
            self.running = True
            if control is not None:
                control.start()  # its own thread: no client can stall the loop
            import hugepaged.scan.process  # noqa: F401 - numpy: start-up, not the cap's
            from hugepaged.daemon.firstrun import log_first_run

            log_first_run(self.kernel, self.tunables, self.config.targets,
                          self.core.membership.exclude_comm, self.core.membership.only_pids)
            self.core.collapser.meter.reset()
            self.notify(ready=True, status="scanning")
            self.loop.serve()
        finally:
            with self.lock:
                self.running = False
            self.notify(stopping=True, status="stopping")
            self.wake_fd = -1
            with self.lock:
                self.quieter.restore()
            self.loop.close()
            self.core.close()
        self.summary.flush()
        log.info("stopped", extra={"event": "stop"})
        return 0
