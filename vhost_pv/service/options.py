"""How one volume is served: its queue count, read-only, O_DIRECT.

The daemon-wide `serve --queues/--read-only/--direct` are the defaults for the volumes named
on the command line; a volume added at runtime (`vhost-pv add`) carries its own. The served
set (served_set.py) stores them with each volume, so a restart serves each one as before."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vhost_pv.config import DaemonConfig

MAX_QUEUES = 16
"""csrc/vhost_pv.h VPV_MAX_QUEUES; a unit test keeps the two equal (this module stays free of
the C module so the state file can be read without it)."""


@dataclasses.dataclass(frozen=True)
class VolumeOptions:
    queues: int = 1
    """Virtqueues offered to the frontend."""
    read_only: bool = False
    """Served read-only whatever the header says (a read-only header is read-only anyway)."""
    direct: bool = False
    """Data reads and writes bypass the host page cache (O_DIRECT)."""

    @classmethod
    def defaults(cls, config: DaemonConfig) -> VolumeOptions:
        """The daemon-wide options, for volumes named on the serve command line."""
        return cls(queues=config.queues, read_only=config.read_only, direct=config.direct)

    def validate(self) -> None:
        """ValueError naming what is out of range."""
        if isinstance(self.queues, bool) or not isinstance(self.queues, int) \
                or not 1 <= self.queues <= MAX_QUEUES:
            raise ValueError(f"queues {self.queues!r} is out of range 1..{MAX_QUEUES}")
        for field in ("read_only", "direct"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} {getattr(self, field)!r} is not true or false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> VolumeOptions:
        """Options from their JSON form (ValueError for anything else: a missing or unknown
        key, a wrong type, a value out of range)."""
        if not isinstance(data, dict):
            raise ValueError(f"options must be an object, not {type(data).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"options must have exactly the keys {sorted(names)}, not {sorted(data)}")
        options = cls(**data)
        options.validate()
        return options

    def describe(self) -> str:
        """Short text for logs and `ls`: "2 queues, read-only, O_DIRECT"."""
        parts = [f"{self.queues} queue{'' if self.queues == 1 else 's'}"]
        if self.read_only:
            parts.append("read-only")
        if self.direct:
            parts.append("O_DIRECT")
        return ", ".join(parts)
