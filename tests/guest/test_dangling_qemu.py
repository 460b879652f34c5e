"""Dangling volumes under a real QEMU (TCG) guest: the flip, the quarantine ring, reclaim."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.guestio import read_data, text_pattern, wait_console
from support.volumes import data_digest

from vhost_pv.control import client
from vhost_pv.control.wire import ReclaimMode
from vhost_pv.volume.header import ReadPolicy, RingFullPolicy
from vhost_pv.volume.ring import RecordType, RingReader
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.guest import GuestImage, VhostUserBlkDisk, start_guest
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
DISK_MIB = 32


class AlertFollower:
    """`vhost-pv alerts --follow --json` as a separate process: a real live subscriber."""

    def __init__(self, control: Path) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vhost_pv.cli", "alerts", "--control", str(control), "--follow", "--json"],
            stdout=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.alerts.append(json.loads(line))

    def kinds(self) -> set[str]:
        return {a["kind"] for a in list(self.alerts)}

    def wait_for(self, predicate: Any, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not any(predicate(a) for a in list(self.alerts)):
            assert time.monotonic() < deadline, self.alerts
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# Phase 1 writes pattern A over the first 4 MiB. The guest then polls sector 0 until it no
# longer reads pattern A (deny: the read fails; zeros: it reads zeros): that is the flip.
# Phase 2 writes 1 MiB of pattern B at 8 MiB (64 KiB requests) and reads the start again.
FLIP_JOB = """
yes PATTERN-A | head -c 4194304 > /tmp/a
dd if=/tmp/a of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null || exit 10
echo PHASE1-DONE
while [ "$(dd if=/dev/vda bs=4k count=1 iflag=direct 2>/dev/null | head -c 9)" = "PATTERN-A" ]; do
  sleep 0.2
done
echo FLIP-SEEN
yes PATTERN-B | head -c 1048576 > /tmp/b
dd if=/tmp/b of=/dev/vda bs=64k seek=128 oflag=direct conv=fsync && echo WRITE-OK || echo WRITE-FAILED
if dd if=/dev/vda of=/tmp/r bs=4k count=4 iflag=direct 2>/dev/null; then
  if cmp -s -n 16384 /tmp/r /dev/zero; then echo READ-ZEROS; else echo READ-DATA; fi
else
  echo READ-FAILED
fi
exit 0
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("policy", "mode"),
    [(ReadPolicy.DENY, ReclaimMode.REPLAY), (ReadPolicy.ZEROS, ReclaimMode.DISCARD)],
    ids=["deny-replay", "zeros-discard"],
)
def test_flip_diverts_guest_io_then_reclaim(
    guest_image: GuestImage, tmp_path: Path, policy: ReadPolicy, mode: ReclaimMode
) -> None:
    path = tmp_path / "vol0.img"
    header = create_volume(path, CreateOptions(size=DISK_MIB * MiB, read_policy=policy, owner="ctr-1"))
    with ServerProcess([path], tmp_path) as server:
        follower = AlertFollower(server.control)
        try:
            disk = VhostUserBlkDisk(server.socket_for(path))
            with start_guest(FLIP_JOB, disks=[disk], image=guest_image) as guest:
                wait_console(guest, "PHASE1-DONE")
                before = data_digest(path, header)
                flipped = client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
                assert flipped["state"] == "dangling" and flipped["changed"]
                result = guest.wait(300)
            assert result.exit_code == 0, result.console[-3000:]
            console = result.console
            assert "FLIP-SEEN" in console and "WRITE-OK" in console, console[-3000:]
            if policy == ReadPolicy.DENY:
                assert "READ-FAILED" in console, console[-3000:]
            else:
                assert "READ-ZEROS" in console, console[-3000:]

            # Nothing reached the data region after the flip.
            assert data_digest(path, header) == before
            assert read_data(path, header, 8 * MiB, MiB) == bytes(MiB)

            # The ring holds exactly the 1 MiB of pattern B, in order, with an intact chain.
            with RingReader(path, header) as reader:
                report = reader.verify()
                assert report.ok, report.problems
                records = list(reader.records())
                assert records and all(r.type == RecordType.WRITE for r in records)
                in_order = sorted(records, key=lambda r: r.sector)
                covered = b"".join(reader.payload(r).tobytes() for r in in_order)
                assert records[0].sector == 8 * MiB // 512
                assert sum(r.length for r in records) == MiB
                assert covered == text_pattern("PATTERN-B", MiB)
                assert [r.seq for r in records] == list(range(1, len(records) + 1))

            status = client.status(server.control)["volumes"][0]
            assert status["totals"]["quarantined"] == len(records)
            assert status["guard"]["sealed"]

            # A live subscriber saw the flip and the diverted I/O, naming the frontend.
            follower.wait_for(lambda a: a["kind"] == "volume-dangling")
            follower.wait_for(lambda a: a["kind"] == "dangling-io" and a["details"]["request"] == "write"
                              and a["details"]["outcome"] == "quarantined")
            expected_read = "read-denied" if policy == ReadPolicy.DENY else "read-zeros"
            follower.wait_for(
                lambda a: a["kind"] == "dangling-io" and a["details"]["outcome"] == expected_read
            )
            io_alert = next(a for a in follower.alerts if a["kind"] == "dangling-io")
            assert io_alert["volume"] == "vol0" and "pid" in io_alert["details"]["frontend"]

            # Reclaim by a new owner: replay applies pattern B, discard keeps the old data.
            report_reclaim = client.reclaim(server.control, "vol0", "ctr-2", mode)
            assert report_reclaim["seal"]["checked"] and report_reclaim["seal"]["changed_chunks"] == []
            assert report_reclaim["ring"]["verify"]["ok"]
            after = read_header(path)
            assert not after.dangling and after.owner == "ctr-2"
            if mode == ReclaimMode.REPLAY:
                assert report_reclaim["replayed"] == len(records)
                assert read_data(path, header, 8 * MiB, MiB) == text_pattern("PATTERN-B", MiB)
                assert read_data(path, header, 0, 4 * MiB) == text_pattern("PATTERN-A", 4 * MiB)
            else:
                assert report_reclaim["discarded"] == len(records)
                assert data_digest(path, header) == before
            with RingReader(path, header) as reader:
                assert list(reader.records()) == []
            follower.wait_for(lambda a: a["kind"] == "volume-reclaimed")
        finally:
            follower.stop()


