"""What one fuzzing connection does: a mutated handshake, or a valid set-up and random rings.

Every function takes its own random.Random, so a connection replays from its seed alone.
The peer is hostile on purpose; anything the daemon answers (or not) is fine here, as
long as the health checks after the connection pass (fuzz/runner.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import select
import socket
import struct
import time
from pathlib import Path

from construct import ConstructError

from fuzz.guest import (
    BLK_HEADER_SIZE,
    BLK_TYPES,
    DESC_SIZE,
    SECTOR,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestMemory,
    SplitRing,
    blk_header,
    desc_table,
)
from vhost_pv.protocol.frontend import FrontendError, VhostUserFrontend
from vhost_pv.protocol.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    ConfigSpace,
    MemoryTable,
    MessageHeader,
    ProtocolFeature,
    Request,
    U64Payload,
    VringAddress,
    VringState,
)

CONNECTION_ERRORS = (FrontendError, OSError, ConstructError, TimeoutError, ValueError)
"""What a connection may end with: the daemon closed it, refused, or did not answer."""

MEMORY_SIZE = 1 << 20
INTERESTING_U64 = (0, 1, 0x7F, 0x80, 0xFF, 0xFFF, 0x1000, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000,
                   0xFFFF_FFFF, 1 << 32, 1 << 47, (1 << 63) - 1, 1 << 63, (1 << 64) - 4096, (1 << 64) - 1)
INTERESTING_LEN = (0, 1, 15, 16, 511, 512, 4096, 65536, 1 << 20, 0x7FFF_FFFF, 0xFFFF_FFFF)


@dataclasses.dataclass
class Stats:
    messages: int = 0
    kicks: int = 0
    descriptors: int = 0


class FdKit:
    """File descriptors of every kind a frontend could pass (most of them wrong somewhere)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._fds: list[int] = []

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def memfd(self, size: int = MEMORY_SIZE) -> int:
        fd = self._keep(os.memfd_create("vhost-pv-fuzz", os.MFD_CLOEXEC))
        os.ftruncate(fd, size)
        return fd

    def eventfd(self) -> int:
        return self._keep(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))

    def any(self, rng: random.Random) -> int:
        kind = rng.randrange(11)
        if kind == 0:
            return self.memfd(rng.choice((0, 1, 4096, MEMORY_SIZE)))
        if kind == 1:
            return self.eventfd()
        if kind in (2, 3):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            self._keep(read_end)
            self._keep(write_end)
            return read_end if kind == 2 else write_end
        if kind == 4:
            return self._keep(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        if kind == 5:
            return self._keep(os.open("/dev/zero", os.O_RDWR | os.O_CLOEXEC))
        if kind == 6:
            return self._keep(os.open(self.scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        if kind == 7:
            left, right = socket.socketpair()
            self._keep(right.detach())
            return self._keep(left.detach())
        if kind == 8:
            return self._keep(os.open(self.scratch, os.O_PATH | os.O_CLOEXEC))
        if kind == 9:
            path = self.scratch / "plain-file"
            fd = self._keep(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.ftruncate(fd, rng.choice((0, 4096, MEMORY_SIZE)))
            return fd
        return self.memfd()

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


@dataclasses.dataclass
class Message:
    request: int
    payload: bytes = b""
    fds: list[int] = dataclasses.field(default_factory=list)
    flags: int | None = None
    size: int | None = None
    cut: int | None = None
    """Send only this many bytes of header + payload, then close: a message cut short."""


def _u64(value: int) -> bytes:
    return bytes(U64Payload.build(value))


def _state(index: int, num: int) -> bytes:
    return bytes(VringState.build({"index": index & 0xFFFFFFFF, "num": num & 0xFFFFFFFF}))


def _table(memory: GuestMemory, fd: int, count: int = 1) -> bytes:
    region = {"guest_phys_addr": memory.guest_phys_addr, "memory_size": memory.size,
              "userspace_addr": memory.userspace_addr, "mmap_offset": 0}
    return bytes(MemoryTable.build({"num_regions": count, "regions": [region] * count}))


def valid_sequence(kit: FdKit, memory: GuestMemory, ring: SplitRing) -> list[Message]:
    """What QEMU sends to set up one queue, message by message."""
    features = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
    protocol = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
    address = VringAddress.build({
        "index": 0, "flags": 0, "desc_user_addr": memory.uaddr(ring.desc_addr),
        "used_user_addr": memory.uaddr(ring.used_addr), "avail_user_addr": memory.uaddr(ring.avail_addr),
        "log_guest_addr": 0,
    })
    config = ConfigSpace.build({"offset": 0, "size": 60, "flags": 0, "payload": bytes(60)})
    return [
        Message(Request.GET_FEATURES),
        Message(Request.SET_FEATURES, _u64(features)),
        Message(Request.GET_PROTOCOL_FEATURES),
        Message(Request.SET_PROTOCOL_FEATURES, _u64(protocol)),
        Message(Request.SET_OWNER),
        Message(Request.GET_QUEUE_NUM),
        Message(Request.GET_CONFIG, bytes(config)),
        Message(Request.SET_MEM_TABLE, _table(memory, memory.fd), [memory.fd]),
        Message(Request.SET_VRING_NUM, _state(0, ring.size)),
        Message(Request.SET_VRING_ADDR, bytes(address)),
        Message(Request.SET_VRING_BASE, _state(0, 0)),
        Message(Request.SET_VRING_KICK, _u64(0), [kit.eventfd()]),
        Message(Request.SET_VRING_CALL, _u64(0), [kit.eventfd()]),
        Message(Request.SET_VRING_ENABLE, _state(0, 1)),
        Message(Request.GET_VRING_BASE, _state(0, 0)),
    ]


def _poke(rng: random.Random, payload: bytes) -> bytes:
    """Overwrite one aligned 1/2/4/8-byte field of a payload with an interesting value."""
    if not payload:
        return payload
    width = rng.choice((1, 2, 4, 8))
    width = min(width, len(payload))
    offset = rng.randrange(0, len(payload) - width + 1)
    offset -= offset % width
    value = rng.choice(INTERESTING_U64) if rng.random() < 0.7 else rng.getrandbits(64)
    field = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return payload[:offset] + field + payload[offset + width:]


def mutate(rng: random.Random, messages: list[Message], kit: FdKit) -> str:
    """Damage the sequence in one way; returns what was done (for the report)."""
    what = rng.choice(("request", "flags", "size", "payload", "field", "field", "field", "fds", "fd-kind",
                       "cut", "dup", "swap", "insert", "table"))
    message = rng.choice(messages)
    if what == "request":
        message.request = rng.choice((0, 41, 42, 63, 64, 255, 0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32),
                                      int(rng.choice(list(Request)))))
    elif what == "flags":
        message.flags = rng.choice((0, 2, 3, PROTOCOL_VERSION | FLAG_REPLY,
                                    PROTOCOL_VERSION | FLAG_NEED_REPLY, rng.getrandbits(32)))
    elif what == "size":
        message.size = rng.choice((len(message.payload) + rng.randint(1, 64),
                                   max(0, len(message.payload) - 1),
                                   0, 4095, 4096, 4097, 0xFFFFFFFF, rng.getrandbits(32)))
    elif what == "payload":
        message.payload = rng.choice((b"", message.payload[: rng.randint(0, len(message.payload))],
                                      message.payload + rng.randbytes(rng.randint(1, 64)),
                                      rng.randbytes(len(message.payload)),
                                      rng.randbytes(rng.randint(0, 300))))
    elif what == "field":
        for _ in range(rng.randint(1, 3)):
            message.payload = _poke(rng, message.payload)
    elif what == "fds":
        message.fds = rng.choice(([], [kit.any(rng) for _ in range(rng.randint(1, 12))],
                                  [*message.fds, kit.any(rng)]))
    elif what == "fd-kind":
        message.fds = [kit.any(rng) for _ in message.fds or [0]]
    elif what == "cut":
        message.cut = rng.randint(0, HEADER_SIZE + len(message.payload))
    elif what == "dup":
        messages.insert(messages.index(message), dataclasses.replace(message))
    elif what == "swap":
        i, j = rng.randrange(len(messages)), rng.randrange(len(messages))
        messages[i], messages[j] = messages[j], messages[i]
    elif what == "insert":
        request = rng.choice(list(Request))
        messages.insert(rng.randrange(len(messages) + 1),
                        Message(int(request), rng.randbytes(rng.choice((0, 8, 40, 72, 264))),
                                [kit.any(rng)] if rng.random() < 0.3 else []))
    else:  # a memory table with many regions, or regions that do not fit their fds
        count = rng.choice((0, 1, 2, 8, 9, 32, 255))
        memory_size = rng.choice((*INTERESTING_LEN, MEMORY_SIZE, MEMORY_SIZE * 2))
        region = {"guest_phys_addr": rng.choice(INTERESTING_U64), "memory_size": memory_size,
                  "userspace_addr": rng.choice(INTERESTING_U64),
                  "mmap_offset": rng.choice(INTERESTING_U64[:8])}
        message.request = Request.SET_MEM_TABLE
        message.payload = bytes(MemoryTable.build({"num_regions": count, "regions": [region] * count}))
        message.fds = [kit.memfd(rng.choice((0, 4096, MEMORY_SIZE))) for _ in range(min(count, 10))]
    return what


def _send(conn: VhostUserFrontend, message: Message) -> bool:
    """Send one message as given; False once the connection was closed on purpose."""
    if message.cut is not None:
        header = MessageHeader.build({"request": message.request & 0xFFFFFFFF,
                                      "flags": PROTOCOL_VERSION if message.flags is None else message.flags,
                                      "size": len(message.payload) if message.size is None else message.size})
        data = (bytes(header) + message.payload)[: message.cut]
        if data:
            socket.send_fds(conn.sock, [data], message.fds) if message.fds else conn.sock.sendall(data)
        conn.sock.shutdown(socket.SHUT_WR)
        return False
    conn.send(message.request & 0xFFFFFFFF, message.payload, message.fds, flags=message.flags,
              size=None if message.size is None else message.size & 0xFFFFFFFF)
    return True


def _drain(conn: VhostUserFrontend, wait: float) -> None:
    """Read (and drop) whatever the daemon answered, so it never blocks on a full socket."""
    deadline = time.monotonic() + wait
    while True:
        ready, _, _ = select.select([conn.sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return
        if not conn.sock.recv(65536):
            raise FrontendError("closed")


def handshake(rng: random.Random, socket_path: Path, kit: FdKit, stats: Stats) -> str:
    """A QEMU-like set-up sequence with one to four mutations."""
    memory = GuestMemory(MEMORY_SIZE)
    try:
        ring = SplitRing(memory, rng.choice((1, 16, 128, 256)))
        messages = valid_sequence(kit, memory, ring)
        messages = messages[: rng.randint(1, len(messages))]
        done = [mutate(rng, messages, kit) for _ in range(rng.randint(1, 4))]
        with VhostUserFrontend(socket_path, timeout=2.0) as conn:
            for message in messages:
                stats.messages += 1
                if not _send(conn, message):
                    break
                _drain(conn, 0.002)
            _drain(conn, 0.02)
        return "handshake:" + ",".join(done)
    finally:
        memory.close()


def _buffer(rng: random.Random, memory: GuestMemory, ring: SplitRing, capacity: int) -> tuple[int, int]:
    """(address, length) of a data buffer: mostly in guest memory, sometimes anywhere."""
    choice = rng.random()
    length = rng.choice((SECTOR, 4096, 8192, 65536)) if choice < 0.6 else rng.choice(INTERESTING_LEN)
    if choice < 0.7:
        return memory.alloc(min(length, 65536), SECTOR), length
    if choice < 0.8:  # straddles the end of guest memory, or is the ring itself
        return rng.choice((memory.end - rng.randint(1, 4096), ring.desc_addr, ring.used_addr)), length
    return rng.choice((*INTERESTING_U64, memory.end, memory.guest_phys_addr - 1)), length


def _chain(rng: random.Random, memory: GuestMemory, ring: SplitRing, capacity: int,
           stats: Stats) -> list[tuple[int, int, int]]:
    """A virtio-blk request as (addr, len, flags) descriptors: header, data, status, each
    of them possibly wrong (half the chains are well-formed, so requests reach the I/O)."""
    if rng.random() < 0.5:
        return _sane_chain(rng, memory, capacity, stats)
    sectors = capacity // SECTOR
    req_type = rng.choice(BLK_TYPES) if rng.random() < 0.85 else rng.getrandbits(32)
    sector = rng.randrange(max(1, sectors))
    if rng.random() < 0.4:  # the edges of the disk, and far beyond
        sector = rng.choice((0, 1, sectors - 1, sectors, sectors + 1, (1 << 63) // SECTOR,
                             rng.getrandbits(64)))
    header = blk_header(req_type, sector)
    if req_type in (11, 13) and rng.random() < 0.7:  # discard / write zeroes: one segment
        header += struct.pack("<QII", rng.choice((0, sectors - 8, sectors, rng.getrandbits(64))),
                              rng.choice((0, 1, 8, 0xFFFFFFFF)), rng.choice((0, 1, rng.getrandbits(32))))
    header_addr = memory.alloc(len(header))
    memory.write(header_addr, header)
    header_len = len(header)
    if rng.random() < 0.2:
        header_len = rng.choice((BLK_HEADER_SIZE, len(header), 0, 8, 15, 4096))
    descs = [(header_addr, header_len, VRING_DESC_F_WRITE if rng.random() < 0.05 else 0)]
    writable = req_type == 0 or req_type == 8
    for _ in range(rng.choice((0, 1, 1, 2, 3, 8))):
        addr, length = _buffer(rng, memory, ring, capacity)
        flip = rng.random() < 0.1
        descs.append((addr, length, VRING_DESC_F_WRITE if writable != flip else 0))
    status = memory.alloc(1, 1)
    memory.write(status, b"\xff")
    descs.append((status, rng.choice((1, 1, 1, 0, 2)), VRING_DESC_F_WRITE if rng.random() < 0.9 else 0))
    stats.descriptors += len(descs)
    return descs


def _sane_chain(rng: random.Random, memory: GuestMemory, capacity: int,
                stats: Stats) -> list[tuple[int, int, int]]:
    """A well-formed read, write, flush or get-id inside the disk, its data in 1-3 pieces."""
    req_type = rng.choice((0, 0, 1, 1, 4, 8))
    length = SECTOR * rng.randint(1, 16) if req_type in (0, 1) else (20 if req_type == 8 else 0)
    sector = rng.randrange(capacity // SECTOR - length // SECTOR)
    header = memory.alloc(BLK_HEADER_SIZE)
    memory.write(header, blk_header(req_type, sector))
    descs = [(header, BLK_HEADER_SIZE, 0)]
    if length:
        data = memory.alloc(length, SECTOR)
        flags = VRING_DESC_F_WRITE if req_type != 1 else 0
        cuts = sorted(rng.sample(range(1, length), min(rng.randint(0, 2), length - 1)))
        for start, end in zip([0, *cuts], [*cuts, length], strict=True):
            descs.append((data + start, end - start, flags))
    status = memory.alloc(1, 1)
    descs.append((status, 1, VRING_DESC_F_WRITE))
    stats.descriptors += len(descs)
    return descs


def _place(rng: random.Random, memory: GuestMemory, ring: SplitRing, descs: list[tuple[int, int, int]],
           slot: int) -> tuple[int, int]:
    """Write a chain into the ring (directly, or through an indirect table); returns the head
    and the next free slot. Sometimes the links are wrong: loops, out-of-range next."""
    size = ring.size
    if rng.random() < 0.3:
        entries = []
        for i, (addr, length, flags) in enumerate(descs):
            last = i + 1 == len(descs)
            next_ = i + 1 if not last else 0
            if rng.random() < 0.05:
                next_ = rng.choice((i, 0, len(descs) + 5, 0xFFFF))
                flags |= VRING_DESC_F_NEXT
            if rng.random() < 0.03:
                flags |= VRING_DESC_F_INDIRECT  # nested indirect: not allowed
            entries.append((addr, length, flags | (0 if last else VRING_DESC_F_NEXT), next_))
        table = desc_table(entries)
        table_addr = memory.alloc(len(table))
        memory.write(table_addr, table)
        table_len = len(table)
        if rng.random() < 0.15:
            table_len = rng.choice((0, 8, len(table) + 8, len(table) - 1, DESC_SIZE * 70000, 0xFFFFFFF0))
        if rng.random() < 0.05:
            table_addr = rng.choice(INTERESTING_U64)
        flags = VRING_DESC_F_INDIRECT | (VRING_DESC_F_NEXT if rng.random() < 0.05 else 0)
        ring.set_desc(slot, table_addr, table_len, flags, slot + 1)
        return slot % size, slot + 1
    head = slot
    for i, (addr, length, flags) in enumerate(descs):
        last = i + 1 == len(descs)
        next_ = (slot + 1) % size
        if rng.random() < 0.04:
            next_ = rng.choice((head, slot, size, 0xFFFF))  # a loop, or past the table
            flags |= VRING_DESC_F_NEXT
        ring.set_desc(slot, addr, length, flags | (0 if last else VRING_DESC_F_NEXT), next_)
        slot += 1
    return head % size, slot


ATTACKS = frozenset({"truncate"})
"""Attack classes that may be left out (--skip): `truncate` shrinks guest memory under the
daemon, which SIGBUSes a backend without a guard for it."""


def ring_session(rng: random.Random, socket_path: Path, kit: FdKit, stats: Stats, capacity: int,
                 skip: frozenset[str] = frozenset()) -> str:
    """A valid set-up, then rounds of random descriptors, avail entries and kicks."""
    memory = GuestMemory(MEMORY_SIZE)
    try:
        size = rng.choice((1, 2, 8, 16, 64, 128, 256))
        if rng.random() < 0.05:
            size = rng.choice((0, 3, 1000, 32768))  # not a power of two, or too large
        ring = SplitRing(memory, max(1, min(size, 256)))
        ring.index = rng.choice((0, 1))  # the daemon offers two queues (fuzz/runner.py)
        with VhostUserFrontend(socket_path, timeout=2.0) as conn:
            offered = conn.get_features()
            drop = 0
            for bit in (VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC):
                if rng.random() < 0.3:
                    drop |= 1 << bit
            conn.negotiate(offered & ~drop)
            conn.set_mem_table([memory.region()])
            addrs = [memory.uaddr(ring.desc_addr), memory.uaddr(ring.avail_addr),
                     memory.uaddr(ring.used_addr)]
            if rng.random() < 0.05:
                addrs[rng.randrange(3)] = rng.choice(INTERESTING_U64)
            stats.messages += 12
            conn.setup_vring(ring.index, size, *addrs)
            rounds = rng.randint(1, 6)
            disrupted = []
            for _ in range(rounds):
                _ring_round(rng, conn, memory, ring, stats, capacity)
                if rng.random() < 0.25:
                    disrupted.append(_disrupt(rng, conn, memory, ring, kit, stats))
            if rng.random() < 0.1 and "truncate" not in skip:
                # Guest memory shrinks under the backend (a frontend may truncate its memfd
                # at any time): the daemon's mapping now has pages that SIGBUS. Publish one
                # more request, cut the file, kick; this process must not touch the map after.
                head, _ = _place(rng, memory, ring, _chain(rng, memory, ring, capacity, stats), 0)
                ring.publish(head)
                os.ftruncate(memory.fd, rng.choice((0, 4096, MEMORY_SIZE // 2)))
                conn.kick(ring.index)
                stats.kicks += 1
                time.sleep(0.02)
                return f"ring:size={size},rounds={rounds},truncated"
            if rng.random() < 0.3:
                stats.messages += 1
                conn.get_vring_base(ring.index)
        return f"ring:size={size},rounds={rounds},mid-flight={'+'.join(disrupted) or 'none'}"
    finally:
        memory.close()


def _disrupt(rng: random.Random, conn: VhostUserFrontend, memory: GuestMemory, ring: SplitRing,
             kit: FdKit, stats: Stats) -> str:
    """A set-up message while the queue runs (requests may be in flight): a new memory
    table, ring addresses, size, base, kick or call fd, disable/enable, reset, features."""
    what = rng.choice(("mem-table", "vring-addr", "vring-num", "vring-base", "kick-fd", "call-nofd",
                       "call-fd", "disable", "enable", "get-base", "reset-owner", "features"))
    stats.messages += 1
    addr = {"index": ring.index, "flags": 0, "desc_user_addr": memory.uaddr(ring.desc_addr),
            "used_user_addr": memory.uaddr(ring.used_addr), "avail_user_addr": memory.uaddr(ring.avail_addr),
            "log_guest_addr": 0}
    if what == "mem-table":
        # The same memory again (remapped under a running worker), or somewhere else.
        region = memory.region()
        if rng.random() < 0.5:
            region = dataclasses.replace(region, guest_phys_addr=rng.choice((0, memory.end, 1 << 40)))
        conn.set_mem_table([region])
    elif what == "vring-addr":
        field = rng.choice(("desc_user_addr", "used_user_addr", "avail_user_addr"))
        addr[field] = rng.choice(INTERESTING_U64)
        conn.send(Request.SET_VRING_ADDR, bytes(VringAddress.build(addr)))
    elif what == "vring-num":
        conn.send(Request.SET_VRING_NUM, _state(ring.index, rng.choice((0, 1, ring.size, 3, 32768, 65535))))
    elif what == "vring-base":
        conn.send(Request.SET_VRING_BASE, _state(ring.index, rng.getrandbits(16)))
    elif what == "kick-fd":
        conn.send(Request.SET_VRING_KICK, _u64(ring.index), [rng.choice((kit.eventfd(), kit.any(rng)))])
    elif what == "call-nofd":
        conn.send(Request.SET_VRING_CALL, _u64(ring.index | (1 << 8)))
    elif what == "call-fd":
        conn.send(Request.SET_VRING_CALL, _u64(ring.index), [kit.any(rng)])
    elif what in ("disable", "enable"):
        conn.send(Request.SET_VRING_ENABLE, _state(ring.index, int(what == "enable")))
    elif what == "get-base":
        conn.send(Request.GET_VRING_BASE, _state(ring.index, 0))
    elif what == "reset-owner":
        conn.send(Request.RESET_OWNER)
    else:
        conn.send(Request.SET_FEATURES, _u64(rng.getrandbits(64)))
    _drain(conn, 0.005)
    return what


def _ring_round(rng: random.Random, conn: VhostUserFrontend, memory: GuestMemory, ring: SplitRing,
                stats: Stats, capacity: int) -> None:
    slot = rng.randrange(ring.size)
    heads = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.05:  # pure noise in the table
            ring.set_desc(slot, rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(16),
                          rng.getrandbits(16))
            heads.append(slot % ring.size)
            slot += 1
            continue
        head, slot = _place(rng, memory, ring, _chain(rng, memory, ring, capacity, stats), slot)
        heads.append(head)
    for head in heads:
        ring.publish(head if rng.random() < 0.95 else rng.choice((ring.size, 0xFFFF, rng.getrandbits(16))))
    if rng.random() < 0.05:
        ring.set_avail_idx(ring.avail_idx + rng.choice((ring.size + 1, 0x8000, rng.getrandbits(16))))
    before = ring.used_idx
    for _ in range(rng.randint(1, 3)):
        conn.kick(ring.index)
        stats.kicks += 1
    if rng.random() < 0.1:  # change the descriptors under the worker's feet
        for index in range(ring.size):
            if rng.random() < 0.3:
                ring.set_desc(index, rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(16),
                              rng.getrandbits(16))
    deadline = time.monotonic() + 0.05
    while ring.used_idx == before and time.monotonic() < deadline:
        time.sleep(0.002)
