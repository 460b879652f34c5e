"""The composition root: volumes, their vhost-user sockets, and the control socket."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vhost_pv.config import ConfigError as ConfigError  # re-exported: it moved
from vhost_pv.config import DaemonConfig as DaemonConfig
from vhost_pv.control.server import (
    ControlServer,
    PeerCredentials,
    Send,
    peer_credentials,
)
from vhost_pv.control.wire import (
    ALERTS_FOLLOW,
    DANGLING_CLEAR,
    DELETE_FORCE,
    AlertsRequest,
    BindRequest,
    Command,
    DanglingReply,
    DanglingRequest,
    MetaOp,
    MetaRequest,
    ReclaimMode,
    ReclaimRequest,
    RingOp,
    RingRequest,
    VolumeRequest,
)
from vhost_pv.devices.blk import BlkDevice
from vhost_pv.devices.fs import FsDevice
from vhost_pv.errors import (
    EngineUnreachable,
    InvalidRequest,
    NotDangling,
    OwnerNotRunning,
    OwnerUnknown,
    RingDamaged,
    VhostPvError,
    VolumeBusy,
    VolumeNotFound,
)
from vhost_pv.guard.alerts import AlertHub
from vhost_pv.guard.containers import (
    EngineWatcher,
    OwnedVolume,
    OwnerBinding,
    ProcessWatcher,
)
from vhost_pv.guard.engine_events import EngineError
from vhost_pv.guard.guard import VolumeGuard
from vhost_pv.guard.processes import pid_start_ticks
from vhost_pv.meta.store import MetadataError, MetadataStore
from vhost_pv.protocol.channel import MessageChannel
from vhost_pv.protocol.session import VhostUserSession
from vhost_pv.sockfile import (
    Acceptor,
    AlreadyServed,
    SocketClaim,
    lock_volume,
    raise_fd_limit,
    watch_task,
)
from vhost_pv.volume import ring as ring_format
from vhost_pv.volume.header import HeaderError, VolumeState
from vhost_pv.volume.seal import check_seal, clear_seal
from vhost_pv.volume.volume import Volume, destroy_volume

if TYPE_CHECKING:
    from vhost_pv.guard.engine_api import EngineClient
    from vhost_pv.meta.fuse import FuseFileSystem
    from vhost_pv.meta.http_server import MetadataHttpServer

log = logging.getLogger("vhost_pv.daemon")

# Queue counters that add up across queues and connections (not indices or flags).
_SUMMED = frozenset({
    "requests", "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
    "unsupported", "bytes_read", "bytes_written", "io_errors", "bad_requests", "kicks",
    "notifications", "quarantined", "quarantine_refused", "dangling_denied", "watchdog_notifications",
    "coalesced_wakes", "async_ios", "direct_fallbacks", "polled_wakes", "guest_faults", "calls_saturated",
})
ALERT_KEEPALIVE_S = 15.0
# A frontend attaching to a dangling volume is alerted at most this often per volume: QEMU
# with reconnect=1 may come back every second (a crashed daemon, a restarted VM).
DANGLING_ATTACH_ALERT_S = 60.0
HEADER_REASON_LEN = 64
"""Bytes of UTF-8 the volume header keeps of a dangling reason (char reason[64])."""
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


@dataclasses.dataclass
class ServedVolume:
    volume: Volume
    socket_path: Path
    read_only: bool
    guard: VolumeGuard
    state_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    listener: socket.socket | None = None
    claim: SocketClaim | None = None
    lock_fd: int = -1
    accept_task: asyncio.Task[None] | None = None
    connection: Connection | None = None
    connections_total: int = 0
    refused_total: int = 0
    # Counters of connections that have ended, so totals survive a reconnect.
    finished: dict[str, int] = dataclasses.field(default_factory=dict)
    # Attaches to the volume while dangling: when the last alert went out, and how many
    # attaches since went without one (see DANGLING_ATTACH_ALERT_S).
    dangling_attach_alerted: float = -math.inf
    dangling_attach_suppressed: int = 0
    dangling_attaches: int = 0
    # A reclaim is settling the volume: a frontend attaching meanwhile starts no queue.
    reclaiming: bool = False

    def totals(self) -> dict[str, int]:
        totals = dict(self.finished)
        if self.connection is not None:
            _add_counters(totals, self.connection.device.stats().queues)
        return totals


def owner_fields(owner: OwnerBinding) -> dict[str, Any]:
    """The header fields that record a volume's owner."""
    return {"owner": owner.container, "owner_name": owner.name, "owner_image": owner.image,
            "owner_pid": owner.pid, "owner_pid_start": owner.pid_start}


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        config.validate()
        self.config = config
        self.served: dict[str, ServedVolume] = {}
        self.alerts = AlertHub(config.alert_webhook)
        self.control = ControlServer(
            config.control_path,
            config.control_access,
            {
                Command.STATUS: self._cmd_status,
                Command.PERSISTENT_DISK_DANGLING: self._cmd_dangling,
                Command.RECLAIM: self._cmd_reclaim,
                Command.RING: self._cmd_ring,
                Command.DELETE: self._cmd_delete,
                Command.ALERTS: self._cmd_alerts,
                Command.BIND: self._cmd_bind,
                Command.META: self._cmd_meta,
            },
            timeout=config.peer_timeout,
        )
        # The store exists from the start, whether or not anything serves it to the guest.
        self.metadata = MetadataStore(config.vm, self._volume_metadata)
        self.meta_http: MetadataHttpServer | None = None
        self.meta_fs: FuseFileSystem | None = None
        self._meta_listener: socket.socket | None = None
        self._meta_claim: SocketClaim | None = None
        # Volumes named on the command line that could not be served: path and why.
        self.failed: list[dict[str, str]] = []
        self._meta_accept: asyncio.Task[None] | None = None
        self._meta_session: asyncio.Task[None] | None = None
        self._meta_sock: socket.socket | None = None  # the attached metadata frontend's
        self.engine: EngineClient | None = None
        if config.engine_url:
            from vhost_pv.guard.engine_api import EngineClient  # aiohttp: only when used

            self.engine = EngineClient(config.engine_url)
        self.engine_watcher = (
            EngineWatcher(self.engine, self, reconcile_interval=config.reconcile_interval,
                          reclaim_policy=config.reclaim_policy)
            if self.engine is not None else None
        )
        self.process_watcher = ProcessWatcher(self) if config.proc_events else None
        self._watcher_tasks: list[asyncio.Task[None]] = []
        self._source_ids = itertools.count(1)
        # Who each connection id was, also after it ended: ring records and events name them.
        self.sources: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()
        self.started_at = time.time()

    # -- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        # Unhandled, SIGHUP would end the daemon silently (e.g. its terminal closing).
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.alerts.bind_loop(self._loop)
        raise_fd_limit(log)
        try:
            await self._start()
        except BaseException:
            # Whatever was created so far goes: no stale sockets, locks or guard threads.
            await self.stop()
            raise

    def reload(self) -> None:
        """SIGHUP: reload what can be reloaded (the metadata policy file)."""
        if self.config.meta_policy is None or self.meta_fs is None:
            log.info("SIGHUP: nothing to reload (no --meta-policy)")
            return
        from vhost_pv.meta.policy import Policy

        try:
            self.meta_fs._policy = Policy.load(self.config.meta_policy)  # read per request: takes effect now
        except Exception as exc:  # a bad edit must not take the daemon down: keep the old one
            log.error("SIGHUP: cannot reload %s, keeping the policy in force: %s",
                      self.config.meta_policy, exc)
            return
        log.info("SIGHUP: metadata policy reloaded from %s", self.config.meta_policy)

    def _open_volume(self, path: Path) -> tuple[Volume, int] | None:
        """Lock and open one volume; a volume that cannot be served is logged, alerted and
        listed in status (None), the others are served. Another daemon serving it is fatal."""
        lock_fd = -1
        try:
            lock_fd = lock_volume(path)
            volume = Volume(path, direct=self.config.direct)
        except AlreadyServed:
            raise
        except (HeaderError, ring_format.RingError, OSError, ValueError) as exc:
            if lock_fd >= 0:
                os.close(lock_fd)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.failed.append({"path": str(path), "error": why})
            log.error("%s: cannot serve this volume: %s", path, why)
            self.alerts.raise_alert("volume-failed", path.stem, f"{path} cannot be served: {why}",
                                    severity="critical", path=str(path), error=why)
            return None
        resolution = volume.resolution
        if not resolution.consistent:
            detail = {"copies": [p or "valid" for p in resolution.problems],
                      "disagreement": resolution.disagreement}
            if resolution.forced:
                log.critical("%s: header copies disagree (%s): served DANGLING (%s); copies repaired",
                             path, resolution.disagreement, volume.header.reason)
                self.alerts.raise_alert(
                    "header-damaged", volume.name,
                    f"{volume.name}: header copies disagree, served dangling: {resolution.disagreement}",
                    severity="critical", path=str(path), **detail)
            else:
                log.warning("%s: header copies disagree (%s): repaired to generation %d (%s)",
                            path, resolution.disagreement, volume.header.generation,
                            volume.header.state.name.lower())
                self.alerts.raise_alert(
                    "header-repaired", volume.name,
                    f"{volume.name}: a header copy was repaired: {resolution.disagreement}",
                    severity="warning", path=str(path), **detail)
        return volume, lock_fd

    async def _start(self) -> None:
        assert self._loop is not None
        self.config.socket_dir.mkdir(parents=True, exist_ok=True)
        for path in self.config.volumes:
            opened = self._open_volume(path)
            if opened is None:
                continue
            volume, lock_fd = opened
            if volume.name in self.served:
                volume.close()
                os.close(lock_fd)
                raise ValueError(f"two volumes share the name {volume.name!r}: socket names clash")
            guard = VolumeGuard(
                volume, self.alerts, describe_source=self.describe_source,
                delete_volume=self._delete_from_guard,
            )
            served = ServedVolume(
                volume=volume,
                socket_path=self.config.socket_dir / f"{volume.name}.sock",
                read_only=self.config.read_only or volume.read_only,
                guard=guard,
                lock_fd=lock_fd,
            )
            self.served[volume.name] = served
            guard.start()
            self._loop.add_reader(volume.event_fd, self._on_volume_events, served)
            served.claim = SocketClaim(served.socket_path)
            served.listener = served.claim.listen()
            served.accept_task = watch_task(
                asyncio.create_task(self._accept_loop(served), name=f"{volume.name}-accept"), log)
            log.info(
                "serving %s (%d MiB%s%s) on %s",
                path, volume.header.capacity >> 20, ", read-only" if served.read_only else "",
                ", O_DIRECT" if self.config.direct else "", served.socket_path,
            )
        if self.failed and not self.served:
            # Nothing at all to serve: a daemon that only reports errors helps nobody.
            raise ValueError("no volume can be served: " + "; ".join(
                f"{failure['path']}: {failure['error']}" for failure in self.failed))
        if self.config.meta_http is not None:
            from vhost_pv.meta.http_server import MetadataHttpServer  # aiohttp.web: only when used

            host, port = self.config.meta_http
            meta_http = MetadataHttpServer(self.metadata, self.alerts.raise_alert, host, port,
                                           idle_timeout=self.config.peer_timeout)
            await meta_http.start()
            self.meta_http = meta_http
        if self.config.meta_socket is not None:
            from vhost_pv.meta.fuse import FuseFileSystem
            from vhost_pv.meta.policy import Policy

            policy = Policy.load(self.config.meta_policy) if self.config.meta_policy else Policy.default()
            self.meta_fs = FuseFileSystem(self.metadata, policy)
            self._meta_claim = SocketClaim(self.config.meta_socket)
            self._meta_listener = self._meta_claim.listen()
            self._meta_accept = asyncio.create_task(self._accept_metadata_fs(), name="metadata-fs-accept")
            self._meta_accept.add_done_callback(_log_task_end)
            log.info("metadata file system of VM %s on %s", self.config.vm, self.config.meta_socket)
        # The control socket comes last: once it answers, everything else is up.
        await self.control.start()
        if self.process_watcher is not None:
            await self.process_watcher.start()
        if self.engine_watcher is not None:
            task = asyncio.create_task(self.engine_watcher.run(), name="engine-watcher")
            task.add_done_callback(_log_task_end)
            self._watcher_tasks.append(task)

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        for task in self._watcher_tasks:
            task.cancel()
        # A watcher that died has been logged already: shutting down must go on.
        await asyncio.gather(*self._watcher_tasks, return_exceptions=True)
        if self.process_watcher is not None:
            self.process_watcher.close()
        if self.meta_http is not None:
            await self.meta_http.close()
        if self._meta_accept is not None:
            self._meta_accept.cancel()
        if self._meta_session is not None:
            self._meta_session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._meta_session
        if self._meta_listener is not None:
            self._meta_listener.close()
            self._meta_listener = None
        if self._meta_claim is not None:
            self._meta_claim.release()
            self._meta_claim = None
        await self.control.close()
        for served in list(self.served.values()):
            await self._retire(served)
        self.served.clear()
        self.alerts.close()
        log.info("stopped")

    async def _retire(self, served: ServedVolume) -> None:
        """Stop serving one volume: listener, connection, guard, data path."""
        if served.accept_task is not None:
            served.accept_task.cancel()
        if served.listener is not None:
            served.listener.close()
            served.listener = None
        if served.claim is not None:
            served.claim.release()  # unlinks the socket only if it still is the one we bound
            served.claim = None
        if served.connection is not None:
            served.connection.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await served.connection.task
        if self._loop is not None and served.volume.native is not None:
            self._loop.remove_reader(served.volume.event_fd)
        await asyncio.to_thread(served.guard.stop)
        served.volume.close()
        if served.lock_fd >= 0:
            os.close(served.lock_fd)
            served.lock_fd = -1

    def _on_volume_events(self, served: ServedVolume) -> None:
        # Reset the eventfd here (level-triggered reader) and let the guard drain the queue.
        with contextlib.suppress(BlockingIOError):
            os.read(served.volume.event_fd, 8)
        served.guard.events_ready()

    def describe_source(self, source: int) -> dict[str, Any]:
        return self.sources.get(source, {"connection": source})

    # -- vhost-user connections -------------------------------------------------------------

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
                    name, peer.pid, peer.uid, peer.gid,
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
                )
                sock.close()
                continue
            source = next(self._source_ids)
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
            self.sources[source] = {"connection": source, "volume": name, "pid": peer.pid, "uid": peer.uid,
                                    "gid": peer.gid, "since": time.time()}
            while len(self.sources) > SOURCE_HISTORY:
                self.sources.popitem(last=False)
            log.info("%s: frontend attached (pid=%d uid=%d)", name, peer.pid, peer.uid)

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
            pid=peer.pid, uid=peer.uid, suppressed=suppressed,
        )

    async def _run_session(self, served: ServedVolume, session: VhostUserSession) -> None:
        try:
            await session.run()
        finally:
            connection, served.connection = served.connection, None
            if connection is not None:
                _add_counters(served.finished, connection.device.stats().queues)

    # -- control commands -------------------------------------------------------------------

    async def _cmd_status(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        if payload:
            raise InvalidRequest("STATUS takes no payload")
        return json.dumps(self.status()).encode()

    def _served(self, name: str) -> ServedVolume:
        served = self.served.get(name)
        if served is None:
            raise VolumeNotFound(f"no volume named {name!r} is served here")
        return served

    async def _cmd_dangling(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        request = DanglingRequest.parse(payload)
        dangling = not request.flags & DANGLING_CLEAR
        # The wire carries 128 bytes of reason, the header keeps 64: refuse what would not
        # fit rather than fail the flip half way or cut a UTF-8 character in two.
        if len(request.reason.encode()) > HEADER_REASON_LEN:
            raise InvalidRequest(f"reason is {len(request.reason.encode())} bytes of UTF-8; "
                               f"the volume header keeps at most {HEADER_REASON_LEN}")
        log.info("control: Persistent_Disk_Dangling %s %s by pid=%d uid=%d (reason: %s)",
                 request.volume, "set" if dangling else "clear", peer.pid, peer.uid, request.reason)
        result = await self.set_dangling(request.volume, dangling, request.reason, source="ioctl")
        return bytes(DanglingReply.build(result))

    async def set_dangling(self, name: str, dangling: bool, reason: str, *, source: str) -> dict[str, int]:
        """The one way a volume's dangling flag changes, whatever noticed (ioctl, engine
        events, process events). Returns once the new state is durable in the header and
        every queue worker has passed it."""
        served = self._served(name)
        async with served.state_lock:
            header = served.volume.header
            if header.dangling == dangling:
                return self._flip_result(served, changed=False, flip_ns=0)
            if dangling:
                changes: dict[str, Any] = {
                    "state": VolumeState.DANGLING, "dangling_since_ns": time.time_ns(),
                    "reason": _utf8_prefix(reason, HEADER_REASON_LEN), "dangling_source": source,
                }
            else:
                changes = {"state": VolumeState.ATTACHED, "dangling_since_ns": 0, "reason": "",
                           "dangling_source": source}
            started = time.perf_counter_ns()
            await asyncio.to_thread(served.volume.update, **changes)
            flip_ns = time.perf_counter_ns() - started
            served.guard.flipped(dangling)
        self.metadata.touch()  # volumes/<name>/state changed: wake long-polling readers
        log.warning("%s: %s by %s (%s) in %.3f ms", name,
                    "now DANGLING" if dangling else "dangling flag cleared",
                    source, reason or "no reason", flip_ns / 1e6)
        if not dangling:
            self.alerts.raise_alert("dangling-cleared", name, f"dangling flag of {name} cleared by {source}",
                                    severity="info", source=source, reason=reason)
        return self._flip_result(served, changed=True, flip_ns=flip_ns)

    @staticmethod
    def _flip_result(served: ServedVolume, *, changed: bool, flip_ns: int) -> dict[str, int]:
        header = served.volume.header
        return {"state": int(header.state), "changed": int(changed), "generation": header.generation,
                "dangling_since_ns": header.dangling_since_ns, "flip_ns": flip_ns}

    async def _cmd_reclaim(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        request = ReclaimRequest.parse(payload)
        mode = ReclaimMode(request.mode)
        log.info("control: reclaim %s for %s (%s) by pid=%d uid=%d",
                 request.volume, request.owner, mode.name.lower(), peer.pid, peer.uid)
        owner = await self._resolve_owner(request.owner, pid=0)
        report = await self.reclaim(request.volume, owner, mode, source="ioctl")
        return json.dumps(report).encode()

    async def _resolve_owner(self, container: str, *, pid: int) -> OwnerBinding:
        """An owner as the admin named it: through the engine when there is one (full id,
        name, image, init pid), else as given, with the pid they named."""
        if not container:
            raise InvalidRequest("no owner container given")
        if self.engine is not None:
            try:
                info = await self.engine.inspect(container)
            except EngineError as exc:
                raise EngineUnreachable(f"cannot ask the engine about {container}: {exc}") from None
            if info is None:
                raise OwnerUnknown(f"the engine knows no container {container!r}")
            binding = OwnerBinding.from_container(info)
            if pid and pid != binding.pid:
                raise InvalidRequest(f"{container}'s init pid is {binding.pid}, not {pid}")
            return binding
        start = 0
        if pid:
            found = pid_start_ticks(pid)
            if found is None:
                raise OwnerNotRunning(f"no process {pid}: the owner's init must be running")
            start = found
        return OwnerBinding(container=container, pid=pid, pid_start=start)

    async def _cmd_bind(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        request = BindRequest.parse(payload)
        served = self._served(request.volume)
        owner = await self._resolve_owner(request.container, pid=request.pid)
        async with served.state_lock:
            if served.volume.header.dangling:
                raise VolumeBusy(f"{request.volume} is dangling: a new owner reclaims it "
                                   "(vhost-pv reclaim) rather than binding it")
            await asyncio.to_thread(served.volume.update, **owner_fields(owner))
        log.info("control: %s bound to %s (name %s, pid %d) by pid=%d uid=%d", request.volume,
                 owner.container, owner.name or "-", owner.pid, peer.pid, peer.uid)
        if self.process_watcher is not None:
            await self.process_watcher.check_alive("bind")
        return json.dumps({"volume": request.volume, **owner_fields(owner)}).encode()

    async def reclaim(
        self, name: str, owner: OwnerBinding, mode: ReclaimMode, *, source: str
    ) -> dict[str, Any]:
        """A new owner takes a dangling volume back: check the seal, settle the ring, clear."""
        served = self._served(name)
        volume = served.volume
        async with served.state_lock:
            if not volume.header.dangling:
                raise NotDangling(f"{name} is not dangling: nothing to reclaim")
            # A frontend may be attached (served under the dangling rules): its queues stop
            # for the reclaim, each worker finishing what it has in flight, so no quarantined
            # write lands while the ring is replayed or discarded, and the first request after
            # it goes to the data region, behind the replayed writes.
            held = served.connection.session if served.connection is not None else None
            served.reclaiming = True
            if held is not None:
                held.hold()
            try:
                report = await self._settle_reclaim(served, owner, mode)
            finally:
                served.reclaiming = False
                # Whoever is attached now (the same frontend, or one that came meanwhile).
                if served.connection is not None:
                    served.connection.session.release()
                if held is not None and (served.connection is None or served.connection.session is not held):
                    held.release()
        self.alerts.raise_alert(
            "volume-reclaimed", name,
            f"{name} reclaimed by {owner.name or owner.container} ({mode.name.lower()})",
            severity="info", owner=owner.container, owner_name=owner.name, mode=mode.name.lower(),
            source=source,
            tampered=bool(report["seal"].get("changed_chunks")),
        )
        return report

    async def _settle_reclaim(
        self, served: ServedVolume, owner: OwnerBinding, mode: ReclaimMode
    ) -> dict[str, Any]:
        """reclaim's work, under the state lock with no queue running."""
        name = served.volume.name
        volume = served.volume
        seal = await asyncio.to_thread(served.guard.wait_sealed, 3600.0)
        report: dict[str, Any] = {"volume": name, "owner": owner.container, "owner_name": owner.name,
                                  "mode": mode.name.lower()}
        if seal is None:
            report["seal"] = {"checked": False}
        else:
            check = await asyncio.to_thread(check_seal, volume.fd, volume.header, seal)
            report["seal"] = {"checked": True, "chunk_size": check.chunk_size,
                              "changed_chunks": check.changed_chunks,
                              "changed_ranges": check.changed_ranges()}
            if check.changed_chunks:
                self.alerts.raise_alert(
                    "tamper-detected", name,
                    f"data of dangling volume {name} changed outside the backend: "
                    f"{len(check.changed_chunks)} chunk(s) differ from the seal",
                    severity="critical", changed_ranges=check.changed_ranges(),
                )
        chain = await asyncio.to_thread(self._ring_verify, served)
        report["ring"] = chain
        if mode == ReclaimMode.REPLAY:
            try:
                report["replayed"] = await asyncio.to_thread(
                    ring_format.replay, volume.path, volume.fd, volume.header)
            except ring_format.RingError as exc:
                raise RingDamaged(str(exc)) from None
            volume.ring_reset()
        elif mode == ReclaimMode.DISCARD:
            report["discarded"] = volume.ring_stats()["records"]
            volume.ring_reset()
        await asyncio.to_thread(
            volume.update, state=VolumeState.ATTACHED, dangling_since_ns=0, reason="",
            dangling_source="", **owner_fields(owner),
        )
        await asyncio.to_thread(clear_seal, volume.fd)
        served.guard.flipped(False)
        self.metadata.touch()
        return report

    @staticmethod
    def _ring_verify(served: ServedVolume) -> dict[str, Any]:
        volume = served.volume
        volume.ring_sync()
        with ring_format.RingReader(volume.path, volume.header) as reader:
            return {**reader.stats(), "verify": reader.verify().to_dict()}

    async def _cmd_ring(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        request = RingRequest.parse(payload)
        op = RingOp(request.op)
        served = self._served(request.volume)
        volume = served.volume
        async with served.state_lock:
            if op in (RingOp.LIST, RingOp.DUMP):
                result = await asyncio.to_thread(self._ring_listing, served, op == RingOp.DUMP)
            elif op == RingOp.REPLAY:
                if volume.header.dangling or served.connection is not None:
                    raise VolumeBusy(f"replay needs {request.volume} attached and without a "
                                       "frontend (use reclaim --replay on a dangling volume)")
                volume.ring_sync()
                try:
                    replayed = await asyncio.to_thread(
                        ring_format.replay, volume.path, volume.fd, volume.header)
                except ring_format.RingError as exc:
                    raise RingDamaged(str(exc)) from None
                volume.ring_reset()
                result = {"replayed": replayed}
            else:
                result = {"discarded": volume.ring_stats()["records"]}
                volume.ring_reset()
        log.info("control: ring %s %s by pid=%d uid=%d", request.volume, op.name.lower(), peer.pid, peer.uid)
        return json.dumps(result).encode()

    @staticmethod
    def _ring_listing(served: ServedVolume, with_payload: bool) -> dict[str, Any]:
        volume = served.volume
        volume.ring_sync()
        with ring_format.RingReader(volume.path, volume.header) as reader:
            records = []
            for record in reader.records():
                entry = record.to_dict()
                if with_payload:
                    entry["payload_b64"] = base64.b64encode(reader.payload(record).tobytes()).decode()
                records.append(entry)
            return {**reader.stats(), "verify": reader.verify().to_dict(), "entries": records}

    async def _cmd_delete(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        request = VolumeRequest.parse(payload)
        served = self._served(request.volume)
        if not served.volume.header.dangling and not request.flags & DELETE_FORCE:
            raise VolumeBusy(f"{request.volume} is not dangling; use --force to delete it anyway")
        log.warning("control: delete %s by pid=%d uid=%d", request.volume, peer.pid, peer.uid)
        result = await self.delete_volume(request.volume, why="deleted by the administrator")
        return json.dumps(result).encode()

    def _delete_from_guard(self, name: str) -> None:
        """TTL action `delete`, called from the volume's guard thread."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.delete_volume(name, why="time limit passed"), self._loop)

    async def delete_volume(self, name: str, *, why: str) -> dict[str, Any]:
        """Wipe the header, free the data, remove the file, stop serving it."""
        served = self._served(name)
        async with served.state_lock:
            self.served.pop(name, None)
            path = served.volume.path
            size = os.fstat(served.volume.fd).st_size
            fd = os.dup(served.volume.fd)
            await self._retire(served)
            try:
                await asyncio.to_thread(destroy_volume, path, fd, size)
            finally:
                os.close(fd)
        self.alerts.raise_alert("volume-deleted", name, f"volume {name} deleted: {why}", severity="critical",
                                path=str(path), why=why)
        return {"volume": name, "deleted": True, "path": str(path)}

    async def _cmd_alerts(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes | None:
        request = AlertsRequest.parse(payload)
        backlog = self.alerts.history(request.since_seq)
        await send("".join(json.dumps(a.to_dict()) + "\n" for a in backlog).encode())
        if not request.flags & ALERTS_FOLLOW:
            return None
        queue = self.alerts.subscribe()
        log.info("control: alert subscriber pid=%d uid=%d", peer.pid, peer.uid)
        try:
            while True:
                try:
                    alert = await asyncio.wait_for(queue.get(), ALERT_KEEPALIVE_S)
                except TimeoutError:
                    await send(b"")  # keepalive: finds subscribers that went away
                    continue
                await send((json.dumps(alert.to_dict()) + "\n").encode())
        except ConnectionError:
            # The normal end of a follow: the client was interrupted or killed.
            log.info("control: alert subscriber pid=%d left", peer.pid)
            return None
        finally:
            self.alerts.unsubscribe(queue)

    # -- metadata ---------------------------------------------------------------------------

    async def _accept_metadata_fs(self) -> None:
        """The virtio-fs frontend (QEMU), one at a time, from the control socket's allow-list."""
        assert self._meta_listener is not None and self.meta_fs is not None
        acceptor = Acceptor(self._meta_listener, "metadata fs", log)
        while True:
            sock = await acceptor.accept()
            peer = peer_credentials(sock)
            if not self.config.control_access.allows(peer):
                log.warning("metadata fs: refused frontend pid=%d uid=%d gid=%d: not allowed",
                            peer.pid, peer.uid, peer.gid)
                sock.close()
                continue
            attached = self._meta_session
            if attached is not None and not attached.done() and self._meta_sock is not None \
                    and _peer_gone(self._meta_sock):
                # As for a volume (_accept_loop): a reconnect queued behind the hang-up.
                log.info("metadata fs: frontend hung up; ending its session before admitting pid=%d",
                         peer.pid)
                try:
                    await _finish_session(attached)
                except BaseException:  # the daemon stops meanwhile
                    sock.close()
                    raise
            if self._meta_session is not None and not self._meta_session.done():
                log.warning("metadata fs: refused frontend pid=%d: one is attached already", peer.pid)
                sock.close()
                continue
            device = FsDevice(f"metadata-{self.config.vm}", self.meta_fs.handle)
            session = VhostUserSession(MessageChannel(sock, timeout=self.config.peer_timeout), device,
                                       f"metadata-{self.config.vm}")
            self._meta_session = asyncio.create_task(session.run())
            self._meta_sock = sock
            log.info("metadata fs: frontend attached (pid=%d uid=%d)", peer.pid, peer.uid)

    def _volume_metadata(self) -> dict[str, dict[str, str]]:
        """volumes/<name>/... of the metadata tree, live."""
        result = {}
        for name, served in self.served.items():
            header = served.volume.header
            result[name] = {
                "state": header.state.name.lower(),
                "owner": header.owner_name or header.owner,
                "dangling_since": str(header.dangling_since_ns // 1_000_000_000) if header.dangling else "",
                "reason": header.reason,
                "quarantine_records": str(served.volume.ring_stats()["records"]),
            }
        return result

    async def _cmd_meta(self, payload: bytes, peer: PeerCredentials, send: Send) -> bytes:
        request = MetaRequest.parse(payload)
        value = payload[MetaRequest.sizeof():]
        if len(value) != request.value_len:
            raise InvalidRequest(f"META says {request.value_len} value bytes, sent {len(value)}")
        store = self.metadata
        if request.vm != store.vm:
            raise VhostPvError(errno.ENOENT, f"this daemon serves the metadata of VM {store.vm!r}, "
                               f"not {request.vm!r}")
        op = MetaOp(request.op)
        try:
            if op == MetaOp.SET:
                store.set(request.key, value.decode())
                # The key, never the value: secrets must not reach the log.
                log.info("control: meta set %s %s by pid=%d uid=%d",
                         store.vm, request.key, peer.pid, peer.uid)
                result: dict[str, Any] = {"vm": store.vm, "key": request.key, "set": True}
            elif op == MetaOp.REMOVE:
                removed = store.remove(request.key)
                log.info("control: meta rm %s %s by pid=%d uid=%d", store.vm, request.key, peer.pid, peer.uid)
                result = {"vm": store.vm, "key": request.key, "removed": removed}
            elif op == MetaOp.GET:
                node = store.lookup(request.key)
                result = {"vm": store.vm, "key": request.key, "value": node}
            elif op == MetaOp.LIST:
                result = {"vm": store.vm, "key": request.key, "keys": store.keys(request.key)}
            else:
                store.new_boot()
                log.info("control: new boot of VM %s: boot token renewed by pid=%d", store.vm, peer.pid)
                result = {"vm": store.vm, "boot": True}
        except MetadataError as exc:
            code = {404: errno.ENOENT, 413: errno.EFBIG}.get(exc.status, errno.EINVAL)
            raise VhostPvError(code, str(exc)) from None
        except UnicodeDecodeError:
            raise InvalidRequest("metadata values are UTF-8 text") from None
        return json.dumps(result).encode()

    # -- what the container watchers see (guard.containers.VolumeDirectory) ----------------

    def owned_volumes(self) -> list[OwnedVolume]:
        result = []
        for name, served in self.served.items():
            header = served.volume.header
            owner = OwnerBinding(header.owner, header.owner_name, header.owner_image, header.owner_pid,
                                 header.owner_pid_start)
            result.append(OwnedVolume(name, header.dangling, owner))
        return result

    async def flip(self, volume: str, reason: str, source: str, detail: dict[str, Any]) -> None:
        if volume not in self.served:
            return  # deleted meanwhile
        result = await self.set_dangling(volume, True, reason, source=source)
        if result["changed"]:
            self.alerts.raise_alert(
                "owner-gone", volume, f"the owner of {volume} is gone ({reason}, seen by {source})",
                severity="warning", reason=reason, source=source, **detail,
            )

    async def rebind(self, volume: str, owner: OwnerBinding) -> None:
        served = self.served.get(volume)
        if served is None:
            return
        async with served.state_lock:
            if served.volume.header.dangling:
                return
            await asyncio.to_thread(served.volume.update, **owner_fields(owner))
        log.info("%s: owner is %s (%s), init pid %d",
                 volume, owner.name or "-", owner.container[:12], owner.pid)

    async def reclaim_for(self, volume: str, owner: OwnerBinding, mode: str, source: str) -> None:
        try:
            await self.reclaim(volume, owner, ReclaimMode[mode.upper()], source=source)
        except VhostPvError as exc:
            log.warning("%s: reclaim by %s refused: %s", volume, owner.name or owner.container, exc)
            self.alerts.raise_alert("reclaim-refused", volume, f"{owner.name or owner.container} could not "
                                    f"reclaim {volume}: {exc}", container=owner.container)

    def alert(self, kind: str, volume: str, message: str, **details: Any) -> None:
        self.alerts.raise_alert(kind, volume, message, **details)

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
                "dangling_attaches": served.dangling_attaches,
                "totals": served.totals(),
                "ring": served.volume.ring_stats(),
                "guard": served.guard.describe(),
                "connection": None,
            }
            connection = served.connection
            if connection is not None:
                stats = connection.device.stats()
                entry["connection"] = {
                    "source": connection.source,
                    "pid": connection.peer.pid,
                    "uid": connection.peer.uid,
                    "since": connection.since,
                    **connection.session.describe(),
                    "queues": stats.queues,
                }
            volumes.append(entry)
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "volumes": volumes,
            "failed": list(self.failed),
            "alerts": {"by_kind": dict(self.alerts.counts), "subscribers": self.alerts.subscriber_count,
                       "webhook_failures": self.alerts.webhook_failures},
            "metadata": {
                "vm": self.config.vm,
                "http": f"{self.meta_http.host}:{self.meta_http.port}" if self.meta_http else None,
                "http_refused": self.meta_http.refused if self.meta_http else 0,
                "version": self.metadata.version,
            },
            "watchers": {
                "engine": self.engine_watcher.describe() if self.engine_watcher else None,
                "proc_events": self.process_watcher.describe() if self.process_watcher else None,
            },
        }


def _utf8_prefix(text: str, limit: int) -> str:
    """The longest prefix of text that is at most limit bytes of UTF-8, never half a character."""
    return text.encode()[:limit].decode(errors="ignore")


def _log_task_end(task: asyncio.Task[None]) -> None:
    """A background task (a watcher, the metadata fs listener) ended by an error: say so."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended: %r; what it served is gone until the daemon restarts",
                  task.get_name(), task.exception())


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


def _add_counters(into: dict[str, int], queues: list[dict[str, int]]) -> None:
    for queue in queues:
        for key, value in queue.items():
            if key in _SUMMED:
                into[key] = into.get(key, 0) + value
