"""A bad disk costs only its own volume: one volume on a small file system that fills up (a
tmpfs mounted for the test) or fails underneath (ext4 on a loop device whose backing file
sits on a full tmpfs: writeback gets EIO), a bystander volume on the normal file system, both
in one daemon. Writes past the space are answered IOERR, every write answered OK reads back,
a FLUSH reports a failed writeback (and keeps reporting it), the daemon and the bystander
keep serving and the control socket answers.

Device-mapper (dm-error / dm-flakey) is not available here (no dm-mod module, no
/dev/mapper), so the I/O error case is made with the loop device over a full tmpfs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.attach import Guest, pattern
from support.daemon_status import alert_kinds, volume_entry, wait_until
from support.frontend import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    BlkRequest,
    FrontendError,
    read_request,
    write_request,
)
from support.stall import resumed, stallable_fs, waiting_on_fuse

from vhost_pv.control import client
from vhost_pv.control.wire import Command
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
CHUNK = 64 << 10
SECTOR = 512


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


@contextlib.contextmanager
def _tmpfs(where: Path, size: int) -> Iterator[Path]:
    where.mkdir()
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "vhost-pv-test", str(where))
    try:
        yield where
    finally:
        _run("umount", str(where))


@contextlib.contextmanager
def _failing_ext4(where: Path, backing_space: int, fs_size: int) -> Iterator[Path]:
    """ext4 of fs_size bytes on a loop device whose backing file lives on a tmpfs of only
    backing_space bytes: the file system believes it has room, the device underneath runs
    out and fails writeback with EIO (what a thin-provisioned or failing disk does)."""
    with _tmpfs(where / "backing", backing_space) as backing:
        image = backing / "disk.img"
        with open(image, "wb") as f:
            f.truncate(fs_size)
        loop = _run("losetup", "--find", "--show", str(image))
        try:
            _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", loop)
            mount = where / "ext4"
            mount.mkdir()
            _run("mount", "-o", "errors=continue", loop, str(mount))
            try:
                yield mount
            finally:
                _run("umount", str(mount))
        finally:
            _run("losetup", "-d", loop)


class _Guest(Guest):
    """A Guest that can write past its 4 MiB of memory: each request's buffers are taken
    afresh from the start of memory (one request in flight at a time)."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path, timeout=10.0)
        self._base = self.memory._next

    def _fresh(self) -> None:
        self.memory._next = self._base

    def write_status(self, sector: int, data: bytes) -> int:
        self._fresh()
        return self.frontend.submit(0, self.ring, write_request(self.memory, sector, data)).status

    def read(self, sector: int, length: int) -> tuple[int, bytes]:
        self._fresh()
        request = self.frontend.submit(0, self.ring, read_request(self.memory, sector, length))
        return request.status, request.data()

    def flush(self) -> int:
        self._fresh()
        return self.frontend.submit(0, self.ring, BlkRequest.build(self.memory, VIRTIO_BLK_T_FLUSH)).status


