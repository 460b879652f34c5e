"""vhost-user admission: who may attach to a volume (its header's uids/gids), one frontend
per volume, frontends attaching to a dangling volume, and the registry of every connection
(source id) that ring records and dangling events name. The metadata file system's one
frontend is admitted here too. Sockets are claimed, listened on and accepted through
vhost_pv.sockfile, the package's one way to do so."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import select
import socket
import time
from typing import TYPE_CHECKING, Any

from vhost_pv.devices.blk import BlkDevice
from vhost_pv.devices.fs import FsDevice
from vhost_pv.guard.alerts import AlertHub
from vhost_pv.protocol.channel import MessageChannel
from vhost_pv.protocol.session import VhostUserSession
from vhost_pv.service.volumes import ServedVolume, add_counters
from vhost_pv.sockfile import (
    Acceptor,
    AccessList,
    PeerCredentials,
    SocketClaim,
    peer_credentials,
    watch_task,
)

if TYPE_CHECKING:
    from pathlib import Path

    from vhost_pv.config import DaemonConfig
    from vhost_pv.meta.fuse import FuseFileSystem

# The daemon's log name, whichever module writes: operators (and tests) match on it.
log = logging.getLogger("vhost_pv.daemon")

# A frontend attaching to a dangling volume is alerted at most this often per volume: QEMU
# with reconnect=1 may come back every second (a crashed daemon, a restarted VM).
DANGLING_ATTACH_ALERT_S = 60.0
SOURCE_HISTORY = 1024
# How long a new frontend waits for the session of one that has hung up to end by itself
# (it only has to read what is left in its socket) before that session is cancelled.
GONE_SESSION_GRACE_S = 1.0


@dataclasses.dataclass
class Connection:
    source: int  # id recorded in quarantine records and dangling events
    peer: PeerCredentials
    since: float
    device: BlkDevice
    session: VhostUserSession
    task: asyncio.Task[None]


class SourceRegistry:
    """Who each connection id was, also after it ended: ring records and events name them.
    Keeps the last SOURCE_HISTORY connections."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.sources: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()

    def next_id(self) -> int:
        return next(self._ids)

    def record(self, source: int, volume: str, peer: PeerCredentials) -> None:
        self.sources[source] = {"connection": source, "volume": volume, "pid": peer.pid, "uid": peer.uid,
                                "gid": peer.gid, "since": time.time()}
        while len(self.sources) > SOURCE_HISTORY:
            self.sources.popitem(last=False)

    def describe(self, source: int) -> dict[str, Any]:
        return self.sources.get(source, {"connection": source})


class FrontendService:
    """The vhost-user sockets of the served volumes and the frontends attached to them."""

    def __init__(self, config: DaemonConfig, alerts: AlertHub) -> None:
        self.config = config
        self.alerts = alerts
        self.sources = SourceRegistry()

    def serve(self, served: ServedVolume) -> None:
        """Claim the volume's socket and admit frontends on it from now on."""
        volume = served.volume
        served.claim = SocketClaim(served.socket_path)
        served.listener = served.claim.listen()
        served.accept_task = watch_task(
            asyncio.create_task(self._accept_loop(served), name=f"{volume.name}-accept"), log)
        log.info(
            "serving %s (%d MiB%s%s) on %s",
            volume.path, volume.header.capacity >> 20, ", read-only" if served.read_only else "",
            ", O_DIRECT" if self.config.direct else "", served.socket_path,
        )

    async def _accept_loop(self, served: ServedVolume) -> None:
        assert served.listener is not None
        acceptor = Acceptor(served.listener, served.volume.name, log)
        while True:
            sock = await acceptor.accept()
            peer = peer_credentials(sock)
            name = served.volume.name
            header = served.volume.header
            allowed = peer.uid in header.allowed_uids or peer.gid in header.allowed_gids
            if not allowed:
                served.refused_total += 1
                log.warning(
                    "%s: refused frontend pid=%d uid=%d gid=%d: not allowed to attach",
                    name, peer.pid, peer.uid, peer.gid, extra={"volume": name, "reason": "not-allowed"},
                )
                sock.close()
                continue
            if served.connection is not None and _peer_gone(served.connection.session.channel.sock):
                # A reconnect (QEMU restarted, or reconnecting its chardev) can come
                # before this loop has seen the old connection's hang-up: finish that
                # session first instead of refusing the new one.
                log.info("%s: frontend pid=%d hung up; ending its session before admitting pid=%d",
                         name, served.connection.peer.pid, peer.pid)
                try:
                    await _finish_session(served.connection.task)
                except BaseException:  # the volume is retired meanwhile
                    sock.close()
                    raise
                header = served.volume.header  # as it is now
            if served.connection is not None:
                served.refused_total += 1
                log.warning(
                    "%s: refused frontend pid=%d: volume already attached to pid %d",
                    name, peer.pid, served.connection.peer.pid,
                    extra={"volume": name, "reason": "already-attached"},
                )
                sock.close()
                continue
            source = self.sources.next_id()
            try:
                device = BlkDevice(served.volume, self.config.queues, read_only=served.read_only,
                                   source=source)
            except OSError as exc:
                log.error("%s: cannot attach frontend: %s", name, exc)
                sock.close()
                continue
            session = VhostUserSession(MessageChannel(sock, timeout=self.config.peer_timeout), device, name)
            if header.dangling:
                self._dangling_attach(served, peer)
            if served.reclaiming:
                session.hold()   # the reclaim releases it once the volume is settled
            task = asyncio.create_task(self._run_session(served, session))
            served.connection = Connection(source, peer, time.time(), device, session, task)
            served.connections_total += 1
            self.sources.record(source, name, peer)
            log.info("%s: frontend attached (pid=%d uid=%d)", name, peer.pid, peer.uid,
                     extra={"volume": name, "source": f"connection {source}"})

    def _dangling_attach(self, served: ServedVolume, peer: PeerCredentials) -> None:
        """A frontend attaching to a dangling volume is served, under the dangling rules.

        Refusing it would not protect anything (the C data path already sends every write of
        a dangling volume to the quarantine ring and answers reads per the read policy, per
        request) and wedges the VM: QEMU reconnecting after a daemon restart would be closed
        again and again (one alert each time), its guest hung on I/O nobody serves, and still
        hung after a reclaim. So the attach goes ahead; the admin hears of it once a minute at
        most per volume, the next alert counting the attaches it stood for."""
        name = served.volume.name
        served.dangling_attaches += 1
        log.warning(
            "%s: frontend pid=%d uid=%d attached to a dangling volume (%s): writes go to the "
            "quarantine ring, reads follow the read policy",
            name, peer.pid, peer.uid, served.volume.header.reason,
            extra={"volume": name, "reason": served.volume.header.reason},
        )
        now = time.monotonic()
        if now - served.dangling_attach_alerted < DANGLING_ATTACH_ALERT_S:
            served.dangling_attach_suppressed += 1
            return
        suppressed, served.dangling_attach_suppressed = served.dangling_attach_suppressed, 0
        served.dangling_attach_alerted = now
        more = f" ({suppressed} more attach(es) since the last alert)" if suppressed else ""
        self.alerts.raise_alert(
            "dangling-attach", name,
            f"a frontend attached to dangling volume {name}; its I/O is quarantined{more}",
            pid=peer.pid, uid=peer.uid, suppressed=suppressed, suggested=served.guard.suggested(),
        )

    async def _run_session(self, served: ServedVolume, session: VhostUserSession) -> None:
        try:
            await session.run()
        finally:
            connection, served.connection = served.connection, None
            if connection is not None:
                add_counters(served.finished, connection.device.stats().queues)


