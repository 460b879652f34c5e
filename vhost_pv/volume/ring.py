"""The quarantine ring on disk: layout, formatting, reading, verifying, replaying.

While a volume is dangling the C data path appends every write (and discard / write-zeroes)
here instead of touching the data region (csrc/volume.c). The layout is declared once
below with construct; csrc/vpv_ring.h mirrors it and a test compiles a program against that
header to check the offsets agree.

Reading goes through numpy over an mmap of the ring region: record payloads are views of
the file, hashed and dumped without copying them through Python objects first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from construct import Bytes, Const, Int16ul, Int32ul, Int64ul, Padding, Struct

from vhost_pv._native import lib
from vhost_pv.virtio.blk import DiscardSegment
from vhost_pv.volume.header import SECTOR_SIZE, VolumeHeader

RING_MAGIC = b"VPVRING1"
RING_VERSION = 1
SUPER_SIZE = 4096
ALIGN = 512
RECORD_MAGIC = 0x51525056
RECORD_HEADER_SIZE = 512


class RecordType:
    WRITE = 1
    DISCARD = 2
    WRITE_ZEROES = 3
    PAD = 0xFFFF

    NAMES: ClassVar[dict[int, str]] = {
        WRITE: "write", DISCARD: "discard", WRITE_ZEROES: "write-zeroes", PAD: "pad",
    }


RingSuper = Struct(
    "magic" / Const(RING_MAGIC),
    "version" / Int32ul,
    "align" / Int32ul,
    "area_offset" / Int64ul,
    "area_size" / Int64ul,
    "head" / Int64ul,
    "tail" / Int64ul,
    "next_seq" / Int64ul,
    "records" / Int64ul,
    "dropped" / Int64ul,
    "rejected" / Int64ul,
    "last_hash" / Bytes(32),
    "crc32" / Int32ul,
    Padding(4),
)
"""C: struct vpv_ring_super (csrc/vpv_ring.h), 120 bytes at the start of the ring region;
crc32 is zlib's CRC-32 of the 112 bytes before it."""
SUPER_CRC_OFFSET = 112

RecordHeader = Struct(
    "magic" / Int32ul,
    "type" / Int16ul,
    "queue" / Int16ul,
    "seq" / Int64ul,
    "time_ns" / Int64ul,
    "sector" / Int64ul,
    "length" / Int32ul,
    "payload_len" / Int32ul,
    "source" / Int32ul,
    "total_len" / Int32ul,
    "payload_sha256" / Bytes(32),
    "prev_hash" / Bytes(32),
    "record_hash" / Bytes(32),
)
"""C: struct vpv_ring_record (csrc/vpv_ring.h), 144 bytes, zero-padded to 512; record_hash is
the SHA-256 of the first 112 bytes."""
RECORD_HASHED_BYTES = 112

class RingError(Exception):
    """The ring region is not a valid quarantine ring; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class RingRecord:
    position: int  # logical position in the ring
    seq: int
    type: int
    queue: int
    time_ns: int
    sector: int
    length: int
    payload_len: int
    source: int
    total_len: int
    payload_sha256: bytes
    prev_hash: bytes
    record_hash: bytes

    @property
    def type_name(self) -> str:
        return RecordType.NAMES.get(self.type, f"unknown-{self.type}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "type": self.type_name,
            "queue": self.queue,
            "time_ns": self.time_ns,
            "sector": self.sector,
            "length": self.length,
            "payload_len": self.payload_len,
            "source": self.source,
            "payload_sha256": self.payload_sha256.hex(),
            "prev_hash": self.prev_hash.hex(),
            "record_hash": self.record_hash.hex(),
        }


@dataclasses.dataclass
class ChainReport:
    """What verifying the records found. ok means every check passed."""

    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    unacknowledged: int = 0
    """Valid records past the superblock's tail (see RingReader.past_tail): not a problem."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "problems": self.problems,
            "unacknowledged_past_tail": self.unacknowledged,
        }


def empty_super(ring_size: int) -> bytes:
    """The superblock image of an empty ring filling a region of ring_size bytes."""
    area = (ring_size - SUPER_SIZE) // ALIGN * ALIGN
    if area < RECORD_HEADER_SIZE + ALIGN:
        raise RingError(f"ring region of {ring_size} bytes is too small")
    fields = {
        "version": RING_VERSION,
        "align": ALIGN,
        "area_offset": SUPER_SIZE,
        "area_size": area,
        "head": 0,
        "tail": 0,
        "next_seq": 1,
        "records": 0,
        "dropped": 0,
        "rejected": 0,
        "last_hash": bytes(32),
        "crc32": 0,
    }
    raw = bytearray(RingSuper.build(fields))
    raw[SUPER_CRC_OFFSET : SUPER_CRC_OFFSET + 4] = zlib.crc32(raw[:SUPER_CRC_OFFSET]).to_bytes(4, "little")
    return bytes(raw).ljust(SUPER_SIZE, b"\0")


