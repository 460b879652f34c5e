"""Volumes follow their containers: engine events, reconciliation and process exits turn a
volume dangling when its owner is deleted or crashes, and a labelled new container reclaims it.

Every source ends in the same call, VolumeDirectory.flip (the daemon's set_dangling, which
the ioctl uses too). The rules:

- engine `destroy`/`remove` of the owner: `container-deleted`.
- engine `die`/`died` of the owner: not decided from the event alone (verdicts.py has the
  rule). The watcher waits a moment for what the engine sends after it (`remove`, Docker's
  `stop`), asks the engine about the container (gone: deleted; OOMKilled: crashed) and
  looks at the stop it was asked for: a `kill`/`stop` event, or the container seen
  "stopping" (Podman 4.3 reports a `podman stop` in no event: the owners' state is sampled
  every `stop_poll` seconds to see one in progress). A stop is not a crash: the volume
  stays attached and an `owner-stopped` alert (info) says so. Otherwise a non-zero exit is
  `container-crashed`; a clean exit (code 0) never flips.
- The event stream is lossy (the engine drops slow readers and keeps little history), so
  on every (re)connect and periodically the owners are looked up again: an owner the engine
  no longer knows flips as `container-deleted`.
- Process events: the owner's init pid exiting with a non-zero code or a signal is only a
  hint when an engine is followed: the kernel reports it before the engine does, and cannot
  tell a stop or a removal from a crash. It waits up to `grace` seconds for the engine's
  verdict (which wins), then asks the engine itself; only with no engine (or an engine that
  cannot be asked) does the exit flip as `container-crashed` on its own. An owner whose pid
  is gone (or reused by another process) when the watch starts flips as `owner-exited`:
  its end was not seen.
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
from vhost_pv.guard.engine_events import STOPPING_STATUS, ContainerEvent, ContainerInfo, EngineError
from vhost_pv.guard.processes import ProcessExit, pid_start_ticks
from vhost_pv.guard.verdicts import Evidence, ExitKind, Verdict, classify

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
# How often the running owners' state is sampled for "stopping" (0: never). A `podman stop`
# holds that state for its whole timeout (10 s by default), so a stop with a timeout longer
# than this is seen; `podman stop -t 0` (SIGKILL at once) is not, and counts as a crash.
STOP_POLL_S = 0.5
# How long an owner's process exit (kernel event) waits for the engine's verdict before the
# watcher asks the engine itself: the engine's `died` comes ~0.2 s after the exit (Podman
# tails its event file) and is settled EXIT_SETTLE_S later.
ENGINE_GRACE_S = 3.0
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
        stop_poll: float = STOP_POLL_S,
    ) -> None:
        self.client = client
        self.directory = directory
        self.reconcile_interval = reconcile_interval
        self.reclaim_policy = reclaim_policy
        self.stop_poll = stop_poll
        self.stop_polls = 0
        self.connected = False
        self.connects = 0
        self.events_seen = 0
        self.reconciles = 0
        self.last_reconcile_ns = 0
        self.last_error = ""
        # Container id -> when (monotonic) and how a stop asked of the engine was seen.
        self._stop_requested: dict[str, tuple[float, str]] = {}
        # Container id -> the last verdict on its end and when: for a process exit heard late.
        self._verdicts: dict[str, tuple[float, Verdict]] = {}
        self._waiters: dict[str, list[asyncio.Future[Verdict]]] = {}
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
            "stop_poll_s": self.stop_poll,
            "stop_polls": self.stop_polls,
        }

    async def run(self) -> None:
        """Forever: connect, reconcile, follow; on failure back off and start again."""
        periodic = asyncio.create_task(self._periodic_reconcile())
        poll = asyncio.create_task(self._poll_stopping()) if self.stop_poll > 0 else None
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
            if poll is not None:
                poll.cancel()
            for task in list(self._pending_exits):
                task.cancel()
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.cancel()
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

    async def _poll_stopping(self) -> None:
        """Sample the running owners' state: Podman shows a stop in progress only there."""
        while True:
            await asyncio.sleep(self.stop_poll)
            if not self.connected:
                continue
            ids = sorted({o.owner.container for o in self.directory.owned_volumes()
                          if not o.dangling and o.owner.container and o.owner.pid})
            if ids:
                await self._sample_states(ids)

    async def _sample_states(self, ids: list[str]) -> None:
        try:
            states = await self.client.container_states(ids)
        except EngineError as exc:
            log.debug("engine: sampling the owners' state failed: %s", exc)
            return
        self.stop_polls += 1
        for container, status in states.items():
            if status == STOPPING_STATUS:
                self._note_stop(container, "the engine reported it stopping")

    def _note_stop(self, container: str, how: str) -> None:
        now = time.monotonic()
        # Forget old requests of containers that were neither removed nor started again.
        for stale in [c for c, (at, _) in self._stop_requested.items() if now - at > STOP_GRACE_S]:
            del self._stop_requested[stale]
        if container not in self._stop_requested and self._owners(container):
            log.info("engine: owner %s is being stopped (%s)", container[:12], how)
        self._stop_requested[container] = (now, how)

    def _stop_seen(self, container: str) -> str:
        """How a stop asked of the engine for this container was seen lately ("" if not)."""
        seen = self._stop_requested.get(container)
        if seen is None or time.monotonic() - seen[0] >= STOP_GRACE_S:
            return ""
        return seen[1]

    def _owners(self, container: str) -> list[OwnedVolume]:
        return [o for o in self.directory.owned_volumes() if o.owner.matches(container) and not o.dangling]

    async def on_event(self, event: ContainerEvent) -> None:
        self.events_seen += 1
        self._last_event_ns = max(self._last_event_ns, event.time_ns)
        if event.stop_requested:
            signal = event.attributes.get("signal")
            self._note_stop(event.id, f"a {event.action} event" + (f", signal {signal}" if signal else ""))
        owned = [o for o in self.directory.owned_volumes() if o.owner.matches(event.id)]
        if event.started:
            self._stop_requested.pop(event.id, None)
            self._verdicts.pop(event.id, None)
            await self._on_start(event, owned)
            return
        detail: dict[str, Any] = {"container": event.id, "name": event.name, "action": event.action}
        if event.deleted:
            self._stop_requested.pop(event.id, None)
            if owned or event.id in self._waiters:
                await self._decide(event.id, classify(Evidence(removed=True)), "engine", detail)
        elif event.oom:
            if owned or event.id in self._waiters:
                await self._decide(event.id, classify(Evidence(oom=True)), "engine", detail)
        elif event.exited and (any(not o.dangling for o in owned) or event.id in self._waiters):
            task = asyncio.create_task(self._settle_exit(event, detail))
            self._pending_exits.add(task)
            task.add_done_callback(self._pending_exits.discard)

    async def _settle_exit(self, event: ContainerEvent, detail: dict[str, Any]) -> None:
        """An exit is not decided from the event alone: what the engine sends next (Podman's
        `remove` after `rm -f`, Docker's `stop`) and what it says now decide it."""
        began = time.monotonic()
        if event.exit_code != 0:
            await asyncio.sleep(EXIT_SETTLE_S)
        decided = self._verdicts.get(event.id)
        if decided is not None and decided[0] >= began and decided[1].kind is ExitKind.DELETED:
            return  # removed meanwhile: flipped as deleted already
        evidence, info = await self._ask_engine(event.id, exit_code=event.exit_code)
        if evidence is None:  # the engine cannot be asked: what the event and the stream said
            evidence = Evidence(exit_code=event.exit_code, stop=self._stop_seen(event.id))
        await self._decide(event.id, classify(evidence), "engine",
                           {**detail, "exit_code": event.exit_code}, info)

    async def _ask_engine(
        self, container: str, *, exit_code: int | None, signal: int = 0
    ) -> tuple[Evidence | None, ContainerInfo | None]:
        """The evidence on a container's end, with what the engine says of it now; None if
        the engine cannot be reached. A container it no longer knows was removed (`rm -f`:
        inspect answers 404 from the moment `remove` is sent, and `remove` follows `died`)."""
        try:
            info = await self.client.inspect(container)
        except EngineError as exc:
            log.warning("engine: cannot look at %s after its exit: %s", container[:12], exc)
            return None, None
        if info is None:
            return Evidence(exit_code=exit_code, signal=signal, removed=True), None
        if info.status == STOPPING_STATUS:
            self._note_stop(container, "the engine reported it stopping")
        if exit_code is None and not signal and info.status in ("exited", "stopped"):
            exit_code = info.exit_code
        return Evidence(exit_code=exit_code, signal=signal, oom=info.oom_killed,
                        stop=self._stop_seen(container)), info

    async def _decide(self, container: str, verdict: Verdict, source: str, detail: dict[str, Any],
                      info: ContainerInfo | None = None) -> None:
        """Act on a verdict for every volume the container owns (the one flip function for a
        crash or a deletion), and hand it to whoever waits for it (a process exit)."""
        now = time.monotonic()
        for stale in [c for c, (at, _) in self._verdicts.items() if now - at > STOP_GRACE_S]:
            del self._verdicts[stale]
        self._verdicts[container] = (now, verdict)
        detail = {**detail, "classification": verdict.text}
        for entry in self._owners(container):
            who = detail.get("name") or container[:12]
            if verdict.kind is ExitKind.DELETED:
                await self.directory.flip(entry.volume, REASON_DELETED, source, detail)
            elif verdict.kind is ExitKind.CRASHED:
                await self.directory.flip(entry.volume, REASON_CRASHED, source, detail)
            elif verdict.kind is ExitKind.STOPPED:
                log.info("owner %s of %s %s: not a crash, the volume stays attached",
                         who, entry.volume, verdict.text)
                self.directory.alert(
                    "owner-stopped", entry.volume,
                    f"the owner of {entry.volume} was {verdict.text}: not a crash, the volume stays attached",
                    severity="info", source=source, **detail)
            else:
                log.info("owner %s of %s %s; the volume stays attached", who, entry.volume, verdict.text)
            if not verdict.flips and info is not None:
                # Its init pid is gone: stop watching it (a later check would take the dead
                # pid for an exit that was not seen).
                await self._refresh_binding(entry, info)
        for waiter in self._waiters.pop(container, []):
            if not waiter.done():
                waiter.set_result(verdict)

    async def owner_exited(self, container: str, process_exit: ProcessExit, grace: float) -> bool:
        """The kernel saw the owner's init exit, before the engine says anything: let the
        engine decide. Waits up to grace for the engine's own verdict; then asks the engine
        and decides from its answer (source proc-events). False if the engine cannot be asked:
        the process exit decides alone."""
        recent = self._verdicts.get(container)
        if recent is not None and time.monotonic() - recent[0] < STOP_GRACE_S:
            log.info("engine: owner %s already judged %s", container[:12], recent[1].text)
            return True
        waiter: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(container, []).append(waiter)
        # A stop in progress may still show (Podman keeps "stopping" until it syncs the exit).
        await self._sample_states([container])
        try:
            verdict = await asyncio.wait_for(asyncio.shield(waiter), grace)
        except TimeoutError:
            pass
        else:
            log.info("engine: owner %s's exit (%s) judged by the engine: %s",
                     container[:12], process_exit.describe(), verdict.text)
            return True
        finally:
            waiters = self._waiters.get(container, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[container]
        exit_code = None if process_exit.signal else process_exit.exit_code
        evidence, info = await self._ask_engine(container, exit_code=exit_code, signal=process_exit.signal)
        if evidence is None:
            return False
        log.info("engine: no verdict on owner %s within %.1f s of its exit; the engine says %s",
                 container[:12], grace, info.status if info else "it is gone")
        await self._decide(container, classify(evidence), "proc-events",
                           {"container": container, "pid": process_exit.pid, "exit": process_exit.describe()},
                           info)
        return True

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


class ExitArbiter(Protocol):
    """Who decides what an owner's process exit was, when an engine is followed
    (EngineWatcher.owner_exited): True once decided, False if the engine cannot be asked."""

    def owner_exited(self, container: str, process_exit: ProcessExit, grace: float) -> Awaitable[bool]: ...


class ProcessWatcher:
    """Watches the owners' init pids through kernel process events."""

    def __init__(self, directory: VolumeDirectory, *, arbiter: ExitArbiter | None = None,
                 grace: float = ENGINE_GRACE_S) -> None:
        self.directory = directory
        self.arbiter = arbiter
        self.grace = grace
        self.exits_seen = 0
        self._socket: ProcessExitSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self) -> dict[str, Any]:
        return {"enabled": self._socket is not None, "watched": self.watched(),
                "owner_exits_seen": self.exits_seen,
                "engine_grace_s": self.grace if self.arbiter is not None else None}

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
                self._spawn(self._on_owner_exit(volumes, process_exit))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_owner_exit(self, volumes: list[str], process_exit: ProcessExit) -> None:
        if process_exit.clean:
            log.info("process events: the owner of %s (pid %d) exited cleanly; the volume stays attached",
                     ", ".join(volumes), process_exit.pid)
            return
        owners = {o.owner.container for o in self.directory.owned_volumes() if o.volume in volumes}
        container = next(iter(owners)) if len(owners) == 1 else ""
        if self.arbiter is not None and container:
            log.info("process events: the owner of %s (pid %d) %s; asking the engine what it was",
                     ", ".join(volumes), process_exit.pid, process_exit.describe())
            if await self.arbiter.owner_exited(container, process_exit, self.grace):
                return
        verdict = classify(Evidence(
            exit_code=None if process_exit.signal else process_exit.exit_code, signal=process_exit.signal))
        for volume in volumes:
            await self.directory.flip(
                volume, REASON_CRASHED, "proc-events",
                {"pid": process_exit.pid, "exit": process_exit.describe(),
                 "exit_code": process_exit.exit_code, "signal": process_exit.signal,
                 "classification": verdict.text},
            )

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._socket is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
