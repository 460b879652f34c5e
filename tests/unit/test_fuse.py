"""The FUSE protocol layer of the metadata file system: real request bytes built with the
layouts of vhost_pv.meta.fuse, answered by FuseFileSystem over a MetadataStore."""

from __future__ import annotations

import errno
import logging
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from vhost_pv.meta import fuse
from vhost_pv.meta.fuse import (
    AccessIn,
    Attr,
    AttrOut,
    CreateIn,
    Dirent,
    EntryOut,
    FlushIn,
    ForgetIn,
    FuseFileSystem,
    GetattrIn,
    InHeader,
    InitInCompat,
    InitOut,
    Opcode,
    OpenIn,
    OpenOut,
    OutHeader,
    ReadIn,
    ReleaseIn,
    SetattrIn,
    StatfsOut,
    WriteIn,
    WriteOut,
)
from vhost_pv.meta.policy import Policy, PolicyError
from vhost_pv.meta.store import MetadataStore

SECRET = "s3cr3t-value-that-must-never-be-logged"
CAP = 1 << 17
ROOT = 1


class Volumes:
    def __init__(self) -> None:
        self.state = "attached"

    def __call__(self) -> dict[str, dict[str, str]]:
        return {"vol0": {"state": self.state, "owner": "web-1"}}


