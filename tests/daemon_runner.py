"""A real `hugepaged run` as a subprocess, for the daemon and control tests and the benchmarks.

Talks to the daemon the way any client does: the control socket (raw bytes or one JSON line
each way) and the command line. Never imports hugepaged, so that what the tests check is what
a user sees, and so that a malformed request can be sent byte for byte.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


class DaemonError(RuntimeError):
    pass


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def hugepaged_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """`python -m hugepaged ARGS...` to completion, output captured as text."""
    return subprocess.run([sys.executable, "-m", "hugepaged", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd="/")


def request(path: str, payload: bytes | dict, timeout: float = 10.0) -> dict:
    """One request on a control socket (a dict goes as one JSON line); the parsed reply."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply)


class Daemon:
    """`hugepaged run --socket TMP --log-format json --log-level debug ARGS...`.

    The socket lives in a fresh directory of mode 0755, so that other users reach the socket
    itself and its own mode decides. Log records are collected from stderr on a thread.
    Use as a context manager: the process is killed on the way out, whatever happens.
    """

    def __init__(self, *, pids: Sequence[int] = (), sets: dict[str, Any] | None = None,
                 config: str | None = None, args: Sequence[str] = (),
                 log_level: str = "debug") -> None:
        self.dir = tempfile.mkdtemp(prefix="hugepaged-test-")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "hugepaged.sock")
        cmd = [sys.executable, "-m", "hugepaged", "run", "--socket", self.socket,
               "--log-format", "json", "--log-level", log_level]
        for pid in pids:
            cmd += ["--pid", str(pid)]
        for key, value in (sets or {}).items():
            cmd += ["--set", f"{key}={value}"]
        if config is not None:
            cmd += ["--config", config]
        self.cmd = cmd + list(args)
        self.proc: subprocess.Popen | None = None
        self.records: list[dict] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._watchers: list[tuple[Callable[[dict], Any], Callable[[dict], Any] | None,
                                   threading.Event]] = []

    # -- lifecycle
    def start(self, timeout: float = 15.0) -> Daemon:
        # SIGKILLed if the test or benchmark dies without its finally blocks (kill -9).
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd="/", preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    self._reader.join(5)
                    raise DaemonError(f"daemon exited with {self.proc.returncode}: "
                                      + "\n".join(self.raw[-20:]))
                try:
                    self.status()
                    return self
                except (OSError, ValueError):
                    if time.monotonic() > deadline:
                        raise DaemonError("daemon did not answer on its socket: "
                                          + "\n".join(self.raw[-20:])) from None
                    time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, float]:
        """Send `sig` and wait: (exit status, seconds until the process had exited)."""
        t0 = time.monotonic()
        self.send(sig)
        rc = self.proc.wait(timeout)
        took = time.monotonic() - t0
        if self._reader is not None:
            self._reader.join(5)
        return rc, took

    def wait_exit(self, timeout: float = 10.0) -> int:
        """The exit status, once the process has exited and its log is read to the end."""
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    # -- the log
    def _read(self) -> None:
        for line in self.proc.stderr:
            text = line.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.raw.append(text)
                with contextlib.suppress(ValueError):
                    rec = json.loads(text)
                    if isinstance(rec, dict):
                        self.records.append(rec)
                        self._watch(rec)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _watch(self, rec: dict) -> None:
        for w in list(self._watchers):
            pred, action, done = w
            if pred(rec):
                self._watchers.remove(w)
                if action is not None:
                    action(rec)
                done.set()

    def when(self, pred: Callable[[dict], Any],
             action: Callable[[dict], Any] | None = None) -> threading.Event:
        """Run action(record) on the reader thread as soon as a record satisfies pred.

        For reacting inside a pass: the reader acts the moment the line arrives, where a
        waiting main thread may lose the race for the lock to a reader busy with a flood of
        lines. The returned Event is set once it has run.
        """
        done = threading.Event()
        with self._cond:
            hit = next((r for r in self.records if pred(r)), None)
            if hit is None:
                self._watchers.append((pred, action, done))
                return done
        if action is not None:
            action(hit)
        done.set()
        return done

    def events(self, event: str, **match: Any) -> list[dict]:
        with self._cond:
            return [r for r in self.records if r.get("event") == event
                    and all(r.get(k) == v for k, v in match.items())]

    def wait_log(self, pred: Callable[[list[dict]], Any], timeout: float = 10.0) -> None:
        """Block until pred(records) holds (checked on every new line)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.records):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("log condition not met: " + "\n".join(self.raw[-10:]))
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise DaemonError(f"daemon exited with {self.proc.returncode}: "
                                      + "\n".join(self.raw[-10:]))
                self._cond.wait(min(left, 0.2))

    def collapsed(self, pid: int | None = None) -> list[int]:
        """Addresses the log says were collapsed (of `pid`), in order."""
        return [int(r["address"], 16) for r in self.events("collapse")
                if r.get("result") == "SUCCEED" and (pid is None or r.get("pid") == pid)]

    # -- the control socket
    def request(self, payload: bytes | dict, timeout: float = 10.0) -> dict:
        return request(self.socket, payload, timeout)

    def status(self) -> dict:
        reply = self.request({"cmd": "status"})
        if not reply.get("ok"):
            raise DaemonError(f"status refused: {reply}")
        return reply["status"]

    def get(self, key: str) -> Any:
        reply = self.request({"cmd": "get", "key": key})
        if not reply.get("ok"):
            raise DaemonError(f"get {key}: {reply}")
        return reply["value"]

    def set(self, key: str, value: Any) -> dict:
        """The raw reply: {"ok": true, "value": ...} or {"ok": false, "error": ...}."""
        return self.request({"cmd": "set", "key": key, "value": str(value)})

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """A hugepaged subcommand against this daemon's socket."""
        return hugepaged_cli(*args, "--socket", self.socket, timeout=timeout)

    def wait_for(self, pred: Callable[[dict], Any], timeout: float = 15.0,
                 interval: float = 0.02, what: str = "condition") -> dict:
        """Poll status until pred(status) is true; returns that status."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise DaemonError(f"daemon exited with {self.proc.returncode}: "
                                  + "\n".join(self.raw[-20:]))
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                brief = {k: st.get(k) for k in ("counters", "results", "registered",
                                                "processes", "cursor", "state")}
                raise TimeoutError(f"{what} not reached in {timeout} s; status: "
                                   f"{json.dumps(brief)}")
            time.sleep(interval)


def slot_of(st: dict, pid: int) -> dict | None:
    return next((p for p in st["processes"] if p["pid"] == pid), None)


def settled(st: dict, pid: int) -> bool:
    """The slot of `pid` finished a full scan that found nothing (left) to do."""
    slot = slot_of(st, pid)
    return slot is not None and slot["settled_seconds"] > 0


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (or kernel thread) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
