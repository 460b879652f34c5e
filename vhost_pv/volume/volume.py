"""Volume files: create, open, inspect, and update the header crash-safely."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import struct
import time
import uuid
from pathlib import Path
from typing import Any

from vhost_pv._native import ffi, lib
from vhost_pv.humanize import parse_size as parse_size  # its home before; C-free in humanize
from vhost_pv.volume.header import (
    DATA_OFFSET,
    SECTOR_SIZE,
    SLOT_OFFSETS,
    SLOT_SIZE,
    STATE_WORD_OFFSET,
    HeaderError,
    ReadPolicy,
    RingFullPolicy,
    SlotResolution,
    TtlAction,
    VolumeHeader,
    encode_slot,
    resolve_slots,
)
from vhost_pv.volume.ring import RingError, format_ring

log = logging.getLogger(__name__)

DEFAULT_RING_SIZE = 16 << 20
MIN_RING_SIZE = 1 << 20


@dataclasses.dataclass(frozen=True)
class CreateOptions:
    size: int
    ring_size: int = DEFAULT_RING_SIZE
    owner: str = ""
    read_only: bool = False
    read_policy: ReadPolicy = ReadPolicy.DENY
    ring_full_policy: RingFullPolicy = RingFullPolicy.REJECT
    ttl_seconds: int = 0
    ttl_action: TtlAction = TtlAction.ALERT
    allowed_uids: tuple[int, ...] = (0,)
    allowed_gids: tuple[int, ...] = ()
    vm_uuid: uuid.UUID | None = None
    vm_name: str = ""
    vm_cgroup: str = ""


def create_volume(path: Path, options: CreateOptions) -> VolumeHeader:
    """Write a new sparse volume file; refuses to replace an existing file."""
    if options.size <= 0 or options.size % SECTOR_SIZE:
        raise ValueError(f"size {options.size} must be a positive multiple of {SECTOR_SIZE}")
    if options.ring_size < MIN_RING_SIZE or options.ring_size % SECTOR_SIZE:
        raise ValueError(f"ring size must be at least {MIN_RING_SIZE} bytes, sector aligned")
    header = VolumeHeader(
        uuid=uuid.uuid4(),
        capacity=options.size,
        data_offset=DATA_OFFSET,
        ring_offset=DATA_OFFSET + options.size,
        ring_size=options.ring_size,
        created_ns=time.time_ns(),
        generation=1,
        read_only=options.read_only,
        read_policy=options.read_policy,
        ring_full_policy=options.ring_full_policy,
        ttl_seconds=options.ttl_seconds,
        ttl_action=options.ttl_action,
        owner=options.owner,
        allowed_uids=options.allowed_uids,
        allowed_gids=options.allowed_gids,
        vm_uuid=options.vm_uuid,
        vm_name=options.vm_name,
        vm_cgroup=options.vm_cgroup,
    )
    slot = encode_slot(header)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, header.ring_offset + header.ring_size)
        # The header area (both copies, the live state word, the seal) is given its blocks
        # now: a flip on a file system that has filled up since must still write them.
        os.posix_fallocate(fd, 0, header.data_offset)
        # Both copies start identical, so either one alone is a valid header.
        for offset in SLOT_OFFSETS:
            os.pwrite(fd, slot, offset)
        os.pwrite(fd, struct.pack("<I", int(header.state)), STATE_WORD_OFFSET)
        format_ring(fd, header)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fsync_dir(path.parent)
    return header


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def destroy_volume(path: Path, fd: int, size: int) -> None:
    """Wipe and remove a volume: header slots first (from then on the file is no volume,
    whatever happens next), then every block is freed, then the file goes."""
    for offset in (*SLOT_OFFSETS, STATE_WORD_OFFSET):
        os.pwrite(fd, bytes(SLOT_SIZE), offset)
    os.fsync(fd)
    rc = lib.vpv_zero_range(fd, 0, size)
    if rc < 0:
        raise OSError(-rc, f"cannot free the blocks of {path}: {os.strerror(-rc)}")
    os.fsync(fd)
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_header(path: Path) -> VolumeHeader:
    """The current header of a volume file (HeaderError if it has none that is valid): the
    state a daemon would serve it in, dangling if its copies disagree in a way that could
    hide a dangling state (see resolve_slots)."""
    return inspect_header(path).header


def inspect_header(path: Path) -> SlotResolution:
    """Both header copies of a volume file and how they were resolved (read only)."""
    # O_NONBLOCK: opening a FIFO given by mistake must not wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise HeaderError(f"not a volume file: a {_file_kind(info.st_mode)}, not a regular file")
        slots = [_read_at(fd, offset) for offset in SLOT_OFFSETS]
    finally:
        os.close(fd)
    resolution = resolve_slots(slots)
    header = resolution.header
    size = info.st_size
    if size < header.ring_offset + header.ring_size:
        raise HeaderError(
            f"file is {size} bytes but the header describes "
            f"{header.ring_offset + header.ring_size}: truncated volume"
        )
    return resolution


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _allocate_header_area(fd: int, header: VolumeHeader, path: Path) -> None:
    """Give the header area its blocks if it lacks them (a volume created sparse by an
    earlier build): the flip and its seal must not need free space later. Without room now
    the volume is served anyway, and a flip on a full file system may fail to seal."""
    try:
        os.posix_fallocate(fd, 0, header.data_offset)
    except OSError as exc:
        log.warning("%s: cannot allocate the header area (%s): a flip while the file system "
                    "is full may fail to write the seal", path, exc.strerror or exc)


def _read_at(fd: int, offset: int) -> bytes:
    return os.pread(fd, SLOT_SIZE, offset)


class Volume:
    """An open volume: its fd, header, and the C object the data path shares (state word,
    flip lock, quarantine ring, dangling events)."""

    def __init__(self, path: Path, *, direct: bool = False) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.native: Any = None
        # Direct mode: the data region's reads and writes bypass the page cache (O_DIRECT
        # on a second fd; the header, ring and seal keep the buffered one).
        self.direct_fd = -1
        try:
            if direct:
                self.direct_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
            slots = [_read_at(self.fd, offset) for offset in SLOT_OFFSETS]
            self.resolution = resolve_slots(slots)
            self._slot, self.header = self.resolution.slot, self.resolution.header
            size = os.fstat(self.fd).st_size
            end = self.header.ring_offset + self.header.ring_size
            if size < end:
                raise HeaderError(f"file is {size} bytes, header describes {end}: truncated")
            config = ffi.new(
                "struct vpv_volume_config *",
                {
                    "data_offset": self.header.data_offset,
                    "capacity": self.header.capacity,
                    "state_offset": STATE_WORD_OFFSET,
                    "ring_offset": self.header.ring_offset,
                    "ring_size": self.header.ring_size,
                    "read_policy": int(self.header.read_policy),
                    "ring_full_policy": int(self.header.ring_full_policy),
                },
            )
            err = ffi.new("int *")
            handle = lib.vpv_volume_open(self.fd, config, err)
            if handle == ffi.NULL:
                if err[0] == -74:  # EBADMSG
                    raise RingError(f"{path}: the quarantine ring superblock is missing or damaged")
                raise OSError(-err[0], f"{path}: cannot open the data path: {os.strerror(-err[0])}")
            self.native = handle
            _allocate_header_area(self.fd, self.header, path)
            if self.resolution.needs_repair:
                self._repair()
                if self.resolution.history:
                    # Not damage: a build that wrote one copy per update left the older copy
                    # behind (header.py). The daemon alarms only on a disagreement.
                    log.info("%s: header copies from an older build (%s): copy %d served, "
                             "both rewritten in the two-copy format", path,
                             self.resolution.history, self.resolution.slot)
            # The live word is rewritten from the durable header: a stale value is never used.
            lib.vpv_volume_set_state(self.native, int(self.header.state))
        except BaseException:
            os.close(self.fd)
            if self.direct_fd >= 0:
                os.close(self.direct_fd)
            raise

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def read_only(self) -> bool:
        return self.header.read_only

    def _repair(self) -> None:
        """Both copies rewritten to the state chosen at open (forced dangling: a new
        generation, stamped now), so one later damaged copy cannot undo it."""
        header = self.header
        if self.resolution.forced:
            generations = [c.generation for c in self.resolution.copies if c is not None]
            header = dataclasses.replace(
                header, generation=max(generations) + 1,
                dangling_since_ns=header.dangling_since_ns or time.time_ns())
        self._write_both(header)
        self.header = header

    def _write_both(self, new: VolumeHeader) -> None:
        """Two-phase write: the older slot, sync, then the other, sync. A crash in the first
        write leaves the other copy old and valid; in the second, the first copy new and
        valid; afterwards both hold `new`, so one damaged copy never rolls the state back."""
        slot = encode_slot(new)
        target = 1 - self._slot
        os.pwrite(self.fd, slot, SLOT_OFFSETS[target])
        os.fdatasync(self.fd)
        os.pwrite(self.fd, slot, SLOT_OFFSETS[1 - target])
        os.fdatasync(self.fd)
        self._slot = target

    def update(self, **changes: Any) -> VolumeHeader:
        """Durably replace header fields (crash-safe: both copies rewritten one after the
        other, see _write_both), then publish state and policy to the data path. Returns
        once the data path has passed the change (see vpv_volume_set_state)."""
        new = dataclasses.replace(self.header, generation=self.header.generation + 1, **changes)
        self._write_both(new)
        self.header = new
        lib.vpv_volume_set_policy(self.native, int(new.read_policy), int(new.ring_full_policy))
        lib.vpv_volume_set_state(self.native, int(new.state))
        return new

    def ring_stats(self) -> dict[str, int]:
        out = ffi.new("struct vpv_ring_stats *")
        lib.vpv_volume_ring_stats(self.native, out)
        return {name: int(getattr(out, name)) for name, _ in ffi.typeof("struct vpv_ring_stats").fields}

    def ring_sync(self) -> None:
        """Bring the ring superblock on disk up to date before reading the file."""
        rc = lib.vpv_volume_ring_sync(self.native)
        if rc < 0:
            raise OSError(-rc, f"cannot write the ring superblock of {self.path}")

    def ring_reset(self) -> None:
        rc = lib.vpv_volume_ring_reset(self.native)
        if rc < 0:
            raise OSError(-rc, f"cannot reset the ring of {self.path}")

    def drain_events(self, limit: int = 256) -> tuple[list[dict[str, int]], int]:
        """Queued dangling I/O events and how many were lost since the last drain."""
        out = ffi.new("struct vpv_dangling_event[]", limit)
        lost = ffi.new("uint64_t *")
        n = lib.vpv_volume_drain_events(self.native, out, limit, lost)
        fields = [f for f, _ in ffi.typeof("struct vpv_dangling_event").fields if not f.startswith("_")]
        return [{f: int(getattr(out[i], f)) for f in fields} for i in range(n)], int(lost[0])

    @property
    def event_fd(self) -> int:
        return int(lib.vpv_volume_event_fd(self.native))

    def close(self) -> None:
        if self.native is not None:
            lib.vpv_volume_close(self.native)
            self.native = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
