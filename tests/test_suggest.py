"""`hugepaged suggest`: [[target]] sections for the processes that would gain most, as TOML
the configuration accepts verbatim; processes already covered, hugepaged itself and those
that turned THP off for themselves are not proposed."""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

from hugepaged.config import parse_config
from kit.daemon_runner import hugepaged_cli
from kit.helpers import Workload, pmd_mapped_windows, saved_thp

from .marks import kernel_test

WINDOWS = 8


@contextlib.contextmanager
def named(comm: str, **spec) -> Iterator[Workload]:
    """A workload that names itself `comm` (its `comm` command writes /proc/self/comm), so
    that it is told apart from the other Python processes of the machine."""
    with Workload(**spec) as w:
        w.command(f"comm {comm.encode().hex()}")
        yield w


def sections(text: str) -> dict[str, tuple[str, dict]]:
    """name -> (the comment line above it, the target table)."""
    doc = tomllib.loads(text)
    out = {}
    for t in doc.get("target", []):
        comment = re.search(rf"^# (.*)\n\[\[target\]\]\nname = \"{t['name']}\"", text, re.M)
        out[t["name"]] = (comment.group(1) if comment else "", t)
    return out


@kernel_test
def test_suggest_proposes_the_big_unadvised_process_and_skips_the_rest(tmp_path):
    with saved_thp(enabled="never"), \
            named("hpsuggestme", regions=[{"name": "a", "windows": WINDOWS}]) as big, \
            named("hugepaged", regions=[{"name": "h", "windows": WINDOWS}]), \
            named("hpthpoff", regions=[{"name": "o", "windows": WINDOWS}],
                  prctl_thp_disable=True) as off:
        assert Path(f"/proc/{big.pid}/comm").read_text() == "hpsuggestme\n"
        r = hugepaged_cli("suggest", "--set", "enabled=madvise", "--min-mb", "8",
                          "--limit", "100", "--config", str(tmp_path / "none.toml"))
        assert r.returncode == 2 and "none.toml: no such file" in r.stderr  # named: must exist
        r = hugepaged_cli("suggest", "--set", "enabled=madvise", "--min-mb", "8",
                          "--limit", "100")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        cfg = parse_config(r.stdout, "suggested.toml")  # the product's own checks accept it
        got = sections(r.stdout)
        assert len(cfg.targets) == len(got)
        comment, table = got["hpsuggestme"]
        assert table == {"name": "hpsuggestme", "comm": "^hpsuggestme$", "enabled": "always"}
        assert f"1 process (pid {big.pid})" in comment, comment
        n = int(re.search(r"under this target (\d+) windows", comment).group(1))
        assert n >= WINDOWS, comment  # the scan's count: its filled windows at least
        assert not any(t["comm"] in ("^hugepaged$",) for _, t in got.values()
                       if "comm" in t), r.stdout
        assert "hpthpoff" not in got
        assert re.search(rf"^# not proposed: pid {off.pid} \(hpthpoff\), .*PR_SET_THP_DISABLE",
                         r.stdout, re.M), r.stdout
        # covered by a target of the configuration: not proposed again
        config = tmp_path / "hugepaged.toml"
        config.write_text(r.stdout)
        again = hugepaged_cli("suggest", "--set", "enabled=madvise", "--min-mb", "8",
                              "--limit", "100", "--config", str(config))
        assert again.returncode == 0, again.stderr
        assert "hpsuggestme" not in sections(again.stdout)
        # suggest collapses nothing
        region = big.regions["a"]
        assert not any(pmd_mapped_windows(big.pid, region.start, region.end))
        big.verify()


def test_bad_options_are_one_line():
    r = hugepaged_cli("suggest", "--limit", "0")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
