"""Golden bytes for every on-the-wire and on-disk layout.

The expected bytes are written out by hand from the C structs (vhost-user spec, linux/virtio_blk.h,
the vpv_* structs documented in the modules), little-endian, so a change to a construct layout that
would break interoperability shows up here as a byte diff.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib
from typing import Any

import pytest

from vhost_pv.control.wire import (
    CLEAR_OWNER,
    CONTROL_MAGIC,
    CONTROL_VERSION,
    FLAG_REPLY,
    SET_ALLOWED_GIDS,
    SET_ALLOWED_UIDS,
    SET_IDS,
    SET_OWNER,
    SET_READ_POLICY,
    SET_RING_FULL_POLICY,
    SET_TTL,
    SET_TTL_ACTION,
    Command,
    ControlHeader,
    ReplyStatus,
    VolumeSetRequest,
    ioc,
)
from vhost_pv.protocol.messages import (
    CONFIG_SPACE_HEADER_SIZE,
    HEADER_SIZE,
    ConfigSpace,
    MemoryRegion,
    MemoryTable,
    MessageHeader,
    Request,
    SingleMemoryRegion,
    U64Payload,
    VringAddress,
    VringState,
)
from vhost_pv.virtio.blk import VirtioBlkConfig
from vhost_pv.volume.header import (
    FLAG_BOTH_COPIES,
    FLAG_READ_ONLY,
    FORMAT_VERSION,
    MAGIC,
    MAX_ALLOWED_IDS,
    SLOT_SIZE,
    HeaderBody,
    HeaderBodyV1,
    HeaderError,
    HeaderSlot,
    ReadPolicy,
    RingFullPolicy,
    TtlAction,
    VolumeHeader,
    VolumeState,
    decode_slot,
    encode_slot,
)


def _plain(value: Any) -> Any:
    """A construct Container / ListContainer as plain dicts and lists (drops hidden '_' keys)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# -- vhost-user messages ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_message_header() -> None:
    # struct { u32 request; u32 flags; u32 size; }
    value = {"request": int(Request.SET_MEM_TABLE), "flags": 0x1 | (1 << 3), "size": 40}
    golden = bytes.fromhex("05000000" "09000000" "28000000")
    assert HEADER_SIZE == 12
    assert MessageHeader.build(value) == golden
    assert _plain(MessageHeader.parse(golden)) == value


@pytest.mark.timeout(60)
def test_u64_payload() -> None:
    golden = bytes.fromhex("efcdab8967452301")
    assert U64Payload.build(0x0123456789ABCDEF) == golden
    assert U64Payload.parse(golden) == 0x0123456789ABCDEF


@pytest.mark.timeout(60)
def test_vring_state() -> None:
    # struct vhost_vring_state { unsigned int index; unsigned int num; }
    value = {"index": 1, "num": 256}
    golden = bytes.fromhex("01000000" "00010000")
    assert VringState.sizeof() == 8
    assert VringState.build(value) == golden
    assert _plain(VringState.parse(golden)) == value


@pytest.mark.timeout(60)
def test_vring_address() -> None:
    # struct vhost_vring_addr { u32 index, flags; u64 desc, used, avail, log; }
    value = {
        "index": 2,
        "flags": 1,
        "desc_user_addr": 0x7F00_1000_0000,
        "used_user_addr": 0x2000,
        "avail_user_addr": 0x1122_3344_5566_7788,
        "log_guest_addr": 0,
    }
    golden = bytes.fromhex(
        "02000000" "01000000"
        "0000001000" "7f0000"  # 0x00007f0010000000
        "0020000000000000"
        "8877665544332211"
        "0000000000000000"
    )
    assert VringAddress.sizeof() == 40
    assert VringAddress.build(value) == golden
    assert _plain(VringAddress.parse(golden)) == value


REGION_A = {
    "guest_phys_addr": 0x1_0000_0000,
    "memory_size": 0x4000_0000,
    "userspace_addr": 0x7F00_0000_0000,
    "mmap_offset": 0x1000,
}
REGION_A_BYTES = bytes.fromhex(
    "0000000001000000"  # guest_phys_addr
    "0000004000000000"  # memory_size
    "0000000000" "7f0000"  # userspace_addr
    "0010000000000000"  # mmap_offset
)
REGION_B = {
    "guest_phys_addr": 0,
    "memory_size": 0xA0000,
    "userspace_addr": 0x7F12_3456_7000,
    "mmap_offset": 0,
}
REGION_B_BYTES = bytes.fromhex(
    "0000000000000000"
    "00000a0000000000"
    "0070563412" "7f0000"
    "0000000000000000"
)


