"""vhost_pv.peer_identity: reading who connected (through a verified pidfd) and the VM
binding's match rules."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_pv import peer_identity
from vhost_pv.guard.processes import pid_start_ticks
from vhost_pv.peer_identity import (
    AlertRateLimit,
    BoundVm,
    IdentityUnavailable,
    PeerIdentity,
    cgroup_matches,
    parse_cgroup,
    qemu_vm,
    read_identity,
)
from vhost_pv.sockfile import PeerCredentials, peer_credentials

VM7 = uuid.UUID("6b9c1a2e-5f0d-4c1e-9a51-3a0f7e0c25a7")
LIBVIRT_SCOPE = "/machine.slice/machine-qemu\\x2d3\\x2dvm7.scope"

# A child that connects to a unix socket (argv[1]) with a QEMU-like command line, says so,
# and waits for its stdin to close.
CONNECTOR = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.read()
"""


# -- the command line and the cgroup -------------------------------------------------------


@pytest.mark.parametrize(("argv", "name", "vm_uuid"), [
    (["qemu", "-name", "guest=vm7,debug-threads=on", "-uuid", str(VM7)], "vm7", VM7),
    (["qemu", "-name", "vm7"], "vm7", None),
    (["qemu", "-name", "vm7,process=qemu:vm7"], "vm7", None),
    (["qemu", "--name", "debug-threads=on,guest=vm7", "--uuid", str(VM7).upper()], "vm7", VM7),
    (["qemu", "-name", "guest=a,,b"], "a,b", None),  # ",," is an escaped comma in QEMU options
    (["qemu", "-name", "first", "-name", "guest=second"], "second", None),  # the last one wins
    (["qemu", "-uuid", "00000000-0000-0000-0000-000000000000"], "", None),  # nil: no VM
    (["qemu", "-uuid", "not-a-uuid"], "", None),
    (["qemu", "-name"], "", None),  # an option without its value
    (["-name", "guest=argv0-is-not-an-option"], "", None),
    (["python", "-m", "x", "/sock", "-name", "guest=vm7"], "vm7", None),
])
def test_qemu_vm_reads_name_and_uuid(argv: list[str], name: str, vm_uuid: uuid.UUID | None) -> None:
    assert qemu_vm(argv) == (name, vm_uuid)


@pytest.mark.parametrize(("text", "path"), [
    ("0::/machine.slice/machine-qemu\\x2d1\\x2dvm7.scope/libvirt/emulator\n",
     "/machine.slice/machine-qemu\\x2d1\\x2dvm7.scope/libvirt/emulator"),  # cgroup v2
    ("12:pids:/\n1:name=systemd:/machine.slice/vm7.scope\n0::/machine.slice/vm7.scope\n",
     "/machine.slice/vm7.scope"),  # hybrid, systemd mirrors its units in the unified tree
    ("9:name=systemd:/system.slice/qemu-vm7.service\n4:memory:/x\n0::/\n",
     "/system.slice/qemu-vm7.service"),  # hybrid, the unified tree unused
    ("4:memory:/x\n1:name=systemd:/user.slice\n", "/user.slice"),  # cgroup v1 only
    ("4:memory:/x\n", ""),
])
def test_parse_cgroup(text: str, path: str) -> None:
    assert parse_cgroup(text) == path


@pytest.mark.parametrize(("bound", "actual", "matches"), [
    (LIBVIRT_SCOPE, LIBVIRT_SCOPE, True),
    (LIBVIRT_SCOPE, LIBVIRT_SCOPE + "/libvirt/emulator", True),  # below it
    (LIBVIRT_SCOPE + "/", LIBVIRT_SCOPE + "/libvirt", True),
    (LIBVIRT_SCOPE, LIBVIRT_SCOPE + "x", False),  # a prefix of a component is not below
    (LIBVIRT_SCOPE, "/machine.slice", False),  # above it
    (LIBVIRT_SCOPE, "", False),  # unknown
    ("machine-qemu\\x2d3\\x2dvm7.scope", LIBVIRT_SCOPE + "/libvirt/emulator", True),  # a unit name
    ("machine-qemu\\x2d*\\x2dvm7.scope", "/machine.slice/machine-qemu\\x2d9\\x2dvm7.scope", True),  # glob
    ("machine-qemu\\x2d*\\x2dvm7.scope", "/machine.slice/machine-qemu\\x2d9\\x2dvm8.scope", False),
    ("vm7.service", "/system.slice/vm7.service", True),
    ("vm7.service", "/system.slice/vm7.service.d", False),
    # Below a user's systemd instance that user names the units: not proof of anything.
    ("vm7.service", "/user.slice/user-1000.slice/user@1000.service/app.slice/vm7.service", False),
])
def test_cgroup_match_rule(bound: str, actual: str, matches: bool) -> None:
    assert cgroup_matches(bound, actual) is matches


