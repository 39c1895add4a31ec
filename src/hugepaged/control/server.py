"""The daemon's end of the control socket: accept, check the peer, answer one request."""

import contextlib
import grp
import logging
import os
import socket
from typing import Any, Protocol

from hugepaged.control.protocol import MAX_MESSAGE, ProtocolError, decode_request, encode
from hugepaged.errors import HugepagedError, InvalidTunable
from hugepaged.kernel.peercred import peer_credentials

log = logging.getLogger("hugepaged")
CLIENT_TIMEOUT = 0.5


class Controlled(Protocol):
    def status(self) -> dict[str, Any]: ...
    def get(self, key: str) -> int | str: ...
    def set(self, key: str, value: str) -> None: ...


class ControlServer:
    """A listening Unix socket, mode 0600 (0660 with a group), root or that group only."""

    def __init__(self, path: str, target: Controlled, group: str | None = None) -> None:
        self.path, self.target = path, target
        self.gid = grp.getgrnam(group).gr_gid if group else None
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(path, 0, self.gid)
            os.chmod(path, 0o660)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def allowed(self, conn: socket.socket) -> bool:
        _, uid, gids = peer_credentials(conn)
        return uid == 0 or (self.gid is not None and self.gid in gids)

    def handle_ready(self) -> None:
        """Serve every pending connection; none of them can stop the daemon."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                try:
                    conn.settimeout(CLIENT_TIMEOUT)
                    conn.sendall(encode(self.answer(conn)))
                except OSError:
                    pass

    def answer(self, conn: socket.socket) -> dict[str, Any]:
        try:
            if not self.allowed(conn):
                return {"ok": False, "error": "permission denied", "kind": "denied"}
            return self.dispatch(decode_request(_read_line(conn)))
        except InvalidTunable as err:  # refused as sysfs refuses: the client exits 2
            return {"ok": False, "error": str(err), "kind": "invalid"}
        except (ProtocolError, HugepagedError) as err:
            return {"ok": False, "error": str(err)}
        except TimeoutError:
            return {"ok": False, "error": "timed out waiting for a request"}
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


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) <= MAX_MESSAGE:
        chunk = conn.recv(MAX_MESSAGE + 1 - len(data) if len(data) <= MAX_MESSAGE else 1)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0] if b"\n" in data else data
