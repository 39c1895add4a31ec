"""What `status` and piped tables show: each target's policy as it applies (its own settings,
the global ones marked), its coverage; and a piped table never cuts a cell."""

from __future__ import annotations

import re

from kit.daemon_runner import Daemon, hugepaged_cli
from kit.helpers import Workload, saved_thp

from .marks import kernel_test


def row(text: str, first: str) -> dict[str, str]:
    """The table row starting with `first`, by the header line above it."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.split()[:1] == [first])
    header = next(lines[n] for n in range(i, -1, -1) if lines[n].startswith("TARGET"))
    cols = header.split()
    values = lines[i].split()
    # BLOAT is one word, CPU is "1.23 s" (and maybe "(3%)"): the last cells are joined
    return dict(zip(cols, values[:len(cols) - 1] + [" ".join(values[len(cols) - 1:])],
                    strict=True))


@kernel_test
def test_status_shows_each_targets_own_policy_and_coverage(tmp_path):
    config = tmp_path / "hugepaged.toml"
    with saved_thp(enabled="never"), Workload(regions=[{"name": "a", "windows": 4}]) as w:
        # its own mode madvise, the global never: nothing is advised, nothing collapses, the
        # coverage stays what it is while status is read twice
        config.write_text(f'[[target]]\nname = "mine"\npid = [{w.pid}]\nenabled = "madvise"\n'
                          "max_ptes_none = 64\npriority = 7\n")
        with Daemon([w.pid], sets={"enabled": "never", "max_ptes_swap": 32},
                    config=str(config)) as d:
            d.wait_for(lambda st: st["targets"][0]["processes"] == 1, what="registered")
            st = d.status()
            r = hugepaged_cli("status", "--socket", d.socket)
    assert r.returncode == 0, r.stderr
    got = row(r.stdout, "mine")
    glob = st["tunables"]
    assert (got["PRIO"], got["ENABLED"], got["NONE"]) == ("7", "madvise", "64")  # its own
    assert got["SWAP"] == f"{glob['max_ptes_swap']}*" == "32*"  # the global --set value
    assert got["SHMEM"] == f"{glob['shmem_enabled']}*"
    assert got["SHARED"] == f"{glob['max_ptes_shared']}*"
    assert got["COVER"] == f"{st['targets'][0]['coverage_pct']:.1f}%"
    assert "* the global value" in r.stdout
    tunable = re.search(r"^max_ptes_none\s+(\d+)$", r.stdout, re.M)
    assert tunable and tunable.group(1) == str(glob["max_ptes_none"])  # the global table
    assert re.search(r"^enabled\s+never$", r.stdout, re.M)


@kernel_test
def test_a_piped_table_never_cuts_a_cell():
    """`scan --vmas | head`: the rows of a process with long library paths are wider than
    any terminal; piped, each stays whole on its line."""
    with saved_thp(enabled="never"), Workload(regions=[{"name": "a", "windows": 2}]) as w:
        r = hugepaged_cli("scan", "--vmas", "--pid", str(w.pid), "--set", "enabled=madvise")
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout, r.stdout
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) > 160, "no row wider than the old 160 columns to test with"
    header = next(line for line in lines if line.startswith("START"))
    for line in lines[lines.index(header) + 1:]:
        size, rss, pmd = line.split()[3:6]
        for cell in (size, rss, pmd):
            assert re.fullmatch(r"\d+(\.\d)?[KMG]", cell), line
