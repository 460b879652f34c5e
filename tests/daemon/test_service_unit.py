"""The service unit and its companions in contrib/systemd, checked with systemd's own tools:
`systemd-analyze verify` finds no warning (ExecStart pointed at this venv's vhost-pv, as it
needs an existing binary), systemd-sysusers and systemd-tmpfiles create the user and the
directories in a scratch root, and every system call the daemon makes (under strace, through
start, attach, buffered and O_DIRECT I/O on the io_uring, a flip, quarantined writes,
--proc-events, the metadata HTTP server, the alert webhook, SIGHUP and the stop) is one the
unit's SystemCallFilter= lines allow."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.attach import Guest, pattern

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNIT = CONTRIB / "vhost-pv.service"
INSTALLED_BINARY = "/usr/local/bin/vhost-pv"
MiB = 1 << 20


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    venv_binary = Path(sys.executable).parent / "vhost-pv"
    assert venv_binary.exists(), "the venv has no vhost-pv console script (make install)"
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    (tmp_path / "vhost-pv.service").write_text(text.replace(INSTALLED_BINARY, str(venv_binary)))
    (tmp_path / "vhost-pv.socket").write_text((CONTRIB / "vhost-pv.socket").read_text())
    result = _run("systemd-analyze", "verify", "--man=no", "./vhost-pv.service", "./vhost-pv.socket",
                  cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result
    # The check is not vacuous: a misspelt directive is a warning.
    with open(tmp_path / "vhost-pv.service", "a") as unit:
        unit.write("\n[Service]\nNoNewPrivilege=yes\n")
    result = _run("systemd-analyze", "verify", "--man=no", "./vhost-pv.service", cwd=tmp_path)
    assert "Unknown key" in result.stderr, result


def test_user_and_directories(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for kind, name in (("sysusers.d", "vhost-pv.sysusers"), ("tmpfiles.d", "vhost-pv.tmpfiles")):
        (tmp_path / "usr/lib" / kind).mkdir(parents=True)
        (tmp_path / "usr/lib" / kind / "vhost-pv.conf").write_text((CONTRIB / name).read_text())
    assert _run("systemd-sysusers", f"--root={tmp_path}").returncode == 0
    entry = next(line for line in (tmp_path / "etc/passwd").read_text().splitlines()
                 if line.startswith("vhost-pv:"))
    _, _, uid, gid, _, home, shell = entry.split(":")
    assert int(uid) < 1000 and home == "/var/lib/vhost-pv" and shell == "/usr/sbin/nologin"
    assert _run("systemd-tmpfiles", f"--root={tmp_path}", "--create").returncode == 0
    for directory in ("run/vhost-pv", "var/lib/vhost-pv"):
        st = os.stat(tmp_path / directory)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (int(uid), int(gid), 0o750), directory


@functools.cache
def _group(name: str) -> frozenset[str]:
    """A syscall group of `systemd-analyze syscall-filter`, nested groups expanded."""
    result = _run("systemd-analyze", "syscall-filter", name)
    assert result.returncode == 0, result
    calls: set[str] = set()
    for line in result.stdout.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        calls |= _group(word) if word.startswith("@") else {word}
    return frozenset(calls)


def _names(words: str) -> set[str]:
    names: set[str] = set()
    for word in words.split():
        names |= _group(word) if word.startswith("@") else {word}
    return names


def _allowed_by_unit() -> set[str]:
    """SystemCallFilter= as systemd applies it: the first line allows, `~` lines take away,
    later plain lines add back."""
    allowed: set[str] = set()
    lines = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
             if line.startswith("SystemCallFilter=")]
    assert lines and not lines[0].startswith("~")
    for value in lines:
        if value.startswith("~"):
            allowed -= _names(value[1:])
        else:
            allowed |= _names(value)
    return allowed


def _strace_summary(path: Path) -> set[str]:
    """Syscall names of `strace -c` output."""
    calls = set()
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            calls.add(fields[-1])
    return calls


@pytest.mark.timeout(120)
def test_daemon_syscalls_are_within_the_unit_filter(tmp_path: Path) -> None:
    volume = tmp_path / "vol0.img"
    create_volume(volume, CreateOptions(size=4 * MiB, ring_size=MiB))
    trace = tmp_path / "strace.txt"
    server = ServerProcess(
        [volume], tmp_path / "run", prefix=["strace", "-f", "-qq", "-c", "-o", str(trace)],
        extra_args=["--proc-events", "--direct", "--meta-http", "127.0.0.1:0",
                    "--alert-webhook", "http://127.0.0.1:9/nobody-listens"])
    with server:
        guest = Guest(server.socket_for(volume))
        try:
            for index in range(8):
                guest.round_trip(index * 8, pattern(4096, index))
        finally:
            guest.close()
        client.persistent_disk_dangling(server.control, "vol0", reason="test")
        guest = Guest(server.socket_for(volume))
        try:
            guest.write(0, pattern(4096, 99))  # quarantined: the ring, the guard, an alert
        finally:
            guest.close()
        os.kill(server.pid, signal.SIGHUP)
        time.sleep(0.5)
        # SIGTERM to the daemon itself (strace's child); strace ends with it.
        daemon = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
        os.kill(daemon, signal.SIGTERM)
        assert server.process is not None and server.process.wait(30) == 0, server.log()
        server.process = None
    assert "stopped" in server.log()
    used = _strace_summary(trace)
    assert {"io_uring_setup", "io_uring_enter", "flock", "accept4", "sendto"} <= used, used
    # execve is allowed by systemd whatever the filter says (it is how the service starts).
    outside = used - _allowed_by_unit() - {"execve"}
    assert not outside, f"syscalls the unit's SystemCallFilter= would refuse: {sorted(outside)}"
