"""A real QEMU guest keeps its data when the daemon is SIGKILLed mid-I/O and restarted.

QEMU (chardev reconnect=1) reconnects to the restarted daemon and hands it back the inflight
area; the daemon resubmits exactly the requests it had taken and not completed. Without
that, QEMU restarts the ring at used->idx: requests completed out of order are completed a
second time (the guest sees a used id it no longer owns) and others never (fio hangs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from support.guestio import fio_jobs, fio_rounds_job, read_data, text_pattern, wait_console

from vhost_pv.control import client
from vhost_pv.control.wire import ReclaimMode
from vhost_pv.volume.header import ReadPolicy
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.guest import GuestImage, VhostUserBlkDisk, start_guest
from vhost_pv_tools.serverproc import ServerProcess

DISK_MIB = 64
MiB = 1 << 20
RESTARTS = 3
DAEMON_ARGS = ["--direct"]

# fio rounds over the disk: random 4k writes at depth 32 (reads in between, both completing
# out of order), then a verify pass over everything written. A lost write, a request
# completed twice or one never completed shows as a verify error or as a hang.
GUEST_JOB = fio_rounds_job(rounds=4, iodepth=32, size_mib=DISK_MIB // 2)


def requests(server: ServerProcess) -> int:
    """Requests the running daemon has taken on the volume since it started."""
    return int(client.status(server.control)["volumes"][0]["totals"].get("requests", 0))


def wait_for(predicate: Any, what: str, timeout: float, console: Any) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}:\n{console()[-3000:]}"
        time.sleep(0.1)


def test_daemon_sigkill_and_restart_under_fio_verify(guest_image: GuestImage, tmp_path: Path) -> None:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=DISK_MIB << 20))
    workdir = tmp_path / "run"
    # O_DIRECT: reads and writes wait for the disk on the io_uring, so at any instant many are
    # in flight and they complete out of order, as on a production host.
    server = ServerProcess([path], workdir, extra_args=DAEMON_ARGS).start()
    try:
        disk = VhostUserBlkDisk(server.socket_for(path), reconnect=1)
        with start_guest(GUEST_JOB, disks=[disk], image=guest_image) as guest:
            wait_for(lambda: "FIO-START" in guest.console_so_far(), "fio never started", 120,
                     guest.console_so_far)
            restarts = 0
            while restarts < RESTARTS and "FIO-ROUNDS-DONE" not in guest.console_so_far():
                # Let the guest get I/O going against this daemon, then kill it mid-flight.
                if requests(server) < 1500:
                    assert guest.process.poll() is None, guest.console_so_far()[-3000:]
                    time.sleep(0.05)
                    continue
                server.kill()
                server = ServerProcess([path], workdir, extra_args=DAEMON_ARGS).start()
                restarts += 1
            # Done killing: the guest finishes the round it is in.
            wait_for(lambda: guest.process.poll() is not None or "FIO-ROUNDS-DONE" in guest.console_so_far(),
                     "fio did not finish (a request lost?)", 240, guest.console_so_far)
            console = guest.console_so_far()
        log = server.log()   # every daemon of the test appended to the same log
    finally:
        server.kill()
    assert restarts == RESTARTS, f"fio finished after {restarts} restarts"
    assert "FIO-ROUNDS-DONE" in console, console[-3000:]
    jobs = fio_jobs(console)
    assert jobs, console[-3000:]
    for job in jobs:
        assert job["error"] == 0, console[-3000:]
    # QEMU handed each restarted daemon the area an earlier one created (no new one).
    restarted = log.split("INFO vhost_pv.daemon: serving ")[2:]
    assert len(restarted) == RESTARTS, log
    for segment in restarted:
        assert "inflight area set" in segment and "inflight area: " not in segment, log
    assert "Traceback" not in log and " ERROR " not in log, log


# Phase 1 writes pattern A; the guest then polls sector 0 until the flip shows (the zeros read
# policy answers zeros), writes pattern B (quarantined) and polls 8 MiB until the reclaim has
# replayed B there, then writes pattern C to the data region.
DANGLING_JOB = """
yes PATTERN-A | head -c 1048576 > /tmp/a
dd if=/tmp/a of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null || exit 10
echo PHASE1-DONE
while [ "$(dd if=/dev/vda bs=4k count=1 iflag=direct 2>/dev/null | head -c 9)" = "PATTERN-A" ]; do
  sleep 0.2
