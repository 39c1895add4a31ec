"""A real PostgreSQL 15: its shared buffers are one MAP_SHARED|MAP_ANONYMOUS mapping.

Started while shmem_enabled=advise, the kernel maps the buffers 2 MiB-aligned and hugepaged
collapses a backend's view of them (the knob is back at `never` by then, as the issue saw);
started at `never`, the mapping is misaligned: hugepaged says MISALIGNED and tries nothing.
"""

from __future__ import annotations

import json

import pytest

from hugepaged.cli import main

from . import marks, pg
from .helpers import drain_lru, saved_thp, smaps_vma

pytestmark = [*marks.KERNEL,
              pytest.mark.skipif(not pg.available(), reason="PostgreSQL 15 not installed")]

ROWS = 1_500_000  # about 100 MB of table: most of 256 MB of buffers after pg_prewarm
SIZE_KNOB = "hugepages-2048kB/shmem_enabled"


def started(mode: str) -> pg.Postgres:
    """A cluster started while the kernel's shmem_enabled is `mode`, which is put back
    right after the start (the mapping keeps the alignment it got)."""
    with saved_thp(**{SIZE_KNOB: "inherit", "shmem_enabled": mode}):
        return pg.Postgres(shared_buffers="256MB").__enter__()


def hugepaged(capsys, *argv: str) -> dict:
    drain_lru()
    rc = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_backend_buffers_collapse_and_the_database_answers(capsys):
    server = started("advise")
    try:
        server.psql(f"create table t as select g, md5(g::text) as h "
                    f"from generate_series(1, {ROWS}) g")
        server.psql("create extension pg_prewarm")
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
            assert s.query("select h from t where g = 4242") == \
                server.psql("select md5('4242')")
    finally:
        server.close()


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
