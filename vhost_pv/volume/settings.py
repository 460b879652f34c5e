"""Changing the settings of an existing volume: time limit, policies, who may attach, owner.

One description of a change (SettingsChange: None means "leave unchanged"), checked against
the same ranges `vhost-pv create` accepts, turned into header fields by plan(), and written
by Volume.update, the crash-safe two-copy header write (header.py): a crash leaves the old
settings or the new ones, never a mix. Both ways in use it: the daemon
(VolumeService.update_settings, which also tells the guard and the data path) and
apply_offline on a file no daemon serves.

Where each setting takes effect:
- read policy, ring-full policy: Volume.update publishes them to the C data path
  (vpv_volume_set_policy, under the flip lock every request holds): the next request
  follows them;
- TTL and TTL action: the guard re-arms its deadline (VolumeGuard.ttl_changed);
- allowed uids/gids: read from the header at every attach; an attached frontend stays;
- owner: the watchers read the owner from the header at every event.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vhost_pv.sockfile import lock_volume
from vhost_pv.volume.header import (
    MAX_ALLOWED_IDS,
    OWNER_IMAGE_LEN,
    OWNER_NAME_LEN,
    ReadPolicy,
    RingFullPolicy,
    TtlAction,
    VolumeHeader,
)
from vhost_pv.volume.volume import Volume

MAX_ID = (1 << 31) - 1
"""The largest uid/gid (`vhost-pv create --allow-uids` accepts the same: cli/argtypes.MAX_ID)."""
MAX_TTL = ((1 << 63) - 1) // 1_000_000_000
"""TTL seconds that still fit a signed 64-bit nanosecond count (cli/argtypes.MAX_TTL)."""
OWNER_LEN = 128
"""Bytes of UTF-8 the header keeps of the owner (char owner[128])."""

OWNER_FIELDS = ("owner", "owner_name", "owner_image", "owner_pid", "owner_pid_start")
NO_OWNER: Mapping[str, Any] = {"owner": "", "owner_name": "", "owner_image": "", "owner_pid": 0,
                                "owner_pid_start": 0}
"""The owner fields of a volume nobody owns (what clearing the owner writes)."""

SETTINGS_FIELDS = ("ttl_seconds", "ttl_action", "read_policy", "ring_full_policy", "allowed_uids",
                   "allowed_gids", *OWNER_FIELDS)
"""The header fields a settings change may touch, in the order they are shown."""


class SettingsError(ValueError):
    """The change is invalid in itself (a value out of range)."""


class SettingsRefused(Exception):
    """The change is valid but the volume's state forbids it now (an owner while dangling)."""


@dataclasses.dataclass(frozen=True)
class SettingsChange:
    """What to change; None leaves a setting as it is."""

    ttl_seconds: int | None = None
    ttl_action: TtlAction | None = None
    read_policy: ReadPolicy | None = None
    ring_full_policy: RingFullPolicy | None = None
    allowed_uids: tuple[int, ...] | None = None
    allowed_gids: tuple[int, ...] | None = None
    owner: Mapping[str, Any] | None = None
    """The header's owner fields (OWNER_FIELDS) to record, NO_OWNER to clear the owner."""

    def __post_init__(self) -> None:
        validate(self)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    @property
    def touches_owner(self) -> bool:
        return self.owner is not None


def owner_change(container: str, *, name: str = "", image: str = "", pid: int = 0,
                 pid_start: int = 0) -> Mapping[str, Any]:
    """The owner fields for SettingsChange.owner."""
    return {"owner": container, "owner_name": name, "owner_image": image, "owner_pid": pid,
            "owner_pid_start": pid_start}


def _check_ids(ids: tuple[int, ...], what: str) -> None:
    if len(ids) > MAX_ALLOWED_IDS:
        raise SettingsError(f"at most {MAX_ALLOWED_IDS} {what} fit in the header, got {len(ids)}")
    for one in ids:
        if not 0 <= one <= MAX_ID:
            raise SettingsError(f"{what[:-1]} {one} is out of range 0..{MAX_ID}")


