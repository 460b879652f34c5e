"""Dangling volumes through the control plane (no guest needed): time limits, tampering,
restarts, the alert webhook and bad control requests, against a real daemon."""

from __future__ import annotations

import errno
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support.daemon_status import alert_kinds, volume_entry, wait_until

from vhost_pv.control import client
from vhost_pv.control.wire import Command, ReclaimMode
from vhost_pv.volume.header import TtlAction, VolumeHeader
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


def make_volume(tmp_path: Path, name: str = "vol0", **options: Any) -> tuple[Path, VolumeHeader]:
    path = tmp_path / f"{name}.img"
    return path, create_volume(path, CreateOptions(size=8 * MiB, ring_size=MiB, **options))


def guard(control: Path, volume: str) -> dict[str, Any]:
    result: dict[str, Any] = volume_entry(control, volume)["guard"]
    return result


@pytest.mark.timeout(60)
def test_ttl_delete_removes_the_volume(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path, ttl_seconds=1, ttl_action=TtlAction.DELETE)
    keep, _ = make_volume(tmp_path, "other")
    with ServerProcess([path, keep], tmp_path) as server:
        client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
        wait_until(lambda: not path.exists())
        assert not server.socket_for(path).exists()
        names = [v["name"] for v in client.status(server.control)["volumes"]]
        assert names == ["other"]
        kinds = alert_kinds(server.control, "vol0")
        assert "ttl-expired" in kinds and "volume-deleted" in kinds
    assert keep.exists()


@pytest.mark.timeout(60)
def test_ttl_alert_only_keeps_the_volume(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path, ttl_seconds=1, ttl_action=TtlAction.ALERT)
    with ServerProcess([path], tmp_path) as server:
        client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
        wait_until(lambda: "ttl-expired" in alert_kinds(server.control, "vol0"))
        time.sleep(1)
        assert guard(server.control, "vol0")["ttl_expired"]
        assert "volume-deleted" not in alert_kinds(server.control, "vol0")
    assert read_header(path).dangling


@pytest.mark.timeout(60)
def test_tampering_while_dangling_is_reported_at_reclaim(tmp_path: Path) -> None:
    path, header = make_volume(tmp_path, owner="ctr-1")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(8 * MiB), header.data_offset)
        with ServerProcess([path], tmp_path) as server:
            client.persistent_disk_dangling(server.control, "vol0", reason="gone")
            wait_until(lambda: guard(server.control, "vol0")["sealed"])
            # Someone writes the file behind the backend's back: chunk 3 (1 MiB chunks).
            os.pwrite(fd, b"tampered", header.data_offset + 3 * MiB + 5)
            report = client.reclaim(server.control, "vol0", "ctr-2", ReclaimMode.KEEP)
            assert report["seal"]["changed_chunks"] == [3]
            assert report["seal"]["changed_ranges"] == [[3 * MiB, MiB]]
            assert "tamper-detected" in alert_kinds(server.control, "vol0")
        after = read_header(path)
        assert not after.dangling and after.owner == "ctr-2"
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_dangling_state_survives_a_restart_and_frontends_attach_under_its_rules(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path)
    with ServerProcess([path], tmp_path) as server:
        client.persistent_disk_dangling(server.control, "vol0", reason="container-crashed")
        wait_until(lambda: guard(server.control, "vol0")["sealed"])
        root = guard(server.control, "vol0")["seal_root"]
    header = read_header(path)
    assert header.dangling and header.reason == "container-crashed" and header.dangling_source == "ioctl"
    with ServerProcess([path], tmp_path) as server:
        status = client.status(server.control)["volumes"][0]
        assert status["header"]["dangling"]
        wait_until(lambda: guard(server.control, "vol0")["sealed"])
        # The same dangling period: the stored seal is reused, not retaken.
        assert guard(server.control, "vol0")["seal_root"] == root
        # A frontend coming back (QEMU reconnecting every second) is served, not hung up
        # on, and the admin hears of it once, not once per attempt.
        for _ in range(5):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as frontend:
                frontend.connect(str(server.socket_for(path)))
                wait_until(lambda: client.status(server.control)["volumes"][0]["connection"] is not None)
            wait_until(lambda: client.status(server.control)["volumes"][0]["connection"] is None)
        status = client.status(server.control)["volumes"][0]
        assert status["dangling_attaches"] == 5 and status["refused_total"] == 0
        assert "attached to a dangling volume" in server.log()
        assert alert_kinds(server.control, "vol0").count("dangling-attach") == 1
        assert "attach-refused" not in alert_kinds(server.control, "vol0")
        # The alert says what settles it: reclaim or delete, on this daemon's control socket.
        (attach,) = [a for a in client.alerts(server.control) if a["kind"] == "dangling-attach"]
        reclaim, delete = attach["details"]["suggested"]
        assert reclaim.startswith("vhost-pv reclaim --control ") and str(server.control.absolute()) in reclaim
        assert delete.startswith("vhost-pv delete --control ") and delete.endswith(" vol0")


