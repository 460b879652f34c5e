"""What `vhost-pv serve` runs with: DaemonConfig, its defaults and their one validate()."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from vhost_pv._native import lib
from vhost_pv.control.wire import NAME_LEN
from vhost_pv.guard.containers import ENGINE_GRACE_S, STOP_POLL_S, ReclaimPolicy
from vhost_pv.sockfile import AccessList


class ConfigError(ValueError):
    """A DaemonConfig value out of its range; says which field and why.

    The message names fields as DaemonConfig does; describe() lets the CLI name them by its
    options instead (the template refers to other fields as {field_name})."""

    def __init__(self, field: str, template: str, **values: object) -> None:
        self.field = field
        self.template = template
        self.values = values
        super().__init__(self.describe())

    def describe(self, name: Callable[[str], str] = str) -> str:
        names = {f.name: name(f.name) for f in dataclasses.fields(DaemonConfig)}
        return f"{name(self.field)}: " + self.template.format(**names, **self.values)


def _positive_seconds(field: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(field, "{value} is not a positive number of seconds", value=value)


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """What `vhost-pv serve` runs with. The field defaults are the daemon's defaults (the
    CLI takes its own from here), and validate() is the one place their ranges are checked."""

    volumes: list[Path]
    socket_dir: Path
    control_path: Path
    queues: int = 1
    read_only: bool = False
    control_access: AccessList = dataclasses.field(default_factory=AccessList)
    alert_webhook: str | None = None
    engine_url: str | None = None
    """Docker Engine API socket (Docker or `podman system service`): unix:///path."""
    proc_events: bool = False
    """Watch the owners' init pids through kernel process events."""
    reconcile_interval: float = 30.0
    engine_grace: float = ENGINE_GRACE_S
    """How long an owner's process exit waits for the engine's verdict (with an engine)."""
    stop_poll: float = STOP_POLL_S
    """How often the running owners' state is sampled to see a stop in progress (0: never)."""
    reclaim_policy: ReclaimPolicy = ReclaimPolicy.SAME_IMAGE
    direct: bool = False
    """Data reads and writes bypass the host page cache (O_DIRECT, io_uring per queue)."""
    vm: str = "vm0"
    """The VM whose metadata this daemon serves (its volumes are this daemon's volumes)."""
    meta_http: tuple[str, int] | None = None
    """Loopback address of the HTTP metadata server, if any."""
    meta_socket: Path | None = None
    """vhost-user socket of the metadata file system (virtio-fs), if any."""
    meta_policy: Path | None = None
    """TOML policy: which guest uids/gids may read or write which metadata paths."""
    peer_timeout: float = 5.0
    """Seconds a peer may take for its first message, for each message from its first byte,
    and (control, HTTP) to stay idle: a stalled peer never holds a slot or an fd for long."""
    worker_stuck_after: float = 30.0
    """A queue worker inside one request for longer than this is stuck: logged, and the
    service watchdog's ping is withheld (vhost_pv/supervision.py)."""

    def validate(self) -> None:
        """Raise ConfigError for the first value out of range."""
        if not 1 <= self.queues <= lib.VPV_MAX_QUEUES:
            raise ConfigError("queues", "{value} is out of range 1..{limit}",
                              value=self.queues, limit=lib.VPV_MAX_QUEUES)
        _positive_seconds("reconcile_interval", self.reconcile_interval)
        _positive_seconds("engine_grace", self.engine_grace)
        if self.stop_poll != 0:
            _positive_seconds("stop_poll", self.stop_poll)
        _positive_seconds("peer_timeout", self.peer_timeout)
        _positive_seconds("worker_stuck_after", self.worker_stuck_after)
        try:
            vm_bytes = len(self.vm.encode())
        except UnicodeEncodeError:
            raise ConfigError("vm", "the name is not valid UTF-8") from None
        if vm_bytes > NAME_LEN:
            raise ConfigError("vm", "{size} bytes of UTF-8, at most {limit} fit",
                              size=vm_bytes, limit=NAME_LEN)
        if self.engine_url and not self.engine_url.startswith("unix://"):
            raise ConfigError("engine_url", "{value}: expected unix:///path/to/engine.sock",
                              value=self.engine_url)
        if self.meta_policy is not None and self.meta_socket is None:
            raise ConfigError("meta_policy", "applies to the metadata file system: give {meta_socket} too")
