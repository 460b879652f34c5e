"""The served set's file (vhost_pv/service/served_set.py): what it reads and writes, how it
refuses a damaged file, that a write is atomic (the old file or the new, never a mix, no temp
left behind), and one daemon per state directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vhost_pv._native import lib
from vhost_pv.service.options import MAX_QUEUES, VolumeOptions
from vhost_pv.service.served_set import ServedEntry, ServedSet, StateDirBusy, StateFileError

FAST = VolumeOptions(queues=4, read_only=False, direct=True)
RO = VolumeOptions(queues=1, read_only=True, direct=False)


def test_max_queues_is_the_data_paths() -> None:
    assert MAX_QUEUES == lib.VPV_MAX_QUEUES


def test_round_trip_in_order_with_options(tmp_path: Path) -> None:
    state = ServedSet.open(tmp_path / "state")
    try:
        assert state.entries() == []
        assert not state.path.exists()  # nothing written until asked
        state.put(Path("/v/b.img"), FAST)
        state.put(Path("/v/a.img"), RO)
        state.save()
    finally:
        state.close()
    document = json.loads((tmp_path / "state" / "served.json").read_text())
    assert document == {"version": 1, "volumes": [
        {"path": "/v/b.img", "options": {"queues": 4, "read_only": False, "direct": True}},
        {"path": "/v/a.img", "options": {"queues": 1, "read_only": True, "direct": False}},
    ]}
    again = ServedSet.open(tmp_path / "state")
    try:
        assert again.entries() == [ServedEntry(Path("/v/b.img"), FAST), ServedEntry(Path("/v/a.img"), RO)]
        assert again.discard(Path("/v/b.img")) and not again.discard(Path("/v/b.img"))
        again.save()
    finally:
        again.close()
    assert [e.path for e in ServedSet.open(tmp_path / "state").entries()] == [Path("/v/a.img")]


def test_paths_are_kept_absolute_with_symlinks_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.img").touch()
    (tmp_path / "link.img").symlink_to(tmp_path / "real.img")
    state = ServedSet(tmp_path)
    state.put(Path("link.img"), RO)
    assert state.entries() == [ServedEntry(tmp_path / "link.img", RO)]
    assert state.get(tmp_path / "link.img") == RO


def test_the_state_directory_is_private(tmp_path: Path) -> None:
    state = ServedSet.open(tmp_path / "new" / "state")
    state.close()
    assert (tmp_path / "new" / "state").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(("content", "why"), [
    (b"", "not JSON"),
    (b'{"version": 1, "volumes": [{"pa', "not JSON"),  # truncated
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"volumes": []}', "version None"),
    (b'{"version": 2, "volumes": []}', "version 2, this build reads version 1"),
    (b'{"version": 1}', "no list of volumes"),
    (b'{"version": 1, "volumes": [{}]}', "volume #0 has no path"),
    (b'{"version": 1, "volumes": [{"path": "v.img", "options": {}}]}', "not an absolute path"),
    (b'{"version": 1, "volumes": [{"path": "/v.img"}]}', "options must be an object"),
    (b'{"version": 1, "volumes": [{"path": "/v.img", "options": {"queues": 1}}]}', "exactly the keys"),
    (b'{"version": 1, "volumes": [{"path": "/v.img", "options": '
     b'{"queues": 0, "read_only": false, "direct": false}}]}', "queues 0 is out of range 1..16"),
    (b'{"version": 1, "volumes": [{"path": "/v.img", "options": '
     b'{"queues": 1, "read_only": "yes", "direct": false}}]}', "read_only 'yes' is not true or false"),
    (b'{"version": 1, "volumes": [{"path": "/v.img", "options": '
     b'{"queues": true, "read_only": false, "direct": false}}]}', "queues True is out of range"),
])
def test_a_damaged_file_is_refused_with_the_reason(tmp_path: Path, content: bytes, why: str) -> None:
    (tmp_path / "served.json").write_bytes(content)
    with pytest.raises(StateFileError) as caught:
        ServedSet.open(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'served.json'}: not a usable served-volume state (")
    assert why in message and "move it away" in message
    assert (tmp_path / "served.json").read_bytes() == content  # left for the admin to look at
    # The failed open released the directory: a fixed file opens at once.
    (tmp_path / "served.json").write_bytes(b'{"version": 1, "volumes": []}')
    ServedSet.open(tmp_path).close()


def test_a_path_listed_twice_is_refused(tmp_path: Path) -> None:
    entry = {"path": "/v.img", "options": RO.to_dict()}
    (tmp_path / "served.json").write_text(json.dumps({"version": 1, "volumes": [entry, entry]}))
    with pytest.raises(StateFileError, match="/v.img is listed twice"):
        ServedSet.open(tmp_path)


def test_a_write_is_atomic_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = ServedSet.open(tmp_path)
    try:
        state.put(Path("/v/a.img"), RO)
        state.save()
        before = state.path.read_bytes()
        synced: list[int] = []
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", counting_fsync)

        # A write that fails before the rename (here: the rename itself) leaves the old file
        # whole and no temp file.
        def no_rename(src: object, dst: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "rename", no_rename)
        state.put(Path("/v/b.img"), FAST)
        with pytest.raises(OSError, match="No space left"):
            state.save()
        assert state.path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["served.json", "served.lock"]
        assert len(synced) == 1  # the temp file was synced before the rename was tried

        monkeypatch.undo()
        synced.clear()
        monkeypatch.setattr(os, "fsync", counting_fsync)
        state.save()
        # The file, then the directory (the rename is durable only once it is).
        assert len(synced) == 2
        assert json.loads(state.path.read_text())["volumes"][1]["path"] == "/v/b.img"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["served.json", "served.lock"]
    finally:
        state.close()


def test_a_temp_left_by_a_crash_is_not_the_state(tmp_path: Path) -> None:
    (tmp_path / "served.json").write_text(json.dumps(
        {"version": 1, "volumes": [{"path": "/v/a.img", "options": RO.to_dict()}]}))
    (tmp_path / "served.json.tmp").write_bytes(b'{"version": 1, "volumes": [{"path": "/v/b')
    state = ServedSet.open(tmp_path)
    try:
        assert [e.path for e in state.entries()] == [Path("/v/a.img")]
        assert not (tmp_path / "served.json.tmp").exists()
    finally:
        state.close()


def test_one_daemon_per_state_directory(tmp_path: Path) -> None:
    first = ServedSet.open(tmp_path)
    try:
        with pytest.raises(StateDirBusy, match=f"in use by another vhost-pv daemon \\(pid {os.getpid()}\\)"):
            ServedSet.open(tmp_path)
    finally:
        first.close()
    ServedSet.open(tmp_path).close()  # released with the first


def test_options_describe_and_round_trip() -> None:
    assert FAST.describe() == "4 queues, O_DIRECT"
    assert RO.describe() == "1 queue, read-only"
    assert VolumeOptions.from_dict(FAST.to_dict()) == FAST
    with pytest.raises(ValueError, match="out of range 1..16"):
        VolumeOptions(queues=17).validate()
