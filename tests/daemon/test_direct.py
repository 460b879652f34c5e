"""Direct mode (`serve --direct`): O_DIRECT data I/O in flight on an io_uring per queue.

A flip must still be a clean cut: writes submitted before it may complete after the
io_uring took them, and the flip has to wait for them, or they would land in the data
region of a volume that is already dangling.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_status import volume_entry, wait_until
from support.frontend import VIRTIO_BLK_S_OK, GuestMemory, SplitRing, write_request
from support.volumes import data_digest

from vhost_pv._native import lib
from vhost_pv.control import client
from vhost_pv.devices.blk import BlkDevice
from vhost_pv.protocol.session import VringSetup
from vhost_pv.volume.header import RingFullPolicy, VolumeState
from vhost_pv.volume.ring import RingReader
from vhost_pv.volume.volume import CreateOptions, Volume, create_volume
from vhost_pv_tools.loadgen import LoadgenResult, run_loadgen
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


@pytest.mark.timeout(120)
def test_flip_under_direct_write_load_is_a_clean_cut(tmp_path: Path) -> None:
    path = tmp_path / "vol0.img"
    header = create_volume(path, CreateOptions(size=32 * MiB, ring_size=64 * MiB,
                                               ring_full_policy=RingFullPolicy.OVERWRITE))
    with ServerProcess([path], tmp_path / "d", queues=2, extra_args=["--direct"]) as server:
        results: list[LoadgenResult] = []
        load = threading.Thread(target=lambda: results.append(
            run_loadgen(server.socket_for(path), "randwrite", 4096, 32, 2, 3.0)))
        load.start()
        try:
            # Well into the run: many writes are in flight on both queues' io_urings.
            wait_until(lambda: volume_entry(server.control, "vol0")["totals"].get("async_ios", 0) > 2000,
                       timeout=30, what="direct writes under way", log=server.log)
            flipped = client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
            assert flipped["changed"]
            at_flip = data_digest(path, header)
            time.sleep(0.5)
            assert data_digest(path, header) == at_flip
        finally:
            load.join(60)
        assert results, "the load generator did not finish"
        result = results[0]
        # Every write got an OK: before the flip into the data region, after it into the ring.
        assert result.errors == 0 and result.ios > 0, result.summary()
        assert data_digest(path, header) == at_flip
        totals = volume_entry(server.control, "vol0")["totals"]
        assert totals["quarantined"] > 0 and totals["async_ios"] > 0, totals
        assert totals["io_errors"] == 0, totals
    with RingReader(path, header) as reader:
        assert reader.verify().ok


# -- the flip waits for writes in flight (a frozen file system holds them) --------------------


@pytest.fixture
def frozen_fs(tmp_path: Path) -> Iterator[Path]:
    """A small ext4 file system on a loop device, mounted at the returned path. fsfreeze on
    it holds every write that has not reached the file system yet: the io_uring's too."""
    image, mount = tmp_path / "fs.img", tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["fsfreeze", "-u", str(mount)], capture_output=True)
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.timeout(60)
def test_flip_waits_for_direct_writes_in_flight(frozen_fs: Path) -> None:
    path = frozen_fs / "vol.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB))
    volume = Volume(path, direct=True)
    device = BlkDevice(volume, 1, read_only=False)
    memory = GuestMemory(4 << 20)
    ring = SplitRing(memory, 64)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        device.set_memory([memory.region()])
        device.start_queue(VringSetup(
            index=0, num=64, base=0, desc_user_addr=memory.uaddr(ring.desc_addr),
            avail_user_addr=memory.uaddr(ring.avail_addr), used_user_addr=memory.uaddr(ring.used_addr),
            kick_fd=kick, call_fd=-1, event_idx=False, indirect=True,
        ))
        subprocess.run(["fsfreeze", "-f", str(frozen_fs)], check=True)
        # Page-aligned 4 KiB writes: O_DIRECT takes them, and the freeze holds them.
        requests = [write_request(memory, sector=8 * i, data=bytes([i + 1]) * 4096) for i in range(8)]
        for request in requests:
            request.submit(ring)
        os.eventfd_write(kick, 1)
        wait_until(lambda: device.stats().queues[0]["async_ios"] == len(requests), timeout=10,
                   what="writes submitted to the io_uring")
        time.sleep(0.2)
        assert ring.used_idx == 0  # none completed: the file system is frozen

        flip = threading.Thread(target=lib.vpv_volume_set_state, args=(volume.native, VolumeState.DANGLING))
        flip.start()
        flip.join(1.0)
        assert flip.is_alive(), "the flip returned while data writes were still in flight"
        subprocess.run(["fsfreeze", "-u", str(frozen_fs)], check=True)
        flip.join(10)
        assert not flip.is_alive()
        # By the time the flip returned every write had completed, into the data region.
        assert ring.used_idx == len(requests)
        assert all(request.status == VIRTIO_BLK_S_OK for request in requests)
        for i in range(len(requests)):
            assert os.pread(volume.fd, 4096, volume.header.data_offset + i * 4096) == bytes([i + 1]) * 4096
    finally:
        subprocess.run(["fsfreeze", "-u", str(frozen_fs)], capture_output=True)
        device.close()
        volume.close()
        memory.close()
        os.close(kick)
