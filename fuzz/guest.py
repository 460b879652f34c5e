"""Guest memory and a virtio split ring as raw bytes: a minimal copy of tests/frontend.py's.

The fuzzer writes descriptors, available entries and virtio-blk headers by hand (most of
them wrong on purpose), so this keeps only the layout and a bump allocator.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct

from vhost_pv.protocol.session import MemoryRegionSpec

# The virtio facts are declared once in vhost_pv.virtio; re-exported for the fuzzer.
from vhost_pv.virtio.blk import BLK_HEADER_SIZE as BLK_HEADER_SIZE
from vhost_pv.virtio.blk import SECTOR_SIZE, RequestType
from vhost_pv.virtio.blk import VIRTIO_BLK_T_IN as VIRTIO_BLK_T_IN
from vhost_pv.virtio.blk import VIRTIO_BLK_T_OUT as VIRTIO_BLK_T_OUT
from vhost_pv.virtio.ring import DESC_SIZE as DESC_SIZE
from vhost_pv.virtio.ring import VRING_DESC_F_INDIRECT as VRING_DESC_F_INDIRECT
from vhost_pv.virtio.ring import VRING_DESC_F_NEXT as VRING_DESC_F_NEXT
from vhost_pv.virtio.ring import VRING_DESC_F_WRITE as VRING_DESC_F_WRITE

# Guest physical and frontend virtual addresses differ, as in tests/frontend.py.
GUEST_PHYS_BASE = 0x4000_0000
USER_ADDR_BASE = 0x7F12_3400_0000

_DESC = struct.Struct("<QIHH")  # struct vring_desc { le64 addr; le32 len; le16 flags, next; }

BLK_TYPES = tuple(int(t) for t in RequestType)
SECTOR = SECTOR_SIZE


class GuestMemory:
    """One memfd of "guest RAM", mapped here and passed to the backend."""

    def __init__(self, size: int, *, guest_phys_addr: int = GUEST_PHYS_BASE,
                 userspace_addr: int = USER_ADDR_BASE) -> None:
        self.size = size
        self.guest_phys_addr = guest_phys_addr
        self.userspace_addr = userspace_addr
        self.fd = os.memfd_create("vhost-pv-fuzz-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self._next = 0

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size

    def alloc(self, size: int, align: int = 16) -> int:
        """Bump-allocate; returns a guest physical address (wraps around when full: the
        fuzzer does not care that old buffers get overwritten)."""
        start = (self._next + align - 1) // align * align
        if start + size > self.size:
            start = 0
        self._next = start + size
        return self.guest_phys_addr + start

    def write(self, gpa: int, data: bytes) -> None:
        offset = gpa - self.guest_phys_addr
        if offset >= 0 and offset + len(data) <= self.size:
            self.map[offset:offset + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        offset = gpa - self.guest_phys_addr
        return bytes(self.map[offset:offset + length])

    def uaddr(self, gpa: int) -> int:
        return self.userspace_addr + (gpa - self.guest_phys_addr)

    def region(self, memory_size: int | None = None, mmap_offset: int = 0) -> MemoryRegionSpec:
        return MemoryRegionSpec(self.guest_phys_addr, self.size if memory_size is None else memory_size,
                                self.userspace_addr, mmap_offset, self.fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.map.close()


class SplitRing:
    """Where a split virtqueue's three parts live in guest memory (virtio 1.x layout)."""

    def __init__(self, memory: GuestMemory, size: int) -> None:
        self.memory = memory
        self.size = size
        self.index = 0
        """Which virtqueue of the device this ring is."""
        self.desc_addr = memory.alloc(DESC_SIZE * size, 4096)
        self.avail_addr = memory.alloc(6 + 2 * size, 4096)
        self.used_addr = memory.alloc(6 + 8 * size, 4096)
        self.avail_idx = 0

    def set_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        self.memory.write(self.desc_addr + DESC_SIZE * (index % self.size),
                          _DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, next_ & 0xFFFF))

    def publish(self, head: int) -> None:
        """avail->ring[idx % size] = head; avail->idx += 1."""
        slot = self.avail_addr + 4 + 2 * (self.avail_idx % self.size)
        self.memory.write(slot, struct.pack("<H", head & 0xFFFF))
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write(self.avail_addr + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        value: int = struct.unpack("<H", self.memory.read(self.used_addr + 2, 2))[0]
        return value


def desc_table(entries: list[tuple[int, int, int, int]]) -> bytes:
    """An indirect descriptor table: (addr, len, flags, next) each."""
    return b"".join(_DESC.pack(a & (2**64 - 1), n & 0xFFFFFFFF, f & 0xFFFF, x & 0xFFFF)
                    for a, n, f, x in entries)


def blk_header(req_type: int, sector: int) -> bytes:
    """struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }"""
    return struct.pack("<IIQ", req_type & 0xFFFFFFFF, 0, sector & (2**64 - 1))