class MetadataFsFrontend:
    """The metadata file system's vhost-user-fs socket: one frontend (QEMU) at a time, from
    the control socket's allow-list."""

    def __init__(self, path: Path, fs: FuseFileSystem, *, vm: str, access: AccessList,
                 peer_timeout: float) -> None:
        self.path = path
        self.fs = fs
        self.vm = vm
        self.access = access
        self.peer_timeout = peer_timeout
        self._listener: socket.socket | None = None
        self._claim: SocketClaim | None = None
        self._accept: asyncio.Task[None] | None = None
        self._session: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None  # the attached frontend's

    def start(self) -> None:
        self._claim = SocketClaim(self.path)
        self._listener = self._claim.listen()
        self._accept = watch_task(asyncio.create_task(self._accept_loop(), name="metadata-fs-accept"), log)
        log.info("metadata file system of VM %s on %s", self.vm, self.path)

    async def close(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
        if self._session is not None:
            self._session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._session
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        acceptor = Acceptor(self._listener, "metadata fs", log)
        while True:
            sock = await acceptor.accept()
            peer = peer_credentials(sock)
            if not self.access.allows(peer):
                log.warning("metadata fs: refused frontend pid=%d uid=%d gid=%d: not allowed",
                            peer.pid, peer.uid, peer.gid)
                sock.close()
                continue
            attached = self._session
            if attached is not None and not attached.done() and self._sock is not None \
                    and _peer_gone(self._sock):
                # As for a volume (FrontendService._accept_loop): a reconnect queued behind the hang-up.
                log.info("metadata fs: frontend hung up; ending its session before admitting pid=%d",
                         peer.pid)
                try:
                    await _finish_session(attached)
                except BaseException:  # the daemon stops meanwhile
                    sock.close()
                    raise
            if self._session is not None and not self._session.done():
                log.warning("metadata fs: refused frontend pid=%d: one is attached already", peer.pid)
                sock.close()
                continue
            device = FsDevice(f"metadata-{self.vm}", self.fs.handle)
            session = VhostUserSession(MessageChannel(sock, timeout=self.peer_timeout), device,
                                       f"metadata-{self.vm}")
            self._session = asyncio.create_task(session.run())
            self._sock = sock
            log.info("metadata fs: frontend attached (pid=%d uid=%d)", peer.pid, peer.uid)


def _peer_gone(sock: socket.socket) -> bool:
    """Has the frontend at the other end of a session's socket hung up (closed, or shut its
    side down), whether or not the session has read that yet?"""
    fd = sock.fileno()
    if fd < 0:
        return True  # the session closed it: it is ending
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
               for _, events in poller.poll(0))


async def _finish_session(task: asyncio.Task[None]) -> None:
    """Let a session whose peer is gone end (it reads the rest of its socket, then the hang-up
    ends it); cancel it if it has not within GONE_SESSION_GRACE_S. Its task's cleanup
    (_run_session) releases the volume's connection slot."""
    done, _ = await asyncio.wait([task], timeout=GONE_SESSION_GRACE_S)
    if not done:
        task.cancel()
        await asyncio.wait([task])
