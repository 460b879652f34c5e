"""The volume header: layout, validation and crash-safe updates.

A volume file is `[header area | data region | quarantine ring]`. The header area holds two
copies ("slots") of the header record, each with a generation number and a CRC32. An update
writes the slot holding the older generation and syncs it, then the other slot and syncs
it, so that afterwards both copies hold the current state and one damaged copy cannot roll
a flip back. A crash at any byte of either write leaves one valid copy, old or new, never a
mix (resolve_slots reads them):

- during the first write: the untouched copy holds the old state; the torn one is damaged
  (or complete). If the torn copy's state field already reads dangling, or reads garbage,
  while the old state was attached, the volume is served dangling: a flip may have been
  under way.
- between the writes: the copies are valid and differ. The newer one wins, unless it says
  attached and the older dangling (an interrupted clear or reclaim): served dangling.
- during the second write: the first copy holds the new state; the torn one is damaged. The
  same rule as in the first write applies, so an interrupted clear may read dangling.

None of these updates had returned, so no acknowledged state is lost, and the conservative
choice only ever errs towards dangling (writes go to the quarantine ring, never lost).

The rule for two valid copies that differ holds only for copies this writer wrote: every
record it writes carries FLAG_BOTH_COPIES. A build that wrote one copy per update left the
older copy behind on purpose, without the flag: after a flip and a clear its copies are
"newer attached, older dangling" with nothing interrupted. Such a pair (either copy without
the flag) is an ordinary old-format history: the newer copy is served, both copies are
rewritten with the flag at open (logged at INFO, no alert). The upgrade's own crash cases,
the first open of such a volume rewriting both copies (the older slot first):

- during the first write: the newer old-format copy is intact and served; the torn one is
  damaged, so the damaged-copy rule applies: if its state field still reads the older
  copy's dangling (a tear in its first 84 bytes) the volume is served dangling. A damaged
  copy's flag cannot be trusted, so this errs towards dangling like any damaged copy.
- between the writes: the copies hold the same record, one with the flag and one without:
  they agree, the record is served (the next update rewrites both with the flag).
- during the second write: the first copy holds the record with the flag; the torn one
  differs from it only in the flag and the CRC, so its state field agrees: served as is.

The first update after the upgrade of a volume that was not reopened in between (both old
copies alike, e.g. never updated) can be cut between its writes too: the newer copy has the
flag, the older not, so the newer is served even if it is an interrupted clear. It is a
complete record of an update under way, the outcome any crash may give.

The record grew by appending (FORMAT_VERSION): version 2 added the owner binding, version 3
the VM binding. Older records read with the bindings they lack empty, and the next update
writes version 3 records to both copies as any update does, so the cases above hold for that
upgrade too: a tear in its first write leaves the torn copy failing its CRC (a version 3 CRC
sits past the end of the older body, where the older slot has zeros) and the untouched older
copy is served, with the damaged-copy rule for its state field; between the writes both copies
are valid and carry FLAG_BOTH_COPIES, the version 3 one is newer and wins; during the second
write the first copy is complete. A version 2 and a version 3 copy of the same record (the VM
binding empty) are the same header. tests/unit/test_header.py tears that upgrade at every byte.

The header area also holds the *live state word* that the C hot path reads on every
request (see csrc/vhost_pv.h, VPV_STATE_*). It mirrors the durable state while a daemon
serves the volume and is rewritten from the slots each time the volume is opened, so a
stale value there is never trusted.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
import zlib
from typing import Any
from uuid import UUID

from construct import (
    Array,
    Bytes,
    Checksum,
    ChecksumError,
    Const,
    ConstError,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    PaddedString,
    Padding,
    RawCopy,
    StreamError,
    StringError,
    Struct,
    this,
)

# The data region is addressed in virtio-blk sectors: one fact, declared in vhost_pv.virtio.
from vhost_pv.virtio.blk import SECTOR_SIZE as SECTOR_SIZE

MAGIC = b"VHOSTPV\x01"
# Version 2 added the owner binding (container name, image, init pid); version 3 the VM
# binding (which QEMU may attach: vm_uuid, vm_name, vm_cgroup). Older headers still read
# (the bindings they lack are empty) and become version 3 at their next update, crash-safely
# (module docstring). A build that reads only versions 1 and 2 refuses a version 3 header
# ("unsupported format version 3"): a downgrade needs the volume recreated or rewritten.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SLOT_SIZE = 4096
SLOT_OFFSETS = (0, SLOT_SIZE)
# Offset of the live state word (uint32) read by the C hot path, on its own page.
STATE_WORD_OFFSET = 2 * SLOT_SIZE
# Data starts 1 MiB in: room for later header-area tables and good alignment for the guest.
DATA_OFFSET = 1 << 20
MAX_ALLOWED_IDS = 8
NO_ID = -1


class VolumeState(enum.IntEnum):
    """Values of the state field and the live state word (VPV_STATE_* in vhost_pv.h)."""

    ATTACHED = 1
    DANGLING = 2


class ReadPolicy(enum.IntEnum):
    """What reads of a dangling volume return."""

    DENY = 0
    ZEROS = 1
    ALLOW = 2


class RingFullPolicy(enum.IntEnum):
    """What a write to a dangling volume does when the quarantine ring is full."""

    REJECT = 0
    OVERWRITE = 1


class TtlAction(enum.IntEnum):
    """What happens when a dangling volume's time limit passes."""

    ALERT = 0
    DELETE = 1


