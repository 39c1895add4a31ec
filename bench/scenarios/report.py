"""bench/results/NAME.{json,md,png} from the run's document."""

from __future__ import annotations

import json
from pathlib import Path

ORDER = ("kernel-defaults", "kernel-tuned", "hugepaged-defaults", "hugepaged-tuned")
COLORS = {"kernel-defaults": "#1f77b4", "kernel-tuned": "#17becf",
          "hugepaged-defaults": "#d62728", "hugepaged-tuned": "#ff7f0e"}
SHORT = {"kernel-defaults": "kernel, defaults", "kernel-tuned": "kernel, tuned",
         "hugepaged-defaults": "hugepaged, defaults", "hugepaged-tuned": "hugepaged, tuned"}


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_s(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:,.0f} s"
    if x >= 10:
        return f"{x:.1f} s"
    return f"{x:.2f} s"


def fmt_t(entry: dict | None) -> str:
    if not entry:
        return "–"
    if entry.get("seconds") is None:
        nr = entry.get("not_reached_within")
        return f"not in {nr:.0f} s" if nr is not None else "–"
    s = fmt_s(entry["seconds"])
    return f"≈{s} (proj.)" if entry.get("projected") else s


def fmt_f(x, nd=2, unit="") -> str:
    return "–" if x is None else f"{x:.{nd}f}{unit}"


def runs(doc: dict, key: str) -> list[tuple[str, dict]]:
    r = doc.get("scenarios", {}).get(key, {}).get("runs", {})
    return [(k, r[k]) for k in ORDER if k in r]


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def one_line(key: str, r: dict) -> str:
    t = r.get("times", {})
    extra = ""
    if key == "tlb":
        extra = (f" reads/s {fmt_f((r.get('reads_per_s_before') or 0) / 1e6, 1)}M → "
                 f"{fmt_f((r.get('reads_per_s_huge') or 0) / 1e6, 1)}M, "
                 f"t95 {fmt_t(r.get('t95_throughput'))}")
    if key == "comeback":
        extra = f" (after filler exit; {r.get('covered_pct_before_exit', 0):.1f}% before)"
    return (f"t50 {fmt_t(t.get('50'))}, t90 {fmt_t(t.get('90'))}, t99 {fmt_t(t.get('99'))}; "
            f"CPU {fmt_f(r.get('cpu_seconds_schedstat'))} s, "
            f"{fmt_f(r.get('cpu_ms_per_hpage'))} ms/huge page; "
            f"RSS +{fmt_f(r.get('rss_growth_mib', 0), 0)} MiB; verified {r.get('verified')}"
            + extra)


# ---------------------------------------------------------------------------------------------
# sections


def sec_heap(doc: dict) -> str:
    rr = runs(doc, "heap")
    if not rr:
        return ""
    r0 = rr[0][1]
    lay = ", ".join(f"{x['name']} {x['windows'] * 2} MiB fill={x['fill']}" for x in r0["layout"])
    rows = []
    for k, r in rr:
        rows.append([SHORT[k], fmt_t(r["times"]["50"]), fmt_t(r["times"]["90"]),
                     fmt_t(r["times"]["99"]), fmt_f(r["cpu_seconds"]),
                     fmt_f(r["cpu_seconds_schedstat"], 3), fmt_f(r["cpu_ms_per_hpage"]),
                     fmt_f(in_collapse_ms(r)), str(r["collapsed_windows"]),
                     fmt_f(r["rss_growth_mib"], 0), "yes" if r.get("verified") else "**NO**"])
    kd = dict(rr).get("kernel-defaults")
    note = ""
    if kd and kd.get("bounded"):
        note = (f"\nkernel, defaults: measured for {kd['measured_seconds']:.0f} s "
                f"({kd['collapsed_windows']} huge pages, {kd['covered_pct']:.1f}%), the rest "
                "projected at the rate seen in that window (marked proj.); its CPU per huge page "
                "is from the window.")
    return (f"## 1. Fragmented heap\n\nTarget: {r0['target_mib']} MiB ({r0['target_windows']} "
            f"windows: {lay}), 4 KiB pages, MADV_HUGEPAGE. Time zero: target ready.\n\n"
            + table(["contender", "50%", "90%", "99%", "CPU s (stat)", "CPU s (schedstat)",
                     "CPU ms / huge page", "of which in MADV_COLLAPSE", "huge pages",
                     "RSS growth MiB", "contents"], rows)
            + "\n" + note + " 'of which in MADV_COLLAPSE': hugepaged's own count of the CPU "
            "its process_madvise calls took (collapse_cpu_seconds / pages_collapsed); the rest "
            "of its CPU is scanning.\n")


