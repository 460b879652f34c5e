"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): a backend restarted with
requests in flight completes each of them exactly once, and nothing it had completed again.

QEMU restarts the rings after a backend crash with last_avail_idx = used->idx (it cannot know
better). Completions are out of order, so that index alone repeats some requests and loses
others; the inflight area the backend keeps in a frontend-held memfd says which are which.
These tests build that state by hand (a), and reach it by SIGKILLing a daemon under load (b).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.frontend import (
    SECTOR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkRequest,
    FrontendError,
    GuestMemory,
    SplitRing,
    VhostUserFrontend,
    read_request,
    write_request,
)

from vhost_pv.protocol.messages import (
    INFLIGHT_VERSION,
    InflightDescState,
    InflightRegionHeader,
    ProtocolFeature,
    inflight_area_size,
    inflight_queue_region_size,
)
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

DISK_SIZE = 16 << 20
RING = 64
HEADER = InflightRegionHeader.sizeof()
DESC = InflightDescState.sizeof()

# numpy views of the split-ring region layout (vhost-user spec, "Inflight I/O tracking").
HEADER_DTYPE = np.dtype(
    [("features", "<u8"), ("version", "<u2"), ("desc_num", "<u2"), ("last_batch_head", "<u2"),
     ("used_idx", "<u2")]
)
DESC_DTYPE = np.dtype([("inflight", "u1"), ("pad", "u1", 5), ("next", "<u2"), ("counter", "<u8")])


class InflightView:
    """The test's mapping of an inflight area: what QEMU keeps across backend restarts."""

    def __init__(self, fd: int, size: int, num_queues: int, queue_size: int) -> None:
        self.fd = fd
        self.size = size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.map = mmap.mmap(fd, size)
        self.region_size = inflight_queue_region_size(queue_size)

    def header(self, queue: int = 0) -> np.ndarray:  # type: ignore[type-arg]
        buf = np.frombuffer(self.map, dtype=np.uint8, count=HEADER, offset=queue * self.region_size)
        return buf.view(HEADER_DTYPE)

    def descs(self, queue: int = 0) -> np.ndarray:  # type: ignore[type-arg]
        buf = np.frombuffer(
            self.map, dtype=np.uint8, count=DESC * self.queue_size, offset=queue * self.region_size + HEADER
        )
        return buf.view(DESC_DTYPE)

    def in_flight(self, queue: int = 0) -> list[int]:
        # A copy first: the daemon may be changing the flags under us.
        flags = self.descs(queue)["inflight"].copy()
        return [int(i) for i in np.nonzero(flags)[0]]


@contextlib.contextmanager
def daemon(volume: Path, workdir: Path) -> Iterator[ServerProcess]:
    with ServerProcess([volume], workdir) as server:
        yield server
        assert server.process is not None and server.process.poll() is None
        assert "Traceback" not in server.log()


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    create_volume(path, CreateOptions(size=DISK_SIZE, ring_size=1 << 20))
    return path


def get_area(socket_path: Path, queue_size: int = RING) -> tuple[int, int, int]:
    """What QEMU does once per device: a connection that asks for the area (and keeps it)."""
    with VhostUserFrontend(socket_path) as frontend:
        frontend.negotiate()
        assert frontend.get_protocol_features() & (1 << ProtocolFeature.INFLIGHT_SHMFD)
        return frontend.get_inflight_fd(1, queue_size)


def connect(
    socket_path: Path, memory: GuestMemory, ring: SplitRing, area: tuple[int, int, int], *, base: int
) -> VhostUserFrontend:
    """QEMU's reconnect: SET_INFLIGHT_FD with the area it kept, memory, the ring at `base`."""
    fd, size, offset = area
    frontend = VhostUserFrontend(socket_path)
    frontend.negotiate()
    frontend.set_inflight_fd(fd, size, offset, 1, ring.size)
    frontend.set_mem_table(memory)
    frontend.setup_queue(0, ring, base=base)
    return frontend


def io(frontend: VhostUserFrontend, ring: SplitRing, request: BlkRequest) -> BlkRequest:
    done = frontend.submit(0, ring, request)
    assert done.status == VIRTIO_BLK_S_OK
    return done


def barrier(frontend: VhostUserFrontend, ring: SplitRing) -> None:
    """A flush waits for everything taken before it: once it completes, and nothing else with
    it, no completion of an earlier request is still to come (no repeat hides behind it)."""
    io(frontend, ring, BlkRequest.build(ring.memory, VIRTIO_BLK_T_FLUSH))


def pattern(tag: int, length: int) -> bytes:
    return ((np.arange(length, dtype=np.uint32) + tag * 31) & 0xFF).astype(np.uint8).tobytes()


