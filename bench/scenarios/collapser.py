"""The collapser under test: the kernel's khugepaged with knobs set, or a `hugepaged run`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kit.daemon_runner import Daemon

from .contenders import KERNEL_DEFAULTS, Contender
from .cpu import cpu_seconds, find_khugepaged, thread_cpu
from .knobs import read_counter, vmstat, write_knob

if TYPE_CHECKING:
    from .context import Context


class Collapser:
    """One contender at work: the kernel's khugepaged with knobs set, or a `hugepaged run`."""

    def __init__(self, contender: Contender, ctx: Context) -> None:
        self.c, self.ctx = contender, ctx
        self.daemon: Daemon | None = None
        self.kpid: int | None = None
        self.cpu0 = (0.0, 0.0)
        self.counters0: dict = {}
        self.info: dict = {}

    def prepare(self) -> None:
        """Before the target exists: kernel at `madvise` for the kernel contenders (so the
        target's MADV_HUGEPAGE registers it with khugepaged), at `never` for hugepaged (the
        MADV_HUGEPAGE then registers nothing and the khugepaged thread is stopped)."""
        for k, v in KERNEL_DEFAULTS.items():
            write_knob(k, v)
        write_knob("enabled", "madvise" if self.c.is_kernel else "never")

    def start(self, pids: list[int], tick=None) -> None:
        self.counters0 = {"pages_collapsed": read_counter("pages_collapsed"),
                          "full_scans": read_counter("full_scans"),
                          **vmstat("thp_collapse_alloc", "thp_collapse_alloc_failed")}
        if self.c.is_kernel:
            self.kpid = find_khugepaged()
            if self.kpid is None:
                raise RuntimeError("no [khugepaged] thread although enabled=madvise")
            self.cpu0 = self._raw_cpu()
            for k, v in self.c.settings.items():  # scan_sleep_millisecs last: wakes the thread
                write_knob(k, v)
        else:
            self.daemon = self.ctx.daemon(pids, {"enabled": "madvise", **self.c.settings})
            self.daemon.start(timeout=30, ready="socket", tick=tick)
            self.cpu0 = (0.0, 0.0)  # from the process's start; start-up subtracted later

    def _raw_cpu(self) -> tuple[float, float]:
        pid = self.kpid if self.c.is_kernel else self.daemon.pid
        try:
            return cpu_seconds(pid)
        except FileNotFoundError:  # not yet, or no longer
            return self.cpu0

    def cpu(self) -> tuple[float, float]:
        """(stat, schedstat) CPU seconds spent since start()."""
        s, n = self._raw_cpu()
        return s - self.cpu0[0], n - self.cpu0[1]

    def alloc_failures(self) -> int:
        if self.c.is_kernel:
            return (vmstat("thp_collapse_alloc_failed")["thp_collapse_alloc_failed"]
                    - self.counters0["thp_collapse_alloc_failed"])
        return int(self.daemon.status()["counters"].get("alloc_backoffs", 0))

    def alive(self) -> bool:
        return self.c.is_kernel or self.daemon.alive()

    def log_tail(self) -> str:
        return self.daemon.log_tail() if self.daemon is not None else ""

    def stop(self) -> dict:
        info = {"kernel_pages_collapsed": read_counter("pages_collapsed")
                - self.counters0["pages_collapsed"],
                "kernel_full_scans": read_counter("full_scans") - self.counters0["full_scans"]}
        v = vmstat("thp_collapse_alloc", "thp_collapse_alloc_failed")
        info.update({k: v[k] - self.counters0[k] for k in v})
        if self.c.is_kernel:
            for k in self.c.settings:
                write_knob(k, KERNEL_DEFAULTS[k])
        elif self.daemon is not None:
            try:
                st = self.daemon.status()
                info["daemon_status"] = {k: st.get(k) for k in
                                         ("counters", "results", "collapse_failures",
                                          "tunables", "cpu_seconds", "registered")}
                info["daemon_threads"] = thread_cpu(self.daemon.pid)
                rc = self.daemon.stop()
                info["daemon_exit"] = {"status": rc,
                                       "seconds": round(self.daemon.stop_seconds, 3)}
            except Exception as err:  # noqa: BLE001 - record, then make sure it is gone
                info["daemon_error"] = repr(err)
            finally:
                self.close()
        self.info = info
        return info

    def close(self) -> None:
        """Whatever happened: no daemon left running."""
        if self.daemon is not None:
            self.daemon.close()
