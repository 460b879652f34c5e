"""The service manager's two protocols, spoken by the daemon: sd_notify (READY, STATUS,
STOPPING, WATCHDOG, FDSTORE) and socket passing (LISTEN_FDS / LISTEN_FDNAMES), as
sd_notify(3) and sd_listen_fds(3) define them.

Both work without systemd: the variables are simply absent and every call is a no-op. Any
supervisor that sets them the same way (the tests do, with a listener on NOTIFY_SOCKET)
gets the same behaviour. Written here rather than taken from python-systemd: that binding
needs libsystemd at build time and covers neither protocol's details better than these lines.
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import os
import socket
from collections.abc import Sequence

# sd_listen_fds(3): passed fds start here.
SD_LISTEN_FDS_START = 3


def _notify_address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    # An address starting with "@" is in the abstract namespace.
    return "\0" + path[1:] if path.startswith("@") else path


def notify_enabled() -> bool:
    """Whether a service manager listens for our state (NOTIFY_SOCKET is set)."""
    return _notify_address() is not None


def notify(fields: dict[str, str], fds: Sequence[int] = ()) -> bool:
    """Send one notification, e.g. {"READY": "1", "STATUS": "serving 3 volumes"}; fds go with
    it (FDSTORE=1). False if nobody listens; an OSError is the manager refusing it."""
    address = _notify_address()
    if address is None:
        return False
    for key, value in fields.items():
        if "\n" in value or "=" in key or "\n" in key:
            raise ValueError(f"notification field {key!r} must be one line")
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sock.sendmsg([message], ancillary, 0, address)
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings the manager expects (half its WATCHDOG_USEC, as
    sd_watchdog_enabled(3) advises), or None when no watchdog is armed for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


@dataclasses.dataclass(frozen=True)
class PassedFd:
    fd: int
    name: str
    """LISTEN_FDNAMES entry: FileDescriptorName= of a socket unit, FDNAME= of the fd store,
    "unknown" when the manager gave none."""


def listen_fds(unset_environment: bool = True) -> list[PassedFd]:
    """The fds the manager passed to this process (socket activation or the fd store),
    close-on-exec from now on. Empty unless LISTEN_PID names this process."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if os.environ.get("LISTEN_FDNAMES") else []
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    passed = []
    for index in range(max(count, 0)):
        fd = SD_LISTEN_FDS_START + index
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # announced but not open: nothing to take
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        passed.append(PassedFd(fd, names[index] if index < len(names) else "unknown"))
    return passed
