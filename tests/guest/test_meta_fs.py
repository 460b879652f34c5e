"""The metadata file system in a real QEMU guest: vhost-user-fs-pci on `serve --meta-socket`,
mounted with `mount -t virtiofs metadata`. What the guest sees follows the store live, its
writes reach `vhost-pv meta get`, and the policy is enforced on the host."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.guestio import wait_console

from vhost_pv.control import client
from vhost_pv.control.wire import MetaOp
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import GuestImage, start_guest
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
SECRET = "fs-visible-secret"

GUEST_JOB = """
mkdir -p /run/metadata
mount -t virtiofs metadata /run/metadata || { echo MOUNT-FAILED; exit 20; }
M=/run/metadata
echo "ROOT=$(ls $M | tr '\\n' ' ')"
echo "ZONE=$(cat $M/instance/zone)"
echo "STATE1=$(cat $M/volumes/vol0/state)"
echo FLIP-NOW
n=0
while [ "$(cat $M/volumes/vol0/state)" = attached ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n + 1)); done
echo "STATE2=$(cat $M/volumes/vol0/state) REASON=$(cat $M/volumes/vol0/reason)"
printf db > $M/attributes/role && echo "ROLE=$(cat $M/attributes/role)"
echo x > $M/instance/zone 2>/dev/null && echo INSTANCE-WRITABLE || echo INSTANCE-READ-ONLY
echo "SECRET-AS-ROOT=$(cat $M/secrets/db-password)"
echo 'app:x:1000:1000::/tmp:/bin/sh' >>/etc/passwd
echo 'app:x:1000:' >>/etc/group
su app -c "cat $M/secrets/db-password" >/dev/null 2>&1 && echo SECRET-READ-AS-1000 || echo SECRET-DENIED-1000
su app -c "cat $M/instance/zone" && echo
umount $M && echo UNMOUNTED
"""


@pytest.mark.timeout(300)
def test_guest_mounts_the_metadata_file_system(guest_image: GuestImage, tmp_path: Path) -> None:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner="web-1"))
    meta_socket = tmp_path / "meta.sock"
    with ServerProcess([path], tmp_path / "d",
                       extra_args=["--vm", "vm7", "--meta-socket", str(meta_socket)]) as server:
        client.meta(server.control, MetaOp.SET, "vm7", "instance/zone", "rack-3")
        client.meta(server.control, MetaOp.SET, "vm7", "secrets/db-password", SECRET)
        fs_args = ["-chardev", f"socket,id=m0,path={meta_socket}",
                   "-device", "vhost-user-fs-pci,chardev=m0,tag=metadata"]
        with start_guest(GUEST_JOB, extra_args=fs_args, image=guest_image) as guest:
            wait_console(guest, "FLIP-NOW", timeout=120)
            client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
            result = guest.wait(240)
        console = result.console
        assert result.exit_code == 0, console[-3000:]
        for line in ("ROOT=attributes instance secrets volumes", "ZONE=rack-3", "STATE1=attached",
                     "STATE2=dangling REASON=container-deleted", "ROLE=db", "INSTANCE-READ-ONLY",
                     f"SECRET-AS-ROOT={SECRET}", "SECRET-DENIED-1000", "rack-3", "UNMOUNTED"):
            assert line in console, (line, console[-3000:])
        # The guest's write reached the store; the denial was decided and logged on the host.
        assert client.meta(server.control, MetaOp.GET, "vm7", "attributes/role")["value"] == "db"
        log = server.log()
        denials = [line for line in log.splitlines() if "metadata fs: denied" in line]
        assert denials and all("uid=1000" in line and "/secrets" in line for line in denials), denials
        assert SECRET not in log
