"""Who is on the other end of a Unix socket: SO_PEERCRED plus supplementary groups."""

import socket
import struct

from hugepaged.kernel.errors import process_errors

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket, proc_root: str = "/proc") -> tuple[int, int, set[int]]:
    """(pid, uid, gids) of the peer; gids include the supplementary groups when readable."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    gids = {gid}
    try:
        with process_errors(pid), open(f"{proc_root}/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    gids.update(int(g) for g in line.split()[1:])
    except Exception:  # noqa: BLE001 - the peer may be gone; its primary gid stands
        pass
    return pid, uid, gids
