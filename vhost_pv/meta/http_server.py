"""The HTTP metadata server, on a loopback listener that a guest is to reach at
169.254.169.254 through QEMU user networking: the metadata tree under /computeMetadata/v1/,
in the shape cloud guests' tools expect.

Rules: only GET; the `Metadata-Flavor: Google` header is required (a browser or a
server-side request forgery does not send it) and a request carrying X-Forwarded-For is
refused (it came through a proxy); `?recursive=true` answers a directory as JSON;
`?wait_for_change=true` long-polls until the answer's ETag differs from `last_etag` (or
from the current one). `instance/boot-token` gives the boot's one-time token to the first
request only; every later request for it is refused, logged and alerted (someone else in
the guest wants it). Keys under secrets/ need that token in `X-Metadata-Token`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from vhost_pv.guarded_http import GuardedHttpServer
from vhost_pv.meta.store import MetadataError, MetadataStore, Tree, listing

log = logging.getLogger("vhost_pv.meta.http")

PREFIX = "/computeMetadata/v1/"
FLAVOR = "Google"
TOKEN_HEADER = "X-Metadata-Token"
BOOT_TOKEN_PATH = "instance/boot-token"
MAX_WAIT_S = 300.0
MAX_CONNECTIONS = 32
"""HTTP connections at once (any local user can connect): more are closed at accept."""

Alert = Callable[..., object]
"""raise_alert(kind, volume, message, severity=..., **details)"""


class MetadataHttpServer:
    def __init__(self, store: MetadataStore, alert: Alert, host: str, port: int, *,
                 idle_timeout: float = 10.0) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the metadata server listens on loopback only, not {host}")
        self.store = store
        self.alert = alert
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        """A connection with no request in a handler for this long is closed: slow headers
        (slowloris), idle keep-alive, or a connection that never sends anything."""
        self.refused = 0
        self._http = GuardedHttpServer(self._handle_request, host, port, what="metadata http", logger=log,
                                       idle_timeout=idle_timeout, max_connections=MAX_CONNECTIONS)

    async def start(self) -> None:
        await self._http.start()
        self.port = self._http.port  # ephemeral: what the kernel gave
        log.info("metadata server for VM %s on http://%s:%d%s", self.store.vm, self.host, self.port, PREFIX)

    async def close(self) -> None:
        await self._http.close()

    @property
    def dropped(self) -> int:
        """Connections closed at accept (too many open, or fds short)."""
        return self._http.dropped

    def _refuse(self, request: web.Request, status: int, why: str) -> web.Response:
        self.refused += 1
        log.warning("metadata: refused %s %s from %s: %s", request.method, request.path, request.remote, why)
        return web.Response(status=status, text=why + "\n", headers={"Metadata-Flavor": FLAVOR})

    async def _handle_request(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return self._refuse(request, 405, "only GET is served")
        if "X-Forwarded-For" in request.headers:
            return self._refuse(request, 403, "requests through a proxy (X-Forwarded-For) are refused")
        if request.headers.get("Metadata-Flavor") != FLAVOR:
            return self._refuse(request, 403, f"missing header Metadata-Flavor: {FLAVOR}")
        if not (request.path + "/").startswith(PREFIX):
            return self._refuse(request, 404, f"metadata lives under {PREFIX}")
        path = request.path[len(PREFIX):]
        try:
            if path.strip("/") == BOOT_TOKEN_PATH:
                return self._boot_token(request)
            return await self._answer(request, path)
        except MetadataError as exc:
            return self._refuse(request, exc.status, str(exc))

    def _boot_token(self, request: web.Request) -> web.Response:
        token = self.store.take_boot_token()
        if token is None:
            self.alert("boot-token-refetch", "", f"a second request for VM {self.store.vm}'s boot token "
                       "was refused: something besides the trusted agent asked for it",
                       severity="critical", vm=self.store.vm, remote=str(request.remote))
            return self._refuse(request, 403, "the boot token was already given out in this boot")
        log.info("metadata: boot token of VM %s given to %s", self.store.vm, request.remote)
        return web.Response(text=token, headers={"Metadata-Flavor": FLAVOR})

    def _visible(self, request: web.Request, path: str) -> str | Tree:
        """What this request may see at path: secrets only with the boot token."""
        trusted = self.store.token_matches(request.headers.get(TOKEN_HEADER, ""))
        node = self.store.lookup(path)
        parts = [p for p in path.strip("/").split("/") if p]
        if parts[:1] == ["secrets"] and not trusted:
            raise MetadataError(403, f"secrets need the boot token in {TOKEN_HEADER}")
        if not parts and isinstance(node, dict) and not trusted:
            node = {k: v for k, v in node.items() if k != "secrets"}
        return node

    async def _answer(self, request: web.Request, path: str) -> web.Response:
        query = request.query
        node = self._visible(request, path)
        if query.get("wait_for_change") == "true":
            last = query.get("last_etag") or self.store.etag(node)
            try:
                timeout = min(float(query.get("timeout_sec", MAX_WAIT_S)), MAX_WAIT_S)
            except ValueError:
                raise MetadataError(400, "timeout_sec is not a number") from None
            deadline = time.monotonic() + max(timeout, 0.0)
            while self.store.etag(node) == last:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self.store.wait_change(self.store.version, remaining)
                node = self._visible(request, path)
        headers = {"Metadata-Flavor": FLAVOR, "ETag": self.store.etag(node)}
        if isinstance(node, str):
            return web.Response(text=node, headers=headers)
        if query.get("recursive") == "true" or query.get("alt") == "json":
            return web.Response(text=json.dumps(_jsonable(node), sort_keys=True), headers=headers,
                                content_type="application/json")
        return web.Response(text="".join(f"{name}\n" for name in listing(node)), headers=headers)


def _jsonable(node: Tree) -> dict[str, Any]:
    return {k: _jsonable(v) if isinstance(v, dict) else v for k, v in node.items()}