@pytest.mark.timeout(60)
def test_flip_is_idempotent_and_clear_reattaches(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path)
    with ServerProcess([path], tmp_path) as server:
        first = client.persistent_disk_dangling(server.control, "vol0", reason="gone")
        again = client.persistent_disk_dangling(server.control, "vol0", reason="gone")
        assert first["changed"] and not again["changed"]
        assert again["generation"] == first["generation"]
        cleared = client.persistent_disk_dangling(server.control, "vol0", clear=True)
        assert cleared["state"] == "attached" and cleared["changed"]
    assert not read_header(path).dangling


@pytest.mark.timeout(60)
def test_bad_control_requests_get_errors_and_the_daemon_stays(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path)
    with ServerProcess([path], tmp_path) as server:
        with pytest.raises(client.ControlError) as info:
            client.call(server.control, Command.PERSISTENT_DISK_DANGLING, b"short")
        assert info.value.status == -errno.EINVAL
        with pytest.raises(client.ControlError) as info:
            client.persistent_disk_dangling(server.control, "no-such-volume")
        assert info.value.status == -errno.ENOENT
        with pytest.raises(client.ControlError) as info:
            client.reclaim(server.control, "vol0", "ctr-2")
        assert info.value.status == -errno.EINVAL  # not dangling
        with pytest.raises(client.ControlError) as info:
            client.delete(server.control, "vol0")
        assert info.value.status == -errno.EBUSY  # not dangling, no --force
        bad_mode = bytearray(64 + 128 + 8)
        bad_mode[:4] = b"vol0"
        bad_mode[192:196] = (7).to_bytes(4, "little")
        with pytest.raises(client.ControlError) as info:
            client.call(server.control, Command.RECLAIM, bytes(bad_mode))
        assert info.value.status == -errno.EINVAL
        assert client.status(server.control)["volumes"][0]["name"] == "vol0"
    assert path.exists()


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).bodies.append((self.path, json.loads(self.rfile.read(length))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[Any]]]:
    _Receiver.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v2/alerts", _Receiver.bodies
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_alerts_reach_an_alertmanager_webhook(tmp_path: Path, webhook: tuple[str, list[Any]]) -> None:
    url, bodies = webhook
    path, _ = make_volume(tmp_path)
    with ServerProcess([path], tmp_path, extra_args=["--alert-webhook", url]) as server:
        client.persistent_disk_dangling(server.control, "vol0", reason="container-deleted")
        wait_until(lambda: bool(bodies))
    route, body = bodies[0]
    assert route == "/api/v2/alerts"
    assert isinstance(body, list) and len(body) == 1
    alert = body[0]
    assert alert["labels"]["alertname"] == "VhostPvVolumeDangling"
    assert alert["labels"]["volume"] == "vol0" and alert["labels"]["severity"] == "critical"
    assert "container-deleted" in alert["annotations"]["summary"]
    assert alert["startsAt"].endswith("Z")


@pytest.mark.timeout(60)
def test_ring_cli_reads_the_file_and_names_a_damaged_superblock(tmp_path: Path) -> None:
    import subprocess
    import sys

    path, header = make_volume(tmp_path)
    cli = [sys.executable, "-m", "vhost_pv.cli", "ring", str(path)]
    done = subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True)
    info = json.loads(done.stdout)
    assert info["records"] == 0 and info["verify"]["ok"] and info["entries"] == []
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff" * 8, header.ring_offset + 40)
    finally:
        os.close(fd)
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode != 0
    assert "superblock" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_webhook_credentials_never_reach_the_log(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path)
    # Port 9 (discard) on loopback refuses the connection: the failure is logged.
    url = "http://alerts:s3cr3t-token@127.0.0.1:9/api/v2/alerts"
    with ServerProcess([path], tmp_path, extra_args=["--alert-webhook", url]) as server:
        client.persistent_disk_dangling(server.control, "vol0", reason="gone")
        wait_until(lambda: "alert webhook" in server.log())
        log = server.log()
    assert "***@127.0.0.1:9" in log
    assert "s3cr3t-token" not in log
