"""A client for the Docker Engine API (served by Docker and by `podman system service`) over
its unix socket: container inspection, listing, and the /events stream.

This is the one module that imports aiohttp's client. Everything it returns is plain data
(ContainerInfo, ContainerEvent), and every failure is an EngineError, so the watcher that
uses it knows nothing of HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

log = logging.getLogger("vhost_pv.engine")

# Docker keeps the events of the last few minutes and drops a slow reader; one event line is
# small, but a line this long is a broken peer, not an event.
MAX_EVENT_LINE = 1 << 20


class EngineError(Exception):
    """The engine could not be reached or answered with an error."""


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    """What /containers/{id}/json says about one container."""

    id: str
    name: str
    image: str  # the image id (sha256:...), not the reference it was started by
    pid: int  # the init process on the host; 0 when it is not running
    status: str  # created, running, exited, ...
    exit_code: int
    labels: dict[str, str]

    @classmethod
    def from_inspect(cls, data: dict[str, Any]) -> ContainerInfo:
        state = data.get("State") or {}
        config = data.get("Config") or {}
        return cls(
            id=str(data["Id"]),
            name=str(data.get("Name", "")).lstrip("/"),
            image=str(data.get("Image", "")),
            pid=int(state.get("Pid") or 0),
            status=str(state.get("Status", "")),
            exit_code=int(state.get("ExitCode") or 0),
            labels=dict(config.get("Labels") or {}),
        )


# What an engine's event action means for the container's volumes. Docker says `die` and
# `destroy`; Podman's Docker-compatible stream says `died` and `remove` for the same things.
DELETED_ACTIONS = frozenset({"destroy", "remove"})
EXITED_ACTIONS = frozenset({"die", "died"})
OOM_ACTIONS = frozenset({"oom"})
STOP_ACTIONS = frozenset({"kill", "stop"})
START_ACTIONS = frozenset({"start", "restart"})
# Signals that `kill -s` may send without meaning "stop": by number and by name.
HARMLESS_SIGNALS = frozenset({
    "1", "HUP", "10", "USR1", "12", "USR2", "28", "WINCH", "18", "CONT", "23", "URG", "17", "CHLD",
})


@dataclasses.dataclass(frozen=True)
class ContainerEvent:
    """One container event, with the field names of both engines folded together."""

    action: str  # as the engine said it (die, died, destroy, remove, start, oom, kill, ...)
    id: str
    name: str
    exit_code: int | None  # on die/died: Docker's exitCode, Podman's containerExitCode
    time_ns: int
    attributes: dict[str, str]

    @property
    def deleted(self) -> bool:
        return self.action in DELETED_ACTIONS

    @property
    def exited(self) -> bool:
        return self.action in EXITED_ACTIONS

    @property
    def oom(self) -> bool:
        return self.action in OOM_ACTIONS

    @property
    def stop_requested(self) -> bool:
        """The engine was asked to stop it or to send it a signal that ends processes: an
        exit that follows is an administrator's doing, not a crash. (`docker kill -s HUP`,
        a reload, is no stop; Podman names no signal in its kill events.)"""
        if self.action not in STOP_ACTIONS:
            return False
        signal = self.attributes.get("signal", "").upper().removeprefix("SIG")
        return signal not in HARMLESS_SIGNALS

    @property
    def started(self) -> bool:
        return self.action in START_ACTIONS


def parse_event(data: dict[str, Any]) -> ContainerEvent | None:
    """A container event from one JSON object of the /events stream; None for events of
    other types (images, volumes, networks, ...), without a container id, or malformed (a
    broken or hostile engine must not take the watcher down)."""
    kind = data.get("Type") or data.get("type")
    if kind not in (None, "container"):
        return None
    actor = data.get("Actor") or {}
    raw_attributes = actor.get("Attributes") or {} if isinstance(actor, dict) else None
    if not isinstance(actor, dict) or not isinstance(raw_attributes, dict):
        log.warning("engine: malformed event (Actor or its Attributes is no object): %.200r", data)
        return None
    attributes = {str(k): str(v) for k, v in raw_attributes.items()}
    container_id = str(actor.get("ID") or data.get("id") or "")
    action = str(data.get("Action") or data.get("status") or "")
    if not container_id or not action:
        return None
    # "exec_start: sh" and "health_status: healthy" carry a suffix after the action's name.
    action = action.split(":", 1)[0].strip()
    exit_code = None
    for key in ("exitCode", "containerExitCode"):
        if key in attributes:
            exit_code = _int_or_none(attributes[key])
            if exit_code is None:
                log.warning("engine: event %s for %s has a non-numeric %s: %.40r",
                            action, container_id[:12], key, attributes[key])
            break
    time_ns = _int_or_none(data.get("timeNano"))
    if time_ns is None:
        seconds = _int_or_none(data.get("time"))
        time_ns = seconds * 1_000_000_000 if seconds is not None else 0
    return ContainerEvent(
        action=action,
        id=container_id,
        name=attributes.get("name", ""),
        exit_code=exit_code,
        time_ns=time_ns,
        attributes=attributes,
    )


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


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
