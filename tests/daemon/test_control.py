"""The control socket of a running daemon: modes, STATUS, malformed requests, SO_PEERCRED."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.nobody import NOBODY, python_for_nobody

from vhost_pv.control import client
from vhost_pv.control.wire import (
    CONTROL_VERSION,
    FLAG_REPLY,
    MAX_CONTROL_PAYLOAD,
    Command,
    ControlHeader,
    ReplyStatus,
)
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.serverproc import ServerProcess


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory under /tmp that uid 65534 can traverse (pytest's tmp_path parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vhost-pv-control-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def volume(workdir: Path) -> Path:
    path = workdir / "disk0.img"
    create_volume(path, CreateOptions(size=4 << 20, ring_size=1 << 20, owner="ctl-test"))
    return path


@pytest.fixture
def server(workdir: Path, volume: Path) -> Iterator[ServerProcess]:
    with ServerProcess([volume], workdir) as proc:
        yield proc


# -- raw protocol helpers --------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _header(cmd: int, seq: int, length: int, *, version: int = CONTROL_VERSION) -> bytes:
    raw: bytes = ControlHeader.build(
        {"version": version, "flags": 0, "cmd": cmd, "seq": seq, "length": length}
    )
    return raw


def _read_reply(sock: socket.socket) -> tuple[Any, int, bytes]:
    header = ControlHeader.parse(_recv_exact(sock, ControlHeader.sizeof()))
    assert header.flags & FLAG_REPLY
    body = _recv_exact(sock, header.length)
    status: int = ReplyStatus.parse(body[:4])
    return header, status, body[4:]


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _assert_closed(sock: socket.socket) -> None:
    assert sock.recv(1) == b"", "the daemon should close the connection after a protocol error"


def _assert_status_works(server: ServerProcess, volume: Path) -> dict[str, Any]:
    status = client.status(server.control)
    assert [v["name"] for v in status["volumes"]] == [volume.stem]
    return status


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_socket_modes(server: ServerProcess, volume: Path) -> None:
    control_mode = os.stat(server.control).st_mode
    assert stat.S_ISSOCK(control_mode)
    assert stat.S_IMODE(control_mode) == 0o600
    vhost_mode = os.stat(server.socket_for(volume)).st_mode
    assert stat.S_ISSOCK(vhost_mode)
    assert stat.S_IMODE(vhost_mode) == 0o600


@pytest.mark.timeout(60)
def test_status(server: ServerProcess, volume: Path) -> None:
    status = _assert_status_works(server, volume)
    assert status["pid"] == server.pid
    (entry,) = status["volumes"]
    assert entry["name"] == "disk0"
    assert entry["path"] == str(volume)
    assert entry["socket"] == str(server.socket_for(volume))
    assert entry["read_only"] is False
    assert entry["connection"] is None
    assert entry["connections_total"] == 0
    assert entry["refused_total"] == 0
    header = entry["header"]
    assert header == read_header(volume).to_dict()
    assert header["owner"] == "ctl-test"
    assert header["capacity"] == 4 << 20
    assert header["state"] == "attached"
    assert header["dangling"] is False


@pytest.mark.timeout(60)
def test_status_with_payload_is_rejected(server: ServerProcess, volume: Path) -> None:
    with pytest.raises(client.ControlError, match="takes no payload") as info:
        client.call(server.control, Command.STATUS, b"junk")
    assert info.value.status == -errno.EINVAL
    _assert_status_works(server, volume)


@pytest.mark.timeout(60)
def test_bad_magic(server: ServerProcess, volume: Path) -> None:
    with _connect(server.control) as sock:
        sock.sendall(b"NOPE" + _header(Command.STATUS, 1, 0)[4:])
        header, status, message = _read_reply(sock)
        assert status == -errno.EPROTO
        assert b"bad magic" in message
        assert header.seq == 0
        _assert_closed(sock)
    _assert_status_works(server, volume)
    assert "bad magic" in server.log()


@pytest.mark.timeout(60)
def test_unknown_command_keeps_connection(server: ServerProcess, volume: Path) -> None:
    with _connect(server.control) as sock:
        sock.sendall(_header(0xDEADBEEF, 41, 0))
        header, status, message = _read_reply(sock)
        assert status == -errno.ENOTTY
        assert b"unknown command 0xdeadbeef" in message
        assert header.cmd == 0xDEADBEEF
        assert header.seq == 41
        # An unknown command is not a framing error: the same connection still works.
        sock.sendall(_header(Command.STATUS, 42, 0))
        header, status, payload = _read_reply(sock)
        assert status == 0
        assert header.seq == 42
        assert header.cmd == Command.STATUS
        assert json.loads(payload)["volumes"][0]["name"] == volume.stem
    _assert_status_works(server, volume)


@pytest.mark.timeout(60)
def test_oversized_payload(server: ServerProcess, volume: Path) -> None:
    with _connect(server.control) as sock:
        sock.sendall(_header(Command.STATUS, 5, MAX_CONTROL_PAYLOAD + 1))
        header, status, message = _read_reply(sock)
        assert status == -errno.EPROTO
        assert b"oversized" in message
        assert header.seq == 5
        _assert_closed(sock)
    _assert_status_works(server, volume)


@pytest.mark.timeout(60)
def test_unsupported_version(server: ServerProcess, volume: Path) -> None:
    with _connect(server.control) as sock:
        sock.sendall(_header(Command.STATUS, 6, 0, version=CONTROL_VERSION + 1))
        _, status, message = _read_reply(sock)
        assert status == -errno.EPROTO
        assert b"unsupported version" in message
        _assert_closed(sock)
    _assert_status_works(server, volume)


@pytest.mark.timeout(60)
def test_truncated_and_garbage_requests(server: ServerProcess, volume: Path) -> None:
    # A partial header followed by a hang-up, and a connection that says nothing at all.
    with _connect(server.control) as sock:
        sock.sendall(b"VPVC\x01")
    with _connect(server.control):
        pass
    # A header promising a payload that never comes.
    with _connect(server.control) as sock:
        sock.sendall(_header(Command.STATUS, 7, 100) + b"short")
    _assert_status_works(server, volume)
    status = client.status(server.control)
    assert status["pid"] == server.pid


# -- SO_PEERCRED -----------------------------------------------------------------------------

_CLIENT_SCRIPT = """
import sys
from pathlib import Path
from vhost_pv.control import client
try:
    status = client.status(Path(sys.argv[1]))
