"""Volume files: creation, header validation, refusal of bad files, crash-safe header updates."""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import uuid
import zlib
from pathlib import Path

import pytest

from vhost_pv.volume.header import (
    DAMAGED_REASON,
    DATA_OFFSET,
    FLAG_BOTH_COPIES,
    SLOT_OFFSETS,
    SLOT_SIZE,
    STATE_FIELD_OFFSET,
    STATE_WORD_OFFSET,
    HeaderBodyV1,
    HeaderBodyV2,
    HeaderError,
    HeaderSlot,
    VolumeHeader,
    VolumeState,
    choose_slot,
    encode_slot,
    resolve_slots,
)
from vhost_pv.volume.ring import RingError
from vhost_pv.volume.volume import (
    DEFAULT_RING_SIZE,
    CreateOptions,
    Volume,
    create_volume,
    parse_size,
    read_header,
)

MiB = 1 << 20


def _create(
    tmp_path: Path, *, size: int = 4 * MiB, ring_size: int = MiB, owner: str = ""
) -> tuple[Path, VolumeHeader]:
    path = tmp_path / "vol.img"
    return path, create_volume(path, CreateOptions(size=size, ring_size=ring_size, owner=owner))


def _pread(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def _state_word(path: Path) -> int:
    value: int = struct.unpack("<I", _pread(path, 4, STATE_WORD_OFFSET))[0]
    return value


# -- create / read ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_create_defaults(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    created = create_volume(path, CreateOptions(size=8 * MiB, owner="container-1"))
    header = read_header(path)
    assert header == created
    assert header.capacity == 8 * MiB
    assert header.data_offset == DATA_OFFSET == MiB
    assert header.ring_offset == DATA_OFFSET + 8 * MiB
    assert header.ring_size == DEFAULT_RING_SIZE == 16 * MiB
    assert header.state is VolumeState.ATTACHED
    assert not header.dangling
    assert header.owner == "container-1"
    assert header.generation == 1
    assert header.allowed_uids == (0,)
    assert header.reason == ""
    assert path.stat().st_size == header.data_offset + header.capacity + header.ring_size
    assert _state_word(path) == VolumeState.ATTACHED
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    # Both slots hold the same record.
    assert _pread(path, SLOT_SIZE, 0) == _pread(path, SLOT_SIZE, SLOT_SIZE)


@pytest.mark.timeout(60)
def test_create_custom_ring(tmp_path: Path) -> None:
    path, header = _create(tmp_path, size=64 * MiB, ring_size=2 * MiB, owner="abc")
    assert read_header(path) == header
    assert header.ring_size == 2 * MiB
    assert path.stat().st_size == MiB + 64 * MiB + 2 * MiB


@pytest.mark.timeout(60)
def test_create_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    path.write_bytes(b"precious data")
    with pytest.raises(FileExistsError):
        create_volume(path, CreateOptions(size=4 * MiB))
    assert path.read_bytes() == b"precious data"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("size", "ring"), [(0, MiB), (1000, MiB), (4 * MiB, MiB // 2), (4 * MiB, MiB + 1)])
def test_create_refuses_bad_sizes(tmp_path: Path, size: int, ring: int) -> None:
    path = tmp_path / "vol.img"
    with pytest.raises(ValueError):
        create_volume(path, CreateOptions(size=size, ring_size=ring))
    assert not path.exists()


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_refuses_zero_file(tmp_path: Path) -> None:
    path = tmp_path / "zeros.img"
    path.write_bytes(bytes(2 * MiB))
    with pytest.raises(HeaderError, match="magic"):
        read_header(path)


@pytest.mark.timeout(60)
def test_refuses_random_file(tmp_path: Path) -> None:
    path = tmp_path / "random.img"
    path.write_bytes(os.urandom(2 * MiB))
    with pytest.raises(HeaderError, match="magic"):
        read_header(path)


@pytest.mark.timeout(60)
def test_refuses_short_file(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"hello")
    with pytest.raises(HeaderError, match="truncated"):
        read_header(path)


@pytest.mark.timeout(60)
def test_refuses_unsupported_version(tmp_path: Path) -> None:
    path, _ = _create(tmp_path)
    for offset in SLOT_OFFSETS:
        _pwrite(path, struct.pack("<H", 4), offset + 8)
    with pytest.raises(HeaderError, match="unsupported format version 4"):
        read_header(path)
    with pytest.raises(HeaderError, match="version"):
        Volume(path)


@pytest.mark.timeout(60)
def test_version_1_volume_reads_and_upgrades_on_update(tmp_path: Path) -> None:
    # Both slots rewritten as a volume from before the owner binding (392-byte body).
    path, created = _create(tmp_path, owner="old-owner")
    v1 = older_slot(created, 1)
    for offset in SLOT_OFFSETS:
        _pwrite(path, v1, offset)
    assert read_header(path) == created
    with Volume(path) as volume:
        volume.update(owner="full-id", owner_name="web", owner_pid=42, owner_pid_start=7)
    with open(path, "rb") as f:
        versions = {struct.unpack("<H", os.pread(f.fileno(), 2, o + 8))[0] for o in SLOT_OFFSETS}
    assert versions == {3}  # an update rewrites both copies, in the new format
    header = read_header(path)
    assert (header.owner, header.owner_name, header.owner_pid, header.owner_pid_start) == (
        "full-id", "web", 42, 7)


@pytest.mark.timeout(60)
def test_refuses_both_slots_corrupt(tmp_path: Path) -> None:
    path, _ = _create(tmp_path)
    for offset in SLOT_OFFSETS:
        byte = _pread(path, 1, offset + 60)
        _pwrite(path, bytes([byte[0] ^ 0x40]), offset + 60)
    with pytest.raises(HeaderError, match="no valid header") as info:
        read_header(path)
    message = str(info.value)
    assert "copy 0" in message and "copy 1" in message and "checksum" in message


@pytest.mark.timeout(60)
def test_refuses_truncated_volume(tmp_path: Path) -> None:
    path, header = _create(tmp_path)
    os.truncate(path, header.ring_offset + header.ring_size - 512)
    with pytest.raises(HeaderError, match="truncated"):
        read_header(path)
    with pytest.raises(HeaderError, match="truncated"):
        Volume(path)


@pytest.mark.timeout(60)
def test_refuses_overlapping_geometry(tmp_path: Path) -> None:
    path, header = _create(tmp_path)
    bad = dataclasses.replace(header, ring_offset=header.ring_offset - 4096, generation=5)
    slot = encode_slot(bad)
    for offset in SLOT_OFFSETS:
        _pwrite(path, slot, offset)
    with pytest.raises(HeaderError, match="overlaps the data region"):
        read_header(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("corrupt", [0, 1])
def test_one_corrupt_slot_uses_the_other(tmp_path: Path, corrupt: int) -> None:
    path, header = _create(tmp_path, owner="abc")
    _pwrite(path, b"\xff" * 16, SLOT_OFFSETS[corrupt] + 100)
    assert read_header(path) == header
    with Volume(path) as volume:
        assert volume.header == header


@pytest.mark.timeout(60)
def test_newer_slot_wins_and_damage_falls_back(tmp_path: Path) -> None:
    path, header = _create(tmp_path)
    with Volume(path) as volume:
        new = volume.update(owner="second")
    assert new.generation == 2
    assert read_header(path) == new
    # An update leaves both copies holding generation 2: damaging the one the reader picks
    # falls back to the other, which holds the same state (before both copies were written,
    # this read generation 1 back: one damaged copy undid the update).
    slots = [_pread(path, SLOT_SIZE, offset) for offset in SLOT_OFFSETS]
    assert slots[0] == slots[1]
    index, chosen = choose_slot(slots)
    assert chosen == new
    _pwrite(path, b"\xff" * 8, SLOT_OFFSETS[index] + 20)
    assert read_header(path) == new


# -- updates and the live state word ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_update_persists_and_publishes_state(tmp_path: Path) -> None:
    path, header = _create(tmp_path)
    with Volume(path) as volume:
        dangling = volume.update(state=VolumeState.DANGLING, dangling_since_ns=123, reason="gone")
        assert volume.header == dangling
        assert dangling.generation == header.generation + 1
        assert _state_word(path) == VolumeState.DANGLING
        assert read_header(path) == dangling
        attached = volume.update(state=VolumeState.ATTACHED, reason="")
        assert attached.generation == header.generation + 2
        assert _state_word(path) == VolumeState.ATTACHED
        assert read_header(path) == attached
    with Volume(path) as volume:
        assert volume.header == attached


@pytest.mark.timeout(60)
def test_open_rewrites_stale_state_word(tmp_path: Path) -> None:
    path, _ = _create(tmp_path)
    _pwrite(path, struct.pack("<I", 0xDEADBEEF), STATE_WORD_OFFSET)
    with Volume(path) as volume:
        assert _state_word(path) == VolumeState.ATTACHED
        volume.update(state=VolumeState.DANGLING)
    _pwrite(path, struct.pack("<I", VolumeState.ATTACHED), STATE_WORD_OFFSET)
    with Volume(path):
        assert _state_word(path) == VolumeState.DANGLING


@pytest.mark.timeout(60)
def test_damaged_ring_superblock_is_refused(tmp_path: Path) -> None:
    path, header = _create(tmp_path)
    _pwrite(path, b"\xff" * 16, header.ring_offset + 40)
    with pytest.raises(RingError, match="quarantine ring superblock"):
        Volume(path)


def older_slot(header: VolumeHeader, version: int) -> bytes:
    """The slot an older build wrote for header: the body of that version, its CRC."""
    size = {1: HeaderBodyV1.sizeof(), 2: HeaderBodyV2.sizeof()}[version]
    body = bytearray(encode_slot(header)[:size])
    body[8:10] = struct.pack("<H", version)
    return (bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))).ljust(SLOT_SIZE, b"\0")


# -- crash safety: a torn slot write at every byte ---------------------------------------------


def _acceptable(got: VolumeHeader, old: VolumeHeader, new: VolumeHeader) -> str:
    """Which outcome a read after a crash gave: the old or new record, or the conservative
    one (served dangling because the copies disagree); anything else fails the test."""
    if got == old:
        return "old"
    if got == new:
        return "new"
    # Only when a dangling state was in play, and with the rest of a real record.
    if got.dangling and got.reason == DAMAGED_REASON and (old.dangling or new.dangling) and any(
        dataclasses.replace(got, state=h.state, reason=h.reason, dangling_source=h.dangling_source,
                            dangling_since_ns=h.dangling_since_ns) == h for h in (old, new)
    ):
        return "dangling"
    pytest.fail(f"a header that is neither old, new nor conservatively dangling: {got}")


def _torn_write_check(path: Path, volume: Volume, **changes: object) -> VolumeHeader:
    """Run volume.update(**changes), then replay each of its two slot writes torn after k
    bytes for every k (the other copy as it was at that moment)."""
    before = [_pread(path, SLOT_SIZE, offset) for offset in SLOT_OFFSETS]
    old = read_header(path)
    new = volume.update(**changes)
    after = [_pread(path, SLOT_SIZE, offset) for offset in SLOT_OFFSETS]
    # update writes both slots, first the one the reader did not choose (the older one).
    assert after[0] == after[1] == encode_slot(new)
    first = 1 - choose_slot(before)[0]

    outcomes = {"old": 0, "new": 0, "dangling": 0}
    fd = os.open(path, os.O_RDWR)
    try:
        for phase, target in ((1, first), (2, 1 - first)):
            other = before[1 - target] if phase == 1 else after[1 - target]
            os.pwrite(fd, other, SLOT_OFFSETS[1 - target])
            for k in range(SLOT_SIZE + 1):
                torn = after[target][:k] + before[target][k:]
                os.pwrite(fd, torn, SLOT_OFFSETS[target])
                got = read_header(path)  # must never raise
                outcome = _acceptable(got, old, new)
                outcomes[outcome] += 1
                if phase == 1 and k == 0:
                    assert got == old
                if phase == 2 and k == SLOT_SIZE:
                    assert got == new
                # A dangling state on disk is never read back as attached: while the first
                # write is incomplete the old copy is intact; from then on the new one is.
                if old.dangling and phase == 1 and k < SLOT_SIZE:
                    assert got.dangling, (phase, k)
                if new.dangling and phase == 2:
                    assert got.dangling, (phase, k)
    finally:
        # Leave the completed writes in place, as update did.
        for index, offset in enumerate(SLOT_OFFSETS):
            os.pwrite(fd, after[index], offset)
        os.close(fd)
    # Once the second write has its whole record (body + CRC) in place, the new header is read.
    record = HeaderSlot.sizeof()
    assert outcomes["new"] >= SLOT_SIZE - record
    # An interrupted clear (dangling -> attached) is read conservatively as dangling.
    if old.dangling and not new.dangling:
        assert outcomes["dangling"] >= SLOT_SIZE - record
    return new


@pytest.mark.timeout(60)
def test_torn_update_every_byte(tmp_path: Path) -> None:
    # Non-ASCII text in the changed fields: a tear inside a multi-byte character must be
    # detected as damage, not crash the reader.
    path, _ = _create(tmp_path, owner="owner-é")
    with Volume(path) as volume:
        first = _torn_write_check(
            path, volume, state=VolumeState.DANGLING, dangling_since_ns=1_700_000_000_000_000_000,
            reason="container gone ✓",
        )
        assert first.dangling
        # The next update goes to the other slot; check that one as well.
        second = _torn_write_check(path, volume, state=VolumeState.ATTACHED, reason="", owner="ü-new")
        assert not second.dangling
        assert _state_word(path) == VolumeState.ATTACHED
    assert read_header(path) == second


@pytest.mark.timeout(120)
def test_upgrade_to_version_3_torn_at_every_byte(tmp_path: Path) -> None:
    """The first update of a version 2 volume writes version 3 records (the VM binding
    appended): a crash at any byte of either write reads the old record, the new one, or
    (with a dangling state in play) conservatively dangling; never an error. The old
    copies carry FLAG_BOTH_COPIES (written by the two-copy writer), as the build before this
    one wrote them. (Version 1 bodies are shorter still: the same CRC argument holds.)"""
    version = 2
    path, created = _create(tmp_path, owner="pre-v3")
    for offset in SLOT_OFFSETS:
        _pwrite(path, older_slot(created, version), offset)
    assert read_header(path) == created and not created.vm_bound
    with Volume(path) as volume:
        bound = _torn_write_check(
            path, volume, vm_uuid=uuid.UUID("6b9c1a2e-0000-4000-8000-0000000000a7"), vm_name="vm7",
            vm_cgroup="/machine.slice/machine-qemu\\x2d1\\x2dvm7.scope")
        # A flip of a volume whose other copy is still the old version: the same guarantees.
        for offset in SLOT_OFFSETS[:1]:
            _pwrite(path, older_slot(bound, version), offset)
        flipped = _torn_write_check(path, volume, state=VolumeState.DANGLING, reason="gone",
                                    dangling_since_ns=5)
    assert flipped.vm_name == "vm7" and flipped.dangling
    assert read_header(path) == flipped


@pytest.mark.timeout(60)
def test_torn_slot_decode_via_choose_slot(tmp_path: Path) -> None:
    """The same property without the filesystem, on in-memory slot images."""
    path, header = _create(tmp_path)
    old_slot = encode_slot(header)
    new = dataclasses.replace(header, generation=2, state=VolumeState.DANGLING, reason="ß" * 20)
    new_slot = encode_slot(new)
    for target in (0, 1):
        for k in range(SLOT_SIZE + 1):
            slots = [old_slot, old_slot]
            slots[target] = new_slot[:k] + old_slot[k:]
            _, got = choose_slot(slots)
            assert got in (header, new), k


# -- one damaged copy never undoes a flip ----------------------------------------------------


def _flip_every_bit(slot: bytes) -> list[bytes]:
    record = HeaderSlot.sizeof()
    return [slot[:i // 8] + bytes([slot[i // 8] ^ (1 << i % 8)]) + slot[i // 8 + 1:]
            for i in range(record * 8)]


def old_build_slot(header: VolumeHeader) -> bytes:
    """A slot as a build that wrote one copy per update wrote it: no FLAG_BOTH_COPIES."""
    raw = bytearray(encode_slot(header))
    flags = struct.unpack_from("<I", raw, 12)[0] & ~FLAG_BOTH_COPIES
    struct.pack_into("<I", raw, 12, flags)
    body = HeaderSlot.sizeof() - 4
    struct.pack_into("<I", raw, body, zlib.crc32(bytes(raw[:body])))
    return bytes(raw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["both-copies", "one-copy", "old-build"])
def test_no_single_bit_flip_in_one_copy_reads_attached_after_a_flip(tmp_path: Path, layout: str) -> None:
    """After a flip to dangling, a bit flipped anywhere in either copy's record still reads
    dangling: with both copies written (this build), with the older copy still attached (a
    crash between the two writes), and as a build that wrote one copy per update left it
    (older copy attached, neither with FLAG_BOTH_COPIES)."""
    _, header = _create(tmp_path)
    dangling = dataclasses.replace(header, generation=2, state=VolumeState.DANGLING,
                                   dangling_since_ns=123, reason="container-deleted")
    if layout == "old-build":
        slots = [old_build_slot(dangling), old_build_slot(header)]
    else:
        slots = [encode_slot(dangling), encode_slot(dangling if layout == "both-copies" else header)]
    for target in (0, 1):
        for damaged in _flip_every_bit(slots[target]):
            copies = list(slots)
            copies[target] = damaged
            try:
                resolution = resolve_slots(copies)
            except HeaderError:
                pytest.fail("one damaged copy made the volume unreadable")
            assert resolution.header.dangling, (target, resolution.disagreement)


@pytest.mark.timeout(60)
def test_interrupted_clear_reads_dangling(tmp_path: Path) -> None:
    _, header = _create(tmp_path)
    dangling = dataclasses.replace(header, generation=2, state=VolumeState.DANGLING, reason="gone")
    cleared = dataclasses.replace(dangling, generation=3, state=VolumeState.ATTACHED, reason="")
    resolution = resolve_slots([encode_slot(cleared), encode_slot(dangling)])
    assert resolution.forced and resolution.header.dangling
    assert resolution.header.reason == DAMAGED_REASON
    assert resolution.disagreement == ("copy 0 (generation 3) says attached, "
                                       "copy 1 (generation 2) says dangling")
    # The newer copy dangling and the older attached is an ordinary (interrupted) flip.
    plain = resolve_slots([encode_slot(header), encode_slot(dangling)])
    assert not plain.forced and plain.header == dangling and plain.disagreement


def _old_build_history(header: VolumeHeader) -> tuple[VolumeHeader, VolumeHeader, list[bytes]]:
    """The copies a build that wrote one copy per update left after create (both slots,
    generation 1), a flip (the older slot: 1) and a clear (the older slot: 0)."""
    dangling = dataclasses.replace(header, generation=2, state=VolumeState.DANGLING,
                                   dangling_since_ns=5, reason="container-deleted")
    cleared = dataclasses.replace(dangling, generation=3, state=VolumeState.ATTACHED,
                                  dangling_since_ns=0, reason="")
    return dangling, cleared, [old_build_slot(cleared), old_build_slot(dangling)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("newer", [0, 1])
def test_old_build_history_after_a_clear_is_served_attached(
    tmp_path: Path, newer: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrade: the older copy of an old-format volume says dangling because the last update
    was a clear. It is history, not an interrupted clear: served attached, no alarm, both
    copies rewritten with the flag (so later differences are read conservatively)."""
    path, header = _create(tmp_path)
    _, cleared, slots = _old_build_history(header)
    if newer == 1:
        slots.reverse()
    for offset, raw in zip(SLOT_OFFSETS, slots, strict=True):
        _pwrite(path, raw, offset)
    resolution = resolve_slots(slots)
    assert not resolution.forced and resolution.consistent and resolution.header == cleared
    assert resolution.history == (f"copy {newer} (generation 3) says attached, copy {1 - newer} "
                                  f"(generation 2) says dangling; copy {1 - newer} predates the "
                                  "two-copy header format")
    assert read_header(path) == cleared
    with caplog.at_level(logging.INFO, logger="vhost_pv.volume.volume"), Volume(path) as volume:
        assert volume.header == cleared and not volume.header.dangling
        assert _state_word(path) == VolumeState.ATTACHED
    (record,) = [r for r in caplog.records if "older build" in r.getMessage()]
    assert record.levelno == logging.INFO
    after = [_pread(path, SLOT_SIZE, offset) for offset in SLOT_OFFSETS]
    assert after[0] == after[1] == encode_slot(cleared)
    # From now on the copies carry the flag: an interrupted clear is conservative again.
    dangling = dataclasses.replace(cleared, generation=4, state=VolumeState.DANGLING, reason="x")
    again = dataclasses.replace(dangling, generation=5, state=VolumeState.ATTACHED, reason="")
    assert resolve_slots([encode_slot(again), encode_slot(dangling)]).forced


@pytest.mark.timeout(60)
def test_one_copy_without_the_flag_is_history(tmp_path: Path) -> None:
    """Either copy without the flag: the pair was not written by the two-copy writer alone
    (the first update after an upgrade cut between its writes; a downgrade's single-copy
    update): the newer copy is served as it is."""
    _, header = _create(tmp_path)
    dangling, cleared, _ = _old_build_history(header)
    for slots in ([encode_slot(cleared), old_build_slot(dangling)],
                  [old_build_slot(cleared), encode_slot(dangling)]):
        resolution = resolve_slots(slots)
        assert resolution.header == cleared and not resolution.forced and resolution.history
    # A damaged copy's flag is not trusted: one damaged old-format copy reading dangling
    # is still served dangling.
    damaged = bytearray(old_build_slot(dangling))
    damaged[200] ^= 1
    resolution = resolve_slots([old_build_slot(cleared), bytes(damaged)])
    assert resolution.forced and resolution.header.dangling


@pytest.mark.timeout(60)
def test_upgrade_repair_torn_at_every_byte(tmp_path: Path) -> None:
    """The first open of an old-format volume rewrites both copies (older slot first). A
    crash at any byte of either write reads the served record, or (a tear that leaves the
    older copy's dangling state field in place) conservatively dangling; never an error."""
    path, header = _create(tmp_path)
    _, cleared, before = _old_build_history(header)
    for offset, raw in zip(SLOT_OFFSETS, before, strict=True):
        _pwrite(path, raw, offset)
    with Volume(path):
        pass
    after = [_pread(path, SLOT_SIZE, offset) for offset in SLOT_OFFSETS]
    outcomes = {"served": 0, "dangling": 0}
    first = 1  # the older slot: copy 0 holds the newer record
    for phase, target in ((1, first), (2, 1 - first)):
        slots = list(before if phase == 1 else after)
        for k in range(SLOT_SIZE + 1):
            slots[target] = after[target][:k] + before[target][k:]
            got = resolve_slots(slots).header
            if got == cleared:
                outcomes["served"] += 1
                continue
            assert phase == 1 and k <= STATE_FIELD_OFFSET + 3, (phase, k)
            assert got.dangling and got.reason == DAMAGED_REASON
            outcomes["dangling"] += 1
    assert outcomes["dangling"] <= STATE_FIELD_OFFSET + 4


@pytest.mark.timeout(60)
def test_open_repairs_the_copies(tmp_path: Path) -> None:
    path, header = _create(tmp_path)
    dangling = dataclasses.replace(header, generation=2, state=VolumeState.DANGLING,
                                   dangling_since_ns=5, reason="gone")
    # Newest copy damaged, older attached: served dangling at a new generation, both copies.
    _pwrite(path, encode_slot(dangling)[:100] + b"\xff" + encode_slot(dangling)[101:], SLOT_OFFSETS[0])
    _pwrite(path, encode_slot(header), SLOT_OFFSETS[1])
    assert read_header(path).dangling  # read only: nothing is written
    assert _pread(path, SLOT_SIZE, SLOT_OFFSETS[1]) == encode_slot(header)
    with Volume(path) as volume:
        assert volume.resolution.forced
        repaired = volume.header
        assert repaired.dangling and repaired.reason == DAMAGED_REASON and repaired.generation == 2
        assert repaired.dangling_since_ns > 0
        assert _state_word(path) == VolumeState.DANGLING
    slots = [_pread(path, SLOT_SIZE, offset) for offset in SLOT_OFFSETS]
    assert slots[0] == slots[1] == encode_slot(repaired)
    # One copy damaged, both said the same: the damaged one is rewritten from the other.
    _pwrite(path, b"\xff" * 8, SLOT_OFFSETS[1] + 200)
    with Volume(path) as volume:
        assert not volume.resolution.forced and volume.header == repaired
    assert _pread(path, SLOT_SIZE, SLOT_OFFSETS[1]) == encode_slot(repaired)


# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4k", 4096),
        ("4K", 4096),
        ("1M", MiB),
        ("64M", 64 * MiB),
        ("1GiB", 1 << 30),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("512", 512),
        ("16MiB", 16 * MiB),
        (" 8 m ", 8 * MiB),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", ["", "abc", "1.5G", "-1", "10X", "1P", "M", "1 GiBs", "0x100"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
