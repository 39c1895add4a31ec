#!/usr/bin/env python3
"""The seed's own story with real QEMU guests: guest A quits, how soon is survivor B's RAM huge?

    sudo python bench/bench_vm.py [--quick] [--backends anon,memfd,shmfile]
                                  [--contenders kernel-defaults,kernel-tuned,...]
                                  [--b-mib 2048] [--a-mib 3072] [--limit S]
                                  [--set KEY=VALUE ...] [--name NAME]

Per backend (guest RAM as anonymous memory; `-object memory-backend-memfd`: shared memory,
which QEMU 7.2 maps 4 KiB-aligned, so that no window of it can be PMD-mapped; or shmfile,
`-object memory-backend-file,mem-path=DIR,share=on,align=2M` with DIR a fresh directory under
/dev/shm: QEMU creates its file there and unlinks it at once, so it is shared memory under the
memfd's rules, mapped 2 MiB-aligned) and per contender, one phase under the machine lock:
1. THP knobs: `enabled=madvise`, the kernel's khugepaged at its defaults (and, for
   kernel-tuned, at 65536 pages / 0 ms from here on); for the memfd backend
   `shmem_enabled=advise` (the kernel aligns a new shmem mapping only while shmem huge pages
   are possible; QEMU maps the memfd itself, so it does not help there); for shmfile and the
   kernel's contenders `hugepages-2048kB/shmem_enabled=advise`: an unlinked file of the
   /dev/shm mount (no huge= option) is PMD-eligible for the kernel through that per-size knob
   and QEMU's MADV_HUGEPAGE alone (its global orders come from the mount's huge=, not from
   shmem_enabled). hugepaged's contenders leave the shmem knobs as they are (the kernel then
   neither allocates nor collapses shmem huge pages) and get `--set shmem_enabled=advise`.
2. Guest A (--a-mib, anonymous) boots and touches its RAM while memory is free: its RAM is
   backed by huge pages.
3. scenarios/filler.py fragments the rest of the host's memory (one pinned 4 KiB page in every
   free 2 MiB block, the last free blocks taken as pinned THPs): no free 2 MiB block is left.
4. For the hugepaged contenders the kernel goes to `enabled=never` (its khugepaged stops; the
   daemon runs with `--set enabled=madvise`, targeted at B's pid alone). Guest B (--b-mib)
   boots and touches its RAM: 4 KiB pages. The collapser starts (the kernel's is already
   running) and meets no free huge page.
   Clean page cache is dropped before the filler runs (a collapse's direct reclaim would
   otherwise turn it into free blocks).
5. Time zero: A is killed and its process is gone: its huge pages are free blocks again.
   B's coverage (PMD-mapped bytes of its RAM mapping, PAGEMAP_SCAN PAGE_IS_HUGE, over the
   windows of it that hold a page just before the exit: what the guest never touched no
   collapser can make huge; cross-checked with smaps at the end) is polled until 99% or
   --limit. For the shared backends also B's shmem huge pages (/proc/meminfo ShmemHugePages
   gained since before B started, over the same windows): the kernel's khugepaged collapses a shmem
   range in the page cache and drops the page tables mapping it, and the PMD appears only
   when the guest touches the range again (MADV_COLLAPSE installs it at once).
Figures: seconds from A's exit to 50/90/95/99% coverage, the collapser's CPU (the
[khugepaged] thread's or the daemon's /proc/PID/stat) from time zero to 99%, the coverage at
the limit.

Contenders: kernel-defaults (4096 pages / 10 s), kernel-tuned (65536 pages / 0 ms),
hugepaged-defaults (`hugepaged run --pid B`, `--set shmem_enabled=advise` for memfd and
shmfile),
hugepaged-target (a [[target]] `comm = "^qemu-system"`, `enabled = "always"`,
`shmem_enabled = "always"`, at the daemon's defaults), hugepaged-tuned-target (the same with
--set pages_to_scan=65536, scan_sleep_millisecs=0, max_cpu_percent=0). Every --set is passed
to every hugepaged contender.

This machine's /dev/kvm is PVM without VMX/SVM (an unmodified guest kernel fails under it): the
guests run under TCG. Host-side coverage and the collapser's CPU are real; the guests' own
speed is not measured and would not mean anything here.
Writes bench/results/NAME.{json,md} (default NAME: DATE-vm[-quick]).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

from scenarios import write_results
from scenarios.comeback import Filler
from scenarios.contenders import KERNEL_DEFAULTS
from scenarios.coverage import HugeProbe
from scenarios.cpu import find_khugepaged, stat_cpu_seconds
from scenarios.guest import BACKENDS, SHM_ROOT, Guest, guest_files, stop_and_wait_freed
from scenarios.knobs import free_huge_blocks
from scenarios.realapps import (
    describe_machine,
    fmt_range,
    install_signals,
    log,
    no_swap,
    parse_sets,
    phase,
    quick_or_full,
    require_root,
    summary,
    target_daemon,
)

from kit import helpers as H
from kit.daemon_runner import Daemon

HPAGE = 2 << 20
LEVELS = (0.5, 0.9, 0.95, 0.99)
FAST = {"pages_to_scan": 65536, "scan_sleep_millisecs": 0}
CONTENDERS = ["kernel-defaults", "kernel-tuned", "hugepaged-defaults", "hugepaged-target",
              "hugepaged-tuned-target"]
SHARED = ("memfd", "shmfile")


def shmem_huge_bytes() -> int:
    """Every shmem huge page of the machine (/proc/meminfo ShmemHugePages): the shared
    backend's guest RAM is the only shmem here that grows after A's exit."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("ShmemHugePages:"):
                return int(line.split()[1]) << 10
    return 0


