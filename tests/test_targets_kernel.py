"""Targets on the real kernel, with real applications: Redis (populated with DEBUG POPULATE)
and workload processes. Outcomes are read back from smaps_rollup, pagemap and kpageflags
(kit/helpers.py, kit/redis_app.py), never through hugepaged's code.

The kernel's khugepaged is kept out: with the kernel at enabled=madvise (Redis's case: the
global mode is what is under test) its pages_to_scan is 8 and its sleep 4294967295 ms; for
workloads that MADV_HUGEPAGE their memory the kernel is at enabled=never and the daemon is
told `enabled=madvise`.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from kit.daemon_runner import Daemon, hugepaged_cli, settled, slot_of
from kit.helpers import Workload, pmd_mapped_windows, proc_status, saved_thp
from kit.redis_app import Redis, anon_rollup_kb

from .marks import KERNEL

pytestmark = KERNEL

KERNEL_MADVISE_QUIET = {"enabled": "madvise", "pages_to_scan": 8,
                        "scan_sleep_millisecs": 4294967295}
REDIS_TARGET = '[[target]]\nname = "redis"\ncomm = "^redis-server$"\nenabled = "always"\n'


def config(tmp_path, text: str) -> str:
    path = tmp_path / "hugepaged.toml"
    path.write_text(text)
    return str(path)


def mapped(w: Workload, name: str) -> list[bool]:
    r = w.regions[name]
    return pmd_mapped_windows(w.pid, r.start, r.end)


def in_region(w: Workload, name: str, doc: dict) -> int:
    r = w.regions[name]
    return sum(r.start <= int(x["address"], 16) < r.end for x in doc["windows"])


def rss_anon_kb(pid: int) -> int:
    return int(proc_status(pid)["RssAnon"].split()[0])


def check_values(r: Redis, keys: int) -> None:
    for i in (0, 1, keys // 3, keys // 2, keys - 1):
        assert r.get(f"key:{i}") == r.expected_value(i), i


# --------------------------------------------------------------------------------------------
# Redis


def test_scan_says_why_nothing_happens_to_redis_under_madvise():
    with saved_thp(**KERNEL_MADVISE_QUIET), Redis() as r:
        r.populate(500)
        anon, _ = anon_rollup_kb(r.pid)
        res = hugepaged_cli("scan", "--pid", str(r.pid), "--json")
        assert res.returncode == 0, res.stderr
        (proc,) = json.loads(res.stdout)["processes"]
        assert proc["ineligible"]["NO_MADV_HUGEPAGE"] >= 0.9 * anon, (proc, anon)
        assert proc["collapsible"] == 0
        human = hugepaged_cli("scan", "--pid", str(r.pid))
        assert (f"pid {r.pid} (redis-server): not eligible: " in human.stdout
                and "NO_MADV_HUGEPAGE (enabled=madvise: a target with enabled=always would "
                    "take it)" in human.stdout), human.stdout


def test_daemon_target_always_covers_redis_without_force(tmp_path):
    """The issue's bar: >= 95% of Redis's anonymous memory PMD-mapped within 90 s by a daemon
    at its default settings (only --pid, so it touches no other process on this machine)."""
    cfg = config(tmp_path, REDIS_TARGET)
    with saved_thp(**KERNEL_MADVISE_QUIET), Redis() as r:
        keys = r.populate(500)
        anon, huge = anon_rollup_kb(r.pid)
        assert anon > 450 * 1024 and huge == 0
        t0 = time.monotonic()
        with Daemon(pids=[r.pid], config=cfg) as d:  # debug: the register record
            while True:
                anon, huge = anon_rollup_kb(r.pid)
                if huge >= 0.95 * anon or time.monotonic() - t0 > 90:
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - t0
            st = d.status()
            (reg,) = d.events("register", pid=r.pid)
        assert huge >= 0.95 * anon, (f"{huge} of {anon} kB after {elapsed:.0f} s",
                                     st["results"], st["cpu_by_activity"], st["counters"])
        print(f"redis {anon} kB anonymous: 95% PMD-mapped after {elapsed:.1f} s",
              file=sys.stderr)
        assert reg["target"] == "redis"
        (t,) = st["targets"]
        assert t["name"] == "redis" and t["processes"] == 1 and t["windows_collapsed"] >= 200
        assert slot_of(st, r.pid)["target"] == "redis"
        check_values(r, keys)  # Redis answers, with its values, afterwards


# --------------------------------------------------------------------------------------------
# Workloads: never, bloat, priority


def test_a_target_at_never_keeps_madv_hugepage_windows_small(tmp_path):
    spec = [{"name": "heap", "windows": 8, "hugepage": True}]
    with saved_thp(enabled="never"), Workload(regions=spec) as left, \
            Workload(regions=spec) as other:
        cfg = config(tmp_path, f'[[target]]\nname = "hands-off"\npid = [{left.pid}]\n'
                               'enabled = "never"\n')
        with Daemon(pids=[left.pid, other.pid], config=cfg,
                    sets={"enabled": "madvise", "max_cpu_percent": 0}) as d:
            d.wait_for(lambda st: all(mapped(other, "heap")) and settled(st, left.pid),
                       timeout=30, what="the other process collapsed")
            st = d.status()
        assert not any(mapped(left, "heap"))
        assert all(mapped(other, "heap"))
        assert slot_of(st, left.pid)["target"] == "hands-off"
        left.verify()
        other.verify()


def test_a_target_at_never_still_takes_shared_memory_its_shmem_enabled_allows(tmp_path):
    """`enabled` is anonymous memory's mode, `shmem_enabled` shared memory's, as in the kernel:
    a target at enabled=never with shmem_enabled=always leaves the heap and collapses the
    memfd."""
    spec = [{"name": "heap", "windows": 2, "hugepage": True},
            {"name": "m", "windows": 2, "kind": "memfd"}]
    with saved_thp(enabled="never"), Workload(regions=spec) as w:
        cfg = config(tmp_path, f'[[target]]\nname = "shm-only"\npid = [{w.pid}]\n'
                               'enabled = "never"\nshmem_enabled = "always"\n')
        with Daemon(pids=[w.pid], config=cfg,
                    sets={"enabled": "madvise", "max_cpu_percent": 0}) as d:
            d.wait_for(lambda st: all(mapped(w, "m")) and settled(st, w.pid),
                       timeout=30, what="the memfd collapsed")
        assert not any(mapped(w, "heap"))
        w.verify()


def test_bloat_budget_caps_the_rss_sparse_windows_add(tmp_path):
    """16 windows of 64 pages each (448 empty PTEs, 1.75 MiB to fill) and 8 full ones, under
    max_bloat_mb = 4: two sparse windows collapse (3.5 MiB), the rest get
    EXCEED_BLOAT_BUDGET; the full windows all collapse (they add nothing)."""
    spec = [{"name": "sparse", "windows": 16, "fill": "first:64", "hugepage": True},
            {"name": "full", "windows": 8, "hugepage": True}]
    with saved_thp(enabled="never"), Workload(regions=spec) as w:
        cfg = config(tmp_path, f'[[target]]\nname = "lean"\npid = [{w.pid}]\n'
                               'max_ptes_none = 511\nmax_bloat_mb = 4\n')
        before = rss_anon_kb(w.pid)
        with Daemon(pids=[w.pid], config=cfg,
                    sets={"enabled": "madvise", "max_cpu_percent": 0}) as d:
            st = d.wait_for(lambda st: all(mapped(w, "full")) and settled(st, w.pid),
                            timeout=30, what="a settled slot")
            human = d.cli("status").stdout
            top = d.cli("top", "--once").stdout
        growth = rss_anon_kb(w.pid) - before
        assert sum(mapped(w, "sparse")) == 2
        assert growth <= 4096, growth
        assert growth >= 2 * 448 * 4  # what the two collapses filled
        (t,) = st["targets"]
        assert t["bloat_used_kb"] == 2 * 448 * 4 and t["bloat_limit_kb"] == 4096
        assert t["results"]["EXCEED_BLOAT_BUDGET"] >= 14
        assert st["results"]["EXCEED_BLOAT_BUDGET"] >= 14
        (row,) = [ln.split() for ln in human.splitlines() if ln.startswith("lean ")]
        # TARGET PRIO ENABLED SHMEM NONE SWAP SHARED PROCS ANON THP COVER COLLAPSED BLOAT CPU
        # (a star: the global value, the target does not set it)
        assert row[:8] == ["lean", "0", "madvise*", "never*", "511", "64*", "256*", "1"] \
            and row[12] == "3.5M/4.0M", \
            human
        (mine,) = [ln.split() for ln in top.splitlines() if ln.split()[:1] == [str(w.pid)]]
        assert mine[2] == "lean", top  # top shows each process's target
        w.verify()


def test_higher_priority_target_is_covered_first_under_a_small_cpu_cap(tmp_path):
    spec = [{"name": "heap", "windows": 32, "hugepage": True}]
    with saved_thp(enabled="never"), Workload(regions=spec) as low, \
            Workload(regions=spec) as high:
        assert low.pid < high.pid  # so the /proc walk registers the low one first
        cfg = config(tmp_path, f'[[target]]\nname = "batch"\npid = [{low.pid}]\n\n'
                               f'[[target]]\nname = "latency"\npid = [{high.pid}]\n'
                               'priority = 10\n')
        samples = []
        with Daemon(pids=[low.pid, high.pid], config=cfg,
                    sets={"enabled": "madvise", "max_cpu_percent": 3}):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                hi, lo = sum(mapped(high, "heap")), sum(mapped(low, "heap"))
                samples.append((round(time.monotonic() - t0, 1), hi, lo))
                if hi == 32:
                    break
                time.sleep(0.2)
        assert samples[-1][1] == 32, samples
        assert samples[-1][2] <= 4, samples  # the low one had next to nothing meanwhile
        low.verify()
        high.verify()


def test_a_target_at_a_small_cpu_share_is_served_as_its_share_returns(tmp_path):
    """A visit that ran out of its target's share resumes when the share is back: the gaps
    between collapses stay near the share's refill time (about 1.4 s here), not the 5 s
    an idle daemon rests (IDLE_MIN), which left such a target a third of its share."""
    spec = [{"name": "heap", "windows": 24, "fill": "all", "hugepage": True}]
    with saved_thp(enabled="never"), Workload(regions=spec) as w:
        cfg = config(tmp_path, f'[[target]]\nname = "t"\npid = [{w.pid}]\n'
                               'max_cpu_percent = 5\n')
        seen: list[tuple[float, int]] = []
        states: set[str] = set()
        with Daemon(pids=[w.pid], config=cfg,
                    sets={"enabled": "madvise", "max_cpu_percent": 50}) as d:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                n = sum(mapped(w, "heap"))
                if not seen or n != seen[-1][1]:
                    seen.append((time.monotonic() - t0, n))
                if n == 24:
                    break
                if n:  # under way: resting for the share is share-limited, never idle
                    states.add(d.status()["state"])
                time.sleep(0.05)
        assert seen[-1][1] == 24, seen
        assert "share-limited: t" in states and "idle" not in states, states
        gaps = [b[0] - a[0] for a, b in zip(seen[1:], seen[2:], strict=False)]  # after the 1st
        assert max(gaps, default=0.0) < 4.0, seen
        w.verify()


# --------------------------------------------------------------------------------------------
# One-shot: --target, --dry-run's RSS, pacing, why not


def test_collapse_with_a_target_dry_run_predicts_the_rss_it_adds(tmp_path):
    spec = [{"name": "sparse", "windows": 6, "fill": "first:300", "zero_pages": "first:50",
             "hugepage": False},
            {"name": "thin", "windows": 2, "fill": "first:8", "hugepage": False}]
    with saved_thp(enabled="never"), Workload(regions=spec) as w:
        cfg = config(tmp_path, f'[[target]]\nname = "t"\npid = [{w.pid}]\n'
                               'enabled = "always"\nmax_ptes_none = 256\n')
        args = ["collapse", "--pid", str(w.pid), "--config", cfg, "--target", "t", "--json"]
        dry = json.loads(hugepaged_cli(*args, "--dry-run").stdout)
        # Under enabled=always the interpreter's own heap has candidate windows too: count
        # the regions' windows by address, and the RSS of everything against the real run.
        assert dry["target"] == "t"
        assert in_region(w, "sparse", dry) == 6 and in_region(w, "thin", dry) == 0
        # 6 windows of 212 empty-or-zero PTEs (the thin ones exceed max_ptes_none: 504).
        assert dry["rss_growth_predicted_kb"] >= 6 * 212 * 4
        forced = json.loads(hugepaged_cli(*args, "--dry-run", "--force").stdout)
        assert in_region(w, "thin", forced) == 2
        assert forced["rss_growth_predicted_kb"] - dry["rss_growth_predicted_kb"] >= 2 * 504 * 4
        before = rss_anon_kb(w.pid)
        real = json.loads(hugepaged_cli(*args).stdout)
        assert in_region(w, "sparse", real) == 6
        growth = rss_anon_kb(w.pid) - before
        assert abs(growth - dry["rss_growth_predicted_kb"]) <= 64, (growth, dry)
        assert abs(real["rss_growth_kb"] - real["rss_growth_predicted_kb"]) <= 64, real
        assert all(mapped(w, "sparse")) and not any(mapped(w, "thin"))
        w.verify()


def test_config_alone_gives_each_process_the_target_it_matches(tmp_path):
    """As the daemon resolves a process at registration: --config without --target decides
    each process by the first target it matches, the others by the global policy."""
    spec = [{"name": "heap", "windows": 3, "hugepage": False}]
    with saved_thp(enabled="never"), Workload(regions=spec) as a, Workload(regions=spec) as b:
        cfg = config(tmp_path, f'[[target]]\nname = "t"\npid = [{a.pid}]\n'
                               'enabled = "always"\n')
        res = hugepaged_cli("scan", "--pid", str(a.pid), "--pid", str(b.pid), "--config", cfg,
                            "--set", "enabled=madvise", "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        by_pid = {p["pid"]: p for p in doc["processes"]}
        assert doc["target"] is None
        assert by_pid[a.pid]["target"] == "t" and by_pid[b.pid]["target"] is None
        assert by_pid[a.pid]["results"].get("SUCCEED", 0) >= 3
        assert by_pid[b.pid]["ineligible"].get("NO_MADV_HUGEPAGE", 0) >= 3 * 2048
        text = hugepaged_cli("scan", "--pid", str(a.pid), "--config", cfg,
                             "--set", "enabled=madvise").stdout
        assert f"pid {a.pid} (python" in text and "target t" in text
        for w, target in ((a, "t"), (b, None)):
            res = hugepaged_cli("collapse", "--pid", str(w.pid), "--config", cfg,
                                "--set", "enabled=madvise", "--json")
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["target"] == target
        assert all(mapped(a, "heap")) and not any(mapped(b, "heap"))
        a.verify()
        b.verify()


def test_collapse_paced_keeps_its_cpu_near_the_given_share():
    spec = [{"name": "heap", "windows": 24, "hugepage": True}]
    with saved_thp(enabled="never"), Workload(regions=spec) as w:
        res = hugepaged_cli("collapse", "--pid", str(w.pid), "--set", "enabled=madvise",
                            "--max-cpu-percent", "20", "--json", timeout=120)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["collapsed"] == 24 and doc["max_cpu_percent"] == 20
        busy = sum(x["ms"] for x in doc["windows"]) / 1000  # in the kernel, on our CPU
        # Paced at 20%: the run lasts at least about five times its collapse time.
        assert doc["seconds"] >= 0.8 * busy * 100 / 20, (doc["seconds"], busy)
        assert all(mapped(w, "heap"))
        w.verify()


@pytest.mark.parametrize(("args", "words"), [
    (["--target", "nope"], "no target named 'nope' (targets: t)"),
    (["--max-cpu-percent", "101"], "--max-cpu-percent: invalid value '101' (an integer 0..100)"),
])
def test_one_shot_refusals_exit_2(tmp_path, args, words):
    cfg = config(tmp_path, '[[target]]\nname = "t"\npid = [1]\n')
    res = hugepaged_cli("collapse", "--pid", "1", "--config", cfg, *args)
    assert res.returncode == 2, res
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("hugepaged: ") and line.endswith(words), line


def test_thp_disabled_prctl_is_said_with_its_size():
    with saved_thp(enabled="never"), Workload(regions=[{"name": "a", "windows": 4}],
                                                prctl_thp_disable=True) as w:
        res = hugepaged_cli("collapse", "--pid", str(w.pid), "--force", "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["collapsed"] == 0
        assert doc["ineligible"]["THP_DISABLED_PRCTL"] >= 4 * 2048
        human = hugepaged_cli("collapse", "--pid", str(w.pid), "--force")
        assert "THP_DISABLED_PRCTL (the process set PR_SET_THP_DISABLE" in human.stdout


def test_exec_gives_the_process_its_new_targets_policy(tmp_path):
    """The process connector's exec event: the slot is matched again under its new comm."""
    import subprocess

    cfg = config(tmp_path, '[[target]]\nname = "sleepy"\ncomm = "^sleep$"\nenabled = "never"\n')
    proc = subprocess.Popen(["bash", "-c", "read line; exec sleep 60"], stdin=subprocess.PIPE)
    try:
        with Daemon(pids=[proc.pid], config=cfg, log_level="info") as d:
            st = d.wait_for(lambda st: slot_of(st, proc.pid) is not None, what="registered")
            assert slot_of(st, proc.pid)["target"] is None  # bash: the global policy
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            st = d.wait_for(lambda st: (slot_of(st, proc.pid) or {}).get("target") == "sleepy",
                            timeout=20, what="the exec re-resolved")
            (ev,) = d.events("target", pid=proc.pid)
            assert (ev["old"], ev["target"], ev["comm"]) == (None, "sleepy", "sleep")
            assert slot_of(st, proc.pid)["comm"] == "sleep"
    finally:
        proc.kill()
        proc.wait()
