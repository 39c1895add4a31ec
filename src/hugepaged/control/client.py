"""The command line's end of the control socket.

Whatever answers on the socket path is checked like any other input: a reply that is not
one JSON line of the daemon's shape, that trickles, or that never ends is a one-line error
(DaemonUnreachable, exit 6), never a traceback or a hang."""

import socket
import time
from typing import Any

from hugepaged.control.protocol import MAX_REPLY, ProtocolError, decode_reply, encode
from hugepaged.errors import DaemonUnreachable, InvalidTunable

TIMEOUT = 5.0  # for the connection and each read
DEADLINE = 30.0  # for the whole reply: a server that trickles bytes cannot hold us longer


def _exchange(path: str, msg: dict[str, Any]) -> bytes:
    deadline = time.monotonic() + DEADLINE
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(encode(msg))
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonUnreachable(f"{path}: no whole reply within {DEADLINE:.0f} s")
            s.settimeout(min(TIMEOUT, left))
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                if time.monotonic() < deadline:
                    raise
                raise DaemonUnreachable(f"{path}: no whole reply within {DEADLINE:.0f} s") \
                    from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if chunk.endswith(b"\n"):
                break
            if size > MAX_REPLY:
                raise DaemonUnreachable(f"{path}: malformed reply: larger than "
                                        f"{MAX_REPLY >> 20} MiB")
    return b"".join(chunks)


def request(path: str, msg: dict[str, Any]) -> dict[str, Any]:
    """Send one request, return the reply; a refused key or value raises InvalidTunable."""
    try:
        data = _exchange(path, msg)
    except FileNotFoundError:
        raise DaemonUnreachable(f"{path}: no such socket (is `hugepaged run` running?)") \
            from None
    except OSError as err:
        raise DaemonUnreachable(f"{path}: {err.strerror or err}") from err
    try:
        reply = decode_reply(data, str(msg.get("cmd")))
    except ProtocolError as err:
        raise DaemonUnreachable(f"{path}: malformed reply: {err}") from None
    if not reply["ok"]:
        error = reply.get("error") or "request refused"
        # An unknown key or a value sysfs would refuse: exit 2. Anything else (permission,
        # a malformed request): the daemon refuses us, exit 6.
        if reply.get("kind", "invalid" if msg.get("cmd") == "set" else None) == "invalid":
            raise InvalidTunable(error)
        raise DaemonUnreachable(error)
    return reply
