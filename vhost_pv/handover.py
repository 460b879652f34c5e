"""Listening sockets that outlive the daemon: adopted at start from the service manager
(socket activation, or the fd store of an earlier run), pushed to its fd store as they are
created, and left in place (socket file included) when the daemon stops, so the next
process accepts on the very same listeners. A frontend reconnecting in between (QEMU with
`reconnect=1`) finds a listener that accepts, its connection queued in the backlog until
the next daemon takes it, instead of ECONNREFUSED and another whole second of waiting.

The manager is systemd (FileDescriptorStoreMax=, a .socket unit) or `vhost-pv supervise`
(vhost_pv/supervisor.py), which speak the same two protocols (vhost_pv/systemd.py). Without
either, nothing here does anything and the daemon listens and unlinks as before.

This module only keeps the books (which fds were passed, which paths the store holds);
sockfile.SocketClaim, the one place that listens, asks it for a passed listener and tells
it about the ones it creates, so the lock and ownership rules stay in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import re
import socket
import struct
import sys
from pathlib import Path

from vhost_pv import systemd

log = logging.getLogger("vhost_pv.daemon")

STORE_ENV = "FDSTORE"
"""Set by the manager to how many fds its store keeps (systemd >= 254 sets it when
FileDescriptorStoreMax= is not 0; `vhost-pv supervise` sets it; a unit on an older systemd
sets it with Environment=). Without it nothing is pushed: systemd would drop the fds."""

FDNAME_MAX = 255

STANDBY_ENV = "VHOST_PV_STANDBY_FD"
"""Set by `vhost-pv supervise` for a warm standby: the fd of its go pipe (see wait_for_turn)."""
STANDBY_FIELD = "VHOST_PV_STANDBY"
"""The standby's one notification: it is through its start and waits (a field systemd ignores)."""


def fd_name(path: Path) -> str:
    """The store name of the listener at `path`: readable (the file name), unique (a hash of
    the absolute path), stable across runs, <= 255 characters and without ':' (the separator
    of LISTEN_FDNAMES), as sd_pid_notify_with_fds(3) requires."""
    full = os.path.abspath(path)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(full))[:64]
    name = f"{stem}-{hashlib.sha256(full.encode()).hexdigest()[:12]}"
    assert len(name) <= FDNAME_MAX and ":" not in name
    return name


@dataclasses.dataclass
class _Passed:
    sock: socket.socket
    name: str  # LISTEN_FDNAMES entry
    address: str  # getsockname()


def _listening_unix_stream(sock: socket.socket) -> str | None:
    """Why a passed fd cannot be adopted (None: it can)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) != socket.AF_UNIX:
            return "not an AF_UNIX socket"
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            return "not a stream socket"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
        address = sock.getsockname()
    except OSError as exc:
        return f"cannot inspect it: {exc.strerror or exc}"
    if not isinstance(address, str) or not address or address.startswith("\0"):
        return "not bound to a path"
    return None


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
UDIAG_SHOW_VFS = 0x2
UNIX_DIAG_VFS = 1
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")


def bound_file(sock: socket.socket) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file a unix socket is bound to, from the kernel (sock_diag,
    UNIX_DIAG_VFS), or None when the kernel cannot say (no unix_diag). This is what proves
    that the socket file at a path is this very listener, not a later one's left behind."""
    ino = os.fstat(sock.fileno()).st_ino
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                           NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            body = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, UDIAG_SHOW_VFS,
                                       0xFFFFFFFF, 0xFFFFFFFF)
            nl.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
                    + body)
            reply = nl.recv(8192)
    except OSError:
        return None
    if len(reply) < _NLMSGHDR.size + _UNIX_DIAG_MSG.size:
        return None
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
    if kind == NLMSG_ERROR or length > len(reply):
        return None
    offset = _NLMSGHDR.size + _UNIX_DIAG_MSG.size
    while offset + _RTATTR.size <= length:
        attr_len, attr_type = _RTATTR.unpack_from(reply, offset)
        if attr_len < _RTATTR.size:
            return None
        if attr_type == UNIX_DIAG_VFS and attr_len >= _RTATTR.size + 8:
            vfs_ino, vfs_dev = struct.unpack_from("=II", reply, offset + _RTATTR.size)
            # The kernel's own dev_t encoding (MAJOR << 20 | MINOR), not stat's.
            return os.makedev(vfs_dev >> 20, vfs_dev & 0xFFFFF), vfs_ino
        offset += (attr_len + 3) & ~3
    return None