def format_ring(fd: int, header: VolumeHeader) -> None:
    """Write an empty ring (the caller syncs)."""
    os.pwrite(fd, empty_super(header.ring_size), header.ring_offset)


def parse_super(raw: bytes) -> Any:
    if raw[:8] != RING_MAGIC:
        raise RingError(f"bad ring magic {raw[:8]!r}: the quarantine ring is not formatted")
    stored_crc = int.from_bytes(raw[SUPER_CRC_OFFSET : SUPER_CRC_OFFSET + 4], "little")
    if zlib.crc32(raw[:SUPER_CRC_OFFSET]) != stored_crc:
        raise RingError("ring superblock checksum mismatch: the superblock is damaged")
    sb = RingSuper.parse(raw[: RingSuper.sizeof()])
    if sb.version != RING_VERSION or sb.align != ALIGN or sb.area_offset != SUPER_SIZE:
        raise RingError(f"unsupported ring format (version {sb.version}, align {sb.align})")
    if sb.head > sb.tail or sb.tail - sb.head > sb.area_size:
        raise RingError(f"ring positions are inconsistent (head {sb.head}, tail {sb.tail})")
    return sb


class RingReader:
    """Read-only view of a volume's ring through numpy over an mmap of the file."""

    def __init__(self, path: Path, header: VolumeHeader) -> None:
        self.header = header
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        end = header.ring_offset + header.ring_size
        if len(self._map) < end:
            self._map.close()
            raise RingError(f"file ends at {len(self._map)}, before the ring's end {end}")
        self.region = np.frombuffer(
            self._map, dtype=np.uint8, count=header.ring_size, offset=header.ring_offset
        )
        self.super = parse_super(self.region[:SUPER_SIZE].tobytes())
        self.area = self.region[SUPER_SIZE : SUPER_SIZE + self.super.area_size]

    def close(self) -> None:
        # Drop our numpy views before the map they point into. A caller still holding a
        # payload view keeps the map alive; it is then released with the last view.
        del self.area, self.region
        with contextlib.suppress(BufferError):
            self._map.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        sb = self.super
        return {
            "area_size": sb.area_size,
            "bytes_used": sb.tail - sb.head,
            "records": sb.records,
            "next_seq": sb.next_seq,
            "dropped": sb.dropped,
            "rejected": sb.rejected,
            "last_hash": bytes(sb.last_hash).hex(),
        }

    def _record_at(self, position: int) -> RingRecord:
        offset = position % self.super.area_size
        if offset + RECORD_HEADER_SIZE > self.super.area_size:
            raise RingError(f"record at position {position} runs past the end of the area")
        raw = self.area[offset : offset + RecordHeader.sizeof()].tobytes()
        rec = RecordHeader.parse(raw)
        if rec.magic != RECORD_MAGIC:
            raise RingError(f"no record at position {position} (magic {rec.magic:#x})")
        if (
            rec.total_len < RECORD_HEADER_SIZE
            or rec.total_len % ALIGN
            or offset + rec.total_len > self.super.area_size
        ):
            raise RingError(f"record at position {position} has a bad length {rec.total_len}")
        if rec.type != RecordType.PAD and rec.payload_len > rec.total_len - RECORD_HEADER_SIZE:
            raise RingError(f"record seq {rec.seq} claims {rec.payload_len} payload bytes")
        return RingRecord(
            position, rec.seq, rec.type, rec.queue, rec.time_ns, rec.sector, rec.length,
            rec.payload_len, rec.source, rec.total_len, bytes(rec.payload_sha256),
            bytes(rec.prev_hash), bytes(rec.record_hash),
        )

    def records(self) -> Iterator[RingRecord]:
        """Live records, oldest first (PAD records skipped)."""
        position = self.super.head
        while position < self.super.tail:
            record = self._record_at(position)
            position += record.total_len
            if record.type != RecordType.PAD:
                yield record

    def payload(self, record: RingRecord) -> np.ndarray[Any, np.dtype[np.uint8]]:
        start = record.position % self.super.area_size + RECORD_HEADER_SIZE
        return self.area[start : start + record.payload_len]

    def past_tail(self) -> list[RingRecord]:
        """Records written after the superblock's tail that chain on from its newest record.

        The daemon writes a record, then the superblock that covers it, and only then tells
        the guest the write completed; a crash between the two leaves records here that no
        guest ever saw acknowledged. They are not part of the ring (replay ignores them) but
        worth reporting rather than ignoring silently. Each must carry the next sequence
        number, chain on from the previous hash and hash correctly, so a stale record from an
        earlier lap of the ring is never taken for one."""
        sb = self.super
        found: list[RingRecord] = []
        position, previous, seq = sb.tail, bytes(sb.last_hash), sb.next_seq
        while position - sb.head < sb.area_size:
            try:
                record = self._record_at(position)
            except RingError:
                break
            if position + record.total_len - sb.head > sb.area_size:
                break  # would reach the live records
            if record.type != RecordType.PAD:
                offset = position % sb.area_size
                hashed = self.area[offset : offset + RECORD_HASHED_BYTES]
                if (
                    record.seq != seq
                    or record.prev_hash != previous
                    or hashlib.sha256(hashed.data).digest() != record.record_hash
                    or hashlib.sha256(self.payload(record).data).digest() != record.payload_sha256
                ):
                    break
                found.append(record)
                previous, seq = record.record_hash, seq + 1
            position += record.total_len
        return found

    def verify(self) -> ChainReport:
        """Check every record's own hash, its payload digest and the chain between them."""
        report = ChainReport()
        previous: bytes | None = None
        try:
            for record in self.records():
                offset = record.position % self.super.area_size
                hashed = self.area[offset : offset + RECORD_HASHED_BYTES]
                if hashlib.sha256(hashed.data).digest() != record.record_hash:
                    report.problems.append(f"seq {record.seq}: record header altered (hash mismatch)")
                if hashlib.sha256(self.payload(record).data).digest() != record.payload_sha256:
                    report.problems.append(f"seq {record.seq}: payload altered (digest mismatch)")
                if previous is not None and record.prev_hash != previous:
                    report.problems.append(f"seq {record.seq}: chain broken (prev_hash does not match)")
                if previous is None and record.seq == 1 and record.prev_hash != bytes(32):
                    report.problems.append("seq 1: first record must start the chain")
                if report.records and record.seq != report.last_seq + 1:
                    report.problems.append(f"seq {record.seq}: expected {report.last_seq + 1}")
                if not report.records:
                    report.first_seq = record.seq
                report.records += 1
                report.last_seq = record.seq
                previous = record.record_hash
        except RingError as exc:
            report.problems.append(str(exc))
        if report.records != self.super.records:
            report.problems.append(f"superblock counts {self.super.records} records, found {report.records}")
        if report.records and previous != bytes(self.super.last_hash):
            report.problems.append("newest record is not the one the superblock names (last_hash)")
        report.unacknowledged = len(self.past_tail())
        return report

    def dump(self, directory: Path) -> list[Path]:
        """Write each record's payload to DIR/<seq>-<type>-<sector>.bin; returns the files."""
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for record in self.records():
            target = directory / f"{record.seq:08d}-{record.type_name}-s{record.sector}.bin"
            with open(target, "wb") as out:
                out.write(self.payload(record).data)
            written.append(target)
        return written


