"""Container engine events and inspections as plain data, with the field names of Docker
and of Podman's Docker-compatible API folded together. No HTTP here (engine_api.py talks
to the engine), so the rules that act on events load without an HTTP client.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger("vhost_pv.engine")


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
    oom_killed: bool = False  # State.OOMKilled: the kernel's OOM killer ended it

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
            oom_killed=state.get("OOMKilled") is True,
        )


# What an engine's event action means for the container's volumes. Docker says `die` and
# `destroy`; Podman's Docker-compatible stream says `died` and `remove` for the same things.
DELETED_ACTIONS = frozenset({"destroy", "remove"})
EXITED_ACTIONS = frozenset({"die", "died"})
OOM_ACTIONS = frozenset({"oom"})
STOP_ACTIONS = frozenset({"kill", "stop"})
START_ACTIONS = frozenset({"start", "restart"})
# Podman's state while `podman stop` waits for the container to end (Docker has none): the
# only sign of a stop that Podman 4.3 reported in no event.
STOPPING_STATUS = "stopping"
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
