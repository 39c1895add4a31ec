"""Scenario 1, fragmented heap (khugepaged's founding case).

A process with N GiB of anonymous memory faulted in as 4 KiB pages and pattern-filled: a
"heap" region of 15/16 N, every page written, and a "sparse" region of N/16 with every
other page written (collapsing it fills the holes with zeros: that is the RSS growth).
Both MADV_HUGEPAGE after filling. Time zero: the target has finished its set-up.
"""

from __future__ import annotations

import time

from kit.helpers import HPAGE, Workload

from .collapser import Collapser
from .contenders import Contender
from .context import Context
from .coverage import HugeProbe, rss_anon_kb, verify_into
from .machine import quiesce
from .timeline import Sample, sampler, samples_json, summarise, watch

GIB, MIB = 1 << 30, 1 << 20


def layout(gib: float) -> list[dict]:
    windows = max(16, int(gib * GIB // HPAGE))
    sparse = max(1, windows // 16)
    return [{"name": "heap", "windows": windows - sparse, "fill": "all", "hugepage": True},
            {"name": "sparse", "windows": sparse, "fill": "every:2", "hugepage": True}]


def run(ctx: Context, c: Contender) -> dict:
    col = Collapser(c, ctx)
    col.prepare()
    spec = layout(ctx.gib)
    window = ctx.p(30.0, 60.0) if c.bounded else ctx.p(240.0, 600.0)
    result: dict = {"contender": c.key, "label": c.label, "bounded": c.bounded,
                    "window_seconds": window if c.bounded else None, "layout": spec}
    with Workload(regions=spec, timeout=900) as w:
        ranges = [(r.start, r.end) for r in w.regions.values()]
        probe = HugeProbe(w.pid, ranges)
        try:
            # before the quiet wait: the kernel's khugepaged may collapse its first windows in
            # it (registration wakes an idle khugepaged)
            rss0 = rss_anon_kb(w.pid)
            result["quiesce"] = quiesce()
            h_start = probe.huge_bytes()
            t0 = time.monotonic()
            samples = [Sample(0.0, h_start, 0.0, 0.0)]
            col.start([w.pid], tick=sampler(col, probe, t0, samples))
            result["collapser_ready_seconds"] = time.monotonic() - t0
            poll = 0.25 if c.bounded else 0.05 if "tuned" in c.key else 0.1
            watch(col, probe, t0, t0 + window, poll, samples,
                  min_rises=4 if c.bounded else 0, hard_until=t0 + 2 * window)
            info = col.stop()
            rss1 = rss_anon_kb(w.pid)
            result["probe_huge_windows"] = probe.huge_bytes() // HPAGE
            verify_into(result, w, ranges)
        finally:
            probe.close()
            col.close()
    offset = ctx.hugepaged_startup_cpu if not c.is_kernel else (0.0, 0.0)
    result.update(summarise(samples, probe.total, c.bounded, h_start, cpu_offset=offset))
    result.update({
        "target_windows": probe.total // HPAGE, "target_mib": probe.total // MIB,
        "rss_anon_mib_before": rss0 / 1024, "rss_anon_mib_after": rss1 / 1024,
        "rss_growth_mib": (rss1 - rss0) / 1024, "collapser": info,
        "cpu_offset_startup": list(offset), "samples": samples_json(samples, probe.total),
    })
    return result