def khugepaged_collapsed() -> int:
    """The kernel's khugepaged/pages_collapsed counter (-1 if unreadable)."""
    try:
        return int((H.KHUGEPAGED_DIR / "pages_collapsed").read_text())
    except (OSError, ValueError):
        return -1


class VmCollapser:
    def __init__(self, key: str, backend: str, sets: dict, work: str) -> None:
        self.key, self.backend, self.sets, self.work = key, backend, sets, work
        self.daemon: Daemon | None = None
        self.pid: int | None = None
        self.kernel = key.startswith("kernel")

    def prepare(self) -> None:
        """Before guest A: the kernel's knobs for this contender."""
        for k, v in KERNEL_DEFAULTS.items():
            H.write_knob(k, v)
        H.write_knob("enabled", "madvise")
        if self.backend == "memfd":
            H.write_knob("hugepages-2048kB/shmem_enabled", "inherit")
            H.write_knob("shmem_enabled", "advise")
        if self.backend == "shmfile" and self.kernel:
            # An unlinked /dev/shm file: shmem_anon_vm_ops, whose global orders are the
            # mount's huge= (none: never); the per-size knob at advise with QEMU's
            # MADV_HUGEPAGE is what lets the kernel fault and collapse it huge.
            H.write_knob("hugepages-2048kB/shmem_enabled", "advise")
        if self.key == "kernel-tuned":
            for k, v in FAST.items():
                H.write_knob(k, v)

    def before_b(self) -> None:
        if not self.kernel:
            H.write_knob("enabled", "never")

    def start(self, b_pid: int) -> None:
        if self.kernel:
            self.pid = find_khugepaged()
            if self.pid is None:
                raise RuntimeError("no [khugepaged] thread at enabled=madvise")
            return
        sets = {"enabled": "madvise", **self.sets}
        if self.backend in SHARED:
            sets.setdefault("shmem_enabled", "advise")
        if self.key == "hugepaged-tuned-target":
            sets = {**FAST, "max_cpu_percent": 0, **sets}
        if self.key == "hugepaged-defaults":
            self.daemon = Daemon([b_pid], sets, None, workdir=self.work, log_level="info")
        else:
            self.daemon = target_daemon(self.work, [b_pid],
                                        {"comm": "^qemu-system", "enabled": "always",
                                         "shmem_enabled": "always"}, sets, name="qemu")
            # target_daemon writes pid = [...]; the comm rule is the target's own match
        self.daemon.start(timeout=60)
        self.pid = self.daemon.pid

    def cpu(self) -> float:
        try:
            return stat_cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def stop(self) -> dict:
        info = {}
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                st = self.daemon.status()
                info = {"counters": st.get("counters"), "tunables": st.get("tunables")}
            self.daemon.close()
        return info


