"""The volume domain: the served volumes and every change of their state.

One VolumeService holds the volumes this daemon serves. The control handlers, the container
watchers (it is their guard.containers.VolumeDirectory) and the metadata plane all go
through its methods: a flip is set_dangling whoever noticed, a reclaim is reclaim whoever
asked. Failures are VhostPvError subclasses (vhost_pv.errors); results are dataclasses that
the transports turn into their replies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vhost_pv.control.wire import ReclaimMode
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
from vhost_pv.guard.containers import OwnedVolume, OwnerBinding
from vhost_pv.guard.engine_events import EngineError
from vhost_pv.guard.guard import VolumeGuard
from vhost_pv.guard.processes import pid_start_ticks
from vhost_pv.peer_identity import BoundVm
from vhost_pv.service.options import VolumeOptions
from vhost_pv.sockfile import AlreadyServed, SocketClaim, lock_volume
from vhost_pv.volume import ring as ring_format
from vhost_pv.volume.header import HeaderError, VolumeState
from vhost_pv.volume.seal import check_seal, clear_seal
from vhost_pv.volume.settings import SettingsChange, SettingsRefused, SettingsResult, plan
from vhost_pv.volume.volume import Volume, destroy_volume

if TYPE_CHECKING:
    from vhost_pv.config import DaemonConfig
    from vhost_pv.devices.blk import BlkStats
    from vhost_pv.guard.containers import ProcessWatcher
    from vhost_pv.guard.engine_api import EngineClient
    from vhost_pv.service.frontends import Connection

# The daemon's log name, whichever module writes: operators (and tests) match on it.
log = logging.getLogger("vhost_pv.daemon")

# Queue counters that add up across queues and connections (not indices or flags).
_SUMMED = frozenset({
    "requests", "reads", "writes", "flushes", "discards", "write_zeroes", "get_ids",
    "unsupported", "bytes_read", "bytes_written", "io_errors", "bad_requests", "kicks",
    "notifications", "quarantined", "quarantine_refused", "dangling_denied", "watchdog_notifications",
    "coalesced_wakes", "async_ios", "direct_fallbacks", "polled_wakes", "guest_faults", "calls_saturated",
})
HEADER_REASON_LEN = 64
"""Bytes of UTF-8 the volume header keeps of a dangling reason (char reason[64])."""
END_CONNECTION_TIMEOUT_S = 10.0
"""How long a forced remove waits for the attached frontend's session to end by itself
(its queue workers finishing what they have in flight) before it is cancelled."""


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
    # The same per queue, with the latency histograms (the metrics endpoint).
    finished_queues: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Attaches to the volume while dangling: when the last alert went out, and how many
    # attaches since went without one (see frontends.DANGLING_ATTACH_ALERT_S).
    dangling_attach_alerted: float = -math.inf
    dangling_attach_suppressed: int = 0
    dangling_attaches: int = 0
    # A reclaim is settling the volume: a frontend attaching meanwhile starts no queue.
    reclaiming: bool = False
    # How it is served (queues, read-only asked for, O_DIRECT): its own, not the daemon's.
    options: VolumeOptions = dataclasses.field(default_factory=VolumeOptions)

    def totals(self) -> dict[str, int]:
        totals = dict(self.finished)
        if self.connection is not None:
            add_counters(totals, self.connection.device.stats().queues)
        return totals

    def queue_totals(self) -> list[dict[str, Any]]:
        """Per queue, since the daemon started: the summed counters, and "latency": per
        operation {"buckets": [...], "sum_ns": n} (see devices.blk.QueueLatency)."""
        totals = copy.deepcopy(self.finished_queues)
        if self.connection is not None:
            add_queue_totals(totals, self.connection.device.stats())
        return totals


@dataclasses.dataclass(frozen=True)
class FlipResult:
    """What set_dangling did: the wire's DanglingReply, field for field."""

    state: VolumeState
    changed: bool
    generation: int
    dangling_since_ns: int
    flip_ns: int
    """How long the durable update and the quiescing of the queue workers took (0 if unchanged)."""

    def to_wire(self) -> dict[str, int]:
        return {"state": int(self.state), "changed": int(self.changed), "generation": self.generation,
                "dangling_since_ns": self.dangling_since_ns, "flip_ns": self.flip_ns}


