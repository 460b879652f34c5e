"""A real QEMU, started as VM "vmA" (`-name guest=vmA,... -uuid ...`), attaches to a volume
bound to vmA and does I/O; the same QEMU command line is refused by a volume bound to vmB."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import GuestImage, VhostUserBlkDisk, run_guest
from vhost_pv_tools.serverproc import ServerProcess

VM_A = uuid.UUID("a0a0a0a0-1111-4222-8333-444455556666")
VM_B = uuid.UUID("b0b0b0b0-1111-4222-8333-444455556666")
VM_A_ARGS = ["-name", "guest=vmA,debug-threads=on", "-uuid", str(VM_A)]

IO_JOB = """
set -e
head -c 1048576 /dev/urandom > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=64k 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=64k count=16 2>/dev/null
cmp /tmp/pattern /tmp/back
echo "PATTERN-MD5 $(md5sum /tmp/pattern | cut -d' ' -f1)"
"""


def test_qemu_of_the_bound_vm_attaches_and_another_binding_refuses_it(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    vol_a, vol_b = tmp_path / "vola.img", tmp_path / "volb.img"
    header = create_volume(vol_a, CreateOptions(size=16 << 20, vm_uuid=VM_A, vm_name="vmA"))
    create_volume(vol_b, CreateOptions(size=16 << 20, vm_uuid=VM_B, vm_name="vmB"))
    with ServerProcess([vol_a, vol_b], tmp_path) as server:
        result = run_guest(IO_JOB, disks=[VhostUserBlkDisk(server.socket_for(vol_a))],
                           extra_args=VM_A_ARGS, image=guest_image, timeout=300)
        assert result.exit_code == 0, result.console[-3000:]
        refused = run_guest(IO_JOB, disks=[VhostUserBlkDisk(server.socket_for(vol_b))],
                            extra_args=VM_A_ARGS, image=guest_image, timeout=120)
        status = {v["name"]: v for v in client.status(server.control)["volumes"]}
        alerts = [a for a in client.alerts(server.control) if a["kind"] == "attach-refused"]
        log = server.log()

    # vmA's QEMU did its I/O on vola: the pattern the guest wrote is in the volume file.
    match = re.search(r"PATTERN-MD5 ([0-9a-f]{32})", result.console)
    assert match, result.console[-3000:]
    with open(vol_a, "rb") as f:
        f.seek(header.data_offset)
        assert hashlib.md5(f.read(1 << 20)).hexdigest() == match.group(1)
    assert status["vola"]["connections_total"] == 1 and status["vola"]["refused_total"] == 0
    assert status["vola"]["totals"]["bytes_written"] >= 1 << 20

    # The same command line against volb: closed at once, QEMU cannot start its disk (it
    # tries a few times: each attempt is refused and logged, one alert stands for them all).
    assert refused.exit_code is None and refused.qemu_returncode not in (None, 0), refused.console[-2000:]
    assert status["volb"]["connections_total"] == 0 and status["volb"]["refused_total"] >= 1
    assert log.count("volb: refused frontend") == status["volb"]["refused_total"]
    line = next(line for line in log.splitlines() if "volb: refused frontend" in line)
    assert "not the VM the volume is bound to (name vmB, uuid " + str(VM_B) in line
    assert f"uuid {VM_A} is not {VM_B}" in line and "VM name 'vmA' is not 'vmB'" in line
    (alert,) = alerts
    assert alert["volume"] == "volb"
    assert alert["details"]["identity"]["vm_name"] == "vmA"
    assert alert["details"]["identity"]["exe"].endswith("qemu-system-x86_64")
