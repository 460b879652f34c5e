"""Guest memory, virtio split rings and virtio-blk requests, from the driver's side.

What a vhost-user frontend puts in guest RAM: one memfd mapped here (shared with the backend
through SET_MEM_TABLE), a split virtqueue laid out in it, and virtio-blk request chains. Used
by the tests (tests/support/frontend.py adds the vhost-user client helpers) and by the fuzzer
(fuzz/guest.py bends it to write wrong values on purpose); one copy, so the layout the tests
check and the one the fuzzer breaks are the same. A tool: vhost_pv never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from vhost_pv.protocol.session import MemoryRegionSpec
from vhost_pv.virtio.blk import BLK_HEADER_SIZE, SECTOR_SIZE, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from vhost_pv.virtio.ring import DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

# Guest physical and frontend virtual addresses differ on purpose: a backend mixing them up
# finds nothing at either.
GUEST_PHYS_BASE = 0x4000_0000
USER_ADDR_BASE = 0x7F12_3400_0000
DEFAULT_MEMORY_SIZE = 4 << 20

# -- virtio split ring ---------------------------------------------------------------------

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
_DESC = struct.Struct("<QIHH")  # struct vring_desc { le64 addr; le32 len; le16 flags, next; }

# -- virtio-blk ----------------------------------------------------------------------------

SECTOR = SECTOR_SIZE
STATUS_UNSET = 0xFF
"""What the tests put in a status byte before submitting: the device never writes it."""

Buffer = tuple[int, int, bool]
"""One descriptor's buffer: (guest physical address, length, device-writable)."""


