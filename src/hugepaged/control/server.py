"""The daemon's end of the control socket, served on its own thread.

One event loop over non-blocking connections: no client can stall the scan (a different
thread) or another client (every connection has a deadline, and a slow one only holds its
own buffer). The socket is locked (`PATH.lock`, flock) so a second daemon refuses to start
instead of taking the path over and unlinking it when it exits.
"""

import contextlib
import grp
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from hugepaged.config import check_socket_path
from hugepaged.control.accept import ACCEPT_RETRY, accept_one
from hugepaged.control.protocol import MAX_MESSAGE, ProtocolError, decode_request, encode
from hugepaged.errors import AlreadyRunning, HugepagedError, InvalidTunable, UsageError
from hugepaged.kernel.limits import LockHeld, check_private_dir, try_lock
from hugepaged.kernel.peercred import peer_credentials

log = logging.getLogger("hugepaged")
CLIENT_TIMEOUT = 1.0  # a request must have arrived whole this long after connect
REPLY_TIMEOUT = 2.0  # and the reply must have been taken this long after connect
BACKLOG = max(1024, socket.SOMAXCONN)  # bursts of clients wait in the kernel's queue
MAX_CONNECTIONS = 64  # served at once; more stay in the backlog (each costs an fd)


class Controlled(Protocol):
    def status(self) -> dict[str, Any]: ...
    def get(self, key: str) -> int | str: ...
    def set(self, key: str, value: str) -> None: ...


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytes = b""
    out: bytes = field(default=b"")
    answered: bool = False