class Guest:
    """A tiny FUSE client: builds requests, parses replies."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.volumes = Volumes()
        self.store = MetadataStore("vm7", self.volumes)
        self.store.set("instance/zone", "eu-west-1a")
        self.store.set("attributes/role", "web")
        self.store.set("secrets/db", SECRET)
        self.fs = FuseFileSystem(self.store, policy or Policy.default())
        self.unique = 0

    def raw(self, opcode: int, nodeid: int, args: bytes = b"", uid: int = 0, gid: int = 0) -> bytes | None:
        self.unique += 1
        header = InHeader.build(
            {
                "len": 40 + len(args),
                "opcode": opcode,
                "unique": self.unique,
                "nodeid": nodeid,
                "uid": uid,
                "gid": gid,
                "pid": 4242,
                "total_extlen": 0,
            }
        )
        return self.fs.handle(header + args, CAP)

    def call(
        self, opcode: int, nodeid: int, args: bytes = b"", uid: int = 0, gid: int = 0
    ) -> tuple[int, bytes]:
        reply = self.raw(opcode, nodeid, args, uid, gid)
        assert reply is not None
        out = OutHeader.parse(reply)
        assert out.len == len(reply)
        assert out.unique == self.unique
        return out.error, reply[16:]

    def ok(self, opcode: int, nodeid: int, args: bytes = b"", uid: int = 0) -> bytes:
        error, payload = self.call(opcode, nodeid, args, uid)
        assert error == 0, os.strerror(-error)
        return payload

    def init(self, minor: int = 38) -> Any:
        args = InitInCompat.build({"major": 7, "minor": minor, "max_readahead": 1 << 17, "flags": 0xFFFFFFFF})
        return InitOut.parse(self.ok(Opcode.INIT, 0, args + bytes(48)))

    def lookup(self, parent: int, name: str | bytes, uid: int = 0) -> tuple[int, Any]:
        raw = name.encode() if isinstance(name, str) else name
        error, payload = self.call(Opcode.LOOKUP, parent, raw + b"\0", uid)
        return error, EntryOut.parse(payload) if error == 0 else None

    def walk(self, path: str) -> int:
        node = ROOT
        for part in path.split("/"):
            error, entry = self.lookup(node, part)
            assert error == 0
            node = entry.nodeid
        return int(node)

    def open(self, nodeid: int, flags: int = os.O_RDONLY, uid: int = 0) -> tuple[int, int]:
        error, payload = self.call(Opcode.OPEN, nodeid, OpenIn.build({"flags": flags, "open_flags": 0}), uid)
        return error, OpenOut.parse(payload).fh if error == 0 else 0

    def read_args(self, fh: int, offset: int = 0, size: int = 4096) -> bytes:
        return bytes(
            ReadIn.build(
                {"fh": fh, "offset": offset, "size": size, "read_flags": 0, "lock_owner": 0, "flags": 0}
            )
        )

    def read(
        self, nodeid: int, fh: int, offset: int = 0, size: int = 4096, uid: int = 0
    ) -> tuple[int, bytes]:
        return self.call(Opcode.READ, nodeid, self.read_args(fh, offset, size), uid)

    def write(self, nodeid: int, fh: int, data: bytes, offset: int = 0, uid: int = 0) -> tuple[int, bytes]:
        args = WriteIn.build(
            {"fh": fh, "offset": offset, "size": len(data), "write_flags": 0, "lock_owner": 0, "flags": 0}
        )
        return self.call(Opcode.WRITE, nodeid, args + data, uid)

    def release(self, nodeid: int, fh: int, opcode: int = Opcode.RELEASE) -> None:
        self.ok(opcode, nodeid, ReleaseIn.build({"fh": fh, "flags": 0, "release_flags": 0, "lock_owner": 0}))

    def cat(self, path: str, uid: int = 0) -> bytes:
        node = self.walk(path)
        error, fh = self.open(node, uid=uid)
        assert error == 0
        data = self.ok(Opcode.READ, node, self.read_args(fh), uid)
        self.release(node, fh)
        return data

    def listdir(
        self, nodeid: int, plus: bool, uid: int = 0, size: int = 4096
    ) -> list[tuple[str, int, int, Any]]:
        error, payload = self.call(Opcode.OPENDIR, nodeid, OpenIn.build({"flags": 0, "open_flags": 0}), uid)
        assert error == 0
        fh = OpenOut.parse(payload).fh
        entries: list[tuple[str, int, int, Any]] = []
        offset = 0
        while True:
            chunk = self.ok(
                Opcode.READDIRPLUS if plus else Opcode.READDIR, nodeid, self.read_args(fh, offset, size)
            )
            if not chunk:
                break
            entries += parse_dirents(chunk, plus)
            offset = entries[-1][2]
        self.release(nodeid, fh, Opcode.RELEASEDIR)
        return entries


def parse_dirents(buf: bytes, plus: bool) -> list[tuple[str, int, int, Any]]:
    """(name, ino, off, entry_out or None) per fuse_dirent / fuse_direntplus."""
    entries = []
    pos = 0
    while pos < len(buf):
        entry = None
        if plus:
            entry = EntryOut.parse(buf[pos : pos + 128])
            pos += 128
        dirent = Dirent.parse(buf[pos : pos + 24])
        name = buf[pos + 24 : pos + 24 + dirent.namelen].decode()
        size = fuse.dirent_align(24 + dirent.namelen)
        assert buf[pos + 24 + dirent.namelen : pos + size] == bytes(size - 24 - dirent.namelen)
        pos += size
        entries.append((name, dirent.ino, dirent.off, entry))
    assert pos == len(buf)
    return entries


@pytest.fixture
def guest() -> Guest:
    g = Guest()
    g.init()
    return g


# -- layouts --------------------------------------------------------------------------------


def test_struct_sizes_match_fuse_h() -> None:
    sizes = {
        InHeader: 40,
        OutHeader: 16,
        Attr: 88,
        EntryOut: 128,
        AttrOut: 104,
        InitOut: 64,
        InitInCompat: 16,
        OpenIn: 8,
        OpenOut: 16,
        CreateIn: 16,
        ReadIn: 40,
        WriteIn: 40,
        WriteOut: 8,
        ReleaseIn: 24,
        FlushIn: 24,
        GetattrIn: 16,
        SetattrIn: 88,
        StatfsOut: 80,
        AccessIn: 8,
        ForgetIn: 8,
        Dirent: 24,
    }
    for layout, size in sizes.items():
        assert layout.sizeof() == size, layout


def test_golden_bytes() -> None:
    header = InHeader.build(
        {"len": 41, "opcode": 1, "unique": 2, "nodeid": 3, "uid": 4, "gid": 5, "pid": 6, "total_extlen": 0}
    )
    assert header == struct.pack("<IIQQIIIHH", 41, 1, 2, 3, 4, 5, 6, 0, 0)
    assert OutHeader.build({"len": 16, "error": -2, "unique": 9}) == struct.pack("<IiQ", 16, -2, 9)
    dirent = fuse.FuseFileSystem._dirent(7, 1, b"zone", False)
    assert dirent == struct.pack("<QQII", 7, 1, 4, 8) + b"zone" + bytes(4)
    assert len(fuse.FuseFileSystem._dirent(7, 1, b"12345678", True)) == 32


# -- protocol -------------------------------------------------------------------------------


def test_init_negotiates_minimal_flags() -> None:
    g = Guest()
    assert g.call(Opcode.GETATTR, ROOT, bytes(16))[0] == -errno.EIO  # before INIT
    out = g.init(38)
    assert (out.major, out.minor) == (7, 31)
    assert out.flags == fuse.INIT_FLAGS
    assert out.max_write == 64 << 10 and out.max_pages == 16
    assert out.max_readahead == 64 << 10
    old = Guest()
    error, _ = old.call(
        Opcode.INIT, 0, InitInCompat.build({"major": 7, "minor": 26, "max_readahead": 0, "flags": 0})
    )
    assert error == -errno.EPROTO


def test_lookup_getattr_open_read(guest: Guest) -> None:
    error, instance = guest.lookup(ROOT, "instance")
    assert error == 0
    assert instance.attr.mode == 0o040555
    error, zone = guest.lookup(instance.nodeid, "zone")
    assert error == 0
    assert zone.attr.size == len("eu-west-1a") and zone.attr.mode == 0o100444
    assert zone.entry_valid == 1 and zone.attr.ino == zone.nodeid
    assert guest.lookup(instance.nodeid, "zone")[1].nodeid == zone.nodeid  # stable
    assert guest.lookup(instance.nodeid, "nope")[0] == -errno.ENOENT
    attr = AttrOut.parse(guest.ok(Opcode.GETATTR, zone.nodeid, bytes(16))).attr
    assert attr.ino == zone.nodeid and attr.size == 10
    root = AttrOut.parse(guest.ok(Opcode.GETATTR, ROOT, bytes(16))).attr
    assert root.ino == 1 and root.mode & 0o170000 == 0o040000
    assert guest.cat("instance/zone") == b"eu-west-1a"
    error, fh = guest.open(zone.nodeid)
    assert guest.read(zone.nodeid, fh, offset=3, size=4) == (0, b"west")
    assert guest.read(zone.nodeid, fh, offset=100) == (0, b"")
    assert guest.read(zone.nodeid, fh, size=(64 << 10) + 1)[0] == -errno.EINVAL
    assert guest.read(zone.nodeid, 999)[0] == -errno.EBADF


def test_readdir_and_readdirplus_of_root(guest: Guest) -> None:
    names = [(name, ino) for name, ino, _, _ in guest.listdir(ROOT, plus=False)]
    assert [n for n, _ in names] == [".", "..", "attributes", "instance", "secrets", "volumes"]
    assert names[0][1] == ROOT
    plus = guest.listdir(ROOT, plus=True, size=400)  # several calls with small buffers
    assert [e[0] for e in plus] == [".", "..", "attributes", "instance", "secrets", "volumes"]
    assert plus[0][3].nodeid == 0  # no entry for dot entries
    by_name = {name: entry for name, _, _, entry in plus}
    assert by_name["volumes"].attr.mode & 0o040000
    assert by_name["secrets"].attr.mode == 0o040511  # searchable by all: the host decides lookups
    # the numbers handed out by READDIRPLUS are the ones LOOKUP gives
    assert guest.lookup(ROOT, "instance")[1].nodeid == by_name["instance"].nodeid
    volumes = guest.walk("volumes/vol0")
    assert [e[0] for e in guest.listdir(volumes, plus=True)] == [".", "..", "owner", "state"]


def test_policy_denies_secrets_to_uid_1000(guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    secrets = guest.walk("secrets")
    with caplog.at_level(logging.WARNING, logger="vhost_pv.meta.fuse"):
        # The host refuses the lookup itself: the guest kernel, checking mode bits, would
        # otherwise stop the caller before any request reached the host.
        assert guest.lookup(secrets, "db", uid=1000)[0] == -errno.EACCES
    error, entry = guest.lookup(secrets, "db", uid=0)
    assert error == 0 and entry.attr.mode == 0o100400
    with caplog.at_level(logging.WARNING, logger="vhost_pv.meta.fuse"):
        assert guest.open(entry.nodeid, uid=1000)[0] == -errno.EACCES
        assert guest.call(Opcode.OPENDIR, secrets, bytes(8), uid=1000)[0] == -errno.EACCES
        assert guest.call(Opcode.ACCESS, entry.nodeid, AccessIn.build({"mask": os.R_OK}), uid=1000)[0] == (
            -errno.EACCES
        )
    assert guest.fs.denials == 4
    denied = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
    assert len(denied) == 4
    assert "/secrets/db" in denied[0] and "uid=1000" in denied[0] and "pid=4242" in denied[0]
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert guest.cat("secrets/db", uid=0) == SECRET.encode()
    # a handle opened by root is not readable by uid 1000 either
    error, fh = guest.open(entry.nodeid)
    assert guest.read(entry.nodeid, fh, uid=1000)[0] == -errno.EACCES
    assert guest.fs.denials == 5


def test_write_attribute(guest: Guest) -> None:
    node = guest.walk("attributes/role")
    assert guest.lookup(guest.walk("attributes"), "role")[1].attr.mode == 0o100644
    error, fh = guest.open(node, os.O_WRONLY)
    assert error == 0
    error, payload = guest.write(node, fh, b"database")
    assert error == 0 and WriteOut.parse(payload).size == 8
    assert guest.store.lookup("attributes/role") == "database"
    assert guest.write(node, fh, b"-primary", offset=8)[0] == 0  # sequential writes append
    assert guest.store.lookup("attributes/role") == "database-primary"
    assert guest.write(node, fh, b"DATA", offset=0)[0] == 0  # offset 0 replaces
    assert guest.store.lookup("attributes/role") == "DATA"
    assert guest.write(node, fh, b"x", offset=10)[0] == -errno.EINVAL  # past the end
    assert guest.write(node, fh, bytes((64 << 10) + 1))[0] == -errno.EINVAL
    # a UTF-8 character split across two writes is stored once complete
    assert guest.write(node, fh, b"caf" + b"\xc3")[0] == 0
    assert guest.call(Opcode.FLUSH, node, FlushIn.build({"fh": fh, "lock_owner": 0}))[0] == -errno.EILSEQ
    assert guest.write(node, fh, b"\xa9", offset=4)[0] == 0
    assert guest.store.lookup("attributes/role") == "café"
    guest.ok(Opcode.FLUSH, node, FlushIn.build({"fh": fh, "lock_owner": 0}))
    guest.release(node, fh)
    assert guest.cat("attributes/role") == "café".encode()
    # non-root is refused by the default policy
    assert guest.open(node, os.O_WRONLY, uid=1000)[0] == -errno.EACCES
    # truncation to 0 (O_TRUNC without atomic_o_trunc) and nothing else
    assert guest.call(Opcode.SETATTR, node, setattr_in(fuse.FATTR_SIZE, size=3))[0] == -errno.EPERM
    attr = AttrOut.parse(guest.ok(Opcode.SETATTR, node, setattr_in(fuse.FATTR_SIZE, size=0))).attr
    assert attr.size == 0 and guest.store.lookup("attributes/role") == ""
    assert guest.call(Opcode.SETATTR, node, setattr_in(fuse.FATTR_MODE, mode=0o777))[0] == -errno.EPERM


def setattr_in(valid: int, size: int = 0, mode: int = 0) -> bytes:
    fields = {name: 0 for name in ("fh", "lock_owner", "atime", "mtime", "ctime")}
    fields |= {"atimensec": 0, "mtimensec": 0, "ctimensec": 0, "uid": 0, "gid": 0}
    return bytes(SetattrIn.build({"valid": valid, "size": size, "mode": mode, **fields}))


def test_write_outside_attributes_refused(guest: Guest) -> None:
    zone = guest.walk("instance/zone")
    assert guest.open(zone, os.O_WRONLY)[0] == -errno.EACCES
    assert guest.open(zone, os.O_RDWR)[0] == -errno.EACCES
    assert guest.call(Opcode.SETATTR, zone, setattr_in(fuse.FATTR_SIZE))[0] == -errno.EACCES
    assert guest.call(Opcode.ACCESS, zone, AccessIn.build({"mask": os.W_OK}))[0] == -errno.EACCES
    error, fh = guest.open(zone)  # read-only handle: writes are refused
    assert guest.write(zone, fh, b"x")[0] == -errno.EBADF
    assert guest.store.lookup("instance/zone") == "eu-west-1a"
    assert guest.fs.denials == 0  # structural refusals are not policy denials


def create(
    guest: Guest, parent: int, name: bytes, flags: int = os.O_WRONLY | os.O_CREAT, uid: int = 0
) -> tuple[int, bytes]:
    args = CreateIn.build({"flags": flags, "mode": 0o644, "umask": 0o022, "open_flags": 0})
    return guest.call(Opcode.CREATE, parent, args + name + b"\0", uid)


def test_create_attribute(guest: Guest) -> None:
    attributes = guest.walk("attributes")
    error, payload = create(guest, attributes, b"new")
    assert error == 0
    entry = EntryOut.parse(payload[:128])
    fh = OpenOut.parse(payload[128:]).fh
    assert entry.attr.size == 0 and guest.store.lookup("attributes/new") == ""
    assert guest.write(entry.nodeid, fh, b"hello")[0] == 0
    assert guest.store.lookup("attributes/new") == "hello"
    assert guest.lookup(attributes, "new")[1].nodeid == entry.nodeid
    assert create(guest, attributes, b"new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)[0] == -errno.EEXIST
    assert create(guest, guest.walk("instance"), b"new")[0] == -errno.EACCES
    assert create(guest, attributes, b"bad name")[0] == -errno.EINVAL
    assert create(guest, attributes, b"other", uid=1000)[0] == -errno.EACCES
    assert guest.fs.denials == 1


def test_custom_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        """
[[rule]]
path = "attributes/*"
read = {}
write = { uids = ["*"] }

