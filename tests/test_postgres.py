"""A real PostgreSQL 15: its shared buffers are one MAP_SHARED|MAP_ANONYMOUS mapping.

Started while shmem_enabled=advise, the kernel maps the buffers 2 MiB-aligned and hugepaged
collapses a backend's view of them (the knob is back at `never` by then, as the issue saw),
once with `hugepaged collapse` and once with the daemon through a target; started at `never`,
the mapping is misaligned: hugepaged says MISALIGNED and tries nothing. The aligned cluster is
started once for the module (initdb and a start cost seconds); each test loads a table of its
own into buffers that are still 4 KiB pages.
"""

from __future__ import annotations

import json
import sys

import pytest

from hugepaged.cli import main
from kit import pg
from kit.daemon_runner import Daemon, settled, slot_of
from kit.helpers import drain_lru, saved_thp, smaps_vma

from . import marks

pytestmark = [*marks.KERNEL,
              pytest.mark.skipif(not pg.available(), reason="PostgreSQL 15 not installed")]

ROWS = 1_500_000  # about 100 MB of table: most of 256 MB of buffers after pg_prewarm
DAEMON_ROWS = 600_000  # about 40 MB more, in buffers the first test left at 4 KiB
SIZE_KNOB = "hugepages-2048kB/shmem_enabled"


def started(mode: str) -> pg.Postgres:
    """A cluster started while the kernel's shmem_enabled is `mode`, which is put back
    right after the start (the mapping keeps the alignment it got)."""
    with saved_thp(**{SIZE_KNOB: "inherit", "shmem_enabled": mode}):
        return pg.Postgres(shared_buffers="256MB").__enter__()


@pytest.fixture(scope="module")
def aligned():
    """One cluster started at shmem_enabled=advise, with pg_prewarm, for the module."""
    server = started("advise")
    try:
        server.psql("create extension pg_prewarm")
        yield server
    finally:
        server.close()


def load(server: pg.Postgres, table: str, rows: int) -> None:
    server.psql(f"create table {table} as select g, md5(g::text) as h "
                f"from generate_series(1, {rows}) g")


def hugepaged(capsys, *argv: str) -> dict:
    drain_lru()
    rc = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_backend_buffers_collapse_and_the_database_answers(capsys, aligned):
    server = aligned
    load(server, "t", ROWS)
    with server.session() as s, saved_thp(**{SIZE_KNOB: "inherit"}):
        assert int(s.query("select pg_prewarm('t')")) > 10000
        lo, hi = server.shared_memory_vma(s.backend_pid)
        assert lo % (2 << 20) == 0
        before = smaps_vma(s.backend_pid, lo)
        assert before["ShmemPmdMapped"] == 0 and before["Rss"] > 80_000
        doc = hugepaged(capsys, "collapse", "--pid", str(s.backend_pid),
                        "--set", "shmem_enabled=always")
        assert doc["collapsed"] > 0
        after = smaps_vma(s.backend_pid, lo)
        assert after["ShmemPmdMapped"] >= 0.95 * after["Rss"], after
        assert int(s.query("select count(*) from t")) == ROWS
        assert s.query("select h from t where g = 4242") == server.psql("select md5('4242')")


TARGET = """
[[target]]
name = "postgres"
comm = "^postgres$"
shmem_enabled = "always"
"""


def test_the_daemon_collapses_the_buffers_through_a_target(aligned, tmp_path):
    """The daemon's global policy is the kernel's shmem_enabled (never): only the target
    takes the buffers. Each range is collapsed once, through whichever of the two processes
    the daemon meets first; the backend then maps it by PMD at its next touch."""
    server = aligned
    load(server, "d", DAEMON_ROWS)
    cfg = tmp_path / "hugepaged.toml"
    cfg.write_text(TARGET)
    with server.session() as s, saved_thp(**{SIZE_KNOB: "inherit", "shmem_enabled": "never"}):
        assert int(s.query("select pg_prewarm('d')")) > 4000
        lo, hi = server.shared_memory_vma(s.backend_pid)
        assert lo % (2 << 20) == 0
        # Two processes that live as long as the test (auxiliary ones may come and go, and a
        # --pid that is gone at the start is refused).
        pids = [server.postmaster_pid, s.backend_pid]
        with Daemon(pids=pids, config=str(cfg), sets={
                "max_cpu_percent": 0, "scan_sleep_millisecs": 0, "pages_to_scan": 65536}) as d:
            st = d.wait_for(lambda st: all(settled(st, p) for p in pids), timeout=60,
                            what="the postmaster and the backend settled")
        assert slot_of(st, s.backend_pid)["target"] == "postgres"
        assert st["tunables"]["shmem_enabled"] == "never"  # the global policy
        done = [r for r in d.events("collapse") if r["result"] == "SUCCEED"
                and lo <= int(r["address"], 16) < hi]
        assert len(done) >= 15, len(done)  # 40 MB of table: 20 ranges and more
        ranges = [int(r["address"], 16) - lo for r in done]
        assert len(ranges) == len(set(ranges))  # each range once, whichever process it was
        # The backend reads its table: its faults map the collapsed ranges by PMD.
        assert int(s.query("select count(*) from d")) == DAEMON_ROWS
        assert s.query("select h from d where g = 4242") == server.psql("select md5('4242')")
        after = smaps_vma(s.backend_pid, lo)
        print(f"daemon: {len(done)} ranges collapsed through "
              f"{sorted({r['pid'] for r in done})}; backend {s.backend_pid}: ShmemPmdMapped "
              f"{after['ShmemPmdMapped']} kB of Rss {after['Rss']} kB", file=sys.stderr)
        assert after["Rss"] > 30_000
        assert after["ShmemPmdMapped"] >= 0.95 * after["Rss"], after


def test_started_at_never_is_misaligned_and_nothing_is_attempted(capsys):
    server = started("never")
    try:
        with server.session() as s:
            lo, hi = server.shared_memory_vma(s.backend_pid)
            assert lo % (2 << 20) != 0 or smaps_vma(s.backend_pid, lo)["Size"] < 4096
            scan = hugepaged(capsys, "scan", "--pid", str(s.backend_pid),
                             "--set", "shmem_enabled=always")
            proc = scan["processes"][0]
            assert proc["ineligible"].get("MISALIGNED", 0) >= smaps_vma(
                s.backend_pid, lo)["Rss"]
            doc = hugepaged(capsys, "collapse", "--pid", str(s.backend_pid), "--force",
                            "--set", "shmem_enabled=always")
            assert [w for w in doc["windows"] if lo <= int(w["address"], 16) < hi] == []
            assert smaps_vma(s.backend_pid, lo)["ShmemPmdMapped"] == 0
            assert s.query("select 1") == "1"
    finally:
        server.close()
