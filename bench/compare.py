#!/usr/bin/env python3
"""hugepaged against the kernel's khugepaged, side by side (issue 4).

Usage: python bench/compare.py [--quick] [--name NAME] [--gib N]

Runs four scenarios for four contenders, each on a fresh copy of the same layout:
  kernel-defaults     the kernel's khugepaged at its defaults (4096 pages / 10 s); measured
                      over a bounded window, the rest projected (and labelled so)
  kernel-tuned        the kernel's khugepaged at pages_to_scan=65536 scan_sleep_millisecs=0
  hugepaged-defaults  `hugepaged run` at its own defaults (16384 pages / 100 ms, 5% CPU cap)
  hugepaged-tuned     `hugepaged run` at 65536 pages / 0 ms / max_cpu_percent=0

Scenarios: 1 fragmented heap, 2 huge pages come back, 3 does it pay, 4 cost of watching.
While hugepaged is measured the kernel is at enabled=never, so the target's MADV_HUGEPAGE does
not register it with the kernel's khugepaged (whose thread is stopped), and hugepaged runs in
targeted mode (--pid TARGET --set enabled=madvise): no other process on the machine is touched.

Every kernel setting touched is saved first and restored at the end, also on Ctrl-C or
SIGTERM (kit/helpers.saved_thp); kit/helpers.machine_lock() is held for the whole run.
Writes bench/results/NAME.md, NAME.json and NAME.png (default NAME: DATE-MACHINE[-quick]).
Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import scenarios

scenarios.require("numpy", "hugepaged", "matplotlib")  # before anything imports them

from scenarios import comeback, heap, report, tlb, watch  # noqa: E402
from scenarios.contenders import CONTENDERS, KERNEL_DEFAULTS  # noqa: E402
from scenarios.context import make_context, measure_daemon_startup  # noqa: E402
from scenarios.knobs import write_knob  # noqa: E402
from scenarios.machine import machine, machine_tag  # noqa: E402

from kit import helpers as H  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = {"1": ("heap", heap), "2": ("comeback", comeback), "3": ("tlb", tlb)}


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that every setting is restored."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run in a few minutes: 512 MiB targets, short windows")
    ap.add_argument("--name", help="results file name (default DATE-MACHINE[-quick])")
    ap.add_argument("--gib", type=float, default=None,
                    help="target size of scenarios 1 and 3 in GiB (default 4; --quick 0.5)")
    ap.add_argument("--scenarios", default="1234", help=argparse.SUPPRESS)  # development
    ap.add_argument("--contenders", default=None, help=argparse.SUPPRESS)  # development
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("compare.py: needs root (kernel THP knobs, pagemap PFNs, MADV_COLLAPSE)",
              file=sys.stderr)
        return 1
    gib = args.gib if args.gib is not None else (0.5 if args.quick else 4.0)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGHUP, _raise_terminated)

    contenders = [c for c in CONTENDERS
                  if args.contenders is None or c.key in args.contenders.split(",")]
    ctx = make_context(args.quick, gib, log)
    doc: dict = {"command": " ".join(["python", "bench/compare.py", *sys.argv[1:]]),
                 "quick": args.quick, "gib": gib, "contenders": [c.__dict__ for c in contenders],
                 "scenarios": {}, "errors": []}
    t_start = time.monotonic()
    log(f"waiting for the machine lock ({H._LOCK_PATH})")
    try:
        lock = H.machine_lock()
        lock.__enter__()
    except KeyboardInterrupt:
        log("interrupted while waiting for the machine lock; nothing was changed")
        return 130
    with contextlib.ExitStack() as stack:
        stack.push(lock)
        doc["machine"] = machine()
        name = args.name or (time.strftime("%Y-%m-%d") + "-" + machine_tag(doc["machine"])
                             + ("-quick" if args.quick else ""))
        log(f"lock held; {doc['machine']['cpu_model']}, {doc['machine']['cpus']} CPUs, "
            f"{doc['machine']['mem_total_gib']} GiB, Linux {doc['machine']['kernel']}; "
            f"results: bench/results/{name}.*")
        saved_names = ["enabled", *KERNEL_DEFAULTS]
        try:
            with H.saved_thp(**{k: H.read_knob(k) for k in saved_names}) as saved:
                doc["kernel_settings_saved"] = saved
                run_all(ctx, doc, contenders, args.scenarios)
        except KeyboardInterrupt as err:
            doc["interrupted"] = repr(err) or "KeyboardInterrupt"
            log(f"interrupted ({doc['interrupted']}); kernel settings restored")
        finally:
            doc["kernel_settings_after"] = {k: H.read_knob(k) for k in saved_names}
            doc["kernel_settings_restored"] = all(
                str(doc["kernel_settings_after"][k]) == str(v)
                for k, v in doc.get("kernel_settings_saved", {}).items())
            doc["wall_seconds"] = round(time.monotonic() - t_start, 1)
            RESULTS.mkdir(exist_ok=True)
            paths = report.write(doc, RESULTS / name)
            for p in paths:
                log(f"wrote {p.relative_to(RESULTS.parent.parent)}")
    if doc.get("interrupted") or doc["errors"]:
        log(f"daemon logs kept in {ctx.workdir}")
    else:
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    print()
    print(report.summary_text(doc))
    return 1 if doc.get("interrupted") or doc["errors"] else 0


def run_all(ctx, doc, contenders, which: str) -> None:
    if any(not c.is_kernel for c in contenders):
        log("measuring hugepaged's start-up CPU (subtracted from its collapse CPU)")
        doc["hugepaged_startup"] = measure_daemon_startup(ctx)
        log(f"  start-up: {doc['hugepaged_startup']['median_cpu_seconds_schedstat']:.3f} s CPU")
    for num, (key, mod) in SCENARIOS.items():
        if num not in which:
            continue
        runs = doc["scenarios"].setdefault(key, {"runs": {}})
        runs.update(mod.describe(ctx) if hasattr(mod, "describe") else {})
        for c in contenders:
            log(f"scenario {num} ({key}): {c.label}")
            t = time.monotonic()
            try:
                r = mod.run(ctx, c)
                runs["runs"][c.key] = r
                log("  " + report.one_line(key, r) + f"  [{time.monotonic() - t:.0f} s]")
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - one failed run does not end the others
                log(f"  FAILED: {err!r}")
                doc["errors"].append({"scenario": key, "contender": c.key, "error": repr(err),
                                      "traceback": traceback.format_exc()})
            finally:
                _restore_between_runs()
    if "4" in which:
        log("scenario 4 (cost of watching)")
        try:
            doc["scenarios"]["watch"] = watch.run(ctx)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001
            log(f"  FAILED: {err!r}")
            doc["errors"].append({"scenario": "watch", "error": repr(err),
                                  "traceback": traceback.format_exc()})
        finally:
            _restore_between_runs()


def _restore_between_runs() -> None:
    """Kernel defaults between runs (the final restore is saved_thp's)."""
    for k, v in KERNEL_DEFAULTS.items():
        write_knob(k, v)


if __name__ == "__main__":
    sys.exit(main())
