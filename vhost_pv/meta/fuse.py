"""FUSE protocol layer of the guest-visible metadata file system (virtio-fs).

The guest mounts the VM's MetadataStore tree (`mount -t virtiofs metadata /run/metadata`):
directories are the tree's dicts, files its string values. The virtio-fs device hands every
request (fuse_in_header + arguments [+ data]) to `FuseFileSystem.handle` and copies the reply
back. Layouts follow the Linux uapi header include/uapi/linux/fuse.h; we speak protocol 7.31
(the kernel picks min(its minor, 31)) and refuse kernels older than 7.31, whose structures
differ.

Semantics:
  * inode 1 is the root; every other path gets an inode number when first seen (LOOKUP,
    READDIR[PLUS], CREATE) and keeps it while the object exists (numbers are never reused);
  * entry and attribute time-outs are 1 s (0 under volumes/) so host changes show up;
  * files are opened FOPEN_DIRECT_IO and a handle reads the value as it was at OPEN (a reader
    sees the old or the new value, never a mix); volumes/* values are computed at each open;
  * only attributes/<key> is writable: a write at offset 0 replaces the value, a write at
    offset n <= size splices data over bytes [n, n+len) (so sequential writes build a value);
    the value is stored as soon as the handle's bytes are valid UTF-8 (else FLUSH fails with
    EILSEQ); SETATTR supports truncation to 0 (and ignores time changes) on those keys only;
  * CREATE makes attributes/<new key> (empty) if the policy allows writing it;
  * the policy (vhost_pv.meta.policy) is enforced on OPEN, READ, WRITE, CREATE, SETATTR,
    OPENDIR, READDIR[PLUS] and ACCESS with the caller's uid/gid from fuse_in_header; a denial
    answers EACCES, bumps `denials` and logs one WARNING naming path, uid, gid and pid.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from construct import ConstructError, Int16ul, Int32sl, Int32ul, Int64ul, Padding, Struct

from vhost_pv.meta.policy import Policy
from vhost_pv.meta.store import MAX_VALUE, MetadataError, MetadataStore, split_path

log = logging.getLogger(__name__)

# -- protocol constants ---------------------------------------------------------------------

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 31  # what we speak; the kernel uses min(its minor, this)
MIN_KERNEL_MINOR_VERSION = 31  # older kernels use other layouts for several structs
ROOT_ID = 1
MAX_IO = 64 << 10  # max_write, and the largest READ we serve
MAX_PAGES = MAX_IO // 4096
MAX_NAME = 255
MAX_HANDLES = 4096
ENTRY_TIMEOUT = 1
VOLUME_TIMEOUT = 0
BLOCK_SIZE = 4096


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    READDIRPLUS = 44


# fuse_init_in/out flags
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30
# What we accept of the kernel's offer: big writes (one request per write up to max_write),
# READDIRPLUS (implemented), max_pages. No caching, locking, export, ACL or DAX features.
INIT_FLAGS = FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_MAX_PAGES

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11
_FATTR_TIMES = FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW | FATTR_CTIME

S_IFDIR = 0o040000
S_IFREG = 0o100000
DT_DIR = 4
DT_REG = 8

# -- layouts --------------------------------------------------------------------------------

InHeader = Struct(
    "len" / Int32ul,
    "opcode" / Int32ul,
    "unique" / Int64ul,
    "nodeid" / Int64ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "pid" / Int32ul,
    "total_extlen" / Int16ul,
    Padding(2),
)
"""C: struct fuse_in_header { u32 len; u32 opcode; u64 unique; u64 nodeid; u32 uid; u32 gid;
u32 pid; u16 total_extlen; u16 padding; } (40 bytes)."""
IN_HEADER_SIZE = InHeader.sizeof()

OutHeader = Struct("len" / Int32ul, "error" / Int32sl, "unique" / Int64ul)
"""C: struct fuse_out_header { u32 len; s32 error; u64 unique; } (16 bytes)."""
OUT_HEADER_SIZE = OutHeader.sizeof()

Attr = Struct(
    "ino" / Int64ul,
    "size" / Int64ul,
    "blocks" / Int64ul,
    "atime" / Int64ul,
    "mtime" / Int64ul,
    "ctime" / Int64ul,
    "atimensec" / Int32ul,
    "mtimensec" / Int32ul,
    "ctimensec" / Int32ul,
    "mode" / Int32ul,
    "nlink" / Int32ul,
    "uid" / Int32ul,
    "gid" / Int32ul,
    "rdev" / Int32ul,
    "blksize" / Int32ul,
    "flags" / Int32ul,
)
"""C: struct fuse_attr { u64 ino, size, blocks, atime, mtime, ctime; u32 atimensec,
mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags; } (88 bytes)."""

EntryOut = Struct(
    "nodeid" / Int64ul,
    "generation" / Int64ul,
    "entry_valid" / Int64ul,
    "attr_valid" / Int64ul,
    "entry_valid_nsec" / Int32ul,
    "attr_valid_nsec" / Int32ul,
    "attr" / Attr,
)
"""C: struct fuse_entry_out { u64 nodeid, generation, entry_valid, attr_valid;
u32 entry_valid_nsec, attr_valid_nsec; struct fuse_attr attr; } (128 bytes)."""

AttrOut = Struct(
    "attr_valid" / Int64ul,
    "attr_valid_nsec" / Int32ul,
    Padding(4),
    "attr" / Attr,
)
"""C: struct fuse_attr_out { u64 attr_valid; u32 attr_valid_nsec; u32 dummy;
struct fuse_attr attr; } (104 bytes)."""

InitInCompat = Struct(
    "major" / Int32ul,
    "minor" / Int32ul,
    "max_readahead" / Int32ul,
    "flags" / Int32ul,
)
"""C: the first 16 bytes of struct fuse_init_in { u32 major, minor, max_readahead, flags;
u32 flags2; u32 unused[11]; } (64 bytes since 7.36; 16 bytes before)."""
INIT_IN_FLAGS2_OFFSET = 16

InitOut = Struct(
    "major" / Int32ul,
    "minor" / Int32ul,
    "max_readahead" / Int32ul,
    "flags" / Int32ul,
    "max_background" / Int16ul,
    "congestion_threshold" / Int16ul,
    "max_write" / Int32ul,
    "time_gran" / Int32ul,
    "max_pages" / Int16ul,
    "map_alignment" / Int16ul,
    "flags2" / Int32ul,
    Padding(28),
)
"""C: struct fuse_init_out { u32 major, minor, max_readahead, flags; u16 max_background,
congestion_threshold; u32 max_write, time_gran; u16 max_pages, map_alignment; u32 flags2;
u32 unused[7]; } (64 bytes; flags2 is unused[0] before 7.36)."""

ForgetIn = Struct("nlookup" / Int64ul)
"""C: struct fuse_forget_in { u64 nlookup; } (8 bytes)."""

BatchForgetIn = Struct("count" / Int32ul, Padding(4))
"""C: struct fuse_batch_forget_in { u32 count; u32 dummy; } (8 bytes), followed by count
struct fuse_forget_one."""

ForgetOne = Struct("nodeid" / Int64ul, "nlookup" / Int64ul)
"""C: struct fuse_forget_one { u64 nodeid; u64 nlookup; } (16 bytes)."""
_FORGET_ONE = "<QQ"  # ForgetOne for struct.iter_unpack (the fast path of BATCH_FORGET)

GetattrIn = Struct("getattr_flags" / Int32ul, Padding(4), "fh" / Int64ul)
"""C: struct fuse_getattr_in { u32 getattr_flags; u32 dummy; u64 fh; } (16 bytes)."""

SetattrIn = Struct(
    "valid" / Int32ul,
    Padding(4),
    "fh" / Int64ul,
    "size" / Int64ul,
    "lock_owner" / Int64ul,
    "atime" / Int64ul,
    "mtime" / Int64ul,
    "ctime" / Int64ul,
    "atimensec" / Int32ul,
    "mtimensec" / Int32ul,
    "ctimensec" / Int32ul,
    "mode" / Int32ul,
    Padding(4),
    "uid" / Int32ul,
    "gid" / Int32ul,
    Padding(4),
)
"""C: struct fuse_setattr_in { u32 valid; u32 padding; u64 fh, size, lock_owner, atime,
mtime, ctime; u32 atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5; }
(88 bytes)."""

OpenIn = Struct("flags" / Int32ul, "open_flags" / Int32ul)
"""C: struct fuse_open_in { u32 flags; u32 open_flags; } (8 bytes)."""

OpenOut = Struct("fh" / Int64ul, "open_flags" / Int32ul, Padding(4))
"""C: struct fuse_open_out { u64 fh; u32 open_flags; u32 padding; } (16 bytes)."""

CreateIn = Struct("flags" / Int32ul, "mode" / Int32ul, "umask" / Int32ul, "open_flags" / Int32ul)
"""C: struct fuse_create_in { u32 flags, mode, umask, open_flags; } (16 bytes), then the
NUL-terminated name. Reply: fuse_entry_out then fuse_open_out."""

ReleaseIn = Struct("fh" / Int64ul, "flags" / Int32ul, "release_flags" / Int32ul, "lock_owner" / Int64ul)
"""C: struct fuse_release_in { u64 fh; u32 flags; u32 release_flags; u64 lock_owner; }
(24 bytes)."""

FlushIn = Struct("fh" / Int64ul, Padding(8), "lock_owner" / Int64ul)
"""C: struct fuse_flush_in { u64 fh; u32 unused; u32 padding; u64 lock_owner; } (24 bytes)."""

FsyncIn = Struct("fh" / Int64ul, "fsync_flags" / Int32ul, Padding(4))
"""C: struct fuse_fsync_in { u64 fh; u32 fsync_flags; u32 padding; } (16 bytes)."""

ReadIn = Struct(
    "fh" / Int64ul,
    "offset" / Int64ul,
    "size" / Int32ul,
    "read_flags" / Int32ul,
    "lock_owner" / Int64ul,
    "flags" / Int32ul,
    Padding(4),
)
"""C: struct fuse_read_in { u64 fh, offset; u32 size, read_flags; u64 lock_owner;
u32 flags, padding; } (40 bytes). READDIR and READDIRPLUS use it too."""

WriteIn = Struct(
    "fh" / Int64ul,
    "offset" / Int64ul,
    "size" / Int32ul,
    "write_flags" / Int32ul,
    "lock_owner" / Int64ul,
    "flags" / Int32ul,
    Padding(4),
)
"""C: struct fuse_write_in { u64 fh, offset; u32 size, write_flags; u64 lock_owner;
u32 flags, padding; } (40 bytes), followed by size bytes of data."""

WriteOut = Struct("size" / Int32ul, Padding(4))
"""C: struct fuse_write_out { u32 size; u32 padding; } (8 bytes)."""

StatfsOut = Struct(
    "blocks" / Int64ul,
    "bfree" / Int64ul,
    "bavail" / Int64ul,
    "files" / Int64ul,
    "ffree" / Int64ul,
    "bsize" / Int32ul,
    "namelen" / Int32ul,
    "frsize" / Int32ul,
    Padding(4 + 24),
)
"""C: struct fuse_statfs_out { struct fuse_kstatfs { u64 blocks, bfree, bavail, files,
ffree; u32 bsize, namelen, frsize, padding; u32 spare[6]; } st; } (80 bytes)."""

AccessIn = Struct("mask" / Int32ul, Padding(4))
"""C: struct fuse_access_in { u32 mask; u32 padding; } (8 bytes)."""

InterruptIn = Struct("unique" / Int64ul)
"""C: struct fuse_interrupt_in { u64 unique; } (8 bytes)."""

Dirent = Struct("ino" / Int64ul, "off" / Int64ul, "namelen" / Int32ul, "type" / Int32ul)
"""C: struct fuse_dirent { u64 ino, off; u32 namelen, type; char name[]; } (24 bytes +
name, padded to 8 bytes; FUSE_NAME_OFFSET = 24). struct fuse_direntplus is a
fuse_entry_out followed by a fuse_dirent (FUSE_NAME_OFFSET_DIRENTPLUS = 152)."""
NAME_OFFSET = Dirent.sizeof()


def dirent_align(size: int) -> int:
    """FUSE_DIRENT_ALIGN: round up to 8 bytes."""
    return (size + 7) & ~7


# -- state ----------------------------------------------------------------------------------


class FuseError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


@dataclass
class _File:
    path: str
    data: bytearray
    readable: bool
    writable: bool
    pending: bool = False  # written bytes not yet stored (not valid UTF-8 so far)


@dataclass
class _Dir:
    path: str
    entries: list[tuple[str, str, bool]] = field(default_factory=list)  # name, path, is_dir


Handler = Callable[[Any, bytes, int], bytes]


def _child(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _is_attribute_key(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and parts[0] == "attributes"


def _name(raw: bytes) -> str:
    """The NUL-terminated name argument, checked: no '.', '..', '/', at most 255 bytes."""
    end = raw.find(b"\0")
    if end < 0:
        raise FuseError(errno.EINVAL)
    name_bytes = raw[:end]
    if len(name_bytes) > MAX_NAME:
        raise FuseError(errno.ENAMETOOLONG)
    if name_bytes in (b"", b".", b"..") or b"/" in name_bytes:
        raise FuseError(errno.EINVAL)
    try:
        return name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise FuseError(errno.EINVAL) from None


def _parse(layout: Any, body: bytes) -> Any:
    if len(body) < layout.sizeof():
        raise FuseError(errno.EINVAL)
    return layout.parse(body)


class FuseFileSystem:
    def __init__(self, store: MetadataStore, policy: Policy) -> None:
        self._store = store
        self._policy = policy
        self.denials = 0
        self.malformed = 0  # requests dropped or ignored as unreadable
        self._initialized = False
        self._minor = 0
        self._start = int(time.time())
        self._path_of: dict[int, str] = {ROOT_ID: ""}
        self._ino_of: dict[str, int] = {"": ROOT_ID}
        self._nlookup: dict[int, int] = {}
        self._next_ino = ROOT_ID + 1
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self._handlers: dict[int, Handler] = {
            Opcode.INIT: self._init,
            Opcode.DESTROY: self._destroy,
            Opcode.LOOKUP: self._lookup,
            Opcode.GETATTR: self._getattr,
            Opcode.SETATTR: self._setattr,
            Opcode.OPEN: self._open,
            Opcode.READ: self._read,
            Opcode.WRITE: self._write,
            Opcode.CREATE: self._create,
            Opcode.RELEASE: self._release,
            Opcode.FLUSH: self._flush,
            Opcode.FSYNC: self._flush,
            Opcode.OPENDIR: self._opendir,
            Opcode.READDIR: self._readdir,
            Opcode.READDIRPLUS: self._readdirplus,
            Opcode.RELEASEDIR: self._releasedir,
            Opcode.STATFS: self._statfs,
            Opcode.ACCESS: self._access,
        }

    # -- entry point ------------------------------------------------------------------------

    def handle(self, request: bytes, reply_capacity: int) -> bytes | None:
        """One FUSE request (fuse_in_header + args [+ data]) -> the whole reply
        (fuse_out_header + payload, header.len set, at most reply_capacity bytes), or None
        for requests that get no reply (FORGET, BATCH_FORGET, INTERRUPT) or whose unique id
        cannot be read. Never raises."""
        if len(request) < IN_HEADER_SIZE:
            self._malformed("dropped a %d-byte request (shorter than a header)", len(request))
            return None
        try:
            header = InHeader.parse(request)
        except ConstructError:  # pragma: no cover - 40 bytes always parse
            return None
        try:
            if header.len < IN_HEADER_SIZE or header.len > len(request):
                raise FuseError(errno.EINVAL)
            body = bytes(request[IN_HEADER_SIZE : header.len])
            extensions = header.total_extlen * 8  # none negotiated; strip them if present
            if extensions > len(body):
                raise FuseError(errno.EINVAL)
            body = body[: len(body) - extensions]
            opcode = header.opcode
            if opcode in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT):
                self._no_reply(header, body)
                return None
            handler = self._handlers.get(opcode)
            if handler is None:
                raise FuseError(errno.ENOSYS)
            if not self._initialized and opcode != Opcode.INIT:
                raise FuseError(errno.EIO)
            payload = handler(header, body, reply_capacity - OUT_HEADER_SIZE)
            error = 0
        except FuseError as exc:
            payload, error = b"", -exc.code
        except Exception:
            log.exception("metadata fs: opcode %d failed", header.opcode)
            payload, error = b"", -errno.EIO
        if OUT_HEADER_SIZE + len(payload) > reply_capacity:
            payload, error = b"", -errno.ERANGE
            if reply_capacity < OUT_HEADER_SIZE:
                self._malformed("no room for a reply to request %d", header.unique)
                return None
        length = OUT_HEADER_SIZE + len(payload)
        out: bytes = OutHeader.build({"len": length, "error": error, "unique": header.unique})
        return out + payload

    def _no_reply(self, header: Any, body: bytes) -> None:
        try:
            if header.opcode == Opcode.FORGET:
                self._forget(header.nodeid, _parse(ForgetIn, body).nlookup)
            elif header.opcode == Opcode.BATCH_FORGET:
                count = _parse(BatchForgetIn, body).count
                size = ForgetOne.sizeof()
                start = BatchForgetIn.sizeof()
                if count * size > len(body) - start:
                    raise FuseError(errno.EINVAL)
                # struct, not construct: a 1 MiB request holds 65533 of them, and parsing
                # each with construct held the event loop for half a second.
                for nodeid, nlookup in struct.iter_unpack(_FORGET_ONE, body[start : start + count * size]):
                    self._forget(nodeid, nlookup)
            # INTERRUPT: every request is answered synchronously; nothing to interrupt.
        except Exception as exc:
            self._malformed("bad opcode %d request ignored: %s", header.opcode, exc)

    def _malformed(self, message: str, *args: object) -> None:
        """Count a request we could not read; log the 1st, 2nd, 4th, ... of them (a frontend
        can post them without end, and must not fill the disk with our log)."""
        self.malformed += 1
        if self.malformed & (self.malformed - 1) == 0:
            log.warning("metadata fs: " + message + " (%d unreadable requests so far)", *args, self.malformed)

    # -- inodes -----------------------------------------------------------------------------

    def _ino(self, path: str) -> int:
        ino = self._ino_of.get(path)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._ino_of[path] = ino
            self._path_of[ino] = path
        return ino

    def _forget(self, nodeid: int, nlookup: int) -> None:
        if nodeid == ROOT_ID or nodeid not in self._nlookup:
            return
        left = self._nlookup[nodeid] - nlookup
        if left > 0:
            self._nlookup[nodeid] = left
            return
        del self._nlookup[nodeid]
        path = self._path_of[nodeid]
        if self._find(path) is None:  # the object is gone: so is its number
            del self._path_of[nodeid]
            del self._ino_of[path]

    def _path(self, nodeid: int) -> str:
        path = self._path_of.get(nodeid)
        if path is None:
            raise FuseError(errno.ENOENT)
        return path

    def _find(self, path: str) -> str | dict[str, Any] | None:
        try:
            return self._store.lookup(path)
        except MetadataError:
            return None

    def _node(self, path: str) -> str | dict[str, Any]:
        node = self._find(path)
        if node is None:
            raise FuseError(errno.ENOENT)
        return node

    def _timeout(self, path: str) -> int:
        if path == "volumes" or path.startswith("volumes/"):
            return VOLUME_TIMEOUT
        # What not everybody may read is never cached in the guest: every caller's lookup
        # comes to the host, which decides with that caller's uid and gid.
        if not self._policy.rule_for(path).read.everybody:
            return 0
        return ENTRY_TIMEOUT

    def _attr(self, path: str, node: str | dict[str, Any]) -> dict[str, Any]:
        is_dir = isinstance(node, dict)
        mode = self._policy.mode(path, is_dir)
        if not (_is_attribute_key(path) or path == "attributes"):
            mode &= ~0o222
        size = 0 if isinstance(node, dict) else len(node.encode())
        return {
            "ino": self._ino(path),
            "size": size,
            "blocks": (size + 511) // 512,
            "atime": self._start,
            "mtime": self._start,
            "ctime": self._start,
            "atimensec": 0,
            "mtimensec": 0,
            "ctimensec": 0,
            "mode": (S_IFDIR if is_dir else S_IFREG) | mode,
            "nlink": 2 if is_dir else 1,
            "uid": 0,
            "gid": 0,
            "rdev": 0,
            "blksize": BLOCK_SIZE,
            "flags": 0,
        }

    def _entry(self, path: str, node: str | dict[str, Any]) -> dict[str, Any]:
        timeout = self._timeout(path)
        return {
            "nodeid": self._ino(path),
            "generation": 0,
            "entry_valid": timeout,
            "attr_valid": timeout,
            "entry_valid_nsec": 0,
            "attr_valid_nsec": 0,
            "attr": self._attr(path, node),
        }

    def _looked_up(self, path: str) -> None:
        ino = self._ino(path)
        if ino != ROOT_ID:
            self._nlookup[ino] = self._nlookup.get(ino, 0) + 1

    def _new_fh(self) -> int:
        if len(self._files) + len(self._dirs) >= MAX_HANDLES:
            raise FuseError(errno.ENFILE)
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- policy -----------------------------------------------------------------------------

    def _check(self, header: Any, path: str, write: bool) -> None:
        if self._policy.allows(path, header.uid, header.gid, write):
            return
        self.denials += 1
        log.warning(
            "metadata fs: denied %s of %r to uid=%d gid=%d pid=%d",
            "write" if write else "read",
            "/" + path,
            header.uid,
            header.gid,
            header.pid,
        )
        raise FuseError(errno.EACCES)

    # -- opcodes ----------------------------------------------------------------------------

    def _init(self, header: Any, body: bytes, room: int) -> bytes:
        init = _parse(InitInCompat, body)
        if init.major < KERNEL_VERSION:
            raise FuseError(errno.EPROTO)
        reply = {
            "major": KERNEL_VERSION,
            "minor": KERNEL_MINOR_VERSION,
            "max_readahead": 0,
            "flags": 0,
            "max_background": 0,
            "congestion_threshold": 0,
            "max_write": 0,
            "time_gran": 0,
            "max_pages": 0,
            "map_alignment": 0,
            "flags2": 0,
        }
        if init.major > KERNEL_VERSION:  # the kernel will retry with our major
            return bytes(InitOut.build(reply))
        if init.minor < MIN_KERNEL_MINOR_VERSION:
            log.warning("metadata fs: FUSE 7.%d is too old (need 7.%d)", init.minor, MIN_KERNEL_MINOR_VERSION)
            raise FuseError(errno.EPROTO)
        self._minor = min(init.minor, KERNEL_MINOR_VERSION)
        self._initialized = True
        # INIT starts a new FUSE session (a new mount, a new guest, a new frontend): the
        # handles and lookups of the previous one are void. A frontend that went away without
        # DESTROY (killed, or hostile after filling the handle table) must not leave its
        # successor with ENFILE on every open.
        if self._files or self._dirs:
            log.info("metadata fs: INIT drops %d handles of the previous session",
                     len(self._files) + len(self._dirs))
        self._files.clear()
        self._dirs.clear()
        self._nlookup.clear()
        reply.update(
            minor=self._minor,
            max_readahead=min(init.max_readahead, MAX_IO),
            flags=init.flags & INIT_FLAGS,
            max_background=16,
            congestion_threshold=12,
            max_write=MAX_IO,
            time_gran=1,
            max_pages=MAX_PAGES,
        )
        return bytes(InitOut.build(reply))

    def _destroy(self, header: Any, body: bytes, room: int) -> bytes:
        self._initialized = False
        self._files.clear()
        self._dirs.clear()
        self._nlookup.clear()
        return b""

    def _lookup(self, header: Any, body: bytes, room: int) -> bytes:
        parent = self._path(header.nodeid)
        name = _name(body)
        if not isinstance(self._node(parent), dict):
            raise FuseError(errno.ENOTDIR)
        path = _child(parent, name)
        node = self._node(path)
        # The guest kernel checks mode bits itself (virtio-fs mounts with default
        # permissions), so a caller the policy refuses would be stopped in the guest only at
        # open. Refusing the lookup here makes the host the one that decides, and logs it.
        self._check(header, path, write=False)
        entry = self._entry(path, node)
        self._looked_up(path)
        return bytes(EntryOut.build(entry))

    def _getattr(self, header: Any, body: bytes, room: int) -> bytes:
        path = self._path(header.nodeid)
        return self._attr_out(path, self._node(path))

    def _attr_out(self, path: str, node: str | dict[str, Any]) -> bytes:
        reply = {"attr_valid": self._timeout(path), "attr_valid_nsec": 0, "attr": self._attr(path, node)}
        return bytes(AttrOut.build(reply))

    def _setattr(self, header: Any, body: bytes, room: int) -> bytes:
        args = _parse(SetattrIn, body)
        path = self._path(header.nodeid)
        node = self._node(path)
        valid = args.valid
        if valid & (FATTR_MODE | FATTR_UID | FATTR_GID):
            raise FuseError(errno.EPERM)
        if valid & (FATTR_SIZE | _FATTR_TIMES):
            if isinstance(node, dict):
                raise FuseError(errno.EISDIR if valid & FATTR_SIZE else errno.EPERM)
            if not _is_attribute_key(path):
                raise FuseError(errno.EACCES)
            self._check(header, path, write=True)
        if valid & FATTR_SIZE:
            if args.size != 0:
                raise FuseError(errno.EPERM)
            self._store.set(path, "")
            handle = self._files.get(args.fh) if valid & FATTR_FH else None
            if handle is not None and handle.path == path:
                handle.data.clear()
                handle.pending = False
            node = self._node(path)
        # Time changes are accepted and ignored: values carry no time stamps.
        return self._attr_out(path, node)

    def _open(self, header: Any, body: bytes, room: int) -> bytes:
        args = _parse(OpenIn, body)
        path = self._path(header.nodeid)
        node = self._node(path)
        if isinstance(node, dict):
            raise FuseError(errno.EISDIR)
        accmode = args.flags & os.O_ACCMODE
        if accmode == os.O_ACCMODE:
            raise FuseError(errno.EINVAL)
        readable = accmode in (os.O_RDONLY, os.O_RDWR)
        writable = accmode in (os.O_WRONLY, os.O_RDWR)
        if readable:
            self._check(header, path, write=False)
        if writable:
            if not _is_attribute_key(path):
                raise FuseError(errno.EACCES)
            self._check(header, path, write=True)
        return self._open_file(path, node, readable, writable)

    def _open_file(self, path: str, value: str, readable: bool, writable: bool) -> bytes:
        fh = self._new_fh()
        self._files[fh] = _File(path, bytearray(value.encode()), readable, writable)
        return bytes(OpenOut.build({"fh": fh, "open_flags": FOPEN_DIRECT_IO}))

    def _read(self, header: Any, body: bytes, room: int) -> bytes:
        args = _parse(ReadIn, body)
        if args.size > MAX_IO:
            raise FuseError(errno.EINVAL)
        handle = self._files.get(args.fh)
        if handle is None or not handle.readable:
            raise FuseError(errno.EBADF)
        self._check(header, handle.path, write=False)
        size = max(0, min(args.size, room))
        return bytes(handle.data[args.offset : args.offset + size])

    def _write(self, header: Any, body: bytes, room: int) -> bytes:
        args = _parse(WriteIn, body)
        data = body[WriteIn.sizeof() :]
        if args.size > MAX_IO or len(data) != args.size:
            raise FuseError(errno.EINVAL)
        handle = self._files.get(args.fh)
        if handle is None or not handle.writable:
            raise FuseError(errno.EBADF)
        self._check(header, handle.path, write=True)
        if args.offset > len(handle.data):
            raise FuseError(errno.EINVAL)
        if args.offset == 0:
            new = bytearray(data)
        else:
            new = handle.data[: args.offset] + data + handle.data[args.offset + len(data) :]
        if len(new) > MAX_VALUE:
            raise FuseError(errno.EFBIG)
        handle.data = new
        self._commit(handle)
        return bytes(WriteOut.build({"size": len(data)}))

    def _commit(self, handle: _File) -> None:
        try:
            text = handle.data.decode("utf-8")
        except UnicodeDecodeError:
            handle.pending = True  # maybe a character split across two writes
            return
        try:
            self._store.set(handle.path, text)
        except MetadataError as exc:
            raise FuseError(errno.EFBIG if exc.status == 413 else errno.EINVAL) from None
        handle.pending = False

    def _create(self, header: Any, body: bytes, room: int) -> bytes:
        args = _parse(CreateIn, body)
        name = _name(body[CreateIn.sizeof() :])
        parent = self._path(header.nodeid)
        if not isinstance(self._node(parent), dict):
            raise FuseError(errno.ENOTDIR)
        if parent != "attributes":
            raise FuseError(errno.EACCES)
        path = _child(parent, name)
        try:
            split_path(path)
        except MetadataError:
            raise FuseError(errno.EINVAL) from None
        accmode = args.flags & os.O_ACCMODE
        readable = accmode in (os.O_RDONLY, os.O_RDWR)
        self._check(header, path, write=True)
        if readable:
            self._check(header, path, write=False)
        node = self._find(path)
        if isinstance(node, dict):
            raise FuseError(errno.EISDIR)
        if node is not None and args.flags & os.O_EXCL:
            raise FuseError(errno.EEXIST)
        if node is None:
            self._store.set(path, "")
            node = ""
        opened = self._open_file(path, node, readable, writable=True)
        entry = bytes(EntryOut.build(self._entry(path, node)))
        self._looked_up(path)
        return entry + opened

    def _release(self, header: Any, body: bytes, room: int) -> bytes:
        args = _parse(ReleaseIn, body)
        handle = self._files.pop(args.fh, None)
        if handle is not None and handle.pending:
            log.warning("metadata fs: %r closed with a value that is not UTF-8; dropped", "/" + handle.path)
        return b""

    def _flush(self, header: Any, body: bytes, room: int) -> bytes:
        fh = _parse(FlushIn if header.opcode == Opcode.FLUSH else FsyncIn, body).fh
        handle = self._files.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        if handle.pending:
            raise FuseError(errno.EILSEQ)
        return b""

    def _opendir(self, header: Any, body: bytes, room: int) -> bytes:
        _parse(OpenIn, body)
        path = self._path(header.nodeid)
        node = self._node(path)
        if not isinstance(node, dict):
            raise FuseError(errno.ENOTDIR)
        self._check(header, path, write=False)
        entries = [(".", path, True), ("..", _parent(path), True)]
        entries += [(name, _child(path, name), isinstance(node[name], dict)) for name in sorted(node)]
        fh = self._new_fh()
        self._dirs[fh] = _Dir(path, entries)
        return bytes(OpenOut.build({"fh": fh, "open_flags": 0}))

    def _dir_handle(self, header: Any, body: bytes) -> tuple[Any, _Dir]:
        args = _parse(ReadIn, body)
        handle = self._dirs.get(args.fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        self._check(header, handle.path, write=False)
        return args, handle

    @staticmethod
    def _dirent(ino: int, offset: int, name: bytes, is_dir: bool) -> bytes:
        kind = DT_DIR if is_dir else DT_REG
        head: bytes = Dirent.build({"ino": ino, "off": offset, "namelen": len(name), "type": kind})
        raw = head + name
        return raw + bytes(dirent_align(len(raw)) - len(raw))

    def _readdir(self, header: Any, body: bytes, room: int) -> bytes:
        args, handle = self._dir_handle(header, body)
        limit = min(args.size, room)
        out = bytearray()
        for index in range(args.offset, len(handle.entries)):
            name, path, is_dir = handle.entries[index]
            raw = self._dirent(self._ino(path), index + 1, name.encode(), is_dir)
            if len(out) + len(raw) > limit:
                break
            out += raw
        return bytes(out)

    def _readdirplus(self, header: Any, body: bytes, room: int) -> bytes:
        args, handle = self._dir_handle(header, body)
        limit = min(args.size, room)
        empty_entry = bytes(EntryOut.sizeof())
        out = bytearray()
        for index in range(args.offset, len(handle.entries)):
            name, path, is_dir = handle.entries[index]
            node = None if name in (".", "..") else self._find(path)
            entry = empty_entry if node is None else bytes(EntryOut.build(self._entry(path, node)))
            raw = entry + self._dirent(self._ino(path), index + 1, name.encode(), is_dir)
            if len(out) + len(raw) > limit:
                break
            out += raw
            if node is not None:  # the kernel takes a reference on each entry it is given
                self._looked_up(path)
        return bytes(out)

    def _releasedir(self, header: Any, body: bytes, room: int) -> bytes:
        self._dirs.pop(_parse(ReleaseIn, body).fh, None)
        return b""

    def _statfs(self, header: Any, body: bytes, room: int) -> bytes:
        reply = {
            "blocks": 0,
            "bfree": 0,
            "bavail": 0,
            "files": len(self._path_of),
            "ffree": 0,
            "bsize": BLOCK_SIZE,
            "namelen": MAX_NAME,
            "frsize": BLOCK_SIZE,
        }
        return bytes(StatfsOut.build(reply))

    def _access(self, header: Any, body: bytes, room: int) -> bytes:
        mask = _parse(AccessIn, body).mask
        path = self._path(header.nodeid)
        node = self._node(path)
        if mask & os.X_OK and not isinstance(node, dict):
            raise FuseError(errno.EACCES)  # values are never executable
        if mask & (os.R_OK | os.X_OK):
            self._check(header, path, write=False)
        if mask & os.W_OK:
            if not (_is_attribute_key(path) or path == "attributes"):
                raise FuseError(errno.EACCES)
            self._check(header, path, write=True)
        return b""
