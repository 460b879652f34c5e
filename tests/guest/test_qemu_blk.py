"""Real QEMU (TCG) guests attached to `vhost-pv serve` over vhost-user-blk."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from support.volumes import data_digest

from vhost_pv.control import client
from vhost_pv.volume.header import VolumeHeader
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import GuestImage, VhostUserBlkDisk, run_guest, start_guest
from vhost_pv_tools.serverproc import ServerProcess

DISK_MIB = 64


def fio_section(console_text: str, job: dict[str, Any]) -> None:
    """Fail with the console when fio reported errors."""
    assert job["error"] == 0, console_text[-3000:]


def parse_fio(result: Any) -> list[dict[str, Any]]:
    text = result.section("fio")
    assert result.exit_code == 0 and text is not None, result.console[-4000:]
    # fio puts warnings (e.g. about several verifying writers) before the JSON document.
    jobs: list[dict[str, Any]] = json.loads(text[text.index("{"):])["jobs"]
    return jobs


FIO_VERIFY = """
set -e
test "$(cat /sys/block/vda/size)" = "{sectors}"
fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \\
    --rw=randwrite --bs=4k --verify=crc32c --verify_fatal=1 \\
    --numjobs={jobs} --offset_increment={increment} --size={per_job} --group_reporting \\
    --output-format=json --output=/tmp/fio.json
echo "=== BEGIN fio ==="
cat /tmp/fio.json
echo "=== END fio ==="
"""


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, VolumeHeader]:
    path = tmp_path / "vol0.img"
    header = create_volume(path, CreateOptions(size=DISK_MIB << 20))
    return path, header


def verify_job(jobs: int) -> str:
    per_job = DISK_MIB // jobs
    return FIO_VERIFY.format(
        sectors=(DISK_MIB << 20) // 512, jobs=jobs, increment=f"{per_job}M", per_job=f"{per_job}M"
    )


@pytest.mark.parametrize("queues", [1, 2])
def test_fio_verify_whole_disk(
    guest_image: GuestImage, tmp_path: Path, volume: tuple[Path, VolumeHeader], queues: int
) -> None:
    path, header = volume
    with ServerProcess([path], tmp_path, queues=queues) as server:
        result = run_guest(
            verify_job(queues),
            disks=[VhostUserBlkDisk(server.socket_for(path), num_queues=queues)],
            cpus=queues,
            image=guest_image,
            timeout=400,
        )
        status = client.status(server.control)
    jobs = parse_fio(result)
    fio_section(result.console, jobs[0])
    written = jobs[0]["write"]["io_bytes"]
    assert written >= DISK_MIB << 20, jobs[0]["write"]
    totals = status["volumes"][0]["totals"]
    assert totals["io_errors"] == 0 and totals["bad_requests"] == 0
    assert totals["bytes_written"] >= DISK_MIB << 20
    # The guest's data really is in the volume file: not all zeros any more.
    with open(path, "rb") as f:
        f.seek(header.data_offset + (DISK_MIB << 20) // 2)
        assert f.read(4096) != bytes(4096)


def test_two_queues_both_carry_io(
    guest_image: GuestImage, tmp_path: Path, volume: tuple[Path, VolumeHeader]
) -> None:
    """With num-queues=2 and two vCPUs, the guest spreads I/O over both virtqueues."""
    path, _ = volume
    job = """
set -e
for cpu in 0 1; do
  taskset -c $cpu dd if=/dev/vda of=/dev/null bs=4k count=2000 iflag=direct skip=$((cpu * 4000))
done
echo READS-DONE
sleep 600
"""
    with ServerProcess([path], tmp_path, queues=2) as server:
        disk = VhostUserBlkDisk(server.socket_for(path), num_queues=2)
        with start_guest(job, disks=[disk], cpus=2, image=guest_image) as guest:
            deadline = time.monotonic() + 300
            while "READS-DONE" not in guest.console_so_far():
                assert guest.process.poll() is None, guest.console_so_far()[-3000:]
                assert time.monotonic() < deadline, guest.console_so_far()[-3000:]
                time.sleep(0.2)
            connection = client.status(server.control)["volumes"][0]["connection"]
    assert connection is not None
    queues = connection["queues"]
    # Each dd read 2000 x 4 KiB from its own vCPU; blk-mq maps each vCPU to its own queue.
    assert len(queues) == 2
    for queue in queues:
        assert queue["reads"] >= 1000 and queue["bytes_read"] >= 2000 * 4096, queues


def test_reconnect_after_qemu_killed(
    guest_image: GuestImage, tmp_path: Path, volume: tuple[Path, VolumeHeader]
) -> None:
    """QEMU dies with SIGKILL; a new QEMU attaches to the same daemon and reads the data."""
    path, _ = volume
    write_job = """