class GuestMemory:
    """One memfd-backed region of "guest RAM", mapped here and shareable with a backend."""

    def __init__(
        self,
        size: int = DEFAULT_MEMORY_SIZE,
        *,
        guest_phys_addr: int = GUEST_PHYS_BASE,
        userspace_addr: int = USER_ADDR_BASE,
        name: str = "vhost-pv-test-guest",
    ) -> None:
        self.size = size
        self.guest_phys_addr = guest_phys_addr
        self.userspace_addr = userspace_addr
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size)
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8)
        self._next = 0

    @property
    def end(self) -> int:
        """The first guest physical address after this memory."""
        return self.guest_phys_addr + self.size

    def alloc(self, size: int, align: int = 16) -> int:
        """Bump-allocate `size` bytes; returns their guest physical address."""
        start = (self._next + align - 1) // align * align
        if start + size > self.size:
            raise MemoryError(f"guest memory exhausted ({start + size} > {self.size})")
        self._next = start + size
        return self.guest_phys_addr + start

    def mark(self) -> int:
        """Where the next allocation starts; `rewind` to it to reuse what came after."""
        return self._next

    def rewind(self, mark: int) -> None:
        self._next = mark

    def _offset(self, gpa: int, length: int) -> int:
        offset = gpa - self.guest_phys_addr
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"[{gpa:#x}, +{length:#x}) is outside guest memory")
        return offset

    def view(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        offset = self._offset(gpa, length)
        return self.bytes[offset : offset + length]

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = np.frombuffer(data, dtype=np.uint8)

    def read(self, gpa: int, length: int) -> bytes:
        return self.view(gpa, length).tobytes()

    def fill(self, gpa: int, length: int, value: int) -> None:
        self.view(gpa, length)[:] = value

    def put(self, data: bytes, align: int = 16) -> int:
        """Allocate and fill; returns the guest physical address."""
        gpa = self.alloc(max(len(data), 1), align)
        self.write(gpa, data)
        return gpa

    def uaddr(self, gpa: int) -> int:
        """The frontend virtual address of a guest physical address (what SET_VRING_ADDR uses)."""
        return self.userspace_addr + self._offset(gpa, 0)

    def region(self, *, mmap_offset: int = 0, memory_size: int | None = None) -> MemoryRegionSpec:
        size = self.size - mmap_offset if memory_size is None else memory_size
        return MemoryRegionSpec(
            guest_phys_addr=self.guest_phys_addr,
            memory_size=size,
            userspace_addr=self.userspace_addr,
            mmap_offset=mmap_offset,
            fd=self.fd,
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # numpy views may still point into the map: then the garbage collector unmaps it.
        with contextlib.suppress(BufferError):
            self._map.close()


class SplitRing:
    """A virtio 1.x split virtqueue in guest memory, driven from the driver's side."""

    def __init__(self, memory: GuestMemory, size: int = 64, *, any_size: bool = False) -> None:
        # A queue size that is not a power of two is refused unless asked for: only a test of
        # the backend's own check (or the fuzzer) wants one.
        if size <= 0 or (size & (size - 1) and not any_size):
            raise ValueError("queue size must be a power of two")
        self.memory = memory
        self.size = size
        self.desc_addr = memory.alloc(DESC_SIZE * size, 4096)
        self.avail_addr = memory.alloc(6 + 2 * size, 4096)
        self.used_addr = memory.alloc(6 + 8 * size, 4096)
        self.desc = memory.view(self.desc_addr, DESC_SIZE * size).view(DESC_DTYPE)
        # flags, idx, ring[size], used_event
        self.avail = memory.view(self.avail_addr, 6 + 2 * size).view("<u2")
        used_head = memory.view(self.used_addr, 4).view("<u2")
        self.used_flags = used_head[0:1]
        self.used_idx_view = used_head[1:2]
        self.used_ring = memory.view(self.used_addr + 4, 8 * size).view(USED_ELEM_DTYPE)
        self.avail_event = memory.view(self.used_addr + 4 + 8 * size, 2).view("<u2")
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}
        self.last_used = 0

    # -- descriptors ------------------------------------------------------------------------

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.desc[index] = (addr, length, flags, next_)

    def take_descriptors(self, count: int) -> list[int]:
        """Reserve descriptor slots for a hand-made chain (freed when it completes)."""
        if count > len(self._free):
            raise RuntimeError("descriptor table full")
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False) -> int:
        """Write a chain (or one indirect descriptor pointing at a table of them); returns
        the head index. Publish it with `publish`."""
        if indirect:
            table = np.zeros(len(buffers), dtype=DESC_DTYPE)
            for i, (addr, length, writable) in enumerate(buffers):
                flags = (VRING_DESC_F_WRITE if writable else 0) | (
                    VRING_DESC_F_NEXT if i + 1 < len(buffers) else 0
                )
                table[i] = (addr, length, flags, i + 1 if i + 1 < len(buffers) else 0)
            table_addr = self.memory.put(table.tobytes(), 16)
            (head,) = self.take_descriptors(1)
            self.set_desc(head, table_addr, DESC_SIZE * len(buffers), VRING_DESC_F_INDIRECT)
            self._chains[head] = [head]
            return head
        slots = self.take_descriptors(len(buffers))
        for i, (addr, length, writable) in enumerate(buffers):
            last = i + 1 == len(buffers)
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.set_desc(slots[i], addr, length, flags, 0 if last else slots[i + 1])
        self._chains[slots[0]] = slots
        return slots[0]

    # -- available ring ---------------------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        return int(self.avail[1])

    def set_avail_idx(self, value: int) -> None:
        self.avail[1] = value & 0xFFFF

    def publish(self, *heads: int) -> None:
        """Put heads in the available ring, then move avail->idx past them."""
        idx = self.avail_idx
        for head in heads:
            self.avail[2 + idx % self.size] = head
            idx = (idx + 1) & 0xFFFF
        self.set_avail_idx(idx)

    def set_used_event(self, value: int) -> None:
        self.avail[2 + self.size] = value & 0xFFFF

    # -- used ring --------------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return int(self.used_idx_view[0])

    def pending(self) -> int:
        """Used entries the driver has not collected yet."""
        return (self.used_idx - self.last_used) & 0xFFFF

    def collect(self) -> list[tuple[int, int]]:
        """New used entries as (head, written length); their descriptors become free."""
        out = []
        while self.last_used != self.used_idx:
            elem = self.used_ring[self.last_used % self.size]
            head, written = int(elem["id"]), int(elem["len"])
            out.append((head, written))
            self._free.extend(self._chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


# -- virtio-blk requests ---------------------------------------------------------------------


def blk_header(req_type: int, sector: int = 0) -> bytes:
    """struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; } (out-of-range
    values are cut to the field's width: the fuzzer passes any number)."""
    return struct.pack("<IIQ", req_type & 0xFFFFFFFF, 0, sector & (2**64 - 1))


def desc_table(entries: Sequence[tuple[int, int, int, int]]) -> bytes:
    """An indirect descriptor table, (addr, len, flags, next) each, cut to the fields' widths."""
    return b"".join(_DESC.pack(a & (2**64 - 1), n & 0xFFFFFFFF, f & 0xFFFF, x & 0xFFFF)
                    for a, n, f, x in entries)


def discard_segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }"""
    return struct.pack("<QII", sector, num_sectors, flags)


@dataclasses.dataclass
class BlkRequest:
    """One virtio-blk request laid out in guest memory."""

    memory: GuestMemory
    req_type: int
    sector: int
    buffers: list[Buffer]
    status_addr: int
    data_addr: int = 0
    data_len: int = 0
    head: int = -1

    @property
    def status(self) -> int:
        return self.memory.read(self.status_addr, 1)[0]

    def data(self) -> bytes:
        return self.memory.read(self.data_addr, self.data_len)

    @classmethod
    def build(
        cls,
        memory: GuestMemory,
        req_type: int,
        sector: int = 0,
        *,
        payload: bytes = b"",
        read_len: int = 0,
        split: Sequence[int] = (),
    ) -> BlkRequest:
        """Header, then `payload` (device-readable) or `read_len` bytes (device-writable),
        then the status byte, each in its own descriptor; `split` cuts the data into
        descriptors of those lengths (the rest goes in a last one)."""
        header_addr = memory.put(blk_header(req_type, sector))
        buffers: list[Buffer] = [(header_addr, BLK_HEADER_SIZE, False)]
        data_len = len(payload) if payload else read_len
        data_addr = 0
        if data_len:
            data_addr = memory.alloc(data_len, 512)
            if payload:
                memory.write(data_addr, payload)
            else:
                memory.fill(data_addr, data_len, 0xA5)
            writable = not payload
            offset = 0
            for piece in split:
                buffers.append((data_addr + offset, piece, writable))
                offset += piece
            if offset < data_len:
                buffers.append((data_addr + offset, data_len - offset, writable))
        status_addr = memory.alloc(1, 1)
        memory.write(status_addr, bytes([STATUS_UNSET]))
        buffers.append((status_addr, 1, True))
        return cls(memory, req_type, sector, buffers, status_addr, data_addr, data_len)

    def submit(self, ring: SplitRing, *, indirect: bool = False) -> BlkRequest:
        self.head = ring.add_chain(self.buffers, indirect=indirect)
        ring.publish(self.head)
        return self


def write_request(memory: GuestMemory, sector: int, data: bytes, split: Sequence[int] = ()) -> BlkRequest:
    return BlkRequest.build(memory, VIRTIO_BLK_T_OUT, sector, payload=data, split=split)


def read_request(memory: GuestMemory, sector: int, length: int, split: Sequence[int] = ()) -> BlkRequest:
    return BlkRequest.build(memory, VIRTIO_BLK_T_IN, sector, read_len=length, split=split)
