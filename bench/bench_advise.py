#!/usr/bin/env python3
"""A new process's huge pages: MADV_HUGEPAGE to coverage, hugepaged against the kernel (issue 10).

Usage: python bench/bench_advise.py [--rounds 3] [--gib 1] [--name NAME] [--quick]

Every workload faults its memory as 4 KiB pages without MADV_HUGEPAGE, waits, and then calls
MADV_HUGEPAGE (time zero). The kernel's khugepaged registers the mm inside that call; hugepaged
(`run --pid`, registered before the advice and settled) learns of it from the syscall
tracepoints. Contenders alternate A/B/A/B within each round, on fresh workloads every time:
  (a) one GiB-sized process, both tuned for speed (pages_to_scan=65536, scan_sleep_millisecs=0;
      hugepaged also max_cpu_percent=0): time to 99% huge pages, collapser CPU per huge page
  (b) four half-size processes advised at the same moment, both tuned: time until all four
      are at 99% (hugepaged with collapse_workers=1 and, where it has them, 2)
  (c) one process at both collapsers' defaults: time to 99% (the kernel's measured over a
      bounded window and projected, as compare.py does), hugepaged's CPU in % of a core
  (d) from (a): latency from MADV_HUGEPAGE to the first collapsed window
While hugepaged is measured the kernel is at enabled=never (its thread stopped, nothing
registered); hugepaged gets enabled=madvise. Coverage is read with PAGEMAP_SCAN (PAGE_IS_HUGE)
and cross-checked at the end of each run with kit/helpers.pmd_mapped_windows; contents are
verified. Every kernel knob is saved and restored under the machine lock.
Writes bench/results/NAME.md and NAME.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios  # noqa: E402, F401  (puts the repository's root on sys.path, for `kit`)
from scenarios.collapser import Collapser  # noqa: E402
from scenarios.contenders import FAST, KERNEL_DEFAULTS, Contender  # noqa: E402
from scenarios.context import make_context  # noqa: E402
from scenarios.coverage import HugeProbe, independent_huge_windows  # noqa: E402
from scenarios.machine import machine, quiesce  # noqa: E402

from kit import helpers as H  # noqa: E402

GIB = 1 << 30
HPAGE = H.HPAGE
RESULTS = Path(__file__).resolve().parent / "results"
KT = Contender("kernel-tuned", "kernel khugepaged, 65536 pages / 0 ms", "kernel", dict(FAST))
HT = Contender("hugepaged-tuned", "hugepaged, 65536 pages / 0 ms / no cap", "hugepaged",
               {**FAST, "max_cpu_percent": 0})
HT2 = Contender("hugepaged-tuned-w2", "hugepaged tuned, 2 collapse workers", "hugepaged",
                {**FAST, "max_cpu_percent": 0, "collapse_workers": 2})
KD = Contender("kernel-defaults", "kernel khugepaged, defaults", "kernel",
               {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000}, bounded=True)
HD = Contender("hugepaged-defaults", "hugepaged, defaults", "hugepaged", {})


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def has_workers() -> bool:
    from hugepaged.tunables import SPECS

    return "collapse_workers" in SPECS


def one_run(ctx, c: Contender, procs: int, gib: float, window: float) -> dict:
    """`procs` workloads of `gib` each, advised at t0; coverage until all are >= 99% or
    `window` seconds (a bounded contender is projected from what it did by then)."""
    col = Collapser(c, ctx)
    col.prepare()
    windows = max(16, int(gib * GIB // HPAGE))
    spec = [{"name": "heap", "windows": windows, "fill": "all"}]
    works = [H.Workload(regions=spec, timeout=900).start() for _ in range(procs)]
    out: dict = {"contender": c.key, "procs": procs, "windows_each": windows}
    probes, firsts = [], []
    try:
        for w in works:
            r = w.regions["heap"]
            probes.append(HugeProbe(w.pid, [(r.start, r.end)]))
            firsts.append(HugeProbe(w.pid, [(r.start, r.start + HPAGE)]))
        col.start([w.pid for w in works])
        if not c.is_kernel:  # registered, scanned, found nothing (no MADV_HUGEPAGE): settled
            deadline = time.monotonic() + 30
            while not all(p.get("settled_seconds", 0) > 0
                          for p in col.daemon.status()["processes"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("hugepaged did not settle: " + col.log_tail())
                time.sleep(0.1)
        out["quiesce"] = quiesce(min_wait=2.0, max_wait=10.0)
        cpu0 = col.cpu()[1]
        t0 = time.monotonic()
        for w in works:
            w.command("hugepage heap")
        t_adv = time.monotonic() - t0
        first = [None] * procs
        done = [None] * procs
        samples = []
        total = windows * HPAGE
        while time.monotonic() - t0 < window and not all(done):
            now = time.monotonic() - t0
            for i, (p, f) in enumerate(zip(probes, firsts, strict=True)):
                if first[i] is None and f.huge_bytes():
                    first[i] = now
                if done[i] is None and first[i] is not None:
                    h = p.huge_bytes()
                    if h >= 0.99 * total:
                        done[i] = now
            if c.bounded:
                samples.append((now, sum(p.huge_bytes() for p in probes), col.cpu()[1] - cpu0))
            time.sleep(0.002 if not all(first) else 0.02)
        elapsed = time.monotonic() - t0
        cpu = col.cpu()[1] - cpu0
        huge = sum(p.huge_bytes() for p in probes)
        out.update({"advise_seconds": t_adv, "first_collapse_seconds": first,
                    "t99_each": done, "elapsed": elapsed, "cpu_seconds": cpu,
                    "huge_windows": huge // HPAGE})
        out["t99_all"] = max(done) if all(done) else None
        if out["t99_all"] is None and c.bounded and samples:
            rate = (samples[-1][1] - samples[0][1]) / max(samples[-1][0] - samples[0][0], 1e-9)
            left = 0.99 * total * procs - samples[-1][1]
            out["t99_all_projected"] = samples[-1][0] + left / rate if rate > 0 else None
            out["cpu_pct_core"] = 100.0 * samples[-1][2] / samples[-1][0]
        else:
            out["cpu_pct_core"] = 100.0 * cpu / max(elapsed, 1e-9)
        out["cpu_ms_per_hpage"] = 1000.0 * cpu / max(huge // HPAGE, 1)
        col.stop()
        out["independent_huge_windows"] = sum(
            independent_huge_windows(w.pid, [(w.regions["heap"].start, w.regions["heap"].end)])
            for w in works)
        for w in works:
            w.verify()
        out["verified"] = True
        if col.info.get("daemon_status"):
            out["daemon_counters"] = col.info["daemon_status"]["counters"]
    finally:
        for p in probes + firsts:
            p.close()
        for w in works:
            w.close()
        if col.daemon is not None and col.daemon.alive():
            col.daemon.close()
        for k, v in KERNEL_DEFAULTS.items():
            H.write_knob(k, v)
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def projected(r: dict) -> float | None:
    """A run that did not reach 99% in its window: the time to 99% at the pace it kept from
    its first collapse to the window's end (one process: scenario c)."""
    if r.get("t99_all") is not None:
        return r["t99_all"]
    if r.get("t99_all_projected") is not None:
        return r["t99_all_projected"]
    first = r["first_collapse_seconds"][0] if r["procs"] == 1 else None
    if first is None or not r["huge_windows"]:
        return None
    rate = r["huge_windows"] / max(r["elapsed"] - first, 1e-9)
    return first + 0.99 * r["windows_each"] / rate


