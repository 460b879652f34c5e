"""The metadata file system's request queue driven by the test's own frontend against
`serve --meta-socket` (a daemon subprocess, no guest): bad chains and FUSE messages get error
replies and the queue keeps serving. The guest-side test is tests/guest/test_meta_fs.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from support.frontend import GuestMemory, SplitRing, VhostUserFrontend

from vhost_pv.meta.fuse import IN_HEADER_SIZE, InHeader, InitInCompat, InitOut, OutHeader
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


# -- the fs device's queues, driven by the test's own frontend ---------------------------------


def fuse_request(memory: GuestMemory, opcode: int, body: bytes, reply_room: int = 4096,
                 unique: int = 1, nodeid: int = 0) -> tuple[list[tuple[int, int, bool]], int]:
    header = InHeader.build({"len": IN_HEADER_SIZE + len(body), "opcode": opcode, "unique": unique,
                             "nodeid": nodeid, "uid": 0, "gid": 0, "pid": 1, "total_extlen": 0})
    request = memory.put(header + body)
    reply = memory.alloc(reply_room)
    return [(request, IN_HEADER_SIZE + len(body), False), (reply, reply_room, True)], reply


@pytest.mark.timeout(60)
def test_bad_chains_and_messages_get_errors_and_the_queue_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB))
    meta_socket = tmp_path / "meta.sock"
    with ServerProcess([path], tmp_path / "d", extra_args=["--meta-socket", str(meta_socket)]) as server:
        frontend = VhostUserFrontend(meta_socket)
        frontend.negotiate()
        memory = GuestMemory(4 << 20)
        frontend.set_mem_table(memory)
        ring = SplitRing(memory, 64)
        frontend.setup_queue(1, ring)  # the request queue
        init = InitInCompat.build({"major": 7, "minor": 31, "max_readahead": 65536, "flags": 0})

        def exchange(buffers: list[tuple[int, int, bool]]) -> tuple[int, int]:
            head = ring.add_chain(buffers)
            ring.publish(head)
            frontend.kick(1)
            used = frontend.wait_used(1, ring)
            assert [h for h, _ in used] == [head]
            return int(used[0][0]), int(used[0][1])

        # A descriptor outside guest memory: the chain comes back empty, nothing else breaks.
        _, written = exchange([(memory.end + (1 << 20), 64, False), (memory.alloc(64), 64, True)])
        assert written == 0
        # A FUSE message whose length field lies: an error reply for its unique id.
        buffers, reply = fuse_request(memory, 26, init)  # INIT
        lying = bytearray(memory.read(buffers[0][0], buffers[0][1]))
        lying[0:4] = (10_000).to_bytes(4, "little")
        memory.write(buffers[0][0], bytes(lying))
        _, written = exchange(buffers)
        out = OutHeader.parse(memory.read(reply, 16))
        assert written == 16 and out.error == -errno.EINVAL and out.unique == 1
        # A request before INIT is refused; an unknown opcode after it gets ENOSYS.
        buffers, reply = fuse_request(memory, 1, b"zone\0", unique=2, nodeid=1)  # LOOKUP
        exchange(buffers)
        assert OutHeader.parse(memory.read(reply, 16)).error == -errno.EIO
        buffers, reply = fuse_request(memory, 26, init, unique=3)
        _, written = exchange(buffers)
        out = OutHeader.parse(memory.read(reply, 16))
        assert out.error == 0 and out.len == written and InitOut.parse(memory.read(reply + 16, 64)).major == 7
        buffers, reply = fuse_request(memory, 999, b"", unique=4, nodeid=1)
        exchange(buffers)
        assert OutHeader.parse(memory.read(reply, 16)).error == -errno.ENOSYS
        # Path traversal: '..' is refused by the host.
        buffers, reply = fuse_request(memory, 1, b"..\0", unique=5, nodeid=1)
        exchange(buffers)
        assert OutHeader.parse(memory.read(reply, 16)).error in (-errno.EINVAL, -errno.ENOENT)
        assert "Traceback" not in server.log()
        frontend.close()
        memory.close()
