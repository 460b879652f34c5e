"""The C data path on a split ring, in-process and without a daemon.

The queue is started without a kick fd and drained with BlkDevice.process_queue, so every
test sees exactly what one pass over the ring did: the used ring, the status byte, the
volume file and the queue counters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.frontend import (
    BLK_HEADER_SIZE,
    DESC_SIZE,
    SECTOR,
    STATUS_UNSET,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    BlkRequest,
    GuestMemory,
    SplitRing,
    blk_header,
    discard_segment,
    read_request,
    write_request,
)

from vhost_pv._native import lib
from vhost_pv.devices.blk import BlkDevice
from vhost_pv.protocol.channel import ProtocolError
from vhost_pv.protocol.session import VringSetup
from vhost_pv.volume.header import VolumeState
from vhost_pv.volume.volume import CreateOptions, Volume, create_volume

DISK_SIZE = 8 << 20
QUEUE_SIZE = 64


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(length))


class Disk:
    """A volume, one connection's device on it, guest memory and queue 0."""

    def __init__(self, path: Path, *, read_only: bool = False, indirect: bool = True,
                 mode: str = "sync") -> None:
        create_volume(path, CreateOptions(size=DISK_SIZE, ring_size=1 << 20))
        self.mode = mode
        self.volume = Volume(path, direct=mode == "direct")
        self.device = BlkDevice(self.volume, 1, read_only=read_only, sync_io=mode == "sync")
        self.memory = GuestMemory(4 << 20)
        self.ring = SplitRing(self.memory, QUEUE_SIZE)
        self.device.set_memory([self.memory.region()])
        self.device.start_queue(self.setup(indirect=indirect))

    def setup(self, *, indirect: bool = True) -> VringSetup:
        return VringSetup(
            index=0,
            num=QUEUE_SIZE,
            base=0,
            desc_user_addr=self.memory.uaddr(self.ring.desc_addr),
            avail_user_addr=self.memory.uaddr(self.ring.avail_addr),
            used_user_addr=self.memory.uaddr(self.ring.used_addr),
            kick_fd=-1,
            call_fd=-1,
            event_idx=False,
            indirect=indirect,
        )

    @property
    def data_offset(self) -> int:
        return self.volume.header.data_offset

    def file_read(self, sector: int, length: int) -> bytes:
        return os.pread(self.volume.fd, length, self.data_offset + sector * SECTOR)

    def file_write(self, sector: int, data: bytes) -> None:
        os.pwrite(self.volume.fd, data, self.data_offset + sector * SECTOR)

    def process(self) -> int:
        return self.device.process_queue(0)

    def run(self, *requests: BlkRequest, indirect: bool = False) -> list[tuple[int, int]]:
        """Submit, process once, and return the used entries (which must be all of them)."""
        for request in requests:
            request.submit(self.ring, indirect=indirect)
        assert self.process() == len(requests)
        used = self.ring.collect()
        heads = [head for head, _ in used]
        if self.mode != "sync":
            # Completions come back as the kernel finishes them: virtio allows any order.
            heads.sort()
            used.sort()
            assert heads == sorted(r.head for r in requests)
            return [next(u for u in used if u[0] == r.head) for r in requests]
        assert heads == [r.head for r in requests]
        return used

    def run_raw(self, head: int) -> list[tuple[int, int]]:
        """Publish a hand-made chain and process it."""
        self.ring.publish(head)
        assert self.process() == 1
        return self.ring.collect()

    def stats(self) -> dict[str, int]:
        return self.device.stats().queues[0]

    def close(self) -> None:
        self.device.close()
        self.volume.close()
        self.memory.close()


@pytest.fixture(params=["sync", "io_uring", "direct"])
def disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Disk]:
    """Every data-path test runs three times: preadv/pwritev one request at a time (the
    fallback without io_uring), through the page cache on the queue's io_uring (the
    default), and direct mode (O_DIRECT on the io_uring)."""
    d = Disk(tmp_path / "vol.img", mode=request.param)
    yield d
    d.close()


@pytest.fixture
def ro_disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path / "ro.img", read_only=True)
    yield d
    d.close()


