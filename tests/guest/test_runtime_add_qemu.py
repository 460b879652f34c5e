"""A real QEMU guest on a volume added at runtime (`vhost-pv add`, daemon started empty with
--state-dir) runs fio with verify while a second volume is added, attached, force-removed and
removed again beside it: the guest sees no error and no verify failure."""

from __future__ import annotations

from pathlib import Path

from support.attach import Guest, pattern, run_cli
from support.daemon_status import wait_until
from support.guestio import fio_jobs, fio_rounds_job, wait_console

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import GuestImage, VhostUserBlkDisk, start_guest
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20

GUEST_JOB = fio_rounds_job(rounds=3, iodepth=16, size_mib=16)


def _ctl(server: ServerProcess, *args: str) -> None:
    done = run_cli(args[0], "--control", str(server.control), *args[1:], timeout=60)
    assert done.returncode == 0, done.stderr


def test_guest_on_an_added_volume_is_not_disturbed_by_another_add_and_remove(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    vm_disk = tmp_path / "vols" / "vmdisk.img"
    other = tmp_path / "vols" / "other.img"
    vm_disk.parent.mkdir()
    create_volume(vm_disk, CreateOptions(size=32 * MiB))
    create_volume(other, CreateOptions(size=4 * MiB, ring_size=MiB))
    with ServerProcess([], tmp_path / "run", extra_args=["--state-dir", str(tmp_path / "state")]) as server:
        _ctl(server, "add", str(vm_disk), "--queues", "2", "--direct")
        disk = VhostUserBlkDisk(server.socket_for(vm_disk), num_queues=2)
        with start_guest(GUEST_JOB, disks=[disk], cpus=2, image=guest_image) as guest:
            wait_console(guest, "FIO-START", timeout=240)
            before = _requests(server, "vmdisk")
            _ctl(server, "add", str(other))
            frontend = Guest(server.socket_for(other))
            try:
                frontend.round_trip(0, pattern(4096, 1))
                _ctl(server, "remove", "other", "--force")
                assert frontend.frontend.wait_closed(10)
            finally:
                frontend.close()
            _ctl(server, "add", str(other), "--read-only")
            _ctl(server, "remove", "other")
            # The guest's I/O goes on (fio may only be starting: TCG is slow under load).
            wait_until(lambda: _requests(server, "vmdisk") > before, 120,
                       "guest I/O on vmdisk after the add/remove beside it", server.log)
            wait_console(guest, "FIO-ROUNDS-DONE", timeout=600)
            console = guest.console_so_far()
        status = client.status(server.control)
    jobs = fio_jobs(console)
    assert len(jobs) == 3, console[-3000:]
    for job in jobs:
        assert job["error"] == 0, console[-3000:]
        assert job["write"]["io_bytes"] > 0
    (entry,) = status["volumes"]
    assert entry["name"] == "vmdisk"
    assert entry["options"] == {"queues": 2, "read_only": False, "direct": True}
    assert entry["totals"]["io_errors"] == 0


def _requests(server: ServerProcess, name: str) -> int:
    for volume in client.status(server.control)["volumes"]:
        if volume["name"] == name:
            return int(volume["totals"].get("requests", 0))
    raise AssertionError(f"{name} is not served")
