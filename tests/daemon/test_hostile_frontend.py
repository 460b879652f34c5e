"""A frontend that misbehaves on purpose costs at most its own connection.

The daemon runs as a subprocess serving two volumes: the victim, which the hostile frontend
attaches to, and a bystander. After each attack the daemon must still be alive, its control
socket must answer within a second, the bystander must serve I/O through a second frontend,
and the victim must take a fresh frontend.

Also here: an acknowledged write on a dangling volume is in the quarantine ring in the file
(page cache) the moment the guest can see its completion, checked by stopping the daemon
as soon as completions appear (what kill -9 at that instant would leave) and after a real
kill -9 and restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.attach import pattern
from support.frontend import (
    BLK_HEADER_SIZE,
    STATUS_UNSET,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkRequest,
    FrontendError,
    GuestMemory,
    SplitRing,
    VhostUserFrontend,
    blk_header,
    read_request,
    spin_used,
    write_request,
)

from vhost_pv.control import client
from vhost_pv.control.wire import Command
from vhost_pv.devices.blk import BlkDevice
from vhost_pv.devices.fs import FsDevice
from vhost_pv.protocol.messages import Request, U64Payload
from vhost_pv.protocol.session import MemoryRegionSpec, VringSetup
from vhost_pv.volume.header import VolumeState
from vhost_pv.volume.ring import RingReader
from vhost_pv.volume.volume import CreateOptions, Volume, create_volume, read_header
from vhost_pv_tools.serverproc import ServerProcess

DISK_SIZE = 16 << 20
MEMORY_SIZE = 4 << 20
VICTIM, BYSTANDER = 0, 1


@dataclasses.dataclass
class Daemon:
    server: ServerProcess
    volumes: list[Path]

    def socket(self, index: int) -> Path:
        return self.server.socket_for(self.volumes[index])

    def status(self) -> dict[str, Any]:
        """STATUS, which must answer within a second whatever a frontend did."""
        started = time.monotonic()
        result: dict[str, Any] = json.loads(client.call(self.server.control, Command.STATUS, timeout=1.0))
        assert time.monotonic() - started < 1.0
        return result

    def entry(self, index: int) -> dict[str, Any]:
        name = self.volumes[index].stem
        (entry,) = [v for v in self.status()["volumes"] if v["name"] == name]
        return dict(entry)

    def wait_detached(self, index: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.entry(index)["connection"] is not None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.volumes[index].stem} is still attached")
            time.sleep(0.05)

    def assert_alive(self) -> None:
        assert self.server.process is not None and self.server.process.poll() is None, self.server.log()
        self.status()


def make_volumes(directory: Path, ring_size: int = 1 << 20) -> list[Path]:
    volumes = [directory / "victim.img", directory / "bystander.img"]
    for path in volumes:
        create_volume(path, CreateOptions(size=DISK_SIZE, ring_size=ring_size))
    return volumes


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    volumes = make_volumes(tmp_path)
    server = ServerProcess(volumes, tmp_path / "run")
    with server:
        yield Daemon(server, volumes)
        assert server.process is not None and server.process.poll() is None, server.log()
        assert "Traceback" not in server.log()


class Guest:
    """A negotiated frontend with guest memory and queue 0 running."""

    def __init__(
        self,
        socket_path: Path,
        *,
        ring_size: int = 64,
        call: int | None = None,
        memory_size: int = MEMORY_SIZE,
    ) -> None:
        self.frontend = VhostUserFrontend(socket_path, timeout=3.0)
        self.frontend.negotiate()
        self.memory = GuestMemory(memory_size)
        self.frontend.set_mem_table(self.memory)
        self.ring = SplitRing(self.memory, ring_size)
        self.frontend.setup_queue(0, self.ring, call=call)

    def run(self, request: BlkRequest) -> BlkRequest:
        return self.frontend.submit(0, self.ring, request)

    def round_trip(self, sector: int, data: bytes) -> None:
        assert self.run(write_request(self.memory, sector, data)).status == VIRTIO_BLK_S_OK
        read = self.run(read_request(self.memory, sector, len(data)))
        assert read.status == VIRTIO_BLK_S_OK
        assert read.data() == data

    def close(self) -> None:
        self.frontend.close()
        self.memory.close()


def assert_serves(daemon: Daemon, index: int, seed: int) -> None:
    guest = Guest(daemon.socket(index))
    try:
        guest.round_trip(8 * seed, pattern(4096, seed))
    finally:
        guest.close()


def assert_unharmed(daemon: Daemon, seed: int) -> None:
    """The daemon answers, the bystander serves, and the victim takes a fresh frontend."""
    daemon.assert_alive()
    assert_serves(daemon, BYSTANDER, seed)
    daemon.wait_detached(VICTIM)
    assert_serves(daemon, VICTIM, seed + 1)
    daemon.assert_alive()


# -- guest memory that vanishes ------------------------------------------------------------------


def test_memory_shrunk_under_a_running_queue(daemon: Daemon) -> None:
    guest = Guest(daemon.socket(VICTIM))
    guest.round_trip(0, pattern(4096, 1))
    # A request is posted, then the frontend truncates its memory file: the rings and the
    # buffers are gone. (This process must not touch its own mapping from here on.)
    write_request(guest.memory, 64, pattern(4096, 2)).submit(guest.ring)
    os.ftruncate(guest.memory.fd, 0)
    guest.frontend.kick(0)
    assert guest.frontend.wait_closed(5.0), "the connection of the faulting queue was not ended"
    daemon.server.wait_log(r"victim: queue 0 stopped: its guest memory vanished.*closing connection")
    guest.close()
    assert_unharmed(daemon, 3)


def test_memory_shrunk_before_the_queue_starts(daemon: Daemon) -> None:
    frontend = VhostUserFrontend(daemon.socket(VICTIM), timeout=3.0)
    frontend.negotiate()
    memory = GuestMemory(MEMORY_SIZE)
    ring = SplitRing(memory, 64)
    frontend.set_mem_table(memory)
    os.ftruncate(memory.fd, 0)  # the rings vanish between SET_MEM_TABLE and the start
    with contextlib.suppress(FrontendError, OSError):
        frontend.setup_queue(0, ring)
    assert frontend.wait_closed(5.0)
    daemon.server.wait_log(r"victim: protocol error, closing connection: queue 0 cannot start: Bad address")
    frontend.close()
    memory.close()
    assert_unharmed(daemon, 5)


def test_data_buffers_shrunk_fail_the_request_not_the_queue(daemon: Daemon) -> None:
    """Memory lost under a request's data only: the kernel copies to or from it with EFAULT
    (no SIGBUS), the request completes with IOERR and the queue goes on."""
    guest = Guest(daemon.socket(VICTIM))
    far = guest.memory.guest_phys_addr + 3 * (1 << 20)  # lost when the file shrinks to 2 MiB
    requests = []
    for req_type, buffer in ((VIRTIO_BLK_T_OUT, (far, 4096, False)), (VIRTIO_BLK_T_IN, (far, 4096, True))):
        header = guest.memory.put(blk_header(req_type, 8))
        status = guest.memory.alloc(1, 1)
        guest.memory.write(status, bytes([STATUS_UNSET]))
        requests.append(BlkRequest(guest.memory, req_type, 8, [(header, BLK_HEADER_SIZE, False), buffer,
                                                              (status, 1, True)], status))
    os.ftruncate(guest.memory.fd, 2 << 20)
    for request in requests:
        assert guest.run(request).status == VIRTIO_BLK_S_IOERR
    guest.round_trip(16, pattern(4096, 7))  # the queue still serves buffers that exist
    guest.close()
    assert_unharmed(daemon, 9)


# -- eventfds that would block ------------------------------------------------------------------


def test_full_blocking_call_eventfd_never_blocks_the_daemon(daemon: Daemon) -> None:
    call = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, and one write short of full
    os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)
    guest = Guest(daemon.socket(VICTIM), call=call)
    try:
        for seed in range(4):
            data = pattern(4096, seed)
            write = write_request(guest.memory, 8 * seed, data).submit(guest.ring)
            guest.frontend.kick(0)
            spin_used(guest.ring, 1)
            assert write.status == VIRTIO_BLK_S_OK
            read = read_request(guest.memory, 8 * seed, 4096).submit(guest.ring)
            guest.frontend.kick(0)
            spin_used(guest.ring, 1)
            assert read.status == VIRTIO_BLK_S_OK and read.data() == data
        (queue,) = daemon.entry(VICTIM)["connection"]["queues"]
        assert queue["calls_saturated"] > 0
        # Stopping the queue joins its worker: it must not be stuck in a write().
        started = time.monotonic()
        guest.frontend.get_vring_base(0)
        assert time.monotonic() - started < 1.0
        daemon.status()
        # The backend made our shared description non-blocking (QEMU's is already).
        assert fcntl.fcntl(call, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        guest.close()
    assert_unharmed(daemon, 11)


def test_call_eventfd_made_blocking_again_cannot_hold_the_stop(daemon: Daemon) -> None:
    """O_NONBLOCK belongs to the description the frontend shares with us: it can clear it
    again. A worker then blocked writing to the full call eventfd is interrupted by the stop."""
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    guest = Guest(daemon.socket(VICTIM), call=call)
    try:
        guest.round_trip(0, pattern(4096, 1))
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(call)
        os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)
        fcntl.fcntl(call, fcntl.F_SETFL, fcntl.fcntl(call, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        guest.ring.set_used_event(guest.ring.used_idx)  # EVENT_IDX: interrupt on the next one
        write = write_request(guest.memory, 8, pattern(4096, 2)).submit(guest.ring)
        guest.frontend.kick(0)
        spin_used(guest.ring, 1)  # published; the interrupt after it blocks
        assert write.status == VIRTIO_BLK_S_OK
        daemon.status()
        started = time.monotonic()
        guest.frontend.get_vring_base(0)
        assert time.monotonic() - started < 1.0
        daemon.status()
    finally:
        guest.close()
    assert_unharmed(daemon, 15)


# -- fds of the wrong kind ----------------------------------------------------------------------


def _pipe() -> tuple[int, list[int]]:
    r, w = os.pipe()
    return r, [r, w]


def _socket() -> tuple[int, list[int]]:
    a, b = socket.socketpair()
    fds = [a.detach(), b.detach()]
    return fds[0], fds


def _eventfd() -> tuple[int, list[int]]:
    fd = os.eventfd(0)
    return fd, [fd]


def _dev_zero() -> tuple[int, list[int]]:
    fd = os.open("/dev/zero", os.O_RDWR)
    return fd, [fd]


def _regular_file(directory: Path) -> Callable[[], tuple[int, list[int]]]:
    def make() -> tuple[int, list[int]]:
        fd = os.open(directory / "not-an-eventfd", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, MEMORY_SIZE)
        return fd, [fd]

    return make


def test_fds_of_the_wrong_kind_end_the_connection(daemon: Daemon, tmp_path: Path) -> None:
    eventfd_cases = [("a pipe", _pipe), ("a socket", _socket), ("a regular file", _regular_file(tmp_path))]
    memory_cases = [("a pipe", _pipe), ("a socket", _socket), ("anon_inode:\\[eventfd\\]", _eventfd),
                    ("a character device \\(/dev/zero\\)", _dev_zero)]
    cases: list[tuple[str, str, Callable[[], tuple[int, list[int]]]]] = [
        (request, what, make)
        for request in ("SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR")
        for what, make in eventfd_cases
    ] + [("SET_MEM_TABLE", what, make) for what, make in memory_cases]
    memory = GuestMemory(MEMORY_SIZE)
    try:
        for request, what, make in cases:
            fd, owned = make()
            frontend = VhostUserFrontend(daemon.socket(VICTIM), timeout=3.0)
            try:
                frontend.negotiate()
                with contextlib.suppress(FrontendError, OSError):
                    if request == "SET_MEM_TABLE":
                        frontend.set_mem_table([MemoryRegionSpec(memory.guest_phys_addr, MEMORY_SIZE,
                                                                 memory.userspace_addr, 0, fd)])
                    else:
                        frontend.set_mem_table(memory)
                        frontend.command(Request[request], bytes(U64Payload.build(0)), [fd])
                assert frontend.wait_closed(5.0), f"{request} with {what} did not end the connection"
                daemon.server.wait_log(rf"victim: protocol error, closing connection: {request}: the "
                                rf"(memory )?fd is {what}")
            finally:
                frontend.close()
                for owned_fd in owned:
                    os.close(owned_fd)
            daemon.wait_detached(VICTIM)
    finally:
        memory.close()
    assert_unharmed(daemon, 13)


# -- acknowledged quarantined writes survive kill -9 ----------------------------------------------


WRITES = 128
WRITE_SIZE = 16384  # a batch takes long enough (hashing) for the stop to land inside it
ATTEMPTS = 6


def _stopped(pid: int) -> bool:
    """Every thread of pid is stopped (SIGSTOP has taken effect everywhere)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            state = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("T", "t"):
                return False
    return True


