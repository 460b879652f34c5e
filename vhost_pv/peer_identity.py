"""Who is at the other end of a vhost-user socket, as the host sees it, and whether that is
the VM a volume is bound to.

SO_PEERCRED gives the uid, gid and pid of the process that connected. The uid/gid are
checked against the volume's allow-list (FrontendService); this module adds the VM: the
connecting process's cgroup (/proc/PID/cgroup: the systemd unit or libvirt/podman scope it
runs in), the guest name and UUID it was started with (/proc/PID/cmdline: QEMU's
`-name guest=vm7,...` or `-name vm7`, `-uuid ...`) and its executable.

A pid is only a number: the process may exit and the number be given to another process
while we read /proc/PID. So the process is pinned by a pidfd first, and every read of
/proc/PID is confirmed afterwards:

1. the pidfd. SO_PEERPIDFD (Linux 6.5) gives the pidfd of the very process that connected,
   taken by the kernel at connect(): no race at all. Older kernels: pidfd_open(pid) on the
   SO_PEERCRED pid, and the process it pins must have started no later than now (a process
   that started after the connect cannot be the one that connected; /proc/PID/stat field 22
   against CLOCK_BOOTTIME). That leaves a window of one clock tick (10 ms) in which a pid
   would have to be freed and handed out again: far narrower than the bare pid, not nil.
2. the pid number in our pid namespace: from the pidfd's fdinfo ("Pid:"; 0 when the process
   is in a pid namespace we cannot see, -1 once it has exited), else SO_PEERCRED's.
3. the reads: /proc/PID/stat (start time), cgroup, cmdline, exe.
4. the confirmation: the pidfd's process is still there (pidfd_send_signal with signal 0;
   EPERM means it exists but is not ours to signal, which is fine) and its start time is
   unchanged. A pid number stays with its process until the process is reaped, so if the
   pinned process is still there after the reads, /proc/PID was that process during all of
   them. Without this step the pidfd would pin nothing: /proc/PID is looked up by number.

What the identity is worth: the cgroup is set by whoever may write cgroup.procs (root, or
the owner of a delegated subtree); -name and -uuid are what the process says about itself,
so any process of an allowed uid could claim them. Bind to a cgroup for a check that holds
against such a process; bind by name/uuid when each VM's QEMU runs under its own uid (or
together with the cgroup).

The check is a function of the identity only, never of "the first pid seen": a second QEMU
with the same -uuid/-name (a restarted VM, the destination of a live migration) is the same
VM and is admitted like the first (one frontend at a time still holds, FrontendService).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vhost_pv.guard.processes import pid_start_ticks

if TYPE_CHECKING:
    from vhost_pv.sockfile import PeerCredentials
    from vhost_pv.volume.header import VolumeHeader

# <asm-generic/socket.h>: the peer's pidfd, taken at connect() (Linux 6.5). Python 3.11 has
# no name for it.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class IdentityUnavailable(Exception):
    """The connecting process's identity cannot be established (it is in another pid
    namespace, it exited, /proc cannot be read): a volume bound to a VM refuses it."""


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """The connecting process as the host sees it, read through a verified pidfd."""

    pid: int
    uid: int
    gid: int
    start_ticks: int
    """Start time in clock ticks since boot (/proc/PID/stat field 22)."""
    cgroup: str
    """The cgroup path: the unified (v2) hierarchy's, else the name=systemd one ("" unknown)."""
    vm_name: str
    """The -name guest name ("" without -name)."""
    vm_uuid: uuid.UUID | None
    """The -uuid (None without one, or with the nil UUID QEMU then reports)."""
    exe: str
    """/proc/PID/exe ("" when not readable: it needs ptrace access)."""
    pinned_by: str
    """How the process was pinned: "SO_PEERPIDFD" or "pidfd_open"."""

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "start_ticks": self.start_ticks,
                "cgroup": self.cgroup, "vm_name": self.vm_name,
                "vm_uuid": str(self.vm_uuid) if self.vm_uuid is not None else "",
                "exe": self.exe, "pinned_by": self.pinned_by}


# -- what /proc says -----------------------------------------------------------------------