def _fill(guest: _Guest, capacity: int) -> tuple[list[int], int]:
    """Write CHUNK-sized patterns from the start until the first IOERR: (the chunk indexes
    answered OK, the status that ended the run). No answer other than OK or IOERR."""
    stored: list[int] = []
    for index in range(capacity // CHUNK):
        status = guest.write_status(index * CHUNK // SECTOR, pattern(CHUNK, index))
        assert status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR), status
        if status != VIRTIO_BLK_S_OK:
            return stored, status
        stored.append(index)
    return stored, VIRTIO_BLK_S_OK


def _check_stored(guest: _Guest, stored: list[int]) -> None:
    for index in stored:
        status, data = guest.read(index * CHUNK // SECTOR, CHUNK)
        assert status == VIRTIO_BLK_S_OK, index
        assert data == pattern(CHUNK, index), f"chunk {index} was acknowledged but reads back otherwise"


def _bystander_serves(server: ServerProcess, bystander: Path, seed: int) -> None:
    guest = Guest(server.socket_for(bystander), timeout=10.0)
    try:
        guest.round_trip(seed * 8, pattern(4096, seed))
        flush = BlkRequest.build(guest.memory, VIRTIO_BLK_T_FLUSH)
        assert guest.frontend.submit(0, guest.ring, flush).status == VIRTIO_BLK_S_OK
    finally:
        guest.close()
    assert {v["name"] for v in client.status(server.control)["volumes"]} >= {"full", "other"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["buffered", "direct"])
def test_full_file_system_fails_writes_not_the_daemon(tmp_path: Path, mode: str) -> None:
    bystander = tmp_path / "other.img"
    create_volume(bystander, CreateOptions(size=4 * MiB, ring_size=MiB))
    with _tmpfs(tmp_path / "small", 3 * MiB) as small:
        full = small / "full.img"
        create_volume(full, CreateOptions(size=16 * MiB, ring_size=MiB))
        extra = ["--direct"] if mode == "direct" else []
        with ServerProcess([full, bystander], tmp_path / "run", extra_args=extra) as server:
            guest = _Guest(server.socket_for(full))
            try:
                stored, status = _fill(guest, 16 * MiB)
                assert status == VIRTIO_BLK_S_IOERR and stored, "the small file system never filled"
                assert os.statvfs(small).f_bavail == 0
                # The bystander is served while the full volume keeps failing.
                _bystander_serves(server, bystander, 1)
                next_sector = len(stored) * CHUNK // SECTOR
                assert guest.write_status(next_sector, pattern(CHUNK, 99)) == VIRTIO_BLK_S_IOERR
                # Every write answered OK is there; a FLUSH has nothing to lose.
                _check_stored(guest, stored)
                assert guest.flush() == VIRTIO_BLK_S_OK
            finally:
                guest.close()
            _bystander_serves(server, bystander, 2)
            assert server.process is not None and server.process.poll() is None


def _io_alerts(control: Path) -> list[dict[str, Any]]:
    return [a for a in client.alerts(control) if a["volume"] == "full" and a["kind"] == "dangling-io"]


@pytest.mark.timeout(60)
def test_flip_on_a_full_file_system(tmp_path: Path) -> None:
    """A volume on a full file system still flips (header copies and seal area were
    allocated at create); its quarantine ring cannot grow: each write is answered IOERR
    with a ring-error event, never OK for a write that was not stored."""
    bystander = tmp_path / "other.img"
    create_volume(bystander, CreateOptions(size=4 * MiB, ring_size=MiB))
    with _tmpfs(tmp_path / "small", 3 * MiB) as small:
        full = small / "full.img"
        create_volume(full, CreateOptions(size=16 * MiB, ring_size=MiB))
        with ServerProcess([full, bystander], tmp_path / "run") as server:
            guest = _Guest(server.socket_for(full))
            try:
                stored, status = _fill(guest, 16 * MiB)
                assert status == VIRTIO_BLK_S_IOERR and stored
                result = client.persistent_disk_dangling(server.control, "full", reason="container-deleted")
                assert result["state"] == "dangling"
                wait_until(lambda: "volume-dangling" in alert_kinds(server.control, "full"), 10.0,
                           "the flip's alert (the seal written)", server.log)
                records = volume_entry(server.control, "full")["ring"]["records"]
                for attempt in range(3):
                    assert guest.write_status(attempt * 8, pattern(CHUNK, 50 + attempt)) == VIRTIO_BLK_S_IOERR
                assert volume_entry(server.control, "full")["ring"]["records"] == records
                wait_until(lambda: len(_io_alerts(server.control)) >= 3, 10.0,
                           "the writes' alerts", server.log)
                # The file system is full, not the ring: a bigger ring would not help.
                assert {a["details"]["outcome"] for a in _io_alerts(server.control)} == {"ring-error"}
            finally:
                guest.close()
            _bystander_serves(server, bystander, 3)
            assert server.process is not None and server.process.poll() is None


@pytest.mark.timeout(60)
def test_failed_writeback_fails_every_later_flush(tmp_path: Path) -> None:
    """Writes go to the page cache (OK); the device underneath fails their writeback. The
    FLUSH reports it, and so does every later FLUSH: Linux reports a writeback error to an
    open file once, so without remembering it the second FLUSH would answer OK for data that
    never reached the disk."""
    bystander = tmp_path / "other.img"
    create_volume(bystander, CreateOptions(size=4 * MiB, ring_size=MiB))
    with _failing_ext4(tmp_path, 6 * MiB, 64 * MiB) as fs:
        failing = fs / "full.img"
        create_volume(failing, CreateOptions(size=24 * MiB, ring_size=MiB))
        with ServerProcess([failing, bystander], tmp_path / "run") as server:
            guest = _Guest(server.socket_for(failing))
            try:
                stored, status = _fill(guest, 24 * MiB)
                assert guest.flush() == VIRTIO_BLK_S_IOERR
                _bystander_serves(server, bystander, 4)
                for _ in range(3):
                    assert guest.flush() == VIRTIO_BLK_S_IOERR
                assert client.status(server.control)
            finally:
                guest.close()
            _bystander_serves(server, bystander, 5)
            assert server.process is not None and server.process.poll() is None
    assert stored and status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["disconnect", "get-vring-base"])
def test_stalled_disk_does_not_freeze_the_daemon(tmp_path: Path, how: str) -> None:
    """A worker stuck in the kernel on a stalled disk: the frontend goes away (or asks for
    the queue's base, which stops it), the stop gives up waiting for the worker after a few
    seconds instead of holding the event loop (and with it every other volume) until the
    disk answers, and the connection is ended. When the disk answers, the worker finishes
    into guest memory that was kept mapped, and the daemon is none the worse."""
    bystander = tmp_path / "other.img"
    create_volume(bystander, CreateOptions(size=4 * MiB, ring_size=MiB))
    (tmp_path / "fuse").mkdir()
    with stallable_fs(tmp_path / "fuse") as (mount, fuse_pid):
        stalled = mount / "full.img"
        create_volume(stalled, CreateOptions(size=4 * MiB, ring_size=MiB))
        with ServerProcess([stalled, bystander], tmp_path / "run") as server, resumed(fuse_pid):
            assert server.process is not None
            guest = _Guest(server.socket_for(stalled))
            try:
                assert guest.write_status(0, pattern(4096, 1)) == VIRTIO_BLK_S_OK
                os.kill(fuse_pid, signal.SIGSTOP)
                guest._fresh()
                write_request(guest.memory, 8, pattern(CHUNK, 2)).submit(guest.ring)
                guest.frontend.kick(0)
                wait_until(lambda: waiting_on_fuse(server.pid), 10.0,
                           "the worker waiting on the stopped FUSE server", server.log)
                if how == "get-vring-base":
                    # The stop gives up, the daemon ends the connection (the reply may or may
                    # not make it out before the close).
                    with contextlib.suppress(FrontendError):
                        guest.frontend.get_vring_base(0)
                    assert guest.frontend.wait_closed(10.0)
            finally:
                guest.close()   # the daemon stops the queue: its worker cannot leave
            # The event loop is free again within the stop's give-up time: status answers
            # and the bystander is served, while the disk is still stalled.
            took = wait_until(lambda: _serves(server, bystander), 20.0, "the bystander served", server.log)
            assert took < 15.0
            assert waiting_on_fuse(server.pid)
            os.kill(fuse_pid, signal.SIGCONT)
            wait_until(lambda: not waiting_on_fuse(server.pid), 10.0,
                       "the worker released", server.log)
            # The worker completed into guest memory that was still mapped, then cleaned up.
            _bystander_serves(server, bystander, 6)
            guest = _Guest(server.socket_for(stalled))
            try:
                status, data = guest.read(0, 4096)
                assert status == VIRTIO_BLK_S_OK and data == pattern(4096, 1)
            finally:
                guest.close()
            assert server.process.poll() is None
            log = server.log()
            assert "its worker is stuck on" in log and "left to finish on its own" in log
            assert "Traceback" not in log, log


def _serves(server: ServerProcess, bystander: Path) -> bool:
    try:
        client.call(server.control, Command.STATUS, timeout=1.0)
        guest = Guest(server.socket_for(bystander), timeout=1.0)
    except (OSError, TimeoutError, FrontendError):
        return False
    try:
        guest.round_trip(0, pattern(4096, 7))
    finally:
        guest.close()
    return True