class ListenerHandover:
    """The process's passed listeners and what it has put in the manager's fd store."""

    def __init__(self) -> None:
        self._passed: list[_Passed] = []
        self._kept: set[str] = set()  # absolute paths whose listener outlives this process
        self.adopted = 0
        self.refused = 0

    # -- at start ---------------------------------------------------------------------------

    def load(self) -> None:
        """Take the fds the manager passed (LISTEN_FDS): the listening AF_UNIX stream sockets
        are kept for SocketClaim to adopt; anything else is refused with a log line and
        closed, never used (and dropped from the store, where it would come back)."""
        self._passed.clear()
        self._kept.clear()
        for passed in systemd.listen_fds():
            try:
                sock = socket.socket(fileno=passed.fd)
            except OSError as exc:
                self._refuse(passed.fd, passed.name, "not a socket" if exc.errno == errno.ENOTSOCK
                             else f"unusable: {exc.strerror or exc}")
                continue
            why = _listening_unix_stream(sock)
            if why is not None:
                sock.close()
                self._refuse(-1, passed.name, why)
                continue
            sock.setblocking(False)
            self._passed.append(_Passed(sock, passed.name, sock.getsockname()))
        if self._passed:
            log.info("passed by the service manager: %d listening socket(s): %s", len(self._passed),
                     ", ".join(p.address for p in self._passed))

    def _refuse(self, fd: int, name: str, why: str) -> None:
        self.refused += 1
        log.warning("refused a passed fd (name %s): %s; closed, not used", name, why)
        if fd >= 0:
            os.close(fd)
        if name not in ("", "unknown", "stored", "connection") and self.store_enabled():
            with contextlib.suppress(OSError):
                systemd.notify({"FDSTOREREMOVE": "1", "FDNAME": name})

    def take(self, path: Path) -> socket.socket | None:
        """The passed listener for `path` (bound to it, or stored under its name), once."""
        full = os.path.abspath(path)
        name = fd_name(path)
        for index, passed in enumerate(self._passed):
            if os.path.abspath(passed.address) == full or passed.name == name:
                del self._passed[index]
                self.adopted += 1
                return passed.sock
        return None

    def drop_unclaimed(self) -> None:
        """After the start: passed listeners no served path claimed (a volume no longer
        served) are closed and dropped from the store. Their socket files stay, as a
        killed daemon's do: the next SocketClaim of the path removes them."""
        for passed in self._passed:
            log.info("passed listener %s (%s) serves nothing now: closed and dropped from the store",
                     passed.address, passed.name)
            passed.sock.close()
            if self.store_enabled():
                with contextlib.suppress(OSError):
                    systemd.notify({"FDSTOREREMOVE": "1", "FDNAME": passed.name})
        self._passed.clear()

    # -- the store --------------------------------------------------------------------------

    @staticmethod
    def store_enabled() -> bool:
        if not systemd.notify_enabled():
            return False
        try:
            return int(os.environ.get(STORE_ENV, "0")) > 0
        except ValueError:
            return False

    def adopted_listener(self, path: Path, sock: socket.socket) -> None:
        """A passed listener now serves `path`: it outlives us (whoever passed it keeps a copy),
        and goes to the store too (an fd from a socket unit is not there yet; one from the
        store itself is stored once: the manager recognises the same socket)."""
        self._kept.add(os.path.abspath(path))
        self.created_listener(path, sock)

    def created_listener(self, path: Path, sock: socket.socket) -> None:
        """Push a listener to the fd store under fd_name(path), if there is a store."""
        if not self.store_enabled():
            return
        try:
            systemd.notify({"FDSTORE": "1", "FDNAME": fd_name(path)}, fds=[sock.fileno()])
        except OSError as exc:
            log.warning("%s: cannot put the listener in the fd store: %s; a restart will refuse "
                        "connections until the next daemon listens", path, exc.strerror or exc)
            return
        self._kept.add(os.path.abspath(path))

    def keeps(self, path: Path) -> bool:
        """Does the listener at `path` outlive this process (so its file must stay)?"""
        return os.path.abspath(path) in self._kept

    def keeps_any(self) -> bool:
        """Does any listener outlive this process (a next daemon is expected to serve it)?"""
        return bool(self._kept)

    def forget(self, path: Path, *, stored: bool = False) -> None:
        """`path` is not served any more, for good (or not by this listener: `stored`, one
        the manager passed that we do not use): out of the store (FDSTOREREMOVE)."""
        full = os.path.abspath(path)
        if full not in self._kept and not stored:
            return
        self._kept.discard(full)
        if self.store_enabled():
            with contextlib.suppress(OSError):
                systemd.notify({"FDSTOREREMOVE": "1", "FDNAME": fd_name(path)})


_HANDOVER = ListenerHandover()


def handover() -> ListenerHandover:
    """The process's one handover: passed fds are the process's, not a daemon object's."""
    return _HANDOVER


def exit_now_if_handed_over(code: int) -> None:
    """After a clean stop whose listeners outlive us, end the process at once: the next
    daemon starts when this one has exited, and the interpreter's own teardown (modules,
    the C data path's library) adds 0.2 to 0.5 s to the restart for nothing, everything
    having been closed already. Logs are flushed first."""
    if not handover().keeps_any():
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def wait_for_turn() -> bool:
    """A warm standby (STANDBY_ENV set by `vhost-pv supervise`): everything up to serving is
    done (interpreter, imports, the C data path, the command line checked); say so, then wait
    for the supervisor's go (a byte on the pipe: the previous daemon has exited) before
    touching any volume or socket. False: the supervisor went away (EOF), do not serve.
    Without the variable, True at once."""
    value = os.environ.pop(STANDBY_ENV, None)
    if value is None:
        return True
    try:
        fd = int(value)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        log.error("%s=%r is not an open fd: not waiting", STANDBY_ENV, value)
        return True
    with contextlib.suppress(OSError):
        systemd.notify({STANDBY_FIELD: "1"})
    try:
        go = os.read(fd, 1)
    finally:
        os.close(fd)
    return go == b"1"
