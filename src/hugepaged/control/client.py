"""The command line's end of the control socket."""

import socket
from typing import Any

from hugepaged.control.protocol import encode
from hugepaged.errors import DaemonUnreachable, InvalidTunable

TIMEOUT = 5.0


def request(path: str, msg: dict[str, Any]) -> dict[str, Any]:
    """Send one request, return the reply; a refused key or value raises InvalidTunable."""
    import json

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(encode(msg))
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise DaemonUnreachable(f"{path}: no such socket (is `hugepaged run` running?)") \
            from None
    except OSError as err:
        raise DaemonUnreachable(f"{path}: {err.strerror or err}") from err
    try:
        reply = json.loads(data)
    except ValueError as err:
        raise DaemonUnreachable(f"{path}: malformed reply") from err
    if not reply.get("ok"):
        error = reply.get("error", "request refused")
        # An unknown key or a value sysfs would refuse: exit 2. Anything else (permission,
        # a malformed request): the daemon refuses us, exit 6.
        if reply.get("kind", "invalid" if msg.get("cmd") == "set" else None) == "invalid":
            raise InvalidTunable(error)
        raise DaemonUnreachable(error)
    return reply
