"""The engine watcher against a fake Docker Engine: the real daemon (`vhost-pv serve
--engine`) follows a Docker-API /events stream served by an aiohttp app in a thread.

Docker itself cannot run on this machine (Podman is tested for real in test_podman.py), so
the fake speaks Docker's wire format exactly: newline-separated JSON objects on a chunked
GET /events, `/containers/{ref}/json` by full id, unique id prefix or name, `/_ping`. The
test drives it: add and remove containers, push events (or garbage) to every open stream,
cut the streams abruptly, count the daemon's connects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import secrets
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from support.daemon_status import alert_kinds, header, wait_until

from vhost_pv.control import client
from vhost_pv.guard.engine_api import EngineClient
from vhost_pv.guard.engine_events import ContainerEvent, ContainerInfo, EngineError, parse_event
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
T = TypeVar("T")


# -- the fake engine -------------------------------------------------------------------------


def container_id() -> str:
    return secrets.token_hex(32)


def image_id() -> str:
    return "sha256:" + secrets.token_hex(32)


@dataclasses.dataclass
class FakeContainer:
    name: str
    id: str = dataclasses.field(default_factory=container_id)
    image: str = dataclasses.field(default_factory=image_id)
    image_ref: str = "registry.example/app:1.0"
    pid: int = 0
    status: str = "running"
    exit_code: int = 0
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def inspect(self) -> dict[str, Any]:
        """What Docker's GET /containers/{id}/json answers (the fields that matter, and some)."""
        running = self.status == "running"
        return {
            "Id": self.id,
            "Created": "2025-01-01T00:00:00.000000000Z",
            "Path": "/bin/sh",
            "Args": ["-c", "sleep infinity"],
            "State": {
                "Status": self.status, "Running": running, "Paused": False, "Restarting": False,
                "OOMKilled": False, "Dead": False, "Pid": self.pid if running else 0,
                "ExitCode": self.exit_code, "Error": "",
                "StartedAt": "2025-01-01T00:00:01.000000000Z", "FinishedAt": "0001-01-01T00:00:00Z",
            },
            "Image": self.image,
            "Name": "/" + self.name,
            "RestartCount": 0,
            "Driver": "overlay2",
            "Config": {
                "Hostname": self.id[:12], "Image": self.image_ref, "Labels": dict(self.labels),
                "Cmd": ["sh", "-c", "sleep infinity"], "Env": ["PATH=/usr/bin:/bin"],
            },
        }


def docker_event(action: str, container: FakeContainer, **attributes: str) -> dict[str, Any]:
    """One /events object as Docker sends it: the container's labels, image reference and
    name are attributes, next to the action's own (exitCode, signal, ...)."""
    now = time.time_ns()
    attrs = {**container.labels, "image": container.image_ref, "name": container.name, **attributes}
    return {
        "status": action, "id": container.id, "from": container.image_ref,
        "Type": "container", "Action": action,
        "Actor": {"ID": container.id, "Attributes": attrs},
        "scope": "local", "time": now // 1_000_000_000, "timeNano": now,
    }


def encode(event: dict[str, Any]) -> bytes:
    # Go's json.Encoder: compact, one object per line.
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


_DROP = object()