def smaps_pmd_kb(pid: int, lo: int) -> int:
    v = H.smaps_vma(pid, lo)
    return v.get("AnonHugePages", 0) + v.get("ShmemPmdMapped", 0) + v.get("FilePmdMapped", 0)


def vm_run(key: str, backend: str, args, sets: dict, files, work: str) -> dict:
    res: dict = {"contender": key, "backend": backend}
    kernel, initrd = files
    col = VmCollapser(key, backend, sets, work)
    a = Guest("A", args.a_mib, kernel, initrd, work)
    b = None
    filler = None
    probe = None
    shared = backend in SHARED
    try:
        b = Guest("B", args.b_mib, kernel, initrd, work, backend=backend)
        col.prepare()
        res["knobs"] = {k: H.read_knob(k) for k in ("enabled", "shmem_enabled",
                                                      "hugepages-2048kB/shmem_enabled")}
        a.start()
        res["a_boot_s"] = round(a.wait_touched(180), 1)
        alo, ahi = a.ram_range()
        ap = HugeProbe(a.pid, [(alo, ahi)])
        res["a_coverage"] = round(ap.huge_bytes() / (ahi - alo), 4)
        ap.close()
        # Clean page cache would be reclaimed by the first collapses (direct reclaim) and
        # give them whole free blocks: dropped first, so that only A's exit frees blocks.
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        t0 = time.monotonic()
        filler = Filler(args.headroom_mib)
        finfo = filler.ready()
        res["filler"] = {k: finfo.get(k) for k in ("filled_mib", "blocks_pinned_4k", "thp_taken",
                                                   "free_huge_blocks_after", "setup_seconds")}
        res["filler_s"] = round(time.monotonic() - t0, 1)
        col.before_b()
        shm0 = shmem_huge_bytes()  # any other shmem huge pages of the machine
        res["shmem_huge_mib_before_b"] = shm0 >> 20
        b.start()
        res["b_boot_s"] = round(b.wait_touched(240), 1)
        lo, hi = b.ram_range()
        res["b_ram_mib"] = (hi - lo) >> 20
        vma = H.smaps_vma(b.pid, lo)
        res["b_vma"] = {"header": vma["header"], "start_mod_2m": lo % HPAGE,
                        "THPeligible": vma.get("THPeligible"),
                        "VmFlags": " ".join(sorted(vma.get("VmFlags", ())))}
        probe = HugeProbe(b.pid, [(lo, hi)])
        res["b_coverage_before"] = round(probe.huge_bytes() / (hi - lo), 4)
        col.start(b.pid)
        time.sleep(args.settle)  # the collapser meets fragmented memory first
        res["b_coverage_at_exit"] = round(probe.huge_bytes() / (hi - lo), 4)
        res["free_huge_blocks_before_exit"] = free_huge_blocks()
        # Windows with no page present (guest memory the guest never touched) cannot be made
        # huge by anyone: coverage is counted against the windows that hold a page.
        present = sum(1 for n in H.present_per_window(b.pid, lo, hi) if n > 0)
        res["b_windows"], res["b_present_windows"] = (hi - lo) // HPAGE, present
        denom = max(1, present) * HPAGE
        cpu0 = col.cpu()
        collapsed0 = khugepaged_collapsed()
        res["shmem_huge_mib_before_exit"] = shmem_huge_bytes() >> 20
        res["a_exit_s"] = round(stop_and_wait_freed(a), 2)
        t0 = time.monotonic()
        res["free_huge_blocks_after_exit"] = free_huge_blocks()
        # The kernel's khugepaged never scans memfd (kernel-interfaces.md): a shorter bound.
        limit = min(args.limit, args.memfd_kernel_limit) if col.kernel and \
            backend == "memfd" else args.limit
        res["limit_s"] = limit
        times: dict = {}
        cache_times: dict = {}
        samples = []
        cc = 0.0
        while True:
            el = time.monotonic() - t0
            huge = probe.huge_bytes()
            c = min(1.0, huge / denom)
            cpu = col.cpu() - cpu0
            if shared:  # B's shmem huge pages, mapped by a PMD or not
                cc = min(1.0, max(0, shmem_huge_bytes() - shm0) / denom)
            if not samples or el - samples[-1][0] >= 1.0 or c >= LEVELS[-1]:
                samples.append((round(el, 2), round(c, 4), round(cpu, 3),
                                round(huge / (hi - lo), 4), round(cc, 4)))
            for lv in LEVELS:
                if c >= lv and str(lv) not in times:
                    times[str(lv)] = {"s": round(el, 2), "cpu_s": round(cpu, 3)}
                if cc >= lv and str(lv) not in cache_times:
                    cache_times[str(lv)] = {"s": round(el, 2), "cpu_s": round(cpu, 3)}
            if c >= LEVELS[-1] or el > limit:
                break
            time.sleep(0.1)
        res.update({"times": times, "coverage_end": round(c, 4), "seconds": round(el, 1),
                    "ram_coverage_end": round(huge / (hi - lo), 4),
                    "collapser_cpu_s": round(col.cpu() - cpu0, 3), "samples": samples,
                    "smaps_pmd_mib": smaps_pmd_kb(b.pid, lo) >> 10})
        if collapsed0 >= 0:
            res["khugepaged_pages_collapsed"] = khugepaged_collapsed() - collapsed0
        if shared:
            res.update({"cache_times": cache_times, "cache_coverage_end": round(cc, 4),
                        "shmem_huge_mib_end": shmem_huge_bytes() >> 20})
        res["collapser"] = col.stop()
        log(f"    {backend} {key}: {c:.1%} after {el:.1f} s, "
            f"t99 {times.get('0.99', {}).get('s', '—')} s, CPU {res['collapser_cpu_s']} s "
            f"(B before exit {res['b_coverage_at_exit']:.1%}, A {res['a_coverage']:.1%})"
            + (f"; shmem huge {cc:.1%}" if shared else ""))
    finally:
        if probe is not None:
            probe.close()
        col.stop()
        if b is not None:
            b.close()
        a.close()
        if filler is not None:
            with contextlib.suppress(Exception):
                filler.exit()
            filler.kill()
    return res