FLAG_READ_ONLY = 1 << 0
# Set in every record this build writes (create and the two-phase update write both copies).
# Two valid copies that differ are a crash or damage only when both carry it; without it
# the older copy is the history of a build that wrote one copy per update (module docstring).
FLAG_BOTH_COPIES = 1 << 1
FLAGS_OFFSET = 12

HeaderBodyV1 = Struct(
    "magic" / Const(MAGIC),
    "version" / Int16ul,
    Padding(2),
    "flags" / Int32ul,
    "generation" / Int64ul,
    "uuid" / Bytes(16),
    "created_ns" / Int64ul,
    "data_offset" / Int64ul,
    "capacity" / Int64ul,
    "ring_offset" / Int64ul,
    "ring_size" / Int64ul,
    "state" / Int32ul,
    "read_policy" / Int8ul,
    "ring_full_policy" / Int8ul,
    "ttl_action" / Int8ul,
    Padding(1),
    "ttl_seconds" / Int64ul,
    "dangling_since_ns" / Int64ul,
    "reason" / PaddedString(64, "utf8"),
    "owner" / PaddedString(128, "utf8"),
    "allowed_uids" / Array(MAX_ALLOWED_IDS, Int32sl),
    "allowed_gids" / Array(MAX_ALLOWED_IDS, Int32sl),
    "dangling_source" / PaddedString(32, "utf8"),
)
"""C: struct vpv_header_body (little-endian, packed):
u8 magic[8]; u16 version; u16 pad; u32 flags; u64 generation; u8 uuid[16]; u64 created_ns;
u64 data_offset, capacity, ring_offset, ring_size; u32 state; u8 read_policy,
ring_full_policy, ttl_action, pad; u64 ttl_seconds, dangling_since_ns; char reason[64];
char owner[128]; i32 allowed_uids[8]; i32 allowed_gids[8]; char dangling_source[32]
(392 bytes). This is the whole body of a version 1 header."""

OWNER_NAME_LEN = 64
OWNER_IMAGE_LEN = 80

OwnerBinding = Struct(
    "owner_name" / PaddedString(OWNER_NAME_LEN, "utf8"),
    "owner_image" / PaddedString(OWNER_IMAGE_LEN, "utf8"),
    "owner_pid" / Int32ul,
    Padding(4),
    "owner_pid_start" / Int64ul,
)
"""C: struct vpv_owner_binding { char owner_name[64]; char owner_image[80]; u32 owner_pid;
u32 pad; u64 owner_pid_start; } (160 bytes), after the version 1 body. owner_pid_start is
the pid's start time in clock ticks since boot (/proc/PID/stat field 22): with it a pid
that was reused by another process after the owner exited is never mistaken for the owner."""

HeaderBodyV2 = HeaderBodyV1 + OwnerBinding
"""C: struct vpv_header_body_v2 { struct vpv_header_body v1; struct vpv_owner_binding
owner; } (552 bytes). This is the whole body of a version 2 header."""

VM_NAME_LEN = 64
VM_CGROUP_LEN = 128