# -- the good path ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_write_then_read_round_trip(disk: Disk) -> None:
    data = pattern(4096)
    write = write_request(disk.memory, 8, data)
    assert disk.run(write) == [(write.head, 1)]  # only the status byte was written
    assert write.status == VIRTIO_BLK_S_OK
    assert disk.file_read(8, 4096) == data
    assert disk.file_read(0, 8 * SECTOR) == bytes(8 * SECTOR)  # nothing before it

    read = read_request(disk.memory, 8, 4096)
    assert disk.run(read) == [(read.head, 4096 + 1)]
    assert read.status == VIRTIO_BLK_S_OK
    assert read.data() == data

    stats = disk.stats()
    assert stats["requests"] == 2
    assert stats["writes"] == 1 and stats["reads"] == 1
    assert stats["bytes_written"] == 4096 and stats["bytes_read"] == 4096
    assert stats["io_errors"] == 0 and stats["bad_requests"] == 0
    assert stats["last_avail_idx"] == 2
    assert disk.ring.used_idx == 2


@pytest.mark.timeout(30)
def test_read_sees_data_written_to_the_file(disk: Disk) -> None:
    data = pattern(3 * SECTOR, seed=5)
    disk.file_write(100, data)
    read = read_request(disk.memory, 100, len(data))
    disk.run(read)
    assert read.status == VIRTIO_BLK_S_OK
    assert read.data() == data


@pytest.mark.timeout(30)
def test_multi_descriptor_chains(disk: Disk) -> None:
    data = pattern(8192, seed=2)
    write = write_request(disk.memory, 16, data, split=[512, 1024, 100, 412, 2048])
    assert len(write.buffers) == 1 + 6 + 1
    disk.run(write)
    assert write.status == VIRTIO_BLK_S_OK
    assert disk.file_read(16, 8192) == data

    read = read_request(disk.memory, 16, 8192, split=[4096, 1, 511, 3000])
    assert disk.run(read) == [(read.head, 8192 + 1)]
    assert read.status == VIRTIO_BLK_S_OK
    assert read.data() == data

    # Framing is free: header and data in one readable buffer; data and status in one
    # writable buffer (the status is its last byte).
    combined = disk.memory.put(blk_header(VIRTIO_BLK_T_OUT, 64) + data[:1024])
    status = disk.memory.put(bytes([STATUS_UNSET]))
    head = disk.ring.add_chain([(combined, BLK_HEADER_SIZE + 1024, False), (status, 1, True)])
    assert disk.run_raw(head) == [(head, 1)]
    assert disk.memory.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert disk.file_read(64, 1024) == data[:1024]

    # The header itself split over two descriptors.
    header = blk_header(VIRTIO_BLK_T_OUT, 72)
    first, second = disk.memory.put(header[:8]), disk.memory.put(header[8:] + data[:512])
    status = disk.memory.put(bytes([STATUS_UNSET]))
    head = disk.ring.add_chain([(first, 8, False), (second, 8 + 512, False), (status, 1, True)])
    assert disk.run_raw(head) == [(head, 1)]
    assert disk.memory.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert disk.file_read(72, 512) == data[:512]

    hdr = disk.memory.put(blk_header(VIRTIO_BLK_T_IN, 64))
    buf = disk.memory.alloc(1024 + 1)
    head = disk.ring.add_chain([(hdr, BLK_HEADER_SIZE, False), (buf, 1024 + 1, True)])
    assert disk.run_raw(head) == [(head, 1024 + 1)]
    assert disk.memory.read(buf + 1024, 1)[0] == VIRTIO_BLK_S_OK
    assert disk.memory.read(buf, 1024) == data[:1024]


@pytest.mark.timeout(30)
def test_batch_of_requests_in_one_pass(disk: Disk) -> None:
    writes = [write_request(disk.memory, 8 * i, pattern(4096, seed=i)) for i in range(20)]
    disk.run(*writes)
    assert all(w.status == VIRTIO_BLK_S_OK for w in writes)
    reads = [read_request(disk.memory, 8 * i, 4096) for i in range(20)]
    disk.run(*reads)
    for i, read in enumerate(reads):
        assert read.status == VIRTIO_BLK_S_OK
        assert read.data() == pattern(4096, seed=i)
    # Far more requests than the ring holds, in rounds: the indices wrap around.
    for round_ in range(5):
        batch = [write_request(disk.memory, 1000 + i, pattern(SECTOR, round_)) for i in range(QUEUE_SIZE)]
        disk.run(*batch, indirect=True)  # one descriptor each: the table holds them all
        assert all(w.status == VIRTIO_BLK_S_OK for w in batch)
    assert disk.stats()["requests"] == 40 + 5 * QUEUE_SIZE


