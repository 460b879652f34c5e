"""The composition root: volumes, their vhost-user sockets, and the control socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from vhost_pv.control.server import (
    AccessList,
    CommandError,
    ControlServer,
    PeerCredentials,
    peer_credentials,
)
from vhost_pv.control.wire import Command
from vhost_pv.devices.blk import BlkDevice
from vhost_pv.protocol.channel import MessageChannel
from vhost_pv.protocol.session import VhostUserSession
from vhost_pv.volume.volume import Volume

log = logging.getLogger("vhost_pv.daemon")

# Queue counters that add up across queues and connections (not indices or flags).
_SUMMED = frozenset({
    "requests", "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
    "unsupported", "bytes_read", "bytes_written", "io_errors", "bad_requests", "kicks",
    "notifications",
})


@dataclasses.dataclass
class Connection:
    peer: PeerCredentials
    since: float
    device: BlkDevice
    session: VhostUserSession
    task: asyncio.Task[None]


@dataclasses.dataclass
class ServedVolume:
    volume: Volume
    socket_path: Path
    read_only: bool
    listener: socket.socket | None = None
    accept_task: asyncio.Task[None] | None = None
    connection: Connection | None = None
    connections_total: int = 0
    refused_total: int = 0
    # Counters of connections that have ended, so totals survive a reconnect.
    finished: dict[str, int] = dataclasses.field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        totals = dict(self.finished)
        if self.connection is not None:
            _add_counters(totals, self.connection.device.stats().queues)
        return totals


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    volumes: list[Path]
    socket_dir: Path
    control_path: Path
    queues: int = 1
    read_only: bool = False
    control_access: AccessList = dataclasses.field(default_factory=AccessList)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.served: dict[str, ServedVolume] = {}
        self.control = ControlServer(
            config.control_path, config.control_access, {Command.STATUS: self._cmd_status}
        )
        self._stopping = asyncio.Event()
        self.started_at = time.time()

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        self.config.socket_dir.mkdir(parents=True, exist_ok=True)
        for path in self.config.volumes:
            volume = Volume(path)
            if volume.name in self.served:
                volume.close()
                raise ValueError(f"two volumes share the name {volume.name!r}: socket names clash")
            served = ServedVolume(
                volume=volume,
                socket_path=self.config.socket_dir / f"{volume.name}.sock",
                read_only=self.config.read_only or volume.read_only,
            )
            self.served[volume.name] = served
            served.listener = _listen(served.socket_path)
            served.accept_task = asyncio.create_task(self._accept_loop(served))
            log.info(
                "serving %s (%d MiB%s) on %s",
                path, volume.header.capacity >> 20, ", read-only" if served.read_only else "",
                served.socket_path,
            )
        await self.control.start()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        await self.control.close()
        for served in self.served.values():
            if served.accept_task is not None:
                served.accept_task.cancel()
            if served.listener is not None:
                served.listener.close()
                served.socket_path.unlink(missing_ok=True)
            if served.connection is not None:
                served.connection.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await served.connection.task
            served.volume.close()
        self.served.clear()
        log.info("stopped")

    # -- vhost-user connections -------------------------------------------------------------

    async def _accept_loop(self, served: ServedVolume) -> None:
        loop = asyncio.get_running_loop()
        assert served.listener is not None
        while True:
            sock, _ = await loop.sock_accept(served.listener)
            peer = peer_credentials(sock)
            name = served.volume.name
            header = served.volume.header
            allowed = peer.uid in header.allowed_uids or peer.gid in header.allowed_gids
            if not allowed:
                served.refused_total += 1
                log.warning(
                    "%s: refused frontend pid=%d uid=%d gid=%d: not allowed to attach",
                    name, peer.pid, peer.uid, peer.gid,
                )
                sock.close()
                continue
            if served.connection is not None:
                served.refused_total += 1
                log.warning(
                    "%s: refused frontend pid=%d: volume already attached to pid %d",
                    name, peer.pid, served.connection.peer.pid,
                )
                sock.close()
                continue
            try:
                device = BlkDevice(served.volume, self.config.queues, read_only=served.read_only)
            except OSError as exc:
                log.error("%s: cannot attach frontend: %s", name, exc)
                sock.close()
                continue
            session = VhostUserSession(MessageChannel(sock), device, name)
            task = asyncio.create_task(self._run_session(served, session))
            served.connection = Connection(peer, time.time(), device, session, task)
            served.connections_total += 1
            log.info("%s: frontend attached (pid=%d uid=%d)", name, peer.pid, peer.uid)

    async def _run_session(self, served: ServedVolume, session: VhostUserSession) -> None:
        try:
            await session.run()
        finally:
            connection, served.connection = served.connection, None
            if connection is not None:
                _add_counters(served.finished, connection.device.stats().queues)

    # -- control commands -------------------------------------------------------------------

    async def _cmd_status(self, payload: bytes) -> bytes:
        if payload:
            raise CommandError(errno.EINVAL, "STATUS takes no payload")
        return json.dumps(self.status()).encode()

    def status(self) -> dict[str, Any]:
        volumes = []
        for name, served in sorted(self.served.items()):
            entry: dict[str, Any] = {
                "name": name,
                "path": str(served.volume.path),
                "socket": str(served.socket_path),
                "read_only": served.read_only,
                "header": served.volume.header.to_dict(),
                "connections_total": served.connections_total,
                "refused_total": served.refused_total,
                "totals": served.totals(),
                "connection": None,
            }
            connection = served.connection
            if connection is not None:
                stats = connection.device.stats()
                entry["connection"] = {
                    "pid": connection.peer.pid,
                    "uid": connection.peer.uid,
                    "since": connection.since,
                    **connection.session.describe(),
                    "queues": stats.queues,
                }
            volumes.append(entry)
        return {"pid": os.getpid(), "started_at": self.started_at, "volumes": volumes}


def _add_counters(into: dict[str, int], queues: list[dict[str, int]]) -> None:
    for queue in queues:
        for key, value in queue.items():
            if key in _SUMMED:
                into[key] = into.get(key, 0) + value


def _listen(path: Path) -> socket.socket:
    """A listening unix socket with mode 0600 from birth."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"{path} is in use by another server") from None
        raise
    finally:
        os.umask(old_umask)
    sock.listen(4)
    sock.setblocking(False)
    return sock