def in_collapse_ms(r: dict) -> float | None:
    c = ((r.get("collapser") or {}).get("daemon_status") or {}).get("counters") or {}
    if not c.get("pages_collapsed"):
        return None
    return 1000 * c["collapse_cpu_seconds"] / c["pages_collapsed"]


def sec_comeback(doc: dict) -> str:
    rr = runs(doc, "comeback")
    if not rr:
        return ""
    r0 = rr[0][1]
    rows = []
    for k, r in rr:
        rows.append([SHORT[k], f"{r['covered_pct_before_exit']:.1f}%",
                     str(r.get("failures_before_exit")),
                     fmt_f(r.get("cpu_seconds_fragmented_phase"), 3),
                     fmt_t(r["times"]["50"]), fmt_t(r["times"]["90"]), fmt_t(r["times"]["99"]),
                     fmt_f(r["cpu_seconds_schedstat"], 3), fmt_f(r["cpu_ms_per_hpage"]),
                     "yes" if r.get("verified") else "**NO**"])
    fb = [(SHORT[k], r["filler"].get("free_huge_blocks_after"),
           r.get("free_huge_blocks_target_ready"), r.get("free_huge_blocks_before_exit"),
           r.get("free_huge_blocks_after_exit")) for k, r in rr]
    frows = [[n, str(a), str(b), str(c), str(d)] for n, a, b, c, d in fb]
    f = r0["filler"]
    return (f"## 2. Huge pages come back\n\nTarget: {r0['target_mib']} MiB of 4 KiB pages "
            f"faulted in while a filler held one pinned 4 KiB page in every 2 MiB block "
            f"({f['blocks_pinned_4k']} blocks, after filling {f['filled_mib']} MiB) and the "
            f"remaining free blocks as {f['thp_taken']} pinned THPs. The filler exits "
            f"{r0['fragmented_hold_seconds']:.0f} s after the contender's first failed huge "
            "page allocation; times count from its exit.\n\n"
            + table(["contender", "covered before exit", "alloc failures before exit",
                     "CPU s while fragmented", "50%", "90%", "99%", "CPU s after exit",
                     "CPU ms / huge page", "contents"], rows)
            + "\n\nFree blocks of order ≥ 9 outside ZONE_DMA (/proc/buddyinfo, in 2 MiB units):\n\n"
            + table(["contender", "filler ready", "target ready", "before exit",
                     "just after exit"], frows)
            + "\n\nThe blocks still listed while the filler lived are in ZONE_DMA32, and no THP "
            "could be had from them: the filler's own THP faults fell back to 4 KiB "
            f"{f.get('thp_fallbacks')} times in a row while they were listed (a zone "
            "watermark / lowmem reserve matter); ZONE_DMA is left out (lowmem_reserve keeps "
            "user pages out of it). hugepaged's back-off check counts both, so it ends its "
            "back-off at its next /proc/buddyinfo poll (1 s) and retries: hence its failures "
            "and CPU while fragmented.\n")


def sec_tlb(doc: dict) -> str:
    rr = runs(doc, "tlb")
    if not rr:
        return ""
    r0 = rr[0][1]
    rows = []
    for k, r in rr:
        def m(x, r=r):
            return fmt_f(r.get(x) / 1e6 if r.get(x) else None, 1)
        rows.append([SHORT[k], m("reads_per_s_before"), m("reads_per_s_min_during"),
                     m("reads_per_s_after"), m("reads_per_s_huge"),
                     fmt_f(r.get("speedup_huge_over_before"), 2, "×"),
                     fmt_t(r.get("t95_throughput")), fmt_t(r["times"]["99"]),
                     fmt_f(r["cpu_seconds_schedstat"], 3),
                     "yes" if r.get("verified") else "**NO**"])
    return (f"## 3. Does it pay\n\nRandom 8-byte reads (numpy gather, 1 Mi per round) over "
            f"{r0['target_mib']} MiB, reported each second (M reads/s, medians). 'before': 4 KiB "
            "pages; 'lowest second': while the contender collapsed; 'after': once it had "
            "finished, still running (kernel defaults: the window's last seconds); 'huge': "
            "fully collapsed (the rest by the benchmark) with the contender stopped. Time to "
            "95%: from MADV_HUGEPAGE until the first second from which a 3-second mean reaches "
            "95% of 'huge' while the contender runs (kernel defaults: projected with "
            "1/r = c/huge + (1-c)/before on its projected coverage).\n\n"
            + table(["contender", "before", "lowest second", "after", "huge", "gain",
                     "time to 95% throughput", "99% coverage", "CPU s", "contents"], rows) + "\n")


