"""Settings changes (vhost_pv/volume/settings.py): the ranges `vhost-pv create` accepts, what
a change writes, and the offline update on a file: crash-safe (a torn write of either header
copy at any byte reads the old settings or the new, never a mix) and refused while the file
is locked by a daemon."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from vhost_pv.cli import argtypes
from vhost_pv.sockfile import AlreadyServed, lock_volume
from vhost_pv.volume import settings
from vhost_pv.volume.header import (
    SLOT_OFFSETS,
    SLOT_SIZE,
    ReadPolicy,
    RingFullPolicy,
    TtlAction,
    VolumeState,
    choose_slot,
)
from vhost_pv.volume.settings import (
    NO_OWNER,
    SettingsChange,
    SettingsError,
    SettingsRefused,
    apply_offline,
    owner_change,
    plan,
)
from vhost_pv.volume.volume import CreateOptions, Volume, create_volume, read_header

MiB = 1 << 20


def _volume(tmp_path: Path, **options: Any) -> Path:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, **options))
    return path


@pytest.mark.timeout(60)
def test_limits_are_those_of_create() -> None:
    assert settings.MAX_TTL == argtypes.MAX_TTL
    assert settings.MAX_ID == argtypes.MAX_ID


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fields", [
    {"ttl_seconds": -1},
    {"ttl_seconds": argtypes.MAX_TTL + 1},
    {"allowed_uids": tuple(range(9))},
    {"allowed_gids": (-1,)},
    {"allowed_uids": (argtypes.MAX_ID + 1,)},
    {"read_policy": 1},  # a bare int is not a policy
    {"ttl_action": ReadPolicy.ZEROS},
    {"owner": owner_change("x" * 129)},
    {"owner": {"owner": "x"}},
    {"owner": owner_change("x", pid=-2)},
])
def test_out_of_range_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        SettingsChange(**fields)


@pytest.mark.timeout(60)
def test_in_range_is_accepted() -> None:
    change = SettingsChange(ttl_seconds=argtypes.MAX_TTL, allowed_uids=tuple(range(8)), allowed_gids=(),
                            owner=owner_change("x" * 128))
    assert not change.empty and change.touches_owner
    assert SettingsChange().empty


@pytest.mark.timeout(60)
def test_plan_writes_only_what_differs_and_no_owner_while_dangling(tmp_path: Path) -> None:
    header = read_header(_volume(tmp_path, owner="c1", ttl_seconds=60))
    change = SettingsChange(ttl_seconds=60, read_policy=ReadPolicy.ZEROS, allowed_uids=header.allowed_uids,
                            owner=NO_OWNER)
    assert plan(header, change) == {"read_policy": ReadPolicy.ZEROS, "owner": ""}
    dangling = dataclasses.replace(header, state=VolumeState.DANGLING)
    with pytest.raises(SettingsRefused, match="reclaim"):
        plan(dangling, SettingsChange(owner=NO_OWNER))
    assert plan(dangling, SettingsChange(ttl_action=TtlAction.DELETE)) == {"ttl_action": TtlAction.DELETE}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("text", "seconds"), [
    ("0", 0), ("3600", 3600), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), ("1H", 3600),
    (str(argtypes.MAX_TTL), argtypes.MAX_TTL),
])
def test_ttl_argument(text: str, seconds: int) -> None:
    assert argtypes.ttl(text) == seconds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", ["", "-1", "1.5h", "1y", "h", "1 h x", str(argtypes.MAX_TTL + 1),
                                  "10000000000d"])
def test_ttl_argument_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.ttl(text)


SETTINGS_A = SettingsChange(ttl_seconds=100, ttl_action=TtlAction.DELETE, read_policy=ReadPolicy.ZEROS,
                            ring_full_policy=RingFullPolicy.OVERWRITE, allowed_uids=(1, 2), allowed_gids=(5,),
                            owner=owner_change("owner-ä"))


@pytest.mark.timeout(120)
def test_offline_update_torn_at_every_byte_reads_old_or_new(tmp_path: Path) -> None:
    path = _volume(tmp_path, owner="before")
    old = read_header(path)
    before = [_pread(path, offset) for offset in SLOT_OFFSETS]
    result = apply_offline(path, SETTINGS_A)
    new = read_header(path)
    after = [_pread(path, offset) for offset in SLOT_OFFSETS]
    assert after[0] == after[1]
    assert set(result.changed) == {"ttl_seconds", "ttl_action", "read_policy", "ring_full_policy",
                                   "allowed_uids", "allowed_gids", "owner"}
    assert (new.ttl_seconds, new.read_policy, new.allowed_uids, new.owner) == (100, ReadPolicy.ZEROS, (1, 2),
                                                                              "owner-ä")
    # Volume.update writes the copy the reader did not choose first, then the other.
    first = 1 - choose_slot(before)[0]
    seen = {"old": 0, "new": 0}
    fd = os.open(path, os.O_RDWR)
    try:
        for phase, target in ((1, first), (2, 1 - first)):
            os.pwrite(fd, before[1 - target] if phase == 1 else after[1 - target], SLOT_OFFSETS[1 - target])
            for k in range(SLOT_SIZE + 1):
                os.pwrite(fd, after[target][:k] + before[target][k:], SLOT_OFFSETS[target])
                got = read_header(path)
                assert got in (old, new), (phase, k)
                seen["old" if got == old else "new"] += 1
    finally:
        os.close(fd)
    assert seen["old"] > 0 and seen["new"] > 0


@pytest.mark.timeout(60)
def test_offline_update_refused_while_locked(tmp_path: Path) -> None:
    path = _volume(tmp_path)
    old = read_header(path)
    lock = lock_volume(path)  # what a serving daemon holds
    try:
        with pytest.raises(AlreadyServed):
            apply_offline(path, SETTINGS_A)
    finally:
        os.close(lock)
    assert read_header(path) == old
    apply_offline(path, SETTINGS_A)
    # A dangling file keeps its owner; nothing is written when it is refused.
    with Volume(path) as volume:
        volume.update(state=VolumeState.DANGLING)
    dangling = read_header(path)
    with pytest.raises(SettingsRefused):
        apply_offline(path, SettingsChange(ttl_seconds=1, owner=NO_OWNER))
    assert read_header(path) == dangling


def _pread(path: Path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, SLOT_SIZE, offset)
    finally:
        os.close(fd)
