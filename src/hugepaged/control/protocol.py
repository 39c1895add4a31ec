"""One JSON object per line each way; requests larger than MAX_MESSAGE are refused."""

import json
from typing import Any

MAX_MESSAGE = 4096


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
