"""Volumes follow real podman containers: engine events, reconciliation, process events,
reclaim by label, and a QEMU guest whose writes are diverted once its owner is removed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_status import header, wait_until
from support.guestio import read_data, text_pattern, wait_console
from support.podman import Podman, PodmanService
from support.volumes import data_digest

from vhost_pv.control import client
from vhost_pv.volume.ring import RecordType, RingReader
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.guest import GuestImage, VhostUserBlkDisk, start_guest
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    engine = Podman(tmp_path_factory.mktemp("podman"))
    engine.import_busybox()
    yield engine
    engine.close()


@pytest.fixture
def service(podman: Podman, tmp_path: Path) -> Iterator[PodmanService]:
    with podman.service(tmp_path / "podman.sock") as running:
        yield running
    podman.clean_up()


def volume(tmp_path: Path, name: str, owner: str = "", size: int = 4 * MiB) -> Path:
    path = tmp_path / f"{name}.img"
    create_volume(path, CreateOptions(size=size, ring_size=MiB, owner=owner))
    return path


def header_of(server: ServerProcess, name: str) -> dict[str, Any]:
    return header(server.control, name)


def wait_for(what: str, condition: Callable[[], bool], server: ServerProcess, timeout: float = 20) -> float:
    return wait_until(condition, timeout, what, log=server.log)


def resolved(server: ServerProcess, name: str, container_id: str) -> Callable[[], bool]:
    return lambda: header_of(server, name)["owner"] == container_id


@pytest.mark.timeout(180)
def test_podman_rm_flips_the_owners_volume(podman: Podman, service: PodmanService, tmp_path: Path) -> None:
    owner = podman.run("owner-rm", "sleep 1000")
    other = podman.run("bystander", "sleep 1000")
    paths = [volume(tmp_path, "vol-rm", owner="owner-rm"), volume(tmp_path, "vol-other", owner="bystander")]
    with ServerProcess(paths, tmp_path / "d", extra_args=["--engine", service.url]) as server:
        # The name given at create time is resolved to the full id, name and image.
        wait_for("owner resolved", resolved(server, "vol-rm", owner), server)
        header = header_of(server, "vol-rm")
        assert header["owner_name"] == "owner-rm"
        assert header["owner_image"].removeprefix("sha256:") == podman.inspect("owner-rm")["Image"]
        assert header["owner_pid"] == podman.inspect("owner-rm")["State"]["Pid"] > 0
        wait_for("bystander resolved", resolved(server, "vol-other", other), server)

        started = time.monotonic()
        podman("rm", "-f", "-t", "0", "owner-rm")
        took = wait_for("the flip", lambda: header_of(server, "vol-rm")["dangling"], server)
        assert time.monotonic() - started < 2.0, f"flipped {took:.2f} s after podman rm"
        header = header_of(server, "vol-rm")
        assert header["reason"] == "container-deleted"
        assert header["dangling_source"] == "engine"
        assert not header_of(server, "vol-other")["dangling"]
        alerts = client.alerts(server.control)
        gone = [a for a in alerts if a["kind"] == "owner-gone"]
        assert [a["volume"] for a in gone] == ["vol-rm"]
        assert gone[0]["details"]["container"] == owner
    assert read_header(paths[0]).dangling  # durable
    assert not read_header(paths[1]).dangling


@pytest.mark.timeout(180)
def test_crash_flips_and_clean_exit_does_not(podman: Podman, service: PodmanService, tmp_path: Path) -> None:
    trigger = tmp_path / "trigger"
    trigger.mkdir()
    wait_for_go = "until [ -e /trigger/go ]; do sleep 0.1; done; "
    crasher = podman.run("crasher", wait_for_go + "exit 3", trigger=trigger)
    clean = podman.run("clean", wait_for_go + "exit 0", trigger=trigger)
    paths = [volume(tmp_path, "vol-crash", owner="crasher"), volume(tmp_path, "vol-clean", owner="clean")]
    with ServerProcess(paths, tmp_path / "d", extra_args=["--engine", service.url]) as server:
        wait_for("owners resolved", lambda: resolved(server, "vol-crash", crasher)()
                   and resolved(server, "vol-clean", clean)(), server)
        (trigger / "go").touch()
        assert podman.wait_exited("crasher") == 3
        assert podman.wait_exited("clean") == 0
        wait_for("the crash flip", lambda: header_of(server, "vol-crash")["dangling"], server)
        header = header_of(server, "vol-crash")
        assert (header["reason"], header["dangling_source"]) == ("container-crashed", "engine")
        # The clean exit was seen too, and left its volume alone.
        seen = client.status(server.control)["watchers"]["engine"]["events_seen"]
        assert seen >= 4  # at least the two exits and what came with them
        time.sleep(2.0)  # longer than the daemon waits to tell a crash from a stop
        assert not header_of(server, "vol-clean")["dangling"]
        detail = next(a for a in client.alerts(server.control) if a["kind"] == "owner-gone")["details"]
        assert detail["exit_code"] == 3 and detail["container"] == crasher


@pytest.mark.timeout(180)
def test_reconcile_after_the_engine_restarts(podman: Podman, tmp_path: Path) -> None:
    service = podman.service(tmp_path / "podman.sock").start()
    try:
        owner = podman.run("owner-offline", "sleep 1000")
        path = volume(tmp_path, "vol-off", owner="owner-offline")
        with ServerProcess([path], tmp_path / "d", extra_args=["--engine", service.url]) as server:
            wait_for("owner resolved", resolved(server, "vol-off", owner), server)
            service.stop()
            wait_for("the daemon sees the engine gone",
                       lambda: not client.status(server.control)["watchers"]["engine"]["connected"], server)
            podman("rm", "-f", "-t", "0", "owner-offline")  # nobody is listening for this event
            time.sleep(1.0)
            assert not header_of(server, "vol-off")["dangling"]
            service.start()
            wait_for("the flip after reconnecting", lambda: header_of(server, "vol-off")["dangling"],
                       server, timeout=60)
            header = header_of(server, "vol-off")
            assert header["reason"] == "container-deleted"
            # Replayed from the missed events or found by looking the owner up: both are the engine's.
            assert header["dangling_source"] in ("engine", "engine-reconcile")
            engine = client.status(server.control)["watchers"]["engine"]
            assert engine["connects"] >= 2 and engine["reconciles"] >= 2
            assert "reconnecting" in server.log()
    finally:
        service.stop()
        podman.clean_up()


@pytest.mark.timeout(180)
def test_reconcile_at_start_flips_a_volume_whose_owner_is_gone(
    podman: Podman, service: PodmanService, tmp_path: Path
) -> None:
    path = volume(tmp_path, "vol-orphan", owner="never-existed")
    with ServerProcess([path], tmp_path / "d", extra_args=["--engine", service.url]) as server:
        wait_for("the flip", lambda: header_of(server, "vol-orphan")["dangling"], server)
        header = header_of(server, "vol-orphan")
        assert (header["reason"], header["dangling_source"]) == ("container-deleted", "engine-reconcile")


@pytest.mark.timeout(180)
def test_process_events_without_an_engine(podman: Podman, tmp_path: Path) -> None:
    trigger = tmp_path / "trigger"
    trigger.mkdir()
    try:
        killed = podman.run("killed", "sleep 1000")
        clean = podman.run("exits-clean", "until [ -e /trigger/go ]; do sleep 0.1; done; exit 0",
                           trigger=trigger)
        killed_pid = int(podman.inspect("killed")["State"]["Pid"])
        clean_pid = int(podman.inspect("exits-clean")["State"]["Pid"])
        paths = [volume(tmp_path, name) for name in ("vol-killed", "vol-killed-2", "vol-clean")]
        with ServerProcess(paths, tmp_path / "d", extra_args=["--proc-events"]) as server:
            assert client.status(server.control)["watchers"]["engine"] is None
            bound = client.bind(server.control, "vol-killed", killed, pid=killed_pid)
            assert bound["owner_pid"] == killed_pid and bound["owner_pid_start"] > 0
            client.bind(server.control, "vol-killed-2", killed, pid=killed_pid)  # one owner, two volumes
            client.bind(server.control, "vol-clean", clean, pid=clean_pid)
            watched = client.status(server.control)["watchers"]["proc_events"]["watched"]
            assert sorted(map(sorted, watched.values())) == [["vol-clean"], ["vol-killed", "vol-killed-2"]]
            # A pid that does not exist cannot be bound.
            with pytest.raises(client.ControlError, match="No such process"):
                client.bind(server.control, "vol-clean", "ghost", pid=2**22 + 1)

            os.kill(killed_pid, signal.SIGKILL)
            wait_for("the flip", lambda: header_of(server, "vol-killed")["dangling"], server)
            wait_for("the other volume's flip", lambda: header_of(server, "vol-killed-2")["dangling"], server)
            header = header_of(server, "vol-killed")
            assert (header["reason"], header["dangling_source"]) == ("container-crashed", "proc-events")
            detail = next(a for a in client.alerts(server.control) if a["kind"] == "owner-gone")["details"]
            assert detail["signal"] == signal.SIGKILL and detail["pid"] == killed_pid

            (trigger / "go").touch()
            assert podman.wait_exited("exits-clean") == 0
            time.sleep(1.0)
            assert not header_of(server, "vol-clean")["dangling"]
            assert client.status(server.control)["watchers"]["proc_events"]["owner_exits_seen"] == 2
    finally:
        podman.clean_up()


@pytest.mark.timeout(180)
def test_labelled_container_reclaims(podman: Podman, service: PodmanService, tmp_path: Path) -> None:
    owner = podman.run("first-owner", "sleep 1000")
    path = volume(tmp_path, "vol-label", owner="first-owner")
    with ServerProcess([path], tmp_path / "d", extra_args=["--engine", service.url]) as server:
        wait_for("owner resolved", resolved(server, "vol-label", owner), server)
        podman("rm", "-f", "-t", "0", "first-owner")
        wait_for("the flip", lambda: header_of(server, "vol-label")["dangling"], server)
        heir = podman.run("heir", "sleep 1000", labels={"vhost-pv.reclaim": "vol-label"})
        wait_for("the reclaim", lambda: not header_of(server, "vol-label")["dangling"], server)
        header = header_of(server, "vol-label")
        assert header["owner"] == heir and header["owner_name"] == "heir"
        assert header["owner_pid"] == podman.inspect("heir")["State"]["Pid"]
        reclaimed = [a for a in client.alerts(server.control) if a["kind"] == "volume-reclaimed"]
        assert reclaimed and reclaimed[-1]["details"]["source"] == "engine-label"
        # The heir is now the owner that is followed: removing it flips the volume again.
        podman("rm", "-f", "-t", "0", "heir")
        wait_for("the second flip", lambda: header_of(server, "vol-label")["dangling"], server)


# The guest writes pattern A, then waits until its reads are refused (the owner was removed
# and the volume flipped, read policy deny), then writes pattern B, which must be diverted.
GUEST_JOB = """
yes PATTERN-A | head -c 1048576 > /tmp/a
dd if=/tmp/a of=/dev/vda bs=64k oflag=direct conv=fsync 2>/dev/null || exit 10
echo PHASE1-DONE
while dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; do sleep 0.2; done
echo FLIP-SEEN
yes PATTERN-B | head -c 262144 > /tmp/b
dd if=/tmp/b of=/dev/vda bs=64k seek=64 oflag=direct conv=fsync && echo WRITE-OK || echo WRITE-FAILED
exit 0
"""


@pytest.mark.timeout(600)
def test_guest_writes_are_diverted_after_podman_rm(
    guest_image: GuestImage, podman: Podman, service: PodmanService, tmp_path: Path
) -> None:
    owner = podman.run("vm-owner", "sleep 1000")
    path = volume(tmp_path, "vol-vm", owner="vm-owner", size=16 * MiB)
    header = read_header(path)
    with ServerProcess([path], tmp_path / "d", extra_args=["--engine", service.url]) as server:
        wait_for("owner resolved", resolved(server, "vol-vm", owner), server)
        disk = VhostUserBlkDisk(server.socket_for(path))
        with start_guest(GUEST_JOB, disks=[disk], image=guest_image) as guest:
            wait_console(guest, "PHASE1-DONE")
            before = data_digest(path, header)
            podman("rm", "-f", "-t", "0", "vm-owner")
            result = guest.wait(300)
        assert result.exit_code == 0, result.console[-3000:]
        assert "FLIP-SEEN" in result.console and "WRITE-OK" in result.console, result.console[-3000:]
        assert header_of(server, "vol-vm")["reason"] == "container-deleted"
        assert data_digest(path, header) == before
        assert read_data(path, header, 0, MiB) == text_pattern("PATTERN-A", MiB)
        assert read_data(path, header, 4 * MiB, 256 * 1024) == bytes(256 * 1024)
        with RingReader(path, header) as reader:
            assert reader.verify().ok
            records = sorted(reader.records(), key=lambda r: r.sector)
            assert records and all(r.type == RecordType.WRITE for r in records)
            assert records[0].sector == 4 * MiB // 512
            payload = b"".join(reader.payload(r).tobytes() for r in records)
            assert payload == text_pattern("PATTERN-B", 256 * 1024)
