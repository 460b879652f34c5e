"""The vhost-user session state machine, independent of the device behind it.

A session owns what the frontend tells us (features, memory table, ring addresses, kick and
call fds) and decides when a queue may run. The device (devices/) owns the data path and
implements `DeviceBackend`; this module never imports a device.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import mmap
import os
import socket
import stat
from collections.abc import Callable
from typing import Literal, Protocol

from construct import ConstructError

from vhost_pv.protocol.channel import Message, MessageChannel, PeerClosed, ProtocolError
from vhost_pv.protocol.messages import (
    CONFIG_SPACE_HEADER_SIZE,
    CONFIG_SPACE_MAX,
    INFLIGHT_VERSION,
    MAX_MEMORY_REGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_FILE_INDEX_MASK,
    VRING_FILE_NOFD,
    ConfigSpace,
    InflightDescription,
    InflightRegionHeader,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    Request,
    U64Payload,
    VringAddress,
    VringState,
    inflight_area_size,
    inflight_queue_region_size,
)

log = logging.getLogger("vhost_pv.protocol")

# Features every device served here offers, on top of its own.
TRANSPORT_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
)
BASE_PROTOCOL_FEATURES = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)
MAX_QUEUE_SIZE = 1024

FdKind = Literal["eventfd", "memory"]
"""What a frontend's fd must be: a kick/call/err eventfd, or a guest memory file."""


def describe_fd(fd: int) -> str:
    """What an fd is, in words, for an error message."""
    try:
        mode = os.fstat(fd).st_mode
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"an fd that cannot be examined ({exc.strerror})"
    for test, what in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return f"{what} ({target})"
    return target  # anon_inode:[eventfd], anon_inode:[timerfd], ...


def _filesystem_type(st_dev: int) -> str | None:
    """The type of the mounted file system a device number belongs to (fuse.sshfs, tmpfs,
    ...), or None when it is not mounted in our namespace (memfd's internal mount)."""
    wanted = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 4 and fields[2] == wanted and "-" in fields:
                    return fields[fields.index("-") + 1]
    except OSError:
        pass
    return None