def _ring_payloads(path: Path) -> tuple[dict[bytes, int], list[str]]:
    """sha256 of each record's payload -> its sector, and the chain check's problems."""
    with RingReader(path, read_header(path)) as reader:
        report = reader.verify()
        found = {hashlib.sha256(reader.payload(r).tobytes()).digest(): r.sector for r in reader.records()}
    return found, report.problems


def test_acknowledged_quarantined_writes_are_in_the_ring(tmp_path: Path) -> None:
    volumes = make_volumes(tmp_path, ring_size=(ATTEMPTS + 1) * WRITES * (WRITE_SIZE + 4096))
    victim = volumes[VICTIM]
    server = ServerProcess(volumes, tmp_path / "run")
    server.start()
    try:
        guest = Guest(server.socket_for(victim), ring_size=512,
                      memory_size=(ATTEMPTS + 1) * WRITES * (WRITE_SIZE + 4096))
        client.persistent_disk_dangling(server.control, victim.stem, reason="test")
        acknowledged: dict[bytes, int] = {}
        for attempt in range(ATTEMPTS):
            requests = [write_request(guest.memory, 64 * i, pattern(WRITE_SIZE - 8, attempt * WRITES + i)
                                      + (attempt * WRITES + i).to_bytes(8, "little"))
                        for i in range(WRITES)]
            heads = [guest.ring.add_chain(r.buffers) for r in requests]
            for request, head in zip(requests, heads, strict=True):
                request.head = head
            start = guest.ring.used_idx
            guest.ring.publish(*heads)
            guest.frontend.kick(0)
            deadline = time.monotonic() + 10
            while guest.ring.used_idx == start:  # spin: stop it at the first acknowledgements
                assert time.monotonic() < deadline, "no completion"
            os.kill(server.pid, signal.SIGSTOP)
            while not _stopped(server.pid):
                time.sleep(0.001)
            done = guest.ring.collect()
            by_head = {r.head: r for r in requests}
            for head, _ in done:
                request = by_head[head]
                assert request.status == VIRTIO_BLK_S_OK
                acknowledged[hashlib.sha256(request.data()).digest()] = request.sector
            # What a kill -9 now would leave: every acknowledged write is in the ring.
            found, problems = _ring_payloads(victim)
            assert not problems, problems
            missing = {d: s for d, s in acknowledged.items() if found.get(d) != s}
            assert not missing, f"attempt {attempt}: {len(missing)} acknowledged writes not in the ring"
            if attempt + 1 == ATTEMPTS:
                break
            os.kill(server.pid, signal.SIGCONT)
            for head, _ in spin_used(guest.ring, WRITES - len(done)):
                acknowledged[hashlib.sha256(by_head[head].data()).digest()] = by_head[head].sector
        # And a real kill -9, then a restart on the same file.
        server.kill()
        guest.close()
        found, problems = _ring_payloads(victim)
        assert not problems and all(found.get(d) == s for d, s in acknowledged.items())
        server.start()
        found, problems = _ring_payloads(victim)
        assert not problems and all(found.get(d) == s for d, s in acknowledged.items())
        assert client.status(server.control)["volumes"]
    finally:
        server.kill()


