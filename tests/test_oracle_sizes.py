"""Per-size THP controls: the kernel's khugepaged as the oracle for which windows collapse.

The kernel obeys `hugepages-2048kB/enabled` together with the global `enabled`
(thp_vma_allowable_orders, hugepage_pmd_enabled). For each combination the issue measured, two
fresh copies of one layout are faulted at 4 KiB (the workload holds PR_SET_THP_DISABLE while it
faults) and then registered by MADV_HUGEPAGE, one for each collapser: `hugepaged collapse` with
no --set (so it inherits the kernel's settings), and the kernel's khugepaged let loose. The
windows each one collapsed must be the same, and the ones the combination implies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hugepaged.kernel.sysfs import combined_enabled
from kit.helpers import (
    KHUGEPAGED_DIR,
    KHUGEPAGED_PAUSED,
    KHUGEPAGED_RUNNING,
    THP_DIR,
    Workload,
    pmd_mapped_windows,
    saved_thp,
)

from . import marks

pytestmark = marks.ORACLE

PMD_KNOB = "hugepages-2048kB/enabled"
PAUSED, RUNNING = KHUGEPAGED_PAUSED, KHUGEPAGED_RUNNING
# "reg" is the small MADV_HUGEPAGE mapping that registers the mm (registration needs a VMA with
# an anon_vma, hence one page); "adv" is MADV_HUGEPAGE memory, "plain" is not advised.
LAYOUT = [
    {"name": "adv", "windows": 2, "fill": "all", "hugepage": True},
    {"name": "plain", "windows": 2, "fill": "all"},
    {"name": "reg", "windows": 1, "fill": "first:1", "hugepage": True},
]
# (global enabled, 2048kB enabled) -> regions the kernel collapses (the four cases).
COMBOS = {
    ("always", "never"): set(),
    ("never", "always"): {"adv", "plain", "reg"},
    ("never", "madvise"): {"adv", "reg"},
    ("madvise", "never"): set(),
}


def _khugepaged_thread_runs() -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "khugepaged":
                return True
        except OSError:
            continue
    return False


def _collapsed(w: Workload) -> dict[str, list[bool]]:
    return {n: pmd_mapped_windows(w.pid, r.start, r.end) for n, r in w.regions.items()}


def _hugepaged_collapses(w: Workload, want_mode: str) -> dict[str, list[bool]]:
    scan = subprocess.run([sys.executable, "-m", "hugepaged", "scan", "--pid", str(w.pid),
                           "--json"], capture_output=True, text=True, timeout=60)
    assert scan.returncode == 0, scan.stderr
    assert json.loads(scan.stdout)["tunables"]["enabled"] == want_mode
    cli = subprocess.run([sys.executable, "-m", "hugepaged", "collapse", "--pid", str(w.pid),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    w.verify()
    return _collapsed(w)


def _kernel_collapses(w: Workload) -> tuple[dict[str, list[bool]], str]:
    scans0 = int((KHUGEPAGED_DIR / "full_scans").read_text())
    with saved_thp(**RUNNING):
        if not _khugepaged_thread_runs():
            # hugepage_pmd_enabled() is false: start_stop_khugepaged stopped the thread.
            time.sleep(1.0)
            how = "thread stopped"
        else:
            t0 = time.monotonic()
            while int((KHUGEPAGED_DIR / "full_scans").read_text()) < scans0 + 2:
                assert time.monotonic() - t0 < 30, "khugepaged made no two full scans in 30 s"
                time.sleep(0.01)
            how = "two full scans"
        after = _collapsed(w)
    w.verify()
    return after, how


@pytest.mark.skipif(not (THP_DIR / PMD_KNOB).exists(), reason="kernel without per-size THP")
@pytest.mark.parametrize(("global_mode", "pmd_mode"), list(COMBOS))
def test_per_size_enabled_agrees_with_khugepaged(global_mode, pmd_mode):
    want = {n: [n in COMBOS[(global_mode, pmd_mode)]] * spec["windows"]
            for n, spec in ((s["name"], s) for s in LAYOUT)}
    knobs = {"enabled": global_mode, PMD_KNOB: pmd_mode, "max_ptes_none": 511,
             "max_ptes_shared": 256, "max_ptes_swap": 64, **PAUSED}
    sentinel = [{"name": "sentinel", "windows": 1, "fill": "first:1", "hugepage": True}]
    with saved_thp(**knobs), Workload(regions=sentinel):
        # The sentinel's registration woke the kernel's thread for its one pass (list no longer
        # empty); later registrations do not wake it while it is paused.
        time.sleep(0.1)
        with Workload(regions=LAYOUT) as mine:
            assert _collapsed(mine) == {n: [False] * len(v) for n, v in want.items()}
            ours = _hugepaged_collapses(mine, combined_enabled(global_mode, pmd_mode))
        with Workload(regions=LAYOUT) as theirs:
            kernels, how = _kernel_collapses(theirs)
    print(f"global {global_mode} + 2048kB {pmd_mode}: kernel ({how}) {kernels}, "
          f"hugepaged {ours}")
    assert kernels == want, f"the kernel's khugepaged ({how}) collapsed {kernels}"
    assert ours == kernels