class FakeDockerEngine:
    """A Docker Engine API on a unix socket, in a thread with its own event loop."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self.connects = 0  # GET /events requests
        self.event_filters: list[str] = []
        self.event_since: list[str | None] = []  # the `since` of each /events request
        self.inspected: list[str] = []
        # Answers to send verbatim for these refs, whatever the containers are.
        self.raw_inspect: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._containers: dict[str, FakeContainer] = {}
        self._streams: list[asyncio.Queue[object]] = []
        # Docker keeps recent events and replays those at or after `since` to a new stream.
        self._history: list[tuple[int, bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-docker", daemon=True)
        self._runner: web.AppRunner | None = None

    # life cycle

    def start(self) -> FakeDockerEngine:
        self._thread.start()
        self._call(self._serve())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.drop_streams()
            self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> FakeDockerEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(10)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/_ping", self._ping)
        app.router.add_get("/containers/{ref}/json", self._inspect)
        app.router.add_get("/events", self._events)
        # Docker answers under a version prefix too (/v1.43/...).
        app.router.add_get("/v{version}/containers/{ref}/json", self._inspect)
        app.router.add_get("/v{version}/events", self._events)
        self._runner = web.AppRunner(app, shutdown_timeout=2.0, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # what the test does to the engine

    def add(self, container: FakeContainer) -> FakeContainer:
        with self._lock:
            self._containers[container.id] = container
        return container

    def remove(self, container: FakeContainer) -> None:
        """Forget a container without telling anyone (no event)."""
        with self._lock:
            del self._containers[container.id]

    def push(self, event: dict[str, Any]) -> int:
        """Send an event on every open stream and keep it for replay (container events)."""
        return self.push_raw(encode(event), keep_at=event.get("timeNano") if event.get("Type") == "container"
                             else None)

    def push_raw(self, data: bytes, *, keep_at: int | None = None) -> int:
        """Send bytes on every open /events stream; returns how many streams got them."""

        async def deliver() -> int:
            if keep_at is not None:
                self._history.append((keep_at, data))
            for queue in self._streams:
                queue.put_nowait(data)
            return len(self._streams)

        return self._call(deliver())

    def drop_streams(self) -> int:
        """Cut every open /events connection mid-body, as a crashing engine would."""

        async def drop() -> int:
            for queue in self._streams:
                queue.put_nowait(_DROP)
            return len(self._streams)

        return self._call(drop())

    def open_streams(self) -> int:
        async def count() -> int:
            return len(self._streams)

        return self._call(count())

    # handlers

    def _find(self, ref: str) -> FakeContainer | None:
        """Docker's lookup order: full id, then name, then a unique id prefix."""
        with self._lock:
            if ref in self._containers:
                return self._containers[ref]
            name = ref.lstrip("/")
            for container in self._containers.values():
                if container.name == name:
                    return container
            matches = [c for c in self._containers.values() if c.id.startswith(ref)]
            return matches[0] if len(matches) == 1 else None

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="OK", headers={"Api-Version": "1.43"})

    async def _inspect(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        self.inspected.append(ref)
        if ref in self.raw_inspect:
            return web.json_response(self.raw_inspect[ref])
        container = self._find(ref)
        if container is None:
            return web.json_response({"message": f"No such container: {ref}"}, status=404)
        return web.json_response(container.inspect())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self.connects += 1
        self.event_filters.append(request.query.get("filters", ""))
        since = request.query.get("since")
        self.event_since.append(since)
        queue: asyncio.Queue[object] = asyncio.Queue()
        if since is not None:
            seconds, _, fraction = since.partition(".")
            since_ns = int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0")[:9] or 0)
            for time_ns, data in self._history:
                if time_ns >= since_ns:
                    queue.put_nowait(data)
        # Registered before the headers go out: once the client sees them, it gets every push.
        self._streams.append(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Api-Version": "1.43"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            while True:
                item = await queue.get()
                if item is _DROP:
                    if request.transport is not None:
                        request.transport.abort()  # no terminating chunk: a broken stream
                    break
                assert isinstance(item, bytes)
                try:
                    await response.write(item)
                except ConnectionResetError:  # the daemon went away
                    break
        finally:
            self._streams.remove(queue)
        return response


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[FakeDockerEngine]:
    with FakeDockerEngine(tmp_path / "docker.sock") as fake:
        yield fake


def make_volume(tmp_path: Path, name: str, owner: str) -> Path:
    path = tmp_path / f"{name}.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner=owner))
    return path


def serve(volumes: list[Path], tmp_path: Path, engine: FakeDockerEngine, *args: str) -> ServerProcess:
    return ServerProcess(volumes, tmp_path, extra_args=["--engine", engine.url, *args])


def engine_watch(control: Path) -> dict[str, Any]:
    result: dict[str, Any] = client.status(control)["watchers"]["engine"]
    return result


def wait_reconciled(server: ServerProcess, count: int = 1) -> None:
    """The watcher follows the stream (it subscribes before it reconciles) and has looked
    every owner up `count` times."""
    wait_until(lambda: engine_watch(server.control)["reconciles"] >= count, what=f"reconcile #{count}")


def is_dangling(control: Path, volume: str) -> bool:
    return bool(header(control, volume)["state"] == "dangling")


def alerts_of(control: Path, volume: str) -> list[dict[str, Any]]:
    return [a for a in client.alerts(control) if a["volume"] == volume]


# -- parse_event -----------------------------------------------------------------------------


def test_parse_docker_die_and_destroy() -> None:
    web_ctr = FakeContainer("web", labels={"com.example.tier": "front"})
    raw = docker_event("die", web_ctr, exitCode="3", execDuration="12")
    die = parse_event(raw)
    assert die == ContainerEvent(
        action="die", id=web_ctr.id, name="web", exit_code=3, time_ns=raw["timeNano"],
        attributes={"com.example.tier": "front", "image": web_ctr.image_ref, "name": "web",
                    "exitCode": "3", "execDuration": "12"},
    )
    assert die.exited and not die.deleted and not die.oom
    destroy = parse_event(docker_event("destroy", web_ctr))
    assert destroy is not None and destroy.deleted and destroy.exit_code is None
    kill = parse_event(docker_event("kill", web_ctr, signal="9"))
    assert kill is not None and kill.stop_requested and not kill.exited
    # A reload signal is no stop: an exit after it is still a crash.
    for harmless in ("1", "SIGHUP", "USR1"):
        reload = parse_event(docker_event("kill", web_ctr, signal=harmless))
        assert reload is not None and not reload.stop_requested, harmless
    term = parse_event(docker_event("kill", web_ctr, signal="SIGTERM"))
    assert term is not None and term.stop_requested
    oom = parse_event(docker_event("oom", web_ctr))
    assert oom is not None and oom.oom
    start = parse_event(docker_event("start", web_ctr))
    assert start is not None and start.started


def test_parse_podman_compat_shapes() -> None:
    ident = container_id()
    # What `podman system service` sends on the Docker-compatible /events.
    died = {
        "status": "died", "id": ident, "from": "localhost/app:latest", "Type": "container",
        "Action": "died",
        "Actor": {"ID": ident, "Attributes": {"containerExitCode": "137", "image": "localhost/app:latest",
                                              "name": "db", "podId": ""}},
        "scope": "local", "time": 1_700_000_000, "timeNano": 1_700_000_000_123_456_789,
    }
    event = parse_event(died)
    assert event is not None
    assert (event.action, event.id, event.name, event.exit_code) == ("died", ident, "db", 137)
    assert event.exited and event.time_ns == 1_700_000_000_123_456_789
    remove = parse_event({**died, "status": "remove", "Action": "remove",
                          "Actor": {"ID": ident, "Attributes": {"name": "db"}}})
    assert remove is not None and remove.deleted and remove.exit_code is None
    # Only "time" (seconds): nanoseconds are derived from it.
    no_nano = {k: v for k, v in died.items() if k != "timeNano"}
    assert (parsed := parse_event(no_nano)) is not None and parsed.time_ns == 1_700_000_000 * 10**9


def test_parse_actions_with_a_suffix_and_old_style_events() -> None:
    ctr = FakeContainer("web")
    exec_start = parse_event(docker_event("exec_start: sh -c ls", ctr, execID="abc"))
    assert exec_start is not None and exec_start.action == "exec_start"
    health = parse_event(docker_event("health_status: unhealthy", ctr))
    assert health is not None and health.action == "health_status"
    assert not (health.exited or health.deleted or health.started or health.stop_requested)
    # Docker before API 1.22: no Type, Action or Actor.
    old = parse_event({"status": "destroy", "id": ctr.id, "from": "app", "time": 1})
    assert old is not None and old.deleted and old.id == ctr.id and old.name == ""


def test_parse_ignores_other_types_and_incomplete_events() -> None:
    ctr = FakeContainer("web")
    image = {"status": "delete", "id": ctr.image, "Type": "image", "Action": "delete",
             "Actor": {"ID": ctr.image, "Attributes": {"name": "app"}}, "scope": "local", "time": 1}
    assert parse_event(image) is None
    for kind in ("network", "volume", "daemon", "plugin"):
        assert parse_event({**docker_event("destroy", ctr), "Type": kind}) is None
    assert parse_event({"Type": "container", "Action": "die"}) is None  # no container id
    assert parse_event({"Type": "container", "Actor": {"ID": ctr.id}}) is None  # no action
    bad_code = parse_event(docker_event("die", ctr, exitCode="lots"))
    assert bad_code is not None and bad_code.exit_code is None


@pytest.mark.parametrize("event", [
    {"Type": "container", "Action": "die", "id": "a" * 64, "Actor": "a" * 64},
    {"Type": "container", "Action": "die", "Actor": {"ID": "a" * 64, "Attributes": ["exitCode=3"]}},
    {"Type": "container", "Action": "die", "id": "a" * 64, "timeNano": "soon"},
], ids=["actor-is-a-string", "attributes-is-a-list", "timeNano-not-a-number"])
def test_parse_malformed_field_types_do_not_raise(event: dict[str, Any]) -> None:
    parse_event(event)  # None or an event, but never an exception out of the stream


# -- EngineClient against the fake -----------------------------------------------------------


@pytest.mark.timeout(20)
def test_client_inspects_by_id_prefix_and_name(engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web", pid=4242, labels={"a": "b"}))
    engine.add(FakeContainer("db", status="exited", exit_code=2, pid=99))

    async def look() -> list[ContainerInfo | None]:
        async with EngineClient(engine.url, timeout=5) as engine_client:
            await engine_client.ping()
            refs = [web_ctr.id, web_ctr.id[:12], "web", "/web", "db", "nothing", "a/b?c"]
            return [await engine_client.inspect(ref) for ref in refs]

    full, prefix, name, slash, db, nothing, odd = asyncio.run(look())
    assert full == prefix == name == slash == ContainerInfo(
        id=web_ctr.id, name="web", image=web_ctr.image, pid=4242, status="running", exit_code=0,
        labels={"a": "b"},
    )
    assert db is not None and (db.status, db.exit_code, db.pid) == ("exited", 2, 0)
    assert nothing is None and odd is None
    assert "a/b?c" in engine.inspected  # quoted into one path segment


@pytest.mark.timeout(20)
def test_client_event_stream_and_its_end(engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web"))

    async def follow() -> tuple[list[ContainerEvent], str]:
        async with EngineClient(engine.url, timeout=5) as engine_client:
            stream = await engine_client.events()
            seen: list[ContainerEvent] = []
            try:
                await asyncio.to_thread(engine.push_raw, b"garbage\n")
                await asyncio.to_thread(engine.push, docker_event("die", web_ctr, exitCode="3"))
                await asyncio.to_thread(engine.push, docker_event("destroy", web_ctr))
                async for event in stream:
                    seen.append(event)
                    if len(seen) == 2:
                        await asyncio.to_thread(engine.drop_streams)
            except EngineError as exc:
                return seen, str(exc)
            finally:
                stream.close()
            return seen, ""

    seen, error = asyncio.run(follow())
    assert [(e.action, e.id, e.exit_code) for e in seen] == [
        ("die", web_ctr.id, 3), ("destroy", web_ctr.id, None),
    ]
    assert error, "a cut stream must end in EngineError"


@pytest.mark.timeout(20)
def test_client_errors_are_engine_errors(tmp_path: Path, engine: FakeDockerEngine) -> None:
    async def unreachable() -> None:
        async with EngineClient(f"unix://{tmp_path}/no-engine.sock", timeout=2) as engine_client:
            await engine_client.inspect("web")

    with pytest.raises(EngineError):
        asyncio.run(unreachable())
    with pytest.raises(ValueError):
        EngineClient("tcp://127.0.0.1:2375")
    engine.raw_inspect["broken"] = {"Name": "/broken"}  # no Id

    async def broken() -> None:
        async with EngineClient(engine.url, timeout=5) as engine_client:
            await engine_client.inspect("broken")

    with pytest.raises(EngineError):
        asyncio.run(broken())


@pytest.mark.timeout(20)
def test_client_inspect_with_a_malformed_state_is_an_engine_error(engine: FakeDockerEngine) -> None:
    engine.raw_inspect["odd"] = {"Id": "a" * 64, "Name": "/odd", "State": "running"}

    async def odd() -> None:
        async with EngineClient(engine.url, timeout=5) as engine_client:
            await engine_client.inspect("odd")

    with pytest.raises(EngineError):
        asyncio.run(odd())


# -- the daemon against the fake engine ------------------------------------------------------


@pytest.mark.timeout(30)
def test_destroy_flips_the_owners_volume_only(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web"))
    db_ctr = engine.add(FakeContainer("db"))
    web_vol = make_volume(tmp_path, "webdata", web_ctr.id)
    db_vol = make_volume(tmp_path, "dbdata", db_ctr.id)
    with serve([web_vol, db_vol], tmp_path, engine) as server:
        wait_reconciled(server)
        assert engine.event_filters == [json.dumps({"type": ["container"]})]
        assert not is_dangling(server.control, "webdata")
        engine.remove(web_ctr)
        assert engine.push(docker_event("kill", web_ctr, signal="15")) == 1
        engine.push(docker_event("die", web_ctr, exitCode="143"))
        engine.push(docker_event("stop", web_ctr))
        engine.push(docker_event("destroy", web_ctr))
        took = wait_until(lambda: is_dangling(server.control, "webdata"), timeout=2.0, what="flip on destroy")
        flipped = header(server.control, "webdata")
        assert flipped["reason"] == "container-deleted"
        assert flipped["dangling_source"] == "engine"
        assert flipped["dangling_since_ns"] > 0
        assert took < 2.0
        gone = [a for a in alerts_of(server.control, "webdata") if a["kind"] == "owner-gone"]
        assert len(gone) == 1 and gone[0]["details"]["container"] == web_ctr.id
        time.sleep(1.3)  # the settle of the die (after a kill) must not add anything
        assert alert_kinds(server.control, "webdata").count("owner-gone") == 1
        assert header(server.control, "webdata")["reason"] == "container-deleted"
        assert not is_dangling(server.control, "dbdata")
        assert "owner-gone" not in alert_kinds(server.control, "dbdata")
        assert engine_watch(server.control)["connects"] == 1
    assert read_header(web_vol).dangling and not read_header(db_vol).dangling


@pytest.mark.timeout(30)
def test_crash_flips_clean_exit_and_admin_stop_do_not(tmp_path: Path, engine: FakeDockerEngine) -> None:
    crash = engine.add(FakeContainer("crashy"))
    clean = engine.add(FakeContainer("clean"))
    stopped = engine.add(FakeContainer("stopped"))
    oom = engine.add(FakeContainer("hungry"))
    removed = engine.add(FakeContainer("removed"))
    volumes = [make_volume(tmp_path, f"{c.name}-vol", c.id) for c in (crash, clean, stopped, oom, removed)]
    with serve(volumes, tmp_path, engine) as server:
        wait_reconciled(server)
        engine.push(docker_event("die", crash, exitCode="3"))
        engine.push(docker_event("die", clean, exitCode="0"))
        engine.push(docker_event("kill", stopped, signal="9"))
        engine.push(docker_event("die", stopped, exitCode="137"))
        # `rm -f` of a running owner: Docker reports its exit before its removal, and by the
        # end of the settle time the engine no longer knows it.
        engine.push(docker_event("die", removed, exitCode="137"))
        engine.remove(removed)
        engine.push(docker_event("oom", oom))
        # Events are handled in order: once the oom flipped, every exit before it is settling.
        wait_until(lambda: is_dangling(server.control, "hungry-vol"), timeout=2.0, what="flip on oom")
        settling = time.monotonic()
        # A crash is only taken as one after the settle time (a stop event may follow it).
        wait_until(lambda: is_dangling(server.control, "crashy-vol"), timeout=3.0, what="flip on crash")
        assert time.monotonic() - settling >= 0.5
        crashed = header(server.control, "crashy-vol")
        assert (crashed["reason"], crashed["dangling_source"]) == ("container-crashed", "engine")
        gone = [a for a in alerts_of(server.control, "crashy-vol") if a["kind"] == "owner-gone"]
        assert gone and gone[0]["details"]["exit_code"] == 3
        assert header(server.control, "hungry-vol")["reason"] == "container-crashed"
        wait_until(lambda: is_dangling(server.control, "removed-vol"), timeout=2.0, what="flip of removed")
        assert header(server.control, "removed-vol")["reason"] == "container-deleted"
        time.sleep(max(0.0, settling + 1.6 - time.monotonic()))
        for name in ("clean-vol", "stopped-vol"):
            assert header(server.control, name)["state"] == "attached", name
            assert "owner-gone" not in alert_kinds(server.control, name), name


@pytest.mark.timeout(30)
def test_owner_named_at_create_is_resolved_to_its_full_id(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web", pid=os.getpid()))
    path = make_volume(tmp_path, "webdata", "web")
    assert read_header(path).owner == "web"
    with serve([path], tmp_path, engine) as server:
        wait_reconciled(server)
        wait_until(lambda: header(server.control, "webdata")["owner"] != "web", what="rebind")
        bound = header(server.control, "webdata")
        assert bound["owner"] == web_ctr.id and len(bound["owner"]) == 64
        assert bound["owner_name"] == "web"
        assert bound["owner_image"] == web_ctr.image
        assert bound["owner_pid"] == os.getpid() and bound["owner_pid_start"] > 0
        assert bound["state"] == "attached"
        assert "web" in engine.inspected
        # Events name the full id: now they reach the volume.
        engine.push(docker_event("destroy", web_ctr))
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=2.0, what="flip on destroy")
    after = read_header(path)
    assert after.owner == web_ctr.id and after.owner_name == "web" and after.dangling


@pytest.mark.timeout(30)
def test_unknown_owner_is_flipped_at_start(tmp_path: Path, engine: FakeDockerEngine) -> None:
    known = engine.add(FakeContainer("known"))
    ghost = make_volume(tmp_path, "ghostdata", container_id())
    ghost_by_name = make_volume(tmp_path, "ghostname", "nobody-runs-this")
    kept = make_volume(tmp_path, "kept", known.id[:12])  # a unique prefix is a known owner
    unowned = make_volume(tmp_path, "unowned", "")
    with serve([ghost, ghost_by_name, kept, unowned], tmp_path, engine) as server:
        wait_reconciled(server)
        for name in ("ghostdata", "ghostname"):
            flipped = header(server.control, name)
            assert flipped["state"] == "dangling", name
            assert flipped["reason"] == "container-deleted"
            assert flipped["dangling_source"] == "engine-reconcile"
            assert "owner-gone" in alert_kinds(server.control, name)
        assert header(server.control, "unowned")["state"] == "attached"
        wait_until(lambda: header(server.control, "kept")["owner"] == known.id, what="prefix resolved")
        assert header(server.control, "kept")["state"] == "attached"


@pytest.mark.timeout(30)
def test_dropped_stream_reconnects_and_reconciles(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web"))
    db_ctr = engine.add(FakeContainer("db"))
    web_vol = make_volume(tmp_path, "webdata", web_ctr.id)
    db_vol = make_volume(tmp_path, "dbdata", db_ctr.id)
    with serve([web_vol, db_vol], tmp_path, engine) as server:
        wait_reconciled(server)
        # The owner goes while the daemon is not listening: its destroy event is lost.
        engine.remove(web_ctr)
        assert engine.drop_streams() == 1
        wait_until(lambda: engine_watch(server.control)["connects"] >= 2, what="reconnect")
        wait_reconciled(server, 2)
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=2.0, what="flip at reconcile")
        flipped = header(server.control, "webdata")
        assert (flipped["reason"], flipped["dangling_source"]) == ("container-deleted", "engine-reconcile")
        assert not is_dangling(server.control, "dbdata")
        watch = engine_watch(server.control)
        assert watch["connected"] and watch["last_error"]
        assert engine.connects == 2
        # The new stream works.
        engine.push(docker_event("destroy", db_ctr))
        wait_until(lambda: is_dangling(server.control, "dbdata"), timeout=2.0, what="flip on new stream")
        assert "reconnecting" in server.log()


@pytest.mark.timeout(30)
def test_periodic_reconcile_flips_a_silently_removed_owner(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web"))
    path = make_volume(tmp_path, "webdata", web_ctr.id)
    with serve([path], tmp_path, engine, "--reconcile-interval", "0.3") as server:
        wait_reconciled(server, 2)
        engine.remove(web_ctr)  # no event, no broken stream
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=3.0, what="periodic flip")
        assert header(server.control, "webdata")["dangling_source"] == "engine-reconcile"
        watch = engine_watch(server.control)
        assert watch["connects"] == 1 and watch["reconcile_interval_s"] == 0.3


@pytest.mark.timeout(30)
def test_events_missed_while_disconnected_are_replayed(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web"))
    bystander = engine.add(FakeContainer("bystander"))
    path = make_volume(tmp_path, "webdata", web_ctr.id)
    with serve([path], tmp_path, engine) as server:
        wait_reconciled(server)
        last = docker_event("start", bystander)
        engine.push(last)
        wait_until(lambda: engine_watch(server.control)["events_seen"] >= 1, what="event seen")
        assert engine.drop_streams() == 1
        wait_until(lambda: engine.open_streams() == 0, what="stream closed")
        # The owner crashes while nobody listens; it still exists (exited), so the reconcile
        # alone would not flip its volume: only the replayed event tells.
        web_ctr.status, web_ctr.exit_code = "exited", 3
        assert engine.push(docker_event("die", web_ctr, exitCode="3")) == 0
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=5.0, what="flip by the replay")
        flipped = header(server.control, "webdata")
        assert (flipped["reason"], flipped["dangling_source"]) == ("container-crashed", "engine")
        assert engine.event_since[0] is None
        stamp = last["timeNano"]
        assert engine.event_since[1] == f"{stamp // 1_000_000_000}.{stamp % 1_000_000_000:09d}"
        assert engine_watch(server.control)["connects"] == 2


@pytest.mark.timeout(30)
def test_engine_gone_then_back(tmp_path: Path) -> None:
    """The engine dies entirely (socket gone) and comes back on the same path later."""
    web_ctr = FakeContainer("web")
    path = make_volume(tmp_path, "webdata", web_ctr.id)
    sock = tmp_path / "docker.sock"
    with FakeDockerEngine(sock) as first:
        first.add(web_ctr)
        with ServerProcess([path], tmp_path, extra_args=["--engine", first.url]) as server:
            wait_reconciled(server)
            first.stop()
            sock.unlink(missing_ok=True)
            wait_until(lambda: not engine_watch(server.control)["connected"], what="disconnect")
            time.sleep(1.0)  # a few failed connects with backoff
            assert header(server.control, "webdata")["state"] == "attached"
            with FakeDockerEngine(sock) as second:  # web is gone in the new engine
                wait_until(lambda: is_dangling(server.control, "webdata"), what="flip after restart")
                assert header(server.control, "webdata")["dangling_source"] == "engine-reconcile"
                assert second.connects >= 1


@pytest.mark.timeout(30)
def test_garbage_on_the_stream_is_ignored(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web"))
    path = make_volume(tmp_path, "webdata", web_ctr.id)
    with serve([path], tmp_path, engine) as server:
        wait_reconciled(server)
        engine.push_raw(b"this is not json\n")
        engine.push_raw(b"{\"half\": \n")
        engine.push_raw(b"\n\r\n")
        engine.push_raw(b"[1, 2, 3]\n\"a string\"\nnull\n42\n")
        # An image event naming the owner's id must not be taken for the container.
        engine.push({"status": "destroy", "id": web_ctr.id, "Type": "image", "Action": "destroy",
                     "Actor": {"ID": web_ctr.id, "Attributes": {"name": "web"}}, "scope": "local",
                     "time": 1, "timeNano": 1})
        engine.push({"Type": "container", "Action": "destroy", "scope": "local", "time": 1})  # no Actor
        engine.push({"Type": "container", "id": web_ctr.id, "scope": "local"})  # no action
        engine.push({**docker_event("destroy", web_ctr), "Type": "network"})
        # Two events in one chunk, the first for someone else.
        other = FakeContainer("other")
        engine.push_raw(encode(docker_event("destroy", other)) + encode(docker_event("start", other)))
        wait_until(lambda: engine_watch(server.control)["events_seen"] >= 2, what="events counted")
        time.sleep(0.3)
        assert header(server.control, "webdata")["state"] == "attached"
        assert engine_watch(server.control)["events_seen"] == 2
        # An event split across two writes (two chunks) is one line to the reader.
        line = encode(docker_event("destroy", web_ctr))
        engine.push_raw(line[:40])
        time.sleep(0.1)
        engine.push_raw(line[40:])
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=2.0, what="flip after garbage")
        watch = engine_watch(server.control)
        assert watch["connects"] == 1 and watch["connected"]
        assert "unreadable event line" in server.log()


@pytest.mark.timeout(30)
def test_malformed_event_does_not_end_the_watcher(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web"))
    path = make_volume(tmp_path, "webdata", web_ctr.id)
    with serve([path], tmp_path, engine) as server:
        wait_reconciled(server)
        engine.push({"Type": "container", "Action": "die", "id": web_ctr.id, "Actor": web_ctr.id})
        time.sleep(0.2)
        engine.push(docker_event("destroy", web_ctr))
        # Either the stream goes on, or the watcher reconnects and reconciles: the owner's
        # destroy (and its removal) is seen.
        engine.remove(web_ctr)
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=4.0, what="flip")


@pytest.mark.timeout(30)
def test_overlong_event_line_breaks_the_stream_and_reconnects(
    tmp_path: Path, engine: FakeDockerEngine
) -> None:
    web_ctr = engine.add(FakeContainer("web"))
    path = make_volume(tmp_path, "webdata", web_ctr.id)
    with serve([path], tmp_path, engine) as server:
        wait_reconciled(server)
        engine.push_raw(b"x" * (2 * MiB) + b"\n")
        wait_until(lambda: engine_watch(server.control)["connects"] >= 2, what="reconnect")
        wait_reconciled(server, 2)
        engine.push(docker_event("destroy", web_ctr))
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=2.0, what="flip on new stream")


def reclaim_setup(
    tmp_path: Path, engine: FakeDockerEngine, server: ServerProcess, old: FakeContainer
) -> None:
    """The old owner's binding (with its image) is recorded, then the volume is flipped."""
    wait_reconciled(server)
    wait_until(lambda: header(server.control, "appdata")["owner_image"] == old.image, what="image recorded")
    client.persistent_disk_dangling(server.control, "appdata", reason="x")
    assert is_dangling(server.control, "appdata")
    engine.remove(old)


def start_event(engine: FakeDockerEngine, container: FakeContainer) -> None:
    engine.add(container)
    engine.push(docker_event("create", container))
    engine.push(docker_event("start", container))


@pytest.mark.timeout(40)
def test_label_reclaims_with_the_same_image_only(tmp_path: Path, engine: FakeDockerEngine) -> None:
    old = engine.add(FakeContainer("app-1"))
    path = make_volume(tmp_path, "appdata", old.id)
    with serve([path], tmp_path, engine) as server:
        reclaim_setup(tmp_path, engine, server, old)
        # A different image: refused, the volume stays dangling.
        intruder = FakeContainer("intruder", labels={"vhost-pv.reclaim": "appdata"})
        start_event(engine, intruder)
        wait_until(lambda: "reclaim-refused" in alert_kinds(server.control, "appdata"), what="refusal")
        refused = [a for a in alerts_of(server.control, "appdata") if a["kind"] == "reclaim-refused"]
        assert refused[0]["details"]["container"] == intruder.id
        assert is_dangling(server.control, "appdata")
        assert header(server.control, "appdata")["owner"] == old.id
        # The same image as the old owner: it takes the volume back.
        successor = FakeContainer("app-2", image=old.image, pid=os.getpid(),
                                  labels={"vhost-pv.reclaim": "appdata"})
        start_event(engine, successor)
        # The alert comes last, after the header and the seal are updated.
        wait_until(lambda: "volume-reclaimed" in alert_kinds(server.control, "appdata"), what="reclaim")
        after = header(server.control, "appdata")
        assert after["owner"] == successor.id and after["owner_name"] == "app-2"
        assert after["owner_image"] == old.image and after["owner_pid"] == os.getpid()
        assert after["reason"] == ""
        reclaimed = [a for a in alerts_of(server.control, "appdata") if a["kind"] == "volume-reclaimed"]
        assert len(reclaimed) == 1
        assert reclaimed[0]["details"]["owner"] == successor.id
        assert reclaimed[0]["details"]["source"] == "engine-label"
        # The new owner is watched: its destroy flips the volume again.
        engine.push(docker_event("destroy", successor))
        wait_until(lambda: is_dangling(server.control, "appdata"), timeout=2.0, what="flip of the new owner")
    assert read_header(path).owner == successor.id


@pytest.mark.timeout(30)
def test_label_policy_accepts_another_image(tmp_path: Path, engine: FakeDockerEngine) -> None:
    old = engine.add(FakeContainer("app-1"))
    path = make_volume(tmp_path, "appdata", old.id)
    with serve([path], tmp_path, engine, "--reclaim-policy", "label") as server:
        reclaim_setup(tmp_path, engine, server, old)
        assert engine_watch(server.control)["reclaim_policy"] == "label"
        # No label: nothing happens. An unknown reclaim mode: refused.
        engine.push(docker_event("start", engine.add(FakeContainer("bystander"))))
        start_event(engine, FakeContainer("odd", labels={"vhost-pv.reclaim": "appdata",
                                                         "vhost-pv.reclaim-mode": "bogus"}))
        wait_until(lambda: "reclaim-refused" in alert_kinds(server.control, "appdata"), what="refusal")
        assert is_dangling(server.control, "appdata")
        newcomer = FakeContainer("app-2", labels={"vhost-pv.reclaim": "appdata"})
        assert newcomer.image != old.image
        start_event(engine, newcomer)
        wait_until(lambda: "volume-reclaimed" in alert_kinds(server.control, "appdata"), what="reclaim")
        assert not is_dangling(server.control, "appdata")
        assert header(server.control, "appdata")["owner"] == newcomer.id
        assert alert_kinds(server.control, "appdata").count("reclaim-refused") == 1


@pytest.mark.timeout(30)
def test_reclaim_policy_none_and_an_unknown_old_image(tmp_path: Path, engine: FakeDockerEngine) -> None:
    old = engine.add(FakeContainer("app-1"))
    path = make_volume(tmp_path, "appdata", old.id)
    with serve([path], tmp_path, engine, "--reclaim-policy", "none") as server:
        reclaim_setup(tmp_path, engine, server, old)
        start_event(engine, FakeContainer("app-2", image=old.image, labels={"vhost-pv.reclaim": "appdata"}))
        wait_until(lambda: "reclaim-refused" in alert_kinds(server.control, "appdata"), what="refusal")
        assert is_dangling(server.control, "appdata")
    # Under same-image, an old owner whose image was never learnt cannot be matched.
    ghost = make_volume(tmp_path, "ghostdata", "never-existed")
    with serve([ghost], tmp_path, engine) as server:
        wait_reconciled(server)
        assert is_dangling(server.control, "ghostdata")
        assert header(server.control, "ghostdata")["owner_image"] == ""
        start_event(engine, FakeContainer("app-3", labels={"vhost-pv.reclaim": "ghostdata"}))
        wait_until(lambda: "reclaim-refused" in alert_kinds(server.control, "ghostdata"), what="refusal")
        assert is_dangling(server.control, "ghostdata")


@pytest.mark.timeout(30)
def test_label_for_an_attached_or_unknown_volume_is_ignored(tmp_path: Path, engine: FakeDockerEngine) -> None:
    owner = engine.add(FakeContainer("app-1"))
    path = make_volume(tmp_path, "appdata", owner.id)
    with serve([path], tmp_path, engine) as server:
        wait_reconciled(server)
        # Same image, labelled, but the volume is attached to its owner: no takeover.
        thief = FakeContainer("app-2", image=owner.image, labels={"vhost-pv.reclaim": "appdata"})
        start_event(engine, thief)
        start_event(engine, FakeContainer("app-3", labels={"vhost-pv.reclaim": "not-served"}))
        wait_until(lambda: engine_watch(server.control)["events_seen"] >= 4, what="events seen")
        time.sleep(0.3)
        assert header(server.control, "appdata")["owner"] == owner.id
        assert header(server.control, "appdata")["state"] == "attached"
        assert "volume-reclaimed" not in alert_kinds(server.control, "appdata")


@pytest.mark.timeout(30)
def test_bind_resolves_through_the_engine(tmp_path: Path, engine: FakeDockerEngine) -> None:
    web_ctr = engine.add(FakeContainer("web", pid=os.getpid()))
    path = make_volume(tmp_path, "webdata", "")
    with serve([path], tmp_path, engine) as server:
        wait_reconciled(server)
        reply = client.bind(server.control, "webdata", "web")
        assert reply["owner"] == web_ctr.id and reply["owner_name"] == "web"
        bound = header(server.control, "webdata")
        assert bound["owner"] == web_ctr.id
        assert bound["owner_name"] == "web"
        assert bound["owner_image"] == web_ctr.image
        assert bound["owner_pid"] == os.getpid() and bound["owner_pid_start"] > 0
        # A unique id prefix resolves the same way; a wrong pid is refused.
        assert client.bind(server.control, "webdata", web_ctr.id[:10])["owner"] == web_ctr.id
        with pytest.raises(client.ControlError) as info:
            client.bind(server.control, "webdata", "web", pid=1)
        assert info.value.status == -errno.EINVAL
        with pytest.raises(client.ControlError) as info:
            client.bind(server.control, "webdata", "no-such-container")
        assert info.value.status == -errno.ENOENT
        assert header(server.control, "webdata")["owner"] == web_ctr.id
        # Bound: the owner's events now reach the volume.
        engine.push(docker_event("destroy", web_ctr))
        wait_until(lambda: is_dangling(server.control, "webdata"), timeout=2.0, what="flip after bind")
        # A dangling volume is reclaimed, not bound.
        engine.add(FakeContainer("web2"))
        with pytest.raises(client.ControlError) as info:
            client.bind(server.control, "webdata", "web2")
        assert info.value.status == -errno.EBUSY
    after = read_header(path)
    assert after.owner == web_ctr.id and after.owner_image == web_ctr.image