def validate(change: SettingsChange) -> None:
    """The ranges `vhost-pv create` accepts; SettingsError names the first value outside."""
    if change.ttl_seconds is not None and not 0 <= change.ttl_seconds <= MAX_TTL:
        raise SettingsError(f"ttl {change.ttl_seconds} is out of range 0..{MAX_TTL} seconds")
    for field, kind in (("ttl_action", TtlAction), ("read_policy", ReadPolicy),
                        ("ring_full_policy", RingFullPolicy)):
        value = getattr(change, field)
        if value is not None and not isinstance(value, kind):
            raise SettingsError(f"{field} must be one of {', '.join(m.name.lower() for m in kind)}")
    if change.allowed_uids is not None:
        _check_ids(change.allowed_uids, "uids")
    if change.allowed_gids is not None:
        _check_ids(change.allowed_gids, "gids")
    if change.owner is not None:
        if set(change.owner) != set(OWNER_FIELDS):
            raise SettingsError(f"an owner change sets exactly {', '.join(OWNER_FIELDS)}")
        for field, limit in (("owner", OWNER_LEN), ("owner_name", OWNER_NAME_LEN),
                             ("owner_image", OWNER_IMAGE_LEN)):
            if len(str(change.owner[field]).encode()) > limit:
                raise SettingsError(f"{field} is longer than {limit} bytes")
        if not 0 <= int(change.owner["owner_pid"]) <= MAX_ID:
            raise SettingsError(f"owner pid {change.owner['owner_pid']} is out of range")


def plan(header: VolumeHeader, change: SettingsChange) -> dict[str, Any]:
    """The header fields to write for `change` on a volume whose header is `header` (only
    those that differ). SettingsRefused if the volume's state forbids it."""
    wanted: dict[str, Any] = {}
    for field in ("ttl_seconds", "ttl_action", "read_policy", "ring_full_policy", "allowed_uids",
                  "allowed_gids"):
        value = getattr(change, field)
        if value is not None:
            wanted[field] = value
    if change.owner is not None:
        if header.dangling:
            # The dangling volume's owner is the one that went away (the same-image reclaim
            # policy compares against it); a new owner takes it through a reclaim.
            raise SettingsRefused("the volume is dangling: a new owner reclaims it (vhost-pv reclaim) "
                                  "rather than being set; its owner stays the one that went away")
        wanted.update(change.owner)
    return {field: value for field, value in wanted.items() if getattr(header, field) != value}


def view(header: VolumeHeader) -> dict[str, Any]:
    """The settings of a header, JSON-friendly (enums by their command-line names)."""
    result: dict[str, Any] = {}
    for field in SETTINGS_FIELDS:
        value = getattr(header, field)
        if isinstance(value, TtlAction | ReadPolicy | RingFullPolicy):
            value = value.name.lower()
        elif isinstance(value, tuple):
            value = list(value)
        result[field] = value
    return result


@dataclasses.dataclass(frozen=True)
class SettingsResult:
    """What a settings change did: old → new of every field it changed, the settings now."""

    volume: str
    generation: int
    changed: dict[str, tuple[Any, Any]]
    settings: dict[str, Any]
    dangling: bool
    frontend_attached: bool = False
    ttl_deadline_ns: int | None = None
    """The guard's deadline after the change (the daemon only; None: no time limit running)."""

    @classmethod
    def between(cls, volume: str, old: VolumeHeader, new: VolumeHeader, **extra: Any) -> SettingsResult:
        before, after = view(old), view(new)
        changed = {f: (before[f], after[f]) for f in SETTINGS_FIELDS if before[f] != after[f]}
        return cls(volume=volume, generation=new.generation, changed=changed, settings=after,
                   dangling=new.dangling, **extra)

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "generation": self.generation,
                "changed": {f: {"old": old, "new": new} for f, (old, new) in self.changed.items()},
                "settings": self.settings, "dangling": self.dangling,
                "frontend_attached": self.frontend_attached, "ttl_deadline_ns": self.ttl_deadline_ns}


def apply_offline(path: Path, change: SettingsChange) -> SettingsResult:
    """Change the settings of a volume file no daemon serves (AlreadyServed if one does: it
    holds the file's flock; SettingsRefused if the volume's state forbids the change). The
    header is written by Volume.update, crash-safely."""
    lock_fd = lock_volume(path)
    try:
        with Volume(path) as volume:
            old = volume.header
            changes = plan(old, change)  # SettingsRefused: nothing was written
            new = volume.update(**changes) if changes else old
            return SettingsResult.between(volume.name, old, new)
    finally:
        os.close(lock_fd)
