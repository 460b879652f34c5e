"""The container guard in process: EngineWatcher's decisions on engine events and
reconciliation, with a fake engine client and a fake volume directory that records what the
watcher asks of it. No daemon, no engine, no HTTP (tests/engines has those end to end)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import pytest

from vhost_pv.guard import containers
from vhost_pv.guard.containers import (
    REASON_CRASHED,
    REASON_DELETED,
    RECLAIM_LABEL,
    RECLAIM_MODE_LABEL,
    EngineWatcher,
    OwnedVolume,
    OwnerBinding,
    ReclaimPolicy,
)
from vhost_pv.guard.engine_api import EngineClient
from vhost_pv.guard.engine_events import ContainerEvent, ContainerInfo, EngineError
from vhost_pv.guard.processes import ProcessExit
from vhost_pv.guard.verdicts import Evidence, ExitKind, classify

T = TypeVar("T")
OWNER = "c0ffee" * 10 + "abcd"
OTHER = "beef" * 16
IMAGE = "sha256:" + "1" * 64


@dataclasses.dataclass
class FakeEngine:
    """The one EngineClient call the decisions make: inspect (None: the engine does not know it)."""

    known: dict[str, ContainerInfo] = dataclasses.field(default_factory=dict)
    url: str = "unix:///fake.sock"
    inspected: list[str] = dataclasses.field(default_factory=list)
    down: bool = False  # every call fails, as with an engine that is not there

    async def inspect(self, container: str) -> ContainerInfo | None:
        if self.down:
            raise EngineError("down")
        self.inspected.append(container)
        return self.known.get(container)

    async def container_states(self, ids: list[str]) -> dict[str, str]:
        if self.down:
            raise EngineError("down")
        return {i: self.known[i].status for i in ids if i in self.known}


@dataclasses.dataclass
class FakeDirectory:
    """A VolumeDirectory that records: the watcher's decisions are what is asserted."""

    volumes: list[OwnedVolume]
    flips: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    rebinds: list[tuple[str, OwnerBinding]] = dataclasses.field(default_factory=list)
    reclaims: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    alerts: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    alert_details: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def owned_volumes(self) -> list[OwnedVolume]:
        return list(self.volumes)

    async def flip(self, volume: str, reason: str, source: str, detail: dict[str, Any]) -> None:
        self.flips.append((volume, reason, source))

    async def rebind(self, volume: str, owner: OwnerBinding) -> None:
        self.rebinds.append((volume, owner))

    async def reclaim_for(self, volume: str, owner: OwnerBinding, mode: str, source: str) -> None:
        self.reclaims.append((volume, owner.container, mode))

    def alert(self, kind: str, volume: str, message: str, **details: Any) -> None:
        self.alerts.append((kind, volume))
        self.alert_details.append(details)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def event(action: str, container: str = OWNER, exit_code: int | None = None,
          attributes: dict[str, str] | None = None, **more: str) -> ContainerEvent:
    return ContainerEvent(action, container, "web-1", exit_code, 1, {**(attributes or {}), **more})


def info(container: str, *, image: str = IMAGE, labels: dict[str, str] | None = None,
         status: str = "exited", exit_code: int = 0, oom: bool = False) -> ContainerInfo:
    # A running container's pid is looked up in /proc: ours is one that surely exists.
    pid = os.getpid() if status in ("running", "stopping") else 0
    return ContainerInfo(container, "web-2", image, pid, status, exit_code, labels or {}, oom)


def watcher(directory: FakeDirectory, engine: FakeEngine,
            policy: ReclaimPolicy = ReclaimPolicy.SAME_IMAGE) -> EngineWatcher:
    return EngineWatcher(cast(EngineClient, engine), directory, reclaim_policy=policy)


def owned(volume: str = "vol0", *, dangling: bool = False, image: str = IMAGE) -> OwnedVolume:
    return OwnedVolume(volume, dangling, OwnerBinding(OWNER, "web-1", image))


@pytest.fixture(autouse=True)
def no_exit_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # The watcher waits a second after an exit for a removal or stop to explain it; the
    # decision, not the wait, is under test here.
    monkeypatch.setattr(containers, "EXIT_SETTLE_S", 0.0)


async def settle(w: EngineWatcher) -> None:
    """Let the exit tasks the watcher spawned finish."""
    while w._pending_exits:
        await asyncio.gather(*w._pending_exits)


# -- events --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "exit_code", "reason"), [
    ("destroy", None, REASON_DELETED),
    ("remove", None, REASON_DELETED),
    ("oom", None, REASON_CRASHED),
    ("die", 137, REASON_CRASHED),
    ("died", 1, REASON_CRASHED),
])
def test_the_owners_end_flips_only_its_volume(action: str, exit_code: int | None, reason: str) -> None:
    directory = FakeDirectory([owned("vol0"), OwnedVolume("vol1", False, OwnerBinding(OTHER))])
    engine = FakeEngine({OWNER: info(OWNER)})  # still known: an exit is a crash, not a removal

    async def go() -> None:
        w = watcher(directory, engine)
        await w.on_event(event(action, exit_code=exit_code))
        await settle(w)

    run(go())
    assert directory.flips == [("vol0", reason, "engine")]


