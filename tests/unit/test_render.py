"""The human units (humanize.duration, humanize.size) and the status/ls text built on them:
no raw nanoseconds or epoch seconds in text, the raw values kept in --json."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from vhost_pv import humanize
from vhost_pv.cli import render

MiB = 1 << 20
NS = 1_000_000_000


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.9, "0s"), (45, "45s"), (59.99, "59s"), (60, "1m00s"), (192, "3m12s"),
    (3599, "59m59s"), (3600, "1h00m"), (2 * 3600 + 5 * 60 + 7, "2h05m"), (86400, "1d00h"),
    (3 * 86400 + 4 * 3600 + 59, "3d04h"), (400 * 86400, "400d00h"), (-5, "0s"),
])
def test_duration(seconds: float, text: str) -> None:
    assert humanize.duration(seconds) == text


@pytest.mark.parametrize(("count", "text"), [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
    (MiB - 1, "1 MiB"), (MiB, "1 MiB"), (int(1.2 * MiB), "1.2 MiB"), (16 * MiB, "16 MiB"),
    (10 << 30, "10 GiB"), (3 << 40, "3 TiB"), (5000 << 40, "5000 TiB"),
])
def test_size(count: int, text: str) -> None:
    assert humanize.size(count) == text


def test_suggested_commands_quote_the_control_path() -> None:
    reclaim, delete = humanize.suggested_commands("/run/my dir/control.sock", "vol0")
    assert reclaim == "vhost-pv reclaim --control '/run/my dir/control.sock' vol0 --owner NEW_OWNER --replay"
    assert delete == "vhost-pv delete --control '/run/my dir/control.sock' vol0"


IDENTITY = {"pid": 7, "uid": 107, "gid": 108, "start_ticks": 1234, "vm_name": "vm7",
            "vm_uuid": "6b9c1a2e-5f0d-4c1e-9a51-3a0f7e0c25a7", "exe": "/usr/bin/qemu-system-x86_64",
            "cgroup": "/machine.slice/machine-qemu\\x2d1\\x2dvm7.scope/libvirt/emulator",
            "pinned_by": "SO_PEERPIDFD"}


def _volume(name: str, *, dangling: bool, since_ns: int = 0, ttl: int = 0, action: str = "delete",
            deadline_ns: int | None = None, expired: bool = False, attached: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "socket": f"/run/vhost-pv/{name}.sock",
        "header": {"capacity": 64 * MiB, "state": "dangling" if dangling else "attached",
                   "dangling": dangling, "dangling_since_ns": since_ns, "reason": "container-deleted",
                   "dangling_source": "ioctl", "ttl_seconds": ttl, "ttl_action": action,
                   "vm_name": "vm7" if attached else "", "vm_uuid": "", "vm_cgroup": ""},
        "ring": {"bytes_used": int(1.2 * MiB), "area_size": 16 * MiB, "records": 42},
        "guard": {"ttl_deadline_ns": deadline_ns, "ttl_expired": expired,
                  "suggested": humanize.suggested_commands("/run/c.sock", name) if dangling else []},
        "connection": {"pid": 7, "uid": 107, "gid": 108, "queues_running": True, "queues": [],
                       "since": time.time() - 192.5, "identity": IDENTITY} if attached else None,
    }


def _state(now_ns: int) -> dict[str, Any]:
    since = now_ns - 192 * NS - NS // 2  # dangling for 3m12.5s
    return {"pid": 1234, "failed": [], "volumes": [
        _volume("gone", dangling=True, since_ns=since, ttl=600, deadline_ns=since + 600 * NS),
        _volume("kept", dangling=True, since_ns=since, ttl=60, action="alert",
                deadline_ns=since + 60 * NS, expired=True),
        _volume("live", dangling=False, ttl=600, attached=True),
        _volume("nolimit", dangling=True, since_ns=since),
    ]}


def test_status_text_is_in_human_units(capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time_ns()
    render.status(_state(now), use_json=False, control="/run/c.sock")
    out = capsys.readouterr().out
    assert "gone: 64 MiB, state dangling" in out
    assert "dangling for 3m12s: container-deleted (source: ioctl)" in out
    assert "ring 1.2 MiB of 16 MiB, 42 records; deletes in 6m47s" in out
    assert "time limit passed 2m12s ago (alert sent)" in out
    assert "; no time limit" in out
    assert "to reclaim: vhost-pv reclaim --control /run/c.sock gone --owner NEW_OWNER --replay" in out
    assert "to delete: vhost-pv delete --control /run/c.sock gone" in out
    # Who is attached, and since when.
    assert ("frontend pid 7 uid 107 gid 108, VM vm7 (uuid 6b9c1a2e-5f0d-4c1e-9a51-3a0f7e0c25a7), "
            "attached 3m12s ago") in out
    assert ("cgroup /machine.slice/machine-qemu\\x2d1\\x2dvm7.scope/libvirt/emulator, "
            "exe /usr/bin/qemu-system-x86_64") in out
    assert "bound to VM name vm7" in out
    assert not re.search(r"\d{10,}", out), out


def test_status_json_keeps_the_raw_values(capsys: pytest.CaptureFixture[str]) -> None:
    state = _state(time.time_ns())
    render.status(state, use_json=True)
    assert json.loads(capsys.readouterr().out) == state


def test_ls_one_line_per_volume(capsys: pytest.CaptureFixture[str]) -> None:
    render.volume_list(_state(time.time_ns()), use_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "AGE", "RING", "TTL", "OPTIONS", "FRONTEND"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == ["gone", "kept", "live", "nolimit"]
    assert re.search(r"dangling +3m12s +1\.2 MiB of 16 MiB, 42 records +deletes in 6m47s +- +none$",
                     rows["gone"])
    assert re.search(r"attached +- +.* +deletes 10m00s after dangling +- +attached by vm7 pid 7$",
                     rows["live"])
    assert "no time limit" in rows["nolimit"]
    assert not any(re.search(r"\d{10,}", line) for line in lines)


def test_ls_shows_each_volumes_options_and_the_failed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    fast = {**_volume("fast", dangling=False), "read_only": False,
            "options": {"queues": 4, "read_only": False, "direct": True}}
    # Read-only by its header though not asked for: served read-only, shown so.
    golden = {**_volume("golden", dangling=False), "read_only": True,
              "options": {"queues": 1, "read_only": False, "direct": False}}
    state = {"pid": 1, "volumes": [fast, golden], "failed": [
        {"path": "/var/lib/vhost-pv/gone.img", "error": "No such file or directory",
         "options": {"queues": 2, "read_only": True, "direct": False}}]}
    render.volume_list(state, use_json=False)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert re.search(r" q4,direct +none$", rows["fast"])
    assert re.search(r" q1,ro +none$", rows["golden"])
    assert re.search(r"^gone +failed +- +- +- +q2,ro +No such file or directory$", rows["gone"])