def summary(doc: dict) -> dict:
    s: dict = {}
    for scen, runs in doc["runs"].items():
        for key, rs in runs.items():
            t99 = [projected(r) for r in rs]
            firsts = [x for r in rs for x in r["first_collapse_seconds"] if x is not None]
            s.setdefault(scen, {})[key] = {
                "t99_median": med(t99), "t99_all": t99,
                "cpu_ms_per_hpage_median": med([r["cpu_ms_per_hpage"] for r in rs]),
                "cpu_pct_core_median": med([r["cpu_pct_core"] for r in rs]),
                "first_collapse_median": med(firsts),
                "first_collapse_max": max(firsts) if firsts else None,
                "projected": any(r.get("t99_all") is None for r in rs)}
    return s


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"# MADV_HUGEPAGE to huge pages: hugepaged and the kernel ({doc['name']})", "",
             f"`{doc['command']}` — {doc['machine']['cpu_model']}, {doc['machine']['cpus']} CPUs, "
             f"Linux {doc['machine']['kernel']}; {doc['rounds']} rounds, contenders "
             "interleaved in each, fresh workloads every run; medians.", ""]
    lines += ["| scenario | contender | time to 99% (median) | runs | CPU ms / huge page | "
              "% of a core | first collapse median / max |", "|---|---|---|---|---|---|---|"]

    def f(x, nd=2):
        return "—" if x is None else f"{x:.{nd}f}"
    for scen, by in s.items():
        for key, v in by.items():
            runs = ", ".join(f(x) for x in v["t99_all"])
            lines.append(f"| {scen} | {key} | {f(v['t99_median'])} s"
                         f"{' (projected)' if v['projected'] else ''} | {runs} | "
                         f"{f(v['cpu_ms_per_hpage_median'])} | "
                         f"{f(v['cpu_pct_core_median'], 1)} | "
                         f"{f(v['first_collapse_median'], 3)} / "
                         f"{f(v['first_collapse_max'], 3)} s |")
    lines += ["", "## Goals", ""]
    for g in doc["goals"]:
        lines.append(f"- {g}")
    return "\n".join(lines) + "\n"


