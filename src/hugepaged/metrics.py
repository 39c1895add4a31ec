"""Prometheus metrics: a collector that reads the daemon's own state at scrape time.

Nothing is counted twice: every value comes from the Service (its Counters, registry and
tunables) or from the kernel when Prometheus asks, on the HTTP server's thread. Per-process
coverage is read for at most `metrics_top_processes` registered processes, the largest by
RSS, so the label cardinality stays bounded.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from hugepaged import __version__
from hugepaged.daemon.counters import COUNTERS
from hugepaged.daemon.schedule import STATES
from hugepaged.errors import HugepagedError, UsageError
from hugepaged.kernel.procfs import parse_smaps

log = logging.getLogger("hugepaged")
DEFAULT_HOST = "127.0.0.1"


def parse_listen(spec: str) -> tuple[str, int]:
    """'PORT', ':PORT' -> 127.0.0.1; 'HOST:PORT'; '[v6]:PORT'. Raises UsageError."""
    text = spec.strip()
    host, port = DEFAULT_HOST, text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise UsageError(f"--metrics {spec!r}: expected [ADDRESS]:PORT")
        host, port = text[1:end], text[end + 2:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
        host = host or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--metrics {spec!r}: expected PORT, :PORT or HOST:PORT "
                         "(port 0..65535; 0 picks a free one)")
    return host, int(port)


def _snapshot(mapping: Any) -> dict:
    """A copy of a dict the daemon thread may be growing (copying holds the GIL)."""
    for _ in range(5):
        try:
            return dict(mapping)
        except RuntimeError:  # pragma: no cover - changed size during iteration
            continue
    return {}


class HugepagedCollector:
    """Everything under hugepaged_*; registered on a private CollectorRegistry."""

    def __init__(self, service, top_processes: int | None = None) -> None:
        self.service = service
        self.top_processes = top_processes
        self._rollup: bool | None = None  # /proc/PID/smaps_rollup exists (Linux 4.14+)

    @property
    def kernel(self):
        return self.service.kernel

    def describe(self) -> list[Metric]:
        return []  # collected only at scrape time (no read at registration)

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        core = svc.core
        c = core.counters

        info = InfoMetricFamily("hugepaged_build", "hugepaged version")
        info.add_metric([], {"version": __version__})
        yield info

        snap = c.snapshot()
        for name, doc in COUNTERS:  # the one list of counters (daemon/counters.py)
            if name in ("registered", "gone"):  # the gauge below says how many are now
                continue
            yield CounterMetricFamily(f"hugepaged_{name}", doc, value=snap["counters"][name])

        windows = CounterMetricFamily(
            "hugepaged_scan_windows", "Huge-page windows examined, by result code",
            labels=["result"])
        for result, n in snap["results"].items():
            windows.add_metric([str(result)], n)
        yield windows
        failures = CounterMetricFamily(
            "hugepaged_collapse_failures",
            "Failed collapses, by errno (or result code where there was none)",
            labels=["errno"])
        for name, n in sorted(snap["collapse_failures"].items()):
            failures.add_metric([str(name)], n)
        yield failures

        buckets, total = c.histogram()
        yield HistogramMetricFamily("hugepaged_collapse_duration_seconds",
                                    "Wall time of one collapse (MADV_COLLAPSE, with its retry)",
                                    buckets=[(_le(b), n) for b, n in buckets], sum_value=total)

        ru = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily("hugepaged_cpu_seconds",
                                  "CPU time of the daemon process (user + system)",
                                  value=ru.ru_utime + ru.ru_stime)
        by = CounterMetricFamily(
            "hugepaged_activity_cpu_seconds", "The daemon's CPU by what spent it: the loop's "
            "scanning, registration, events and the rest, and every collapse (hugepaged's own)",
            labels=["activity"])
        for activity, seconds in snap["cpu_by_activity"].items():
            by.add_metric([activity], seconds)
        yield by

        slots = list(core.registry.slots.values())
        yield GaugeMetricFamily("hugepaged_registered_processes",
                                "Processes in the scan list", value=len(slots))
        try:
            free = self.kernel.mm.free_huge_blocks()
        except OSError:
            free = None
        if free is not None:
            yield GaugeMetricFamily(
                "hugepaged_free_huge_blocks",
                "Free order-9 (2 MiB) blocks in /proc/buddyinfo, larger orders counted in "
                "order-9 units", value=free)

        state = GaugeMetricFamily("hugepaged_state", "1 for the daemon's current state",
                                  labels=["state"])
        current = svc.state().split(":")[0]  # "share-limited: redis" is share-limited
        for name in STATES:
            state.add_metric([name], 1 if name == current else 0)
        yield state

        numeric = GaugeMetricFamily("hugepaged_tunable", "Numeric tunables in effect",
                                    labels=["name"])
        words = {}
        for name, value in svc.tunables.as_dict().items():
            if isinstance(value, int):
                numeric.add_metric([name], value)
            else:
                words[name] = str(value)
        yield numeric
        settings = InfoMetricFamily("hugepaged_settings", "Word-valued tunables in effect")
        settings.add_metric([], words)
        yield settings

        held = GaugeMetricFamily("hugepaged_held_windows", "Windows hugepaged collapsed, found "
                                 "split again and holds back now, by why (split_backoff: an "
                                 "allocator's or reclaim's split; underused: the kernel's "
                                 "underused-THP shrinker's)", labels=["why"])
        for why, n in core.collapser.splits.held_counts(slots).items():
            held.add_metric([why], n)
        yield held
        try:
            underused = self.kernel.mm.vmstat().get("thp_underused_split_page")
        except OSError:
            underused = None
        if underused is not None:
            yield CounterMetricFamily("hugepaged_kernel_thp_underused_split_page",
                                      "THPs the kernel's underused-THP shrinker split (the "
                                      "kernel's vmstat thp_underused_split_page)",
                                      value=underused)
        yield from self._nr_anon()
        yield from self._processes(slots)
        yield from self._targets(core, slots)

    def _nr_anon(self) -> Iterator[Metric]:
        """The kernel's own count of anonymous THP folios by size (whole machine)."""
        try:
            counts = self.kernel.thp.nr_anon()
        except OSError:
            counts = {}
        m = GaugeMetricFamily("hugepaged_thp_nr_anon",
                              "Anonymous THP folios of this size on the machine "
                              "(the kernel's hugepages-<size>/stats/nr_anon)", labels=["size"])
        for kb, n in sorted(counts.items()):
            m.add_metric([f"{kb}kB"], n)
        yield m

    def _targets(self, core, slots: list) -> Iterator[Metric]:
        """Per-target series, labelled by the target's name only: as many series as the
        configuration file has targets (at most 64)."""
        from hugepaged.daemon.targets import summaries

        members = core.membership
        rows = summaries(list(members.targets), members.target_states, slots)
        specs = (
            ("processes", GaugeMetricFamily, "Registered processes the target matches", 1),
            ("anon_bytes", GaugeMetricFamily, "Anonymous memory of its processes, as of "
             "their last visit", 1024),
            ("anon_huge_bytes", GaugeMetricFamily, "Of that, PMD-mapped (AnonHugePages)", 1024),
            ("pages_collapsed", CounterMetricFamily, "Windows collapsed for the target", 1),
            ("bloat_bytes", GaugeMetricFamily, "RSS its collapses added by filling empty or "
             "zero-page PTEs, over its live processes", 1024),
            ("collapse_cpu_seconds", CounterMetricFamily, "CPU spent in its collapses", 1),
        )
        keys = {"processes": "processes", "anon_bytes": "anon_kb",
                "anon_huge_bytes": "anon_huge_kb", "pages_collapsed": "windows_collapsed",
                "bloat_bytes": "bloat_used_kb", "collapse_cpu_seconds": "cpu_seconds"}
        for name, family, doc, scale in specs:
            m = family(f"hugepaged_target_{name}", doc, labels=["target"])
            for r in rows:
                m.add_metric([r["name"]], r[keys[name]] * scale)
            yield m
        broken = CounterMetricFamily("hugepaged_target_promise_broken",
                                     "Times the target's coverage promise (min_coverage within "
                                     "coverage_deadline) was broken", labels=["target"])
        broken_now = GaugeMetricFamily("hugepaged_target_promise_broken_now",
                                       "1 while the target's coverage promise is broken",
                                       labels=["target"])
        for r in rows:
            if r.get("promise"):
                broken.add_metric([r["name"]], r["promise"]["broken"])
                broken_now.add_metric([r["name"]], int(r["promise"]["state"] == "broken"))
        yield broken
        yield broken_now
        limit = GaugeMetricFamily("hugepaged_target_bloat_limit_bytes",
                                  "The target's max_bloat_mb (targets that set one)",
                                  labels=["target"])
        for r in rows:
            if r["bloat_limit_kb"] is not None:
                limit.add_metric([r["name"]], r["bloat_limit_kb"] * 1024)
        yield limit

    def _top(self, slots: list) -> list[tuple[int, str, object]]:
        """(pid, comm, slot) of the largest registered processes by RSS."""
        limit = self.top_processes if self.top_processes is not None \
            else self.service.options.metrics_top_processes
        if limit <= 0:
            return []
        sized = []
        for slot in slots:
            try:
                st = self.kernel.procfs.stat(slot.pid)
            except (HugepagedError, OSError, ValueError):
                continue
            sized.append((st.rss_pages, slot.pid, st.comm, slot))
        sized.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [(pid, comm, slot) for _, pid, comm, slot in sized[:limit]]

    def _memory(self, pid: int) -> tuple[int, int, int, int] | None:
        """(Anonymous, AnonHugePages, ShmemPmdMapped, FilePmdMapped) in kB: smaps_rollup, or
        summed smaps where it lacks."""
        procfs = self.kernel.procfs
        if self._rollup is None:
            self._rollup = os.path.exists(procfs.path("self", "smaps_rollup"))
        try:
            if self._rollup:
                vmas = parse_smaps(procfs.read_text(pid, "smaps_rollup"))
            else:
                vmas = procfs.smaps(pid)
        except (HugepagedError, OSError, ValueError):
            return None
        return (sum(v.anonymous_kb for v in vmas), sum(v.anon_huge_kb for v in vmas),
                sum(v.shmem_pmd_kb for v in vmas), sum(v.file_pmd_kb for v in vmas))

    def _processes(self, slots: list) -> Iterator[Metric]:
        labels = ["pid", "comm"]
        anon = GaugeMetricFamily("hugepaged_process_anon_bytes",
                                 "Anonymous memory of a top process (smaps Anonymous)",
                                 labels=labels)
        huge = GaugeMetricFamily("hugepaged_process_anon_huge_bytes",
                                 "Anonymous memory mapped by huge pages (smaps AnonHugePages)",
                                 labels=labels)
        cover = GaugeMetricFamily("hugepaged_process_thp_coverage_ratio",
                                  "AnonHugePages / Anonymous of a top process (0..1)",
                                  labels=labels)
        shmem = GaugeMetricFamily("hugepaged_process_shmem_pmd_bytes",
                                  "Shared memory mapped by huge pages (smaps ShmemPmdMapped)",
                                  labels=labels)
        files = GaugeMetricFamily("hugepaged_process_file_pmd_bytes",
                                  "File pages mapped by huge pages (smaps FilePmdMapped)",
                                  labels=labels)
        mthp = GaugeMetricFamily("hugepaged_process_anon_mthp_bytes",
                                 "Anonymous memory of a top process in mTHP folios of this "
                                 "size (larger than a page, smaller than a PMD), mapped by "
                                 "PTEs; as of its last visit (hugepaged's own figure, from "
                                 "pagemap and kpageflags)", labels=[*labels, "size"])
        for pid, comm, slot in self._top(slots):
            mem = self._memory(pid)
            if mem is None:
                continue
            for kb, n in sorted(_snapshot(slot.anon_mthp_kb).items()):
                mthp.add_metric([str(pid), comm, f"{kb}kB"], n * 1024)
            anon_kb, huge_kb, shmem_kb, file_kb = mem
            key = [str(pid), comm]
            anon.add_metric(key, anon_kb * 1024)
            huge.add_metric(key, huge_kb * 1024)
            cover.add_metric(key, huge_kb / anon_kb if anon_kb else 0.0)
            shmem.add_metric(key, shmem_kb * 1024)
            files.add_metric(key, file_kb * 1024)
        yield anon
        yield huge
        yield cover
        yield shmem
        yield files
        yield mthp


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def build_registry(service, top_processes: int | None = None) -> CollectorRegistry:
    """A private registry: hugepaged_* plus the standard process_* metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HugepagedCollector(service, top_processes))
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """The exposition of build_registry() over HTTP (metrics_http: one thread at nice 19,
    bounded connections, rendered at most once a second); `close()` stops it."""

    def __init__(self, service, listen: str) -> None:
        from hugepaged.metrics_http import MetricsHTTPServer

        self.host, self.port = parse_listen(listen)
        self.registry = build_registry(service)
        try:
            self.httpd = MetricsHTTPServer(self.host, self.port, self.render)
        except (OSError, socket.gaierror) as err:
            raise UsageError(f"--metrics {listen}: cannot listen on "
                             f"{self.host}:{self.port}: {err.strerror or err}") from err
        self.port = self.httpd.port
        log.info("metrics on http://%s:%d/metrics", _url_host(self.host), self.port,
                 extra={"event": "metrics_listen", "host": self.host, "port": self.port})

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format the scraper accepts (text, or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def close(self) -> None:
        self.httpd.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
