"""virtio-blk facts (virtio 1.x, section 5.2 "Block Device"), and the limits we offer.

C: csrc/virtio_blk.h (request types, status values, flags, the config space, the request
header and discard segment layouts, VPV_MAX_DISCARD_SECTORS) and csrc/vhost_pv.h (the limits
the C data path shares with Python through cffi: VPV_SEG_MAX, VPV_MAX_DISCARD_SEGMENTS,
VPV_SECTOR_SIZE). tests/unit/test_c_headers.py checks both against this module.
"""

from __future__ import annotations

import enum
from typing import Final

from construct import Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct


class RequestType(enum.IntEnum):
    """The type field of a request header (VIRTIO_BLK_T_*)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class Status(enum.IntEnum):
    """The status byte the device writes at the end of a request (VIRTIO_BLK_S_*)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


# The specification's names, for code that reads like the C side.
VIRTIO_BLK_T_IN: Final = RequestType.IN
VIRTIO_BLK_T_OUT: Final = RequestType.OUT
VIRTIO_BLK_T_FLUSH: Final = RequestType.FLUSH
VIRTIO_BLK_T_GET_ID: Final = RequestType.GET_ID
VIRTIO_BLK_T_DISCARD: Final = RequestType.DISCARD
VIRTIO_BLK_T_WRITE_ZEROES: Final = RequestType.WRITE_ZEROES
VIRTIO_BLK_S_OK: Final = Status.OK
VIRTIO_BLK_S_IOERR: Final = Status.IOERR
VIRTIO_BLK_S_UNSUPP: Final = Status.UNSUPP

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1
"""Discard segment flag of a WRITE_ZEROES request: the range may be deallocated."""


class BlkFeature(enum.IntEnum):
    """virtio-blk feature bits (virtio 1.x, 5.2.3), as bit numbers."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


VirtioBlkConfig = Struct(
    "capacity" / Int64ul,
    "size_max" / Int32ul,
    "seg_max" / Int32ul,
    "cylinders" / Int16ul,
    "heads" / Int8ul,
    "sectors" / Int8ul,
    "blk_size" / Int32ul,
    "physical_block_exp" / Int8ul,
    "alignment_offset" / Int8ul,
    "min_io_size" / Int16ul,
    "opt_io_size" / Int32ul,
    "writeback" / Int8ul,
    Padding(1),
    "num_queues" / Int16ul,
    "max_discard_sectors" / Int32ul,
    "max_discard_seg" / Int32ul,
    "discard_sector_alignment" / Int32ul,
    "max_write_zeroes_sectors" / Int32ul,
    "max_write_zeroes_seg" / Int32ul,
    "write_zeroes_may_unmap" / Int8ul,
    Padding(3),
)
"""C: struct vpv_blk_config (csrc/virtio_blk.h; struct virtio_blk_config of linux/virtio_blk.h)
up to write_zeroes_may_unmap, 60 bytes."""
CONFIG_SIZE: Final = int(VirtioBlkConfig.sizeof())


def config_offset(field: str) -> int:
    """Byte offset of a named field in the config space."""
    offset = 0
    for sub in VirtioBlkConfig.subcons:
        if sub.name == field:
            return offset
        offset += sub.sizeof()
    raise KeyError(field)


RequestHeader = Struct("type" / Int32ul, "reserved" / Int32ul, "sector" / Int64ul)
"""C: struct blk_req_header (struct virtio_blk_outhdr), what every request starts with."""
BLK_HEADER_SIZE: Final = int(RequestHeader.sizeof())

DiscardSegment = Struct("sector" / Int64ul, "num_sectors" / Int32ul, "flags" / Int32ul)
"""C: struct blk_discard_segment (struct virtio_blk_discard_write_zeroes), the payload of
DISCARD and WRITE_ZEROES requests (and of their quarantine records)."""

SECTOR_SIZE: Final = 512
"""virtio-blk addresses in 512-byte sectors whatever the block size (C: VPV_SECTOR_SIZE)."""
SEG_MAX: Final = 126
"""Data buffers per request we offer in seg_max (C: VPV_SEG_MAX)."""
MAX_SEGMENT_SIZE: Final = 1 << 20
"""Bytes per data buffer we offer in size_max."""
MAX_DISCARD_SEGMENTS: Final = 16
"""Segments per DISCARD / WRITE_ZEROES request (C: VPV_MAX_DISCARD_SEGMENTS)."""
MAX_DISCARD_SECTORS: Final = 1 << 22
"""Sectors per DISCARD / WRITE_ZEROES segment (C: VPV_MAX_DISCARD_SECTORS)."""
