"""The `vhost-pv` command line, run as a subprocess the way an admin runs it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vhost_pv.volume.header import SLOT_SIZE
from vhost_pv.volume.volume import read_header
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
_ENTRY = REPO / ".venv" / "bin" / "vhost-pv"
VHOST_PV = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "vhost_pv.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VHOST_PV, *args], capture_output=True, text=True, timeout=30, check=False)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(4 * SLOT_SIZE)).hexdigest()


def _create(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run("create", str(path), "--size", "64M", "--ring-size", "2M", "--owner", "abc", *extra)
    assert result.returncode == 0, result.stderr
    return result


def _inspect_json(path: Path) -> dict[str, Any]:
    result = run("inspect", "--json", str(path))
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)
    return info


@pytest.mark.timeout(60)
def test_create(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    result = _create(path)
    assert result.stderr == ""
    match = re.fullmatch(
        r"created (\S+): 64 MiB data, 2 MiB quarantine ring, uuid ([0-9a-f-]{36})\n", result.stdout
    )
    assert match, result.stdout
    assert match.group(1) == str(path)
    header = read_header(path)
    assert str(header.uuid) == match.group(2)
    assert header.owner == "abc"
    assert header.capacity == 64 * MiB
    assert header.ring_size == 2 * MiB
    assert header.allowed_uids == (os.getuid(),)
    assert path.stat().st_size == MiB + 64 * MiB + 2 * MiB


@pytest.mark.timeout(60)
def test_inspect_text(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    _create(path)
    result = run("inspect", str(path))
    assert result.returncode == 0, result.stderr
    lines: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("  ")
        lines[key] = value.strip()
    header = read_header(path)
    assert lines["uuid"] == str(header.uuid)
    assert lines["owner"] == "abc"
    assert lines["capacity"] == str(64 * MiB)
    assert lines["ring_size"] == str(2 * MiB)
    assert lines["state"] == "attached"
    assert lines["dangling"] == "False"
    assert lines["reason"] == ""
    assert set(lines) == set(header.to_dict())


@pytest.mark.timeout(60)
def test_inspect_json(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    _create(path)
    info = _inspect_json(path)
    header = read_header(path)
    assert info == header.to_dict()
    assert info["uuid"] == str(header.uuid)
    assert info["serial"] == header.uuid.hex[:20]
    assert info["generation"] == 1
    assert info["capacity"] == 64 * MiB
    assert info["data_offset"] == MiB
    assert info["ring_offset"] == MiB + 64 * MiB
    assert info["ring_size"] == 2 * MiB
    assert info["owner"] == "abc"
    assert info["state"] == "attached"
    assert info["dangling"] is False
    assert info["dangling_since_ns"] == 0
    assert info["reason"] == ""
    assert info["read_only"] is False
    assert info["read_policy"] == "deny"
    assert info["ring_full_policy"] == "reject"
    assert info["ttl_seconds"] == 0
    assert info["ttl_action"] == "alert"
    assert info["allowed_uids"] == [os.getuid()]
    assert info["allowed_gids"] == []


@pytest.mark.timeout(60)
def test_create_options_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "opts.img"
    _create(
        path, "--read-only", "--read-policy", "zeros", "--ring-full", "overwrite", "--ttl", "60",
        "--ttl-action", "delete", "--allow-uids", "0,1000", "--allow-gids", "5",
    )
    info = _inspect_json(path)
    assert info["read_only"] is True
    assert info["read_policy"] == "zeros"
    assert info["ring_full_policy"] == "overwrite"
    assert info["ttl_seconds"] == 60
    assert info["ttl_action"] == "delete"
    assert info["allowed_uids"] == [0, 1000]
    assert info["allowed_gids"] == [5]


@pytest.mark.timeout(60)
def test_create_refuses_existing_volume(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    _create(path)
    before = (_digest(path), path.stat().st_size, path.stat().st_mtime_ns)
    result = run("create", str(path), "--size", "8M")
    assert result.returncode == 1
    assert "exists" in result.stderr and "refusing" in result.stderr
    assert "Traceback" not in result.stderr
    assert (_digest(path), path.stat().st_size, path.stat().st_mtime_ns) == before
    assert read_header(path).capacity == 64 * MiB


@pytest.mark.timeout(60)
def test_create_refuses_existing_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    content = os.urandom(12345)
    path.write_bytes(content)
    result = run("create", str(path), "--size", "64M")
    assert result.returncode == 1
    assert "refusing" in result.stderr
    assert path.read_bytes() == content


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "lots"], "not a size"),
        (["--size", "1000"], "multiple of 512"),
        (["--size", "64M", "--ring-size", "4k"], "ring size"),
    ],
)
def test_create_rejects_bad_sizes(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "vol.img"
    result = run("create", str(path), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not path.exists()


FOREIGN_FILES = {
    "zeros": (bytes(2 * MiB), "magic"),
    "script": (b"#!/bin/sh\necho hello\n" * 1000, "magic"),
    "short": (b"short", "truncated"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(FOREIGN_FILES))
def test_inspect_foreign_file(tmp_path: Path, kind: str) -> None:
    content, message = FOREIGN_FILES[kind]
    path = tmp_path / "foreign.bin"
    path.write_bytes(content)
    for args in (["inspect", str(path)], ["inspect", "--json", str(path)]):
        result = run(*args)
        assert result.returncode != 0
        assert result.stdout == ""
        assert message in result.stderr
        assert str(path) in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_inspect_truncated_volume(tmp_path: Path) -> None:
    path = tmp_path / "vol.img"
    _create(path)
    os.truncate(path, 2 * MiB)
    result = run("inspect", str(path))
    assert result.returncode == 1
    assert "truncated" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_inspect_missing_file(tmp_path: Path) -> None:
    result = run("inspect", str(tmp_path / "nope.img"))
    assert result.returncode == 1
    assert "No such file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_serve_refuses_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign.img"
    path.write_bytes(bytes(2 * MiB))
    result = run("serve", "--socket-dir", str(tmp_path / "s"), "--control", str(tmp_path / "c.sock"),
                 str(path))
    assert result.returncode == 1
    assert "magic" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c.sock").exists()


@pytest.mark.timeout(60)
def test_status_json_against_daemon(tmp_path: Path) -> None:
    path = tmp_path / "disk1.img"
    _create(path)
    with ServerProcess([path], tmp_path / "daemon") as server:
        result = run("status", "--json", "--control", str(server.control))
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["pid"] == server.pid
        (entry,) = status["volumes"]
        assert entry["name"] == "disk1"
        assert entry["path"] == str(path)
        assert entry["socket"] == str(server.socket_for(path))
        assert entry["connection"] is None
        assert entry["header"] == _inspect_json(path)
        assert entry["header"]["owner"] == "abc"

        text = run("status", "--control", str(server.control))
        assert text.returncode == 0, text.stderr
        assert f"daemon pid {server.pid}" in text.stdout
        assert "disk1: 64 MiB, state attached" in text.stdout
        assert "no frontend attached" in text.stdout


@pytest.mark.timeout(60)
def test_status_without_daemon(tmp_path: Path) -> None:
    result = run("status", "--json", "--control", str(tmp_path / "missing.sock"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "missing.sock" in result.stderr
    assert "Traceback" not in result.stderr
