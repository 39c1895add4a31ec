"""One JSON object per line each way; requests larger than MAX_MESSAGE are refused, and a
reply that is not what the daemon sends (whoever holds the socket path) is a ProtocolError."""

import json
from typing import Any

MAX_MESSAGE = 4096
# A status of 100,000 registered processes is ~15 MiB: a reply larger than this is not ours.
MAX_REPLY = 64 << 20


class ProtocolError(ValueError):
    pass


def decode_request(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message too large (limit {MAX_MESSAGE} bytes)")
    try:
        msg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"malformed message: {err}") from err
    except RecursionError as err:  # "[[[[..." well under MAX_MESSAGE
        raise ProtocolError("malformed message: nested too deeply") from err
    if not isinstance(msg, dict) or not isinstance(msg.get("cmd"), str):
        raise ProtocolError("malformed message: expected an object with a 'cmd' string")
    return msg


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode_reply(data: bytes, cmd: str) -> dict[str, Any]:
    """The daemon's reply to `cmd`, checked for the shape every command relies on: an object
    with a boolean "ok"; a refusal's "error" a string; a status an object with its tunables
    and counters; a value a string or an integer."""
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError("not JSON" if data.strip() else "empty reply") from err
    except RecursionError as err:
        raise ProtocolError("nested too deeply") from err
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ProtocolError("expected an object with a boolean 'ok'")
    if not reply["ok"]:
        if not isinstance(reply.get("error", ""), str) or \
                not isinstance(reply.get("kind", ""), str):
            raise ProtocolError("a refusal without an 'error' string")
        return reply
    if cmd == "status":
        status = reply.get("status")
        if not isinstance(status, dict) or not all(isinstance(status.get(k), dict)
                                                   for k in ("tunables", "counters")):
            raise ProtocolError("a status without its tunables and counters")
    elif cmd in ("get", "set"):
        value = reply.get("value")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ProtocolError("a value that is neither a string nor an integer")
    return reply