[[rule]]
path = "instance/zone"
read = { uids = [0], gids = [100] }
"""
    )
    policy = Policy.load(path)
    assert policy.allows("attributes/x", 1000, 1000, write=True)
    assert policy.mode("attributes/x", False) == 0o666
    assert policy.allows("instance/zone", 1000, 100, write=False)
    assert not policy.allows("instance/zone", 1000, 1000, write=False)
    assert not policy.allows("instance/zone", 0, 0, write=True)
    assert policy.mode("instance/zone", False) == 0o400
    assert not policy.allows("secrets/db", 1000, 1000, write=False)  # defaults behind the rules
    assert policy.mode("", True) == 0o555
    g = Guest(policy)
    g.init()
    error, _ = create(g, g.walk("attributes"), b"mine", uid=1000)
    assert error == 0 and g.store.lookup("attributes/mine") == ""
    path.write_text('[[rule]]\npath = "x"\nread = { uids = ["root"] }\n')
    with pytest.raises(PolicyError):
        Policy.load(path)


def test_statfs_access_unknown_opcode(guest: Guest) -> None:
    statfs = StatfsOut.parse(guest.ok(Opcode.STATFS, ROOT))
    assert statfs.namelen == 255 and statfs.bsize == 4096
    guest.ok(Opcode.ACCESS, ROOT, AccessIn.build({"mask": os.R_OK | os.X_OK}), uid=1000)
    assert guest.call(Opcode.MKDIR, ROOT, bytes(8) + b"d\0")[0] == -errno.ENOSYS
    assert guest.call(Opcode.GETXATTR, ROOT, bytes(8) + b"user.x\0")[0] == -errno.ENOSYS
    assert guest.call(999, ROOT)[0] == -errno.ENOSYS
    assert guest.raw(Opcode.FORGET, guest.walk("instance"), ForgetIn.build({"nlookup": 1})) is None
    assert guest.raw(Opcode.BATCH_FORGET, ROOT, struct.pack("<II", 1, 0) + struct.pack("<QQ", 5, 1)) is None
    assert guest.raw(Opcode.BATCH_FORGET, ROOT, struct.pack("<II", 1000, 0)) is None  # count lies
    assert guest.raw(Opcode.INTERRUPT, 0, struct.pack("<Q", 1)) is None
    assert guest.ok(Opcode.DESTROY, 0) == b""
    assert guest.call(Opcode.GETATTR, ROOT, bytes(16))[0] == -errno.EIO


def test_garbage_never_raises(guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    fs = guest.fs
    assert fs.handle(b"", CAP) is None
    assert fs.handle(b"\x01" * 39, CAP) is None  # shorter than a header
    header = bytearray(
        InHeader.build(
            {
                "len": 40,
                "opcode": Opcode.GETATTR,
                "unique": 77,
                "nodeid": 1,
                "uid": 0,
                "gid": 0,
                "pid": 1,
                "total_extlen": 0,
            }
        )
    )
    for length in (0, 39, 41, 10**9):  # the len field lies
        struct.pack_into("<I", header, 0, length)
        reply = fs.handle(bytes(header), CAP)
        assert reply is not None
        out = OutHeader.parse(reply)
        assert (out.error, out.unique, out.len) == (-errno.EINVAL, 77, 16)
    # short argument structs
    for opcode in (
        Opcode.INIT,
        Opcode.OPEN,
        Opcode.READ,
        Opcode.WRITE,
        Opcode.SETATTR,
        Opcode.CREATE,
        Opcode.ACCESS,
        Opcode.READDIR,
        Opcode.RELEASE,
        Opcode.FLUSH,
        Opcode.LOOKUP,
    ):
        assert guest.call(opcode, ROOT, b"\x01\x02")[0] == -errno.EINVAL, opcode
    # huge read size, unknown node, write data shorter than its size field
    error, fh = guest.open(guest.walk("instance/zone"))
    assert guest.read(1, fh, size=1 << 31)[0] == -errno.EINVAL
    assert guest.call(Opcode.GETATTR, 123456, bytes(16))[0] == -errno.ENOENT
    args = WriteIn.build({"fh": fh, "offset": 0, "size": 100, "write_flags": 0, "lock_owner": 0, "flags": 0})
    assert guest.call(Opcode.WRITE, 1, args + b"abc")[0] == -errno.EINVAL
    # a reply that cannot fit the device-writable buffer
    statfs = InHeader.build(
        {
            "len": 40,
            "opcode": Opcode.STATFS,
            "unique": 5,
            "nodeid": 1,
            "uid": 0,
            "gid": 0,
            "pid": 1,
            "total_extlen": 0,
        }
    )
    assert fs.handle(statfs, 20) == struct.pack("<IiQ", 16, -errno.ERANGE, 5)
    assert fs.handle(statfs, 8) is None
    # random bytes after a valid header, for every opcode: answers, no internal errors
    with caplog.at_level(logging.WARNING):
        for number in range(0, 60):
            for junk in (b"", bytes(range(256)) * 3, b"\xff" * 200):
                guest.raw(number, ROOT, junk)
                guest.raw(number, 0xFFFFFFFFFFFFFFFF, junk)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_bad_names_refused(guest: Guest) -> None:
    assert guest.lookup(ROOT, "..")[0] == -errno.EINVAL
    assert guest.lookup(ROOT, ".")[0] == -errno.EINVAL
    assert guest.lookup(ROOT, "")[0] == -errno.EINVAL
    assert guest.lookup(ROOT, "a/b")[0] == -errno.EINVAL
    assert guest.lookup(ROOT, "x" * 256)[0] == -errno.ENAMETOOLONG
    assert guest.lookup(ROOT, "x" * 200)[0] == -errno.ENOENT
    assert guest.lookup(ROOT, b"\xff\xfe")[0] == -errno.EINVAL
    assert guest.call(Opcode.LOOKUP, ROOT, b"instance")[0] == -errno.EINVAL  # no NUL
    assert create(guest, guest.walk("attributes"), b"..")[0] == -errno.EINVAL
    assert create(guest, guest.walk("attributes"), b"y" * 300)[0] == -errno.ENAMETOOLONG


def test_volume_state_is_live_at_each_open(guest: Guest) -> None:
    state = guest.walk("volumes/vol0/state")
    error, entry = guest.lookup(guest.walk("volumes/vol0"), "state")
    assert entry.entry_valid == 0 and entry.attr_valid == 0
    error, first = guest.open(state)
    guest.volumes.state = "detached"
    guest.store.touch()
    error, second = guest.open(state)
    assert guest.read(state, first) == (0, b"attached")  # a handle keeps its snapshot
    assert guest.read(state, second) == (0, b"detached")
    assert guest.cat("volumes/vol0/state") == b"detached"
    assert guest.lookup(guest.walk("volumes/vol0"), "state")[1].nodeid == state
    assert guest.open(state, os.O_WRONLY)[0] == -errno.EACCES
