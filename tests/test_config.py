"""The configuration: TOML file, precedence of its layers, errors that name the line, SIGHUP."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from hugepaged import config as config_mod
from hugepaged.config import ConfigError, check_pattern, load_config, parse_config
from hugepaged.daemon.service import Service
from hugepaged.errors import InvalidTunable
from hugepaged.kernel import Kernel
from hugepaged.tunables import Tunables
from kit.daemon_runner import Daemon, hugepaged_cli
from kit.helpers import THP_DIR, saved_thp

from .marks import needs_root

# --------------------------------------------------------------------------------------------
# Parsing


def test_a_full_file_parses():
    cfg = parse_config(
        '# hugepaged\n'
        'enabled = "madvise"\n'
        'max_ptes_none = 64\n'
        'pages_to_scan = 8192\n'
        'max_cpu_percent = 10\n'
        'kernel_khugepaged = "quiet"\n'
        'socket = "/run/x.sock"\n'
        'socket_group = "wheel"\n'
        'log_format = "json"\n'
        'exclude_comm = "qemu-.*"\n', "h.toml")
    assert cfg.tunables == {"enabled": "madvise", "max_ptes_none": "64",
                            "pages_to_scan": "8192", "max_cpu_percent": "10",
                            "kernel_khugepaged": "quiet"}
    assert cfg.options.socket == "/run/x.sock" and cfg.options.socket_group == "wheel"
    assert cfg.options.log_format == "json" and cfg.options.exclude_comm == "qemu-.*"


@pytest.mark.parametrize(("text", "line", "words"), [
    ('enabled = "madvise"\nmax_ptes_none = 512\n', 2, "max_ptes_none: invalid value '512'"),
    ('\n\npages_to_scan = 0\n', 3, "pages_to_scan: invalid value '0'"),
    ('scan_sleep_millisecs = 4294967296\n', 1, "invalid value"),
    ('defrag = 2\n', 1, "defrag: invalid value '2'"),
    ('max_ptes_swap = -1\n', 1, "max_ptes_swap: invalid value '-1'"),
    ('enabled = "sometimes"\n', 1, "one of always, madvise, never"),
    ('kernel_khugepaged = "off"\n', 1, "one of leave, quiet"),
    ('max_cpu_percent = 101\n', 1, "max_cpu_percent: invalid value '101'"),
    ('max_ptes_none = 1.5\n', 1, "expected an integer 0..511"),
    ('max_ptes_none = true\n', 1, "expected an integer 0..511"),
    ('max_ptes_none = "0x10"\n', 1, "expected an integer 0..511"),
    ('max_ptes_none = "100"\n', 1, "expected an integer 0..511"),
    ('# a comment\nmax_ptes_nonne = 3\n', 2, "unknown key 'max_ptes_nonne'"),
    ('log_level = 3\n', 1, "log_level: expected a str"),
    ('log_level = "loud"\n', 1, "log_level: one of debug, info, warning, error"),
    ('metrics_top_processes = "x"\n', 1, "expected a int"),
    ('socket_group_may_set = "yes"\n', 1, "socket_group_may_set: expected a boolean"),
    ('socket_group_may_set = 1\n', 1, "socket_group_may_set: expected a boolean"),
    ('max_ptes_none = 1\n\n[khugepaged]\npages_to_scan = 1\n', 3, "unknown key 'khugepaged'"),
    ('"quoted" = 1\n', 1, "unknown key 'quoted'"),
    ('a.b = 1\n', 1, "unknown key 'a'"),
    ('max_ptes_none = \n', 1, "Invalid value"),
    ('\nmax_ptes_none = 3\nmax_ptes_none = 4\n', 3, "Cannot overwrite a value"),
    ('max_ptes_none = 3\nmax_ptes_none = 4', 2, "Cannot overwrite a value"),  # no final \n
    ('enabled = "madvise\n', 1, "Illegal character"),
])
def test_errors_name_file_and_line(text, line, words):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "/etc/hugepaged/hugepaged.toml")
    msg = str(exc.value)
    assert msg.startswith("/etc/hugepaged/hugepaged.toml")
    assert f"line {line}" in msg, msg
    assert words in msg, msg
    assert "\n" not in msg
    assert exc.value.exit_status == 2


def test_missing_default_file_is_fine_but_a_named_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert load_config(None).tunables == {}
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(str(tmp_path))
    (tmp_path / "ok.toml").write_text("max_ptes_none = 7\n")
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "ok.toml"))
    assert load_config(None).tunables == {"max_ptes_none": "7"}


def test_defaults_scan_at_least_100_times_the_kernels_rate():
    t = Tunables()
    kernel_rate = 4096 / 10.0  # pages_to_scan 4096 per scan_sleep_millisecs 10000
    ours = t.pages_to_scan / (t.scan_sleep_millisecs / 1000.0)
    assert ours >= 100 * kernel_rate
    assert t.max_cpu_percent == 20


# --------------------------------------------------------------------------------------------
# Layers: kernel values < file < --set; reload; live set


KERNEL = {"pages_to_scan": 4096, "scan_sleep_millisecs": 10000, "alloc_sleep_millisecs": 30000,
          "max_ptes_none": 200, "max_ptes_swap": 32, "max_ptes_shared": 100, "defrag": 0,
          "pages_collapsed": 0, "full_scans": 0}


@pytest.fixture
def fake_sys(tmp_path) -> Path:
    d = tmp_path / "sys" / "kernel" / "mm" / "transparent_hugepage"
    (d / "khugepaged").mkdir(parents=True)
    (d / "enabled").write_text("always [madvise] never\n")
    for k, v in KERNEL.items():
        (d / "khugepaged" / k).write_text(f"{v}\n")
    return tmp_path / "sys"


def service(fake_sys: Path, config: Path | None, **overrides: str) -> Service:
    return Service(Kernel(sys_root=str(fake_sys)), str(config) if config else None, overrides)


def test_layers(tmp_path, fake_sys, monkeypatch):
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    t = service(fake_sys, None).tunables
    # Inherited from the kernel: the rules; hugepaged's own: the pace and the cap.
    assert (t.enabled, t.max_ptes_none, t.max_ptes_swap, t.max_ptes_shared, t.defrag,
            t.alloc_sleep_millisecs) == ("madvise", 200, 32, 100, 0, 30000)
    assert (t.pages_to_scan, t.scan_sleep_millisecs) == (16384, 100)
    cfg = tmp_path / "h.toml"
    cfg.write_text("max_ptes_none = 100\npages_to_scan = 2048\n")
    t = service(fake_sys, cfg).tunables
    assert (t.max_ptes_none, t.pages_to_scan) == (100, 2048)
    t = service(fake_sys, cfg, max_ptes_none="5").tunables
    assert (t.max_ptes_none, t.pages_to_scan) == (5, 2048)


def test_reload_applies_a_valid_file_and_keeps_the_running_one_otherwise(tmp_path, fake_sys):
    cfg = tmp_path / "h.toml"
    cfg.write_text("max_ptes_none = 100\n")
    svc = service(fake_sys, cfg, pages_to_scan="1024")
    cfg.write_text("max_ptes_none = 300\nscan_sleep_millisecs = 50\n")
    svc.reload()
    assert (svc.tunables.max_ptes_none, svc.tunables.scan_sleep_millisecs) == (300, 50)
    assert svc.tunables.pages_to_scan == 1024  # --set still wins
    for bad in ("max_ptes_none = 512\n", "max_ptes_none = \n", "bogus = 1\n",
                'exclude_comm = "(unclosed"\n'):
        cfg.write_text(bad)
        svc.reload()
        assert svc.tunables.max_ptes_none == 300
        assert svc.config.options.exclude_comm is None
    cfg.unlink()
    svc.reload()  # a named file that vanished is refused too
    assert svc.tunables.max_ptes_none == 300


def test_live_set_is_refused_like_sysfs_and_keeps_the_value(fake_sys, tmp_path, monkeypatch):
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    svc = service(fake_sys, None)
    svc.set("max_ptes_none", "10")
    assert svc.get("max_ptes_none") == 10
    for key, value in [("max_ptes_none", "512"), ("max_ptes_none", "-1"),
                       ("max_ptes_none", "ten"), ("max_ptes_none", " 5"),
                       ("max_ptes_none", "5 "), ("pages_to_scan", "0"),
                       ("enabled", "sometimes"), ("nonsense", "1"),
                       ("pages_collapsed", "3")]:
        with pytest.raises(InvalidTunable):
            svc.set(key, value)
    assert svc.get("max_ptes_none") == 10
    svc.set("max_ptes_none", "+7\n")  # kstrtoul takes a sign and a trailing newline
    assert svc.get("max_ptes_none") == 7
    svc.set("enabled", "never\n")
    assert svc.get("enabled") == "never"
    assert svc.get("pages_collapsed") == 0


@needs_root
def test_run_with_a_broken_config_exits_2_naming_the_line(tmp_path):
    cfg = tmp_path / "h.toml"
    cfg.write_text("# ok\nmax_ptes_none = 64\nmax_ptes_swap = 999\n")
    r = hugepaged_cli("run", "--config", str(cfg), "--socket", str(tmp_path / "s"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"hugepaged: {cfg}, line 3: max_ptes_swap: invalid value '999' (an integer 0..511)"]
    assert not (tmp_path / "s").exists()
    r = hugepaged_cli("run", "--set", "pages_to_scan=0", "--socket", str(tmp_path / "s"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "pages_to_scan: invalid value '0'" in r.stderr


# --------------------------------------------------------------------------------------------
# SIGHUP on the real daemon


@pytest.mark.kernel
@needs_root
@pytest.mark.skipif(not (THP_DIR / "enabled").exists(), reason="kernel without THP")
def test_sighup_reloads_and_refuses_a_broken_file(tmp_path):
    cfg = tmp_path / "hugepaged.toml"
    cfg.write_text("max_ptes_none = 100\nscan_sleep_millisecs = 1000\n")
    with saved_thp(enabled="never"), Daemon(pids=[os.getpid()], config=str(cfg),
                                             sets={"enabled": "madvise"}) as d:
        assert d.get("max_ptes_none") == 100
        cfg.write_text("max_ptes_none = 200\nscan_sleep_millisecs = 1000\n")
        d.send(signal.SIGHUP)
        d.wait_for(lambda st: st["tunables"]["max_ptes_none"] == 200, timeout=5,
                   what="reload")
        assert d.events("tunable", key="max_ptes_none", value=200, source="reload")
        cfg.write_text("max_ptes_none = 200\nscan_sleep_millisecs = oops\n")
        d.send(signal.SIGHUP)
        d.wait_log(lambda recs: any(r.get("event") == "reload_refused" for r in recs))
        (refused,) = d.events("reload_refused")
        assert "line 2" in refused["error"]
        st = d.status()
        assert st["tunables"]["max_ptes_none"] == 200
        assert st["tunables"]["scan_sleep_millisecs"] == 1000
        time.sleep(0.1)
        assert d.alive()


# --------------------------------------------------------------------------------------------
# A comm pattern is matched against names any user chooses: bounded at load (regex_bound)

SLOW_PATTERNS = {
    r"^(((a+)+)+)+$": "nested quantifiers",  # 11.9 s on 'aaaaaaaaaaaaaa!' once
    r"^(a+)+$": "nested quantifiers",
    "a*" * 8 + "$": "quantifiers or alternatives that can match the same characters",
    r"^(a|a?)+$": "quantifiers or alternatives that can match the same characters",
    "(?:){100000}": "quantifiers or alternatives",
}
USUAL_PATTERNS = [r"^redis-server$", r"(postgres|redis-server)", r"qemu-.*", r"^java$",
                  r"^kworker/\d+:\d+", r"[a-z]+-[0-9]+", r"^(\w+-)*\w+$", r".*foo.*bar.*",
                  r"^(?:python3?|node|ruby)(\.\d+)?$", r"^(a|aa)+$", r"a{1000}"]


@pytest.mark.parametrize("pattern", list(SLOW_PATTERNS))
@pytest.mark.parametrize("where", ["exclude_comm", "target"])
def test_a_pattern_that_can_backtrack_long_is_refused_at_load(pattern, where):
    text = (f"exclude_comm = '{pattern}'\n" if where == "exclude_comm" else
            f"[[target]]\nname = 'x'\ncomm = '{pattern}'\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "/etc/hugepaged/hugepaged.toml")
    assert time.monotonic() - t0 < 1
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.exit_status == 2
    assert f"line {1 if where == 'exclude_comm' else 3}" in msg, msg
    assert "could backtrack more than 1,000,000 steps on a 15-character name" in msg, msg
    assert SLOW_PATTERNS[pattern] in msg, msg


@pytest.mark.parametrize("pattern", USUAL_PATTERNS)
def test_usual_patterns_are_accepted_and_match_fast(pattern):
    cfg = parse_config(f"exclude_comm = '{pattern}'\n[[target]]\nname = 'x'\n"
                       f"comm = '{pattern}'\n", "/etc/hugepaged/hugepaged.toml")
    target = cfg.targets[0]
    compiled = check_pattern(pattern)
    for k in range(16):
        for last in ("!", "-", "b", ""):
            name = ("a" * k + last)[:15]
            t0 = time.perf_counter()
            target._comm_re.search(name)
            compiled.fullmatch(name)
            # not a benchmark: a backtracking blow-up takes seconds, these microseconds
            assert time.perf_counter() - t0 < 0.5, (pattern, name)


def test_the_bound_counts_what_backtracking_can_walk():
    """Hand-counted cases: a literal is a step per start position; `a*` tries every length;
    stacked and nested repeats multiply; an alternation adds."""
    from hugepaged.regex_bound import COMM_CHARS, TooCostly, steps

    starts = COMM_CHARS + 1
    assert steps("a") == starts
    assert steps("ab") == 2 * starts  # each partial path tries the next item
    assert steps("a|b") == 2 * starts
    assert steps("a*") == 15 * starts  # a step per iteration, 15 at most
    assert steps("a*a*") > 8 * steps("a*")
    assert steps("(?:a+)+") > 1000 * steps("a+")
    with pytest.raises(TooCostly):
        steps(r"^(((a+)+)+)+$", limit=10**9)
