"""Control socket wire format: ioctl-style requests, each layout declared once (construct).

A request is a ControlHeader followed by `length` payload bytes; the reply is a ControlHeader
(same cmd and seq, REPLY flag) followed by an int32 status (0 or a negative errno) and the
reply payload. Command numbers follow Linux's _IOC encoding with type 'v', so a C program can
build them with the usual macros.
"""

from __future__ import annotations

import enum

from construct import Const, Int16ul, Int32sl, Int32ul, Struct

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


class Command(enum.IntEnum):
    """Control commands (size field 0: payloads are variable-length)."""

    STATUS = ioc(_IOC_READ, "v", 0x01, 0)



