"""Control socket wire format: ioctl-style requests, each layout declared once (construct).

A request is a ControlHeader followed by `length` payload bytes; the reply is a ControlHeader
(same cmd and seq, REPLY flag) followed by an int32 status (0 or a negative errno) and the
reply payload. Command numbers follow Linux's _IOC encoding with type 'v', so a C program can
build them with the usual macros.
"""

from __future__ import annotations

import enum

from construct import (
    Array,
    Const,
    Int8ul,
    Int16ul,
    Int32sl,
    Int32ul,
    Int64ul,
    PaddedString,
    Padding,
    Struct,
)

CONTROL_MAGIC = b"VPVC"
CONTROL_VERSION = 1
FLAG_REPLY = 1
MAX_CONTROL_PAYLOAD = 1 << 20

ControlHeader = Struct(
    "magic" / Const(CONTROL_MAGIC),
    "version" / Int16ul,
    "flags" / Int16ul,
    "cmd" / Int32ul,
    "seq" / Int32ul,
    "length" / Int32ul,
)
"""C: struct vpv_ctl_header { char magic[4]; u16 version; u16 flags; u32 cmd; u32 seq;
u32 length; } (20 bytes)."""

ReplyStatus = Int32sl
"""C: int32_t status at the start of every reply payload: 0 or -errno."""

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def ioc(direction: int, kind: str, number: int, size: int) -> int:
    """Linux _IOC(dir, type, nr, size)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


NAME_LEN = 64
REASON_LEN = 128
OWNER_LEN = 128

DanglingRequest = Struct(
    "volume" / PaddedString(NAME_LEN, "utf8"),
    "flags" / Int32ul,
    Padding(4),
    "reason" / PaddedString(REASON_LEN, "utf8"),
)
"""C: struct vpv_ctl_dangling { char volume[64]; u32 flags; u32 pad; char reason[128]; }
(200 bytes). flags: DANGLING_CLEAR clears the flag instead of setting it."""
DANGLING_CLEAR = 1

DanglingReply = Struct(
    "state" / Int32ul,
    "changed" / Int32ul,
    "generation" / Int64ul,
    "dangling_since_ns" / Int64ul,
    "flip_ns" / Int64ul,
)
"""C: struct vpv_ctl_dangling_reply { u32 state; u32 changed; u64 generation;
u64 dangling_since_ns; u64 flip_ns; } (32 bytes). flip_ns: how long the durable update and
the quiescing of the queue workers took."""

ReclaimRequest = Struct(
    "volume" / PaddedString(NAME_LEN, "utf8"),
    "owner" / PaddedString(OWNER_LEN, "utf8"),
    "mode" / Int32ul,
    Padding(4),
)
"""C: struct vpv_ctl_reclaim { char volume[64]; char owner[128]; u32 mode; u32 pad; }
(200 bytes). Reply: JSON report (seal check, ring outcome)."""


class ReclaimMode(enum.IntEnum):
    KEEP = 0
    REPLAY = 1
    DISCARD = 2


RingRequest = Struct(
    "volume" / PaddedString(NAME_LEN, "utf8"),
    "op" / Int32ul,
    Padding(4),
)
"""C: struct vpv_ctl_ring { char volume[64]; u32 op; u32 pad; } (72 bytes). Reply: JSON."""


class RingOp(enum.IntEnum):
    LIST = 0
    DUMP = 1
    REPLAY = 2
    DISCARD = 3


VolumeRequest = Struct(
    "volume" / PaddedString(NAME_LEN, "utf8"),
    "flags" / Int32ul,
    Padding(4),
)
"""C: struct vpv_ctl_volume { char volume[64]; u32 flags; u32 pad; } (72 bytes), for DELETE.
flags: DELETE_FORCE deletes a volume that is not dangling."""
DELETE_FORCE = 1

AlertsRequest = Struct(
    "flags" / Int32ul,
    Padding(4),
    "since_seq" / Int64ul,
)
"""C: struct vpv_ctl_alerts { u32 flags; u32 pad; u64 since_seq; } (16 bytes). With
ALERTS_FOLLOW the daemon keeps the connection and sends one reply per new alert."""
ALERTS_FOLLOW = 1


BindRequest = Struct(
    "volume" / PaddedString(NAME_LEN, "utf8"),
    "container" / PaddedString(OWNER_LEN, "utf8"),
    "pid" / Int32ul,
    Padding(4),
)
"""C: struct vpv_ctl_bind { char volume[64]; char container[128]; u32 pid; u32 pad; }
(200 bytes). Records the volume's owner: with an engine the daemon resolves `container` (id,
prefix or name) to its full id, name, image and init pid; without one, `pid` (0: none) is
the owner's init pid for process events. Reply: JSON (the recorded binding)."""


