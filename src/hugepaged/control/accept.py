"""accept() for the daemon's two listening sockets (the control socket, /metrics), with one
reading of its errors: both must outlive a file-descriptor limit that others can run them
into, and neither may spin on it."""

from __future__ import annotations

import errno
import socket

ACCEPT_RETRY = 0.1  # after EMFILE: let fds come back before accepting again
# No descriptor or buffer for the connection now: accept again ACCEPT_RETRY later.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def accept_one(sock: socket.socket) -> tuple[socket.socket | None, bool]:
    """(connection, exhausted): a pending connection, or None when none is pending
    (exhausted False) or none can be taken now for want of descriptors or memory (exhausted
    True: pause accepting for ACCEPT_RETRY). A connection aborted before it was taken is
    skipped; any other error is raised."""
    while True:
        try:
            return sock.accept()[0], False
        except (BlockingIOError, InterruptedError):
            return None, False
        except OSError as err:
            if err.errno in EXHAUSTED:
                return None, True
            if err.errno != errno.ECONNABORTED:
                raise