@pytest.mark.timeout(60)
def test_memory_region() -> None:
    # struct VhostUserMemoryRegion { u64 guest_phys_addr, memory_size, userspace_addr, mmap_offset; }
    assert MemoryRegion.sizeof() == 32
    assert MemoryRegion.build(REGION_A) == REGION_A_BYTES
    assert MemoryRegion.build(REGION_B) == REGION_B_BYTES
    assert _plain(MemoryRegion.parse(REGION_A_BYTES)) == REGION_A
    assert _plain(MemoryRegion.parse(REGION_B_BYTES)) == REGION_B


@pytest.mark.timeout(60)
def test_memory_table_one_region() -> None:
    # struct VhostUserMemory { u32 nregions; u32 padding; VhostUserMemoryRegion regions[]; }
    golden = bytes.fromhex("01000000" "00000000") + REGION_A_BYTES
    value = {"num_regions": 1, "regions": [REGION_A]}
    built = MemoryTable.build(value)
    assert built == golden
    assert len(built) == 8 + 32
    assert _plain(MemoryTable.parse(golden)) == value


@pytest.mark.timeout(60)
def test_memory_table_two_regions() -> None:
    golden = bytes.fromhex("02000000" "00000000") + REGION_A_BYTES + REGION_B_BYTES
    value = {"num_regions": 2, "regions": [REGION_A, REGION_B]}
    built = MemoryTable.build(value)
    assert built == golden
    assert len(built) == 8 + 2 * 32
    assert _plain(MemoryTable.parse(golden)) == value


@pytest.mark.timeout(60)
def test_single_memory_region() -> None:
    # struct VhostUserMemRegMsg { u64 padding; VhostUserMemoryRegion region; }
    golden = bytes.fromhex("0000000000000000") + REGION_B_BYTES
    assert SingleMemoryRegion.sizeof() == 40
    assert SingleMemoryRegion.build({"region": REGION_B}) == golden
    assert _plain(SingleMemoryRegion.parse(golden)) == {"region": REGION_B}


@pytest.mark.timeout(60)
def test_config_space() -> None:
    # struct VhostUserConfig { u32 offset, size, flags; u8 region[size]; }
    value = {"offset": 0x14, "size": 4, "flags": 0, "payload": b"\x01\x02\x03\x04"}
    golden = bytes.fromhex("14000000" "04000000" "00000000" "01020304")
    assert CONFIG_SPACE_HEADER_SIZE == 12
    assert ConfigSpace.build(value) == golden
    assert _plain(ConfigSpace.parse(golden)) == value


# -- virtio-blk config space -----------------------------------------------------------------

BLK_CONFIG_VALUES = {
    "capacity": 0x0102_0304_0506_0708,
    "size_max": 0x1112_1314,
    "seg_max": 0x2122_2324,
    "cylinders": 0x3132,
    "heads": 0x33,
    "sectors": 0x34,
    "blk_size": 0x4142_4344,
    "physical_block_exp": 0x51,
    "alignment_offset": 0x52,
    "min_io_size": 0x5354,
    "opt_io_size": 0x6162_6364,
    "writeback": 0x71,
    "num_queues": 0x7273,
    "max_discard_sectors": 0x8182_8384,
    "max_discard_seg": 0x9192_9394,
    "discard_sector_alignment": 0xA1A2_A3A4,
    "max_write_zeroes_sectors": 0xB1B2_B3B4,
    "max_write_zeroes_seg": 0xC1C2_C3C4,
    "write_zeroes_may_unmap": 0xD1,
}
BLK_CONFIG_GOLDEN = bytes.fromhex(
    "0807060504030201"  # 0  capacity
    "14131211"  # 8  size_max
    "24232221"  # 12 seg_max
    "3231" "33" "34"  # 16 geometry {cylinders, heads, sectors}
    "44434241"  # 20 blk_size
    "51"  # 24 physical_block_exp
    "52"  # 25 alignment_offset
    "5453"  # 26 min_io_size
    "64636261"  # 28 opt_io_size
    "71" "00"  # 32 writeback, unused0
    "7372"  # 34 num_queues
    "84838281"  # 36 max_discard_sectors
    "94939291"  # 40 max_discard_seg
    "a4a3a2a1"  # 44 discard_sector_alignment
    "b4b3b2b1"  # 48 max_write_zeroes_sectors
    "c4c3c2c1"  # 52 max_write_zeroes_seg
    "d1" "000000"  # 56 write_zeroes_may_unmap, unused1[3]
)

