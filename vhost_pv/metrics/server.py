"""`serve --metrics HOST:PORT`: GET /metrics in the Prometheus text format, on the event loop.

Why on the event loop (aiohttp) and not prometheus_client's own server thread: the collector
reads state the loop owns and changes (the served volumes, their connections, the guard's and
watchers' counters); read from another thread it would race those changes (a dict changing
size under iteration) or need locks the loop would then wait on. On the loop, the snapshot is
consistent and takes microseconds per volume (a few cffi calls per queue); only turning it
into text, which reads no daemon state, goes to a thread of its own, one scrape at a time
(not the loop's default executor, where a reclaim may wait for a seal for minutes). And
prometheus_client's server (http.server, a thread per connection, no timeouts) would let any
local process hold threads open forever; this one is built like the metadata server:

- its own listener and accept loop (sockfile.Acceptor: EMFILE and the like do not end it),
  at most MAX_CONNECTIONS connections and never below FD_RESERVE free fds;
- a connection with no request in a handler for `idle_timeout` seconds is closed (slow
  headers, idle keep-alive, a connection that never sends anything);
- GET or HEAD of /metrics only (405 / 404 otherwise), bodies are never read, header sizes
  are aiohttp's limits;
- loopback unless an address is given on purpose (the endpoint has no authentication).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from vhost_pv.metrics.collector import DaemonCollector, latency_bounds
from vhost_pv.sockfile import Acceptor, fds_free, watch_task

log = logging.getLogger("vhost_pv.metrics")

PATH = "/metrics"
MAX_CONNECTIONS = 16
"""HTTP connections at once: more are closed at accept (Prometheus needs one per target)."""
FD_RESERVE = 64
"""fds kept free for the vhost-user sockets: no metrics connection is taken below this."""


def render(state: dict[str, Any], bounds: list[float]) -> bytes:
    """The exposition text of one snapshot, with the process's own metrics (process_*)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(state, bounds))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return bytes(generate_latest(registry))


class MetricsServer:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str, port: int, *,
                 idle_timeout: float = 10.0) -> None:
        self.snapshot = snapshot
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.scrapes = 0
        self.refused = 0
        self.dropped = 0
        self._bounds = latency_bounds()
        self._render_lock = asyncio.Lock()
        self._renderer: concurrent.futures.ThreadPoolExecutor | None = None
        self._runner: web.AppRunner | None = None
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Open connections: [deadline (monotonic), requests in a handler now].
        self._connections: dict[asyncio.Transport, list[float]] = {}

    async def start(self) -> None:
        loopback = ipaddress.ip_address(self.host).is_loopback  # ValueError before anything is set up
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=self.idle_timeout)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            await self._runner.cleanup()
            self._runner = None
            raise
        self._listener = sock
        self.port = int(sock.getsockname()[1])  # ephemeral: learn what the kernel gave
        self._renderer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._tasks = [watch_task(asyncio.create_task(self._accept_loop(), name="metrics-accept"), log),
                       watch_task(asyncio.create_task(self._expire_loop(), name="metrics-expire"), log)]
        if not loopback:
            log.warning("metrics on http://%s:%d%s: not loopback, and the endpoint has no authentication",
                        self.host, self.port, PATH)
        log.info("metrics on http://%s:%d%s", self.host, self.port, PATH)

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
        if self._renderer is not None:
            self._renderer.shutdown(wait=False, cancel_futures=True)
            self._renderer = None

    async def _accept_loop(self) -> None:
        assert self._listener is not None and self._runner is not None
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        acceptor = Acceptor(self._listener, "metrics http", log)
        while True:
            sock = await acceptor.accept()
            self._forget_closed()
            if len(self._connections) >= MAX_CONNECTIONS or not fds_free(FD_RESERVE):
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("metrics: connection closed at accept: %d open, or fds short "
                                "(%d dropped in all)", len(self._connections), self.dropped)
                sock.close()
                continue
            try:
                transport, _ = await loop.connect_accepted_socket(server, sock)
            except OSError as exc:
                log.warning("metrics: cannot set up a connection: %s", exc)
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
                    transport.abort()
                    del self._connections[transport]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        entry = self._connections.get(request.transport) if request.transport else None
        if entry is not None:
            entry[1] += 1
        try:
            return await self._answer(request)
        finally:
            if entry is not None:
                entry[1] -= 1
                entry[0] = time.monotonic() + self.idle_timeout

    def _refuse(self, request: web.Request, status: int, why: str) -> web.Response:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.info("metrics: refused %s %s (%s; %d refused in all)", request.method, request.path[:200],
                     why, self.refused)
        return web.Response(status=status, text=why + "\n")

    async def _answer(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return self._refuse(request, 405, "only GET is served")
        if request.path != PATH:
            return self._refuse(request, 404, f"metrics are at {PATH}")
        # One scrape renders at a time; the snapshot is taken when its turn comes.
        async with self._render_lock:
            state = self.snapshot()
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self._renderer, render, state, self._bounds)
        self.scrapes += 1
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
