"""A real QEMU guest keeps its data when the daemon is SIGKILLed mid-I/O and restarted.

QEMU (chardev reconnect=1) reconnects to the restarted daemon and hands it back the inflight
area; the daemon resubmits exactly the requests it had taken and not completed. Without
that, QEMU restarts the ring at used->idx: requests completed out of order are completed a
second time (the guest sees a used id it no longer owns) and others never (fio hangs).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from vhost_pv.control import client
from vhost_pv.guest import GuestImage, VhostUserBlkDisk, start_guest
from vhost_pv.serverproc import ServerProcess
from vhost_pv.volume.volume import CreateOptions, create_volume

DISK_MIB = 64
RESTARTS = 3
DAEMON_ARGS = ["--direct"]

# fio rounds over the disk: random 4k writes at depth 32 (reads in between, both completing
# out of order), then a verify pass over everything written. A lost write, a request
# completed twice or one never completed shows as a verify error or as a hang.
GUEST_JOB = """
set -e
echo FIO-START
for round in 1 2 3 4; do
  fio --name=v$round --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \\
      --rw=randrw --rwmixread=30 --bs=4k --size={size}M --verify=crc32c --verify_fatal=1 \\
      --randseed=$round --output-format=json --output=/tmp/fio$round.json
  echo "=== BEGIN fio$round ==="
  cat /tmp/fio$round.json
  echo "=== END fio$round ==="
done
echo FIO-ROUNDS-DONE
"""


def fio_jobs(console: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for text in re.findall(r"=== BEGIN fio\d+ ===\r?\n(.*?)=== END fio\d+ ===", console, re.DOTALL):
        text = text.replace("\r\n", "\n")
        jobs.extend(json.loads(text[text.index("{"):])["jobs"])
    return jobs


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
        with start_guest(GUEST_JOB.format(size=DISK_MIB // 2), disks=[disk], image=guest_image) as guest:
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
    assert "still marked in flight" not in log and "Traceback" not in log, log