@dataclasses.dataclass(frozen=True)
class SealReport:
    """The data region checked against the seal taken at the flip (checked=False: no seal)."""

    checked: bool
    chunk_size: int = 0
    changed_chunks: list[int] = dataclasses.field(default_factory=list)
    changed_ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        if not self.checked:
            return {"checked": False}
        return {"checked": True, "chunk_size": self.chunk_size, "changed_chunks": self.changed_chunks,
                "changed_ranges": self.changed_ranges}


@dataclasses.dataclass
class ReclaimReport:
    volume: str
    owner: str
    owner_name: str
    mode: str
    seal: SealReport = dataclasses.field(default_factory=lambda: SealReport(checked=False))
    ring: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The quarantine ring as the reclaim found it: the ring reader's stats and chain check."""
    replayed: int | None = None
    discarded: int | None = None

    @property
    def tampered(self) -> bool:
        return bool(self.seal.changed_chunks)

    def to_dict(self) -> dict[str, Any]:
        """The control reply's JSON (the keys the CLI has always shown)."""
        result: dict[str, Any] = {"volume": self.volume, "owner": self.owner, "owner_name": self.owner_name,
                                  "mode": self.mode, "seal": self.seal.to_dict(), "ring": self.ring}
        if self.replayed is not None:
            result["replayed"] = self.replayed
        if self.discarded is not None:
            result["discarded"] = self.discarded
        return result


@dataclasses.dataclass(frozen=True)
class DeleteResult:
    volume: str
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "deleted": True, "path": str(self.path)}


@dataclasses.dataclass(frozen=True)
class RemoveResult:
    volume: str
    path: Path
    disconnected: int | None
    """The pid of the frontend whose connection a forced remove ended, if any."""
    failed: bool = False
    """It was a volume that could not be opened (only its entry went)."""

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "removed": True, "path": str(self.path),
                "disconnected_pid": self.disconnected, "was_failed": self.failed}


def owner_fields(owner: OwnerBinding) -> dict[str, Any]:
    """The header fields that record a volume's owner."""
    return {"owner": owner.container, "owner_name": owner.name, "owner_image": owner.image,
            "owner_pid": owner.pid, "owner_pid_start": owner.pid_start}


