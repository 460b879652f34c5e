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

- guarded_http.GuardedHttpServer's listener and accept loop (EMFILE and the like do not end
  it), at most MAX_CONNECTIONS connections, never below its FD_RESERVE free fds, and a
  connection with no request in a handler for `idle_timeout` seconds closed;
- GET or HEAD of /metrics only (405 / 404 otherwise), bodies are never read, header sizes
  are aiohttp's limits;
- loopback unless an address is given on purpose (the endpoint has no authentication).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from vhost_pv.guarded_http import GuardedHttpServer
from vhost_pv.metrics.collector import DaemonCollector, latency_bounds

log = logging.getLogger("vhost_pv.metrics")

PATH = "/metrics"
MAX_CONNECTIONS = 16
"""HTTP connections at once: more are closed at accept (Prometheus needs one per target)."""


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
        self._bounds = latency_bounds()
        self._render_lock = asyncio.Lock()
        self._renderer: concurrent.futures.ThreadPoolExecutor | None = None
        # Prometheus keeps its connection between scrapes: idle closes are normal, not logged.
        self._http = GuardedHttpServer(self._answer, host, port, what="metrics http", logger=log,
                                       idle_timeout=idle_timeout, max_connections=MAX_CONNECTIONS,
                                       backlog=64, log_idle=False)

    async def start(self) -> None:
        loopback = ipaddress.ip_address(self.host).is_loopback  # ValueError before anything is set up
        await self._http.start()
        self.port = self._http.port  # ephemeral: what the kernel gave
        self._renderer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        if not loopback:
            log.warning("metrics on http://%s:%d%s: not loopback, and the endpoint has no authentication",
                        self.host, self.port, PATH)
        log.info("metrics on http://%s:%d%s", self.host, self.port, PATH)

    async def close(self) -> None:
        await self._http.close()
        if self._renderer is not None:
            self._renderer.shutdown(wait=False, cancel_futures=True)
            self._renderer = None

    @property
    def dropped(self) -> int:
        """Connections closed at accept (too many open, or fds short)."""
        return self._http.dropped

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