# (field, offset, struct format) from struct virtio_blk_config in linux/virtio_blk.h
BLK_CONFIG_OFFSETS = [
    ("capacity", 0, "<Q"),
    ("size_max", 8, "<I"),
    ("seg_max", 12, "<I"),
    ("cylinders", 16, "<H"),
    ("heads", 18, "<B"),
    ("sectors", 19, "<B"),
    ("blk_size", 20, "<I"),
    ("physical_block_exp", 24, "<B"),
    ("alignment_offset", 25, "<B"),
    ("min_io_size", 26, "<H"),
    ("opt_io_size", 28, "<I"),
    ("writeback", 32, "<B"),
    ("num_queues", 34, "<H"),
    ("max_discard_sectors", 36, "<I"),
    ("max_discard_seg", 40, "<I"),
    ("discard_sector_alignment", 44, "<I"),
    ("max_write_zeroes_sectors", 48, "<I"),
    ("max_write_zeroes_seg", 52, "<I"),
    ("write_zeroes_may_unmap", 56, "<B"),
]


@pytest.mark.timeout(60)
def test_virtio_blk_config_golden() -> None:
    assert len(BLK_CONFIG_GOLDEN) == 60
    assert VirtioBlkConfig.sizeof() == 60
    built = VirtioBlkConfig.build(BLK_CONFIG_VALUES)
    assert built == BLK_CONFIG_GOLDEN
    assert _plain(VirtioBlkConfig.parse(BLK_CONFIG_GOLDEN)) == BLK_CONFIG_VALUES


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("field", "offset", "fmt"), BLK_CONFIG_OFFSETS)
def test_virtio_blk_config_offsets(field: str, offset: int, fmt: str) -> None:
    # Only this field non-zero: it must land at exactly its C offset and nowhere else.
    values = dict.fromkeys(BLK_CONFIG_VALUES, 0)
    values[field] = BLK_CONFIG_VALUES[field]
    built = VirtioBlkConfig.build(values)
    expected = bytearray(60)
    struct.pack_into(fmt, expected, offset, BLK_CONFIG_VALUES[field])
    assert built == bytes(expected)


# -- control socket --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_control_header_golden() -> None:
    # struct vpv_ctl_header { char magic[4]; u16 version; u16 flags; u32 cmd; u32 seq; u32 length; }
    value = {"version": CONTROL_VERSION, "flags": FLAG_REPLY, "cmd": int(Command.STATUS), "seq": 7,
             "length": 0x0102}
    golden = bytes.fromhex("56505643" "0100" "0100" "01760080" "07000000" "02010000")
    assert CONTROL_MAGIC == b"VPVC"
    assert ControlHeader.sizeof() == 20
    assert ControlHeader.build(value) == golden
    parsed = _plain(ControlHeader.parse(golden))
    assert parsed == {"magic": b"VPVC", **value}


@pytest.mark.timeout(60)
def test_reply_status_golden() -> None:
    assert ReplyStatus.build(0) == b"\0\0\0\0"
    assert ReplyStatus.build(-13) == bytes.fromhex("f3ffffff")  # -EACCES
    assert ReplyStatus.parse(bytes.fromhex("f3ffffff")) == -13


def _linux_ioc(direction: int, kind: int, nr: int, size: int) -> int:
    # include/uapi/asm-generic/ioctl.h: _IOC_NRSHIFT 0, TYPESHIFT 8, SIZESHIFT 16, DIRSHIFT 30
    return (direction << 30) | (kind << 8) | (nr << 0) | (size << 16)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("direction", "kind", "nr", "size", "known"),
    [
        (0, 0xAF, 0x01, 0, 0xAF01),  # VHOST_SET_OWNER = _IO(0xAF, 0x01)
        (2, 0xAF, 0x00, 8, 0x8008AF00),  # VHOST_GET_FEATURES = _IOR(0xAF, 0x00, __u64)
        (1, 0xAF, 0x00, 8, 0x4008AF00),  # VHOST_SET_FEATURES = _IOW(0xAF, 0x00, __u64)
        (2, 0x12, 114, 8, 0x80081272),  # BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        (3, ord("v"), 0xFF, 0x3FFF, 0xFFFF76FF),  # every field at its maximum
    ],
)
def test_ioc_matches_linux(direction: int, kind: int, nr: int, size: int, known: int) -> None:
    assert ioc(direction, chr(kind), nr, size) == _linux_ioc(direction, kind, nr, size) == known