def replay(path: Path, fd: int, header: VolumeHeader) -> int:
    """Apply the ring's records to the data region in order; returns how many were applied.

    Refuses (RingError) when the chain does not verify: replaying records that were altered
    would write data nobody sent.
    """
    applied = 0
    with RingReader(path, header) as reader:
        report = reader.verify()
        if not report.ok:
            raise RingError("ring does not verify, not replaying: " + "; ".join(report.problems))
        for record in reader.records():
            payload = reader.payload(record)
            if record.type == RecordType.WRITE:
                os.pwrite(fd, payload.data, header.data_offset + record.sector * SECTOR_SIZE)
            elif record.type in (RecordType.DISCARD, RecordType.WRITE_ZEROES):
                for segment in _segments(payload.tobytes()):
                    _zero_range(fd, header, segment.sector, segment.num_sectors)
            else:
                raise RingError(f"seq {record.seq}: unknown record type {record.type}")
            applied += 1
    os.fdatasync(fd)
    return applied


def _segments(raw: bytes) -> Iterator[Any]:
    size = DiscardSegment.sizeof()
    for offset in range(0, len(raw) - size + 1, size):
        yield DiscardSegment.parse(raw[offset : offset + size])


def _zero_range(fd: int, header: VolumeHeader, sector: int, count: int) -> None:
    if sector + count > header.capacity // SECTOR_SIZE:
        raise RingError(f"segment at sector {sector} (+{count}) is beyond the disk")
    # Punching a hole reads back as zeros and frees the blocks, as the live path does.
    rc = lib.vpv_zero_range(fd, header.data_offset + sector * SECTOR_SIZE, count * SECTOR_SIZE)
    if rc < 0:
        raise OSError(-rc, f"cannot zero sectors {sector}+{count}: {os.strerror(-rc)}")
