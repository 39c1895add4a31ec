"""A real `hugepaged run` as a subprocess: the one daemon runner of the tests and the benchmarks.

Talks to the daemon the way any client does: the control socket (raw bytes or one JSON line
each way) and the command line. Never imports hugepaged, so that what the tests check is what
a user sees, and so that a malformed request can be sent byte for byte.

Each daemon gets its own directory for its socket, its kernel-khugepaged state file and its
log, so that concurrent runs never collide; it dies with the thread that started it
(PR_SET_PDEATHSIG), and is stopped with SIGTERM, then SIGKILL if it does not exit.
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
    """The daemon exited, did not answer, or refused a request the caller relied on."""


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # SIGTERM, not SIGKILL: a daemon that quietened the kernel's khugepaged puts it back.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def hugepaged_cmd(*args: str) -> list[str]:
    """The command line of `hugepaged ARGS...` with this interpreter (and its PYTHONPATH)."""
    return [sys.executable, "-m", "hugepaged", *args]


def hugepaged_cli(*args: str, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess:
    """`hugepaged ARGS...` to completion, output captured as text, run from `/`."""
    kwargs.setdefault("cwd", "/")
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(hugepaged_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


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
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply)


def _accepts(path: str) -> bool:
    """Whether a Unix socket at `path` accepts a connection (without sending anything)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class Daemon:
    """`hugepaged run --socket DIR/hugepaged.sock --state-file DIR/... [options]`.

    pids: the processes it may scan (none: discovery mode); sets: --set KEY=VALUE; config: a
    TOML path; args: more options; env: more environment (None removes a variable);
    log_format/log_level: None leaves the option out (the daemon's default then applies);
    interpreter_args: options for Python before `-m hugepaged` (a profiler); command: the
    hugepaged command to run instead (another installation's console script); state_file:
    where it saves the kernel's khugepaged settings (default: in its own directory);
    workdir: where its directory is made (kept there after close, with the log as
    daemon.log; default: a temporary one, removed).

    Log lines (stderr) are read on a thread: all of them into `lines`, the JSON ones into
    `records`. Use as a context manager: the process is stopped on the way out, whatever
    happens.
    """

    def __init__(self, pids: Sequence[int] = (), sets: dict[str, Any] | None = None,
                 config: str | None = None, *, args: Sequence[str] = (),
                 env: dict[str, str | None] | None = None, log_format: str | None = "json",
                 log_level: str | None = "debug", interpreter_args: Sequence[str] = (),
                 command: Sequence[str] | None = None, state_file: str | None = None,
                 workdir: str | None = None) -> None:
        self.keep_dir = workdir is not None
        self.dir = tempfile.mkdtemp(prefix="hugepaged-daemon-", dir=workdir)
        os.chmod(self.dir, 0o755)  # other users reach the socket; its own mode decides
        self.socket = os.path.join(self.dir, "hugepaged.sock")
        self.state_file = state_file or os.path.join(self.dir, "kernel-khugepaged.json")
        self.log_path = os.path.join(self.dir, "daemon.log")
        argv = ["run", "--socket", self.socket, "--state-file", self.state_file]
        for pid in pids:
            argv += ["--pid", str(pid)]
        for key, value in (sets or {}).items():
            argv += ["--set", f"{key}={value}"]
        if config is not None:
            argv += ["--config", config]
        if log_format is not None:
            argv += ["--log-format", log_format]
        if log_level is not None:
            argv += ["--log-level", log_level]
        hugepaged = command or [sys.executable, *interpreter_args, "-m", "hugepaged"]
        self.cmd = [*hugepaged, *argv, *args]
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.records: list[dict] = []
        self.stop_seconds: float | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._watchers: list[tuple[Callable[[dict], Any], Callable[[dict], Any] | None,
                                   threading.Event]] = []

    # -- lifecycle
    def start(self, timeout: float = 30.0, ready: str = "status",
              tick: Callable[[], Any] | None = None) -> Daemon:
        """Start it and wait until it is ready: "status" (a status request is answered) or
        "socket" (the socket accepts connections: its first pass may be under way, and a
        request would wait for that pass to end). tick() is called meanwhile."""
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd="/", env=self.env, preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        try:
            while not self._ready(ready):
                if self.proc.poll() is not None:
                    self._reader.join(5)
                    raise DaemonError(f"daemon exited with {self.proc.returncode}: "
                                      + self.log_tail())
                if time.monotonic() > deadline:
                    raise DaemonError("daemon did not answer on its socket: " + self.log_tail())
                if tick is not None:
                    tick()
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self, ready: str) -> bool:
        if ready == "socket":
            return _accepts(self.socket)
        try:
            self.status()
        except (OSError, ValueError):
            return False
        return True

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop it if it runs (SIGTERM, then SIGKILL), finish reading its log, tidy up."""
        try:
            if self.alive():
                self.stop()
            elif self._reader is not None:
                self._reader.join(5)
        finally:
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait; SIGKILL after `timeout`. The exit status; the seconds it took
        to exit are in `stop_seconds`."""
        t0 = time.monotonic()
        if self.alive():
            self.send(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.stop_seconds = time.monotonic() - t0
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def wait_exit(self, timeout: float = 10.0) -> int:
        """The exit status, once the process has exited and its log is read to the end."""
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    # -- the log
    def _read(self) -> None:
        with open(self.log_path, "wb") as log:
            for line in self.proc.stderr:
                log.write(line)
                text = line.decode(errors="replace").rstrip("\n")
                with self._cond:
                    self.lines.append(text)
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

    def stderr(self) -> str:
        """Everything it wrote to stderr so far, one line per line."""
        with self._cond:
            return "".join(line + "\n" for line in self.lines)

    def log_tail(self, n: int = 20) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

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
        """Log records with this `event` whose fields equal `match`."""
        with self._cond:
            return [r for r in self.records if r.get("event") == event
                    and all(r.get(k) == v for k, v in match.items())]

    def wait_log(self, pred: Callable[[list[dict]], Any], timeout: float = 15.0,
                 what: str = "") -> Any:
        """Block until pred(records) is truthy (checked on every new line); its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = pred(self.records)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what or 'log condition'} not met in {timeout} s: "
                                       + self.log_tail(10))
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise DaemonError(f"daemon exited with {self.proc.returncode} before "
                                      f"{what or 'the log condition'}: " + self.log_tail(10))
                self._cond.wait(min(left, 0.2))

    def wait_event(self, event: str, timeout: float = 15.0, **match: Any) -> dict:
        """The first record of `event` with fields `match`, waiting for it to be logged."""
        def first(records: list[dict]) -> dict | None:
            return next((r for r in records if r.get("event") == event
                         and all(r.get(k) == v for k, v in match.items())), None)
        return self.wait_log(first, timeout, f"event {event} {match}")

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
                                  + self.log_tail())
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
