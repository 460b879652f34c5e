"""The control socket: admin commands, for peers on the allow-list only (SO_PEERCRED)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from construct import ConstructError

from vhost_pv.control.wire import (
    CONTROL_VERSION,
    FLAG_REPLY,
    MAX_CONTROL_PAYLOAD,
    REQUEST_LAYOUTS,
    VARIABLE_TAIL,
    Command,
    ControlHeader,
    ReplyStatus,
)
from vhost_pv.errors import VhostPvError
from vhost_pv.sockfile import (
    Acceptor,
    PeerCredentials,
    SocketClaim,
    fds_free,
    peer_credentials,
    watch_task,
)
from vhost_pv.sockfile import (
    AccessList as AccessList,  # re-exported: who may connect is decided in sockfile now
)

log = logging.getLogger("vhost_pv.control")

MAX_CONNECTIONS = 64
"""Control connections at once: more are closed at accept (each holds an fd and a task)."""
FD_RESERVE = 16
"""fds kept free for the vhost-user sockets: no control connection is taken below this
(less than the metadata HTTP server keeps: an admin still gets in when HTTP is refused)."""

Send = Callable[[bytes], Awaitable[None]]
"""Sends one more successful reply on the connection (streaming commands)."""
Handler = Callable[[bytes, "PeerCredentials", Send], Awaitable[bytes | None]]
"""A command: request payload, who asked, and send for streaming. Returns the reply body,
or None when it has sent its replies itself."""


class CommandError(VhostPvError):
    """A failure of the control transport itself (not of the domain: that raises its own
    VhostPvError subclasses). Like every VhostPvError, `errno` goes back with the message."""


class ControlServer:
    def __init__(self, path: Path, access: AccessList, handlers: dict[Command, Handler], *,
                 timeout: float = 10.0) -> None:
        self.path = path
        self.access = access
        self.handlers = handlers
        self.timeout = timeout
        """A request must be complete this long after its first byte; a connection idle for
        this long between requests (or before its first) is closed."""
        self._claim: SocketClaim | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.dropped = 0

    async def start(self) -> None:
        # Our own accept loop rather than asyncio's server: under uvloop an accept() error
        # (EMFILE...) on a server's listener closes that server for good; here it backs off.
        self._claim = SocketClaim(self.path)  # raises if another daemon serves this path
        self._listener = self._claim.listen(backlog=64)  # mode 0600 from birth
        self._accept_task = watch_task(asyncio.create_task(self._accept_loop(), name="control-accept"), log)
        log.info("control socket at %s", self.path)

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        acceptor = Acceptor(self._listener, "control socket", log)
        while True:
            sock = await acceptor.accept()
            if len(self._connections) >= MAX_CONNECTIONS or not fds_free(FD_RESERVE):
                # Closed, not left in the backlog: a flood must not keep the listener full.
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("control: connection closed at accept: %d open, or fds short "
                                "(%d dropped in all)", len(self._connections), self.dropped)
                sock.close()
                continue
            task = asyncio.create_task(self._open(sock))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _open(self, sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except OSError as exc:
            log.warning("control: cannot set up a connection: %s", exc)
            sock.close()
            return
        await self._serve(reader, writer)

    async def _read_request(self, reader: asyncio.StreamReader, peer: PeerCredentials) -> bytes:
        """The next request header: the connection may be idle up to the timeout, then the
        header must be complete within the timeout from its first byte."""
        first = await asyncio.wait_for(reader.read(1), self.timeout)
        if not first:
            raise asyncio.IncompleteReadError(b"", ControlHeader.sizeof())
        try:
            rest = await asyncio.wait_for(reader.readexactly(ControlHeader.sizeof() - 1), self.timeout)
        except asyncio.IncompleteReadError as exc:
            raise asyncio.IncompleteReadError(first + exc.partial, ControlHeader.sizeof()) from None
        return first + rest

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
        except OSError:
            writer.close()
            return
        try:
            if not self.access.allows(peer):
                log.warning(
                    "control: refused peer pid=%d uid=%d gid=%d (not on the allow-list)",
                    peer.pid, peer.uid, peer.gid,
                )
                # Answer the request rather than racing it: replying and closing before the
                # client has written its request makes that write fail (EPIPE), and the client
                # never sees why it was turned away.
                cmd = seq = 0
                try:
                    raw = await asyncio.wait_for(reader.readexactly(ControlHeader.sizeof()),
                                                 min(2.0, self.timeout))
                    request = ControlHeader.parse(raw)
                    cmd, seq = request.cmd, request.seq
                except (TimeoutError, asyncio.IncompleteReadError, ConstructError):
                    pass
                await self._reply(writer, cmd, seq, -errno.EACCES, b"permission denied: uid not allowed")
                return
            while True:
                try:
                    raw = await self._read_request(reader, peer)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        log.warning("control: truncated request header from pid %d", peer.pid)
                    return
                except TimeoutError:
                    log.warning("control: pid %d idle or stalled mid-request for %g s, closing",
                                peer.pid, self.timeout)
                    return
                try:
                    header = ControlHeader.parse(raw)
                except ConstructError:
                    log.warning("control: bad magic from pid %d, closing", peer.pid)
                    await self._reply(writer, 0, 0, -errno.EPROTO, b"bad magic: not a vhost-pv request")
                    return
                if header.version != CONTROL_VERSION or header.length > MAX_CONTROL_PAYLOAD:
                    log.warning("control: unsupported request from pid %d: %s", peer.pid, dict(header))
                    await self._reply(writer, header.cmd, header.seq, -errno.EPROTO,
                                      b"unsupported version or oversized payload")
                    return
                try:
                    payload = await asyncio.wait_for(reader.readexactly(header.length), self.timeout)
                except TimeoutError:
                    log.warning("control: pid %d stalled mid-request (command %#x), closing",
                                peer.pid, header.cmd)
                    return
                await self._dispatch(writer, header.cmd, header.seq, payload, peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(
        self, writer: asyncio.StreamWriter, cmd: int, seq: int, payload: bytes, peer: PeerCredentials
    ) -> None:
        try:
            handler = self.handlers[Command(cmd)]
        except (ValueError, KeyError):
            log.warning("control: unknown command %#x from pid %d", cmd, peer.pid)
            await self._reply(writer, cmd, seq, -errno.ENOTTY, f"unknown command {cmd:#x}".encode())
            return
        layout = REQUEST_LAYOUTS.get(Command(cmd))
        too_short = layout is not None and len(payload) < layout.sizeof()
        if layout is not None and (too_short or (Command(cmd) not in VARIABLE_TAIL
                                                 and len(payload) != layout.sizeof())):
            log.warning("control: %s from pid %d with %d bytes, expected %d",
                        Command(cmd).name, peer.pid, len(payload), layout.sizeof())
            message = f"{Command(cmd).name} takes {layout.sizeof()} bytes, got {len(payload)}"
            await self._reply(writer, cmd, seq, -errno.EINVAL, message.encode())
            return

        async def send(body: bytes) -> None:
            await self._reply(writer, cmd, seq, 0, body)

        try:
            result = await handler(payload, peer, send)
        except VhostPvError as exc:  # the one place a domain error becomes -errno
            await self._reply(writer, cmd, seq, -exc.errno, str(exc).encode())
            return
        except (ConstructError, ValueError, json.JSONDecodeError) as exc:
            await self._reply(writer, cmd, seq, -errno.EINVAL, f"malformed request: {exc}".encode())
            return
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a failing command must answer, and not take the daemon down
            log.exception("control: %s failed", Command(cmd).name)
            await self._reply(writer, cmd, seq, -errno.EIO, f"{Command(cmd).name} failed: {exc}".encode())
            return
        if result is not None:
            await self._reply(writer, cmd, seq, 0, result)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, cmd: int, seq: int, status: int, body: bytes) -> None:
        payload = ReplyStatus.build(status) + body
        header = ControlHeader.build(
            {"version": CONTROL_VERSION, "flags": FLAG_REPLY, "cmd": cmd, "seq": seq, "length": len(payload)}
        )
        # A client that went away (alerts --follow ended with Ctrl-C, a killed CLI) closes
        # the transport under us; uvloop then refuses the write with RuntimeError. Both are
        # the peer leaving, which the callers handle as ConnectionError, not a daemon fault.
        if writer.is_closing():
            raise ConnectionResetError(errno.ECONNRESET, "control client went away")
        try:
            writer.write(header + payload)
        except RuntimeError as exc:
            raise ConnectionResetError(errno.ECONNRESET, "control client went away") from exc
        await writer.drain()