class ControlServer:
    """A listening Unix socket, mode 0600 (0660 with a group): root may read and set; the
    group's members may read (status, get), and set only with socket_group_may_set, since a
    set can quiet the kernel's khugepaged or lift the CPU cap (max_cpu_percent = 0)."""

    def __init__(self, path: str, target: Controlled, group: str | None = None,
                 group_may_set: bool = False) -> None:
        self.path, self.target = check_socket_path(path), target
        self.group_may_set = group_may_set
        try:
            self.gid = grp.getgrnam(group).gr_gid if group else None
        except KeyError:
            raise UsageError(f"socket_group: no such group '{group}'") from None
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        check_private_dir(directory, "socket")  # its lock file and socket are root's
        self.lock_fd = self._lock()
        try:
            self.sock = self._bind()
        except BaseException:
            os.close(self.lock_fd)
            raise
        self._conns: dict[int, _Conn] = {}
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._listening = True
        self._accept_again = 0.0
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        self._thread: threading.Thread | None = None
        self._closed = False

    def _lock(self) -> int:
        """One daemon per socket path: the lock is held for the life of the server."""
        lock = f"{self.path}.lock"
        try:
            return try_lock(lock)
        except LockHeld as held:  # the holder as the kernel reports it (/proc/locks)
            raise AlreadyRunning(f"{self.path}: another hugepaged{held.describe()} is serving "
                                 "this socket; not started") from None
        except OSError as err:
            raise UsageError(f"{lock}: {err.strerror}") from None

    def _bind(self) -> socket.socket:
        # We hold the lock: whatever is at the path is stale (a killed daemon's socket).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Created with its final mode; the group set without following a link.
        old = os.umask(0o117 if self.gid is not None else 0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(self.path, 0, self.gid, follow_symlinks=False)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        return sock

    def fileno(self) -> int:
        return self.sock.fileno()

    # --- the thread --------------------------------------------------------------------
    def start(self) -> None:
        """Serve on a thread of its own until close()."""
        self._thread = threading.Thread(target=self._serve, name="hugepaged-control",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # The daemon runs at nice 19; this thread does microseconds of work per request and
        # its latency is what operators and watchdogs see, so it asks for the default nice.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
        while not self._closed:
            try:
                if not self.step(None):
                    return
            except Exception:  # noqa: BLE001 - the control thread must outlive any request
                log.exception("control socket loop error", extra={"event": "control_error"})
                time.sleep(0.1)

    def step(self, timeout: float | None) -> bool:
        """One round: wait for readiness (at most until the nearest deadline), serve it,
        expire late connections. False once stopped."""
        now = time.monotonic()
        wait = min((c.deadline for c in self._conns.values()), default=None)
        if not self._listening and self._accept_again:
            wait = min(wait, self._accept_again) if wait is not None else self._accept_again
        if wait is not None:
            left = max(0.0, wait - now)
            timeout = left if timeout is None else min(timeout, left)
        for key, events in self._sel.select(timeout):
            if key.data == "stop":
                return False
            if key.data is None:
                self._accept()
            else:
                self._io(key.data, events)
        self._expire(time.monotonic())
        self._resume_accepting()
        return True

    def handle_ready(self) -> None:
        """Serve what is ready now, without blocking (for callers with their own loop)."""
        self.step(0)

    def _accept(self) -> None:
        while len(self._conns) < MAX_CONNECTIONS:
            conn, exhausted = accept_one(self.sock)
            if conn is None:
                if exhausted:
                    self._pause_accepting(time.monotonic() + ACCEPT_RETRY)
                return
            conn.setblocking(False)
            state = _Conn(conn, time.monotonic() + CLIENT_TIMEOUT)
            self._conns[conn.fileno()] = state
            self._sel.register(conn, selectors.EVENT_READ, state)
        self._pause_accepting(0.0)  # full: resumed when a connection closes

    def _pause_accepting(self, until: float) -> None:
        if self._listening:
            self._sel.unregister(self.sock)
            self._listening = False
        self._accept_again = until

    def _resume_accepting(self) -> None:
        if self._listening or len(self._conns) >= MAX_CONNECTIONS:
            return
        if self._accept_again and time.monotonic() < self._accept_again:
            return
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._listening, self._accept_again = True, 0.0

    def _io(self, c: _Conn, events: int) -> None:
        try:
            if events & selectors.EVENT_READ and not c.answered:
                self._read(c)
            if c.answered and c.out:
                sent = c.sock.send(c.out)
                c.out = c.out[sent:]
            if c.answered and not c.out:
                self._drop(c)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the peer went away; nothing more to tell it
            self._drop(c)

    def _read(self, c: _Conn) -> None:
        chunk = c.sock.recv(MAX_MESSAGE + 1 - len(c.inbuf) if len(c.inbuf) <= MAX_MESSAGE else 1)
        c.inbuf += chunk
        if b"\n" in c.inbuf:
            self._reply(c, self.answer(c.sock, c.inbuf.split(b"\n", 1)[0]))
        elif not chunk or len(c.inbuf) > MAX_MESSAGE:
            self._reply(c, self.answer(c.sock, c.inbuf))

    def _reply(self, c: _Conn, reply: dict[str, Any]) -> None:
        c.answered, c.out = True, encode(reply)
        c.deadline = max(c.deadline, time.monotonic()) + REPLY_TIMEOUT - CLIENT_TIMEOUT
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _expire(self, now: float) -> None:
        for c in [c for c in self._conns.values() if c.deadline <= now]:
            if not c.answered:  # one try to say why, never waiting for the peer
                with contextlib.suppress(OSError):
                    c.sock.send(encode({"ok": False, "error": "timed out waiting for a request"}))
            self._drop(c)

    def _drop(self, c: _Conn) -> None:
        if self._conns.pop(c.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    def close(self) -> None:
        """Stop the thread, close every connection, unlink the socket we own, unlock."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for c in list(self._conns.values()):
            self._drop(c)
        self._sel.close()
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # ours: we hold the lock
        for fd in (self._stop_r, self._stop_w, self.lock_fd):
            os.close(fd)

    # --- one request ---------------------------------------------------------------------
    def allowed(self, conn: socket.socket) -> str | None:
        """The peer's role: "set" (root; socket_group too with socket_group_may_set), "read"
        (socket_group: status and get), None (refused)."""
        _, uid, gids = peer_credentials(conn)
        if uid == 0:
            return "set"
        if self.gid is not None and self.gid in gids:
            return "set" if self.group_may_set else "read"
        return None

    def answer(self, conn: socket.socket, data: bytes) -> dict[str, Any]:
        try:
            role = self.allowed(conn)
            if role is None:
                return {"ok": False, "error": "permission denied", "kind": "denied"}
            msg = decode_request(data)
            if msg["cmd"] == "set" and role != "set":
                return {"ok": False, "kind": "denied", "error": "permission denied: only root "
                        "may set (socket_group members read; socket_group_may_set = true "
                        "lets them set)"}
            return self.dispatch(msg)
        except InvalidTunable as err:  # refused as sysfs refuses: the client exits 2
            return {"ok": False, "error": str(err), "kind": "invalid"}
        except (ProtocolError, HugepagedError) as err:
            return {"ok": False, "error": str(err)}
        except OSError as err:  # the peer went away; the reply will not reach it either
            return {"ok": False, "error": f"connection error: {err.strerror or err}"}
        except Exception as err:  # noqa: BLE001 - no request may stop the daemon
            log.exception("control request failed", extra={"event": "control_error"})
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}

    def dispatch(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg["cmd"]
        if cmd == "status":
            return {"ok": True, "status": self.target.status()}
        if cmd in ("get", "set") and not isinstance(msg.get("key"), str):
            raise ProtocolError(f"'{cmd}' needs a 'key' string")
        if cmd == "get":
            return {"ok": True, "value": self.target.get(msg["key"])}
        if cmd == "set":
            value = msg.get("value")
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise ProtocolError("'set' needs a 'value' string")
            self.target.set(msg["key"], str(value))
            return {"ok": True, "value": self.target.get(msg["key"])}
        raise ProtocolError(f"unknown command '{cmd}'")