VmBinding = Struct(
    "vm_uuid" / Bytes(16),
    "vm_name" / PaddedString(VM_NAME_LEN, "utf8"),
    "vm_cgroup" / PaddedString(VM_CGROUP_LEN, "utf8"),
)
"""C: struct vpv_vm_binding { u8 vm_uuid[16]; char vm_name[64]; char vm_cgroup[128]; } (208
bytes), after the owner binding. Which VM's QEMU may attach, by what the host sees of the
connecting process (vhost_pv.peer_identity): its `-uuid` (all zero: any), its `-name`
guest name ("": any) and its cgroup ("": any; a path starting with "/" matches that cgroup
and those below it, anything else is a unit name, glob allowed, matched against each
component of the process's cgroup path). Every field that is set must match."""

HeaderBody = HeaderBodyV2 + VmBinding
"""C: struct vpv_header_body_v3 { struct vpv_header_body v1; struct vpv_owner_binding
owner; struct vpv_vm_binding vm; } (760 bytes)."""

HeaderSlot = Struct(
    "body" / RawCopy(HeaderBody),
    "checksum" / Checksum(Int32ul, lambda data: zlib.crc32(data), this.body.data),
)
"""C: struct vpv_header_slot { struct vpv_header_body_v3 body; u32 crc32_of_body; }, stored
at offsets 0 and 4096 of the volume, zero-padded to 4096 bytes (csrc/vpv_header.h)."""

HeaderSlotV2 = Struct(
    "body" / RawCopy(HeaderBodyV2),
    "checksum" / Checksum(Int32ul, lambda data: zlib.crc32(data), this.body.data),
)
"""A version 2 slot (552-byte body + CRC), read only."""

HeaderSlotV1 = Struct(
    "body" / RawCopy(HeaderBodyV1),
    "checksum" / Checksum(Int32ul, lambda data: zlib.crc32(data), this.body.data),
)
"""A version 1 slot (392-byte body + CRC), read only."""

SLOT_LAYOUTS = {1: HeaderSlotV1, 2: HeaderSlotV2, 3: HeaderSlot}
"""The slot layout of each readable format version."""


class HeaderError(Exception):
    """The header cannot be used; the message names what is wrong."""


