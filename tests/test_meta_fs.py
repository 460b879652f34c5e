"""The metadata file system in a real QEMU guest: vhost-user-fs-pci on `serve --meta-socket`,
mounted with `mount -t virtiofs metadata`. What the guest sees follows the store live, its
writes reach `vhost-pv meta get`, and the policy is enforced on the host."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from frontend import GuestMemory, SplitRing, VhostUserFrontend
from test_dangling_qemu import wait_console

from vhost_pv.control import client
from vhost_pv.control.wire import MetaOp
from vhost_pv.meta.fuse import IN_HEADER_SIZE, InHeader, InitInCompat, InitOut, OutHeader
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import GuestImage, start_guest
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
SECRET = "fs-visible-secret"

GUEST_JOB = """
mkdir -p /run/metadata
mount -t virtiofs metadata /run/metadata || { echo MOUNT-FAILED; exit 20; }
M=/run/metadata
echo "ROOT=$(ls $M | tr '\\n' ' ')"
echo "ZONE=$(cat $M/instance/zone)"
echo "STATE1=$(cat $M/volumes/vol0/state)"
echo FLIP-NOW
n=0
while [ "$(cat $M/volumes/vol0/state)" = attached ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n + 1)); done
echo "STATE2=$(cat $M/volumes/vol0/state) REASON=$(cat $M/volumes/vol0/reason)"
printf db > $M/attributes/role && echo "ROLE=$(cat $M/attributes/role)"
echo x > $M/instance/zone 2>/dev/null && echo INSTANCE-WRITABLE || echo INSTANCE-READ-ONLY
echo "SECRET-AS-ROOT=$(cat $M/secrets/db-password)"
echo 'app:x:1000:1000::/tmp:/bin/sh' >>/etc/passwd
echo 'app:x:1000:' >>/etc/group
su app -c "cat $M/secrets/db-password" >/dev/null 2>&1 && echo SECRET-READ-AS-1000 || echo SECRET-DENIED-1000
su app -c "cat $M/instance/zone" && echo
umount $M && echo UNMOUNTED
"""


@pytest.mark.timeout(300)
def test_guest_mounts_the_metadata_file_system(guest_image: GuestImage, tmp_path: Path) -> None:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner="web-1"))
    meta_socket = tmp_path / "meta.sock"
    with ServerProcess([path], tmp_path / "d",
                       extra_args=["--vm", "vm7", "--meta-socket", str(meta_socket)]) as server:
        client.meta(server.control, MetaOp.SET, "vm7", "instance/zone", "rack-3")
        client.meta(server.control, MetaOp.SET, "vm7", "secrets/db-password", SECRET)
        fs_args = ["-chardev", f"socket,id=m0,path={meta_socket}",
                   "-device", "vhost-user-fs-pci,chardev=m0,tag=metadata"]
        with start_guest(GUEST_JOB, extra_args=fs_args, image=guest_image) as guest:
            wait_console(guest, "FLIP-NOW", timeout=120)
            client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
            result = guest.wait(240)
        console = result.console
        assert result.exit_code == 0, console[-3000:]
        for line in ("ROOT=attributes instance secrets volumes", "ZONE=rack-3", "STATE1=attached",
                     "STATE2=dangling REASON=container-deleted", "ROLE=db", "INSTANCE-READ-ONLY",
                     f"SECRET-AS-ROOT={SECRET}", "SECRET-DENIED-1000", "rack-3", "UNMOUNTED"):
            assert line in console, (line, console[-3000:])
        # The guest's write reached the store; the denial was decided and logged on the host.
        assert client.meta(server.control, MetaOp.GET, "vm7", "attributes/role")["value"] == "db"
        log = server.log()
        denials = [line for line in log.splitlines() if "metadata fs: denied" in line]
        assert denials and all("uid=1000" in line and "/secrets" in line for line in denials), denials
        assert SECRET not in log


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
