"""The daemon's error root: every domain failure is a VhostPvError carrying an errno.

Domain code (the volume service, the watchers' directory) raises these and never a
transport's error type; each transport translates them in one place (the control server
answers -errno with the message). Subclasses name the cases callers tell apart, so a
watcher catches VolumeNotFound as the same type the control socket turns into -ENOENT."""

from __future__ import annotations

import errno


class VhostPvError(Exception):
    """A request the daemon could not carry out; `errno` says what kind of failure it is."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class VolumeNotFound(VhostPvError):
    """No volume by that name is served here."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


class VolumeBusy(VhostPvError):
    """The volume's state forbids the request now (dangling, attached, not dangling...)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


class NotDangling(VhostPvError):
    """A request that needs a dangling volume (reclaim) on one that is attached."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class OwnerUnknown(VhostPvError):
    """The container engine knows no such container."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


class OwnerNotRunning(VhostPvError):
    """The owner's init pid named by the admin is not a running process."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ESRCH, message)


class EngineUnreachable(VhostPvError):
    """The container engine could not be asked."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EHOSTUNREACH, message)


class RingDamaged(VhostPvError):
    """The quarantine ring cannot be replayed: its records or their chain are damaged."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBADMSG, message)


class InvalidRequest(VhostPvError):
    """The request itself is wrong (a missing or out-of-range argument)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class VolumeExists(VhostPvError):
    """The volume (or another of the same name, whose socket would clash) is served already."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EEXIST, message)
