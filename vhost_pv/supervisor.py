"""`vhost-pv supervise`: the smallest service manager that keeps the daemon's listening
sockets alive across its restarts, for hosts without systemd (or containers).

It speaks systemd's two protocols (vhost_pv/systemd.py), so the daemon has one code path:
- sd_notify on a datagram NOTIFY_SOCKET in a private directory (mode 0700, socket 0600):
  READY, STATUS, STOPPING, RELOADING, WATCHDOG (=1 and =trigger), FDSTORE/FDNAME (the fd
  store) and FDSTOREREMOVE; only from the child's pid, checked with SO_PASSCRED (the
  kernel's word, not the sender's), anything else is dropped and its fds closed;
- socket passing as systemd does it: the store's fds dup'd to 3, 4, ... in the child,
  LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID the child's own pid (set between fork and exec).

Fds passed to the supervisor itself (LISTEN_FDS) seed the store. The child is restarted at
once whenever it exits for any reason but our own stop (kill -9 included; a child that keeps
dying young is restarted with a growing delay, and a usage error at the first start ends the
supervisor). SIGUSR2 restarts it gracefully (SIGTERM, wait, start the code installed now): an
upgrade is "install the new build, send SIGUSR2". SIGHUP is passed on (the daemon reloads its
policy). SIGTERM/SIGINT stop the child, then us.

A warm standby (unless --no-standby) makes a restart cost the start of the service, not of the
interpreter: the next daemon is started with the store's fds and a go pipe, does everything
up to serving (imports, the C data path, its command line checked), says so on the notify
socket (VHOST_PV_STANDBY=1), and waits for a byte on the pipe (EOF: it exits). Whenever the
running daemon ends, the standby gets its byte and serves within milliseconds; a new standby
follows. When the store changes, the standby is replaced (it must hold what the store
holds); for a graceful restart a standby of the installed code is warmed up first, while
the old daemon still serves.

It holds listening sockets and nothing else: no guest data, nothing a guest controls.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from vhost_pv.handover import STANDBY_ENV, STANDBY_FIELD, STORE_ENV
from vhost_pv.sockfile import AlreadyServed, SocketClaim
from vhost_pv.systemd import SD_LISTEN_FDS_START, listen_fds

log = logging.getLogger("vhost_pv.supervise")

EXIT_USAGE = 2
"""The child's usage-error exit code (vhost_pv.cli.EXIT_USAGE): restarting cannot help."""
MAX_MESSAGE = 4096
MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD
UCRED = struct.Struct("3i")
YOUNG_S = 1.0
"""A child that dies younger than this counts towards the restart back-off."""
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


@dataclasses.dataclass
class StoredFd:
    fd: int
    name: str
    identity: tuple[int, int]  # (st_dev, st_ino): the same socket, whatever the fd number


@dataclasses.dataclass
class SupervisorOptions:
    fdstore_max: int = 512
    stop_timeout: float = 30.0
    watchdog: float | None = None
    pid_file: Path | None = None
    standby: bool = True
    """Keep a warm standby: the next daemon, started and through its imports, waiting for its
    turn (a pipe), so a restart costs the start of the service, not of the interpreter."""