def goals(s: dict) -> list[str]:
    out = []
    a = s.get("a", {})
    if "kernel-tuned" in a and "hugepaged-tuned" in a:
        k, h = a["kernel-tuned"], a["hugepaged-tuned"]
        rt = ratio(h["t99_median"], k["t99_median"])
        rc = ratio(h["cpu_ms_per_hpage_median"], k["cpu_ms_per_hpage_median"])
        out.append(f"(a) 1 process, time to 99%: {f2(rt)}x the kernel's (goal <= 1.0: "
                   f"{met(rt, 1.0)}); CPU per huge page {f2(rc)}x (goal <= 0.9: {met(rc, 0.9)})")
        out.append(f"(d) MADV_HUGEPAGE to first collapse: hugepaged median "
                   f"{f3(h['first_collapse_median'])} s, max {f3(h['first_collapse_max'])} s; "
                   f"kernel median {f3(k['first_collapse_median'])} s, "
                   f"max {f3(k['first_collapse_max'])} s")
    b = s.get("b", {})
    if "kernel-tuned" in b:
        for key in ("hugepaged-tuned", "hugepaged-tuned-w2"):
            if key in b:
                r = ratio(b[key]["t99_median"], b["kernel-tuned"]["t99_median"])
                out.append(f"(b) 4 processes, all at 99%: {key} {f2(r)}x the kernel's "
                           f"(goal <= 0.6: {met(r, 0.6)})")
    c = s.get("c", {})
    if "kernel-defaults" in c and "hugepaged-defaults" in c:
        r = ratio(c["kernel-defaults"]["t99_median"], c["hugepaged-defaults"]["t99_median"])
        pct = c["hugepaged-defaults"]["cpu_pct_core_median"]
        out.append(f"(c) defaults: hugepaged {f2(r)}x sooner (goal >= 30: "
                   f"{'met' if r is not None and r >= 30 else 'missed'}) at {f2(pct)}% of a "
                   f"core (goal <= 5: {met(pct, 5.0)})")
    return out


def f2(x):
    return "—" if x is None else f"{x:.2f}"


def f3(x):
    return "—" if x is None else f"{x:.3f}"


def met(x, limit):
    return "—" if x is None else ("met" if x <= limit else "missed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--quick", action="store_true", help="one round, 256 MiB, short windows")
    ap.add_argument("--scenarios", default="abc")
    ap.add_argument("--summarise", metavar="JSON", help="write the summary of a saved run again")
    args = ap.parse_args(argv)
    if args.summarise:
        doc = json.loads(Path(args.summarise).read_text())
        doc["summary"] = summary(doc)
        doc["goals"] = goals(doc["summary"])
        Path(args.summarise).write_text(json.dumps(doc, indent=1, default=str))
        Path(args.summarise).with_suffix(".md").write_text(markdown(doc))
        print(markdown(doc))
        return 0
    gib = 0.25 if args.quick else args.gib
    rounds = 1 if args.quick else args.rounds
    ctx = make_context(args.quick, gib, log)
    name = args.name or time.strftime("%Y-%m-%d") + "-advise" + ("-quick" if args.quick else "")
    workers = has_workers()
    plan = []
    if "a" in args.scenarios:
        plan.append(("a", 1, gib, 60.0, [KT, HT]))
    if "b" in args.scenarios:
        plan.append(("b", 4, gib / 2, 60.0, [KT, HT] + ([HT2] if workers else [])))
    if "c" in args.scenarios:
        plan.append(("c", 1, gib, 30.0 if args.quick else 60.0, [KD, HD]))
    doc = {"name": name, "command": "python bench/bench_advise.py " + " ".join(sys.argv[1:]),
           "rounds": rounds, "gib": gib, "machine": machine(), "runs": {}, "workers": workers}
    log(f"waiting for the machine lock; results: bench/results/{name}.*")
    saved_names = ["enabled", *KERNEL_DEFAULTS]
    with H.machine_lock(), H.saved_thp(**{k: H.read_knob(k) for k in saved_names}):
        for rnd in range(rounds):
            for scen, procs, size, window, contenders in plan:
                order = contenders if rnd % 2 == 0 else list(reversed(contenders))
                for c in order:
                    log(f"round {rnd + 1} ({scen}) {c.key}")
                    r = one_run(ctx, c, procs, size, window)
                    log(f"  t99 {r.get('t99_all') or r.get('t99_all_projected')} s, "
                        f"cpu {r['cpu_ms_per_hpage']:.2f} ms/hp, first "
                        f"{r['first_collapse_seconds']}")
                    doc["runs"].setdefault(scen, {}).setdefault(c.key, []).append(r)
    doc["summary"] = summary(doc)
    doc["goals"] = goals(doc["summary"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
