"""Guest memory and a virtio split ring for the fuzzer: vhost_pv_tools.guestmem, bent to take
wrong values.

The layout (memfd, split-ring parts, descriptor and virtio-blk header encoding) is the one the
tests use, from vhost_pv_tools.guestmem. The fuzzer writes descriptors, available entries and
headers by hand, most of them wrong on purpose, so what differs is only leniency: allocations
wrap around instead of failing, writes outside memory are dropped, numbers are cut to their
field's width, and the driver keeps its own avail index (later allocations may overwrite the
ring in guest memory: the index published next must not depend on that).
"""

from __future__ import annotations

# The virtio facts are declared once in vhost_pv.virtio; re-exported for the fuzzer.
from vhost_pv.virtio.blk import BLK_HEADER_SIZE as BLK_HEADER_SIZE
from vhost_pv.virtio.blk import VIRTIO_BLK_T_IN as VIRTIO_BLK_T_IN
from vhost_pv.virtio.blk import VIRTIO_BLK_T_OUT as VIRTIO_BLK_T_OUT
from vhost_pv.virtio.blk import RequestType
from vhost_pv.virtio.ring import DESC_SIZE as DESC_SIZE
from vhost_pv.virtio.ring import VRING_DESC_F_INDIRECT as VRING_DESC_F_INDIRECT
from vhost_pv.virtio.ring import VRING_DESC_F_NEXT as VRING_DESC_F_NEXT
from vhost_pv.virtio.ring import VRING_DESC_F_WRITE as VRING_DESC_F_WRITE
from vhost_pv_tools import guestmem
from vhost_pv_tools.guestmem import SECTOR as SECTOR
from vhost_pv_tools.guestmem import blk_header as blk_header
from vhost_pv_tools.guestmem import desc_table as desc_table

BLK_TYPES = tuple(int(t) for t in RequestType)


class GuestMemory(guestmem.GuestMemory):
    """One memfd of "guest RAM", mapped here and passed to the backend."""

    def __init__(self, size: int) -> None:
        super().__init__(size, name="vhost-pv-fuzz-guest")

    def alloc(self, size: int, align: int = 16) -> int:
        """Bump-allocate; returns a guest physical address (wraps around when full: the
        fuzzer does not care that old buffers get overwritten)."""
        start = (self._next + align - 1) // align * align
        if start + size > self.size:
            start = 0
        self._next = start + size
        return self.guest_phys_addr + start

    def write(self, gpa: int, data: bytes) -> None:
        """Writes that do not fit in guest memory are dropped (the fuzzer aims anywhere)."""
        offset = gpa - self.guest_phys_addr
        if offset >= 0 and offset + len(data) <= self.size:
            super().write(gpa, data)


class SplitRing(guestmem.SplitRing):
    """Where a split virtqueue's three parts live in guest memory (virtio 1.x layout); any
    size, any descriptor values."""

    def __init__(self, memory: GuestMemory, size: int) -> None:
        super().__init__(memory, size, any_size=True)
        self.index = 0
        """Which virtqueue of the device this ring is."""
        self._avail_idx = 0

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        super().set_desc(index % self.size, addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF,
                         next_ & 0xFFFF)

    @property
    def avail_idx(self) -> int:
        # The driver's own count, not what guest memory holds now (see the module docstring).
        return self._avail_idx

    def set_avail_idx(self, value: int) -> None:
        self._avail_idx = value & 0xFFFF
        super().set_avail_idx(value)

    def publish(self, *heads: int) -> None:
        super().publish(*(head & 0xFFFF for head in heads))