def test_a_clean_exit_and_other_containers_flip_nothing() -> None:
    directory = FakeDirectory([owned("vol0")])

    async def go() -> None:
        w = watcher(directory, FakeEngine({OWNER: info(OWNER)}))
        await w.on_event(event("die", exit_code=0))
        await w.on_event(event("destroy", container=OTHER))
        await w.on_event(event("destroy", container=OWNER[:12]))  # a prefix is not the owner
        await settle(w)

    run(go())
    assert directory.flips == []


def test_a_dangling_volume_is_not_flipped_again() -> None:
    directory = FakeDirectory([owned("vol0", dangling=True)])
    run(watcher(directory, FakeEngine()).on_event(event("destroy")))
    assert directory.flips == []


@pytest.mark.parametrize(("signal", "flips"), [("SIGTERM", 0), ("15", 0), ("SIGHUP", 1)])
def test_an_exit_after_a_stop_request_is_not_a_crash(signal: str, flips: int) -> None:
    """`docker stop`/`kill` is the administrator's doing; `kill -s HUP` (a reload) is not a stop,
    so a failing exit after it is still a crash."""
    directory = FakeDirectory([owned("vol0")])

    async def go() -> None:
        w = watcher(directory, FakeEngine({OWNER: info(OWNER)}))
        await w.on_event(event("kill", signal=signal))
        await w.on_event(event("die", exit_code=143))
        await settle(w)

    run(go())
    assert len(directory.flips) == flips


def test_an_exit_whose_container_is_gone_is_a_deletion() -> None:
    # `rm -f` of a running owner: the engine reports the exit before the removal.
    directory = FakeDirectory([owned("vol0")])

    async def go() -> None:
        w = watcher(directory, FakeEngine())
        await w.on_event(event("die", exit_code=137))
        await settle(w)

    run(go())
    assert directory.flips == [("vol0", REASON_DELETED, "engine")]


# -- reclaim by label ----------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "image", "mode", "reclaimed"), [
    (ReclaimPolicy.SAME_IMAGE, IMAGE, "replay", True),
    (ReclaimPolicy.SAME_IMAGE, "sha256:" + "2" * 64, "keep", False),
    (ReclaimPolicy.LABEL, "sha256:" + "2" * 64, "discard", True),
    (ReclaimPolicy.NONE, IMAGE, "keep", False),
    (ReclaimPolicy.LABEL, IMAGE, "rm -rf", False),  # not a reclaim mode
])
def test_a_labelled_start_reclaims_only_as_the_policy_allows(
    policy: ReclaimPolicy, image: str, mode: str, reclaimed: bool
) -> None:
    directory = FakeDirectory([owned("vol0", dangling=True)])
    labels = {RECLAIM_LABEL: "vol0", RECLAIM_MODE_LABEL: mode}
    engine = FakeEngine({OTHER: info(OTHER, image=image, labels=labels)})
    # The engine puts the container's labels in the event's attributes (Docker and Podman).
    run(watcher(directory, engine, policy).on_event(event("start", container=OTHER, attributes=labels)))
    if reclaimed:
        assert directory.reclaims == [("vol0", OTHER, mode)] and directory.alerts == []
    else:
        assert directory.reclaims == [] and directory.alerts == [("reclaim-refused", "vol0")]


def test_a_label_naming_an_attached_or_unknown_volume_does_nothing() -> None:
    directory = FakeDirectory([owned("vol0", dangling=False)])
    engine = FakeEngine({OTHER: info(OTHER, labels={RECLAIM_LABEL: "vol0"}),
                         OWNER: info(OWNER, labels={RECLAIM_LABEL: "nope"})})

    async def go() -> None:
        w = watcher(directory, engine, ReclaimPolicy.LABEL)
        await w.on_event(event("start", container=OTHER, attributes={RECLAIM_LABEL: "vol0"}))
        await w.on_event(event("start", container=OWNER, attributes={RECLAIM_LABEL: "nope"}))

    run(go())
    assert directory.reclaims == [] and directory.alerts == [] and directory.flips == []


# -- reconciliation --------------------------------------------------------------------------------


