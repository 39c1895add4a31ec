"""A real `hugepaged run` subprocess for the operations tests (metrics, logs, systemd, top).

The daemon is always targeted (`--pid`), so it never collapses memory of processes other than
the test's own; it logs JSON at debug level, read on a thread into `records`. Stopped with
SIGTERM and killed if it does not stop; use it as a context manager.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest


def hugepaged_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hugepaged", *args]


def hugepaged_cli(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run `hugepaged ARGS...` to completion; stdout and stderr captured as text."""
    return subprocess.run(hugepaged_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def require_tool(name: str, install: str) -> str:
    """The tool's path; a skip with the reason where it is missing, but a failure under CI."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


class Daemon:
    """`hugepaged run --pid ... --log-format json --log-level debug` in a temporary directory.

    pids: the processes it may scan; config: a TOML path; sets: --set KEY=VALUE;
    args: more command-line arguments; env: more environment; log_format/log_level: None to
    leave the option out (the daemon's default then applies).
    """

    def __init__(self, pids: list[int], config: str | None = None,
                 sets: dict[str, Any] | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None, log_format: str | None = "json",
                 log_level: str | None = "debug", start_timeout: float = 15.0) -> None:
        self.tmp = tempfile.mkdtemp(prefix="hugepaged-test-")
        self.socket = os.path.join(self.tmp, "hugepaged.sock")
        argv = ["run", "--socket", self.socket]
        for pid in pids:
            argv += ["--pid", str(pid)]
        if config is not None:
            argv += ["--config", config]
        for key, value in (sets or {}).items():
            argv += ["--set", f"{key}={value}"]
        if log_format is not None:
            argv += ["--log-format", log_format]
        if log_level is not None:
            argv += ["--log-level", log_level]
        self.argv = argv + list(args or [])
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.records: list[dict] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> Daemon:
        self.proc = subprocess.Popen(hugepaged_cmd(*self.argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=self.env, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            deadline = time.monotonic() + self.start_timeout
            while not os.path.exists(self.socket):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"daemon did not start (rc={self.proc.poll()}):\n"
                                         + self.stderr())
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if isinstance(doc, dict):
                        self.records.append(doc)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        proc = self.proc
        if proc is None:
            return 0
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            if self._reader is not None:
                self._reader.join(timeout=5)
            with contextlib.suppress(OSError):
                proc.stderr.close()
        return proc.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def stderr(self) -> str:
        with self._cond:
            return "".join(self.lines)

    # --- the control socket --------------------------------------------------------
    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        from hugepaged.control.client import request

        return request(self.socket, msg)

    def status(self) -> dict[str, Any]:
        return self.request({"cmd": "status"})["status"]

    def get(self, key: str) -> int | str:
        return self.request({"cmd": "get", "key": key})["value"]

    def set(self, key: str, value: Any) -> int | str:
        return self.request({"cmd": "set", "key": key, "value": str(value)})["value"]

    def wait_for(self, pred: Callable[[dict], object], timeout: float = 15.0,
                 what: str = "") -> dict:
        """Poll `status` until pred(status) is truthy; returns that status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"timed out waiting for {what or pred}: {st}\n"
                                     + self.stderr()[-4000:])
            time.sleep(0.05)

    # --- the log ---------------------------------------------------------------------
    def events(self, name: str, **match: Any) -> list[dict]:
        """Log records with this `event` whose fields equal `match`."""
        with self._cond:
            return [r for r in self.records if r.get("event") == name
                    and all(r.get(k) == v for k, v in match.items())]

    def wait_log(self, pred: Callable[[list[dict]], object], timeout: float = 15.0,
                 what: str = ""):
        """Wait until pred(records) is truthy (checked on each new line); returns its value."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = pred(list(self.records))
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"timed out waiting for {what or pred} in the log; "
                                         f"rc={self.proc.poll()}:\n"
                                         + "".join(self.lines)[-4000:])
                self._cond.wait(min(left, 0.1))

    def wait_event(self, name: str, timeout: float = 15.0, **match: Any) -> dict:
        return self.wait_log(lambda _: (self._first(name, match)), timeout,
                             f"event {name} {match}")

    def _first(self, name: str, match: dict) -> dict | None:
        found = [r for r in self.records if r.get("event") == name
                 and all(r.get(k) == v for k, v in match.items())]
        return found[0] if found else None