class VolumeService:
    """The served volumes and the one way each of their state changes happens."""

    def __init__(
        self,
        config: DaemonConfig,
        alerts: AlertHub,
        *,
        engine: EngineClient | None = None,
        describe_source: Callable[[int], dict[str, Any]] = lambda source: {"connection": source},
    ) -> None:
        self.config = config
        self.alerts = alerts
        self.engine = engine
        self.describe_source = describe_source
        self.served: dict[str, ServedVolume] = {}
        # Volumes named on the command line or in the served set that could not be served:
        # path, why, and the options they would be served with.
        self.failed: list[dict[str, Any]] = []
        self.on_change: Callable[[], None] = lambda: None
        """Called after a volume's state changed (the metadata store wakes its readers)."""
        self.process_watcher: ProcessWatcher | None = None
        """Told to look at the owners' pids again after a bind."""
        self.on_removed: Callable[[Path], Awaitable[None]] | None = None
        """Awaited after a volume stopped being served for good (deleted, its time limit's
        delete): the served set forgets it."""
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- serving and retiring ---------------------------------------------------------------

    def _open_volume(self, path: Path, options: VolumeOptions, *,
                     strict: bool = False) -> tuple[Volume, int] | None:
        """Lock and open one volume; a volume that cannot be served is logged, alerted and
        listed in status (None), the others are served. Another daemon serving it is fatal.
        strict (a volume added at runtime): the requester hears why instead (VhostPvError),
        nothing is listed."""
        lock_fd = -1
        try:
            lock_fd = lock_volume(path)
            volume = Volume(path, direct=options.direct)
        except AlreadyServed as exc:
            if strict:
                raise VolumeBusy(str(exc)) from None
            raise
        except (HeaderError, ring_format.RingError, OSError, ValueError) as exc:
            if lock_fd >= 0:
                os.close(lock_fd)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if strict:
                if isinstance(exc, OSError) and exc.errno:
                    # The client adds strerror(errno): say the reason only if it is another.
                    plain = why == os.strerror(exc.errno)
                    raise VhostPvError(exc.errno, f"{path} cannot be opened" if plain
                                       else f"{path}: {why}") from None
                raise InvalidRequest(f"{path} is not a usable volume: {why}") from None
            self.failed.append({"path": str(path), "error": why, "options": options.to_dict()})
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

    def add(self, path: Path, options: VolumeOptions | None = None, *,
            strict: bool = False) -> ServedVolume | None:
        """Open a volume and start its guard; None if it cannot be served (see _open_volume).
        Its vhost-user socket is the frontends' business (FrontendService.serve). Without
        options, the daemon-wide ones."""
        self._loop = asyncio.get_running_loop()
        if options is None:
            options = VolumeOptions.defaults(self.config)
        opened = self._open_volume(path, options, strict=strict)
        if opened is None:
            return None
        volume, lock_fd = opened
        if volume.name in self.served:
            volume.close()
            os.close(lock_fd)
            raise ValueError(f"two volumes share the name {volume.name!r}: socket names clash")
        guard = VolumeGuard(
            volume, self.alerts, describe_source=self.describe_source,
            delete_volume=self._delete_from_guard, control_path=self.config.control_path,
        )
        served = ServedVolume(
            volume=volume,
            socket_path=self.config.socket_dir / f"{volume.name}.sock",
            read_only=options.read_only or volume.read_only,
            guard=guard,
            lock_fd=lock_fd,
            options=options,
        )
        self.served[volume.name] = served
        guard.start()
        self._loop.add_reader(volume.event_fd, self._on_volume_events, served)
        return served

    async def close(self) -> None:
        """Stop serving every volume."""
        for served in list(self.served.values()):
            await self._retire(served, for_good=False)  # the daemon stops: the next one serves it
        self.served.clear()

    async def _retire(self, served: ServedVolume, *, for_good: bool = True) -> None:
        """Stop serving one volume: listener, connection, guard, data path. `for_good` (unless
        the whole daemon stops): not served by the next daemon either, so its listener leaves
        the service manager's fd store and its socket file goes."""
        self._stop_listening(served, for_good=for_good)
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

    async def remove(self, name: str, *, force: bool = False) -> RemoveResult:
        """Stop serving a volume and leave its file as it is: listener closed, socket file
        unlinked, guard stopped, lock released. Refused (VolumeBusy) while a frontend is
        attached, unless forced: then that connection ends as on a disconnect (its queue
        workers finish what they have in flight, so every write acknowledged is in the
        file) after the listener is gone, so nothing attaches again meanwhile."""
        served = self.get(name)
        async with served.state_lock:
            if self.served.get(name) is not served:
                raise VolumeNotFound(f"{name} was removed meanwhile")
            connection = served.connection
            if connection is not None and not force:
                raise VolumeBusy(f"{name} has a frontend attached (pid {connection.peer.pid}); "
                                 "--force ends that connection")
            self.served.pop(name)
            self._stop_listening(served)
            disconnected = connection.peer.pid if connection is not None else None
            if connection is not None:
                log.warning("%s: ending the connection of frontend pid=%d for its removal", name,
                            connection.peer.pid)
                await self._end_connection(served)
            # Everything acknowledged is in the file now (the workers have stopped): make it
            # durable before the volume leaves this daemon.
            await asyncio.to_thread(os.fsync, served.volume.fd)
            await self._retire(served)
        log.warning("%s: no longer served (%s); the file is kept", name, served.volume.path)
        self.alerts.raise_alert("volume-removed", name, f"{name} is no longer served "
                                f"({served.volume.path} kept)", severity="info",
                                path=str(served.volume.path), disconnected_pid=disconnected)
        self.on_change()
        return RemoveResult(volume=name, path=served.volume.path, disconnected=disconnected)

    async def withdraw(self, name: str) -> None:
        """Undo an add that could not be completed (its socket could not be served): stop
        and forget the volume, with no alert."""
        served = self.served.pop(name, None)
        if served is not None:
            await self._retire(served)

    @staticmethod
    def _stop_listening(served: ServedVolume, *, for_good: bool = True) -> None:
        """No more frontends for this volume. `for_good` (unless the whole daemon stops): not
        served by the next daemon either, so its listener leaves the service manager's fd
        store and its socket file goes; otherwise the file stays for the next daemon."""
        if served.accept_task is not None:
            served.accept_task.cancel()
        if served.listener is not None:
            served.listener.close()
            served.listener = None
        if served.claim is not None:
            served.claim.release(for_good=for_good)  # unlinks the socket only if it still is ours
            served.claim = None

    @staticmethod
    async def _end_connection(served: ServedVolume) -> None:
        """End the attached frontend's connection cleanly: shutting its socket down ends the
        session's read loop, which stops the queues (each worker finishing its in-flight
        requests) and releases the frontend's memory, as when a frontend hangs up."""
        connection = served.connection
        if connection is None:
            return
        with contextlib.suppress(OSError):
            connection.session.channel.sock.shutdown(socket.SHUT_RDWR)
        done, _ = await asyncio.wait([connection.task], timeout=END_CONNECTION_TIMEOUT_S)
        if not done:
            log.error("%s: the session of frontend pid=%d did not end in %.0f s; cancelled",
                      served.volume.name, connection.peer.pid, END_CONNECTION_TIMEOUT_S)
            connection.task.cancel()
            await asyncio.wait([connection.task])

    def _on_volume_events(self, served: ServedVolume) -> None:
        # Reset the eventfd here (level-triggered reader) and let the guard drain the queue.
        with contextlib.suppress(BlockingIOError):
            os.read(served.volume.event_fd, 8)
        served.guard.events_ready()

    def get(self, name: str) -> ServedVolume:
        served = self.served.get(name)
        if served is None:
            raise VolumeNotFound(f"no volume named {name!r} is served here")
        return served

    # -- the dangling flag ------------------------------------------------------------------

    async def set_dangling(self, name: str, dangling: bool, reason: str, *, source: str) -> FlipResult:
        """The one way a volume's dangling flag changes, whatever noticed (ioctl, engine
        events, process events). Returns once the new state is durable in the header and
        every queue worker has passed it."""
        served = self.get(name)
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
        self.on_change()  # volumes/<name>/state changed: wake long-polling readers
        log.warning("%s: %s by %s (%s) in %.3f ms", name,
                    "now DANGLING" if dangling else "dangling flag cleared",
                    source, reason or "no reason", flip_ns / 1e6,
                    extra={"volume": name, "source": source, "reason": reason})
        if not dangling:
            self.alerts.raise_alert("dangling-cleared", name, f"dangling flag of {name} cleared by {source}",
                                    severity="info", source=source, reason=reason)
        return self._flip_result(served, changed=True, flip_ns=flip_ns)

    @staticmethod
    def _flip_result(served: ServedVolume, *, changed: bool, flip_ns: int) -> FlipResult:
        header = served.volume.header
        return FlipResult(state=header.state, changed=changed, generation=header.generation,
                          dangling_since_ns=header.dangling_since_ns, flip_ns=flip_ns)

    # -- owners -----------------------------------------------------------------------------

    async def resolve_owner(self, container: str, *, pid: int) -> OwnerBinding:
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

    async def bind(self, name: str, owner: OwnerBinding) -> None:
        """Record a new owner of an attached volume (a dangling one is reclaimed instead)."""
        served = self.get(name)
        async with served.state_lock:
            if served.volume.header.dangling:
                raise VolumeBusy(f"{name} is dangling: a new owner reclaims it "
                                 "(vhost-pv reclaim) rather than binding it")
            await asyncio.to_thread(served.volume.update, **owner_fields(owner))
        if self.process_watcher is not None:
            await self.process_watcher.check_alive("bind")

    # -- the VM binding ---------------------------------------------------------------------

    async def bind_vm(self, name: str, binding: BoundVm) -> dict[str, Any]:
        """Record which VM's QEMU may attach to a volume (an empty binding: any VM), durably
        in its header. It is checked at every attach from then on; a frontend attached now
        stays attached, and the result says whether it is the bound VM ("attached_matches":
        None without a frontend or when its identity is unknown)."""
        served = self.get(name)
        async with served.state_lock:
            await asyncio.to_thread(served.volume.update, vm_uuid=binding.vm_uuid,
                                    vm_name=binding.vm_name, vm_cgroup=binding.vm_cgroup)
        matches: bool | None = None
        connection = served.connection
        if binding.bound and connection is not None and connection.identity is not None:
            problems = binding.mismatches(connection.identity)
            matches = not problems
            if problems:
                log.warning("%s: the attached frontend pid=%d is not the VM now bound (%s): %s; "
                            "it stays attached until it disconnects", name, connection.peer.pid,
                            binding.describe(), "; ".join(problems))
        header = served.volume.header
        return {"volume": name, "vm_uuid": header.to_dict()["vm_uuid"], "vm_name": header.vm_name,
                "vm_cgroup": header.vm_cgroup, "generation": header.generation,
                "attached_matches": matches}

    # -- settings ---------------------------------------------------------------------------

    async def update_settings(self, name: str, change: SettingsChange, *, source: str) -> SettingsResult:
        """Change a served volume's settings (volume/settings.py), durably and for the very
        next request: the header is written crash-safely (Volume.update, which also hands the
        read and ring-full policies to the queue workers before it returns), the guard re-arms
        the time limit, and the next attach is checked against the new uids/gids (an attached
        frontend stays). Serialised with flips and reclaims by the state lock."""
        served = self.get(name)
        async with served.state_lock:
            old = served.volume.header
            try:
                changes = plan(old, change)
            except SettingsRefused as exc:
                raise VolumeBusy(f"{name}: {exc}") from None
            if changes:
                await asyncio.to_thread(served.volume.update, **changes)
                if {"ttl_seconds", "ttl_action"} & changes.keys():
                    # Only a real change re-arms: an expired limit given again as it is
                    # must not act a second time.
                    served.guard.ttl_changed()
            new = served.volume.header
        result = SettingsResult.between(
            name, old, new, frontend_attached=served.connection is not None,
            ttl_deadline_ns=(new.dangling_since_ns + new.ttl_seconds * 1_000_000_000
                             if new.dangling and new.ttl_seconds else None))
        if result.changed:
            self.on_change()  # volumes/<name>/owner may have changed
            if change.touches_owner and self.process_watcher is not None:
                await self.process_watcher.check_alive("settings")
            self.alerts.raise_alert(
                "settings-changed", name,
                f"settings of {name} changed by {source}: "
                + ", ".join(f"{field} {old_value} → {new_value}"
                            for field, (old_value, new_value) in result.changed.items()),
                severity="info", source=source,
                changed={field: {"old": o, "new": n} for field, (o, n) in result.changed.items()})
        return result

    # -- reclaim ----------------------------------------------------------------------------

    async def reclaim(
        self, name: str, owner: OwnerBinding, mode: ReclaimMode, *, source: str
    ) -> ReclaimReport:
        """A new owner takes a dangling volume back: check the seal, settle the ring, clear."""
        served = self.get(name)
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
            tampered=report.tampered,
        )
        return report

    async def _settle_reclaim(
        self, served: ServedVolume, owner: OwnerBinding, mode: ReclaimMode
    ) -> ReclaimReport:
        """reclaim's work, under the state lock with no queue running."""
        name = served.volume.name
        volume = served.volume
        seal = await asyncio.to_thread(served.guard.wait_sealed, 3600.0)
        report = ReclaimReport(volume=name, owner=owner.container, owner_name=owner.name,
                               mode=mode.name.lower())
        if seal is not None:
            check = await asyncio.to_thread(check_seal, volume.fd, volume.header, seal)
            report.seal = SealReport(checked=True, chunk_size=check.chunk_size,
                                     changed_chunks=check.changed_chunks,
                                     changed_ranges=check.changed_ranges())
            if check.changed_chunks:
                self.alerts.raise_alert(
                    "tamper-detected", name,
                    f"data of dangling volume {name} changed outside the backend: "
                    f"{len(check.changed_chunks)} chunk(s) differ from the seal",
                    severity="critical", changed_ranges=check.changed_ranges(),
                )
        chain = await asyncio.to_thread(self._ring_verify, served)
        report.ring = chain
        if mode == ReclaimMode.REPLAY:
            if chain["verify"]["ok"] and chain["records"]:
                # The seal has been checked: from here the backend itself rewrites the data
                # region. Drop the stored seal before the first write, so a daemon killed
                # anywhere from now until the header says attached is restarted dangling with
                # no seal, and seals the data as it finds it; keeping it would have the next
                # reclaim report the replayed writes as tampering.
                await asyncio.to_thread(clear_seal, volume.fd)
            try:
                report.replayed = await asyncio.to_thread(
                    ring_format.replay, volume.path, volume.fd, volume.header)
            except ring_format.RingError as exc:
                raise RingDamaged(str(exc)) from None
            volume.ring_reset()
        elif mode == ReclaimMode.DISCARD:
            report.discarded = volume.ring_stats()["records"]
            volume.ring_reset()
        await asyncio.to_thread(
            volume.update, state=VolumeState.ATTACHED, dangling_since_ns=0, reason="",
            dangling_source="", **owner_fields(owner),
        )
        await asyncio.to_thread(clear_seal, volume.fd)
        served.guard.flipped(False)
        self.on_change()
        return report

    @staticmethod
    def _ring_verify(served: ServedVolume) -> dict[str, Any]:
        volume = served.volume
        volume.ring_sync()
        with ring_format.RingReader(volume.path, volume.header) as reader:
            return {**reader.stats(), "verify": reader.verify().to_dict()}

    # -- the quarantine ring ----------------------------------------------------------------

    async def ring_listing(self, name: str, *, with_payload: bool) -> dict[str, Any]:
        """The ring's records (and their payloads, base64), with its stats and chain check."""
        served = self.get(name)
        async with served.state_lock:
            return await asyncio.to_thread(self._ring_listing, served, with_payload)

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

    async def ring_replay(self, name: str) -> int:
        """Apply the ring's writes to the data region of an attached volume with no
        frontend, then empty it; the number of writes replayed."""
        served = self.get(name)
        volume = served.volume
        async with served.state_lock:
            if volume.header.dangling or served.connection is not None:
                raise VolumeBusy(f"replay needs {name} attached and without a "
                                 "frontend (use reclaim --replay on a dangling volume)")
            volume.ring_sync()
            try:
                replayed = await asyncio.to_thread(
                    ring_format.replay, volume.path, volume.fd, volume.header)
            except ring_format.RingError as exc:
                raise RingDamaged(str(exc)) from None
            volume.ring_reset()
        return replayed

    async def ring_discard(self, name: str) -> int:
        """Empty the ring; the number of records dropped."""
        served = self.get(name)
        volume = served.volume
        async with served.state_lock:
            discarded: int = volume.ring_stats()["records"]
            volume.ring_reset()
        return discarded

    # -- delete -----------------------------------------------------------------------------

    def _delete_from_guard(self, name: str) -> None:
        """TTL action `delete`, called from the volume's guard thread."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self.delete(name, why="time limit passed", force=True), self._loop)

    async def delete(self, name: str, *, why: str, force: bool = False) -> DeleteResult:
        """Wipe the header, free the data, remove the file, stop serving it. Only a dangling
        volume, unless forced (the administrator's --force, the guard's time limit)."""
        served = self.get(name)
        if not served.volume.header.dangling and not force:
            raise VolumeBusy(f"{name} is not dangling; use --force to delete it anyway")
        async with served.state_lock:
            if self.served.get(name) is not served:
                raise VolumeNotFound(f"{name} was removed meanwhile")
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
        if self.on_removed is not None:
            await self.on_removed(path)
        return DeleteResult(volume=name, path=path)

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
        try:
            result = await self.set_dangling(volume, True, reason, source=source)
        except VolumeNotFound:
            return  # deleted meanwhile
        if result.changed:
            # What the watchers made of the owner's end: "crashed (exit 137, killed by SIGKILL)".
            why = f"{reason}: {detail['classification']}" if detail.get("classification") else reason
            self.alerts.raise_alert(
                "owner-gone", volume, f"the owner of {volume} is gone ({why}, seen by {source})",
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
            log.warning("%s: reclaim by %s refused: %s", volume, owner.name or owner.container, exc,
                        extra={"volume": volume, "source": source, "reason": "reclaim-refused"})
            self.alerts.raise_alert("reclaim-refused", volume, f"{owner.name or owner.container} could not "
                                    f"reclaim {volume}: {exc}", container=owner.container)

    def alert(self, kind: str, volume: str, message: str, **details: Any) -> None:
        self.alerts.raise_alert(kind, volume, message, **details)

    # -- what the metadata plane and status show --------------------------------------------

    def volume_metadata(self) -> dict[str, dict[str, str]]:
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

    def status(self) -> list[dict[str, Any]]:
        """The volumes part of the daemon's status, sorted by name."""
        volumes = []
        for name, served in sorted(self.served.items()):
            entry: dict[str, Any] = {
                "name": name,
                "path": str(served.volume.path),
                "socket": str(served.socket_path),
                "read_only": served.read_only,
                "options": served.options.to_dict(),
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
                    "gid": connection.peer.gid,
                    "identity": connection.identity.to_dict() if connection.identity is not None else None,
                    "since": connection.since,
                    **connection.session.describe(),
                    "queues": stats.queues,
                }
            volumes.append(entry)
        return volumes


def _utf8_prefix(text: str, limit: int) -> str:
    """The longest prefix of text that is at most limit bytes of UTF-8, never half a character."""
    return text.encode()[:limit].decode(errors="ignore")


def add_queue_totals(into: list[dict[str, Any]], stats: BlkStats) -> None:
    """Add one connection's per-queue counters and latency histograms to per-queue totals."""
    for index, queue in enumerate(stats.queues):
        while len(into) <= index:
            into.append({"latency": {}})
        total = into[index]
        add_counters(total, [queue])
        if index < len(stats.latency):
            latency = stats.latency[index]
            for op, buckets in latency.buckets.items():
                mine = total["latency"].setdefault(op, {"buckets": [0] * len(buckets), "sum_ns": 0})
                mine["buckets"] = [a + b for a, b in zip(mine["buckets"], buckets, strict=True)]
                mine["sum_ns"] += latency.sum_ns[op]


def add_counters(into: dict[str, int], queues: list[dict[str, int]]) -> None:
    for queue in queues:
        for key, value in queue.items():
            if key in _SUMMED:
                into[key] = into.get(key, 0) + value
