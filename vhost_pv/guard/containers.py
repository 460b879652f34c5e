"""Volumes follow their containers: engine events, reconciliation and process exits turn a
volume dangling when its owner is deleted or crashes, and a labelled new container reclaims it.

Every source ends in the same call, VolumeDirectory.flip (the daemon's set_dangling, which
the ioctl uses too). The rules:

- engine `destroy`/`remove` of the owner: `container-deleted`.
- engine `die`/`died` of the owner with a non-zero exit code, or `oom`: `container-crashed`,
  unless the engine itself was asked to stop or signal the container just before (a
  `kill`/`stop` event: `podman stop`, `docker rm -f`, ...). That is an administrator's stop,
  not a crash; if the container is then removed the volume flips as deleted. A clean exit
  (code 0) never flips.
- The event stream is lossy (the engine drops slow readers and keeps little history), so
  on every (re)connect and periodically the owners are looked up again: an owner the engine
  no longer knows flips as `container-deleted`.
- Process events: the owner's init pid exiting with a non-zero code or a signal flips as
  `container-crashed`, with or without an engine. An owner whose pid is gone (or reused by
  another process) when the watch starts flips as `owner-exited`: its end was not seen.
- A container started with label `vhost-pv.reclaim=<volume>` reclaims that dangling volume
  if the reclaim policy allows it (default: it runs the image the old owner ran).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from vhost_pv.errors import VhostPvError
from vhost_pv.guard.engine_events import ContainerEvent, ContainerInfo, EngineError
from vhost_pv.guard.processes import ProcessExit, pid_start_ticks

if TYPE_CHECKING:  # the HTTP client and pyroute2 load only when a watcher is configured
    from vhost_pv.guard.engine_api import EngineClient
    from vhost_pv.guard.procevents import ProcessExitSocket

log = logging.getLogger("vhost_pv.containers")

RECLAIM_LABEL = "vhost-pv.reclaim"
RECLAIM_MODE_LABEL = "vhost-pv.reclaim-mode"
RECLAIM_MODES = ("keep", "replay", "discard")
# How long after a kill/stop request an exit still counts as that stop, not a crash.
STOP_GRACE_S = 30.0
# How long an exit waits for a stop/kill event that the engine sends after it (Podman
# reports `died` before `stop`), before it is taken as a crash.
EXIT_SETTLE_S = 1.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0

REASON_DELETED = "container-deleted"
REASON_CRASHED = "container-crashed"
REASON_OWNER_EXITED = "owner-exited"


class ReclaimPolicy(enum.Enum):
    """Which labelled containers may reclaim a dangling volume on start."""

    SAME_IMAGE = "same-image"  # the new container runs the image the old owner ran
    LABEL = "label"  # any container with the label
    NONE = "none"  # labels are ignored (reclaim stays an admin command)


@dataclasses.dataclass(frozen=True)
class OwnerBinding:
    """Who owns a volume, as recorded in its header."""

    container: str  # the full id once resolved; what the admin gave before that
    name: str = ""
    image: str = ""
    pid: int = 0
    pid_start: int = 0

    @classmethod
    def from_container(cls, info: ContainerInfo) -> OwnerBinding:
        pid = info.pid if info.status == "running" else 0
        start = pid_start_ticks(pid) if pid else None
        return cls(info.id, info.name, info.image, pid if start is not None else 0, start or 0)

    def matches(self, container_id: str) -> bool:
        return bool(self.container) and container_id == self.container


@dataclasses.dataclass(frozen=True)
class OwnedVolume:
    volume: str
    dangling: bool
    owner: OwnerBinding


class VolumeDirectory(Protocol):
    """What the watchers need from the daemon (service.volumes.VolumeService). Its methods
    raise vhost_pv.errors.VhostPvError subclasses, the types the control socket answers."""

    def owned_volumes(self) -> list[OwnedVolume]: ...

    async def flip(self, volume: str, reason: str, source: str, detail: dict[str, Any]) -> None: ...

    async def rebind(self, volume: str, owner: OwnerBinding) -> None: ...

    async def reclaim_for(self, volume: str, owner: OwnerBinding, mode: str, source: str) -> None: ...

    def alert(self, kind: str, volume: str, message: str, **details: Any) -> None: ...


class EngineWatcher:
    """Follows a Docker-API engine's /events, reconciles on (re)connect and periodically."""

    def __init__(
        self,
        client: EngineClient,
        directory: VolumeDirectory,
        *,
        reconcile_interval: float = 30.0,
        reclaim_policy: ReclaimPolicy = ReclaimPolicy.SAME_IMAGE,
    ) -> None:
        self.client = client
        self.directory = directory
        self.reconcile_interval = reconcile_interval
        self.reclaim_policy = reclaim_policy
        self.connected = False
        self.connects = 0
        self.events_seen = 0
        self.reconciles = 0
        self.last_reconcile_ns = 0
        self.last_error = ""
        self._stop_requested: dict[str, float] = {}
        self._last_event_ns = 0
        self._pending_exits: set[asyncio.Task[None]] = set()
        self._reconcile_lock = asyncio.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.client.url,
            "connected": self.connected,
            "connects": self.connects,
            "events_seen": self.events_seen,
            "reconciles": self.reconciles,
            "last_reconcile_ns": self.last_reconcile_ns,
            "last_error": self.last_error,
            "reclaim_policy": self.reclaim_policy.value,
            "reconcile_interval_s": self.reconcile_interval,
        }

    async def run(self) -> None:
        """Forever: connect, reconcile, follow; on failure back off and start again."""
        periodic = asyncio.create_task(self._periodic_reconcile())
        backoff = BACKOFF_FIRST_S
        try:
            while True:
                try:
                    # Subscribe first, then look: whatever happens between the two is in the
                    # stream. After a break, ask for what was missed since the last event too.
                    stream = await self.client.events(since_ns=self._last_event_ns or None)
                    try:
                        self.connected = True
                        self.connects += 1
                        # Events from here on are in this stream; after a break, the next
                        # stream replays from the last one seen (or from this moment).
                        self._last_event_ns = self._last_event_ns or time.time_ns()
                        log.info("engine: following events at %s", self.client.url)
                        await self.reconcile("connect" if self.connects == 1 else "reconnect")
                        backoff = BACKOFF_FIRST_S
                        async for event in stream:
                            try:
                                await self.on_event(event)
                            except (EngineError, asyncio.CancelledError):
                                raise
                            except VhostPvError as exc:  # the volume refused: a state, not a bug
                                log.warning("engine: %s of %s: %s", event.action, event.id[:12], exc)
                            except Exception:  # one event must not end the watching
                                log.exception("engine: handling %s of %s failed", event.action, event.id[:12])
                    finally:
                        stream.close()
                except EngineError as exc:
                    self.last_error = str(exc)
                    log.warning("engine: %s; reconnecting in %.1f s", exc, backoff)
                except Exception as exc:  # a bug or a broken engine: log it, keep watching
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("engine: watcher failed; reconnecting in %.1f s", backoff)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            self.connected = False
            periodic.cancel()
            for task in list(self._pending_exits):
                task.cancel()
            await self.client.close()

    async def _periodic_reconcile(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_interval)
            if not self.connected:
                continue
            try:
                await self.reconcile("periodic")
            except EngineError as exc:
                log.warning("engine: periodic reconcile failed: %s", exc)

    async def reconcile(self, why: str) -> None:
        """Look every owner up: flip the volumes whose owner is gone, refresh the others'
        binding (a name resolved to its full id, a restarted container's new pid)."""
        async with self._reconcile_lock:
            flipped = 0
            for owned in self.directory.owned_volumes():
                if owned.dangling or not owned.owner.container:
                    continue
                # By full id once resolved; by name or id prefix as the admin gave it before.
                info = await self.client.inspect(owned.owner.container)
                if info is None:
                    flipped += 1
                    await self.directory.flip(
                        owned.volume, REASON_DELETED, "engine-reconcile",
                        {"owner": owned.owner.container,
                         "why": f"the engine no longer knows the owner ({why})"},
                    )
                    continue
                await self._refresh_binding(owned, info)
            self.reconciles += 1
            self.last_reconcile_ns = time.time_ns()
            log.info("engine: reconciled (%s): %d volume(s) flipped", why, flipped)

    async def _refresh_binding(self, owned: OwnedVolume, info: ContainerInfo) -> None:
        binding = OwnerBinding.from_container(info)
        current = owned.owner
        if (binding.container, binding.name, binding.image, binding.pid) != (
            current.container, current.name, current.image, current.pid
        ):
            await self.directory.rebind(owned.volume, binding)

    async def on_event(self, event: ContainerEvent) -> None:
        self.events_seen += 1
        self._last_event_ns = max(self._last_event_ns, event.time_ns)
        if event.stop_requested:
            now = time.monotonic()
            # Forget old requests of containers that were neither removed nor started again.
            for stale in [c for c, at in self._stop_requested.items() if now - at > STOP_GRACE_S]:
                del self._stop_requested[stale]
            self._stop_requested[event.id] = now
        owned = [o for o in self.directory.owned_volumes() if o.owner.matches(event.id)]
        if event.started:
            self._stop_requested.pop(event.id, None)
            await self._on_start(event, owned)
            return
        for entry in owned:
            if entry.dangling:
                continue
            if event.deleted:
                await self.directory.flip(entry.volume, REASON_DELETED, "engine",
                                          {"container": event.id, "name": event.name, "action": event.action})
            elif event.oom:
                await self.directory.flip(entry.volume, REASON_CRASHED, "engine",
                                          {"container": event.id, "name": event.name, "action": "oom"})
            elif event.exited:
                self._on_exit(entry, event)
        if event.deleted:
            self._stop_requested.pop(event.id, None)

    def _on_exit(self, owned: OwnedVolume, event: ContainerEvent) -> None:
        if event.exit_code == 0:
            log.info("engine: owner %s of %s exited cleanly; the volume stays attached",
                     event.name or event.id[:12], owned.volume)
            return
        task = asyncio.create_task(self._settle_exit(owned, event))
        self._pending_exits.add(task)
        task.add_done_callback(self._pending_exits.discard)

    async def _settle_exit(self, owned: OwnedVolume, event: ContainerEvent) -> None:
        await asyncio.sleep(EXIT_SETTLE_S)
        requested = self._stop_requested.get(event.id)
        if requested is not None and time.monotonic() - requested < STOP_GRACE_S:
            log.info("engine: owner %s of %s exited with %s after a stop request: not a crash",
                     event.name or event.id[:12], owned.volume, event.exit_code)
            return
        detail: dict[str, Any] = {"container": event.id, "name": event.name, "action": event.action,
                                  "exit_code": event.exit_code}
        reason = REASON_CRASHED
        try:
            if await self.client.inspect(event.id) is None:
                # `rm -f` of a running owner: its exit is reported before its removal.
                reason = REASON_DELETED
        except EngineError as exc:
            log.warning("engine: cannot look at %s after its exit: %s", event.id[:12], exc)
        await self.directory.flip(owned.volume, reason, "engine", detail)

    async def _on_start(self, event: ContainerEvent, owned: list[OwnedVolume]) -> None:
        wanted = event.attributes.get(RECLAIM_LABEL)
        info = None
        if owned or wanted is not None:
            info = await self.client.inspect(event.id)
        if info is None:
            return
        for entry in owned:  # the owner (re)started: watch its new init pid
            if not entry.dangling:
                await self._refresh_binding(entry, info)
        wanted = info.labels.get(RECLAIM_LABEL, wanted)
        if wanted:
            await self._reclaim_by_label(wanted, info)

    async def _reclaim_by_label(self, volume: str, info: ContainerInfo) -> None:
        target = next((o for o in self.directory.owned_volumes() if o.volume == volume), None)
        who = f"container {info.name or info.id[:12]}"
        if target is None:
            log.warning("engine: %s asks to reclaim %s, which is not served here", who, volume)
            return
        if not target.dangling:
            if not target.owner.matches(info.id):
                log.info("engine: %s asks to reclaim %s, which is not dangling", who, volume)
            return
        refusal = self._policy_refusal(target, info)
        if refusal:
            log.warning("engine: %s may not reclaim %s: %s", who, volume, refusal,
                        extra={"volume": volume, "source": "engine", "reason": "reclaim-refused"})
            self.directory.alert("reclaim-refused", volume, f"{who} may not reclaim {volume}: {refusal}",
                                 container=info.id, policy=self.reclaim_policy.value)
            return
        mode = info.labels.get(RECLAIM_MODE_LABEL, "keep")
        if mode not in RECLAIM_MODES:
            self.directory.alert("reclaim-refused", volume,
                                 f"{who} asks for reclaim mode {mode!r}; expected one of {RECLAIM_MODES}",
                                 container=info.id)
            return
        await self.directory.reclaim_for(volume, OwnerBinding.from_container(info), mode, "engine-label")

    def _policy_refusal(self, target: OwnedVolume, info: ContainerInfo) -> str:
        if self.reclaim_policy == ReclaimPolicy.NONE:
            return "the reclaim policy is 'none' (reclaim with `vhost-pv reclaim`)"
        if self.reclaim_policy == ReclaimPolicy.SAME_IMAGE:
            if not target.owner.image:
                return "the old owner's image is not known, so 'same-image' cannot allow it"
            if info.image != target.owner.image:
                return f"it runs image {info.image[:19]}, the old owner ran {target.owner.image[:19]}"
        return ""