@pytest.mark.timeout(30)
def test_indirect_descriptors(disk: Disk) -> None:
    data = pattern(6144, seed=3)
    write = write_request(disk.memory, 200, data, split=[2048, 2048])
    disk.run(write, indirect=True)
    assert disk.ring.desc[write.head]["flags"] == VRING_DESC_F_INDIRECT
    assert write.status == VIRTIO_BLK_S_OK
    assert disk.file_read(200, len(data)) == data

    read = read_request(disk.memory, 200, len(data), split=[512] * 11)
    assert disk.run(read, indirect=True) == [(read.head, len(data) + 1)]
    assert read.status == VIRTIO_BLK_S_OK
    assert read.data() == data
    assert disk.stats()["bad_requests"] == 0


@pytest.mark.timeout(30)
def test_indirect_refused_when_not_negotiated(tmp_path: Path) -> None:
    disk = Disk(tmp_path / "vol.img", indirect=False)
    try:
        write = write_request(disk.memory, 0, pattern(SECTOR))
        assert disk.run(write, indirect=True) == [(write.head, 0)]
        assert write.status == STATUS_UNSET
        assert disk.file_read(0, SECTOR) == bytes(SECTOR)
        assert disk.stats()["bad_requests"] == 1
    finally:
        disk.close()


@pytest.mark.timeout(30)
def test_flush(disk: Disk) -> None:
    disk.run(write_request(disk.memory, 0, pattern(SECTOR)))
    flush = BlkRequest.build(disk.memory, VIRTIO_BLK_T_FLUSH)
    assert disk.run(flush) == [(flush.head, 1)]
    assert flush.status == VIRTIO_BLK_S_OK
    assert disk.stats()["flushes"] == 1


@pytest.mark.timeout(30)
def test_latency_histograms_count_every_request(disk: Disk) -> None:
    """Each completed read, write, flush and discard lands in one bucket of its operation's
    histogram, whichever way it completed (inline, io_uring, quarantined and acknowledged at
    the round's end), and the histograms go on across a queue restart."""
    disk.run(*[write_request(disk.memory, 8 * i, pattern(4096)) for i in range(5)])
    disk.run(*[read_request(disk.memory, 8 * i, 4096) for i in range(3)])
    disk.run(BlkRequest.build(disk.memory, VIRTIO_BLK_T_FLUSH))
    disk.run(BlkRequest.build(disk.memory, VIRTIO_BLK_T_DISCARD, payload=discard_segment(0, 8)))
    disk.run(BlkRequest.build(disk.memory, VIRTIO_BLK_T_GET_ID, read_len=20))  # not measured
    base = disk.device.stop_queue(0)
    disk.device.start_queue(dataclasses.replace(disk.setup(), base=base))
    disk.volume.update(state=VolumeState.DANGLING, dangling_since_ns=1, reason="test")
    disk.run(*[write_request(disk.memory, 8 * i, pattern(4096)) for i in range(2)])  # quarantined
    assert disk.stats()["quarantined"] == 2
    latency = disk.device.stats().latency[0]
    assert {op: sum(buckets) for op, buckets in latency.buckets.items()} == {
        "read": 3, "write": 5 + 2, "flush": 1, "discard": 1}
    assert all(len(buckets) == lib.VPV_LAT_BUCKETS for buckets in latency.buckets.values())
    assert all(latency.sum_ns[op] > 0 for op in latency.buckets)
    # Nothing here takes 4 s: the last (+Inf) bucket stays empty.
    assert all(buckets[-1] == 0 for buckets in latency.buckets.values())


@pytest.mark.timeout(30)
def test_get_id_returns_the_serial(disk: Disk) -> None:
    serial = disk.volume.header.serial
    assert len(serial) == 20
    get_id = BlkRequest.build(disk.memory, VIRTIO_BLK_T_GET_ID, read_len=20)
    assert disk.run(get_id) == [(get_id.head, 20 + 1)]
    assert get_id.status == VIRTIO_BLK_S_OK
    assert get_id.data() == serial
    assert disk.stats()["get_ids"] == 1