META_KEY_LEN = 192
MetaRequest = Struct(
    "op" / Int32ul,
    "value_len" / Int32ul,
    "vm" / PaddedString(NAME_LEN, "utf8"),
    "key" / PaddedString(META_KEY_LEN, "utf8"),
)
"""C: struct vpv_ctl_meta { u32 op; u32 value_len; char vm[64]; char key[192]; } (264
bytes), followed by value_len bytes of UTF-8 value (SET only). key: ROOT/KEY (instance/,
attributes/, secrets/) or a directory for LIST. Reply: JSON."""


class MetaOp(enum.IntEnum):
    GET = 0
    SET = 1
    REMOVE = 2
    LIST = 3
    BOOT = 4  # a new boot of the VM: a new one-time token


SET_IDS = 8
"""uids/gids a VOLUME_SET request carries at most (the header's MAX_ALLOWED_IDS)."""

VolumeSetRequest = Struct(
    "volume" / PaddedString(NAME_LEN, "utf8"),
    "mask" / Int32ul,
    "read_policy" / Int8ul,
    "ring_full_policy" / Int8ul,
    "ttl_action" / Int8ul,
    Padding(1),
    "ttl_seconds" / Int64ul,
    "allowed_uids" / Array(SET_IDS, Int32sl),
    "allowed_gids" / Array(SET_IDS, Int32sl),
    "owner" / PaddedString(OWNER_LEN, "utf8"),
    "owner_pid" / Int32ul,
    Padding(4),
)
"""C: struct vpv_ctl_volume_set { char volume[64]; u32 mask; u8 read_policy, ring_full_policy,
ttl_action, pad; u64 ttl_seconds; i32 allowed_uids[8]; i32 allowed_gids[8]; char owner[128];
u32 owner_pid; u32 pad2; } (280 bytes). Changes the settings of a served volume: only the
fields whose SET_* bit is in `mask` (the others are ignored, so "leave unchanged" is explicit).
An id list ends at its first -1 (an empty list: -1 first). SET_OWNER records `owner` (resolved
by the engine like BIND, `owner_pid` without one); CLEAR_OWNER leaves the volume without one.
Reply: JSON (the fields changed, old and new, and the settings now)."""
SET_TTL = 1 << 0
SET_TTL_ACTION = 1 << 1
SET_READ_POLICY = 1 << 2
SET_RING_FULL_POLICY = 1 << 3
SET_ALLOWED_UIDS = 1 << 4
SET_ALLOWED_GIDS = 1 << 5
SET_OWNER = 1 << 6
CLEAR_OWNER = 1 << 7
SET_ALL = (1 << 8) - 1
NO_SET_ID = -1


class Command(enum.IntEnum):
    """Control commands, numbered like Linux ioctls (_IOC(dir, 'v', nr, sizeof(request)))."""

    STATUS = ioc(_IOC_READ, "v", 0x01, 0)
    PERSISTENT_DISK_DANGLING = ioc(_IOC_READ | _IOC_WRITE, "v", 0x10, DanglingRequest.sizeof())
    RECLAIM = ioc(_IOC_READ | _IOC_WRITE, "v", 0x11, ReclaimRequest.sizeof())
    RING = ioc(_IOC_READ | _IOC_WRITE, "v", 0x12, RingRequest.sizeof())
    DELETE = ioc(_IOC_WRITE, "v", 0x13, VolumeRequest.sizeof())
    ALERTS = ioc(_IOC_READ | _IOC_WRITE, "v", 0x14, AlertsRequest.sizeof())
    BIND = ioc(_IOC_READ | _IOC_WRITE, "v", 0x15, BindRequest.sizeof())
    META = ioc(_IOC_READ | _IOC_WRITE, "v", 0x16, MetaRequest.sizeof())
    VOLUME_SET = ioc(_IOC_READ | _IOC_WRITE, "v", 0x1A, VolumeSetRequest.sizeof())


# Every fixed request layout by command, for the server's size check.
REQUEST_LAYOUTS = {
    Command.PERSISTENT_DISK_DANGLING: DanglingRequest,
    Command.RECLAIM: ReclaimRequest,
    Command.RING: RingRequest,
    Command.DELETE: VolumeRequest,
    Command.ALERTS: AlertsRequest,
    Command.BIND: BindRequest,
    Command.META: MetaRequest,
    Command.VOLUME_SET: VolumeSetRequest,
}

# Commands whose fixed layout is followed by a variable part (its length is in the layout).
VARIABLE_TAIL = frozenset({Command.META})