def sec_watch(doc: dict) -> str:
    w = doc.get("scenarios", {}).get("watch")
    if not w:
        return ""
    out = ["## 4. Cost of watching\n"]
    sc = w.get("scan", {})
    rows = [[label, fmt_f(c["gib"], 2), fmt_f(c["median_cpu_seconds"] * 1e3, 1),
             fmt_f(c["gib_per_cpu_second"], 0)]
            for label, c in sc.get("cases", {}).items() if isinstance(c, dict) and "gib" in c]
    if rows:
        out.append("hugepaged's decision (scan_process: smaps + PAGEMAP_SCAN/pagemap + "
                   f"kpageflags + checks), median of {sc['repeat']} scans:\n")
        out.append(table(["memory", "GiB", "CPU ms per scan", "GiB per CPU-second"], rows))
    idle = w.get("idle")
    if idle:
        out.append(f"\n`hugepaged run` at its defaults watching {idle.get('processes')} idle "
                   "processes (2 MiB of MADV_HUGEPAGE memory each, already collapsed), "
                   f"measured for {idle.get('measured_seconds')} s once all were settled "
                   f"({idle.get('seconds_to_settle')} s after start): "
                   f"**{fmt_f(idle.get('cpu_percent'), 3)}% of one core** "
                   f"(second half: {fmt_f(idle.get('cpu_percent_second_half'), 3)}%; "
                   f"{idle.get('passes')} passes). Source: {idle.get('source')}.")
    return "\n".join(out) + "\n"


def goals(doc: dict) -> list[list[str]]:
    rows = []
    h = dict(runs(doc, "heap"))

    def ratio(a, b):
        return a / b if a is not None and b else None

    for hk, kk in (("hugepaged-defaults", "kernel-defaults"), ("hugepaged-tuned", "kernel-tuned")):
        if hk in h and kk in h:
            x = ratio(h[hk]["cpu_ms_per_hpage"], h[kk]["cpu_ms_per_hpage"])
            rows.append([f"CPU per collapsed huge page ≤ 1.10× the kernel's (scenario 1, "
                         f"{SHORT[hk]} vs {SHORT[kk]})",
                         f"{fmt_f(h[hk]['cpu_ms_per_hpage'])} vs "
                         f"{fmt_f(h[kk]['cpu_ms_per_hpage'])} ms = {fmt_f(x)}×",
                         "met" if x is not None and x <= 1.10 else "**missed**"])
    if "hugepaged-defaults" in h and "kernel-defaults" in h:
        a = h["kernel-defaults"]["times"]["99"].get("seconds")
        b = h["hugepaged-defaults"]["times"]["99"].get("seconds")
        x = ratio(a, b)
        rows.append(["time to 99% coverage, hugepaged defaults ≥ 30× sooner than kernel "
                     "defaults (scenario 1)",
                     f"{fmt_t(h['kernel-defaults']['times']['99'])} / "
                     f"{fmt_t(h['hugepaged-defaults']['times']['99'])} = {fmt_f(x, 1)}×",
                     "met" if x is not None and x >= 30 else "**missed**"])
    c = dict(runs(doc, "comeback"))
    if "hugepaged-defaults" in c and "kernel-defaults" in c:
        a = c["kernel-defaults"]["times"]["99"].get("seconds")
        b = c["hugepaged-defaults"]["times"]["99"].get("seconds")
        x = ratio(a, b)
        rows.append(["scenario 2: hugepaged's time to (99%) coverage ≥ 10× shorter than "
                     "kernel defaults (hugepaged defaults)",
                     f"{fmt_t(c['kernel-defaults']['times']['99'])} / "
                     f"{fmt_t(c['hugepaged-defaults']['times']['99'])} = {fmt_f(x, 1)}×",
                     "met" if x is not None and x >= 10 else "**missed**"])
    w = doc.get("scenarios", {}).get("watch", {})
    idle = w.get("idle") or {}
    if idle.get("cpu_percent") is not None:
        x = idle.get("cpu_percent_second_half", idle["cpu_percent"])
        rows.append(["idle daemon, 500 processes ≤ 0.2% of one core (issue 3)",
                     f"{fmt_f(idle['cpu_percent'], 3)}% (second half {fmt_f(x, 3)}%)",
                     "met" if idle["cpu_percent"] <= 0.2 else "**missed**"])
    return rows