set -e
fio --name=w --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --rw=write --bs=64k \\
    --size=100% --verify=crc32c --do_verify=0 --verify_state_save=0 --output=/dev/null
sync
echo WRITTEN-AND-SYNCED
sleep 600
"""
    read_job = """
set -e
fio --name=w --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 --rw=write --bs=64k \\
    --size=100% --verify=crc32c --verify_only --verify_fatal=1 --output-format=json \\
    --output=/tmp/fio.json
echo "=== BEGIN fio ==="
cat /tmp/fio.json
echo "=== END fio ==="
"""
    with ServerProcess([path], tmp_path) as server:
        disk = VhostUserBlkDisk(server.socket_for(path))
        with start_guest(write_job, disks=[disk], image=guest_image) as first:
            deadline = time.monotonic() + 300
            while "WRITTEN-AND-SYNCED" not in first.console_so_far():
                assert time.monotonic() < deadline, first.console_so_far()[-3000:]
                time.sleep(0.2)
            first.kill()
        # The daemon notices the frontend is gone and frees the volume for the next one.
        deadline = time.monotonic() + 10
        while client.status(server.control)["volumes"][0]["connection"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = run_guest(read_job, disks=[disk], image=guest_image, timeout=300)
        status = client.status(server.control)
        daemon_pid = server.pid
    jobs = parse_fio(result)
    fio_section(result.console, jobs[0])
    assert jobs[0]["read"]["io_bytes"] >= DISK_MIB << 20
    # One daemon process served both guests: no restart was needed.
    assert status["pid"] == daemon_pid
    assert status["volumes"][0]["connections_total"] == 2


def test_read_only_volume_refuses_writes(
    guest_image: GuestImage, tmp_path: Path, volume: tuple[Path, VolumeHeader]
) -> None:
    path, header = volume
    with open(path, "r+b") as f:
        f.seek(header.data_offset)
        f.write(b"\xa5" * (1 << 20))
    before = data_digest(path, header)
    job = """
echo "ro=$(cat /sys/block/vda/ro)"
dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct && echo READ-OK
# The guest kernel honours the RO feature; force it off to prove the backend refuses too.
blockdev --setrw /dev/vda
dd if=/dev/zero of=/dev/vda bs=4k count=16 oflag=direct && echo WRITE-SUCCEEDED || echo WRITE-FAILED
exit 0
"""
    with ServerProcess([path], tmp_path, extra_args=["--read-only"]) as server:
        result = run_guest(
            job, disks=[VhostUserBlkDisk(server.socket_for(path))], image=guest_image, timeout=300
        )
        status = client.status(server.control)
    assert result.exit_code == 0, result.console[-3000:]
    assert "ro=1" in result.console
    assert "READ-OK" in result.console
    assert "WRITE-SUCCEEDED" not in result.console and "WRITE-FAILED" in result.console
    assert data_digest(path, header) == before
    assert status["volumes"][0]["read_only"] is True


def test_discard_frees_blocks(
    guest_image: GuestImage, tmp_path: Path, volume: tuple[Path, VolumeHeader]
) -> None:
    path, _ = volume
    # Two boots: the first fills 32 MiB, the second discards the disk; blocks are counted between.
    fill = """
set -e
test "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0
dd if=/dev/urandom of=/dev/vda bs=1M count=32 oflag=direct
echo FILLED
"""
    discard = """
set -e
blkdiscard /dev/vda
echo DISCARDED
"""
    with ServerProcess([path], tmp_path) as server:
        disk = VhostUserBlkDisk(server.socket_for(path))
        filled = run_guest(fill, disks=[disk], image=guest_image, timeout=300)
        assert filled.exit_code == 0 and "FILLED" in filled.console, filled.console[-3000:]
        blocks_full = os.stat(path).st_blocks * 512
        result = run_guest(discard, disks=[disk], image=guest_image, timeout=300)
        status = client.status(server.control)
    assert result.exit_code == 0 and "DISCARDED" in result.console, result.console[-3000:]
    blocks_after = os.stat(path).st_blocks * 512
    assert blocks_full >= 32 << 20
    assert blocks_after <= blocks_full - (30 << 20), (blocks_full, blocks_after)
    assert status["volumes"][0]["totals"]["discards"] > 0