def check_frontend_fd(fd: int, kind: FdKind, request: str) -> None:
    """The one check of every fd a frontend hands us; raises ProtocolError naming the request
    and what the fd is.

    "eventfd" (kick, call, err; also what a device signals): it must be an eventfd, and it is
    made O_NONBLOCK, so neither the queue workers nor the event loop can ever block on it.
    O_NONBLOCK belongs to the open file description, shared with the frontend: QEMU creates
    its eventfds with EFD_NONBLOCK itself, so nothing changes for it, and a frontend that
    relies on blocking reads of its own eventfds is not one we can serve anyway.

    "memory" (SET_MEM_TABLE regions, the inflight area): it must be a regular file (memfd,
    /dev/shm, hugetlbfs). A pipe or socket does not map; a character device such as
    /dev/zero maps to memory the guest never sees; neither is guest memory.
    """
    if kind == "eventfd":
        what = describe_fd(fd)
        if what != "anon_inode:[eventfd]":
            raise ProtocolError(f"{request}: the fd is {what}, not an eventfd")
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except OSError as exc:
            raise ProtocolError(f"{request}: cannot make the eventfd non-blocking: {exc.strerror}") from None
        return
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ProtocolError(f"{request}: the memory fd cannot be examined: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(f"{request}: the memory fd is {describe_fd(fd)}, not a regular file")
    # A page fault in a FUSE file waits for the FUSE server, which may be the frontend itself:
    # it could hold a queue worker, and the stop that joins it, forever (no signal but a
    # fatal one ends that wait).
    fs_type = _filesystem_type(st.st_dev)
    if fs_type is not None and (fs_type == "fuse" or fs_type.startswith(("fuse.", "fuseblk"))):
        raise ProtocolError(f"{request}: the memory fd is a file on a {fs_type} file system, "
                            "which its server can stall")


def is_power_of_two(count: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th, ... of something a peer can repeat at will: enough to see
    it and how often, never enough to fill the disk."""
    return count > 0 and count & (count - 1) == 0


@dataclasses.dataclass(frozen=True)
class MemoryRegionSpec:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int


@dataclasses.dataclass(frozen=True)
class VringSetup:
    """Everything a device needs to run one queue."""

    index: int
    num: int
    base: int
    desc_user_addr: int
    avail_user_addr: int
    used_user_addr: int
    kick_fd: int
    call_fd: int
    event_idx: bool
    indirect: bool
    # The queue's region of the inflight area (address in this process, bytes), 0: none.
    inflight_addr: int = 0
    inflight_size: int = 0


class InflightArea:
    """The frontend's inflight area (SET_INFLIGHT_FD), mapped here: one region per queue.

    It lives in a memfd the frontend keeps across our restarts; the C data path records in it
    which requests it has taken and not completed, and takes them again after a crash."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> None:
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.region_size = inflight_queue_region_size(queue_size)
        self.map = mmap.mmap(
            fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset
        )
        # The C side gets a plain pointer; the buffer export is dropped at once so the map
        # can be closed later (after every queue using it has stopped).
        anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(anchor)
        del anchor

    def region(self, index: int) -> tuple[int, int]:
        return self.address + index * self.region_size, self.region_size

    def close(self) -> None:
        self.map.close()


def check_inflight_fd(fd: int, needed: int) -> None:
    """The inflight fd: a memory file (check_frontend_fd) at least `needed` bytes long and
    sealed against shrinking. Unlike guest memory, which runs under the SIGBUS guard, the
    area is also touched outside the workers' guarded passes, and QEMU hands back the memfd
    we made and sealed in GET_INFLIGHT_FD, so the seal costs a well-behaved frontend nothing."""
    check_frontend_fd(fd, "memory", "SET_INFLIGHT_FD")
    size = os.fstat(fd).st_size
    if size < needed:
        raise ProtocolError(f"SET_INFLIGHT_FD: file is {size} bytes, the area needs {needed}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolError("SET_INFLIGHT_FD: file is not sealed against shrinking (F_SEAL_SHRINK)")


class DeviceBackend(Protocol):
    """What a device provides to the protocol layer."""

    def device_features(self) -> int: ...

    def device_protocol_features(self) -> int: ...

    def max_queues(self) -> int: ...

    def get_config(self, offset: int, size: int) -> bytes: ...

    def set_config(self, offset: int, data: bytes) -> None: ...

    def set_memory(self, regions: list[MemoryRegionSpec]) -> None:
        """Map the regions (the fds stay the caller's). Raises ProtocolError if they do not."""

    def start_queue(self, setup: VringSetup) -> None:
        """Start serving a queue. Raises ProtocolError if its rings are not in memory."""

    def stop_queue(self, index: int) -> int:
        """Stop a queue and return its last_avail_idx."""

    def close(self) -> None: ...


@dataclasses.dataclass
class QueueState:
    num: int = 0
    base: int = 0
    addr: tuple[int, int, int] | None = None  # desc, avail, used user addresses
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = True
    running: bool = False

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class VhostUserSession:
    """Serves one frontend connection until it closes or misbehaves."""

    def __init__(self, channel: MessageChannel, backend: DeviceBackend, name: str) -> None:
        self.channel = channel
        self.backend = backend
        self.name = name
        # A device whose data path broke (guest memory gone, corrupt ring) ends the connection.
        register: Callable[[Callable[[str], None]], None] | None = getattr(
            backend, "set_failure_handler", None
        )
        if register is not None:
            register(self._device_failed)
        self.features = 0
        self.protocol_features = 0
        self.memory_mapped = False
        self.queues = [QueueState() for _ in range(backend.max_queues())]
        self.inflight: InflightArea | None = None
        self.messages = 0
        self.memory_tables = 0
        # While held (hold/release), no queue starts: the daemon settles the volume under us.
        self._held = False
        self._closed = False
        self._handlers: dict[int, Callable[[Message], bytes | tuple[bytes, int] | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._no_payload,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
        }
        # Requests whose answer is a reply of their own (REPLY_ACK does not apply).
        self._replying = {
            Request.GET_FEATURES,
            Request.GET_PROTOCOL_FEATURES,
            Request.GET_QUEUE_NUM,
            Request.GET_VRING_BASE,
            Request.GET_CONFIG,
            Request.GET_INFLIGHT_FD,
        }

    # -- main loop --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                message = await self.channel.receive()
                self.messages += 1
                try:
                    self._dispatch(message)
                finally:
                    message.close_fds()
        except PeerClosed:
            log.info("%s: frontend disconnected", self.name)
        except ProtocolError as exc:
            log.error("%s: protocol error, closing connection: %s", self.name, exc)
        finally:
            self.shutdown()

    def _dispatch(self, message: Message) -> None:
        handler = self._handlers.get(message.request)
        if message.request in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD) and not (
            self._offered_protocol_features() & (1 << ProtocolFeature.INFLIGHT_SHMFD)
        ):
            handler = None   # a device that does not track requests (virtio-fs)
        if handler is None:
            try:
                what = Request(message.request).name
            except ValueError:
                what = f"unknown request {message.request}"
            raise ProtocolError(f"{what} is not supported by this backend")
        name = Request(message.request).name
        try:
            reply = handler(message)
        except (ConstructError, ValueError) as exc:
            # construct's messages span lines; a log record must stay one line.
            detail = " ".join(str(exc).split())
            raise ProtocolError(f"{name}: malformed payload: {detail}") from None
        if isinstance(reply, tuple):
            payload, fd = reply
            try:
                self.channel.send(message.request, payload, fds=[fd])
            finally:
                os.close(fd)
        elif reply is not None:
            self.channel.send(message.request, reply)
        elif message.need_reply and self._negotiated(ProtocolFeature.REPLY_ACK):
            self.channel.send(message.request, U64Payload.build(0))

    def _device_failed(self, reason: str) -> None:
        """The device cannot serve this frontend any more: end the connection. Shutting the
        socket down ends run() (the next receive sees the close), which stops the queues and
        releases everything through shutdown()."""
        log.error("%s: %s; closing connection", self.name, reason)
        with contextlib.suppress(OSError):  # closed already
            self.channel.sock.shutdown(socket.SHUT_RDWR)

    def shutdown(self) -> None:
        """Stop every queue and release what the frontend gave us."""
        self._closed = True
        for index, queue in enumerate(self.queues):
            if queue.running:
                self.backend.stop_queue(index)
                queue.running = False
            queue.close_fds()
        self.backend.close()
        # Only now: the queues that used the inflight area have stopped.
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.channel.close()

    # -- helpers ----------------------------------------------------------------------------

    def _negotiated(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    @staticmethod
    def _expect(message: Message, size: int, fds: int = 0) -> None:
        name = Request(message.request).name
        if len(message.payload) != size:
            raise ProtocolError(f"{name}: payload is {len(message.payload)} bytes, expected {size}")
        if len(message.fds) != fds:
            raise ProtocolError(f"{name}: carries {len(message.fds)} fds, expected {fds}")

    def _queue(self, index: int, request: str) -> QueueState:
        if not 0 <= index < len(self.queues):
            raise ProtocolError(f"{request}: queue {index} does not exist ({len(self.queues)} queues)")
        return self.queues[index]

    def _offered_features(self) -> int:
        return TRANSPORT_FEATURES | self.backend.device_features()

    def _offered_protocol_features(self) -> int:
        return BASE_PROTOCOL_FEATURES | self.backend.device_protocol_features()

    def hold(self) -> None:
        """Stop every running queue (each worker finishes the requests it has in flight
        first) and start none until `release`; the frontend's messages are still served.
        What a queue was doing resumes from its last_avail_idx."""
        self._held = True
        for index in range(len(self.queues)):
            self._pause(index)

    def release(self) -> None:
        """Start again every queue that may run (those stopped by `hold`, and any the
        frontend set up meanwhile). A queue that cannot start ends the connection, as it
        would have when the frontend started it."""
        self._held = False
        if self._closed:
            return
        try:
            for index in range(len(self.queues)):
                self._maybe_start(index)
        except ProtocolError as exc:
            log.error("%s: protocol error, closing connection: %s", self.name, exc)
            # run() sees the end of the stream and shuts the session down as usual.
            with contextlib.suppress(OSError):
                self.channel.sock.shutdown(socket.SHUT_RDWR)

    def _maybe_start(self, index: int) -> None:
        queue = self.queues[index]
        if (
            self._held
            or self._closed
            or queue.running
            or not queue.enabled
            or queue.kick_fd < 0
            or queue.addr is None
            or queue.num == 0
            or not self.memory_mapped
        ):
            return
        desc, avail, used = queue.addr
        inflight_addr = inflight_size = 0
        if self.inflight is not None:
            if index >= self.inflight.num_queues or queue.num != self.inflight.queue_size:
                raise ProtocolError(
                    f"queue {index} (size {queue.num}) has no region in the inflight area "
                    f"({self.inflight.num_queues} queues of {self.inflight.queue_size})"
                )
            inflight_addr, inflight_size = self.inflight.region(index)
        self.backend.start_queue(
            VringSetup(
                index=index,
                num=queue.num,
                base=queue.base,
                desc_user_addr=desc,
                avail_user_addr=avail,
                used_user_addr=used,
                kick_fd=queue.kick_fd,
                call_fd=queue.call_fd,
                event_idx=bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX)),
                indirect=bool(self.features & (1 << VIRTIO_RING_F_INDIRECT_DESC)),
                inflight_addr=inflight_addr,
                inflight_size=inflight_size,
            )
        )
        queue.running = True
        log.debug("%s: queue %d started (num=%d base=%d)", self.name, index, queue.num, queue.base)

    def _pause(self, index: int) -> None:
        queue = self.queues[index]
        if queue.running:
            queue.base = self.backend.stop_queue(index)
            queue.running = False

    # -- handlers ---------------------------------------------------------------------------

    def _no_payload(self, message: Message) -> None:
        self._expect(message, 0)

    def _get_features(self, message: Message) -> bytes:
        self._expect(message, 0)
        return bytes(U64Payload.build(self._offered_features()))

    def _set_features(self, message: Message) -> None:
        self._expect(message, 8)
        features = U64Payload.parse(message.payload)
        extra = features & ~self._offered_features()
        if extra:
            raise ProtocolError(f"SET_FEATURES: acks features never offered: {extra:#x}")
        self.features = features

    def _reset_owner(self, message: Message) -> None:
        self._expect(message, 0)
        for index, queue in enumerate(self.queues):
            self._pause(index)
            queue.close_fds()
            self.queues[index] = QueueState()
        self.features = 0

    def _get_protocol_features(self, message: Message) -> bytes:
        self._expect(message, 0)
        return bytes(U64Payload.build(self._offered_protocol_features()))

    def _set_protocol_features(self, message: Message) -> None:
        self._expect(message, 8)
        features = U64Payload.parse(message.payload)
        extra = features & ~self._offered_protocol_features()
        if extra:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES: acks features never offered: {extra:#x}")
        self.protocol_features = features

    def _get_queue_num(self, message: Message) -> bytes:
        self._expect(message, 0)
        return bytes(U64Payload.build(len(self.queues)))

    def _set_mem_table(self, message: Message) -> None:
        if len(message.payload) < 8:
            raise ProtocolError(f"SET_MEM_TABLE: payload is {len(message.payload)} bytes")
        count = int.from_bytes(message.payload[:4], "little")
        if not 1 <= count <= MAX_MEMORY_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE: {count} regions (1..{MAX_MEMORY_REGIONS} allowed)")
        self._expect(message, 8 + count * MemoryRegion.sizeof(), fds=count)
        for fd in message.fds:
            check_frontend_fd(fd, "memory", "SET_MEM_TABLE")
        table = MemoryTable.parse(message.payload)
        regions = [
            MemoryRegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
            for r, fd in zip(table.regions, message.fds, strict=True)
        ]
        # The table can change while rings run (memory hot-plug): pause, remap, resume.
        running = [i for i, q in enumerate(self.queues) if q.running]
        for index in running:
            self._pause(index)
        self.memory_mapped = False
        self.backend.set_memory(regions)
        self.memory_mapped = True
        self.memory_tables += 1
        # The 1st, 2nd, 4th, ... at INFO: a frontend may send tables without end.
        log.log(
            logging.INFO if is_power_of_two(self.memory_tables) else logging.DEBUG,
            "%s: memory table #%d: %s",
            self.name,
            self.memory_tables,
            ", ".join(f"{r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in regions),
        )
        # Every queue that was only waiting for memory starts too: a frontend may set its
        # rings up before the memory table (the spec does not order them).
        for index in range(len(self.queues)):
            self._maybe_start(index)

    def _set_vring_num(self, message: Message) -> None:
        self._expect(message, VringState.sizeof())
        state = VringState.parse(message.payload)
        queue = self._queue(state.index, "SET_VRING_NUM")
        num = state.num
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise ProtocolError(f"SET_VRING_NUM: size {num} is not a power of two <= {MAX_QUEUE_SIZE}")
        if queue.running:
            raise ProtocolError(f"SET_VRING_NUM: queue {state.index} is running")
        queue.num = num

    def _set_vring_addr(self, message: Message) -> None:
        self._expect(message, VringAddress.sizeof())
        addr = VringAddress.parse(message.payload)
        queue = self._queue(addr.index, "SET_VRING_ADDR")
        if queue.running:
            raise ProtocolError(f"SET_VRING_ADDR: queue {addr.index} is running")
        queue.addr = (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)

    def _set_vring_base(self, message: Message) -> None:
        self._expect(message, VringState.sizeof())
        state = VringState.parse(message.payload)
        queue = self._queue(state.index, "SET_VRING_BASE")
        if queue.running:
            raise ProtocolError(f"SET_VRING_BASE: queue {state.index} is running")
        if state.num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: base {state.num} does not fit 16 bits")
        queue.base = state.num

    def _get_vring_base(self, message: Message) -> bytes:
        self._expect(message, VringState.sizeof())
        state = VringState.parse(message.payload)
        queue = self._queue(state.index, "GET_VRING_BASE")
        # GET_VRING_BASE stops the ring: the frontend will send a new kick fd to restart it.
        self._pause(state.index)
        queue.close_fds()
        return bytes(VringState.build({"index": state.index, "num": queue.base}))

    def _vring_file(self, message: Message, request: str) -> tuple[QueueState, int, int]:
        self._expect(message, 8, fds=len(message.fds))
        word = U64Payload.parse(message.payload)
        index = word & VRING_FILE_INDEX_MASK
        nofd = bool(word & VRING_FILE_NOFD)
        if len(message.fds) != (0 if nofd else 1):
            raise ProtocolError(
                f"{request}: carries {len(message.fds)} fds but the no-fd flag is {nofd}"
            )
        queue = self._queue(index, request)
        if not nofd:
            check_frontend_fd(message.fds[0], "eventfd", request)
        fd = -1 if nofd else message.take_fds()[0]
        return queue, index, fd

    def _set_vring_kick(self, message: Message) -> None:
        queue, index, fd = self._vring_file(message, "SET_VRING_KICK")
        if fd < 0:
            raise ProtocolError("SET_VRING_KICK: polling mode (no kick fd) is not supported")
        self._pause(index)
        if queue.kick_fd >= 0:
            os.close(queue.kick_fd)
        queue.kick_fd = fd
        self._maybe_start(index)

    def _set_vring_call(self, message: Message) -> None:
        queue, index, fd = self._vring_file(message, "SET_VRING_CALL")
        # The worker writes to the call fd: swap it only while the worker is stopped.
        was_running = queue.running
        self._pause(index)
        if queue.call_fd >= 0:
            os.close(queue.call_fd)
        queue.call_fd = fd
        if was_running:
            log.debug("%s: queue %d call fd replaced while running", self.name, index)
            self._maybe_start(index)

    def _set_vring_err(self, message: Message) -> None:
        queue, _, fd = self._vring_file(message, "SET_VRING_ERR")
        if queue.err_fd >= 0:
            os.close(queue.err_fd)
        queue.err_fd = fd

    def _set_vring_enable(self, message: Message) -> None:
        self._expect(message, VringState.sizeof())
        state = VringState.parse(message.payload)
        queue = self._queue(state.index, "SET_VRING_ENABLE")
        if state.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: value {state.num} is not 0 or 1")
        queue.enabled = bool(state.num)
        if queue.enabled:
            self._maybe_start(state.index)
        else:
            self._pause(state.index)

    def _parse_inflight(self, message: Message, request: str, fds: int) -> tuple[int, int, int, int]:
        self._expect(message, InflightDescription.sizeof(), fds=fds)
        desc = InflightDescription.parse(message.payload)
        if not 1 <= desc.num_queues <= len(self.queues):
            raise ProtocolError(f"{request}: {desc.num_queues} queues (1..{len(self.queues)} allowed)")
        size = desc.queue_size
        if size == 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise ProtocolError(f"{request}: queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        return desc.mmap_size, desc.mmap_offset, desc.num_queues, size

    def _get_inflight_fd(self, message: Message) -> tuple[bytes, int]:
        _, _, num_queues, queue_size = self._parse_inflight(message, "GET_INFLIGHT_FD", 0)
        size = inflight_area_size(num_queues, queue_size)
        fd = os.memfd_create("vhost-pv-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Initialised here (version, desc_num), so an area is valid from its creation on.
            region = inflight_queue_region_size(queue_size)
            header = InflightRegionHeader.build(
                {"features": 0, "version": INFLIGHT_VERSION, "desc_num": queue_size,
                 "last_batch_head": 0, "used_idx": 0}
            )
            for index in range(num_queues):
                os.pwrite(fd, header, index * region)
            # The area must keep its size for as long as anyone maps it (no SIGBUS).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        log.info("%s: inflight area: %d queues of %d (%d bytes)", self.name, num_queues, queue_size, size)
        reply = InflightDescription.build(
            {"mmap_size": size, "mmap_offset": 0, "num_queues": num_queues, "queue_size": queue_size}
        )
        return bytes(reply), fd

    def _set_inflight_fd(self, message: Message) -> None:
        mmap_size, mmap_offset, num_queues, queue_size = self._parse_inflight(message, "SET_INFLIGHT_FD", 1)
        needed = inflight_area_size(num_queues, queue_size)
        if mmap_size != needed:
            raise ProtocolError(
                f"SET_INFLIGHT_FD: mmap_size {mmap_size}, {num_queues} queues of {queue_size} need {needed}"
            )
        if mmap_offset % mmap.ALLOCATIONGRANULARITY or mmap_offset > 1 << 40:
            raise ProtocolError(f"SET_INFLIGHT_FD: mmap_offset {mmap_offset:#x} is not a page-aligned offset")
        if any(q.running for q in self.queues):
            raise ProtocolError("SET_INFLIGHT_FD: queues are running")
        fd = message.fds[0]
        check_inflight_fd(fd, mmap_offset + mmap_size)
        try:
            area = InflightArea(fd, mmap_size, mmap_offset, num_queues, queue_size)
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"SET_INFLIGHT_FD: cannot map the area: {exc}") from None
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area
        log.info("%s: inflight area set: %d queues of %d", self.name, num_queues, queue_size)

    def _parse_config(self, message: Message, request: str) -> tuple[int, int, bytes]:
        if len(message.payload) < CONFIG_SPACE_HEADER_SIZE:
            raise ProtocolError(f"{request}: payload is {len(message.payload)} bytes")
        config = ConfigSpace.parse(message.payload)
        if config.size > CONFIG_SPACE_MAX or config.offset + config.size > CONFIG_SPACE_MAX:
            raise ProtocolError(f"{request}: offset {config.offset} size {config.size} out of range")
        self._expect(message, CONFIG_SPACE_HEADER_SIZE + config.size)
        return config.offset, config.size, bytes(config.payload)

    def _get_config(self, message: Message) -> bytes:
        offset, size, _ = self._parse_config(message, "GET_CONFIG")
        data = self.backend.get_config(offset, size)
        return bytes(ConfigSpace.build({"offset": offset, "size": size, "flags": 0, "payload": data}))

    def _set_config(self, message: Message) -> None:
        offset, _, data = self._parse_config(message, "SET_CONFIG")
        self.backend.set_config(offset, data)

    # -- introspection ----------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        return {
            "features": f"{self.features:#x}",
            "protocol_features": f"{self.protocol_features:#x}",
            "messages": self.messages,
            "memory_mapped": self.memory_mapped,
            "queues_running": [i for i, q in enumerate(self.queues) if q.running],
        }
