"""A real PostgreSQL 15 for the shared-memory tests and benchmarks (never imports hugepaged).

`Postgres()` runs initdb in a temporary directory as the postgres user, starts the server on a
private port and socket directory, and removes everything afterwards. `Session` is one psql
connection kept open, so its backend (one process) stays the same across statements.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"


def available() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return False
    return (BIN / "postgres").exists() and shutil.which("runuser") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", USER, "--", *argv]


class Postgres:
    """One throwaway cluster; use as a context manager."""

    def __init__(self, shared_buffers: str = "256MB", **settings: str) -> None:
        self.settings = {"shared_buffers": shared_buffers, "huge_pages": "off",
                         "listen_addresses": "", "fsync": "off",
                         "synchronous_commit": "off", "full_page_writes": "off", **settings}
        self.dir = Path(tempfile.mkdtemp(prefix="hugepaged-pg-"))
        self.data, self.sock = self.dir / "data", self.dir / "sock"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Postgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        pw = pwd.getpwnam(USER)
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.sock.mkdir()
        os.chown(self.sock, pw.pw_uid, pw.pw_gid)
        subprocess.run(_as_postgres(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                                    "--no-sync", "-U", USER), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        opts = [f"-c{k}={v}" for k, v in self.settings.items()]
        self.proc = subprocess.Popen(
            _as_postgres(str(BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                         "-k", str(self.sock), *opts),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while subprocess.run(_as_postgres(str(BIN / "pg_isready"), "-q", "-h", str(self.sock),
                                          "-p", str(self.port))).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.1)

    @property
    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def psql(self, sql: str) -> str:
        r = subprocess.run(self.client("psql") + ["-Atq", "-v", "ON_ERROR_STOP=1", "-c", sql],
                           check=True, capture_output=True, text=True)
        return r.stdout.strip()

    def client(self, name: str) -> list[str]:
        return _as_postgres(str(BIN / name), "-h", str(self.sock), "-p", str(self.port),
                            "-U", USER, "-d", "postgres")

    def session(self) -> Session:
        return Session(self)

    def shared_memory_vma(self, pid: int) -> tuple[int, int]:
        """(start, end) of the process's biggest MAP_SHARED|MAP_ANONYMOUS mapping: the
        buffers (shared_memory_type=mmap)."""
        best = (0, 0)
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[1][3] == "s" and parts[5].startswith("/dev/zero"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    if hi - lo > best[1] - best[0]:
                        best = (lo, hi)
        if best == (0, 0):
            raise LookupError(f"pid {pid}: no shared anonymous mapping")
        return best

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: smart shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Session:
    """One psql process, one backend: statements go in on stdin, answers come back a line
    each (every statement here answers with exactly one line)."""

    def __init__(self, pg: Postgres) -> None:
        self.proc = subprocess.Popen(pg.client("psql") + ["-Atq", "-v", "ON_ERROR_STOP=1"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.backend_pid = int(self.query("select pg_backend_pid()"))

    def query(self, sql: str) -> str:
        self.proc.stdin.write(sql.rstrip(";") + ";\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"psql ended on {sql!r}")
        return line.strip()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