done
echo FLIP-SEEN
yes PATTERN-B | head -c 1048576 > /tmp/b
dd if=/tmp/b of=/dev/vda bs=64k seek=128 oflag=direct conv=fsync 2>/dev/null && echo WRITE-OK || exit 11
dd if=/dev/vda of=/tmp/r bs=4k count=4 iflag=direct 2>/dev/null || exit 12
cmp -s -n 16384 /tmp/r /dev/zero && echo READ-ZEROS
echo PHASE2-DONE
while [ "$(dd if=/dev/vda bs=4k skip=2048 count=1 iflag=direct 2>/dev/null | head -c 9)" != "PATTERN-B" ]; do
  sleep 0.2
done
echo RECLAIM-SEEN
yes PATTERN-C | head -c 65536 > /tmp/c
dd if=/tmp/c of=/dev/vda bs=64k seek=256 oflag=direct conv=fsync 2>/dev/null || exit 13
dd if=/dev/vda of=/tmp/rc bs=64k skip=256 count=1 iflag=direct 2>/dev/null || exit 14
cmp -s /tmp/c /tmp/rc && echo READBACK-OK
exit 0
"""


def test_dangling_volume_crash_restart_and_reclaim_with_guest_attached(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """Flip, kill -9 the daemon, restart: QEMU's reconnect is served under the dangling rules
    (writes into the ring, reads per policy, nothing hangs, one alert). Reclaim --replay with
    the guest attached: its next I/O goes to the data region, after the replayed writes."""
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=32 * MiB, read_policy=ReadPolicy.ZEROS, owner="ctr-1"))
    workdir = tmp_path / "run"
    server = ServerProcess([path], workdir).start()
    try:
        disk = VhostUserBlkDisk(server.socket_for(path), reconnect=1)
        with start_guest(DANGLING_JOB, disks=[disk], image=guest_image) as guest:
            wait_console(guest, "PHASE1-DONE", timeout=120)
            assert client.persistent_disk_dangling(server.control, "vol0", reason="gone")["changed"]
            server.kill()
            server = ServerProcess([path], workdir).start()
            wait_console(guest, "PHASE2-DONE", timeout=120)
            status = client.status(server.control)["volumes"][0]
            assert status["header"]["dangling"] and status["totals"]["quarantined"] > 0
            # Reclaim while the guest polls the disk.
            report = client.reclaim(server.control, "vol0", "ctr-2", ReclaimMode.REPLAY)
            assert report["replayed"] > 0 and report["ring"]["verify"]["ok"]
            result = guest.wait(120)
            status = client.status(server.control)["volumes"][0]
            kinds = [a["kind"] for a in client.alerts(server.control) if a["volume"] == "vol0"]
        log = server.log()
    finally:
        server.kill()
    console = result.console
    assert result.exit_code == 0, console[-3000:]
    for marker in ("FLIP-SEEN", "WRITE-OK", "READ-ZEROS", "RECLAIM-SEEN", "READBACK-OK"):
        assert marker in console, (marker, console[-3000:])
    assert not read_header(path).dangling
    assert read_data(path, read_header(path), 0, MiB) == text_pattern("PATTERN-A", MiB)
    assert read_data(path, read_header(path), 8 * MiB, MiB) == text_pattern("PATTERN-B", MiB)
    assert read_data(path, read_header(path), 16 * MiB, 65536) == text_pattern("PATTERN-C", 65536)
    # The restarted daemon served QEMU's reconnect and said so once.
    assert status["dangling_attaches"] >= 1
    assert kinds.count("dangling-attach") == 1, kinds
    assert "attach-refused" not in log and "Traceback" not in log
