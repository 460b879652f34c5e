"""A fake vhost-user frontend for the tests: guest memory, split rings, virtio-blk requests,
and the blocking vhost-user client of vhost_pv.protocol.frontend with helpers for them.

Imported by the tests as `from support.frontend import ...` (pyproject.toml puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Sequence

# The client lives in the package (the load generator uses it too); re-exported here.
from vhost_pv.protocol.frontend import FrontendError as FrontendError
from vhost_pv.protocol.frontend import QueueFds as QueueFds
from vhost_pv.protocol.frontend import VhostUserFrontend as _Frontend
from vhost_pv.protocol.session import MemoryRegionSpec

# The virtio facts are declared once in vhost_pv.virtio; re-exported for the tests.
from vhost_pv.virtio.blk import BLK_HEADER_SIZE as BLK_HEADER_SIZE
from vhost_pv.virtio.blk import VIRTIO_BLK_S_IOERR as VIRTIO_BLK_S_IOERR
from vhost_pv.virtio.blk import VIRTIO_BLK_S_OK as VIRTIO_BLK_S_OK
from vhost_pv.virtio.blk import VIRTIO_BLK_S_UNSUPP as VIRTIO_BLK_S_UNSUPP
from vhost_pv.virtio.blk import VIRTIO_BLK_T_DISCARD as VIRTIO_BLK_T_DISCARD
from vhost_pv.virtio.blk import VIRTIO_BLK_T_FLUSH as VIRTIO_BLK_T_FLUSH
from vhost_pv.virtio.blk import VIRTIO_BLK_T_GET_ID as VIRTIO_BLK_T_GET_ID
from vhost_pv.virtio.blk import VIRTIO_BLK_T_IN as VIRTIO_BLK_T_IN
from vhost_pv.virtio.blk import VIRTIO_BLK_T_OUT as VIRTIO_BLK_T_OUT
from vhost_pv.virtio.blk import VIRTIO_BLK_T_WRITE_ZEROES as VIRTIO_BLK_T_WRITE_ZEROES
from vhost_pv.virtio.blk import VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP as VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
from vhost_pv.virtio.ring import DESC_SIZE as DESC_SIZE
from vhost_pv.virtio.ring import VRING_DESC_F_INDIRECT as VRING_DESC_F_INDIRECT
from vhost_pv.virtio.ring import VRING_DESC_F_NEXT as VRING_DESC_F_NEXT
from vhost_pv.virtio.ring import VRING_DESC_F_WRITE as VRING_DESC_F_WRITE

# Guest memory, rings and virtio-blk requests are shared with the fuzzer; re-exported here.
from vhost_pv_tools.guestmem import DEFAULT_MEMORY_SIZE as DEFAULT_MEMORY_SIZE
from vhost_pv_tools.guestmem import DESC_DTYPE as DESC_DTYPE
from vhost_pv_tools.guestmem import GUEST_PHYS_BASE as GUEST_PHYS_BASE
from vhost_pv_tools.guestmem import SECTOR as SECTOR
from vhost_pv_tools.guestmem import STATUS_UNSET as STATUS_UNSET
from vhost_pv_tools.guestmem import USED_ELEM_DTYPE as USED_ELEM_DTYPE
from vhost_pv_tools.guestmem import USER_ADDR_BASE as USER_ADDR_BASE
from vhost_pv_tools.guestmem import BlkRequest as BlkRequest
from vhost_pv_tools.guestmem import Buffer as Buffer
from vhost_pv_tools.guestmem import GuestMemory as GuestMemory
from vhost_pv_tools.guestmem import SplitRing as SplitRing
from vhost_pv_tools.guestmem import blk_header as blk_header
from vhost_pv_tools.guestmem import desc_table as desc_table
from vhost_pv_tools.guestmem import discard_segment as discard_segment
from vhost_pv_tools.guestmem import read_request as read_request
from vhost_pv_tools.guestmem import write_request as write_request

# -- vhost-user client ---------------------------------------------------------------------


class VhostUserFrontend(_Frontend):
    """vhost_pv.protocol.frontend.VhostUserFrontend with helpers for this module's
    GuestMemory, SplitRing and BlkRequest."""

    def set_mem_table(
        self,
        memory: GuestMemory | Sequence[MemoryRegionSpec],
        *,
        mmap_offset: int = 0,
        memory_size: int | None = None,
    ) -> None:
        if isinstance(memory, GuestMemory):
            memory = [memory.region(mmap_offset=mmap_offset, memory_size=memory_size)]
        super().set_mem_table(memory)

    def setup_queue(
        self, index: int, ring: SplitRing, kick: int | None = None, call: int | None = None, *, base: int = 0
    ) -> QueueFds:
        """SET_VRING_NUM, ADDR, BASE, KICK, CALL, ENABLE. Creates the eventfds unless given;
        the frontend keeps (and closes) its copies."""
        memory = ring.memory
        return self.setup_vring(
            index,
            ring.size,
            memory.uaddr(ring.desc_addr),
            memory.uaddr(ring.avail_addr),
            memory.uaddr(ring.used_addr),
            kick=kick,
            call=call,
            base=base,
        )

    # -- data path --------------------------------------------------------------------------

    def wait_used(
        self, index: int, ring: SplitRing, count: int = 1, timeout: float = 10.0
    ) -> list[tuple[int, int]]:
        """Wait until `count` more used entries are there; returns them (see SplitRing.collect)."""
        call = self.queues[index].call
        deadline = time.monotonic() + timeout
        while ring.pending() < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"queue {index}: {ring.pending()}/{count} used entries after {timeout} s")
            # Interrupts may be suppressed (EVENT_IDX): poll the used ring as well.
            ready, _, _ = select.select([call], [], [], min(remaining, 0.05))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call)
        return ring.collect()

    def submit(
        self, index: int, ring: SplitRing, request: BlkRequest, *, indirect: bool = False
    ) -> BlkRequest:
        """Submit, kick and wait for completion."""
        request.submit(ring, indirect=indirect)
        self.kick(index)
        used = self.wait_used(index, ring)
        if [head for head, _ in used] != [request.head]:
            raise FrontendError(f"used entries {used}, expected head {request.head}")
        return request


def spin_used(ring: SplitRing, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
    """Wait for `count` more used entries by watching the used ring only, never the call
    eventfd (for tests whose call fd is not the frontend's to drain); returns them (see
    SplitRing.collect)."""
    deadline = time.monotonic() + timeout
    while ring.pending() < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ring.pending()}/{count} used entries after {timeout} s")
        time.sleep(0.0005)
    return ring.collect()