def parse_cgroup(text: str) -> str:
    """The process's cgroup from /proc/PID/cgroup: the unified hierarchy's path ("0::PATH",
    cgroup v2 and the hybrid layout), else the name=systemd hierarchy's (cgroup v1), else ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths["unified"] = path
        elif "name=systemd" in controllers.split(","):
            paths["systemd"] = path
    # In the hybrid layout a process may sit in the unified root ("/") while systemd's own
    # hierarchy names its unit: the more specific one tells more.
    unified, systemd = paths.get("unified", ""), paths.get("systemd", "")
    if unified and (unified != "/" or not systemd):
        return unified
    return systemd or unified


def _split_opts(text: str) -> list[str]:
    """QEMU's option list syntax: comma separated, ",," an escaped comma."""
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text[index + 1:index + 2] == ",":
                current.append(",")
                index += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def qemu_vm(argv: Sequence[str]) -> tuple[str, uuid.UUID | None]:
    """(guest name, UUID) from a QEMU command line: `-name guest=vm7,debug-threads=on` or
    `-name vm7` (the first element's implied key is guest), `-uuid U`; `--name`/`--uuid`
    too; the last one given wins, as in QEMU. ("", None) for what is not there."""
    name = ""
    vm_uuid: uuid.UUID | None = None
    args = list(argv[1:])
    for index, arg in enumerate(args[:-1]):
        option = arg[1:] if arg.startswith("--") else arg
        value = args[index + 1]
        if option == "-name":
            for position, part in enumerate(_split_opts(value)):
                key, equals, rest = part.partition("=")
                if not equals and position == 0:
                    name = part
                elif key == "guest":
                    name = rest
        elif option == "-uuid":
            try:
                parsed = uuid.UUID(value)
            except ValueError:
                parsed = None
            vm_uuid = parsed if parsed is not None and parsed.int else None
    return name, vm_uuid


def _boottime_ticks() -> int:
    """Now in the clock ticks of /proc/PID/stat's start time (rounded down like it, in integers:
    a process that started before now never reads as later)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) * CLOCK_TICKS // 1_000_000_000


def _pidfd_alive(pidfd: int) -> bool:
    """Whether the pidfd's process still exists (alive or not yet reaped: its pid is taken)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; only signalling it is not allowed (the daemon's own uid)
    return True


