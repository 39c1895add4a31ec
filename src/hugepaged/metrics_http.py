"""The metrics endpoint's HTTP server: one thread at the daemon's nice, one event loop, a
bounded number of connections with deadlines, and an exposition rendered at most once a
second.

prometheus_client's own server started a thread per connection, at nice 0 (its threads began
before the daemon reniced itself), and rendered every scrape anew: three scrape loops by user
nobody took 190% of a core, and 273 idle connections were 276 threads. Here a connection costs
an fd and a buffer, never a thread; one that has not sent its request within REQUEST_TIMEOUT,
or not taken its reply within REPLY_TIMEOUT, is closed; at most MAX_CONNECTIONS are open at
once, and when they are, a new one replaces the oldest that has still not sent a request (so
idle connections cannot keep a scraper out: its request comes at once and is answered from
the cache); connections are accepted at most MAX_RATE a second past a burst (a flood waits
in the kernel's backlog); and a scrape loop costs one rendering per CACHE_SECONDS however fast it
asks.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hugepaged.control.accept import ACCEPT_RETRY, accept_one

log = logging.getLogger("hugepaged")
MAX_CONNECTIONS = 128  # open at once; each costs an fd and a buffer
BACKLOG = 128
REQUEST_TIMEOUT = 3.0  # the whole request (line and headers) within this of the accept
REPLY_TIMEOUT = 10.0  # and the reply taken within this of the accept
MAX_REQUEST = 8192  # a scrape's request is a few hundred bytes
CACHE_SECONDS = 1.0
NICE = 19  # the daemon's own (set_user_nice(current, 19)); a thread's nice is its own
# Connections accepted per second after a burst of MAX_BURST: a scraper needs one per scrape;
# a flood waits in the kernel's backlog instead of costing the daemon most of a core (each
# request ~0.1 ms: 8,000 a second from 3 curls took 65% of a core before this limit).
MAX_RATE = 50.0
MAX_BURST = 2 * MAX_CONNECTIONS  # room for a full table of idle ones and the scrapers
ACCEPT_BATCH = 16  # accepted per round; then what is readable is served
IDLE_GRACE = 0.5  # a connection silent this long may be replaced (a scraper asks at once)
DRAIN_TIMEOUT = 1.0  # after the reply, for the peer's close (what it sends meanwhile is read)

# render(accept_header) -> (body, content type): prometheus_client's encoder for that Accept.
Render = Callable[[str], tuple[bytes, str]]


@dataclass
class _Conn:
    sock: socket.socket
    since: float
    deadline: float
    answered_by: float
    inbuf: bytes = b""
    out: bytes = b""
    answered: bool = False
    draining: bool = False  # reply sent, write side shut: reading to the peer's close


class MetricsHTTPServer:
    """Serves GET/HEAD / and /metrics on (host, port) from a thread of its own; close()."""

    def __init__(self, host: str, port: int, render: Render) -> None:
        self.render = render
        self._cache: dict[tuple[str, bool], tuple[float, bytes, str]] = {}
        self.renders = 0  # expositions rendered (a test counts them)
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)[0]
        self.sock = socket.socket(info[0], socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(info[4])
            self.sock.listen(BACKLOG)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._listening, self._accept_again = True, 0.0
        self._tokens, self._refilled = float(MAX_BURST), time.monotonic()
        self._conns: dict[int, _Conn] = {}
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        self._thread = threading.Thread(target=self._serve, name="hugepaged-metrics",
                                        daemon=True)
        self._thread.start()

    # --- the loop --------------------------------------------------------------------------
    def _serve(self) -> None:
        # Before anything else: this thread renders for whoever connects, and may start
        # before the daemon's own renice, which changes the calling thread only.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while True:
            try:
                if not self._step():
                    return
            except Exception:  # noqa: BLE001 - the endpoint must outlive any request
                log.exception("metrics server error", extra={"event": "metrics_error"})
                time.sleep(0.1)

    def _step(self) -> bool:
        now = time.monotonic()
        deadlines = [c.deadline for c in self._conns.values()]
        if not self._listening and self._accept_again:
            deadlines.append(self._accept_again)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, events in self._sel.select(timeout):
            if key.data == "stop":
                return False
            if key.data is None:
                self._accept()
            else:
                self._io(key.data, events)
        now = time.monotonic()
        for c in [c for c in self._conns.values() if c.deadline <= now]:
            self._drop(c)
        self._resume_accepting(now)
        return True

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            now = time.monotonic()
            victim = None
            if len(self._conns) >= MAX_CONNECTIONS:
                victim, when = self._victim()
                if victim is None or when > now:
                    # All busy or all new: again when one closes or the oldest is stale.
                    self._pause(when if victim else 0.0)
                    return
            self._tokens = min(MAX_BURST, self._tokens + (now - self._refilled) * MAX_RATE)
            self._refilled = now
            if self._tokens < 1:  # over the rate: the next ones wait in the backlog
                self._pause(now + (1 - self._tokens) / MAX_RATE)
                return
            conn, exhausted = accept_one(self.sock)
            if conn is None:
                if exhausted:
                    self._pause(time.monotonic() + ACCEPT_RETRY)
                return
            self._tokens -= 1
            if victim is not None:  # the table is full: the oldest silent one makes room
                self._drop(victim)
            conn.setblocking(False)
            c = _Conn(conn, now, now + REQUEST_TIMEOUT, now + REPLY_TIMEOUT)
            self._conns[conn.fileno()] = c
            self._sel.register(conn, selectors.EVENT_READ, c)

    def _victim(self) -> tuple[_Conn | None, float]:
        """The connection a new one may replace, and from when: one already answered (its
        reply sent, the peer yet to close) at once, else the oldest that has sent nothing
        once it has been silent IDLE_GRACE."""
        done = next((c for c in self._conns.values() if c.draining), None)
        if done is not None:
            return done, 0.0
        silent = [c for c in self._conns.values() if not c.answered]
        oldest = min(silent, key=lambda c: c.since, default=None)
        return oldest, oldest.since + IDLE_GRACE if oldest else 0.0

    def _pause(self, until: float) -> None:
        if self._listening:
            self._sel.unregister(self.sock)
            self._listening = False
        self._accept_again = until

    def _resume_accepting(self, now: float) -> None:
        if self._listening:
            return
        if self._accept_again:  # a time was set: then, whatever the table (accept decides)
            if now < self._accept_again:
                return
        elif len(self._conns) >= MAX_CONNECTIONS:
            return
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._listening, self._accept_again = True, 0.0

    def _io(self, c: _Conn, events: int) -> None:
        try:
            if c.draining:  # what the peer still sends is dropped; closing now would reset
                if not c.sock.recv(1 << 16):  # the connection and lose the reply
                    self._drop(c)
                return
            if events & selectors.EVENT_READ and not c.answered:
                chunk = c.sock.recv(MAX_REQUEST + 1 - len(c.inbuf))
                c.inbuf += chunk
                if b"\r\n\r\n" in c.inbuf or b"\n\n" in c.inbuf:
                    self._answer(c, *self._respond(c.inbuf))
                elif len(c.inbuf) > MAX_REQUEST:
                    self._answer(c, 431, "text/plain", b"request too large\n")
                elif not chunk:
                    self._drop(c)
                    return
            if c.answered and c.out:
                sent = c.sock.send(c.out)
                c.out = c.out[sent:]
            if c.answered and not c.out:
                c.sock.shutdown(socket.SHUT_WR)
                c.draining = True
                c.deadline = min(c.deadline, time.monotonic() + DRAIN_TIMEOUT)
                self._sel.modify(c.sock, selectors.EVENT_READ, c)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the peer went away
            self._drop(c)

    def _answer(self, c: _Conn, status: int, ctype: str, body: bytes,
                head: bool = False, encoding: str = "") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large",
                  500: "Internal Server Error"}[status]
        extra = f"Content-Encoding: {encoding}\r\n" if encoding else ""
        header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n{extra}"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        c.answered, c.out, c.deadline = True, header + (b"" if head else body), c.answered_by
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _respond(self, request: bytes) -> tuple:
        """(status, content type, body, head, encoding) for one request."""
        lines = request.decode("latin-1").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain", b"bad request\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET or HEAD\n"
        if target.split("?", 1)[0] not in ("/", "/metrics"):
            return 404, "text/plain", b"see /metrics\n"
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        gzipped = "gzip" in headers.get("accept-encoding", "")
        try:
            body, ctype = self.exposition(headers.get("accept", ""), gzipped)
        except Exception:  # noqa: BLE001 - a collector error is the scraper's 500
            log.exception("metrics collection failed", extra={"event": "metrics_error"})
            return 500, "text/plain", b"collection failed\n"
        return 200, ctype, body, method == "HEAD", "gzip" if gzipped else ""

    # --- the cache ---------------------------------------------------------------------------
    def exposition(self, accept: str, gzipped: bool) -> tuple[bytes, str]:
        """The rendered exposition for this Accept header, reused for CACHE_SECONDS."""
        from prometheus_client.exposition import choose_encoder

        ctype_key = choose_encoder(accept)[1]
        key = (ctype_key, gzipped)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1], hit[2]
        body, ctype = self.render(accept)
        self.renders += 1
        if gzipped:
            body = gzip.compress(body, compresslevel=6)
        self._cache[key] = (time.monotonic(), body, ctype)
        return body, ctype

    # --- stop ------------------------------------------------------------------------------
    def _drop(self, c: _Conn) -> None:
        if self._conns.pop(c.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(5)
        for c in list(self._conns.values()):
            self._drop(c)
        self._sel.close()
        self.sock.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