@dataclasses.dataclass(frozen=True)
class VolumeHeader:
    """One header record, in Python terms."""

    uuid: uuid.UUID
    capacity: int
    data_offset: int
    ring_offset: int
    ring_size: int
    created_ns: int
    generation: int = 1
    state: VolumeState = VolumeState.ATTACHED
    read_only: bool = False
    read_policy: ReadPolicy = ReadPolicy.DENY
    ring_full_policy: RingFullPolicy = RingFullPolicy.REJECT
    ttl_action: TtlAction = TtlAction.ALERT
    ttl_seconds: int = 0
    dangling_since_ns: int = 0
    reason: str = ""
    owner: str = ""
    allowed_uids: tuple[int, ...] = (0,)
    allowed_gids: tuple[int, ...] = ()
    dangling_source: str = ""
    """What flipped the volume: "ioctl", "engine", "proc-events", ... (empty if never)."""
    owner_name: str = ""
    """The owner container's name as the engine reported it (owner holds its full id)."""
    owner_image: str = ""
    """The image id the owner ran: the default reclaim policy asks a new owner for the same."""
    owner_pid: int = 0
    """The owner's init pid, watched through kernel process events (0: none known)."""
    owner_pid_start: int = 0
    # UUID, not uuid.UUID: in the class body `uuid` is the field above.
    vm_uuid: UUID | None = None
    """The VM whose QEMU may attach, by its -uuid (None: any; see VmBinding)."""
    vm_name: str = ""
    """... by its -name guest name ("": any)."""
    vm_cgroup: str = ""
    """... by its cgroup: a path (that cgroup or below) or a unit name ("": any)."""

    @property
    def vm_bound(self) -> bool:
        """Whether any VM binding field is set: attaches are then checked against it."""
        return self.vm_uuid is not None or bool(self.vm_name) or bool(self.vm_cgroup)

    @property
    def dangling(self) -> bool:
        return self.state == VolumeState.DANGLING

    @property
    def serial(self) -> bytes:
        """The 20-byte virtio-blk serial (GET_ID): derived from the UUID, stable per volume."""
        return self.uuid.hex[:20].encode("ascii")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view for `inspect --json` and status."""
        return {
            "uuid": str(self.uuid),
            "generation": self.generation,
            "capacity": self.capacity,
            "data_offset": self.data_offset,
            "ring_offset": self.ring_offset,
            "ring_size": self.ring_size,
            "created_ns": self.created_ns,
            "state": self.state.name.lower(),
            "dangling": self.dangling,
            "dangling_since_ns": self.dangling_since_ns,
            "reason": self.reason,
            "dangling_source": self.dangling_source,
            "owner": self.owner,
            "owner_name": self.owner_name,
            "owner_image": self.owner_image,
            "owner_pid": self.owner_pid,
            "owner_pid_start": self.owner_pid_start,
            "vm_uuid": str(self.vm_uuid) if self.vm_uuid is not None else "",
            "vm_name": self.vm_name,
            "vm_cgroup": self.vm_cgroup,
            "read_only": self.read_only,
            "read_policy": self.read_policy.name.lower(),
            "ring_full_policy": self.ring_full_policy.name.lower(),
            "ttl_seconds": self.ttl_seconds,
            "ttl_action": self.ttl_action.name.lower(),
            "allowed_uids": list(self.allowed_uids),
            "allowed_gids": list(self.allowed_gids),
            "serial": self.serial.decode("ascii"),
        }


def _pad_ids(ids: tuple[int, ...], what: str) -> list[int]:
    if len(ids) > MAX_ALLOWED_IDS:
        raise HeaderError(f"at most {MAX_ALLOWED_IDS} {what} can be recorded, got {len(ids)}")
    return list(ids) + [NO_ID] * (MAX_ALLOWED_IDS - len(ids))


def encode_slot(header: VolumeHeader) -> bytes:
    """The 4096-byte slot image of a header record."""
    for field, limit in (("reason", 64), ("owner", 128), ("dangling_source", 32),
                         ("owner_name", OWNER_NAME_LEN), ("owner_image", OWNER_IMAGE_LEN),
                         ("vm_name", VM_NAME_LEN), ("vm_cgroup", VM_CGROUP_LEN)):
        if len(getattr(header, field).encode()) > limit:
            raise HeaderError(f"{field} is longer than {limit} bytes")
    body = {
        "version": FORMAT_VERSION,
        "flags": FLAG_BOTH_COPIES | (FLAG_READ_ONLY if header.read_only else 0),
        "generation": header.generation,
        "uuid": header.uuid.bytes,
        "created_ns": header.created_ns,
        "data_offset": header.data_offset,
        "capacity": header.capacity,
        "ring_offset": header.ring_offset,
        "ring_size": header.ring_size,
        "state": int(header.state),
        "read_policy": int(header.read_policy),
        "ring_full_policy": int(header.ring_full_policy),
        "ttl_action": int(header.ttl_action),
        "ttl_seconds": header.ttl_seconds,
        "dangling_since_ns": header.dangling_since_ns,
        "reason": header.reason,
        "owner": header.owner,
        "allowed_uids": _pad_ids(header.allowed_uids, "uids"),
        "allowed_gids": _pad_ids(header.allowed_gids, "gids"),
        "dangling_source": header.dangling_source,
        "owner_name": header.owner_name,
        "owner_image": header.owner_image,
        "owner_pid": header.owner_pid,
        "owner_pid_start": header.owner_pid_start,
        # The nil UUID is "any": QEMU started without -uuid reports it, so it names no VM.
        "vm_uuid": header.vm_uuid.bytes if header.vm_uuid is not None else bytes(16),
        "vm_name": header.vm_name,
        "vm_cgroup": header.vm_cgroup,
    }
    raw: bytes = HeaderSlot.build({"body": {"value": body}})
    return raw.ljust(SLOT_SIZE, b"\0")


def _enum(kind: type[enum.IntEnum], value: int, field: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise HeaderError(f"{field} has unknown value {value}") from None


def decode_slot(raw: bytes) -> VolumeHeader:
    """Parse and validate one slot image; HeaderError says what is wrong with it."""
    if len(raw) < 10:
        raise HeaderError(f"truncated: {len(raw)} bytes, a header needs {HeaderSlot.sizeof()}")
    if raw[: len(MAGIC)] != MAGIC:
        raise HeaderError(f"bad magic {raw[:len(MAGIC)]!r}: not a vhost-pv volume")
    version = int.from_bytes(raw[8:10], "little")
    if version not in READABLE_VERSIONS:
        raise HeaderError(f"unsupported format version {version} (this build reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    slot_layout = SLOT_LAYOUTS[version]
    if len(raw) < slot_layout.sizeof():
        raise HeaderError(f"truncated: {len(raw)} bytes, a header needs {slot_layout.sizeof()}")
    # Verify the CRC before decoding any field: a damaged record must be reported as such,
    # not as whatever its damaged bytes happen to fail (e.g. invalid UTF-8 in owner/reason).
    body_size = slot_layout.sizeof() - 4
    if zlib.crc32(raw[:body_size]) != int.from_bytes(raw[body_size : body_size + 4], "little"):
        raise HeaderError("checksum mismatch: the header record is damaged")
    try:
        parsed = slot_layout.parse(raw)
    except ChecksumError:
        raise HeaderError("checksum mismatch: the header record is damaged") from None
    except (ConstError, StreamError, StringError, UnicodeDecodeError) as exc:
        raise HeaderError(f"unreadable header record: {exc}") from None
    body = parsed.body.value
    header = VolumeHeader(
        uuid=uuid.UUID(bytes=bytes(body.uuid)),
        capacity=body.capacity,
        data_offset=body.data_offset,
        ring_offset=body.ring_offset,
        ring_size=body.ring_size,
        created_ns=body.created_ns,
        generation=body.generation,
        state=_enum(VolumeState, body.state, "state"),
        read_only=bool(body.flags & FLAG_READ_ONLY),
        read_policy=_enum(ReadPolicy, body.read_policy, "read_policy"),
        ring_full_policy=_enum(RingFullPolicy, body.ring_full_policy, "ring_full_policy"),
        ttl_action=_enum(TtlAction, body.ttl_action, "ttl_action"),
        ttl_seconds=body.ttl_seconds,
        dangling_since_ns=body.dangling_since_ns,
        reason=body.reason,
        owner=body.owner,
        allowed_uids=tuple(i for i in body.allowed_uids if i != NO_ID),
        allowed_gids=tuple(i for i in body.allowed_gids if i != NO_ID),
        dangling_source=body.dangling_source,
        owner_name=body.get("owner_name", ""),
        owner_image=body.get("owner_image", ""),
        owner_pid=body.get("owner_pid", 0),
        owner_pid_start=body.get("owner_pid_start", 0),
        vm_uuid=_vm_uuid(bytes(body.get("vm_uuid", bytes(16)))),
        vm_name=body.get("vm_name", ""),
        vm_cgroup=body.get("vm_cgroup", ""),
    )
    check_geometry(header)
    return header


def _vm_uuid(raw: bytes) -> uuid.UUID | None:
    """The stored VM UUID; all zero bytes (the nil UUID) is "any VM"."""
    return uuid.UUID(bytes=raw) if any(raw) else None


def check_geometry(header: VolumeHeader) -> None:
    """Regions must be sector aligned, in order and not overlapping."""
    if header.capacity <= 0 or header.capacity % SECTOR_SIZE:
        raise HeaderError(f"capacity {header.capacity} is not a positive multiple of {SECTOR_SIZE}")
    if header.data_offset < STATE_WORD_OFFSET + SLOT_SIZE or header.data_offset % SECTOR_SIZE:
        raise HeaderError(f"data offset {header.data_offset} overlaps the header area")
    if header.ring_offset < header.data_offset + header.capacity:
        raise HeaderError(
            f"ring offset {header.ring_offset} overlaps the data region "
            f"[{header.data_offset}, {header.data_offset + header.capacity})"
        )
    if header.ring_size < 0 or header.ring_offset % SECTOR_SIZE:
        raise HeaderError(f"ring at {header.ring_offset} size {header.ring_size} is misaligned")


def choose_slot(slots: list[bytes]) -> tuple[int, VolumeHeader]:
    """Pick the valid slot with the highest generation, or say why none is valid."""
    valid: list[tuple[int, VolumeHeader]] = []
    problems: list[str] = []
    for index, raw in enumerate(slots):
        try:
            valid.append((index, decode_slot(raw)))
        except HeaderError as exc:
            problems.append(f"copy {index}: {exc}")
    if not valid:
        raise HeaderError("no valid header (" + "; ".join(problems) + ")")
    return max(valid, key=lambda item: item[1].generation)


# The state field's offset in a slot (see HeaderBodyV1): read on its own from a copy whose
# CRC fails, to learn whether the damaged copy might have held a dangling state.
STATE_FIELD_OFFSET = 80
DAMAGED_REASON = "header-damaged"


@dataclasses.dataclass(frozen=True)
class SlotResolution:
    """What the two copies say and which state the volume is to be served in.

    `header` is what to serve: the newest valid copy, unless the copies disagree in a way
    that could hide a dangling state; then it is that copy turned dangling (`forced`).
    `disagreement` says in one line how the copies differ ("" when they agree)."""

    slot: int
    header: VolumeHeader
    copies: tuple[VolumeHeader | None, ...]
    problems: tuple[str, ...]
    disagreement: str
    forced: bool
    history: str = ""
    """One line when the copies differ as a build that wrote one copy per update left them
    (no alarm: the newer copy is served, both are rewritten at open), else ""."""

    @property
    def consistent(self) -> bool:
        return not self.disagreement

    @property
    def needs_repair(self) -> bool:
        """Whether open is to rewrite both copies (a disagreement or an old-format history)."""
        return bool(self.disagreement or self.history)


def _raw_state(raw: bytes) -> int | None:
    """The state field of a (possibly damaged) slot, or None if the copy is too short."""
    if len(raw) < STATE_FIELD_OFFSET + 4:
        return None
    return int.from_bytes(raw[STATE_FIELD_OFFSET:STATE_FIELD_OFFSET + 4], "little")


def _both_copies_flag(raw: bytes) -> bool:
    """Whether a valid (CRC-checked) slot was written by the two-copy writer."""
    return bool(int.from_bytes(raw[FLAGS_OFFSET:FLAGS_OFFSET + 4], "little") & FLAG_BOTH_COPIES)


def resolve_slots(slots: list[bytes]) -> SlotResolution:
    """The conservative reading of the two copies. After a completed update both copies
    hold the same record (Volume.update writes both), so any difference means a crash in
    the middle of an update or damage. A dangling state is never dropped because of it:

    - one copy damaged, the valid one attached, and the damaged one's state field reads
      dangling or an invalid value: served dangling (the damaged copy may have been the
      newer, dangling one; its flags are as untrustworthy as the rest of it);
    - both valid and both with FLAG_BOTH_COPIES, the newer attached and the older dangling
      (a clear or reclaim interrupted between its two writes): served dangling.

    Two valid copies of which either lacks FLAG_BOTH_COPIES are an old-format history
    (`history`, module docstring): the newer is served as it is.

    Raises HeaderError when neither copy is valid."""
    index, chosen = choose_slot(slots)
    copies: list[VolumeHeader | None] = []
    problems: list[str] = []
    for raw in slots:
        try:
            copies.append(decode_slot(raw))
            problems.append("")
        except HeaderError as exc:
            copies.append(None)
            problems.append(str(exc))
    other = 1 - index
    disagreement = ""
    forced_from: VolumeHeader | None = None
    if copies[other] is None:
        state = _raw_state(slots[other])
        readable = state in (VolumeState.ATTACHED, VolumeState.DANGLING)
        what = VolumeState(state).name.lower() if readable and state is not None else f"unreadable ({state})"
        disagreement = (f"copy {other} is damaged ({problems[other]}); its state field reads {what}, "
                        f"copy {index} (generation {chosen.generation}) says {chosen.state.name.lower()}")
        if not chosen.dangling and state != VolumeState.ATTACHED:
            forced_from = chosen
    else:
        older = copies[other]
        assert older is not None
        if older != chosen:
            differ = (f"copy {index} (generation {chosen.generation}) says "
                      f"{chosen.state.name.lower()}, copy {other} (generation {older.generation}) "
                      f"says {older.state.name.lower()}")
            if not (_both_copies_flag(slots[index]) and _both_copies_flag(slots[other])):
                old = other if not _both_copies_flag(slots[other]) else index
                history = f"{differ}; copy {old} predates the two-copy header format"
                return SlotResolution(index, chosen, tuple(copies), tuple(problems), "", False,
                                      history)
            disagreement = differ
            if not chosen.dangling and older.dangling:
                forced_from = older
    if forced_from is None:
        return SlotResolution(index, chosen, tuple(copies), tuple(problems), disagreement, False)
    served = dataclasses.replace(
        chosen, state=VolumeState.DANGLING, reason=DAMAGED_REASON, dangling_source="header",
        # The dangling copy's time when it is readable; else the record's own (0 = unknown:
        # the daemon stamps the time it found the damage).
        dangling_since_ns=forced_from.dangling_since_ns if forced_from.dangling else 0,
    )
    return SlotResolution(index, served, tuple(copies), tuple(problems), disagreement, True)