def markdown(doc: dict, name: str) -> str:
    m = doc.get("machine", {})
    head = [f"# hugepaged vs the kernel's khugepaged: {name}\n",
            f"Command: `{doc.get('command')}` — wall time {doc.get('wall_seconds')} s"
            + (f" — **interrupted: {doc['interrupted']}**" if doc.get("interrupted") else ""),
            "",
            table(["machine", ""], [
                ["date (UTC)", m.get("date_utc", "?")],
                ["uname", f"`{m.get('uname', '?')}`"],
                ["CPU", f"{m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs"],
                ["memory",
                 f"{m.get('mem_total_gib', '?')} GiB, swap {m.get('swap_total_gib')} GiB"],
                ["kernel", m.get("kernel", "?")],
                ["THP at start", f"enabled={m.get('thp_at_start', {}).get('enabled')}, "
                                 f"defrag={m.get('thp_at_start', {}).get('defrag')}"],
                ["software", f"Python {m.get('python')}, numpy {m.get('numpy')}, "
                             f"git {m.get('git_commit')}"
                             + (f" + uncommitted changes in {len(m['git_dirty_files'])} src "
                                f"files (src tree sha256 {m.get('src_sha256')})"
                                if m.get("git_dirty_files") else "")],
            ]),
            "",
            "Contenders, each on a fresh copy of the same layout: **kernel, defaults** "
            "(khugepaged at pages_to_scan=4096, scan_sleep_millisecs=10000; measured over a "
            "bounded window, the rest projected), **kernel, tuned** (65536 pages, 0 ms), "
            "**hugepaged, defaults** (its own: 16384 pages, 100 ms, max_cpu_percent=5), "
            "**hugepaged, tuned** (65536 pages, 0 ms, max_cpu_percent=0). While hugepaged runs "
            "the kernel is at enabled=never (the target's MADV_HUGEPAGE then does not register "
            "it with khugepaged, whose thread is stopped; its pages_collapsed counter is checked "
            "to stay put) and hugepaged is targeted: `hugepaged run --pid TARGET --set "
            "enabled=madvise`. Coverage: PMD-mapped share of the target (PAGEMAP_SCAN, "
            "polled; cross-checked at the end with pagemap + kpageflags). CPU: the khugepaged "
            "thread's / the daemon process's /proc/PID/stat utime+stime and schedstat; "
            "CPU per huge page uses schedstat (ns); hugepaged's start-up "
            f"({fmt_f(doc.get('hugepaged_startup', {}).get('median_cpu_seconds_schedstat'), 3)} s "
            "CPU: interpreter, imports, first empty pass; measured apart) is subtracted, "
            "and its time to coverage includes it. Kernel settings: saved at the start, "
            f"restored at the end: **{'yes' if doc.get('kernel_settings_restored') else 'NO'}**.",
            ""]
    g = goals(doc)
    body = [sec_heap(doc), sec_comeback(doc), sec_tlb(doc), sec_watch(doc)]
    if g:
        body.append("## Goals\n\n" + table(["goal", "measured", ""], g) + "\n")
    if doc.get("errors"):
        body.append("## Errors\n\n" + "\n".join(f"- scenario {e['scenario']}, "
                                                f"{e.get('contender', '')}: `{e['error']}`"
                                                for e in doc["errors"]) + "\n")
    body.append(f"![coverage over time]({name}.png)\n")
    return "\n".join(head + body)