def test_ring_reader_reports_records_past_the_tail(tmp_path: Path) -> None:
    """A record written whose superblock never followed (a crash in between) is not part of
    the ring, and the reader says it is there instead of ignoring it."""
    path = tmp_path / "vol.img"
    create_volume(path, CreateOptions(size=DISK_SIZE, ring_size=1 << 20))
    volume = Volume(path)
    device = BlkDevice(volume, 1, read_only=False, sync_io=True)
    memory = GuestMemory(MEMORY_SIZE)
    ring = SplitRing(memory, 64)
    try:
        volume.update(state=VolumeState.DANGLING)
        device.set_memory([memory.region()])
        device.start_queue(VringSetup(0, 64, 0, memory.uaddr(ring.desc_addr), memory.uaddr(ring.avail_addr),
                                      memory.uaddr(ring.used_addr), -1, -1, False, False))
        header = volume.header
        for seed in range(2):
            write_request(memory, 8 * seed, pattern(4096, seed)).submit(ring)
            assert device.process_queue(0) == 1
        acknowledged_super = os.pread(volume.fd, 4096, header.ring_offset)
        write_request(memory, 16, pattern(4096, 2)).submit(ring)
        assert device.process_queue(0) == 1
        # The crash: the third record is in the file, its superblock is not.
        os.pwrite(volume.fd, acknowledged_super, header.ring_offset)
        with RingReader(path, read_header(path)) as reader:
            report = reader.verify()
            assert report.ok and report.records == 2 and report.unacknowledged == 1
            (late,) = reader.past_tail()
            assert late.sector == 16 and reader.payload(late).tobytes() == pattern(4096, 2)
    finally:
        device.close()
        memory.close()
        volume.close()


