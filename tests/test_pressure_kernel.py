"""Memory pressure and the kernel's underused-THP shrinker, for real, in a memory cgroup at
its limit (v1 memory controller, cgroup2 for PSI: this machine's hybrid layout).

1. A process thrashing its anonymous memory in a cgroup whose limit is far below it (zram
   swap on for the test): its cgroup2 group's `memory.pressure` climbs; a workload in the
   same group, under a target matched by that cgroup, is not collapsed while the pressure
   is above the target's max_memory_pressure, and is once it falls.
2. hugepaged collapses sparse windows (its own max_ptes_none 511); the kernel's max_ptes_none
   is 64, so each resulting huge page holds more zero-filled pages than the kernel's shrinker
   allows; memory in the cgroup runs short, the shrinker splits them (thp_underused_split_page)
   and the daemon does not collapse them again: the kernel would only split them again."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from kit import cgroups
from kit.daemon_runner import Daemon
from kit.helpers import Workload, pmd_mapped_windows, saved_thp, zram_swap

from .marks import kernel_test

MIB = 1 << 20
# Anonymous memory larger than its cgroup's limit, touched over and over: with swap on, every
# touch of a page swapped out waits for it (a memory stall, as PSI counts it).
THRASH = r"""
import mmap, os, sys
size = int(sys.argv[1])
m = mmap.mmap(-1, size)
block = os.urandom(4096)  # incompressible: zram gains nothing on it
for off in range(0, size, 4096):
    m[off:off + 4096] = block
print("ready", flush=True)
while True:
    for off in range(0, size, 4096):
        m[off] = (m[off] + 1) & 0xFF
"""


def vmstat(name: str) -> int:
    with open("/proc/vmstat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + " "))


def huge(w: Workload) -> list[bool]:
    r = w.regions["heap"]
    return pmd_mapped_windows(w.pid, r.start, r.end)


@kernel_test
def test_collapses_pause_under_the_targets_own_cgroup_pressure_and_resume(tmp_path):
    spec = [{"name": "heap", "windows": 8, "fill": "all", "hugepage": True}]
    with saved_thp(enabled="never"), zram_swap("1G"), cgroups.group(48 * MIB) as g:
        thrash = subprocess.Popen(
            [sys.executable, "-c", THRASH, str(128 * MIB)],
            stdout=subprocess.PIPE, text=True, preexec_fn=lambda: g.add(os.getpid()))
        assert thrash.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 30
        while g.some_avg10() < 40 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert g.some_avg10() >= 40, "no pressure in the thrashing cgroup"
        cfg = tmp_path / "hugepaged.toml"
        cfg.write_text(f'[[target]]\nname = "db"\ncgroup = "{g.v2_path}"\n'
                       'max_memory_pressure = 25\n')
        with Workload(regions=spec, preexec=lambda: g.add(os.getpid(), memory=False)) as w, \
                Daemon([w.pid], config=str(cfg), sets={"enabled": "madvise",
                                                        "max_memory_pressure": 0}) as d:
            time.sleep(4.0)
            st = d.status()
            assert not any(huge(w)) and st["state"] == "memory-pressure", st["state"]
            assert d.events("pressure", pid=w.pid)[0]["paused"] is True
            thrash.kill()
            thrash.wait()
            deadline = time.monotonic() + 60
            while not all(huge(w)) and time.monotonic() < deadline:
                time.sleep(0.25)
            assert all(huge(w))
            assert d.events("pressure", pid=w.pid)[-1]["paused"] is False
            print(f"resumed at some avg10 {d.events('pressure', pid=w.pid)[-1]['avg10']}")
            w.verify()


PUSH = r"""
import mmap, sys
m = mmap.mmap(-1, int(sys.argv[1]))
m.madvise(23)  # MADV_POPULATE_WRITE: charged to the cgroup now
print("pushed", flush=True)
sys.stdin.readline()
"""


@kernel_test
def test_what_the_kernels_shrinker_split_for_being_underused_is_not_collapsed_again(tmp_path):
    windows = 16
    spec = [{"name": "heap", "windows": windows, "fill": "first:300", "hugepage": True}]
    with saved_thp(enabled="never", max_ptes_none=64), cgroups.group(1 << 30) as g, \
            Workload(regions=spec, preexec=lambda: g.add(os.getpid())) as w:
        cfg = tmp_path / "hugepaged.toml"
        cfg.write_text(f'[[target]]\nname = "sparse"\npid = [{w.pid}]\nmax_ptes_none = 511\n')
        with Daemon([w.pid], config=str(cfg), sets={"enabled": "madvise",
                                                     "max_cpu_percent": 0}) as d:
            deadline = time.monotonic() + 30
            while not all(huge(w)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert all(huge(w))  # each holds 212 zero-filled pages, more than the kernel's 64
            before = vmstat("thp_underused_split_page")
            (g.memory / "memory.limit_in_bytes").write_text(str(g.usage() + 2 * MIB))
            push = subprocess.Popen([sys.executable, "-c", PUSH, str(8 * MIB)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: g.add(os.getpid()))
            try:
                assert push.stdout.readline() == "pushed\n", "the pusher was killed"
            finally:
                push.kill()
                push.wait()
            split = vmstat("thp_underused_split_page") - before
            assert split >= 1, "the kernel's shrinker split nothing"
            left = sum(huge(w))
            time.sleep(4.0)  # visits go on: none collapses a split window again
            st = d.status()
            assert sum(huge(w)) <= left
            assert st["held_windows"]["underused"] >= windows - left
            assert st["results"].get("UNDERUSED_SPLIT", 0) >= 1
            w.verify()
    print(f"the shrinker split {split} huge page(s); {windows - left} window(s) held")