@pytest.mark.timeout(60)
def test_status_command_number() -> None:
    # _IOR('v', 0x01, 0): read direction, no size.
    assert int(Command.STATUS) == 0x80007601
    assert int(Command.STATUS) >> 30 == 2
    assert (int(Command.STATUS) >> 8) & 0xFF == ord("v")
    assert int(Command.STATUS) & 0xFF == 0x01
    assert (int(Command.STATUS) >> 16) & 0x3FFF == 0


# -- volume header slot ----------------------------------------------------------------------

FIXED_HEADER = VolumeHeader(
    uuid=uuid.UUID("00112233-4455-6677-8899-aabbccddeeff"),
    capacity=64 << 20,
    data_offset=1 << 20,
    ring_offset=(1 << 20) + (64 << 20),
    ring_size=2 << 20,
    created_ns=0x1122_3344_5566_7788,
    generation=3,
    state=VolumeState.DANGLING,
    read_only=True,
    read_policy=ReadPolicy.ZEROS,
    ring_full_policy=RingFullPolicy.OVERWRITE,
    ttl_action=TtlAction.DELETE,
    ttl_seconds=3600,
    dangling_since_ns=0x0102_0304_0506_0708,
    reason="gone",
    owner="abc",
    allowed_uids=(0, 1000),
    allowed_gids=(100,),
    dangling_source="ioctl",
    owner_name="web-1",
    owner_image="sha256:ab",
    owner_pid=0x1234,
    owner_pid_start=0x0A0B_0C0D,
)

FIXED_BODY_V1 = (
    bytes.fromhex(
        "56484f5354505601"  # 0   magic "VHOSTPV\x01"
        "0200" "0000"  # 8   version 2, pad
        "03000000"  # 12  flags: read-only | both-copies (every record this build writes)
        "0300000000000000"  # 16  generation
        "00112233445566778899aabbccddeeff"  # 24  uuid
        "8877665544332211"  # 40  created_ns
        "0000100000000000"  # 48  data_offset  1 MiB
        "0000000400000000"  # 56  capacity     64 MiB
        "0000100400000000"  # 64  ring_offset  65 MiB
        "0000200000000000"  # 72  ring_size    2 MiB
        "02000000"  # 80  state DANGLING
        "01" "01" "01" "00"  # 84  read_policy, ring_full_policy, ttl_action, pad
        "100e000000000000"  # 88  ttl_seconds 3600
        "0807060504030201"  # 96  dangling_since_ns
    )
    + b"gone" + bytes(60)  # 104 reason[64]
    + b"abc" + bytes(125)  # 168 owner[128]
    + bytes.fromhex("00000000" "e8030000" + "ffffffff" * 6)  # 296 allowed_uids[8]
    + bytes.fromhex("64000000" + "ffffffff" * 7)  # 328 allowed_gids[8]
    + b"ioctl" + bytes(27)  # 360 dangling_source[32]
)
FIXED_BODY = (
    FIXED_BODY_V1
    + b"web-1" + bytes(59)  # 392 owner_name[64]
    + b"sha256:ab" + bytes(71)  # 456 owner_image[80]
    + bytes.fromhex("34120000" "00000000")  # 536 owner_pid, pad
    + bytes.fromhex("0d0c0b0a00000000")  # 544 owner_pid_start
)


@pytest.mark.timeout(60)
def test_header_body_layout_size() -> None:
    assert len(FIXED_BODY_V1) == HeaderBodyV1.sizeof() == 392
    assert len(FIXED_BODY) == HeaderBody.sizeof() == 552
    assert HeaderSlot.sizeof() == 556


@pytest.mark.timeout(60)
def test_encode_slot_golden() -> None:
    slot = encode_slot(FIXED_HEADER)
    assert len(slot) == SLOT_SIZE
    assert slot[:8] == MAGIC == b"VHOSTPV\x01"
    assert struct.unpack_from("<H", slot, 8)[0] == FORMAT_VERSION == 2
    assert slot[:552] == FIXED_BODY
    crc = struct.unpack_from("<I", slot, 552)[0]
    assert crc == zlib.crc32(slot[:552])
    assert slot[556:] == bytes(SLOT_SIZE - 556)
    assert decode_slot(slot) == FIXED_HEADER


@pytest.mark.timeout(60)
def test_decode_version_1_slot() -> None:
    # A volume written before the owner binding existed reads with an empty binding.
    body = bytearray(FIXED_BODY_V1)
    body[8:10] = b"\x01\x00"
    raw = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    header = decode_slot(raw.ljust(SLOT_SIZE, b"\0"))
    assert header == dataclasses.replace(FIXED_HEADER, owner_name="", owner_image="", owner_pid=0,
                                         owner_pid_start=0)
    # A damaged version 1 record is still named as such.
    damaged = bytearray(raw.ljust(SLOT_SIZE, b"\0"))
    damaged[200] ^= 0x10
    with pytest.raises(HeaderError, match="checksum"):
        decode_slot(bytes(damaged))


