"""A blocking vhost-user frontend (the side QEMU plays) over one Unix socket connection.

Used by the load generator (vhost_pv_tools.loadgen) and, through tests/support/frontend.py, by the
protocol tests. It speaks the messages declared in vhost_pv.protocol.messages and knows
nothing of guest memory layouts: callers hand it regions and ring addresses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from vhost_pv.protocol.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    VRING_FILE_NOFD,
    ConfigSpace,
    InflightDescription,
    MemoryTable,
    MessageHeader,
    ProtocolFeature,
    Request,
    U64Payload,
    VringAddress,
    VringState,
)
from vhost_pv.protocol.session import MemoryRegionSpec


class FrontendError(Exception):
    """The backend answered something unexpected, or closed the connection."""


@dataclasses.dataclass
class QueueFds:
    """The frontend's ends of one queue's eventfds."""

    kick: int
    call: int

    def close(self) -> None:
        for fd in (self.kick, self.call):
            with contextlib.suppress(OSError):
                os.close(fd)


class VhostUserFrontend:
    """A blocking vhost-user frontend on one connection."""

    def __init__(self, socket_path: Path | str, *, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(socket_path))
        except OSError:
            self.sock.close()
            raise
        self.reply_ack = False
        self.queues: dict[int, QueueFds] = {}

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- raw messages -----------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        flags: int | None = None,
        size: int | None = None,
        need_reply: bool = False,
    ) -> None:
        """Send one message as given: `flags` and `size` override the header fields."""
        if flags is None:
            flags = PROTOCOL_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        header = MessageHeader.build(
            {"request": request, "flags": flags, "size": len(payload) if size is None else size}
        )
        data = bytes(header) + payload
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            if sent != len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def _recv_exact(self, size: int) -> bytes:
        chunks = []
        while size > 0:
            chunk = self.sock.recv(size)
            if not chunk:
                raise FrontendError("the backend closed the connection")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def receive(self, request: int) -> bytes:
        """Read the reply to `request` and return its payload."""
        header = MessageHeader.parse(self._recv_exact(HEADER_SIZE))
        if header.request != request:
            raise FrontendError(f"reply to request {header.request}, expected {request}")
        if not header.flags & FLAG_REPLY or header.flags & 0x3 != PROTOCOL_VERSION:
            raise FrontendError(f"reply flags {header.flags:#x}")
        return self._recv_exact(header.size)

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """A request answered by a reply of its own (GET_*)."""
        self.send(request, payload, fds)
        return self.receive(request)

    def command(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """A request without a reply of its own: with REPLY_ACK, wait for the ack."""
        self.send(request, payload, fds, need_reply=self.reply_ack)
        if self.reply_ack:
            ack = U64Payload.parse(self.receive(request))
            if ack != 0:
                raise FrontendError(f"request {Request(request).name} failed: ack {ack}")

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the backend has closed the connection (discarding anything it sent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                if not self.sock.recv(4096):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
        return False

    # -- negotiation ------------------------------------------------------------------------

    def get_features(self) -> int:
        return int(U64Payload.parse(self.call(Request.GET_FEATURES)))

    def set_features(self, features: int) -> None:
        self.command(Request.SET_FEATURES, bytes(U64Payload.build(features)))

    def get_protocol_features(self) -> int:
        return int(U64Payload.parse(self.call(Request.GET_PROTOCOL_FEATURES)))

    def set_protocol_features(self, features: int) -> None:
        # Acks apply from the next message on, as in QEMU.
        self.send(Request.SET_PROTOCOL_FEATURES, bytes(U64Payload.build(features)))
        self.reply_ack = bool(features & (1 << ProtocolFeature.REPLY_ACK))

    def set_owner(self) -> None:
        self.command(Request.SET_OWNER)

    def get_queue_num(self) -> int:
        return int(U64Payload.parse(self.call(Request.GET_QUEUE_NUM)))

    def get_config(self, size: int = 60, offset: int = 0) -> bytes:
        payload = ConfigSpace.build({"offset": offset, "size": size, "flags": 0, "payload": bytes(size)})
        reply = self.call(Request.GET_CONFIG, bytes(payload))
        if len(reply) < 12:
            # libvhost-user answers a config space it cannot give with an empty payload.
            raise FrontendError(f"GET_CONFIG refused ({len(reply)}-byte reply)")
        return bytes(ConfigSpace.parse(reply).payload)

    def negotiate(self, features: int | None = None) -> int:
        """GET/SET_FEATURES, protocol features (with REPLY_ACK), SET_OWNER. Returns the
        features acked (all offered unless given)."""
        offered = self.get_features()
        acked = offered if features is None else features
        self.set_features(acked)
        protocol = self.get_protocol_features()
        self.set_protocol_features(protocol)
        self.set_owner()
        return acked

    # -- memory and queues ------------------------------------------------------------------

    def set_mem_table(self, regions: Sequence[MemoryRegionSpec]) -> None:
        """SET_MEM_TABLE with one fd per region (the fds stay the caller's)."""
        table = MemoryTable.build(
            {
                "num_regions": len(regions),
                "regions": [
                    {
                        "guest_phys_addr": r.guest_phys_addr,
                        "memory_size": r.memory_size,
                        "userspace_addr": r.userspace_addr,
                        "mmap_offset": r.mmap_offset,
                    }
                    for r in regions
                ],
            }
        )
        self.command(Request.SET_MEM_TABLE, bytes(table), [r.fd for r in regions])

    def setup_vring(
        self,
        index: int,
        num: int,
        desc_user_addr: int,
        avail_user_addr: int,
        used_user_addr: int,
        *,
        kick: int | None = None,
        call: int | None = None,
        base: int = 0,
        enable: bool = True,
    ) -> QueueFds:
        """SET_VRING_NUM, ADDR, BASE, KICK, CALL and (with `enable`) ENABLE. The addresses
        are the frontend's userspace addresses, as in SET_MEM_TABLE's userspace_addr. Creates
        the eventfds (non-blocking) unless given; the frontend keeps (and closes) its copies."""
        fds = QueueFds(
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if kick is None else kick,
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if call is None else call,
        )
        self.queues[index] = fds
        self.command(Request.SET_VRING_NUM, bytes(VringState.build({"index": index, "num": num})))
        address = VringAddress.build(
            {
                "index": index,
                "flags": 0,
                "desc_user_addr": desc_user_addr,
                "used_user_addr": used_user_addr,
                "avail_user_addr": avail_user_addr,
                "log_guest_addr": 0,
            }
        )
        self.command(Request.SET_VRING_ADDR, bytes(address))
        self.command(Request.SET_VRING_BASE, bytes(VringState.build({"index": index, "num": base})))
        self.command(Request.SET_VRING_KICK, bytes(U64Payload.build(index)), [fds.kick])
        self.command(Request.SET_VRING_CALL, bytes(U64Payload.build(index)), [fds.call])
        if enable:
            self.set_vring_enable(index, True)
        return fds

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.command(Request.SET_VRING_ENABLE, bytes(VringState.build({"index": index, "num": int(enable)})))

    def set_vring_call_nofd(self, index: int) -> None:
        self.command(Request.SET_VRING_CALL, bytes(U64Payload.build(index | VRING_FILE_NOFD)))

    def get_vring_base(self, index: int) -> int:
        """Stops the queue in the backend; returns its last_avail_idx."""
        state = bytes(VringState.build({"index": index, "num": 0}))
        reply = VringState.parse(self.call(Request.GET_VRING_BASE, state))
        return int(reply.num)

    # -- inflight I/O tracking (INFLIGHT_SHMFD) ---------------------------------------------

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int, int]:
        """GET_INFLIGHT_FD; returns (fd, mmap_size, mmap_offset). The fd is the caller's."""
        payload = InflightDescription.build(
            {"mmap_size": 0, "mmap_offset": 0, "num_queues": num_queues, "queue_size": queue_size}
        )
        self.send(Request.GET_INFLIGHT_FD, bytes(payload))
        # The fd rides on the reply's first bytes: read the header with recv_fds.
        raw, fds, _, _ = socket.recv_fds(self.sock, HEADER_SIZE, 1)
        try:
            if len(raw) < HEADER_SIZE:
                raw += self._recv_exact(HEADER_SIZE - len(raw))
            header = MessageHeader.parse(raw)
            if header.request != Request.GET_INFLIGHT_FD or not header.flags & FLAG_REPLY:
                raise FrontendError(f"reply to request {header.request} flags {header.flags:#x}")
            reply = InflightDescription.parse(self._recv_exact(header.size))
            if len(fds) != 1:
                raise FrontendError(f"GET_INFLIGHT_FD reply carries {len(fds)} fds")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds[0], int(reply.mmap_size), int(reply.mmap_offset)

    def set_inflight_fd(
        self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int
    ) -> None:
        """SET_INFLIGHT_FD (the fd stays the caller's)."""
        payload = InflightDescription.build(
            {"mmap_size": mmap_size, "mmap_offset": mmap_offset, "num_queues": num_queues,
             "queue_size": queue_size}
        )
        self.command(Request.SET_INFLIGHT_FD, bytes(payload), [fd])

    def kick(self, index: int) -> None:
        os.eventfd_write(self.queues[index].kick, 1)

    def close(self) -> None:
        self.sock.close()
        for fds in self.queues.values():
            fds.close()
        self.queues.clear()