class ProcessWatcher:
    """Watches the owners' init pids through kernel process events."""

    def __init__(self, directory: VolumeDirectory) -> None:
        self.directory = directory
        self.exits_seen = 0
        self._socket: ProcessExitSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self) -> dict[str, Any]:
        return {"enabled": self._socket is not None, "watched": self.watched(),
                "owner_exits_seen": self.exits_seen}

    def watched(self) -> dict[int, list[str]]:
        """Owner init pid -> the volumes it owns (one container may own several)."""
        result: dict[int, list[str]] = {}
        for owned in self.directory.owned_volumes():
            if owned.owner.pid and not owned.dangling:
                result.setdefault(owned.owner.pid, []).append(owned.volume)
        return result

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        from vhost_pv.guard.procevents import open_exit_socket

        try:
            self._socket = await open_exit_socket()
        except PermissionError as exc:
            # Linux before 6.6 lets only CAP_NET_ADMIN listen to the process connector; the
            # service unit grants it (AmbientCapabilities=CAP_NET_ADMIN).
            raise PermissionError(
                exc.errno, "the kernel refused the process connector: listening to process "
                "events needs CAP_NET_ADMIN (on Linux before 6.6); run the daemon with it, or "
                f"without --proc-events ({exc.strerror or exc})", "--proc-events") from exc
        self._loop.add_reader(self._socket.fileno(), self._readable)
        log.info("process events: watching owner init pids %s", sorted(self.watched()) or "(none yet)")
        await self.check_alive("start")

    async def check_alive(self, why: str) -> None:
        """Owners whose init is gone, or is another process now, exited unseen: flip them."""
        for owned in self.directory.owned_volumes():
            pid = owned.owner.pid
            if owned.dangling or not pid:
                continue
            start = pid_start_ticks(pid)
            if start is None or (owned.owner.pid_start and start != owned.owner.pid_start):
                await self.directory.flip(
                    owned.volume, REASON_OWNER_EXITED, "proc-events",
                    {"pid": pid,
                     "why": f"the owner's init pid is gone or reused ({why}); its exit was not seen"},
                )

    def _readable(self) -> None:
        assert self._socket is not None
        try:
            exits = self._socket.read()
        except OSError as exc:  # e.g. ENOBUFS: the kernel dropped events; look at the pids
            log.warning("process events: %s; checking the owners' pids", exc)
            self._spawn(self.check_alive("events lost"))
            return
        if not exits:
            return
        watched = self.watched()
        for process_exit in exits:
            volumes = watched.get(process_exit.pid, [])
            if volumes:
                self.exits_seen += 1
            for volume in volumes:
                self._spawn(self._on_owner_exit(volume, process_exit))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_owner_exit(self, volume: str, process_exit: ProcessExit) -> None:
        if process_exit.clean:
            log.info("process events: the owner of %s (pid %d) exited cleanly; the volume stays attached",
                     volume, process_exit.pid)
            return
        await self.directory.flip(
            volume, REASON_CRASHED, "proc-events",
            {"pid": process_exit.pid, "exit": process_exit.describe(),
             "exit_code": process_exit.exit_code, "signal": process_exit.signal},
        )

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._socket is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