@dataclasses.dataclass
class _Proc:
    pid: int
    exited: asyncio.Future[int]
    started: float
    go: int = -1
    """A standby's end of its go pipe (a byte: serve now; EOF: exit); -1 once running."""
    warm: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(self, argv: Sequence[str], options: SupervisorOptions | None = None) -> None:
        self.argv = list(argv)
        self.options = options or SupervisorOptions()
        self.store: list[StoredFd] = []
        self.active: _Proc | None = None
        self.standby: _Proc | None = None
        self._standby_refresh: asyncio.TimerHandle | None = None
        self.status = ""
        self.ready = False
        self.restarts = 0
        self._dir = Path(tempfile.mkdtemp(prefix="vhost-pv-supervise."))  # 0700
        self.notify_path = self._dir / "notify"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self._notify.bind(str(self.notify_path))
        finally:
            os.umask(old)
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self._wake = asyncio.Event()
        self._stopping = False
        self._restart_requested = False
        self._last_watchdog = 0.0

    # -- the notify socket ------------------------------------------------------------------

    def _on_notify(self) -> None:
        while True:
            try:
                data, ancillary, flags, _ = self._notify.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(UCRED.size),
                    socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            fds: list[int] = []
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS \
                        and len(payload) >= UCRED.size:
                    pid = UCRED.unpack(payload[: UCRED.size])[0]
            try:
                self._handle(data, flags, pid, fds)
            finally:
                for fd in fds:  # whatever was not stored
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _handle(self, data: bytes, flags: int, pid: int | None, fds: list[int]) -> None:
        """One notification; the fds it keeps are taken out of `fds` (the rest get closed)."""
        standby = self.standby
        if standby is not None and pid == standby.pid:
            # A standby says only that it is warm; it stores nothing before its turn.
            if b"\n" + STANDBY_FIELD.encode() + b"=1" in b"\n" + data:
                standby.warm.set()
                log.info("standby pid %d ready to take over (%.3f s after its start)", pid,
                         time.monotonic() - standby.started)
            return
        if pid is None or pid != self.child or self.child is None:
            log.warning("notification from pid %s ignored: only the service's process (pid %s) "
                        "may notify%s", pid, self.child, f"; {len(fds)} fd(s) closed" if fds else "")
            return
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            log.warning("truncated notification from pid %d ignored", pid)
            return
        fields: dict[str, str] = {}
        for line in data.decode(errors="replace").split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        if fields.get("READY") == "1":
            self.ready = True
            log.info("child pid %d ready (%.3f s after its start)", pid,
                     time.monotonic() - self.child_started)
        if "STATUS" in fields:
            self.status = fields["STATUS"]
            log.info("child status: %s", self.status)
        if fields.get("STOPPING") == "1":
            log.info("child pid %d stopping", pid)
        if fields.get("RELOADING") == "1":
            log.info("child pid %d reloading", pid)
        if fields.get("WATCHDOG") == "1":
            self._last_watchdog = time.monotonic()
        elif fields.get("WATCHDOG") == "trigger":
            self._watchdog_expired("the child asked for it (WATCHDOG=trigger)")
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            self._remove(name)
        if fields.get("FDSTORE") == "1":
            if not _valid_name(name):
                log.warning("fd store: invalid FDNAME %r; %d fd(s) closed", name, len(fds))
                return
            while fds:
                self._store(fds.pop(0), name)
        elif fds:
            log.warning("%d fd(s) sent without FDSTORE=1 closed", len(fds))

    def _store(self, fd: int, name: str) -> None:
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        for stored in self.store:
            if stored.identity == identity:
                # The same socket again (a listener the child adopted from us): stored once,
                # as systemd does.
                os.close(fd)
                return
        if len(self.store) >= self.options.fdstore_max:
            log.warning("fd store full (%d): %s not stored", self.options.fdstore_max, name)
            os.close(fd)
            return
        self.store.append(StoredFd(fd, name, identity))
        log.info("fd store: %s stored (%d fd(s) in all)", name, len(self.store))
        self._store_changed()

    def _remove(self, name: str) -> None:
        kept = []
        for stored in self.store:
            if stored.name == name:
                os.close(stored.fd)
                log.info("fd store: %s removed", name)
            else:
                kept.append(stored)
        if len(kept) != len(self.store):
            self.store = kept
            self._store_changed()

    # -- the child --------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        env[STORE_ENV] = str(self.options.fdstore_max)
        if self.options.watchdog:
            env["WATCHDOG_USEC"] = str(int(self.options.watchdog * 1e6))
        return env

    def _spawn(self, go: int = -1) -> int:
        """fork, arrange the store's fds as systemd does, exec. LISTEN_PID (and WATCHDOG_PID)
        are set in the child, where its pid is known; nothing else runs between fork and
        exec (this process has no other threads). A standby's go pipe comes after the
        passed fds, named by STANDBY_ENV."""
        count = len(self.store)
        fds = [s.fd for s in self.store] + ([go] if go >= 0 else [])
        names = ":".join(s.name for s in self.store)
        env = self._environment()
        if go >= 0:
            env[STANDBY_ENV] = str(SD_LISTEN_FDS_START + count)
        argv = self.argv
        pid = os.fork()
        if pid == 0:  # the child
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                # Out of the way first (a stored fd may sit where another must go), then in place.
                base = max([SD_LISTEN_FDS_START + len(fds), *[fd + 1 for fd in fds]])
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD, base) for fd in fds]
                for index, fd in enumerate(high):
                    os.dup2(fd, SD_LISTEN_FDS_START + index)
                os.closerange(SD_LISTEN_FDS_START + len(fds), 2**31 - 1)
                if count:
                    env["LISTEN_FDS"] = str(count)
                    env["LISTEN_FDNAMES"] = names
                    env["LISTEN_PID"] = str(os.getpid())
                if "WATCHDOG_USEC" in env:
                    env["WATCHDOG_PID"] = str(os.getpid())
                os.execve(argv[0], argv, env)
            except BaseException as exc:  # nothing may return into the parent's loop
                with contextlib.suppress(Exception):
                    os.write(2, f"vhost-pv supervise: cannot start {argv[0]}: {exc}\n".encode())
            os._exit(127)
        return pid

    @property
    def child(self) -> int | None:
        return self.active.pid if self.active is not None else None

    @property
    def child_started(self) -> float:
        return self.active.started if self.active is not None else 0.0

    def _launch(self, *, standby: bool) -> _Proc:
        loop = asyncio.get_running_loop()
        go_read = go_write = -1
        if standby:
            go_read, go_write = os.pipe()
        try:
            pid = self._spawn(go_read)
        finally:
            if go_read >= 0:
                os.close(go_read)
        exited: asyncio.Future[int] = loop.create_future()
        proc = _Proc(pid, exited, time.monotonic(), go_write)
        pidfd = os.pidfd_open(pid)

        def reap() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            if proc.go >= 0:
                os.close(proc.go)
                proc.go = -1
            if not exited.done():
                exited.set_result(os.waitstatus_to_exitcode(status))
            if proc is self.standby:
                self.standby = None
                if not self._stopping:
                    log.warning("standby pid %d exited (%s) before its turn; another in 1 s", pid,
                                _describe(exited.result()))
                    self._store_changed(delay=1.0)

        loop.add_reader(pidfd, reap)
        return proc

    def _start_child(self) -> None:
        """The standby's turn if there is one (it serves within milliseconds), else a new child."""
        self.ready = False
        standby, self.standby = self.standby, None
        if standby is not None and standby.go >= 0 and not standby.exited.done():
            os.write(standby.go, b"1")
            os.close(standby.go)
            standby.go = -1
            standby.started = time.monotonic()
            self.active = standby
            log.info("standby pid %d takes over%s", standby.pid,
                     "" if standby.warm.is_set() else " (still starting)")
        else:
            self.active = self._launch(standby=False)
            log.info("started child pid %d with %d passed fd(s): %s", self.active.pid, len(self.store),
                     " ".join(self.argv))
        self._last_watchdog = self.active.started
        self._store_changed(delay=0.2)

    def _store_changed(self, delay: float = 0.5) -> None:
        """(Re)start the standby with the store as it is now, after `delay` (debounced: a
        daemon starting stores one fd per socket)."""
        if not self.options.standby or self._stopping:
            return
        if self._standby_refresh is not None:
            self._standby_refresh.cancel()
        self._standby_refresh = asyncio.get_running_loop().call_later(delay, self._refresh_standby)

    def _refresh_standby(self) -> None:
        self._standby_refresh = None
        if self._stopping or self.active is None:
            return
        self._drop_standby()
        self.standby = self._launch(standby=True)
        log.info("standby pid %d started with %d passed fd(s)", self.standby.pid, len(self.store))

    def _drop_standby(self) -> None:
        standby, self.standby = self.standby, None
        if standby is not None and not standby.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(standby.pid, signal.SIGKILL)

    def _signal_child(self, sig: int) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, sig)

    async def _stop_child(self) -> int:
        """SIGTERM, then SIGKILL after the stop timeout; the exit code."""
        assert self.active is not None
        exited = self.active.exited
        self._signal_child(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(exited), self.options.stop_timeout)
        except TimeoutError:
            log.error("child pid %s ignored SIGTERM for %.0f s: SIGKILL", self.child,
                      self.options.stop_timeout)
            self._signal_child(signal.SIGKILL)
            return await exited

    async def _warm_standby(self) -> None:
        """For a graceful restart: a standby with the code installed now, through its start."""
        if not self.options.standby:
            return
        self._refresh_standby()
        standby = self.standby
        if standby is None:
            return
        warm: asyncio.Future[object] = asyncio.ensure_future(standby.warm.wait())
        gone: asyncio.Future[object] = standby.exited  # type: ignore[assignment]
        await asyncio.wait([warm, gone], timeout=self.options.stop_timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        warm.cancel()

    def _watchdog_expired(self, why: str) -> None:
        log.error("watchdog: child pid %s: %s; SIGABRT", self.child, why)
        self._signal_child(signal.SIGABRT)

    async def _watchdog(self) -> None:
        interval = self.options.watchdog
        assert interval
        while True:
            await asyncio.sleep(interval / 4)
            if self.child is not None and time.monotonic() - self._last_watchdog > interval:
                self._last_watchdog = time.monotonic()  # once per interval, not per tick
                self._watchdog_expired(f"no WATCHDOG=1 for {interval:g} s")

    # -- the loop ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def request_restart(self) -> None:
        self._restart_requested = True
        self._wake.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._notify.fileno(), self._on_notify)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR2, self.request_restart)
        loop.add_signal_handler(signal.SIGHUP, self._signal_child, signal.SIGHUP)
        if self.options.pid_file is not None:
            self.options.pid_file.write_text(f"{os.getpid()}\n")
        # Started by a manager itself (systemd socket activation, or an admin handing over the
        # listeners of a daemon started by hand): what it passed seeds the store.
        for passed in listen_fds():
            self._store(passed.fd, passed.name if _valid_name(passed.name) else "stored")
        watchdog = asyncio.create_task(self._watchdog()) if self.options.watchdog else None
        young = 0
        first = True
        code = 0
        try:
            while not self._stopping:
                self._start_child()
                assert self.active is not None
                active_exited = self.active.exited
                wake: asyncio.Future[object] = asyncio.ensure_future(self._wake.wait())
                exited: asyncio.Future[object] = active_exited  # type: ignore[assignment]
                await asyncio.wait([exited, wake], return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                self._wake.clear()
                if self._stopping:
                    code = await self._stop_child()
                    log.info("child pid %s stopped (exit %d)", self.child, code)
                    break
                if self._restart_requested and not active_exited.done():
                    self._restart_requested = False
                    await self._warm_standby()
                    began = time.monotonic()
                    code = await self._stop_child()
                    log.info("graceful restart: child pid %s stopped in %.3f s (exit %d); starting "
                             "the installed code", self.child, time.monotonic() - began, code)
                    self.restarts += 1
                    young = 0
                    first = False
                    continue
                self._restart_requested = False
                code = await active_exited
                lived = time.monotonic() - self.child_started
                if first and code == EXIT_USAGE:
                    log.error("child exited with a usage error (%d): not restarting", code)
                    return code
                first = False
                young = young + 1 if lived < YOUNG_S else 0
                delay = min(BACKOFF_MIN_S * 2 ** (young - 1), BACKOFF_MAX_S) if young else 0.0
                log.warning("child pid %s exited (%s) after %.1f s; restarting%s", self.child,
                            _describe(code), lived, f" in {delay:.1f} s" if delay else " at once")
                self.restarts += 1
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    self._wake.clear()
            return 0
        finally:
            self._stopping = True
            if watchdog is not None:
                watchdog.cancel()
            if self._standby_refresh is not None:
                self._standby_refresh.cancel()
            standby = self.standby
            self._drop_standby()
            if standby is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(standby.exited, 10)
            self.active = None
            self.close()

    def close(self) -> None:
        """Our own stop: nobody serves the stored listeners any more, so they close and their
        socket files go (under the path's lock, as the daemon itself would remove them)."""
        paths = []
        for stored in self.store:
            with contextlib.suppress(OSError):
                address = socket.socket(fileno=os.dup(stored.fd))
                with address:
                    name = address.getsockname()
                if isinstance(name, str) and name and not name.startswith("\0"):
                    paths.append(Path(name))
            os.close(stored.fd)
        self.store.clear()
        for path in paths:
            _remove_socket_file(path)
        with contextlib.suppress(OSError):
            self._notify.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self.options.pid_file is not None:
            with contextlib.suppress(OSError):
                self.options.pid_file.unlink()


def _remove_socket_file(path: Path) -> None:
    try:
        claim = SocketClaim(path)
    except (AlreadyServed, OSError) as exc:
        log.info("%s left in place: %s", path, exc)
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
    finally:
        claim.release()


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 255 and ":" not in name and all(c.isprintable() for c in name)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def child_argv(args: Sequence[str]) -> list[str]:
    """`vhost-pv ARGS...` as the child: this interpreter and the package as installed now
    (so a restart runs the new build)."""
    return [sys.executable, "-m", "vhost_pv.cli", *args]