def test_fs_memory_shrunk_ends_the_connection_not_the_process() -> None:
    """The virtio-fs rings are walked on the event loop thread: a fault there fails the
    device (and so its connection), and the daemon's process lives on."""
    failures: list[str] = []

    async def scenario() -> None:
        device = FsDevice("metadata-test", lambda request, room: b"")
        device.set_failure_handler(failures.append)
        memory = GuestMemory(MEMORY_SIZE)
        ring = SplitRing(memory, 64)
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        try:
            device.set_memory([memory.region()])
            desc, avail, used = (memory.uaddr(a) for a in (ring.desc_addr, ring.avail_addr, ring.used_addr))
            device.start_queue(VringSetup(1, 64, 0, desc, avail, used, kick, call, False, False))
            request = memory.put(bytes(64))
            reply = memory.alloc(64)
            ring.publish(ring.add_chain([(request, 64, False), (reply, 64, True)]))
            os.ftruncate(memory.fd, 0)
            os.eventfd_write(kick, 1)
            deadline = time.monotonic() + 5
            while not failures and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert device.describe()["broken"] == 1
            device.stop_queue(1)
        finally:
            device.close()
            os.close(kick)
            os.close(call)
            memory.close()

    asyncio.run(scenario())
    assert len(failures) == 1 and "guest memory vanished" in failures[0]


def test_a_sigbus_outside_guest_memory_access_still_crashes() -> None:
    """The guard catches faults only where it is armed: anywhere else a SIGBUS is the crash it
    always was (here: a Python mmap of a file that shrank, after a device installed it)."""
    script = """
import mmap, os
from vhost_pv.devices.fs import FsDevice
FsDevice("x", lambda request, room: None)  # installs the guard's handler
fd = os.memfd_create("gone")
os.ftruncate(fd, 8192)
view = mmap.mmap(fd, 8192)
os.ftruncate(fd, 0)
view[4096]  # not armed: SIGBUS
print("survived")
"""
    for faulthandler in (False, True):
        options = ["-X", "faulthandler"] if faulthandler else []
        result = subprocess.run([sys.executable, *options, "-c", script], capture_output=True, timeout=30)
        assert result.returncode == -signal.SIGBUS, result
        assert b"survived" not in result.stdout
        # A handler installed before ours (faulthandler) still gets the fault.
        assert (b"Fatal Python error: Bus error" in result.stderr) == faulthandler, result