except client.ControlError as exc:
    print(f"refused: {exc} (status {exc.status})", file=sys.stderr)
    sys.exit(3)
print("allowed", len(status["volumes"]))
"""


@pytest.fixture(scope="module")
def nobody() -> Iterator[tuple[str, dict[str, str]]]:
    """An interpreter and environment with which uid 65534 runs this checkout's code."""
    with python_for_nobody() as found:
        yield found


def _run_as_nobody(nobody: tuple[str, dict[str, str]], argv: list[str]) -> subprocess.CompletedProcess[str]:
    python, env = nobody
    return subprocess.run(
        [python, *argv], user=NOBODY, group=NOBODY, extra_groups=[], env=env, cwd="/tmp",
        capture_output=True, text=True, timeout=30, check=False,
    )


@pytest.mark.timeout(60)
def test_peercred_refuses_other_uid(server: ServerProcess, volume: Path, workdir: Path,
                                    nobody: tuple[str, dict[str, str]]) -> None:
    # Open the file permissions wide: only the SO_PEERCRED check stands in the way.
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o755
    os.chmod(server.control, 0o666)

    result = _run_as_nobody(nobody, ["-c", _CLIENT_SCRIPT, str(server.control)])
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "permission denied: uid not allowed" in result.stderr
    assert f"status {-errno.EACCES}" in result.stderr
    assert "allowed" not in result.stdout
    assert "Traceback" not in result.stderr

    # The CLI says the same, without a traceback.
    cli = _run_as_nobody(nobody, ["-m", "vhost_pv.cli", "status", "--control", str(server.control)])
    assert cli.returncode == 1, (cli.stdout, cli.stderr)
    assert "permission denied" in cli.stderr
    assert "Traceback" not in cli.stderr

    log = server.log()
    assert "refused peer" in log
    assert f"uid={NOBODY}" in log

    # Root still gets its answer.
    _assert_status_works(server, volume)


_RAW_REFUSAL_SCRIPT = """
import collections, json, socket, sys
from vhost_pv.control.wire import Command, ControlHeader, ReplyStatus
outcomes = collections.Counter()
for seq in range(1, 101):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(sys.argv[1])
            sock.sendall(ControlHeader.build(
                {"version": 1, "flags": 0, "cmd": Command.STATUS, "seq": seq, "length": 0}))
            data = b""
            while len(data) < 24:
                chunk = sock.recv(24 - len(data))
                if not chunk:
                    break
                data += chunk
            header = ControlHeader.parse(data[:20])
            status = ReplyStatus.parse(data[20:24])
            outcomes[f"status={status} seq_echoed={header.seq == seq}"] += 1
        except Exception as exc:
            outcomes[type(exc).__name__] += 1
print(json.dumps(outcomes))
"""


@pytest.mark.timeout(60)
def test_peercred_refusal_answers_every_request(server: ServerProcess, volume: Path,
                                                nobody: tuple[str, dict[str, str]]) -> None:
    # A plain write-then-read client must always see the refusal, never a broken pipe: the daemon
    # reads the request before it answers and hangs up.
    os.chmod(server.control, 0o666)
    result = _run_as_nobody(nobody, ["-c", _RAW_REFUSAL_SCRIPT, str(server.control)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {f"status={-errno.EACCES} seq_echoed=True": 100}
    assert server.log().count(f"uid={NOBODY}") == 100
    _assert_status_works(server, volume)


_FRONTEND_SCRIPT = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(10)
    sock.connect(sys.argv[1])
    print("eof" if sock.recv(1) == b"" else "data")
"""


@pytest.mark.timeout(60)
def test_vhost_user_socket_refuses_uid_not_recorded_in_the_volume(
    server: ServerProcess, volume: Path, workdir: Path, nobody: tuple[str, dict[str, str]]
) -> None:
    vhost_socket = server.socket_for(volume)
    assert stat.S_IMODE(vhost_socket.stat().st_mode) == 0o600
    os.chmod(vhost_socket, 0o666)  # only the SO_PEERCRED check against the volume remains
    result = _run_as_nobody(nobody, ["-c", _FRONTEND_SCRIPT, str(vhost_socket)])
    assert result.returncode == 0 and result.stdout.strip() == "eof", (result.stdout, result.stderr)
    log = server.log()
    assert "refused frontend" in log and f"uid={NOBODY}" in log and "not allowed to attach" in log
    entry = client.status(server.control)["volumes"][0]
    assert entry["refused_total"] == 1 and entry["connection"] is None
