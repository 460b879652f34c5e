"""sd_notify and LISTEN_FDS as systemd speaks them, against a real datagram listener and
fds passed the way the manager passes them (from fd 3 on, LISTEN_PID set)."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_pv import systemd


def _receive(listener: socket.socket) -> tuple[dict[str, str], list[int]]:
    data, ancillary, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    fields = dict(line.split("=", 1) for line in data.decode().splitlines())
    return fields, fds


def test_notify_sends_fields_and_fds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify({"READY": "1", "STATUS": "serving 2 volumes"})
        assert _receive(listener) == ({"READY": "1", "STATUS": "serving 2 volumes"}, [])
        read_end, write_end = os.pipe()
        try:
            assert systemd.notify({"FDSTORE": "1", "FDNAME": "vol0"}, fds=[read_end])
            fields, fds = _receive(listener)
            assert fields == {"FDSTORE": "1", "FDNAME": "vol0"} and len(fds) == 1
            os.write(write_end, b"x")
            assert os.read(fds[0], 1) == b"x"  # the very pipe, not a copy of its number
            os.close(fds[0])
        finally:
            os.close(read_end)
            os.close(write_end)
        with pytest.raises(ValueError):
            systemd.notify({"STATUS": "two\nlines"})


def test_notify_abstract_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"vhost-pv-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify({"WATCHDOG": "1"})
        assert _receive(listener)[0] == {"WATCHDOG": "1"}


def test_without_a_manager_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS"):
        monkeypatch.delenv(key, raising=False)
    assert not systemd.notify({"READY": "1"})
    assert systemd.watchdog_interval() is None
    assert systemd.listen_fds() == []


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None  # armed for another process


_CHILD = """
import json, os, socket
from vhost_pv import systemd
passed = systemd.listen_fds()
out = []
for p in passed:
    s = socket.socket(fileno=p.fd)
    out.append([p.name, s.getsockname(), os.get_inheritable(p.fd)])
    s.detach()
print(json.dumps({"passed": out, "env": [k for k in os.environ if k.startswith("LISTEN_")]}))
"""


def test_listen_fds_as_systemd_passes_them(tmp_path: Path) -> None:
    import json

    listeners = []
    for name in ("vol0", "control"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / f"{name}.sock"))
        sock.listen()
        listeners.append(sock)
    # systemd dup2()s the sockets to 3, 4, ... and sets LISTEN_PID to the child's own pid:
    # a shell that exports its own pid and execs keeps that pid, as the manager's child does.
    fds = [s.fileno() for s in listeners]

    def arrange() -> None:
        for index, fd in enumerate(fds):
            os.dup2(fd, 3 + index)

    env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="vol0:control")
    done = subprocess.run(["sh", "-c", 'LISTEN_PID=$$ exec "$0" -c "$1"', sys.executable, _CHILD],
                          env=env, preexec_fn=arrange, close_fds=False,
                          capture_output=True, text=True, timeout=30)
    for sock in listeners:
        sock.close()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["passed"] == [["vol0", str(tmp_path / "vol0.sock"), False],
                                ["control", str(tmp_path / "control.sock"), False]]
    assert result["env"] == []


def test_listen_fds_for_another_pid_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds(unset_environment=False) == []