def figures(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        if "times" not in r:
            continue
        k = f"{r['backend']}/{r['contender']}"
        f = out.setdefault(k, {"runs": []})
        f["runs"].append(r)
    for f in out.values():
        rs = f.pop("runs")
        for lv in LEVELS:
            f[f"t{int(lv * 100)}_s"] = summary([r["times"].get(str(lv), {}).get("s")
                                                for r in rs])
        f["cpu_to_99_s"] = summary([r["times"].get("0.99", {}).get("cpu_s") for r in rs])
        f["coverage_end"] = summary([r["coverage_end"] for r in rs])
        f["seconds"] = summary([r["seconds"] for r in rs])
        f["cpu_s"] = summary([r["collapser_cpu_s"] for r in rs])
        if all("cache_times" in r for r in rs):
            f["cache_t95_s"] = summary([r["cache_times"].get("0.95", {}).get("s") for r in rs])
            f["cache_coverage_end"] = summary([r["cache_coverage_end"] for r in rs])
    return out


def report(doc: dict, args) -> list[str]:
    lines = [f"# Guest A quits: time until 99% of survivor B's {args.b_mib} MiB RAM is "
             f"PMD-mapped on the host ({doc['date']})", "", f"`{doc['command']}`  ",
             f"Linux {doc['machine']['kernel']}, {doc['machine']['cpus']} CPUs, code "
             f"{doc['machine']['commit']}; QEMU {doc['qemu']}, guest kernel {doc['guest_kernel']}"
             f"; guest A {args.a_mib} MiB, B {args.b_mib} MiB; host memory fragmented by "
             "bench/scenarios/filler.py; hugepaged --set: "
             f"{doc['sets'] or 'none (defaults)'}.", "",
             "**The guests run under TCG** (`-accel tcg`): this machine's /dev/kvm is PVM "
             "without VMX/SVM. Host-side coverage and the collapser's CPU are real; the "
             "guests' own speed is not measured.", "",
             "Median (min–max) over the runs; times from A's exit (its process gone); "
             f"bounded at {args.limit:.0f} s ({args.memfd_kernel_limit:.0f} s for the kernel "
             "on memfd, which QEMU maps 4 KiB-aligned).", "",
             "Coverage: PMD-mapped share of B's RAM windows that hold a page (the windows "
             "the guest never touched cannot be made huge by anyone; runs recorded before this "
             "was counted used all of B's RAM: see each run's `b_present_windows`). "
             "Shared backends, last two columns: B's shmem huge pages (/proc/meminfo "
             "ShmemHugePages), PMD-mapped or not: the kernel's khugepaged collapses shmem in "
             "the page cache and leaves the PMD to B's next fault there; an idle guest "
             "touches little.", "",
             "| backend | contender | 50% (s) | 90% (s) | 95% (s) | 99% (s) | CPU to 99% (s) | "
             "coverage at the end | CPU over the run (s) | shmem huge 95% (s) | "
             "shmem huge at the end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, f in doc["figures"].items():
        be, c = k.split("/", 1)
        lines.append(f"| {be} | {c} | {fmt_range(f['t50_s'], '{:.1f}')} | "
                     f"{fmt_range(f['t90_s'], '{:.1f}')} | {fmt_range(f['t95_s'], '{:.1f}')} | "
                     f"{fmt_range(f['t99_s'], '{:.2f}')} | "
                     f"{fmt_range(f['cpu_to_99_s'], '{:.2f}')} | "
                     f"{fmt_range(f['coverage_end'], '{:.1%}')} | "
                     f"{fmt_range(f['cpu_s'], '{:.2f}')} | "
                     + (f"{fmt_range(f['cache_t95_s'], '{:.1f}')} | "
                        f"{fmt_range(f['cache_coverage_end'], '{:.1%}')} |"
                        if "cache_t95_s" in f else "| |"))
    fails = [r for r in doc["runs"] if "times" not in r]
    for r in fails:
        lines.append(f"\n{r['backend']}/{r['contender']} failed: {r.get('error', '')[:300]}")
    lines += ["", "A '—' means the level was not reached before the bound. Per run (B's "
              "coverage just before A's exit; free 2 MiB blocks before and after the exit):", ""]
    for r in doc["runs"]:
        if "times" in r and r["b_coverage_at_exit"] > 0.1:
            lines.append(f"- **{r['backend']}/{r['contender']} does not tell the story**: B was "
                         f"{r['b_coverage_at_exit']:.1%} PMD-mapped before A's exit, so free "
                         "huge pages were to be had (compaction of another process's movable "
                         "memory, or reclaim): run nothing else meanwhile.")
        if "times" in r:
            lines.append(f"- {r['backend']}/{r['contender']}: B {r['b_coverage_at_exit']:.1%} "
                         f"before; free huge blocks {r['free_huge_blocks_before_exit']} -> "
                         f"{r['free_huge_blocks_after_exit']}; A was {r['a_coverage']:.1%} huge;"
                         f" end {r['coverage_end']:.1%} (smaps: {r['smaps_pmd_mib']} MiB "
                         "PMD-mapped)"
                         + (f"; B's mapping start mod 2 MiB {r['b_vma']['start_mod_2m']}, "
                            f"THPeligible {r['b_vma']['THPeligible']}; shmem huge "
                            f"{r['shmem_huge_mib_end']} MiB"
                            + (f"; khugepaged pages_collapsed "
                               f"+{r['khugepaged_pages_collapsed']}"
                               if "khugepaged_pages_collapsed" in r else "")
                            if "cache_times" in r else ""))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B 512 MiB, A 768 MiB, anon unless "
                    "--backends, 40 s bound")
    ap.add_argument("--backends", help=f"comma-separated, of {', '.join(BACKENDS)} "
                    "(default anon,shmfile; --quick: anon)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--b-mib", type=int)
    ap.add_argument("--a-mib", type=int)
    ap.add_argument("--limit", type=float)
    ap.add_argument("--memfd-kernel-limit", type=float, default=90.0,
                    help="bound for the kernel's khugepaged on the memfd backend")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds the collapser runs on fragmented memory before A quits")
    ap.add_argument("--headroom-mib", type=int, default=3072)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="passed to every hugepaged daemon (repeatable)")
    ap.add_argument("--name")
    args = ap.parse_args(argv)
    require_root("bench_vm.py")
    no_swap()
    q = args.quick
    quick_or_full(args, (("backends", "anon", "anon,shmfile"), ("b_mib", 512, 2048),
                        ("a_mib", 768, 3072), ("limit", 40.0, 180.0)))
    bad = [c for c in args.contenders.split(",") if c not in CONTENDERS]
    if bad:
        sys.exit(f"--contenders: unknown {bad}; known: {CONTENDERS}")
    bad = [b for b in args.backends.split(",") if b not in BACKENDS]
    if bad:
        sys.exit(f"--backends: unknown {bad}; known: {BACKENDS}")
    if "shmfile" in args.backends.split(",") and not os.path.isdir(SHM_ROOT):
        sys.exit(f"--backends shmfile: no {SHM_ROOT}")
    sets = parse_sets(args.set)
    install_signals()
    files = guest_files(log)
    import subprocess
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.split("\n")[0]
    name = args.name or time.strftime("%Y-%m-%d") + "-vm" + ("-quick" if q else "")
    work = tempfile.mkdtemp(prefix="hugepaged-vm-")
    locks: list = []
    doc = {"command": "python bench/bench_vm.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": describe_machine(), "qemu": qemu, "guest_kernel": files[0].name,
           "accel": "tcg (the host's /dev/kvm is PVM without VMX/SVM)", "args": vars(args),
           "sets": sets, "runs": [], "lock_phases": locks}
    for rnd in range(args.rounds):
        for backend in args.backends.split(","):
            keys = args.contenders.split(",")
            keys = keys if rnd % 2 == 0 else keys[::-1]
            for key in keys:
                log(f"round {rnd + 1}: {backend} {key}")
                try:
                    with phase(f"vm {backend} {key}", locks):
                        r = vm_run(key, backend, args, sets, files, work)
                except KeyboardInterrupt:
                    raise
                except Exception as err:  # noqa: BLE001 - record, go on
                    log(f"    failed: {err!r}")
                    r = {"contender": key, "backend": backend, "error": repr(err)[:600]}
                r["round"] = rnd + 1
                doc["runs"].append(r)
                doc["figures"] = figures(doc["runs"])  # kept after every run: a cut-short
                write_results(name, doc, report(doc, args), quiet=True)  # run leaves data
    doc["figures"] = figures(doc["runs"])
    write_results(name, doc, report(doc, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
