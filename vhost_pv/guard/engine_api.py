"""A client for the Docker Engine API (served by Docker and by `podman system service`) over
its unix socket: container inspection, listing, and the /events stream.

This is the one module that imports aiohttp's client, and it is loaded only when the daemon
follows an engine (aiohttp costs ~20 MiB of resident memory). Everything it returns is
plain data (engine_events.ContainerInfo, ContainerEvent), and every failure is an
EngineError, so the watcher that uses it knows nothing of HTTP.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

from vhost_pv.guard.engine_events import ContainerEvent, ContainerInfo, EngineError, parse_event

log = logging.getLogger("vhost_pv.engine")

# Docker keeps the events of the last few minutes and drops a slow reader; one event line is
# small, but a line this long is a broken peer, not an event.
MAX_EVENT_LINE = 1 << 20


def _socket_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "unix" or not (parsed.path or parsed.netloc):
        raise ValueError(f"engine address {url!r}: expected unix:///path/to/engine.sock")
    return parsed.netloc + parsed.path


class EventStream:
    """An open /events response: the engine is already sending from the moment this exists,
    so a caller may list containers next without missing what happens meanwhile."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[ContainerEvent]:
        content = self._response.content
        while True:
            try:
                line = await content.readline()
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                raise EngineError(f"event stream broke: {exc}") from None
            if not line:
                raise EngineError("the engine closed the event stream")
            if len(line) > MAX_EVENT_LINE:
                raise EngineError("an event line longer than 1 MiB: not an engine")
            line = line.strip()
            if not line:
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                log.warning("engine: unreadable event line %r", line[:200])
                continue
            if isinstance(data, dict) and (event := parse_event(data)) is not None:
                yield event

    def close(self) -> None:
        self._response.close()


class EngineClient:
    """The Docker Engine API on a unix socket (Docker's, or `podman system service`'s)."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self._path = _socket_path(url)
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self._path),
                # An event line may be as long as MAX_EVENT_LINE (aiohttp's readline gives
                # up at twice its read buffer).
                read_bufsize=MAX_EVENT_LINE // 2,
                # The host part is ignored on a unix socket, but HTTP needs one.
                base_url="http://engine",
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            async with self._client().get(
                path, params=params, timeout=aiohttp.ClientTimeout(total=self._timeout)
            ) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    body = (await response.text())[:300]
                    raise EngineError(f"GET {path}: HTTP {response.status}: {body}")
                return await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as exc:
            raise EngineError(f"GET {path} on {self.url}: {exc or type(exc).__name__}") from None

    async def ping(self) -> None:
        try:
            async with self._client().get(
                "/_ping", timeout=aiohttp.ClientTimeout(total=self._timeout)
            ) as response:
                if response.status != 200:
                    raise EngineError(f"/_ping: HTTP {response.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineError(f"{self.url}: {exc or type(exc).__name__}") from None

    async def inspect(self, ref: str) -> ContainerInfo | None:
        """A container by full id, unique id prefix or name; None if there is none."""
        data = await self._get_json(f"/containers/{urllib.parse.quote(ref, safe='')}/json")
        if data is None:
            return None
        try:
            return ContainerInfo.from_inspect(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(f"inspect {ref}: unexpected answer ({exc})") from None

    async def container_states(self, ids: list[str]) -> dict[str, str]:
        """The State (running, stopping, exited, ...) of these containers (full ids or
        prefixes) in one request; a container the engine does not know is left out."""
        params = {"all": "1", "filters": json.dumps({"id": ids})}
        data = await self._get_json("/containers/json", params)
        if not isinstance(data, list):
            raise EngineError(f"list of {len(ids)} container(s): unexpected answer {str(data)[:100]}")
        return {str(c.get("Id")): str(c.get("State", "")) for c in data if isinstance(c, dict)}

    async def events(self, *, since_ns: int | None = None) -> EventStream:
        """Open the container event stream: from now on, or replaying from since_ns first."""
        params = {"filters": json.dumps({"type": ["container"]})}
        if since_ns is not None:
            params["since"] = f"{since_ns // 1_000_000_000}.{since_ns % 1_000_000_000:09d}"
        try:
            response = await self._client().get(
                "/events", params=params,
                # The stream is open-ended: only connecting may time out.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EngineError(f"{self.url}: cannot open /events: {exc or type(exc).__name__}") from None
        if response.status != 200:
            body = (await response.text())[:300]
            response.close()
            raise EngineError(f"/events: HTTP {response.status}: {body}")
        return EventStream(response)

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
