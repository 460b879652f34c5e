"""A QEMU guest reads its metadata at 169.254.169.254 (user networking, a guestfwd running
`vhost-pv meta-relay` per connection), and its trusted agent takes the boot token."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_pv.control import client
from vhost_pv.control.wire import MetaOp
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import GuestImage, run_guest
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
AGENT = (Path(__file__).resolve().parents[2] / "vhost_pv" / "meta" / "agent.sh").read_text()
SECRET = "guest-visible-secret"
# The guest's side of user networking: slirp serves 169.254.169.0/24, so the forwarded
# metadata address is on the guest's own link.
NETWORK = """
ip link set eth0 up
ip addr add 169.254.169.15/24 dev eth0
MD=http://169.254.169.254/computeMetadata/v1
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner="web-1"))
    with ServerProcess([path], tmp_path / "d", extra_args=["--vm", "vm7", "--meta-http", "127.0.0.1:0"]) as s:
        client.meta(s.control, MetaOp.SET, "vm7", "instance/zone", "rack-3")
        client.meta(s.control, MetaOp.SET, "vm7", "secrets/db-password", SECRET)
        yield s


def network_args(server: ServerProcess) -> list[str]:
    address = client.status(server.control)["metadata"]["http"]
    relay = f"{sys.executable} -m vhost_pv.cli meta-relay {address}"
    return ["-netdev", f"user,id=n0,restrict=on,net=169.254.169.0/24,"
            f"guestfwd=tcp:169.254.169.254:80-cmd:{relay}",
            "-device", "virtio-net-pci,netdev=n0"]


GUEST_JOB = NETWORK + """
get() { wget -qO- --header 'Metadata-Flavor: Google' "$@"; }
echo "ZONE=$(get $MD/instance/zone)"
echo "STATE=$(get $MD/volumes/vol0/state)"
wget -qO- "$MD/instance/zone" >/dev/null 2>&1 || echo NO-FLAVOR-REFUSED
get $MD/secrets/db-password >/dev/null 2>&1 || echo SECRET-WITHOUT-TOKEN-REFUSED
cat >/tmp/agent.sh <<'AGENT'
""" + AGENT + """AGENT
sh /tmp/agent.sh
echo "SECRET=$(get --header "X-Metadata-Token: $(cat /run/metadata-token)" $MD/secrets/db-password)"
get $MD/instance/boot-token >/dev/null 2>&1 || echo SECOND-FETCH-REFUSED
echo AFTER-AGENT
"""


@pytest.mark.timeout(300)
def test_guest_reads_metadata_and_its_agent_takes_the_token(
    guest_image: GuestImage, server: ServerProcess
) -> None:
    result = run_guest(GUEST_JOB, extra_args=network_args(server), image=guest_image, timeout=240)
    console = result.console
    assert result.exit_code == 0, console[-3000:]
    for line in ("ZONE=rack-3", "STATE=attached", "NO-FLAVOR-REFUSED", "SECRET-WITHOUT-TOKEN-REFUSED",
                 "boot token kept", f"SECRET={SECRET}", "SECOND-FETCH-REFUSED", "AFTER-AGENT"):
        assert line in console, (line, console[-3000:])
    # The host saw the second request for the token, and alerted.
    alerts = [a for a in client.alerts(server.control) if a["kind"] == "boot-token-refetch"]
    assert len(alerts) == 1
    assert SECRET not in server.log()


@pytest.mark.timeout(300)
def test_agent_refused_powers_the_guest_off(guest_image: GuestImage, server: ServerProcess) -> None:
    # Something took this boot's token before the agent ran (no `vhost-pv meta boot` since).
    job = NETWORK + "wget -qO- --header 'Metadata-Flavor: Google' $MD/instance/boot-token >/dev/null\n" + \
        "cat >/tmp/agent.sh <<'AGENT'\n" + AGENT + "AGENT\nsh /tmp/agent.sh\necho AFTER-AGENT\n"
    result = run_guest(job, extra_args=network_args(server), image=guest_image, timeout=240)
    assert "another process took it; powering off" in result.console, result.console[-3000:]
    # Powered off by the agent: the job never went on and never reported an exit code.
    assert "AFTER-AGENT" not in result.console and result.exit_code is None
    assert [a["kind"] for a in client.alerts(server.control)].count("boot-token-refetch") == 1