def test_reconcile_flips_volumes_whose_owner_is_gone_and_rebinds_the_others() -> None:
    gone = OwnedVolume("gone", False, OwnerBinding("deadbeef"))
    moved = OwnedVolume("moved", False, OwnerBinding("web-1"))  # a name, as the admin gave it
    unbound = OwnedVolume("unbound", False, OwnerBinding(""))
    dangling = OwnedVolume("dangling", True, OwnerBinding("deadbeef"))
    directory = FakeDirectory([gone, moved, unbound, dangling])
    engine = FakeEngine({"web-1": info(OWNER, status="running")})
    w = watcher(directory, engine)
    run(w.reconcile("test"))
    assert directory.flips == [("gone", REASON_DELETED, "engine-reconcile")]
    ((volume, binding),) = directory.rebinds
    assert volume == "moved" and binding.container == OWNER and binding.pid == os.getpid()
    assert sorted(engine.inspected) == ["deadbeef", "web-1"]  # neither unbound nor dangling
    assert w.reconciles == 1


# -- what an end was (verdicts.classify and the evidence the watcher gathers) ------------------


@pytest.mark.parametrize(("evidence", "kind", "text"), [
    (Evidence(exit_code=137, removed=True, stop="a kill event"), ExitKind.DELETED, "deleted"),
    (Evidence(exit_code=137, oom=True), ExitKind.CRASHED, "crashed (out of memory)"),
    (Evidence(exit_code=137, stop="a stop event"), ExitKind.STOPPED, "stopped by the engine (a stop event)"),
    (Evidence(exit_code=137), ExitKind.CRASHED, "crashed (exit 137, killed by SIGKILL)"),
    (Evidence(signal=9), ExitKind.CRASHED, "crashed (killed by SIGKILL)"),
    (Evidence(exit_code=3), ExitKind.CRASHED, "crashed (exit 3)"),
    (Evidence(exit_code=0), ExitKind.CLEAN, "exited cleanly"),
    (Evidence(), ExitKind.CRASHED, "crashed (exit code unknown)"),
])
def test_the_rule(evidence: Evidence, kind: ExitKind, text: str) -> None:
    verdict = classify(evidence)
    assert (verdict.kind, verdict.text) == (kind, text)


def test_an_exit_of_a_container_seen_stopping_is_a_stop() -> None:
    """Podman 4.3: `podman stop -t 1` ends in `died 137` and no stop event; only the state
    sampled during the stop says it was one."""
    directory = FakeDirectory([OwnedVolume("vol0", False, OwnerBinding(OWNER, "web-1", IMAGE, os.getpid()))])
    engine = FakeEngine({OWNER: info(OWNER, status="stopping")})

    async def go() -> None:
        w = watcher(directory, engine)
        await w._sample_states([OWNER])
        engine.known[OWNER] = info(OWNER, status="exited", exit_code=137)
        await w.on_event(event("died", exit_code=137))
        await settle(w)

    run(go())
    assert directory.flips == [] and directory.alerts == [("owner-stopped", "vol0")]
    (details,) = directory.alert_details
    assert details["classification"] == "stopped by the engine (the engine reported it stopping)"
    ((volume, binding),) = directory.rebinds  # the dead init pid is no longer watched
    assert volume == "vol0" and binding.pid == 0


def test_an_oom_killed_exit_is_a_crash_even_after_a_stop() -> None:
    directory = FakeDirectory([owned("vol0")])

    async def go() -> None:
        w = watcher(directory, FakeEngine({OWNER: info(OWNER, exit_code=137, oom=True)}))
        await w.on_event(event("kill", signal="15"))
        await w.on_event(event("die", exit_code=137))
        await settle(w)

    run(go())
    assert directory.flips == [("vol0", REASON_CRASHED, "engine")]


def test_a_process_exit_waits_for_the_engines_verdict() -> None:
    """--proc-events: the kernel's exit comes first; the engine's `remove` decides."""
    directory = FakeDirectory([owned("vol0")])

    async def go() -> bool:
        w = watcher(directory, FakeEngine({OWNER: info(OWNER, status="running")}))
        waiting = asyncio.create_task(w.owner_exited(OWNER, ProcessExit(42, 9), grace=5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done() and directory.flips == []
        await w.on_event(event("remove"))
        return await asyncio.wait_for(waiting, 1.0)

    assert run(go()) is True
    assert directory.flips == [("vol0", REASON_DELETED, "engine")]


def test_a_process_exit_the_engine_is_silent_about_asks_the_engine() -> None:
    directory = FakeDirectory([owned("vol0")])
    engine = FakeEngine({OWNER: info(OWNER, exit_code=137)})
    assert run(watcher(directory, engine).owner_exited(OWNER, ProcessExit(42, 9), grace=0.01)) is True
    assert directory.flips == [("vol0", REASON_CRASHED, "proc-events")]
    assert engine.inspected == [OWNER]


def test_a_process_exit_decides_alone_when_the_engine_cannot_be_asked() -> None:
    directory = FakeDirectory([owned("vol0")])
    w = watcher(directory, FakeEngine(down=True))
    assert run(w.owner_exited(OWNER, ProcessExit(42, 9), grace=0.01)) is False
    assert directory.flips == []  # the ProcessWatcher flips it itself, as without an engine