def _identity(**changes: object) -> PeerIdentity:
    fields: dict[str, object] = {"pid": 42, "uid": 107, "gid": 107, "start_ticks": 1, "cgroup": LIBVIRT_SCOPE,
                                 "vm_name": "vm7", "vm_uuid": VM7, "exe": "/usr/bin/qemu-system-x86_64",
                                 "pinned_by": "SO_PEERPIDFD"}
    fields.update(changes)
    return PeerIdentity(**fields)  # type: ignore[arg-type]


def test_binding_checks_every_field_set_and_nothing_else() -> None:
    assert not BoundVm().bound and BoundVm().mismatches(_identity(vm_name="other")) == []
    full = BoundVm(VM7, "vm7", "machine-qemu\\x2d*\\x2dvm7.scope")
    assert full.mismatches(_identity()) == []
    assert full.mismatches(_identity(vm_name="vm8")) == ["VM name 'vm8' is not 'vm7'"]
    assert full.mismatches(_identity(vm_uuid=None, vm_name="")) == [
        f"uuid none is not {VM7}", "VM name 'none' is not 'vm7'"]
    assert full.mismatches(_identity(cgroup="/user.slice")) == [
        "cgroup '/user.slice' is not in unit 'machine-qemu\\\\x2d*\\\\x2dvm7.scope'"]
    # A function of the identity only: another pid, started later, with the same -name/-uuid
    # (a restarted VM, a migration's destination QEMU) is the same VM.
    by_name = BoundVm(VM7, "vm7")
    assert by_name.mismatches(_identity(pid=4242, start_ticks=99999, cgroup="/machine.slice/other")) == []


def test_alert_rate_limit() -> None:
    limit = AlertRateLimit(60.0)
    assert limit.take("vol0", now=100.0) == 0
    assert limit.take("vol0", now=110.0) is None
    assert limit.take("vol0", now=120.0) is None
    assert limit.take("vol1", now=120.0) == 0  # per volume
    assert limit.take("vol0", now=161.0) == 2  # the alert counts those it stood for
    assert limit.take("vol0", now=162.0) is None


# -- reading a process through its pidfd -----------------------------------------------------


def test_read_identity_of_this_process() -> None:
    pidfd = os.pidfd_open(os.getpid())
    try:
        identity = read_identity(pidfd, os.getpid(), uid=os.getuid(), gid=os.getgid())
    finally:
        os.close(pidfd)
    assert identity.pid == os.getpid()
    assert identity.cgroup == parse_cgroup(Path("/proc/self/cgroup").read_text())
    assert identity.cgroup.startswith("/")
    assert identity.exe == os.path.realpath(sys.executable)
    assert identity.start_ticks == pid_start_ticks(os.getpid())
    assert identity.vm_name == "" and identity.vm_uuid is None  # pytest has no -name


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s.sock"))
    sock.listen()
    sock.settimeout(20)
    try:
        yield sock
    finally:
        sock.close()


