"""Scenario 2, huge pages come back (khugepaged's founding case: a VM quits and frees its memory).

Per contender, on a fresh copy of the same layout:
1. kernel at enabled=madvise; filler.py fragments physical memory: one pinned 4 KiB page in
   every 2 MiB block it can reach and the remaining free 2 MiB blocks held as pinned THPs, so
   that /proc/buddyinfo shows no usable free block of order >= 9 (both checked and recorded);
2. for hugepaged the kernel goes to enabled=never now; the target (N/4 GiB, 4 KiB pages,
   pattern-filled, MADV_HUGEPAGE) faults its memory in from the fragments;
3. the contender starts. Fragmented phase: until the contender's first failed huge page
   allocation (kernel: /proc/vmstat thp_collapse_alloc_failed; hugepaged: its alloc_backoffs
   counter), then a hold of 30 s (--quick: 20 s) more -- 30 s is the middle of the kernel's
   alloc_sleep_millisecs=60000 back-off and so its expected remaining wait for a filler that
   exits at a random moment;
4. the filler exits (time zero: its process is gone, its memory freed); coverage is then
   timed from that moment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from kit.helpers import HPAGE, Workload

from .collapser import Collapser
from .contenders import Contender
from .context import Context
from .coverage import HugeProbe, rss_anon_kb, verify_into
from .knobs import buddyinfo, free_huge_blocks, write_knob
from .machine import quiesce
from .timeline import Sample, samples_json, summarise, watch

GIB, MIB = 1 << 30, 1 << 20

FILLER = Path(__file__).resolve().parent / "filler.py"
FIRST_FAILURE_MAX = 45.0


def describe(ctx: Context) -> dict:
    return {"target_gib": target_gib(ctx), "fragmented_hold_seconds": hold(ctx),
            "filler_headroom_mib": 3072}


def target_gib(ctx: Context) -> float:
    return max(0.0625, ctx.gib / 4)


def hold(ctx: Context) -> float:
    return ctx.p(20.0, 30.0)


class Filler:
    def __init__(self, headroom_mib: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(FILLER),
                                      json.dumps({"headroom_mib": headroom_mib})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ready(self, timeout: float = 180.0) -> dict:
        import select
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else b""
        if not line:
            self.kill()
            raise RuntimeError(f"filler failed (exit status {self.proc.poll()})")
        return json.loads(line)

    def exit(self) -> float:
        """Ask it to exit; returns the monotonic time its process was reaped."""
        self.proc.stdin.write(b"exit\n")
        self.proc.stdin.flush()
        self.proc.wait(30)
        return time.monotonic()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run(ctx: Context, c: Contender) -> dict:
    col = Collapser(c, ctx)
    col.prepare()
    write_knob("enabled", "madvise")  # the filler takes the last free blocks as THPs
    windows = int(target_gib(ctx) * GIB // HPAGE)
    spec = [{"name": "heap", "windows": windows, "fill": "all", "hugepage": True}]
    window_after = ctx.p(50.0, 60.0) if c.bounded else ctx.p(240.0, 600.0)
    result: dict = {"contender": c.key, "label": c.label, "bounded": c.bounded,
                    "layout": spec, "fragmented_hold_seconds": hold(ctx)}
    quiesce()
    filler = Filler(3072)
    try:
        finfo = filler.ready()
        result["filler"] = {k: v for k, v in finfo.items() if k != "pagetypeinfo"}
        result["filler_pagetypeinfo"] = finfo.get("pagetypeinfo")
        if not c.is_kernel:
            write_knob("enabled", "never")
        with Workload(regions=spec, timeout=900) as w:
            ranges = [(r.start, r.end) for r in w.regions.values()]
            probe = HugeProbe(w.pid, ranges)
            try:
                result["buddyinfo_target_ready"] = buddyinfo()
                result["free_huge_blocks_target_ready"] = free_huge_blocks()
                result["free_huge_blocks_target_ready_incl_dma"] = free_huge_blocks(
                    usable_only=False)
                rss0 = rss_anon_kb(w.pid)
                t_target = time.monotonic()
                col.start([w.pid])
                samples: list[Sample] = []
                first_fail: list[float] = []

                def tick(now: float) -> None:
                    if not first_fail and col.alloc_failures() > 0:
                        first_fail.append(now)

                # fragmented phase, part 1: until the first allocation failure
                poll = 0.25
                deadline = t_target + FIRST_FAILURE_MAX
                while not first_fail and time.monotonic() < deadline:
                    watch(col, probe, t_target, time.monotonic(), poll, samples,
                          stop_full=False, tick=tick)
                    time.sleep(poll)
                t_fail = first_fail[0] if first_fail else time.monotonic()
                result["first_alloc_failure_seconds"] = (t_fail - t_target if first_fail
                                                         else None)
                # part 2: FRAGMENTED_HOLD more seconds
                watch(col, probe, t_target, t_fail + hold(ctx), poll, samples,
                      stop_full=False)
                result["free_huge_blocks_before_exit"] = free_huge_blocks()
                result["buddyinfo_before_exit"] = buddyinfo()
                result["failures_before_exit"] = col.alloc_failures()
                h_exit = probe.huge_bytes()
                cpu_exit = col.cpu()
                t_exit = filler.exit()
                result["filler_exit_seconds_after_target"] = t_exit - t_target
                result["free_huge_blocks_after_exit"] = free_huge_blocks()
                result["buddyinfo_after_exit"] = buddyinfo()
                # from the filler's exit: time zero of this scenario's figures
                pre = [Sample(s.t - (t_exit - t_target), s.huge, s.cpu, s.cpu_ns)
                       for s in samples]
                post: list[Sample] = [Sample(0.0, h_exit, *cpu_exit)]
                fast = "tuned" in c.key
                watch(col, probe, t_exit, t_exit + window_after, 0.05 if fast else 0.1, post,
                      min_rises=3 if c.bounded else 0, hard_until=t_exit + 1.6 * window_after)
                post = [Sample(s.t, s.huge, s.cpu - cpu_exit[0], s.cpu_ns - cpu_exit[1])
                        for s in post]  # CPU from the filler's exit on
                info = col.stop()
                rss1 = rss_anon_kb(w.pid)
                verify_into(result, w, ranges)
            finally:
                probe.close()
                col.close()
    finally:
        filler.kill()
    offset = ctx.hugepaged_startup_cpu if not c.is_kernel else (0.0, 0.0)
    pre_cpu = pre[-1].cpu_ns if pre else 0.0
    result.update(summarise(post, probe.total, c.bounded, h_exit))
    result.update({
        "target_windows": probe.total // HPAGE, "target_mib": probe.total // MIB,
        "covered_pct_before_exit": 100.0 * h_exit / probe.total,
        "cpu_seconds_fragmented_phase": max(0.0, pre_cpu - offset[1]),
        "rss_anon_mib_before": rss0 / 1024, "rss_anon_mib_after": rss1 / 1024,
        "rss_growth_mib": (rss1 - rss0) / 1024, "collapser": info,
        "samples_before_exit": samples_json(pre, probe.total),
        "samples": samples_json(post, probe.total),
    })
    return result
