"""The netlink process connector: fork, exec and exit events (root, CONFIG_PROC_EVENTS)."""

import contextlib
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_COMM = 0x00000200  # PR_SET_NAME, or a write to /proc/PID/comm
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HDR = struct.Struct("=IIQ")
_FORK = struct.Struct("=IIII")  # parent_pid, parent_tgid, child_pid, child_tgid
_PIDS = struct.Struct("=II")  # process_pid, process_tgid (exec, comm, exit)
_NAMES = {PROC_EVENT_EXEC: "exec", PROC_EVENT_COMM: "comm", PROC_EVENT_EXIT: "exit"}


@dataclass(frozen=True)
class ProcEvent:
    """One event about a thread-group leader: what ('fork'/'exec'/'comm'/'exit') and its
    pid."""

    what: str
    pid: int


class ProcConnector:
    """A listening NETLINK_CONNECTOR socket; fileno() goes into the daemon's selector."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            self.sock.bind((os.getpid(), CN_IDX_PROC))
            self._control(PROC_CN_MCAST_LISTEN)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def _control(self, op: int) -> None:
        payload = struct.pack("=I", op)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid())
        self.sock.send(hdr + cn)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._control(PROC_CN_MCAST_IGNORE)
        self.sock.close()

    def events(self) -> list[ProcEvent]:
        """Drain what is queued now; threads (pid != tgid) are left out."""
        out: list[ProcEvent] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:  # ENOBUFS: events were lost; the /proc walk catches up
                return out
            out.extend(parse_events(data))


def parse_events(data: bytes) -> list[ProcEvent]:
    """Parse one datagram of netlink messages carrying proc_event structs."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, off)[0]
        if length < _NLMSGHDR.size:
            break
        body = off + _NLMSGHDR.size + _CN_MSG.size
        if body + _EVENT_HDR.size <= off + length:
            what = _EVENT_HDR.unpack_from(data, body)[0]
            ev = body + _EVENT_HDR.size
            if what == PROC_EVENT_FORK:
                _, _, child_pid, child_tgid = _FORK.unpack_from(data, ev)
                if child_pid == child_tgid:
                    out.append(ProcEvent("fork", child_tgid))
            elif what in _NAMES:
                pid, tgid = _PIDS.unpack_from(data, ev)
                if pid == tgid:  # the leader's: a thread's name is not the process's
                    out.append(ProcEvent(_NAMES[what], tgid))
        off += (length + 3) & ~3
    return out
