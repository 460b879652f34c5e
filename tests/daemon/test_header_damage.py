"""A damaged header never silently undoes a flip, and one damaged volume never stops the
daemon from serving the others (the daemon as a subprocess, the volume files damaged
between runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from support.attach import Guest, pattern, run_cli
from support.daemon_status import alert_kinds, volume_entry, wait_until
from support.frontend import FrontendError

from vhost_pv.control import client
from vhost_pv.volume.header import (
    DAMAGED_REASON,
    FLAG_BOTH_COPIES,
    FLAGS_OFFSET,
    SLOT_OFFSETS,
    SLOT_SIZE,
    STATE_FIELD_OFFSET,
    HeaderError,
    HeaderSlot,
    VolumeHeader,
    VolumeState,
    choose_slot,
    decode_slot,
    encode_slot,
)
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
REASON_OFFSET = 104  # inside the reason text: covered by the CRC, not the state field


def _slots(path: Path) -> list[bytes]:
    with open(path, "rb") as f:
        return [os.pread(f.fileno(), SLOT_SIZE, offset) for offset in SLOT_OFFSETS]


def _pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "rb") as f:
        byte = os.pread(f.fileno(), 1, offset)[0]
    _pwrite(path, bytes([byte ^ (1 << bit)]), offset)


def _flipped_volume(tmp_path: Path) -> tuple[Path, list[bytes], ServerProcess]:
    """A volume flipped dangling by a daemon, which is then stopped: (path, the slots from
    before the flip, the stopped server to restart)."""
    path = tmp_path / "vol.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner="c1"))
    before = _slots(path)
    server = ServerProcess([path], tmp_path / "run")
    with server:
        result = client.persistent_disk_dangling(server.control, "vol", reason="container-deleted")
        assert result["state"] == "dangling"
    return path, before, server


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("layout", "which", "where"),
    [
        ("as-written", "newest", "reason"),
        ("as-written", "other", "reason"),
        # The other copy still holds the record from before the flip: a volume flipped by a
        # build that wrote one copy per update, or a crash between the two writes.
        ("one-copy", "newest", "reason"),
        ("one-copy", "newest", "state"),
        ("one-copy", "other", "reason"),
    ],
)
def test_damaged_copy_after_a_flip_is_served_dangling(tmp_path: Path, layout: str, which: str,
                                                       where: str) -> None:
    path, before, server = _flipped_volume(tmp_path)
    newest = choose_slot(_slots(path))[0]
    if layout == "one-copy":
        _pwrite(path, before[1 - newest], SLOT_OFFSETS[1 - newest])
    target = newest if which == "newest" else 1 - newest
    _flip_bit(path, SLOT_OFFSETS[target] + (STATE_FIELD_OFFSET if where == "state" else REASON_OFFSET))
    forced = layout == "one-copy" and which == "newest"

    with server:
        entry = volume_entry(server.control, "vol")
        assert entry["header"]["state"] == "dangling"
        kinds = alert_kinds(server.control, "vol")
        alerts = [a for a in client.alerts(server.control) if a["volume"] == "vol"]
        if forced:
            assert entry["header"]["reason"] == DAMAGED_REASON
            (alert,) = [a for a in alerts if a["kind"] == "header-damaged"]
            assert alert["severity"] == "critical"
            assert f"copy {target} is damaged" in alert["message"], alert
        else:
            assert entry["header"]["reason"] == "container-deleted"
            assert "header-repaired" in kinds
        # Both copies were rewritten to the served state: one more damaged copy cannot undo it.
        slots = _slots(path)
        assert slots[0] == slots[1]
        assert decode_slot(slots[0]).dangling

        # A frontend never reaches the data region: its writes go to the ring (or, where the
        # daemon refuses frontends on dangling volumes, it is refused).
        data_before = _data(path)
        records = entry["ring"]["records"]
        try:
            guest = Guest(server.socket_for(path), timeout=5.0)
        except (FrontendError, OSError):
            wait_until(lambda: "is dangling" in server.log(), 5.0, "refusal logged", server.log)
        else:
            try:
                guest.write(0, pattern(4096, 3))
            finally:
                guest.close()
            wait_until(lambda: volume_entry(server.control, "vol")["ring"]["records"] > records,
                       5.0, "the write quarantined", server.log)
        assert _data(path) == data_before
    assert read_header(path).dangling


def _data(path: Path) -> bytes:
    header = read_header(path)
    with open(path, "rb") as f:
        return os.pread(f.fileno(), 64 * 1024, header.data_offset)


@pytest.mark.timeout(60)
def test_inspect_reports_copies_that_disagree(tmp_path: Path) -> None:
    path, before, _ = _flipped_volume(tmp_path)
    newest = choose_slot(_slots(path))[0]
    _pwrite(path, before[1 - newest], SLOT_OFFSETS[1 - newest])
    _flip_bit(path, SLOT_OFFSETS[newest] + REASON_OFFSET)
    result = run_cli("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["state"] == "dangling" and info["reason"] == DAMAGED_REASON
    assert "checksum mismatch" in info["header_copies"][newest]
    assert info["header_copies"][1 - newest] == "valid"
    assert "header copies disagree" in result.stderr and "served dangling" in result.stderr
    # inspect only reads: the copies are still as they were.
    with pytest.raises(HeaderError):
        decode_slot(_slots(path)[newest])


def _damage(path: Path, kind: str) -> None:
    header = read_header(path)
    if kind == "bad-header":
        for offset in SLOT_OFFSETS:
            _flip_bit(path, offset + REASON_OFFSET)
    elif kind == "bad-ring":
        _pwrite(path, b"\xff" * 16, header.ring_offset + 40)
    elif kind == "truncated":
        os.truncate(path, header.ring_offset)
    elif kind == "missing":
        path.unlink()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["bad-header", "bad-ring", "truncated", "missing"])
def test_one_damaged_volume_does_not_stop_the_others(tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good.img"
    bad = tmp_path / "bad.img"
    for path in (good, bad):
        create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB))
    _damage(bad, kind)
    # The damaged volume first on the command line (through extra_args, which come before
    # the volumes): ServerProcess waits for the sockets of the volumes it was given only.
    with ServerProcess([good], tmp_path / "run", extra_args=[str(bad)]) as server:
        status = client.status(server.control)
        assert [v["name"] for v in status["volumes"]] == ["good"]
        (failure,) = status["failed"]
        assert failure["path"] == str(bad) and failure["error"]
        assert "volume-failed" in alert_kinds(server.control, "bad")
        guest = Guest(server.socket_for(good))
        try:
            guest.round_trip(0, pattern(4096, 5))
        finally:
            guest.close()
        assert not server.socket_for(bad).exists()


def _old_build_slot(header: VolumeHeader) -> bytes:
    """A slot as a build that wrote one copy per update wrote it: no FLAG_BOTH_COPIES."""
    raw = bytearray(encode_slot(header))
    flags = struct.unpack_from("<I", raw, FLAGS_OFFSET)[0] & ~FLAG_BOTH_COPIES
    struct.pack_into("<I", raw, FLAGS_OFFSET, flags)
    body = HeaderSlot.sizeof() - 4
    struct.pack_into("<I", raw, body, zlib.crc32(bytes(raw[:body])))
    return bytes(raw)


@pytest.mark.timeout(60)
def test_old_build_history_is_served_attached_without_alarm(tmp_path: Path) -> None:
    """Upgrade: copies as a build that wrote one copy per update left them after a flip and
    a clear (newer attached, older dangling, neither flagged) are served attached: the VM
    keeps its data, no header alert, both copies rewritten with FLAG_BOTH_COPIES."""
    path = tmp_path / "vol.img"
    header = create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner="c1"))
    dangling = dataclasses.replace(header, generation=2, state=VolumeState.DANGLING,
                                   dangling_since_ns=5, reason="container-deleted")
    cleared = dataclasses.replace(dangling, generation=3, state=VolumeState.ATTACHED,
                                  dangling_since_ns=0, reason="")
    _pwrite(path, _old_build_slot(cleared), SLOT_OFFSETS[0])
    _pwrite(path, _old_build_slot(dangling), SLOT_OFFSETS[1])
    with ServerProcess([path], tmp_path / "run") as server:
        assert volume_entry(server.control, "vol")["header"]["state"] == "attached"
        assert alert_kinds(server.control, "vol") == []
        guest = Guest(server.socket_for(path), timeout=5.0)
        try:
            guest.round_trip(0, pattern(4096, 9))
        finally:
            guest.close()
        assert "older build" in server.log()
    slots = _slots(path)
    assert slots[0] == slots[1] == encode_slot(cleared)
    assert _data(path)[:4096] == pattern(4096, 9)