@pytest.mark.timeout(30)
def test_discard_punches_a_hole(disk: Disk) -> None:
    length = 1 << 20
    disk.run(write_request(disk.memory, 0, b"\x5a" * length))
    os.fsync(disk.volume.fd)
    blocks_before = os.stat(disk.volume.path).st_blocks
    start = disk.data_offset
    assert os.lseek(disk.volume.fd, start, os.SEEK_HOLE) >= start + length

    # Discard the first 768 KiB, keep the rest.
    discard = BlkRequest.build(
        disk.memory, VIRTIO_BLK_T_DISCARD, payload=discard_segment(0, (768 << 10) // SECTOR)
    )
    disk.run(discard)
    assert discard.status == VIRTIO_BLK_S_OK
    blocks_after = os.stat(disk.volume.path).st_blocks
    # Punching into an extent that also holds the (allocated) header area splits it: the file
    # system may spend one block on the extent tree.
    slack = os.statvfs(disk.volume.path).f_bsize // 512
    assert blocks_after <= blocks_before - (768 << 10) // 512 + slack
    assert os.lseek(disk.volume.fd, start, os.SEEK_HOLE) == start
    assert os.lseek(disk.volume.fd, start, os.SEEK_DATA) >= start + (768 << 10)
    assert disk.file_read(0, 768 << 10) == bytes(768 << 10)
    assert disk.file_read((768 << 10) // SECTOR, 256 << 10) == b"\x5a" * (256 << 10)

    read = read_request(disk.memory, 0, 4096)
    disk.run(read)
    assert read.data() == bytes(4096)
    assert disk.stats()["discards"] == 1


@pytest.mark.timeout(30)
def test_discard_several_segments_and_bad_ones(disk: Disk) -> None:
    disk.run(write_request(disk.memory, 0, b"\x11" * 65536))
    segments = discard_segment(0, 8) + discard_segment(64, 8)
    discard = BlkRequest.build(disk.memory, VIRTIO_BLK_T_DISCARD, payload=segments)
    disk.run(discard)
    assert discard.status == VIRTIO_BLK_S_OK
    assert disk.file_read(0, 4096) == bytes(4096)
    assert disk.file_read(8, 4096) == b"\x11" * 4096
    assert disk.file_read(64, 4096) == bytes(4096)

    capacity = DISK_SIZE // SECTOR
    bad = [
        discard_segment(capacity - 4, 8),  # past the end
        discard_segment(0, 8, flags=VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),  # flag not for discard
        discard_segment(0, 8)[:10],  # torn segment
    ]
    requests = [BlkRequest.build(disk.memory, VIRTIO_BLK_T_DISCARD, payload=p) for p in bad]
    disk.run(*requests)
    assert requests[0].status == VIRTIO_BLK_S_IOERR
    assert requests[1].status == VIRTIO_BLK_S_UNSUPP
    assert requests[2].status == VIRTIO_BLK_S_IOERR
    assert disk.file_read(8, 4096) == b"\x11" * 4096


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flags", [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes(disk: Disk, flags: int) -> None:
    disk.run(write_request(disk.memory, 0, b"\xee" * 65536))
    wz = BlkRequest.build(disk.memory, VIRTIO_BLK_T_WRITE_ZEROES, payload=discard_segment(16, 32, flags))
    disk.run(wz)
    assert wz.status == VIRTIO_BLK_S_OK
    assert disk.file_read(0, 16 * SECTOR) == b"\xee" * (16 * SECTOR)
    assert disk.file_read(16, 32 * SECTOR) == bytes(32 * SECTOR)
    assert disk.file_read(48, 80 * SECTOR) == b"\xee" * (80 * SECTOR)
    read = read_request(disk.memory, 16, 32 * SECTOR)
    disk.run(read)
    assert read.data() == bytes(32 * SECTOR)
    assert disk.stats()["write_zeroes"] == 1


@pytest.mark.timeout(30)
def test_unknown_type_is_unsupported(disk: Disk) -> None:
    request = BlkRequest.build(disk.memory, 99, read_len=512)
    assert disk.run(request) == [(request.head, 1)]
    assert request.status == VIRTIO_BLK_S_UNSUPP
    assert disk.stats()["unsupported"] == 1
    assert disk.stats()["io_errors"] == 0


# -- malformed and hostile requests ------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["after", "straddling", "before", "wrapping"])
def test_data_outside_guest_memory(disk: Disk, where: str) -> None:
    addr, length = {
        "after": (disk.memory.end + 0x1000, 4096),
        "straddling": (disk.memory.end - 512, 4096),
        "before": (disk.memory.guest_phys_addr - 4096, 4096),
        "wrapping": (2**64 - 512, 4096),
    }[where]
    # A write whose data is outside: IOERR and nothing reaches the file.
    write = write_request(disk.memory, 0, b"x" * length)
    write.buffers[1] = (addr, length, False)
    assert disk.run(write) == [(write.head, 1)]
    assert write.status == VIRTIO_BLK_S_IOERR
    assert disk.file_read(0, length) == bytes(length)

    # A read whose buffer is outside: IOERR, no data length reported.
    disk.file_write(0, b"\x77" * length)
    read = read_request(disk.memory, 0, length)
    read.buffers[1] = (addr, length, True)
    assert disk.run(read) == [(read.head, 1)]
    assert read.status == VIRTIO_BLK_S_IOERR

    stats = disk.stats()
    assert stats["bad_requests"] == 2 and stats["io_errors"] == 2
    assert stats["bytes_written"] == 0 and stats["bytes_read"] == 0
    # The queue goes on serving.
    ok = write_request(disk.memory, 0, b"y" * 512)
    disk.run(ok)
    assert ok.status == VIRTIO_BLK_S_OK


@pytest.mark.timeout(10)
def test_chain_loop_does_not_hang(disk: Disk) -> None:
    hdr = disk.memory.put(blk_header(VIRTIO_BLK_T_OUT, 0))
    data = disk.memory.put(b"L" * 512)
    a, b = disk.ring.take_descriptors(2)
    disk.ring.set_desc(a, hdr, BLK_HEADER_SIZE, VRING_DESC_F_NEXT, b)
    disk.ring.set_desc(b, data, 512, VRING_DESC_F_NEXT, a)  # back to the head
    assert disk.run_raw(a) == [(a, 0)]
    assert disk.file_read(0, 512) == bytes(512)
    assert disk.stats()["bad_requests"] == 1

    # A descriptor pointing at itself, with a writable status-like buffer.
    status = disk.memory.put(bytes([STATUS_UNSET]))
    (c,) = disk.ring.take_descriptors(1)
    disk.ring.set_desc(c, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, c)
    assert disk.run_raw(c) == [(c, 0)]
    assert disk.memory.read(status, 1)[0] == STATUS_UNSET

    # A loop inside an indirect table.
    table = disk.memory.alloc(2 * DESC_SIZE)
    disk.memory.write(table, bytes(2 * DESC_SIZE))
    (d,) = disk.ring.take_descriptors(1)
    loop = disk.memory.view(table, 2 * DESC_SIZE).view(disk.ring.desc.dtype)
    loop[0] = (hdr, BLK_HEADER_SIZE, VRING_DESC_F_NEXT, 1)
    loop[1] = (data, 512, VRING_DESC_F_NEXT, 0)
    disk.ring.set_desc(d, table, 2 * DESC_SIZE, VRING_DESC_F_INDIRECT)
    assert disk.run_raw(d) == [(d, 0)]
    assert disk.file_read(0, 512) == bytes(512)

    # next out of the table's range.
    (e,) = disk.ring.take_descriptors(1)
    disk.ring.set_desc(e, hdr, BLK_HEADER_SIZE, VRING_DESC_F_NEXT, QUEUE_SIZE + 5)
    assert disk.run_raw(e) == [(e, 0)]

    stats = disk.stats()
    assert stats["bad_requests"] == 4 and stats["broken"] == 0
    ok = write_request(disk.memory, 0, b"z" * 512)
    disk.run(ok)
    assert ok.status == VIRTIO_BLK_S_OK


@pytest.mark.timeout(30)
@pytest.mark.parametrize("table_len", [DESC_SIZE * 3 + 8, 0, DESC_SIZE * 2048])
def test_indirect_table_with_bad_length(disk: Disk, table_len: int) -> None:
    request = write_request(disk.memory, 0, b"I" * 512)
    entries = [
        (request.buffers[0][0], BLK_HEADER_SIZE, VRING_DESC_F_NEXT, 1),
        (request.data_addr, 512, VRING_DESC_F_NEXT, 2),
        (request.status_addr, 1, VRING_DESC_F_WRITE, 0),
    ]
    table = disk.memory.alloc(max(table_len, 3 * DESC_SIZE))
    view = disk.memory.view(table, 3 * DESC_SIZE).view(disk.ring.desc.dtype)
    for i, entry in enumerate(entries):
        view[i] = entry
    (head,) = disk.ring.take_descriptors(1)
    disk.ring.set_desc(head, table, table_len, VRING_DESC_F_INDIRECT)
    # The status byte sits inside a table the device must not trust: the request is
    # completed without data and never reported as done.
    assert disk.run_raw(head) == [(head, 0)]
    assert request.status == STATUS_UNSET
    assert disk.file_read(0, 512) == bytes(512)
    assert disk.stats()["bad_requests"] == 1


@pytest.mark.timeout(30)
def test_nested_indirect_and_indirect_with_next_are_refused(disk: Disk) -> None:
    request = write_request(disk.memory, 0, b"N" * 512)
    inner = disk.memory.alloc(3 * DESC_SIZE)
    view = disk.memory.view(inner, 3 * DESC_SIZE).view(disk.ring.desc.dtype)
    view[0] = (request.buffers[0][0], BLK_HEADER_SIZE, VRING_DESC_F_NEXT, 1)
    view[1] = (request.data_addr, 512, VRING_DESC_F_NEXT, 2)
    view[2] = (request.status_addr, 1, VRING_DESC_F_WRITE, 0)
    outer = disk.memory.alloc(DESC_SIZE)
    disk.memory.view(outer, DESC_SIZE).view(disk.ring.desc.dtype)[0] = (
        inner, 3 * DESC_SIZE, VRING_DESC_F_INDIRECT, 0
    )
    (nested,) = disk.ring.take_descriptors(1)
    disk.ring.set_desc(nested, outer, DESC_SIZE, VRING_DESC_F_INDIRECT)
    assert disk.run_raw(nested) == [(nested, 0)]

    with_next, tail = disk.ring.take_descriptors(2)
    disk.ring.set_desc(with_next, inner, 3 * DESC_SIZE, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, tail)
    disk.ring.set_desc(tail, request.status_addr, 1, VRING_DESC_F_WRITE)
    assert disk.run_raw(with_next) == [(with_next, 0)]

    assert request.status == STATUS_UNSET
    assert disk.file_read(0, 512) == bytes(512)
    assert disk.stats()["bad_requests"] == 2


@pytest.mark.timeout(30)
def test_missing_or_read_only_status_descriptor(disk: Disk) -> None:
    # No status buffer at all: header and data only.
    no_status = write_request(disk.memory, 0, b"S" * 512)
    no_status.buffers.pop()
    assert disk.run(no_status) == [(no_status.head, 0)]
    # The status buffer is device-readable.
    ro_status = write_request(disk.memory, 0, b"R" * 512)
    ro_status.buffers[-1] = (ro_status.status_addr, 1, False)
    assert disk.run(ro_status) == [(ro_status.head, 0)]
    assert ro_status.status == STATUS_UNSET
    # A zero-length writable "status".
    empty_status = write_request(disk.memory, 0, b"E" * 512)
    empty_status.buffers[-1] = (empty_status.status_addr, 0, True)
    assert disk.run(empty_status) == [(empty_status.head, 0)]
    assert empty_status.status == STATUS_UNSET
    # A read without a separate status buffer: the last byte of its data buffer is the
    # status, which leaves 511 bytes, not whole sectors.
    read = read_request(disk.memory, 0, 512)
    read.buffers.pop()
    assert disk.run(read) == [(read.head, 1)]
    assert disk.memory.read(read.data_addr + 511, 1)[0] == VIRTIO_BLK_S_IOERR

    assert disk.file_read(0, 512) == bytes(512)
    stats = disk.stats()
    assert stats["bad_requests"] == 3
    assert stats["bytes_written"] == 0


@pytest.mark.timeout(30)
def test_readable_after_writable_is_refused(disk: Disk) -> None:
    request = write_request(disk.memory, 0, b"W" * 512)
    hdr, data, status = request.buffers
    request.buffers = [hdr, status, data]  # status (writable) before data (readable)
    assert disk.run(request) == [(request.head, 0)]
    assert request.status == STATUS_UNSET
    assert disk.file_read(0, 512) == bytes(512)
    assert disk.stats()["bad_requests"] == 1


@pytest.mark.timeout(30)
def test_header_too_short(disk: Disk) -> None:
    request = write_request(disk.memory, 0, b"H" * 512)
    request.buffers[0] = (request.buffers[0][0], 8, False)
    request.buffers.pop(1)
    disk.run(request)
    assert request.status == VIRTIO_BLK_S_IOERR
    assert disk.stats()["bad_requests"] == 1


@pytest.mark.timeout(30)
def test_requests_beyond_the_end_of_the_disk(disk: Disk) -> None:
    capacity = DISK_SIZE // SECTOR
    last = write_request(disk.memory, capacity - 1, b"\x42" * SECTOR)
    disk.run(last)
    assert last.status == VIRTIO_BLK_S_OK
    assert disk.file_read(capacity - 1, SECTOR) == b"\x42" * SECTOR

    ring_before = os.pread(disk.volume.fd, 4096, disk.volume.header.ring_offset)
    bad = [
        write_request(disk.memory, capacity - 1, b"\x43" * 2 * SECTOR),  # crosses the end
        write_request(disk.memory, capacity, b"\x43" * SECTOR),  # starts at the end
        write_request(disk.memory, 2**63, b"\x43" * SECTOR),  # sector * 512 overflows
        write_request(disk.memory, 2**64 - 1, b"\x43" * SECTOR),
        read_request(disk.memory, capacity - 1, 2 * SECTOR),
        read_request(disk.memory, 2**55, SECTOR),
        write_request(disk.memory, 0, b"\x43" * 100),  # not a whole sector
    ]
    disk.run(*bad)
    assert [r.status for r in bad] == [VIRTIO_BLK_S_IOERR] * len(bad)
    assert disk.file_read(capacity - 1, SECTOR) == b"\x42" * SECTOR
    assert disk.file_read(0, SECTOR) == bytes(SECTOR)
    # The quarantine ring after the data region is untouched.
    assert os.pread(disk.volume.fd, 4096, disk.volume.header.ring_offset) == ring_before
    assert disk.stats()["io_errors"] == len(bad)
    assert disk.stats()["bytes_written"] == SECTOR


@pytest.mark.timeout(30)
def test_read_only_device_refuses_writes(ro_disk: Disk) -> None:
    ro_disk.file_write(0, b"\x99" * 4096)
    requests = [
        write_request(ro_disk.memory, 0, b"\x01" * 4096),
        BlkRequest.build(ro_disk.memory, VIRTIO_BLK_T_DISCARD, payload=discard_segment(0, 8)),
        BlkRequest.build(ro_disk.memory, VIRTIO_BLK_T_WRITE_ZEROES, payload=discard_segment(0, 8)),
    ]
    ro_disk.run(*requests)
    assert [r.status for r in requests] == [VIRTIO_BLK_S_IOERR] * 3
    assert ro_disk.file_read(0, 4096) == b"\x99" * 4096
    read = read_request(ro_disk.memory, 0, 4096)
    ro_disk.run(read)
    assert read.status == VIRTIO_BLK_S_OK
    assert read.data() == b"\x99" * 4096
    stats = ro_disk.stats()
    assert stats["io_errors"] == 3
    assert stats["bytes_written"] == 0


@pytest.mark.timeout(30)
def test_avail_index_beyond_ring_size_breaks_the_queue(disk: Disk) -> None:
    write = write_request(disk.memory, 0, b"A" * 512)
    write.head = disk.ring.add_chain(write.buffers)
    disk.ring.publish(write.head)
    disk.ring.set_avail_idx(QUEUE_SIZE + 1)  # claims more entries than the ring holds
    assert disk.process() < 0
    assert disk.stats()["broken"] == 1
    assert disk.ring.used_idx == 0
    assert disk.file_read(0, 512) == bytes(512)
    # Broken stays broken, even once the index looks sane again.
    disk.ring.set_avail_idx(1)
    assert disk.process() < 0
    assert disk.ring.used_idx == 0
    assert disk.stats()["requests"] == 0
    # Stopping still works and reports where the queue was.
    assert disk.device.stop_queue(0) == 0


@pytest.mark.timeout(30)
def test_head_index_out_of_range_breaks_the_queue(disk: Disk) -> None:
    disk.ring.avail[2] = QUEUE_SIZE + 3
    disk.ring.set_avail_idx(1)
    assert disk.process() < 0
    assert disk.stats()["broken"] == 1
    assert disk.ring.used_idx == 0


@pytest.mark.timeout(30)
def test_stop_and_resume_from_base(disk: Disk) -> None:
    disk.run(write_request(disk.memory, 0, pattern(512)), write_request(disk.memory, 1, pattern(512, 2)))
    assert disk.device.stop_queue(0) == 2
    # Submitted while stopped: served after the restart from base 2.
    pending = write_request(disk.memory, 2, pattern(512, 3)).submit(disk.ring)
    disk.device.start_queue(dataclasses.replace(disk.setup(), base=2))
    assert disk.process() == 1
    assert disk.ring.collect() == [(pending.head, 1)]
    assert disk.file_read(0, 3 * 512) == pattern(512) + pattern(512, 2) + pattern(512, 3)


@pytest.mark.timeout(30)
def test_rings_outside_memory_do_not_start(disk: Disk) -> None:
    disk.device.stop_queue(0)
    setup = disk.setup()
    outside = dataclasses.replace(setup, desc_user_addr=disk.memory.userspace_addr + disk.memory.size)
    with pytest.raises(ProtocolError):
        disk.device.start_queue(outside)
    # Guest physical addresses are not user addresses.
    physical = dataclasses.replace(setup, used_user_addr=disk.ring.used_addr)
    with pytest.raises(ProtocolError):
        disk.device.start_queue(physical)
    end = disk.memory.userspace_addr + disk.memory.size
    straddling = dataclasses.replace(setup, avail_user_addr=end - 64)
    with pytest.raises(ProtocolError):
        disk.device.start_queue(straddling)


@pytest.mark.timeout(30)
def test_memory_table_larger_than_the_fd_is_refused(tmp_path: Path) -> None:
    create_volume(tmp_path / "vol.img", CreateOptions(size=DISK_SIZE, ring_size=1 << 20))
    with Volume(tmp_path / "vol.img") as volume:
        device = BlkDevice(volume, 1, read_only=False)
        memory = GuestMemory(1 << 20)
        try:
            # Mapping past the end of the memfd would SIGBUS the daemon on first access.
            with pytest.raises(ProtocolError):
                device.set_memory([memory.region(memory_size=2 << 20)])
            with pytest.raises(ProtocolError):
                device.set_memory([memory.region(mmap_offset=4096, memory_size=memory.size)])
            device.set_memory([memory.region(mmap_offset=4096)])
        finally:
            device.close()
            memory.close()


@pytest.mark.timeout(30)
def test_interrupt_suppression(disk: Disk) -> None:
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        # Without EVENT_IDX: the avail ring's NO_INTERRUPT flag.
        disk.device.stop_queue(0)
        disk.device.start_queue(dataclasses.replace(disk.setup(), call_fd=call))
        disk.run(write_request(disk.memory, 0, pattern(SECTOR)))
        assert os.eventfd_read(call) == 1
        disk.ring.avail[0] = 1  # VRING_AVAIL_F_NO_INTERRUPT
        disk.run(write_request(disk.memory, 1, pattern(SECTOR)))
        with pytest.raises(BlockingIOError):
            os.eventfd_read(call)
        assert disk.stats()["notifications"] == 1
        disk.ring.avail[0] = 0

        # With EVENT_IDX: interrupt only once used->idx passes used_event.
        base = disk.device.stop_queue(0)
        disk.device.start_queue(dataclasses.replace(disk.setup(), call_fd=call, event_idx=True, base=base))
        # A resumed queue interrupts once: completions signalled to an old call fd are not lost.
        assert os.eventfd_read(call) == 1
        disk.run(write_request(disk.memory, 2, pattern(SECTOR)))  # the first one always notifies
        assert os.eventfd_read(call) == 1
        assert int(disk.ring.avail_event[0]) == disk.ring.avail_idx  # kicks asked for from here
        disk.ring.set_used_event(disk.ring.used_idx + 5)
        disk.run(write_request(disk.memory, 3, pattern(SECTOR)))
        with pytest.raises(BlockingIOError):
            os.eventfd_read(call)
        disk.run(*[write_request(disk.memory, 4 + i, pattern(SECTOR)) for i in range(5)])
        assert os.eventfd_read(call) == 1
        # 3 since the restart, on top of the 1 before it: a restarted queue's counters go on.
        assert disk.stats()["notifications"] == 1 + 3
    finally:
        disk.device.stop_queue(0)
        os.close(call)
