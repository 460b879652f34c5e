"""VolumeService in-process: the volume domain over a volume file, no daemon subprocess.

Each test runs one coroutine with asyncio.run; the service starts the volume's guard thread
and watches its event fd like the daemon does, and close() retires it."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from vhost_pv.config import DaemonConfig
from vhost_pv.control import client
from vhost_pv.control.server import ControlServer, Send
from vhost_pv.control.wire import Command, ReclaimMode
from vhost_pv.errors import (
    NotDangling,
    VhostPvError,
    VolumeBusy,
    VolumeNotFound,
)
from vhost_pv.guard.alerts import AlertHub
from vhost_pv.guard.containers import OwnerBinding
from vhost_pv.service.volumes import FlipResult, ReclaimReport, VolumeService
from vhost_pv.sockfile import AccessList, PeerCredentials
from vhost_pv.volume.header import VolumeState
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header

T = TypeVar("T")
NAME = "vol0"


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / f"{NAME}.img"
    create_volume(path, CreateOptions(size=1 << 20, ring_size=1 << 20, owner="c-old"))
    return path


def run(path: Path, body: Callable[[VolumeService], Awaitable[T]]) -> tuple[T, AlertHub]:
    """body(service) with the volume at path served; the service is closed afterwards."""
    alerts = AlertHub()
    config = DaemonConfig(volumes=[path], socket_dir=path.parent, control_path=path.parent / "c.sock")

    async def main() -> T:
        service = VolumeService(config, alerts)
        try:
            assert service.add(path) is not None
            return await body(service)
        finally:
            await service.close()

    return asyncio.run(main()), alerts


def test_set_dangling_returns_a_flip_result_and_is_durable(volume: Path) -> None:
    async def body(service: VolumeService) -> tuple[FlipResult, FlipResult]:
        first = await service.set_dangling(NAME, True, "test", source="unit")
        again = await service.set_dangling(NAME, True, "test", source="unit")
        return first, again

    (first, again), _ = run(volume, body)
    assert first.changed and first.state == VolumeState.DANGLING and first.dangling_since_ns > 0
    assert not again.changed and again.flip_ns == 0
    assert again.generation == first.generation  # an unchanged flip writes nothing
    header = read_header(volume)
    assert header.dangling and header.reason == "test" and header.generation == first.generation
    assert first.to_wire()["changed"] == 1 and again.to_wire()["changed"] == 0


def test_clearing_bumps_the_generation_and_alerts(volume: Path) -> None:
    async def body(service: VolumeService) -> tuple[FlipResult, FlipResult]:
        return (await service.set_dangling(NAME, True, "x", source="unit"),
                await service.set_dangling(NAME, False, "", source="unit"))

    (set_, cleared), alerts = run(volume, body)
    assert cleared.changed and cleared.state == VolumeState.ATTACHED
    assert cleared.generation > set_.generation
    assert "dangling-cleared" in alerts.counts


def test_unknown_volume_raises_volume_not_found(volume: Path) -> None:
    owner = OwnerBinding("c-new")
    calls: list[Callable[[VolumeService], Awaitable[object]]] = [
        lambda s: s.set_dangling("nope", True, "x", source="unit"),
        lambda s: s.reclaim("nope", owner, ReclaimMode.KEEP, source="unit"),
        lambda s: s.bind("nope", owner),
        lambda s: s.delete("nope", why="unit", force=True),
        lambda s: s.ring_replay("nope"),
    ]

    async def body(service: VolumeService) -> list[VhostPvError]:
        caught: list[VhostPvError] = []
        for call in calls:
            with pytest.raises(VolumeNotFound) as info:
                await call(service)
            caught.append(info.value)
        return caught

    caught, _ = run(volume, body)
    assert all(exc.errno == errno.ENOENT and "nope" in str(exc) for exc in caught)


def test_reclaim_of_an_attached_volume_raises_not_dangling(volume: Path) -> None:
    async def body(service: VolumeService) -> NotDangling:
        with pytest.raises(NotDangling) as info:
            await service.reclaim(NAME, OwnerBinding("c-new"), ReclaimMode.KEEP, source="unit")
        return info.value

    exc, _ = run(volume, body)
    assert exc.errno == errno.EINVAL
    assert read_header(volume).owner == "c-old"


def test_reclaim_of_a_dangling_volume_reports_and_rebinds(volume: Path) -> None:
    async def body(service: VolumeService) -> ReclaimReport:
        await service.set_dangling(NAME, True, "crash", source="unit")
        return await service.reclaim(NAME, OwnerBinding("c-new", name="new"), ReclaimMode.DISCARD,
                                     source="unit")

    report, alerts = run(volume, body)
    assert (report.volume, report.owner, report.mode, report.discarded) == (NAME, "c-new", "discard", 0)
    assert report.seal.checked and not report.tampered
    assert set(report.to_dict()) == {"volume", "owner", "owner_name", "mode", "seal", "ring", "discarded"}
    header = read_header(volume)
    assert header.state == VolumeState.ATTACHED and header.owner == "c-new" and header.owner_name == "new"
    assert "volume-reclaimed" in alerts.counts


def test_bind_while_dangling_raises_volume_busy(volume: Path) -> None:
    async def body(service: VolumeService) -> VolumeBusy:
        await service.bind(NAME, OwnerBinding("c-bound"))  # attached: allowed
        await service.set_dangling(NAME, True, "x", source="unit")
        with pytest.raises(VolumeBusy) as info:
            await service.bind(NAME, OwnerBinding("c-other"))
        return info.value

    exc, _ = run(volume, body)
    assert exc.errno == errno.EBUSY
    assert read_header(volume).owner == "c-bound"


def test_delete_needs_dangling_or_force_and_removes_the_file(volume: Path) -> None:
    async def body(service: VolumeService) -> bool:
        with pytest.raises(VolumeBusy):
            await service.delete(NAME, why="unit")
        still_there = volume.exists() and NAME in service.served
        await service.set_dangling(NAME, True, "x", source="unit")
        result = await service.delete(NAME, why="unit")
        assert result.to_dict() == {"volume": NAME, "deleted": True, "path": str(volume)}
        assert NAME not in service.served
        return still_there

    still_there, alerts = run(volume, body)
    assert still_there
    assert not volume.exists()
    assert "volume-deleted" in alerts.counts


def test_watcher_calls_take_domain_errors_as_states(volume: Path) -> None:
    """What the container watchers call: a flip of a volume deleted meanwhile is a no-op,
    a refused reclaim (NotDangling) becomes an alert, not an exception."""

    async def body(service: VolumeService) -> None:
        await service.flip("gone", "container-deleted", "unit", {})
        await service.reclaim_for(NAME, OwnerBinding("c-new"), "keep", "unit")
        await service.flip(NAME, "container-crashed", "unit", {"pid": 1})
        await service.flip(NAME, "container-crashed", "unit", {"pid": 1})  # already: no alert

    _, alerts = run(volume, body)
    assert alerts.counts["reclaim-refused"] == 1
    assert alerts.counts["owner-gone"] == 1
    assert read_header(volume).dangling


def test_control_server_answers_a_domain_error_with_its_errno(tmp_path: Path) -> None:
    """The one translation: any VhostPvError a handler raises goes back as -errno + message."""
    path = tmp_path / "c.sock"

    async def busy(payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        raise VolumeBusy("vol0 is busy")

    async def main() -> client.ControlError:
        server = ControlServer(path, AccessList(uids=frozenset({0, os.getuid()})), {Command.STATUS: busy})
        await server.start()
        try:
            with pytest.raises(client.ControlError) as info:
                await asyncio.to_thread(client.call, path, Command.STATUS, b"", 5.0)
            return info.value
        finally:
            await server.close()

    exc = asyncio.run(main())
    assert exc.status == -errno.EBUSY
    assert "vol0 is busy" in str(exc)
