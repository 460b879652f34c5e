"""What every device hands the C ring code: the memory table and a queue's ring setup as
the C structs of vhost_pv.h."""

from __future__ import annotations

import os
from typing import Any

from vhost_pv._native import ffi
from vhost_pv.protocol.session import MemoryRegionSpec, VringSetup


def memory_table(regions: list[MemoryRegionSpec]) -> Any:
    """A struct vpv_mem_region_desc[] (the fds stay the caller's)."""
    table = ffi.new("struct vpv_mem_region_desc[]", len(regions))
    for slot, region in zip(table, regions, strict=True):
        slot.guest_phys_addr = region.guest_phys_addr
        slot.memory_size = region.memory_size
        slot.userspace_addr = region.userspace_addr
        slot.mmap_offset = region.mmap_offset
        slot.fd = region.fd
    return table


def vring_config(setup: VringSetup) -> Any:
    """A struct vpv_vring_config * for one queue."""
    return ffi.new(
        "struct vpv_vring_config *",
        {
            "num": setup.num,
            "base": setup.base,
            "event_idx": int(setup.event_idx),
            "indirect": int(setup.indirect),
            "desc_user_addr": setup.desc_user_addr,
            "avail_user_addr": setup.avail_user_addr,
            "used_user_addr": setup.used_user_addr,
            "kick_fd": setup.kick_fd,
            "call_fd": setup.call_fd,
            "inflight": ffi.cast("uint8_t *", setup.inflight_addr),
            "inflight_size": setup.inflight_size,
        },
    )


def strerror(rc: int) -> str:
    """A negative errno from the C side, as words."""
    return f"{os.strerror(-rc)} (errno {-rc})"
