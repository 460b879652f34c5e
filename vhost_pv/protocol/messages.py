"""vhost-user wire format: every message layout declared once, with construct.

The layouts follow QEMU's docs/interop/vhost-user.rst. All integers are little-endian
(x86 hosts; the protocol uses the host's native byte order).
"""

from __future__ import annotations

import enum

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct, this

# -- header -------------------------------------------------------------------------------

MessageHeader = Struct(
    "request" / Int32ul,
    "flags" / Int32ul,
    "size" / Int32ul,
)
"""C: struct { uint32_t request; uint32_t flags; uint32_t size; } (12 bytes)."""

HEADER_SIZE = MessageHeader.sizeof()

# Flags word of the header.
FLAG_VERSION_MASK = 0x3
PROTOCOL_VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# The largest payload we accept; the biggest legal one is a config space message (12 + 256)
# or a memory table (8 + 8 * 32). Anything larger is a malformed message.
MAX_PAYLOAD_SIZE = 4096
# The most fds one message may carry (a memory table with VHOST_MEMORY_MAX_NREGIONS).
MAX_FDS_PER_MESSAGE = 8
MAX_MEMORY_REGIONS = 8
CONFIG_SPACE_MAX = 256


class Request(enum.IntEnum):
    """Front-end to back-end request numbers."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the vhost-user protocol feature word."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Virtio feature bits that are not device specific.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32

# SET_VRING_KICK / CALL / ERR: low byte is the queue index, this bit says "no fd attached".
VRING_FILE_INDEX_MASK = 0xFF
VRING_FILE_NOFD = 1 << 8

# -- payloads ------------------------------------------------------------------------------

U64Payload = Int64ul
"""C: uint64_t (features, protocol features, queue number, vring file word, ack)."""

VringState = Struct(
    "index" / Int32ul,
    "num" / Int32ul,
)
"""C: struct vhost_vring_state { unsigned int index; unsigned int num; } (8 bytes)."""

VringAddress = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc_user_addr" / Int64ul,
    "used_user_addr" / Int64ul,
    "avail_user_addr" / Int64ul,
    "log_guest_addr" / Int64ul,
)
"""C: struct vhost_vring_addr { u32 index, flags; u64 desc, used, avail, log; } (40 bytes)."""

MemoryRegion = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
"""C: struct VhostUserMemoryRegion { u64 guest_phys_addr, memory_size, userspace_addr,
mmap_offset; } (32 bytes)."""

MemoryTable = Struct(
    "num_regions" / Int32ul,
    Padding(4),
    "regions" / Array(this.num_regions, MemoryRegion),
)
"""C: struct VhostUserMemory { u32 nregions; u32 padding; VhostUserMemoryRegion regions[]; }.
QEMU sends only the regions it passes fds for, so the payload is 8 + 32 * nregions bytes."""

SingleMemoryRegion = Struct(
    Padding(8),
    "region" / MemoryRegion,
)
"""C: struct VhostUserMemRegMsg { u64 padding; VhostUserMemoryRegion region; } (40 bytes)."""

ConfigSpace = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "payload" / Bytes(this.size),
)
"""C: struct VhostUserConfig { u32 offset, size, flags; u8 region[256]; } (12 + size)."""

CONFIG_SPACE_HEADER_SIZE = 12

InflightDescription = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
    "num_queues" / Int16ul,
    "queue_size" / Int16ul,
    Padding(4),
)
"""C: struct VhostUserInflight { u64 mmap_size, mmap_offset; u16 num_queues, queue_size; }
(24 bytes: QEMU sends sizeof() of the unpacked struct, its tail padding included)."""

# -- inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split virtqueues) -----------------

InflightRegionHeader = Struct(
    "features" / Int64ul,
    "version" / Int16ul,
    "desc_num" / Int16ul,
    "last_batch_head" / Int16ul,
    "used_idx" / Int16ul,
)
"""C: the head of struct QueueRegionSplit (csrc/vring.h struct vpv_inflight_region), 16 bytes;
desc_num DescStateSplit entries follow."""

InflightDescState = Struct(
    "inflight" / Int8ul,
    Padding(5),
    "next" / Int16ul,
    "counter" / Int64ul,
)
"""C: struct DescStateSplit (csrc/vring.h struct vpv_inflight_desc), 16 bytes."""

INFLIGHT_VERSION = 1
INFLIGHT_ALIGNMENT = 64


def inflight_queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: its header and queue_size entries, rounded up to 64
    bytes (the same size libvhost-user gives it, so an area either made stays valid)."""
    raw = int(InflightRegionHeader.sizeof()) + int(InflightDescState.sizeof()) * queue_size
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


def inflight_area_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole inflight area: one region per queue, back to back."""
    return num_queues * inflight_queue_region_size(queue_size)

