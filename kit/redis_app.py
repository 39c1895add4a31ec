"""A real redis-server for tests and benchmarks: private port, private directory, always cleaned up.

Started with `--enable-debug-command yes` (DEBUG POPULATE fills it), `--save ''` and
`--appendonly no` (nothing written to disk), and `--disable-thp no`: Redis 7 calls
PR_SET_THP_DISABLE on itself when the kernel's `enabled` is `always`, which would hide it from
every collapse; a test that wants that case asks for it with `disable_thp=True`.
Talks RESP over a plain socket. Never imports hugepaged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RespError(RuntimeError):
    pass


class Client:
    """The smallest RESP2 client: one command, one reply."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def command(self, *args: str | bytes | int):
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(out)
        return self._reply()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RespError(f"unexpected reply {line!r}")


class Redis:
    """`with Redis() as r: r.populate(500)`; killed and its directory removed on the way out."""

    def __init__(self, *, disable_thp: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.dir = tempfile.mkdtemp(prefix="hugepaged-redis-")
        self.port = free_port()
        self.cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--dir", self.dir, "--save", "", "--appendonly", "no",
                    "--enable-debug-command", "yes", "--daemonize", "no",
                    "--disable-thp", "yes" if disable_thp else "no",
                    "--logfile", os.path.join(self.dir, "redis.log"), *extra]
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.keys = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> Redis:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.close()
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{err}{self.log()}")
            try:
                self.client = Client(self.port)
                if self.client.command("PING") == "PONG":
                    return self
            except (OSError, RespError):
                if self.client is not None:
                    self.client.close()
                    self.client = None
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.05)

    def __enter__(self) -> Redis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.dir, "redis.log").read_text()[-2000:]
        return ""

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(OSError):
                self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args):
        assert self.client is not None
        return self.client.command(*args)

    def populate(self, mb: int, value_size: int = 1024) -> int:
        """DEBUG POPULATE until used_memory is about `mb` MiB; keys are key:0 .. key:N-1."""
        # A 1 KiB value lands in jemalloc's 1280-byte class, plus the dict entry, the key and
        # the robj: about 1.33x the value (Redis 7.0 with jemalloc 5.3).
        per_key = value_size * 4 // 3
        self.keys = mb * (1 << 20) // per_key
        self.command("DEBUG", "POPULATE", self.keys, "key", value_size)
        return self.keys

    def fill(self, keys: int, value_size: int = 1024, batch: int = 2000) -> int:
        """SET key:%012d for 0..keys-1, pipelined: the names `redis-benchmark -r KEYS` asks
        for (its __rand_int__ is 12 digits, zero-padded), so its GETs all hit."""
        assert self.client is not None
        value = b"x" * value_size
        head = b"*3\r\n$3\r\nSET\r\n$16\r\n"
        tail = b"\r\n$%d\r\n%s\r\n" % (value_size, value)
        for lo in range(0, keys, batch):
            hi = min(keys, lo + batch)
            self.client.sock.sendall(b"".join(head + b"key:%012d" % i + tail
                                              for i in range(lo, hi)))
            for _ in range(lo, hi):
                self.client._reply()
        self.keys = keys
        return keys

    def used_memory(self) -> int:
        info = self.command("INFO", "memory").decode()
        for line in info.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise RespError("INFO memory has no used_memory")

    def get(self, key: str) -> bytes | None:
        return self.command("GET", key)

    def expected_value(self, i: int, value_size: int = 1024) -> bytes:
        """What DEBUG POPULATE stored for key:i: "value:i" padded with NULs to the size."""
        v = f"value:{i}".encode()
        return (v + b"\0" * value_size)[:value_size] if value_size > len(v) else v


def anon_rollup_kb(pid: int) -> tuple[int, int]:
    """(Anonymous, AnonHugePages) in kB from /proc/PID/smaps_rollup."""
    anon = huge = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Anonymous":
                anon = int(value.split()[0])
            elif key == "AnonHugePages":
                huge = int(value.split()[0])
    return anon, huge
