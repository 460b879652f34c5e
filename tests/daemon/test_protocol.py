"""vhost-user against a real daemon (`vhost-pv serve` in a child process), driven by the
fake frontend in frontend.py: negotiation, I/O through kick eventfds, malformed messages,
a second frontend, and what status reports afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.attach import pattern
from support.frontend import (
    SECTOR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    BlkRequest,
    GuestMemory,
    SplitRing,
    VhostUserFrontend,
    read_request,
    write_request,
)

from vhost_pv.control.client import status
from vhost_pv.protocol.messages import (
    FLAG_NEED_REPLY,
    MAX_PAYLOAD_SIZE,
    PROTOCOL_VERSION,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    MemoryTable,
    ProtocolFeature,
    Request,
    U64Payload,
    VringAddress,
    VringState,
)
from vhost_pv.volume.header import DATA_OFFSET
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

DISK_SIZE = 16 << 20
QUEUES = 2


@dataclasses.dataclass
class Served:
    server: ServerProcess
    volumes: list[Path]

    def socket(self, index: int) -> Path:
        return self.server.socket_for(self.volumes[index])

    def status(self, index: int) -> dict[str, Any]:
        name = self.volumes[index].stem
        (entry,) = [v for v in status(self.server.control)["volumes"] if v["name"] == name]
        return dict(entry)

    def wait_detached(self, index: int, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.status(index)
            if entry["connection"] is None:
                return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"still attached: {entry['connection']}")
            time.sleep(0.05)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    volumes = [tmp_path / "vol-a.img", tmp_path / "vol-b.img"]
    for path in volumes:
        create_volume(path, CreateOptions(size=DISK_SIZE, ring_size=1 << 20))
    with ServerProcess(volumes, tmp_path / "run", queues=QUEUES) as server:
        yield Served(server, volumes)
        # Whatever a test did, the daemon is still up and stops cleanly (checked on exit).
        assert server.process is not None and server.process.poll() is None
        assert "Traceback" not in server.log()


class Guest:
    """A connected, negotiated frontend with memory and queue 0 running."""

    def __init__(self, socket_path: Path, *, ring_size: int = 64) -> None:
        self.frontend = VhostUserFrontend(socket_path)
        self.features = self.frontend.negotiate()
        self.memory = GuestMemory(4 << 20)
        self.frontend.set_mem_table(self.memory)
        self.ring = SplitRing(self.memory, ring_size)
        self.frontend.setup_queue(0, self.ring)

    def run(self, request: BlkRequest, *, indirect: bool = False) -> BlkRequest:
        return self.frontend.submit(0, self.ring, request, indirect=indirect)

    def round_trip(self, sector: int, data: bytes) -> None:
        write = self.run(write_request(self.memory, sector, data))
        assert write.status == VIRTIO_BLK_S_OK
        read = self.run(read_request(self.memory, sector, len(data)))
        assert read.status == VIRTIO_BLK_S_OK
        assert read.data() == data

    def close(self) -> None:
        self.frontend.close()
        self.memory.close()


def file_read(path: Path, sector: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(DATA_OFFSET + sector * SECTOR)
        return f.read(length)


def assert_serving(served: Served, seed: int) -> None:
    """Both volumes take a new frontend and do I/O."""
    for index in (1, 0):
        guest = Guest(served.socket(index))
        try:
            guest.round_trip(8 * seed, pattern(4096, seed))
        finally:
            guest.close()
        served.wait_detached(index)


# -- the good path ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_negotiation_and_io_through_kicks(served: Served) -> None:
    frontend = VhostUserFrontend(served.socket(0))
    try:
        features = frontend.get_features()
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VHOST_USER_F_PROTOCOL_FEATURES):
            assert features & (1 << bit)
        frontend.set_features(features)
        protocol = frontend.get_protocol_features()
        for feature in (ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.MQ):
            assert protocol & (1 << feature)
        frontend.set_protocol_features(protocol)
        assert frontend.reply_ack
        frontend.set_owner()  # acked from here on
        assert frontend.get_queue_num() == QUEUES

        memory = GuestMemory(4 << 20)
        frontend.set_mem_table(memory)
        ring = SplitRing(memory, 128)
        frontend.setup_queue(0, ring)

        data = pattern(64 << 10, 7)
        write = frontend.submit(0, ring, write_request(memory, 2048, data, split=[4096] * 8))
        assert write.status == VIRTIO_BLK_S_OK
        assert file_read(served.volumes[0], 2048, len(data)) == data
        read = frontend.submit(0, ring, read_request(memory, 2048, len(data)), indirect=True)
        assert read.status == VIRTIO_BLK_S_OK
        assert read.data() == data
        flush = frontend.submit(0, ring, BlkRequest.build(memory, VIRTIO_BLK_T_FLUSH))
        assert flush.status == VIRTIO_BLK_S_OK

        # Several requests behind one kick.
        batch = [write_request(memory, 8 * i, pattern(4096, i)) for i in range(10)]
        for request in batch:
            request.submit(ring)
        frontend.kick(0)
        used = frontend.wait_used(0, ring, count=10)
        assert sorted(head for head, _ in used) == sorted(r.head for r in batch)
        assert all(r.status == VIRTIO_BLK_S_OK for r in batch)
        for i in range(10):
            assert file_read(served.volumes[0], 8 * i, 4096) == pattern(4096, i)

        connection = served.status(0)["connection"]
        assert connection is not None
        assert connection["memory_mapped"] is True
        assert connection["queues_running"] == [0]
        assert connection["queues"][0]["requests"] == 13

        # GET_VRING_BASE stops the ring and says where it stopped.
        assert frontend.get_vring_base(0) == 13
        assert served.status(0)["connection"]["queues_running"] == []
        memory.close()
    finally:
        frontend.close()
    served.wait_detached(0)


@pytest.mark.timeout(60)
def test_get_config(served: Served) -> None:
    guest = Guest(served.socket(0))
    try:
        config = guest.frontend.get_config(60)
        assert len(config) == 60
        capacity, size_max, seg_max = struct.unpack_from("<QII", config, 0)
        assert capacity == DISK_SIZE // SECTOR
        assert size_max > 0 and seg_max > 0
        assert struct.unpack_from("<I", config, 20)[0] == SECTOR  # blk_size
        assert struct.unpack_from("<H", config, 34)[0] == QUEUES  # num_queues
        # A window of it: the same bytes.
        assert guest.frontend.get_config(8, offset=32) == config[32:40]
        # Still serving I/O on the same connection.
        guest.round_trip(0, pattern(4096, 1))
    finally:
        guest.close()


@pytest.mark.timeout(60)
def test_second_frontend_is_refused(served: Served) -> None:
    first = Guest(served.socket(0))
    try:
        first.round_trip(0, pattern(4096, 1))
        second = VhostUserFrontend(served.socket(0))
        try:
            assert second.wait_closed()
        finally:
            second.close()
        served.server.wait_log(r"vol-a: refused frontend pid=\d+: volume already attached to pid \d+")
        first.round_trip(8, pattern(4096, 2))
        entry = served.status(0)
        assert entry["refused_total"] == 1
        assert entry["connections_total"] == 1
        assert entry["connection"] is not None
    finally:
        first.close()
    served.wait_detached(0)
    assert_serving(served, 3)


@pytest.mark.timeout(60)
def test_status_after_disconnect(served: Served) -> None:
    guest = Guest(served.socket(0))
    try:
        for i in range(5):
            guest.round_trip(8 * i, pattern(4096, i))
    finally:
        guest.close()
    entry = served.wait_detached(0)
    assert entry["connection"] is None
    assert entry["connections_total"] == 1
    totals = entry["totals"]
    assert totals["requests"] == 10
    assert totals["writes"] == 5 and totals["reads"] == 5
    assert totals["bytes_written"] == 5 * 4096 and totals["bytes_read"] == 5 * 4096
    assert totals["io_errors"] == 0 and totals["bad_requests"] == 0
    assert totals["kicks"] >= 1

    # A second connection adds to the totals.
    guest = Guest(served.socket(0))
    try:
        guest.round_trip(0, pattern(4096, 9))
    finally:
        guest.close()
    entry = served.wait_detached(0)
    assert entry["connections_total"] == 2
    assert entry["totals"]["requests"] == 12
    # The other volume saw nothing.
    other = served.status(1)
    assert other["connections_total"] == 0
    assert other["totals"].get("requests", 0) == 0


# -- malformed messages ------------------------------------------------------------------------


def _wrong_size_set_features(frontend: VhostUserFrontend) -> None:
    frontend.send(Request.SET_FEATURES, b"\x00" * 4)


def _unknown_request(frontend: VhostUserFrontend) -> None:
    frontend.send(999, b"")


def _fds_with_get_features(frontend: VhostUserFrontend) -> None:
    fd = os.eventfd(0)
    try:
        frontend.send(Request.GET_FEATURES, b"", [fd])
    finally:
        os.close(fd)


def _mem_table_past_the_fd(frontend: VhostUserFrontend) -> None:
    frontend.negotiate()
    memory = GuestMemory(1 << 20)
    try:
        table = MemoryTable.build(
            {
                "num_regions": 1,
                "regions": [
                    {
                        "guest_phys_addr": memory.guest_phys_addr,
                        "memory_size": memory.size,
                        "userspace_addr": memory.userspace_addr,
                        "mmap_offset": 64 << 10,  # offset + size > the memfd's size
                    }
                ],
            }
        )
        frontend.send(Request.SET_MEM_TABLE, bytes(table), [memory.fd], need_reply=True)
    finally:
        memory.close()


def _payload_too_large(frontend: VhostUserFrontend) -> None:
    frontend.send(Request.SET_FEATURES, b"\x00" * 8, size=MAX_PAYLOAD_SIZE + 1)


def _wrong_version(frontend: VhostUserFrontend) -> None:
    frontend.send(Request.GET_FEATURES, b"", flags=0x2)


def _features_never_offered(frontend: VhostUserFrontend) -> None:
    frontend.send(Request.SET_FEATURES, bytes(U64Payload.build(1 << 63)))


def _queue_size_not_power_of_two(frontend: VhostUserFrontend) -> None:
    frontend.negotiate()
    frontend.send(Request.SET_VRING_NUM, bytes(VringState.build({"index": 0, "num": 100})))


def _queue_out_of_range(frontend: VhostUserFrontend) -> None:
    frontend.send(Request.SET_VRING_NUM, bytes(VringState.build({"index": 200, "num": 64})))


def _too_many_fds(frontend: VhostUserFrontend) -> None:
    fds = [os.eventfd(0) for _ in range(12)]
    try:
        frontend.send(Request.SET_MEM_TABLE, b"\x00" * 8, fds, flags=PROTOCOL_VERSION | FLAG_NEED_REPLY)
    finally:
        for fd in fds:
            os.close(fd)


def _rings_outside_memory(frontend: VhostUserFrontend) -> None:
    frontend.negotiate()
    memory = GuestMemory(1 << 20)
    kick = os.eventfd(0)
    try:
        frontend.set_mem_table(memory)
        ring = SplitRing(memory, 64)
        frontend.command(Request.SET_VRING_NUM, bytes(VringState.build({"index": 0, "num": 64})))
        address = VringAddress.build(
            {
                "index": 0,
                "flags": 0,
                "desc_user_addr": memory.userspace_addr + memory.size - 512,  # runs past the end
                "used_user_addr": memory.uaddr(ring.used_addr),
                "avail_user_addr": memory.uaddr(ring.avail_addr),
                "log_guest_addr": 0,
            }
        )
        frontend.command(Request.SET_VRING_ADDR, bytes(address))
        # The kick fd completes the queue: starting it fails.
        frontend.send(Request.SET_VRING_KICK, bytes(U64Payload.build(0)), [kick], need_reply=True)
    finally:
        os.close(kick)
        memory.close()


def _closed_mid_message(frontend: VhostUserFrontend) -> None:
    frontend.send(Request.SET_FEATURES, b"\x00" * 4, size=8)
    frontend.sock.shutdown(socket.SHUT_WR)


def _payload_never_arrives(frontend: VhostUserFrontend) -> None:
    frontend.send(Request.SET_FEATURES, b"\x00" * 4, size=8)  # and then nothing


MALFORMED: dict[str, tuple[Callable[[VhostUserFrontend], None], str]] = {
    "set-features-wrong-size": (_wrong_size_set_features, "SET_FEATURES: payload is 4 bytes, expected 8"),
    "unknown-request": (_unknown_request, "unknown request 999 is not supported"),
    "fds-with-get-features": (_fds_with_get_features, "GET_FEATURES: carries 1 fds, expected 0"),
    "mem-table-past-fd": (_mem_table_past_the_fd, "memory table does not map"),
    "payload-too-large": (_payload_too_large, f"payload of {MAX_PAYLOAD_SIZE + 1} bytes exceeds"),
    "wrong-version": (_wrong_version, "unsupported protocol version in flags 0x2"),
    "features-never-offered": (_features_never_offered, "SET_FEATURES: acks features never offered"),
    "queue-size": (_queue_size_not_power_of_two, "SET_VRING_NUM: size 100 is not a power of two"),
    "queue-index": (_queue_out_of_range, "SET_VRING_NUM: queue 200 does not exist"),
    "too-many-fds": (_too_many_fds, "more than 8 fds in one message"),
    "rings-outside-memory": (_rings_outside_memory, "queue 0 cannot start"),
    "closed-mid-message": (_closed_mid_message, "connection closed mid-message (4/8)"),
    "payload-stalls": (_payload_never_arrives, "payload of 8 bytes did not arrive within 5 s"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_closes_only_that_connection(served: Served, case: str) -> None:
    # vol-b has a frontend attached through all of this: it must not notice.
    bystander = Guest(served.socket(1))
    try:
        bystander.round_trip(0, pattern(4096, 1))
        action, message = MALFORMED[case]
        frontend = VhostUserFrontend(served.socket(0))
        try:
            action(frontend)
            assert frontend.wait_closed(timeout=15.0), "the daemon kept the connection open"
        finally:
            frontend.close()
        served.server.wait_log(
            r" ERROR vhost_pv\.protocol: vol-a: protocol error, closing connection: .*" + re.escape(message)
        )
        served.wait_detached(0)
        bystander.round_trip(8, pattern(4096, 2))
        assert served.status(1)["connection"] is not None
    finally:
        bystander.close()
    served.wait_detached(1)
    # The same volume takes a new frontend; the other one does too.
    assert_serving(served, 3)