def _connector(listener: socket.socket, *argv: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", CONNECTOR, listener.getsockname(), *argv],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "connected\n"
    return process


def _execed(process: subprocess.Popen[bytes], marker: bytes) -> None:
    """Until the child has exec'd: between fork and exec its cmdline is still ours."""
    deadline = time.monotonic() + 30
    while marker not in Path(f"/proc/{process.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the child never exec'd"
        time.sleep(0.01)


def _end(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


@pytest.mark.parametrize("pinned_by", ["SO_PEERPIDFD", "pidfd_open"])
def test_peer_identity_of_a_connecting_process(
    listener: socket.socket, pinned_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pinned_by == "pidfd_open":  # as on a kernel before 6.5
        monkeypatch.setattr(peer_identity, "_peer_pidfd", lambda sock: None)
    process = _connector(listener, "-name", "guest=vm7,debug-threads=on", "-uuid", str(VM7))
    try:
        conn, _ = listener.accept()
        with conn:
            peer = peer_credentials(conn)
            identity = peer_identity.peer_identity(conn, peer)
    finally:
        _end(process)
    assert identity.pid == process.pid == peer.pid
    assert (identity.vm_name, identity.vm_uuid, identity.pinned_by) == ("vm7", VM7, pinned_by)
    assert (identity.uid, identity.gid) == (os.getuid(), os.getgid())


@pytest.mark.parametrize("pinned_by", ["SO_PEERPIDFD", "pidfd_open"])
def test_a_peer_that_has_exited_has_no_identity(
    listener: socket.socket, pinned_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pinned_by == "pidfd_open":
        monkeypatch.setattr(peer_identity, "_peer_pidfd", lambda sock: None)
    process = _connector(listener, "-name", "guest=vm7")
    conn, _ = listener.accept()
    with conn:
        peer = peer_credentials(conn)
        _end(process)  # exited and reaped: its pid is free for anyone
        with pytest.raises(IdentityUnavailable, match="exited"):
            peer_identity.peer_identity(conn, peer)


def test_a_process_that_exits_mid_check_is_refused() -> None:
    """The reads of /proc/PID count only if the pidfd's process is still there after them:
    here it is killed and reaped between the reads and the confirmation (its pid could now
    be another process's), and the reader refuses what it read."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-name", "guest=vm7"],
                               stdin=subprocess.PIPE)
    _execed(process, b"guest=vm7")
    pidfd = os.pidfd_open(process.pid)
    ended: list[int] = []

    def exit_now() -> None:
        process.kill()
        ended.append(process.wait())

    try:
        with pytest.raises(IdentityUnavailable, match="exited while being read"):
            read_identity(pidfd, process.pid, after_reads=exit_now)
        assert ended  # the check did run after the reads
    finally:
        os.close(pidfd)
        _end(process)
    # The same reader on a live process of the same command line reads it.
    again = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-name", "guest=vm7"],
                             stdin=subprocess.PIPE)
    _execed(again, b"guest=vm7")
    pidfd = os.pidfd_open(again.pid)
    try:
        assert read_identity(pidfd, again.pid).vm_name == "vm7"
    finally:
        os.close(pidfd)
        _end(again)


def test_a_pid_reused_after_the_connect_is_refused(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pidfd_open (no SO_PEERPIDFD): the pinned process must have started before the check
    began; one that started later cannot be the one that connected. Simulated by a clock
    that reads earlier than the connector's start."""
    monkeypatch.setattr(peer_identity, "_peer_pidfd", lambda sock: None)
    process = _connector(listener, "-name", "guest=vm7")
    try:
        conn, _ = listener.accept()
        with conn:
            start = pid_start_ticks(process.pid)
            assert start is not None
            monkeypatch.setattr(peer_identity, "_boottime_ticks", lambda: start - 1)
            with pytest.raises(IdentityUnavailable, match="reused after the connect"):
                peer_identity.peer_identity(conn, peer_credentials(conn))
    finally:
        _end(process)


def test_a_peer_in_another_pid_namespace_has_no_identity(listener: socket.socket,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # SO_PEERCRED says pid 0 for a process whose pid namespace we cannot see.
    monkeypatch.setattr(peer_identity, "_peer_pidfd", lambda sock: None)
    with pytest.raises(IdentityUnavailable, match="another pid namespace"):
        peer_identity.peer_identity(listener, PeerCredentials(0, 0, 0))


def test_an_unreadable_proc_is_no_identity_not_an_error(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/proc mounted hidepid (or any other read failure) must not end the accept loop: it is
    an identity that cannot be established (a bound volume refuses, an unbound one serves)."""
    def hidden(pid: int) -> int:
        raise PermissionError(13, "Permission denied", f"/proc/{pid}/stat")

    monkeypatch.setattr(peer_identity, "pid_start_ticks", hidden)
    process = _connector(listener, "-name", "guest=vm7")
    try:
        conn, _ = listener.accept()
        with conn, pytest.raises(IdentityUnavailable, match="Permission denied"):
            peer_identity.peer_identity(conn, peer_credentials(conn))
    finally:
        _end(process)