# Writes run continuously while the flip happens: once the ioctl has returned, the data
# region must never change again, although writes that were in flight completed.
LOAD_JOB = """
yes LOAD | head -c 65536 > /tmp/l
echo WRITING
i=0
end=$(( $(date +%s) + 8 ))
while [ "$(date +%s)" -lt "$end" ]; do
  dd if=/tmp/l of=/dev/vda bs=64k seek=$((i % 256)) count=1 oflag=direct 2>/dev/null
  i=$((i + 1))
done
echo "WRITES=$i"
exit 0
"""


@pytest.mark.timeout(600)
def test_flip_under_write_load_is_a_clean_cut(guest_image: GuestImage, tmp_path: Path) -> None:
    path = tmp_path / "vol0.img"
    header = create_volume(
        path,
        CreateOptions(size=DISK_MIB * MiB, ring_size=64 * MiB, ring_full_policy=RingFullPolicy.OVERWRITE),
    )
    with ServerProcess([path], tmp_path) as server:
        disk = VhostUserBlkDisk(server.socket_for(path))
        with start_guest(LOAD_JOB, disks=[disk], image=guest_image) as guest:
            wait_console(guest, "WRITING")
            time.sleep(2)
            flipped = client.persistent_disk_dangling(server.control, "vol0", reason="container-crashed")
            at_flip = data_digest(path, header)
            result = guest.wait(300)
        status = client.status(server.control)["volumes"][0]
    assert result.exit_code == 0, result.console[-3000:]
    assert flipped["changed"]
    assert data_digest(path, header) == at_flip
    totals = status["totals"]
    assert totals["writes"] > totals["quarantined"] > 0, totals
    with RingReader(path, header) as reader:
        assert reader.verify().ok
        stats = reader.stats()
        # Overwrite policy: once the ring wrapped, the oldest records were dropped.
        assert stats["records"] + stats["dropped"] == totals["quarantined"]


RING_FULL_JOB = """
echo READY
while dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; do sleep 0.2; done
for disk in vda vdb; do
  n=0
  for i in $(seq 0 47); do
    dd if=/dev/urandom of=/dev/$disk bs=64k seek=$i count=1 oflag=direct 2>/dev/null && n=$((n + 1))
  done
  echo "$disk-ACCEPTED=$n"
done
exit 0
"""


@pytest.mark.timeout(600)
def test_ring_full_reject_and_overwrite(guest_image: GuestImage, tmp_path: Path) -> None:
    """1 MiB rings and 3 MiB of writes: reject refuses once full, overwrite drops the oldest."""
    paths = [tmp_path / "reject.img", tmp_path / "overwrite.img"]
    headers = [
        create_volume(p, CreateOptions(size=DISK_MIB * MiB, ring_size=MiB, ring_full_policy=policy))
        for p, policy in zip(paths, (RingFullPolicy.REJECT, RingFullPolicy.OVERWRITE), strict=True)
    ]
    with ServerProcess(paths, tmp_path) as server:
        disks = [VhostUserBlkDisk(server.socket_for(p)) for p in paths]
        with start_guest(RING_FULL_JOB, disks=disks, image=guest_image) as guest:
            wait_console(guest, "READY")
            for p in paths:
                client.persistent_disk_dangling(server.control, p.stem, reason="test")
            result = guest.wait(300)
        volumes = {v["name"]: v for v in client.status(server.control)["volumes"]}
    assert result.exit_code == 0, result.console[-3000:]
    # A 64 KiB write takes 64.5 KiB of ring; about 15 fit in a 1 MiB ring.
    accepted_reject = int(result.console.split("vda-ACCEPTED=")[1].split()[0])
    accepted_overwrite = int(result.console.split("vdb-ACCEPTED=")[1].split()[0])
    assert 10 <= accepted_reject < 48
    assert accepted_overwrite == 48
    assert volumes["reject"]["ring"]["rejected"] > 0 and volumes["reject"]["ring"]["dropped"] == 0
    assert volumes["overwrite"]["ring"]["dropped"] > 0 and volumes["overwrite"]["ring"]["rejected"] == 0
    for p, header in zip(paths, headers, strict=True):
        assert data_digest(p, header) == hashlib.sha256(bytes(header.capacity)).hexdigest()
        with RingReader(p, header) as reader:
            report = reader.verify()
            assert report.ok, report.problems
    with RingReader(paths[1], headers[1]) as reader:
        # The oldest were dropped, the newest survive: the last is the guest's 48th write.
        report = reader.verify()
        assert report.last_seq == 48 and report.first_seq > 1
        assert report.records + volumes["overwrite"]["ring"]["dropped"] == 48
