"""Reading and writing vhost-user messages on a unix socket, with their fds (SCM_RIGHTS).

asyncio's socket helpers do not pass ancillary data, so the channel waits for readability
itself and calls recvmsg() on the non-blocking socket.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import os
import socket
from collections.abc import Sequence

from vhost_pv.protocol.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION_MASK,
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    PROTOCOL_VERSION,
    MessageHeader,
)

# A message whose first byte arrived must be complete soon after, and a new frontend must
# send its first message soon after connecting: a peer that stalls is broken or hostile, and
# must not hold the volume's frontend slot.
MESSAGE_TIMEOUT_S = 5.0
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


class ProtocolError(Exception):
    """A malformed or unsupported message: the connection that sent it is closed."""


class PeerClosed(Exception):
    """The frontend closed the connection."""


@dataclasses.dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def take_fds(self) -> list[int]:
        """Hand the fds to the caller, who becomes responsible for closing them."""
        fds, self.fds = self.fds, []
        return fds


def _extract_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


class MessageChannel:
    """One connected vhost-user socket."""

    def __init__(self, sock: socket.socket, *, timeout: float = MESSAGE_TIMEOUT_S) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.timeout = timeout
        self._received = 0
        # The message being received: its deadline (None: no byte yet and not the first
        # message, so no deadline), whether a byte of it came, and its header once parsed.
        self._deadline: float | None = None
        self._started = False
        self._pending: MessageHeader | None = None
        self._loop = asyncio.get_running_loop()

    async def _readable(self) -> bool:
        """Wait until the socket is readable; False if the message's deadline passed first.
        (A timer rather than asyncio.wait_for: no extra task, so a message already waiting
        costs no extra loop iteration.)"""
        fut: asyncio.Future[bool] = self._loop.create_future()
        fd = self.sock.fileno()

        def done(result: bool) -> None:
            if not fut.done():
                fut.set_result(result)

        timer = None
        if self._deadline is not None:
            remaining = self._deadline - self._loop.time()
            if remaining <= 0:
                return False
            timer = self._loop.call_later(remaining, done, False)
        self._loop.add_reader(fd, done, True)
        try:
            return await fut
        finally:
            self._loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()

    def _timed_out(self) -> ProtocolError:
        header = self._pending
        if not self._started:
            return ProtocolError(f"no message within {self.timeout:g} s of connecting")
        if header is None:
            return ProtocolError(f"a message header begun did not arrive within {self.timeout:g} s")
        return ProtocolError(f"request {header.request}: payload of {header.size} bytes did not arrive "
                             f"within {self.timeout:g} s")

    async def _recv_exact(self, size: int, fds: list[int]) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining > 0:
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(remaining, _ANCILLARY_SPACE)
            except BlockingIOError:
                if not await self._readable():
                    raise self._timed_out() from None
                continue
            except ConnectionResetError:
                raise PeerClosed() from None
            fds.extend(_extract_fds(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS_PER_MESSAGE} fds in one message "
                                    "(or none left in this process to receive them)")
            # The limit is per message, not per read: a peer sending its message a byte at a
            # time with fds on every byte would otherwise pile up the whole fd table.
            if len(fds) > MAX_FDS_PER_MESSAGE:
                raise ProtocolError(f"more than {MAX_FDS_PER_MESSAGE} fds in one message "
                                    f"({len(fds)} so far, sent across its parts)")
            if not data:
                if remaining == size and not chunks and size == HEADER_SIZE:
                    raise PeerClosed()
                raise ProtocolError(f"connection closed mid-message ({size - remaining}/{size})")
            if not self._started:
                # From its first byte a message must be complete within the timeout.
                self._started = True
                self._deadline = self._loop.time() + self.timeout
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)

    async def receive(self) -> Message:
        """The next message. The first one must begin within the timeout of the connection;
        every message must be complete within the timeout from its first byte. Between
        messages a frontend may be idle as long as it likes."""
        self._started = False
        self._pending = None
        self._deadline = self._loop.time() + self.timeout if self._received == 0 else None
        fds: list[int] = []
        try:
            raw_header = await self._recv_exact(HEADER_SIZE, fds)
            header = MessageHeader.parse(raw_header)
            if header.flags & FLAG_VERSION_MASK != PROTOCOL_VERSION:
                raise ProtocolError(f"unsupported protocol version in flags {header.flags:#x}")
            if header.size > MAX_PAYLOAD_SIZE:
                raise ProtocolError(
                    f"request {header.request}: payload of {header.size} bytes exceeds "
                    f"{MAX_PAYLOAD_SIZE}"
                )
            self._pending = header
            payload = await self._recv_exact(header.size, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._received += 1
        return Message(header.request, header.flags, payload, fds)

    def send(self, request: int, payload: bytes, *, reply: bool = True, fds: Sequence[int] = ()) -> None:
        """Send one message; `fds` (the caller's, which it still closes) go with its first byte."""
        flags = PROTOCOL_VERSION | (FLAG_REPLY if reply else 0)
        data = MessageHeader.build({"request": request, "flags": flags, "size": len(payload)})
        # Replies are a few bytes: the socket buffer always has room, so a blocking send
        # is never needed; a peer that stopped reading is treated as gone.
        try:
            if fds:
                message = data + payload
                sent = socket.send_fds(self.sock, [message], list(fds))
                if sent < len(message):
                    self.sock.sendall(message[sent:])
                return
            self.sock.sendall(data + payload)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            raise PeerClosed() from None

    def close(self) -> None:
        self.sock.close()