@pytest.mark.timeout(60)
def test_decode_slot_without_both_copies_flag() -> None:
    # A record from a build that wrote one copy per update (flags: read-only only) holds the
    # same header: the flag says how the copies were written, not what the volume is.
    body = bytearray(FIXED_BODY)
    body[12:16] = struct.pack("<I", FLAG_READ_ONLY)
    raw = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    assert decode_slot(raw.ljust(SLOT_SIZE, b"\0")) == FIXED_HEADER
    assert (FLAG_READ_ONLY, FLAG_BOTH_COPIES) == (1, 2)


@pytest.mark.timeout(60)
def test_decode_hand_built_slot() -> None:
    raw = FIXED_BODY + struct.pack("<I", zlib.crc32(FIXED_BODY))
    assert decode_slot(raw.ljust(SLOT_SIZE, b"\0")) == FIXED_HEADER


@pytest.mark.timeout(60)
def test_decode_flipped_byte_names_checksum() -> None:
    slot = encode_slot(FIXED_HEADER)
    # Every byte after magic and version, including the CRC itself.
    for offset in range(10, HeaderSlot.sizeof()):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(slot)
            damaged[offset] ^= mask
            with pytest.raises(HeaderError, match="checksum") as info:
                decode_slot(bytes(damaged))
            assert "checksum" in str(info.value), offset


@pytest.mark.timeout(60)
def test_decode_flipped_magic_and_version() -> None:
    slot = encode_slot(FIXED_HEADER)
    damaged = bytearray(slot)
    damaged[3] ^= 0x01
    with pytest.raises(HeaderError, match="magic"):
        decode_slot(bytes(damaged))
    damaged = bytearray(slot)
    damaged[8] ^= 0x01
    with pytest.raises(HeaderError, match="version 3"):
        decode_slot(bytes(damaged))


@pytest.mark.timeout(60)
def test_volume_set_request_golden() -> None:
    # struct vpv_ctl_volume_set { char volume[64]; u32 mask; u8 read_policy, ring_full_policy,
    # ttl_action, pad; u64 ttl_seconds; i32 allowed_uids[8]; i32 allowed_gids[8];
    # char owner[128]; u32 owner_pid; u32 pad2; }
    value = {
        "volume": "vol0",
        "mask": SET_TTL | SET_READ_POLICY | SET_ALLOWED_UIDS | SET_ALLOWED_GIDS | SET_OWNER,
        "read_policy": int(ReadPolicy.ZEROS),
        "ring_full_policy": int(RingFullPolicy.OVERWRITE),
        "ttl_action": int(TtlAction.DELETE),
        "ttl_seconds": 3600,
        "allowed_uids": [0, 107, -1, -1, -1, -1, -1, -1],
        "allowed_gids": [-1] * 8,
        "owner": "web-1",
        "owner_pid": 0x1234,
    }
    golden = (
        b"vol0" + bytes(60)  # 0   volume[64]
        + bytes.fromhex(
            "75000000"  # 64  mask: ttl | read policy | uids | gids | owner
            "01" "01" "01" "00"  # 68  read_policy zeros, ring_full_policy overwrite, ttl_action delete, pad
            "100e000000000000"  # 72  ttl_seconds 3600
            "00000000" "6b000000" + "ffffffff" * 6  # 80  allowed_uids[8]: 0, 107, then -1
            + "ffffffff" * 8  # 112 allowed_gids[8]: none
        )
        + b"web-1" + bytes(123)  # 144 owner[128]
        + bytes.fromhex("34120000" "00000000")  # 272 owner_pid, pad2
    )
    assert (SET_TTL, SET_TTL_ACTION, SET_READ_POLICY, SET_RING_FULL_POLICY, SET_ALLOWED_UIDS,
            SET_ALLOWED_GIDS, SET_OWNER, CLEAR_OWNER) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert SET_IDS == MAX_ALLOWED_IDS == 8  # the request carries as many ids as the header keeps
    assert len(golden) == VolumeSetRequest.sizeof() == 280
    assert VolumeSetRequest.build(value) == golden
    assert _plain(VolumeSetRequest.parse(golden)) == value
    # _IOWR('v', 0x1a, struct vpv_ctl_volume_set)
    assert int(Command.VOLUME_SET) == _linux_ioc(3, ord("v"), 0x1A, 280) == 0xC118761A