def test_area_is_offered_initialised_and_sealed(volume: Path, tmp_path: Path) -> None:
    with daemon(volume, tmp_path / "run") as server:
        fd, size, offset = get_area(server.socket_for(volume), 128)
        try:
            assert (size, offset) == (inflight_area_size(1, 128), 0)
            assert os.fstat(fd).st_size == size
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
            view = InflightView(fd, size, 1, 128)
            header = view.header()[0]
            assert (int(header["version"]), int(header["desc_num"])) == (INFLIGHT_VERSION, 128)
            assert view.in_flight() == []
        finally:
            os.close(fd)


def test_hand_built_crash_state_completes_each_request_once(volume: Path, tmp_path: Path) -> None:
    """A previous backend took 8 requests, completed 3 out of order (the last one with its
    used entry published but its inflight flag not yet cleared) and died. QEMU reconnects
    with base = used->idx. The 5 others complete once each; the 3 completed never again."""
    with daemon(volume, tmp_path / "run") as server:
        sock = server.socket_for(volume)
        area = get_area(sock)
        fd, size, _ = area
        view = InflightView(fd, size, 1, RING)
        memory = GuestMemory(4 << 20)
        ring = SplitRing(memory, RING)

        # Known data where the reads will look, through a first (clean) connection.
        frontend = connect(sock, memory, ring, area, base=0)
        with frontend:
            for i in range(4):
                io(frontend, ring, write_request(memory, 100 + 8 * i, pattern(100 + i, 4096)))
            base = ring.used_idx
            assert frontend.get_vring_base(0) == base
        assert view.in_flight() == [], "a clean stop leaves nothing in flight"

        # Requests 0..7: writes (even) and reads (odd), all taken by the "old backend".
        requests: list[BlkRequest] = []
        for i in range(8):
            if i % 2 == 0:
                request = write_request(memory, 8 * i, pattern(i, 4096))
            else:
                request = read_request(memory, 100 + 8 * (i // 2), 4096)
            request.head = ring.add_chain(request.buffers)
            requests.append(request)
        ring.publish(*(r.head for r in requests))
        descs = view.descs()
        header = view.header()
        counter0 = int(descs["counter"].max())
        for n, request in enumerate(requests):
            descs["inflight"][request.head] = 1
            descs["counter"][request.head] = counter0 + 1 + n
        # It completed 5, then 2 (each fully recorded), then 6: used->idx moved past 6 but
        # the crash came before its flag was cleared and the region's used_idx followed.
        completed = [5, 2, 6]
        for n, i in enumerate(completed):
            head = requests[i].head
            ring.used_ring[(base + n) % RING] = (head, 1)
            memory.write(requests[i].status_addr, bytes([VIRTIO_BLK_S_OK]))
            descs["next"][head] = int(header["last_batch_head"][0])
            header["last_batch_head"] = head
            if i != 6:
                descs["inflight"][head] = 0
                header["used_idx"] = base + n + 1
        ring.used_idx_view[0] = base + len(completed)
        still = sorted(r.head for i, r in enumerate(requests) if i not in completed)
        assert sorted(view.in_flight()) == sorted([*still, requests[6].head])

        assert [h for h, _ in ring.collect()] == [requests[i].head for i in completed]

        # QEMU's fallback after a backend crash: base = used->idx.
        frontend = connect(sock, memory, ring, area, base=ring.used_idx)
        with frontend:
            frontend.kick(0)
            used = frontend.wait_used(0, ring, len(still))
            assert sorted(h for h, _ in used) == still, used
            # Nothing more comes: the completed ones are not done again.
            barrier(frontend, ring)
            for i, request in enumerate(requests):
                assert request.status == VIRTIO_BLK_S_OK
                if i % 2 == 1 and i not in completed:
                    assert request.data() == pattern(100 + i // 2, 4096)
            assert view.in_flight() == []
            assert int(view.header()["used_idx"][0]) == ring.used_idx
            # The resubmitted writes are on disk; write 2 and 6 (completed before the crash,
            # by a backend that in this hand-built state never wrote them) were not redone.
            for i in range(0, 8, 2):
                read = io(frontend, ring, read_request(memory, 8 * i, 4096))
                assert (read.data() == pattern(i, 4096)) == (i not in completed), i
            # New requests work as ever.
            io(frontend, ring, write_request(memory, 200, pattern(9, 8192)))
            assert io(frontend, ring, read_request(memory, 200, 8192)).data() == pattern(9, 8192)
            assert view.in_flight() == []
        os.close(fd)
        # (A stop between the start and the resubmission, e.g. the call fd replaced right
        # after the kick as QEMU does, may log that requests stay marked: they are redone at
        # the next start, which the assertions above cover.)
        assert "Traceback" not in server.log()


def _sealed_memfd(size: int) -> int:
    fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize(
    "case",
    ["size_mismatch", "file_too_small", "unsealed", "wrong_desc_num", "bad_version", "garbage_flag",
     "batch_head_out_of_range", "more_in_flight_than_available", "queue_size_mismatch"],
)
def test_malformed_area_is_refused(volume: Path, tmp_path: Path, case: str) -> None:
    size = inflight_area_size(1, RING)
    with daemon(volume, tmp_path / "run") as server:
        sock = server.socket_for(volume)
        fd, _, _ = get_area(sock)
        num_queues, queue_size, mmap_size = 1, RING, size
        if case == "size_mismatch":
            mmap_size = size + 4096
        elif case == "file_too_small":
            os.close(fd)
            fd = _sealed_memfd(size // 2)
        elif case == "unsealed":
            os.close(fd)
            fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        elif case == "queue_size_mismatch":
            queue_size, mmap_size = 2 * RING, inflight_area_size(1, 2 * RING)
            os.close(fd)
            fd = _sealed_memfd(mmap_size)
        else:
            view = InflightView(fd, size, 1, RING)
            header, descs = view.header(), view.descs()
            if case == "wrong_desc_num":
                header["desc_num"] = RING // 2
            elif case == "bad_version":
                header["version"] = 7
            elif case == "garbage_flag":
                descs["inflight"][3] = 0x80
            elif case == "batch_head_out_of_range":
                header["used_idx"] = 0xFFFF   # used->idx is 0: a batch of one...
                header["last_batch_head"] = RING + 5   # ...headed out of the table
            elif case == "more_in_flight_than_available":
                descs["inflight"][1] = 1   # avail->idx is 0: nothing was ever available
        memory = GuestMemory(1 << 20)
        ring = SplitRing(memory, RING)
        frontend = VhostUserFrontend(sock)
        with frontend, pytest.raises(FrontendError):
            frontend.negotiate()
            frontend.set_inflight_fd(fd, mmap_size, 0, num_queues, queue_size)
            frontend.set_mem_table(memory)
            frontend.setup_queue(0, ring)
        os.close(fd)
        # One clear line, the connection closed, the daemon serving the next frontend.
        deadline = time.monotonic() + 5
        while "protocol error, closing connection" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        good = get_area(sock)
        frontend = connect(sock, memory, ring, good, base=0)
        with frontend:
            io(frontend, ring, write_request(memory, 0, pattern(1, 512)))
        os.close(good[0])


def test_sigkill_under_load_loses_and_repeats_nothing(volume: Path, tmp_path: Path) -> None:
    """A daemon SIGKILLed with reads and writes in flight (out of order, on its io_uring),
    restarted, and reconnected as QEMU does: every request completes exactly once and the
    written data is on disk."""
    ring_size, count, length = 1024, 240, 65536
    workdir = tmp_path / "run"
    memory = GuestMemory(24 << 20)
    ring = SplitRing(memory, ring_size)
    # O_DIRECT: every request waits for the device on the io_uring, so the window in which
    # requests are taken but not completed is wide enough to catch on a busy machine too.
    server = ServerProcess([volume], workdir, extra_args=["--direct"]).start()
    try:
        sock = server.socket_for(volume)
        area = get_area(sock, ring_size)
        fd, size, _ = area
        view = InflightView(fd, size, 1, ring_size)
        # Reads look at sectors filled first; writes go elsewhere.
        read_base, write_base = 0, 4 << 20
        frontend = connect(sock, memory, ring, area, base=0)
        with frontend:
            io(frontend, ring, write_request(memory, read_base // SECTOR, pattern(7, 1 << 20)))
            base = frontend.get_vring_base(0)
        frontend = connect(sock, memory, ring, area, base=base)
        mark = memory.mark()
        requests: dict[int, BlkRequest] = {}
        caught = 0
        for attempt in range(40):
            batch = []
            for i in range(count):
                n = attempt * count + i
                if i % 3 == 0:
                    sector = (write_base + (n % 100) * length) // SECTOR
                    request = write_request(memory, sector, pattern(n, length))
                else:
                    request = read_request(memory, (read_base + (n * length) % (1 << 20)) // SECTOR, length)
                request.head = ring.add_chain(request.buffers)
                batch.append(request)
            ring.publish(*(r.head for r in batch))
            frontend.kick(0)
            # Watch the area until the daemon has taken requests and not completed them all,
            # then freeze it and look again: in flight then means in flight at the kill.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and ring.pending() < count:
                if ring.pending() and len(view.in_flight()) >= 8:
                    break
            os.kill(server.pid, signal.SIGSTOP)
            caught = len(view.in_flight()) if ring.pending() else 0
            requests.update((r.head, r) for r in batch)
            if caught:
                break
            os.kill(server.pid, signal.SIGCONT)
            frontend.wait_used(0, ring, count)
            requests.clear()
            memory.rewind(mark)   # the next try reuses the same buffers
        assert caught, "never caught requests in flight"
        server.kill()
        frontend.close()
        done = [h for h, _ in ring.collect()]

        # QEMU: the backend is gone; on reconnect it restarts the ring at used->idx.
        server = ServerProcess([volume], workdir, extra_args=["--direct"]).start()
        frontend = connect(sock, memory, ring, area, base=ring.used_idx)
        with frontend:
            frontend.kick(0)
            done += [h for h, _ in frontend.wait_used(0, ring, len(requests) - len(done))]
            barrier(frontend, ring)
            assert sorted(done) == sorted(requests), "each request completed exactly once"
            assert all(r.status == VIRTIO_BLK_S_OK for r in requests.values())
            assert view.in_flight() == []
            prefill = pattern(7, 1 << 20)
            for request in requests.values():
                if request.req_type == VIRTIO_BLK_T_IN:
                    offset = request.sector * SECTOR - read_base
                    assert request.data() == prefill[offset : offset + length]
            written = {
                r.sector: memory.read(r.buffers[1][0], length)
                for r in requests.values()
                if r.req_type == VIRTIO_BLK_T_OUT
            }
            # Each write of the last batch went to a block of its own: all must be there.
            for sector, payload in written.items():
                assert io(frontend, ring, read_request(memory, sector, length)).data() == payload, sector
        os.close(fd)
    finally:
        server.kill()
        memory.close()


def test_each_queue_recovers_from_its_own_region(volume: Path, tmp_path: Path) -> None:
    """Two queues share one area, a region each: a request left in flight on queue 1 is
    resubmitted on queue 1 only, and queue 0 (nothing in flight) resumes where it was."""
    with ServerProcess([volume], tmp_path / "run", queues=2) as server:
        sock = server.socket_for(volume)
        with VhostUserFrontend(sock) as first:
            first.negotiate()
            fd, size, offset = first.get_inflight_fd(2, RING)
        assert size == inflight_area_size(2, RING)
        view = InflightView(fd, size, 2, RING)
        memory = GuestMemory(4 << 20)
        rings = [SplitRing(memory, RING), SplitRing(memory, RING)]
        # Queue 1: the "old backend" took a write, then a read, completed the read first and
        # died. Without the right region, base = used->idx would take the read again and
        # never the write.
        lost = write_request(memory, 64, pattern(42, 4096))
        done = read_request(memory, 0, 512)
        for request in (lost, done):
            request.head = rings[1].add_chain(request.buffers)
        rings[1].publish(lost.head, done.head)
        view.descs(1)["inflight"][lost.head] = 1
        view.descs(1)["counter"][lost.head] = 1
        view.descs(1)["counter"][done.head] = 2
        rings[1].used_ring[0] = (done.head, 513)
        rings[1].used_idx_view[0] = 1
        view.header(1)["last_batch_head"] = done.head
        view.header(1)["used_idx"] = 1
        assert [h for h, _ in rings[1].collect()] == [done.head]

        frontend = VhostUserFrontend(sock)
        with frontend:
            frontend.negotiate()
            frontend.set_inflight_fd(fd, size, offset, 2, RING)
            frontend.set_mem_table(memory)
            for index, ring in enumerate(rings):
                frontend.setup_queue(index, ring, base=ring.used_idx)
            frontend.kick(1)
            assert [h for h, _ in frontend.wait_used(1, rings[1], 1)] == [lost.head]
            assert lost.status == VIRTIO_BLK_S_OK
            barrier_request = BlkRequest.build(memory, VIRTIO_BLK_T_FLUSH)
            assert frontend.submit(1, rings[1], barrier_request).status == VIRTIO_BLK_S_OK
            assert view.in_flight(0) == [] and view.in_flight(1) == []
            read = frontend.submit(0, rings[0], read_request(memory, 64, 4096))
            assert read.status == VIRTIO_BLK_S_OK and read.data() == pattern(42, 4096)
            assert rings[0].pending() == 0 and rings[1].pending() == 0
        os.close(fd)
        assert "Traceback" not in server.log()