def summary_text(doc: dict) -> str:
    parts = [sec_heap(doc), sec_comeback(doc), sec_tlb(doc), sec_watch(doc)]
    g = goals(doc)
    if g:
        parts.append("## Goals\n\n" + table(["goal", "measured", ""], g))
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# plot


def _coverage(ax, rr, title, xlabel, key_samples="samples"):
    for k, r in rr:
        s = r.get(key_samples) or []
        xs = [max(p[0], 0.01) for p in s]
        ys = [p[1] for p in s]
        ax.plot(xs, ys, color=COLORS[k], label=SHORT[k], lw=1.8, drawstyle="steps-post")
        t = r.get("times", {}).get("100", {})
        if t.get("projected") and s:
            ax.plot([xs[-1], t["seconds"]], [ys[-1], 100.0], color=COLORS[k], lw=1.8,
                    ls="--", label=f"{SHORT[k]} (projected)")
    ax.set_xscale("log")
    ax.set_xlim(0.05, None)
    ax.set_ylim(0, 102)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("target PMD-mapped (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def plot(doc: dict, path: Path) -> None:
    import matplotlib  # the `bench` extra, which compare.py checks for at its start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    m = doc.get("machine", {})
    fig.suptitle(f"hugepaged vs the kernel's khugepaged — {m.get('cpu_model')}, "
                 f"{m.get('cpus')} CPUs, {m.get('mem_total_gib')} GiB, Linux {m.get('kernel')}, "
                 f"{m.get('date_utc', '')[:10]}" + ("  (--quick)" if doc.get("quick") else ""),
                 fontsize=11)
    rr = runs(doc, "heap")
    if rr:
        _coverage(axes[0][0], rr, f"1. fragmented heap, {rr[0][1]['target_mib']} MiB: "
                  "coverage over time", "seconds since the target was ready (log)")
    rr = runs(doc, "comeback")
    if rr:
        _coverage(axes[0][1], rr, f"2. huge pages come back, {rr[0][1]['target_mib']} MiB: "
                  "coverage after the filler exits", "seconds since the filler exited (log)")
    rr = runs(doc, "tlb")
    ax = axes[1][0]
    if rr:
        for k, r in rr:
            pts = [(t, v) for t, v in r.get("throughput", [])
                   if -8 <= t <= r.get("bench_collapse_at", 1e9)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[k],
                        label=SHORT[k], lw=1.5, marker=".", ms=3)
            if r.get("reads_per_s_huge"):
                ax.axhline(r["reads_per_s_huge"] / 1e6, color=COLORS[k], lw=0.8, ls=":")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlim(-8, max([r.get("bench_collapse_at", 60) for _, r in rr] + [20]) + 2)
        ax.set_xlabel("seconds since MADV_HUGEPAGE (contender starts at 0)")
        ax.set_ylabel("random reads, million / s")
        ax.set_title(f"3. does it pay, {rr[0][1]['target_mib']} MiB: reader throughput "
                     "(dotted: fully collapsed)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[1][1]
    labels, vals = [], {k: [] for k in ORDER}
    for key, title in (("heap", "1. heap"), ("comeback", "2. come back"), ("tlb", "3. reader")):
        d = dict(runs(doc, key))
        if not d:
            continue
        labels.append(title)
        for k in ORDER:
            vals[k].append((d.get(k) or {}).get("cpu_ms_per_hpage") or 0.0)
    if labels:
        width = 0.2
        for i, k in enumerate(ORDER):
            xs = [j + (i - 1.5) * width for j in range(len(labels))]
            ax.bar(xs, vals[k], width, color=COLORS[k], label=SHORT[k])
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("CPU ms per collapsed huge page")
        ax.set_title("collapser CPU per huge page (kernel defaults: measured window)",
                     fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict, base: Path) -> list[Path]:
    name = base.name
    pj, pm, pp = (base.with_name(name + ext) for ext in (".json", ".md", ".png"))
    pj.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    out = [pj]
    try:
        plot(doc, pp)
        out.append(pp)
    except Exception as err:  # noqa: BLE001 - the numbers matter more than the picture
        doc.setdefault("errors", []).append({"scenario": "plot", "error": repr(err)})
    pm.write_text(markdown(doc, name) + "\n")
    out.insert(1, pm)
    return out
