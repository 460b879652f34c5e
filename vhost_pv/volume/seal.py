"""The seal: a SHA-256 digest per chunk of the data region, taken when a volume turns dangling.

From the flip on, the backend never writes the data region, so any later difference from
the seal was made outside the backend (someone wrote the file directly). Reclaim compares
and reports the changed chunks. The seal lives in the header area, between SEAL_OFFSET and
the start of the data region, so it travels with the volume.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import os
import time
import zlib
from collections.abc import Callable

from construct import Bytes, Const, Int32ul, Int64ul, Struct

from vhost_pv.volume.header import VolumeHeader

SEAL_MAGIC = b"VPVSEAL1"
SEAL_OFFSET = 64 << 10
SEAL_HEADER_SIZE = 4096
DIGEST_SIZE = 32
MIN_CHUNK = 1 << 20

SealHeader = Struct(
    "magic" / Const(SEAL_MAGIC),
    "version" / Int32ul,
    "digest_crc32" / Int32ul,
    "chunk_size" / Int64ul,
    "count" / Int64ul,
    "sealed_ns" / Int64ul,
    "dangling_since_ns" / Int64ul,
    "capacity" / Int64ul,
    "root" / Bytes(32),
    "crc32" / Int32ul,
)
"""C: struct vpv_seal_header { u8 magic[8]; u32 version, digest_crc32; u64 chunk_size, count,
sealed_ns, dangling_since_ns, capacity; u8 root[32]; u32 crc32; } (92 bytes) at SEAL_OFFSET;
the digests (count x 32 bytes) follow at SEAL_OFFSET + 4096. crc32 covers the 88 bytes before
it, digest_crc32 the digest table; root is the SHA-256 of the digest table."""
SEAL_CRC_OFFSET = 88

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) while sealing or verifying."""


class SealError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Seal:
    chunk_size: int
    digests: list[bytes]
    sealed_ns: int
    dangling_since_ns: int
    capacity: int

    @property
    def root(self) -> str:
        return hashlib.sha256(b"".join(self.digests)).hexdigest()


def chunk_size_for(header: VolumeHeader) -> int:
    room = (header.data_offset - SEAL_OFFSET - SEAL_HEADER_SIZE) // DIGEST_SIZE
    if room <= 0:
        raise SealError("the header area has no room for a seal")
    chunk = MIN_CHUNK
    while -(-header.capacity // chunk) > room:
        chunk *= 2
    return chunk


def _next_data(fd: int, offset: int) -> int:
    """The first file offset >= offset that may hold data (-1: none, the rest reads as zeros).

    A file system without SEEK_DATA (EINVAL, EOPNOTSUPP) is taken to have data everywhere,
    so such a volume is read in full, as before."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after offset (or offset is past EOF)
            return -1
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return offset
        raise


@functools.lru_cache(maxsize=8)
def _zero_digest(length: int) -> bytes:
    return hashlib.sha256(bytes(length)).digest()


def _digests(fd: int, header: VolumeHeader, chunk: int, progress: Progress | None) -> list[bytes]:
    """SHA-256 of each chunk of the data region, reading only chunks that hold data.

    A chunk with no allocated extent reads as zeros, so its digest is the (cached) digest of
    zeros: the values are exactly those of reading every byte, and sealing a sparse volume
    costs its allocated bytes, not its capacity. lseek moves the fd's file offset, which no
    user of the volume fd relies on (they all use pread/pwrite)."""
    digests = []
    done = 0
    step = max(1, (header.capacity // chunk) // 100)
    next_data = -1
    no_more_data = False
    for index, start in enumerate(range(0, header.capacity, chunk)):
        length = min(chunk, header.capacity - start)
        offset = header.data_offset + start
        if not no_more_data and next_data < offset:  # stale after a chunk with data
            next_data = _next_data(fd, offset)
            no_more_data = next_data < 0
        if no_more_data or next_data >= offset + length:
            digests.append(_zero_digest(length))
        else:
            data = os.pread(fd, length, offset)
            if len(data) < length:  # sparse tail past EOF reads as zeros
                data += bytes(length - len(data))
            digests.append(hashlib.sha256(data).digest())
        done += length
        if progress is not None and (index % step == 0 or done == header.capacity):
            progress(done, header.capacity)
    return digests


def compute_seal(fd: int, header: VolumeHeader, progress: Progress | None = None) -> Seal:
    chunk = chunk_size_for(header)
    return Seal(chunk, _digests(fd, header, chunk, progress), time.time_ns(),
                header.dangling_since_ns, header.capacity)


def write_seal(fd: int, seal: Seal) -> None:
    """Store the seal durably: digests first, then the header that makes them valid."""
    table = b"".join(seal.digests)
    os.pwrite(fd, table, SEAL_OFFSET + SEAL_HEADER_SIZE)
    fields = {
        "version": 1,
        "digest_crc32": zlib.crc32(table),
        "chunk_size": seal.chunk_size,
        "count": len(seal.digests),
        "sealed_ns": seal.sealed_ns,
        "dangling_since_ns": seal.dangling_since_ns,
        "capacity": seal.capacity,
        "root": hashlib.sha256(table).digest(),
        "crc32": 0,
    }
    raw = bytearray(SealHeader.build(fields))
    raw[SEAL_CRC_OFFSET:] = zlib.crc32(raw[:SEAL_CRC_OFFSET]).to_bytes(4, "little")
    os.fdatasync(fd)
    os.pwrite(fd, bytes(raw), SEAL_OFFSET)
    os.fdatasync(fd)


def clear_seal(fd: int) -> None:
    os.pwrite(fd, bytes(SealHeader.sizeof()), SEAL_OFFSET)
    os.fdatasync(fd)


def read_seal(fd: int, header: VolumeHeader) -> Seal | None:
    """The stored seal, None if there is none; SealError if it is damaged."""
    raw = os.pread(fd, SealHeader.sizeof(), SEAL_OFFSET)
    if raw[:8] != SEAL_MAGIC:
        return None
    if zlib.crc32(raw[:SEAL_CRC_OFFSET]) != int.from_bytes(raw[SEAL_CRC_OFFSET:], "little"):
        raise SealError("seal header checksum mismatch")
    parsed = SealHeader.parse(raw)
    if parsed.capacity != header.capacity or parsed.chunk_size <= 0:
        raise SealError("seal does not describe this data region")
    table = os.pread(fd, parsed.count * DIGEST_SIZE, SEAL_OFFSET + SEAL_HEADER_SIZE)
    if zlib.crc32(table) != parsed.digest_crc32 or hashlib.sha256(table).digest() != parsed.root:
        raise SealError("seal digest table is damaged")
    digests = [table[i : i + DIGEST_SIZE] for i in range(0, len(table), DIGEST_SIZE)]
    return Seal(parsed.chunk_size, digests, parsed.sealed_ns, parsed.dangling_since_ns, parsed.capacity)


@dataclasses.dataclass(frozen=True)
class SealCheck:
    chunk_size: int
    changed_chunks: list[int]

    def changed_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges of the data region that differ from the seal."""
        return [(i * self.chunk_size, self.chunk_size) for i in self.changed_chunks]


def check_seal(fd: int, header: VolumeHeader, seal: Seal, progress: Progress | None = None) -> SealCheck:
    now = _digests(fd, header, seal.chunk_size, progress)
    changed = [i for i, (a, b) in enumerate(zip(seal.digests, now, strict=True)) if a != b]
    return SealCheck(seal.chunk_size, changed)
