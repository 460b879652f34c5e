"""aiohttp on a TCP listener of our own, for the daemon's HTTP endpoints (the metadata server,
/metrics): one home for how an HTTP peer is kept from holding the daemon's resources.

- Our own listener and accept loop rather than aiohttp's site: under uvloop an accept()
  error (EMFILE...) closes a server's listener for good, while sockfile.Acceptor backs off
  and accepts again;
- at most `max_connections` connections at once, and none taken while fewer than
  FD_RESERVE fds are free (the vhost-user sockets come first); more are closed at accept;
- a connection with no request in a handler for `idle_timeout` seconds is closed: slow
  headers (slowloris), idle keep-alive, a connection that never sends anything.

What is served, and what is refused, is the owner's handler.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from vhost_pv.sockfile import Acceptor, fds_free, watch_task

FD_RESERVE = 64
"""fds kept free for the vhost-user sockets: no HTTP connection is taken below this."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GuardedHttpServer:
    def __init__(self, handler: Handler, host: str, port: int, *, what: str, logger: logging.Logger,
                 idle_timeout: float, max_connections: int, backlog: int = 128,
                 log_idle: bool = True) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.what = what
        self.log = logger
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.backlog = backlog
        self.log_idle = log_idle
        """Log each connection closed for idling (off where idle keep-alive is the norm)."""
        self.dropped = 0
        """Connections closed at accept (too many open, or fds short)."""
        self._runner: web.AppRunner | None = None
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Open connections: [deadline (monotonic), requests in a handler now].
        self._connections: dict[asyncio.Transport, list[float]] = {}

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # access_log=None: the owner logs what matters, without request details it did not vet.
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.idle_timeout)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            await self._runner.cleanup()
            self._runner = None
            raise
        self._listener = sock
        self.port = int(sock.getsockname()[1])  # ephemeral: learn what the kernel gave
        self._tasks = [
            watch_task(asyncio.create_task(self._accept_loop(), name=f"{self.what}-accept"), self.log),
            watch_task(asyncio.create_task(self._expire_loop(), name=f"{self.what}-expire"), self.log),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for transport in self._connections:
            transport.abort()
        self._connections.clear()

    async def _accept_loop(self) -> None:
        assert self._listener is not None and self._runner is not None
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        acceptor = Acceptor(self._listener, self.what, self.log)
        while True:
            sock = await acceptor.accept()
            self._forget_closed()
            if len(self._connections) >= self.max_connections or not fds_free(FD_RESERVE):
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    self.log.warning("%s: connection closed at accept: %d open, or fds short "
                                     "(%d dropped in all)", self.what, len(self._connections), self.dropped)
                sock.close()
                continue
            try:
                transport, _ = await loop.connect_accepted_socket(server, sock)
            except OSError as exc:
                self.log.warning("%s: cannot set up a connection: %s", self.what, exc)
                sock.close()
                continue
            self._connections[transport] = [time.monotonic() + self.idle_timeout, 0]

    def _forget_closed(self) -> None:
        for transport in [t for t in self._connections if t.is_closing()]:
            del self._connections[transport]

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout / 4))
            now = time.monotonic()
            self._forget_closed()
            for transport, (deadline, active) in list(self._connections.items()):
                if not active and now >= deadline:
                    if self.log_idle:
                            self.log.info("%s: closing a connection with no complete request for %g s",
                                      self.what, self.idle_timeout)
                    transport.abort()
                    del self._connections[transport]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # A request in a handler (a long poll, a scrape rendering) keeps its connection open.
        entry = self._connections.get(request.transport) if request.transport else None
        if entry is not None:
            entry[1] += 1
        try:
            return await self.handler(request)
        finally:
            if entry is not None:
                entry[1] -= 1
                entry[0] = time.monotonic() + self.idle_timeout
