"""Coverage and CPU over time: samples, times to coverage, projections, CPU per huge page."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kit.helpers import HPAGE

if TYPE_CHECKING:
    from .collapser import Collapser
    from .coverage import HugeProbe


@dataclass
class Sample:
    t: float  # seconds since the scenario's time zero
    huge: int  # bytes PMD-mapped
    cpu: float  # collapser CPU (stat), seconds since start
    cpu_ns: float  # collapser CPU (schedstat), seconds since start

def sampler(col: Collapser, probe: HugeProbe, t0: float, samples: list[Sample]):
    """A tick for Collapser.start: samples coverage while hugepaged starts up."""
    def tick() -> None:
        c, n = col.cpu() if col.daemon is not None and col.daemon.proc is not None \
            else (0.0, 0.0)
        samples.append(Sample(time.monotonic() - t0, probe.huge_bytes(), c, n))
    return tick


def watch(col: Collapser, probe: HugeProbe, t0: float, until: float, poll: float,
          samples: list[Sample] | None = None, stop_full: bool = True,
          tick=None, min_rises: int = 0, hard_until: float | None = None) -> list[Sample]:
    """Poll coverage and CPU until the target is fully covered or `until` (monotonic).

    With min_rises, a window that has seen fewer rises of coverage than that (the kernel's
    defaults: one every 10 s) goes on until it has, or until hard_until: a projection needs
    at least two intervals between rises."""
    samples = [] if samples is None else samples
    rises = sum(1 for a, b in zip(samples, samples[1:], strict=False) if b.huge > a.huge)
    while True:
        now = time.monotonic()
        h = probe.huge_bytes()
        c, n = col.cpu()
        if samples and h > samples[-1].huge:
            rises += 1
        samples.append(Sample(now - t0, h, c, n))
        if tick is not None:
            tick(now)
        if stop_full and h >= probe.total:
            return samples
        if now >= until and (rises >= min_rises or now >= (hard_until or until)):
            return samples
        if not col.alive():
            raise RuntimeError("the collapser died: " + col.log_tail())
        time.sleep(max(0.0, poll - (time.monotonic() - now)))


def time_to(samples: list[Sample], level: float) -> float | None:
    """First time huge >= level (bytes), interpolated between the two samples around it."""
    prev = None
    for s in samples:
        if s.huge >= level:
            if prev is None or s.huge == prev.huge:
                return s.t
            f = (level - prev.huge) / (s.huge - prev.huge)
            return prev.t + f * (s.t - prev.t)
        prev = s
    return None


def value_at(samples: list[Sample], t: float, attr: str) -> float:
    xs = [s.t for s in samples]
    ys = [getattr(s, attr) for s in samples]
    return float(np.interp(t, xs, ys))


def projection(samples: list[Sample], total: int) -> dict | None:
    """Rate from the collapse steps seen in the window: (h_last - h_first) / (t_last - t_first)
    over the times coverage rose; the remaining coverage is extrapolated at that rate."""
    rises = [(b.t, b.huge) for a, b in zip(samples, samples[1:], strict=False)
             if b.huge > a.huge]
    if not rises:
        return None
    (t1, h1), (tk, hk) = rises[0], rises[-1]
    if len(rises) < 2 or tk <= t1:
        return None  # one step says nothing about the pace
    rate = (hk - h1) / (tk - t1)
    return {"rate_bytes_per_s": rate, "t_last": tk, "h_last": hk,
            "method": "coverage rises in the window: (last - first) / (t_last - t_first)"}


def coverage_times(samples: list[Sample], total: int, bounded: bool,
                   levels=(0.5, 0.9, 0.99, 1.0)) -> dict:
    """{"50": {"seconds": x, "projected": bool} | None, ...}"""
    proj = projection(samples, total) if bounded else None
    out = {}
    for lv in levels:
        key = f"{round(lv * 100):d}"
        t = time_to(samples, lv * total)
        if t is not None:
            out[key] = {"seconds": t, "projected": False}
        elif proj is not None and proj["rate_bytes_per_s"] > 0:
            t = proj["t_last"] + (lv * total - proj["h_last"]) / proj["rate_bytes_per_s"]
            out[key] = {"seconds": t, "projected": True}
        else:
            out[key] = {"seconds": None, "projected": False,
                        "not_reached_within": samples[-1].t if samples else 0.0}
    return out


def summarise(samples: list[Sample], total: int, bounded: bool, h_start: int,
              cpu_offset: tuple[float, float] = (0.0, 0.0), t_from: float = 0.0) -> dict:
    """Coverage times, CPU until full coverage (or the window's end), CPU per huge page.

    Times count from the samples' zero. CPU counts from start() (or from t_from when given)
    and huge pages from h_start, the coverage when the CPU count began. cpu_offset
    (stat, schedstat) is subtracted: hugepaged's start-up, measured apart."""
    times = coverage_times(samples, total, bounded)
    t_full = times["100"]["seconds"] if not times["100"].get("projected") else None
    end = t_full if t_full is not None else samples[-1].t
    if t_from > 0:
        h_start = int(value_at(samples, t_from, "huge"))
    cpu0 = value_at(samples, t_from, "cpu") if t_from > 0 else 0.0
    ns0 = value_at(samples, t_from, "cpu_ns") if t_from > 0 else 0.0
    cpu = max(0.0, value_at(samples, end, "cpu") - cpu0 - cpu_offset[0])
    cpu_ns = max(0.0, value_at(samples, end, "cpu_ns") - ns0 - cpu_offset[1])
    huge_end = value_at(samples, end, "huge")
    collapsed = round((huge_end - h_start) / HPAGE)
    out = {
        "times": times, "measured_seconds": samples[-1].t if samples else 0.0,
        "end_seconds": end, "covered_pct": 100.0 * samples[-1].huge / total if total else 0.0,
        "covered_pct_at_start": 100.0 * h_start / total if total else 0.0,
        "collapsed_windows": collapsed, "cpu_seconds": cpu, "cpu_seconds_schedstat": cpu_ns,
        "cpu_ms_per_hpage": 1000 * cpu_ns / collapsed if collapsed > 0 else None,
        "cpu_ms_per_hpage_stat": 1000 * cpu / collapsed if collapsed > 0 else None,
    }
    if bounded and times["100"].get("projected") and collapsed > 0:
        windows_left = (total - huge_end) / HPAGE
        out["cpu_seconds_projected_total"] = cpu_ns + windows_left * cpu_ns / collapsed
    return out


def samples_json(samples: list[Sample], total: int) -> list[list[float]]:
    return [[round(s.t, 3), round(100.0 * s.huge / total, 3), round(s.cpu, 3),
             round(s.cpu_ns, 4)] for s in samples]