def _pidfd_pid(pidfd: int) -> int | None:
    """The pid of a pidfd's process in our pid namespace (fdinfo "Pid:"): 0 when it is not
    in it, -1 once it has exited; None if the kernel does not say."""
    try:
        text = Path(f"/proc/self/fdinfo/{pidfd}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return None


def read_identity(pidfd: int, pid: int, *, uid: int = -1, gid: int = -1, pinned_by: str = "pidfd_open",
                  after_reads: Callable[[], None] | None = None) -> PeerIdentity:
    """Read process `pid`'s identity from /proc and confirm through `pidfd` (which must pin
    that process) that every read was about it (module docstring, steps 3 and 4).
    after_reads: called between the reads and the confirmation (the tests end the process
    there). IdentityUnavailable if the process is gone or cannot be read."""
    base = PROC / str(pid)
    start = pid_start_ticks(pid)
    if start is None:
        raise IdentityUnavailable(f"pid {pid} has exited")
    try:
        cgroup_text = (base / "cgroup").read_text()
        cmdline = (base / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        raise IdentityUnavailable(f"pid {pid} exited while being read") from None
    except OSError as exc:
        raise IdentityUnavailable(f"cannot read /proc/{pid}: {exc.strerror or exc}") from None
    exe = ""
    with contextlib.suppress(OSError):
        exe = os.readlink(base / "exe")
    if after_reads is not None:
        after_reads()
    # Step 4: only now do the reads count (module docstring).
    if not _pidfd_alive(pidfd) or pid_start_ticks(pid) != start:
        raise IdentityUnavailable(f"pid {pid} exited while being read: what /proc said may "
                                  "have been about another process")
    argv = [arg.decode(errors="replace") for arg in cmdline.split(b"\0")]
    if argv and argv[-1] == "":
        argv.pop()
    vm_name, vm_uuid = qemu_vm(argv)
    return PeerIdentity(pid=pid, uid=uid, gid=gid, start_ticks=start, cgroup=parse_cgroup(cgroup_text),
                        vm_name=vm_name, vm_uuid=vm_uuid, exe=exe, pinned_by=pinned_by)


def _peer_pidfd(sock: socket.socket) -> int | None:
    """The connecting process's pidfd from the kernel (SO_PEERPIDFD), None where the kernel
    has no such option. IdentityUnavailable if it has exited."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        if exc.errno == errno.ESRCH:
            raise IdentityUnavailable("the connecting process has exited") from None
        raise IdentityUnavailable(f"SO_PEERPIDFD: {exc.strerror or exc}") from None


def peer_identity(sock: socket.socket, peer: PeerCredentials) -> PeerIdentity:
    """The identity of the process that connected `sock` (whose SO_PEERCRED is `peer`),
    pinned by a pidfd and verified; IdentityUnavailable when it cannot be established, for
    whatever reason (/proc hidden by hidepid, an odd /proc/PID/stat): the accept loop that
    asks must never die of it. Call it right after accept (the pidfd_open fallback compares
    start times with now)."""
    try:
        return _peer_identity(sock, peer)
    except (OSError, ValueError, IndexError) as exc:
        raise IdentityUnavailable(f"cannot read the connecting process (pid {peer.pid}): {exc}") from None


def _peer_identity(sock: socket.socket, peer: PeerCredentials) -> PeerIdentity:
    pidfd = _peer_pidfd(sock)
    pinned_by = "SO_PEERPIDFD"
    if pidfd is None:
        if peer.pid <= 0:
            raise IdentityUnavailable("the connecting process is in another pid namespace (pid 0)")
        now = _boottime_ticks()
        try:
            pidfd = os.pidfd_open(peer.pid)
        except ProcessLookupError:
            raise IdentityUnavailable(f"pid {peer.pid} has exited") from None
        pinned_by = "pidfd_open"
        start = pid_start_ticks(peer.pid)
        if start is None or start > now:
            os.close(pidfd)
            raise IdentityUnavailable(f"pid {peer.pid} was reused after the connect")
    try:
        pid = _pidfd_pid(pidfd) if pinned_by == "SO_PEERPIDFD" else peer.pid
        if pid is None:
            pid = peer.pid
        if pid == -1:
            raise IdentityUnavailable(f"pid {peer.pid} has exited")
        if pid == 0:
            raise IdentityUnavailable("the connecting process is in another pid namespace")
        return read_identity(pidfd, pid, uid=peer.uid, gid=peer.gid, pinned_by=pinned_by)
    finally:
        os.close(pidfd)


# -- the binding ---------------------------------------------------------------------------


def _delegated(component: str) -> bool:
    """A user's systemd instance (user@UID.service): the units below it are named by that
    user, so a unit name found there proves nothing."""
    return fnmatch.fnmatchcase(component, "user@*.service")


def cgroup_matches(bound: str, actual: str) -> bool:
    """The match rule of a volume's vm_cgroup:

    - a path (starts with "/"): the process's cgroup is that one or below it, component by
      component (libvirt puts QEMU in `.../machine-qemu\\x2d1\\x2dvm7.scope/libvirt/emulator`);
      "/machine.slice/vm7" does not match "/machine.slice/vm7x";
    - otherwise a unit name (shell glob allowed: `machine-qemu\\x2d*\\x2dvm7.scope`, the
      libvirt domain id changes per start) equal to a component of the process's cgroup
      path above any user@UID.service (below it the user names units himself)."""
    if not bound or not actual:
        return not bound
    if bound.startswith("/"):
        prefix = bound.rstrip("/")
        return not prefix or actual == prefix or actual.startswith(prefix + "/")
    for component in actual.split("/"):
        if not component:
            continue
        if _delegated(component):
            return False
        if fnmatch.fnmatchcase(component, bound):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class BoundVm:
    """A volume's VM binding (header fields vm_uuid, vm_name, vm_cgroup): empty fields match
    any VM, every field that is set must match."""

    vm_uuid: uuid.UUID | None = None
    vm_name: str = ""
    vm_cgroup: str = ""

    @classmethod
    def from_header(cls, header: VolumeHeader) -> BoundVm:
        return cls(header.vm_uuid, header.vm_name, header.vm_cgroup)

    @property
    def bound(self) -> bool:
        return self.vm_uuid is not None or bool(self.vm_name) or bool(self.vm_cgroup)

    def describe(self) -> str:
        parts = [f"name {self.vm_name}" if self.vm_name else "",
                 f"uuid {self.vm_uuid}" if self.vm_uuid is not None else "",
                 f"cgroup {self.vm_cgroup}" if self.vm_cgroup else ""]
        return ", ".join(part for part in parts if part) or "any VM"

    def mismatches(self, identity: PeerIdentity) -> list[str]:
        """What about `identity` differs from the binding ([] if it is the bound VM). A pure
        function of the identity: no memory of earlier frontends (module docstring)."""
        problems = []
        if self.vm_uuid is not None and identity.vm_uuid != self.vm_uuid:
            problems.append(f"uuid {identity.vm_uuid or 'none'} is not {self.vm_uuid}")
        if self.vm_name and identity.vm_name != self.vm_name:
            problems.append(f"VM name {identity.vm_name or 'none'!r} is not {self.vm_name!r}")
        if self.vm_cgroup and not cgroup_matches(self.vm_cgroup, identity.cgroup):
            rule = "under" if self.vm_cgroup.startswith("/") else "in unit"
            problems.append(f"cgroup {identity.cgroup or 'unknown'!r} is not {rule} {self.vm_cgroup!r}")
        return problems


class AlertRateLimit:
    """At most one alert per key per interval; the next one counts those it stood for."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def take(self, key: str, now: float | None = None) -> int | None:
        """None: suppressed (counted). Else alert now, with this many suppressed since."""
        now = time.monotonic() if now is None else now
        if now - self._last.get(key, -float("inf")) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
