"""Owned unix socket paths and exclusive volume files: one daemon per socket and per volume;
the one way the package listens on a unix socket (SocketClaim.listen), accepts on it
(Acceptor) and learns who connected (peer_credentials, AccessList).

A socket path is claimed through a lock file beside it (`<socket>.lock`, flock'ed, holding
the owner's pid) before anything at the path is touched: only the lock holder may remove a
stale socket and bind, and at the end it unlinks the socket only if the path still is the
socket it bound (same inode). A daemon killed with SIGKILL loses its flock with its fds, so
the next one finds the lock free and the stale socket removable.

A volume file is claimed with flock on its own open file description: flock conflicts
between two open file descriptions even in one process, so the same file named twice on a
command line is caught as well as a second daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import resource
import socket
import stat
import struct
import time
from pathlib import Path

from vhost_pv.handover import bound_file, handover


@dataclasses.dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


@dataclasses.dataclass(frozen=True)
class AccessList:
    """Who may use the control socket. Root is always allowed."""

    uids: frozenset[int] = frozenset({0})
    gids: frozenset[int] = frozenset()

    def allows(self, peer: PeerCredentials) -> bool:
        return peer.uid == 0 or peer.uid in self.uids or peer.gid in self.gids


class AlreadyServed(OSError):
    """Another daemon (or this one, twice) holds the socket path or the volume."""


def _holder_pid(path: Path) -> int | None:
    """The pid holding a flock on path, from /proc/locks (None if not found)."""
    try:
        st = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = f":{st.st_ino} "
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 08:01:123456 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and (fields[5] + " ").endswith(wanted):
            major, minor, _ = fields[5].split(":")
            if (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev)):
                with contextlib.suppress(ValueError):
                    return int(fields[4])
    return None


def lock_volume(path: Path) -> int:
    """An fd holding an exclusive flock on the volume file; AlreadyServed if taken."""
    # O_NONBLOCK: a FIFO named by mistake must not hold the start waiting for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(errno.EINVAL, "not a volume: neither a regular file nor a block device", str(path))
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _holder_pid(path)
        who = f"vhost-pv daemon pid {pid}" if pid and pid != os.getpid() else (
            "this daemon (named twice?)" if pid == os.getpid() else "another process")
        raise AlreadyServed(errno.EBUSY, f"{path} is already served by {who}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class SocketClaim:
    """The right to a unix socket path: the lock file, then the bound listener."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock_fd = -1
        self._inode: tuple[int, int] | None = None
        self._claim()

    def _claim(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                finally:
                    os.close(fd)
                who = f"pid {text}" if text.isdigit() else "another process"
                if text == str(os.getpid()):
                    who = "this daemon (the same path twice?)"
                raise AlreadyServed(errno.EADDRINUSE,
                                    f"{self.path} is in use by another vhost-pv daemon ({who})") from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder may have unlinked the lock file between our open and our
            # flock: a lock on an unlinked inode protects nothing, so try again.
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def listen(self, backlog: int = 16) -> socket.socket:
        """Remove a stale socket (we hold the lock: nobody serves it) and bind, mode 0600.
        A listener the service manager passed for this path is adopted instead (see
        vhost_pv.handover); every listener goes to the manager's fd store, if there is one."""
        adopted = self._adopt()
        if adopted is not None:
            return adopted
        try:
            if self.path.is_socket() or self.path.is_symlink():
                self.path.unlink()
            elif self.path.exists():
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
            st = self.path.lstat()
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            self._unlink_if_ours()
            raise
        finally:
            os.umask(old_umask)
        sock.setblocking(False)
        handover().created_listener(self.path, sock)
        return sock

    def _adopt(self) -> socket.socket | None:
        """The passed listener for our path, if any. We hold the lock, so the socket file at
        the path is the one the previous holder bound and passed on: it becomes ours."""
        sock = handover().take(self.path)
        if sock is None:
            return None
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            st = None
        bound = bound_file(sock)
        if st is None or not stat.S_ISSOCK(st.st_mode) or (
                bound is not None and bound != (st.st_dev, st.st_ino)):
            # Nobody can reach a listener whose file is gone or was replaced (a daemon started
            # by hand in between, killed since): it leaves the store, a new one is bound.
            logging.getLogger("vhost_pv.daemon").warning(
                "%s: a listener was passed for it but the socket file is %s; listening anew",
                self.path, "gone" if st is None or not stat.S_ISSOCK(st.st_mode) else "another socket's")
            sock.close()
            handover().forget(self.path, stored=True)
            return None
        self._inode = (st.st_dev, st.st_ino)
        handover().adopted_listener(self.path, sock)
        logging.getLogger("vhost_pv.daemon").info("%s: adopted the passed listener", self.path)
        return sock

    def _unlink_if_ours(self) -> None:
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        self._inode = None

    def release(self, *, for_good: bool = False) -> None:
        """Unlink our socket (only if it still is ours), then the lock file, then unlock.
        A listener that outlives the process (passed, or in the manager's fd store) keeps its
        file: the next process serves it. `for_good`: the path is not served any more, so it
        leaves the store and its file goes too."""
        if for_good:
            handover().forget(self.path)
        if handover().keeps(self.path):
            self._inode = None
        self._unlink_if_ours()
        if self._lock_fd >= 0:
            # Unlinked while locked: whoever opened the old file re-checks the inode.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.lock_path).st_ino == os.fstat(self._lock_fd).st_ino:
                    self.lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = -1


ACCEPT_BACKOFF_MIN_S = 0.05
ACCEPT_BACKOFF_MAX_S = 1.0
ACCEPT_LOG_INTERVAL_S = 30.0


class Acceptor:
    """accept() that survives resource exhaustion (EMFILE, ENFILE, ENOMEM, ENOBUFS,
    ECONNABORTED...): the failure is logged once per interval, the loop backs off (the
    pending connection keeps the listener readable, so retrying at once would spin) and
    accepts again when fds are free."""

    def __init__(self, listener: socket.socket, what: str, logger: logging.Logger) -> None:
        self.listener = listener
        self.what = what
        self.log = logger
        self.failures = 0
        self._unlogged = 0
        self._last_log = -ACCEPT_LOG_INTERVAL_S
        self._delay = ACCEPT_BACKOFF_MIN_S

    async def accept(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self.listener)
            except OSError as exc:
                if self.listener.fileno() < 0:
                    raise  # closed under us: the server is stopping
                self._failed(exc)
                await asyncio.sleep(self._delay)
                self._delay = min(self._delay * 2, ACCEPT_BACKOFF_MAX_S)
                continue
            if self._delay > ACCEPT_BACKOFF_MIN_S:
                self.log.warning("%s: accepting again (%d accept() failure(s) in all)",
                                 self.what, self.failures)
                self._delay = ACCEPT_BACKOFF_MIN_S
            return sock

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._last_log < ACCEPT_LOG_INTERVAL_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        self.log.error("%s: accept() failed: %s%s; retrying with back-off", self.what,
                       exc.strerror or exc, more)
        self._last_log = now
        self._unlogged = 0


def raise_fd_limit(logger: logging.Logger) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (many frontends, guest memory regions, queue
    eventfds); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    logger.info("open-file limit (RLIMIT_NOFILE): %d", soft)
    return soft


def fds_free(reserve: int) -> bool:
    """More than `reserve` fds are left under the soft limit: servers that any local user
    can reach (metadata HTTP, control) accept only then, so the vhost-user sockets always
    have fds for a frontend and its memory regions and queue eventfds."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        return False  # listing needs an fd too: none is left
    return in_use + reserve < soft


def watch_task(task: asyncio.Task[None], logger: logging.Logger) -> asyncio.Task[None]:
    """Log a server task (an accept loop) that ends by an error: it must never die silently."""

    def ended(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            logger.error("%s ended: %r; what it served is gone until the daemon restarts",
                         done.get_name(), done.exception())

    task.add_done_callback(ended)
    return task
