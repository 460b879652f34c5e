"""A volume bound to a VM: only that VM's QEMU, as the host sees it (its -name/-uuid, its
cgroup), attaches; any other process is refused (connection closed), logged and alerted.
The frontends are fake QEMUs (support.fake_qemu): separate processes with QEMU's command
line, optionally in a cgroup of their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import fake_qemu
from support.attach import run_cli
from support.daemon_status import volume_entry, wait_until

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.serverproc import ServerProcess

VM7 = uuid.UUID("6b9c1a2e-5f0d-4c1e-9a51-3a0f7e0c25a7")
VM8 = uuid.UUID("0d8f3c55-2b7e-4a0e-8f7c-1c2d3e4f5a6b")


def _alerts(control: Path, kind: str) -> list[dict[str, object]]:
    return [a for a in client.alerts(control) if a["kind"] == kind]


@pytest.fixture
def bound(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    path = tmp_path / "vol7.img"
    create_volume(path, CreateOptions(size=4 << 20, ring_size=1 << 20, vm_uuid=VM7, vm_name="vm7"))
    with ServerProcess([path], tmp_path) as server:
        yield server, path


@pytest.mark.timeout(120)
def test_the_bound_vm_attaches_and_others_are_refused(bound: tuple[ServerProcess, Path]) -> None:
    server, path = bound
    sock = server.socket_for(path)
    # The bound VM's QEMU: attached, does I/O, and status says who it is while it stays.
    qemu = fake_qemu.start(sock, name="vm7", vm_uuid=VM7, hold=True)
    try:
        assert fake_qemu.result(qemu) == {"attached": True}
        connection = volume_entry(server.control, "vol7")["connection"]
        assert connection is not None and connection["pid"] == qemu.pid
        identity = connection["identity"]
        assert (identity["pid"], identity["vm_name"], identity["vm_uuid"]) == (qemu.pid, "vm7", str(VM7))
        assert identity["cgroup"].startswith("/") and identity["exe"]
        assert connection["gid"] == os.getgid() and connection["since"] > 0
        text = run_cli("status", "--control", str(server.control))
        assert text.returncode == 0, text.stderr
        who = f"frontend pid {qemu.pid} uid {os.getuid()} gid {os.getgid()}, VM vm7 (uuid {VM7})"
        assert who in text.stdout, text.stdout
        assert "bound to VM name vm7, uuid " + str(VM7) in text.stdout
        listing = run_cli("ls", "--control", str(server.control))
        assert f"attached by vm7 pid {qemu.pid}" in listing.stdout, listing.stdout
    finally:
        qemu.communicate(timeout=30)
    assert _alerts(server.control, "attach-refused") == []
    wait_until(lambda: volume_entry(server.control, "vol7")["connection"] is None, what="detach")

    # Another VM's QEMU (same uid): the connection is closed before any vhost-user message.
    other = fake_qemu.start(sock, name="vm8", vm_uuid=VM8)
    outcome = fake_qemu.result(other)
    other.communicate(timeout=30)
    assert outcome["attached"] is False, outcome
    line = server.wait_log(rf"refused frontend pid={other.pid} ")
    assert "not the VM the volume is bound to" in line
    assert f"uuid {VM8} is not {VM7}" in line and "VM name 'vm8' is not 'vm7'" in line
    (alert,) = _alerts(server.control, "attach-refused")
    details = alert["details"]
    assert isinstance(details, dict)
    assert details["pid"] == other.pid and details["uid"] == os.getuid()
    assert details["differs"] == [f"uuid {VM8} is not {VM7}", "VM name 'vm8' is not 'vm7'"]
    assert details["identity"]["vm_name"] == "vm8"

    # A process that says nothing about itself, and one with only the right name: refused,
    # logged each time, alerted at most once a minute (QEMU may come back every second).
    for kwargs in ({}, {"name": "vm7"}):
        attempt = fake_qemu.run(sock, **kwargs)
        assert attempt["attached"] is False, (kwargs, attempt)
    assert server.log().count("not the VM the volume is bound to") == 3
    assert len(_alerts(server.control, "attach-refused")) == 1
    entry = volume_entry(server.control, "vol7")
    assert entry["refused_total"] == 3 and entry["connection"] is None

    # The same VM again, a new process: admitted (the check is the identity, not a pid).
    assert fake_qemu.run(sock, name="vm7", vm_uuid=VM7) == {"attached": True}


@pytest.mark.timeout(120)
def test_a_cgroup_binding_refuses_a_peer_in_another_cgroup(tmp_path: Path) -> None:
    path = tmp_path / "volc.img"
    create_volume(path, CreateOptions(size=4 << 20, ring_size=1 << 20))
    tag = f"vpv-test-{os.getpid()}"
    with fake_qemu.cgroup(tag) as inside, fake_qemu.cgroup(tag + "x") as sibling, \
            ServerProcess([path], tmp_path) as server:
        sock = server.socket_for(path)
        bound = fake_qemu.cgroup_path(inside)
        done = run_cli("bind-vm", "--control", str(server.control), "volc", "--cgroup", bound, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["vm_cgroup"] == bound
        # The same -name everywhere: only the cgroup tells them apart.
        assert fake_qemu.run(sock, name="vm7", cgroup=inside) == {"attached": True}
        for where in (None, sibling):  # the test's own cgroup; "/vpv-test-Nx" is not below "/vpv-test-N"
            outcome = fake_qemu.run(sock, name="vm7", cgroup=where)
            assert outcome["attached"] is False, (where, outcome)
        log = server.log()
        assert log.count(f"not the VM the volume is bound to (cgroup {bound})") == 2
        assert f"cgroup '{bound}x' is not under '{bound}'" in log


@pytest.mark.timeout(120)
def test_bind_vm_through_the_daemon(tmp_path: Path) -> None:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=4 << 20, ring_size=1 << 20))
    with ServerProcess([path], tmp_path) as server:
        sock = server.socket_for(path)
        control = str(server.control)
        # Unbound: any process of an allowed uid attaches, as before.
        held = fake_qemu.start(sock, name="vm8", hold=True)
        try:
            assert fake_qemu.result(held) == {"attached": True}
            done = run_cli("bind-vm", "--control", control, "vol0", "--name", "vm7", "--uuid", str(VM7),
                           "--json")
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout)
            assert (reply["vm_name"], reply["vm_uuid"]) == ("vm7", str(VM7))
            # The frontend attached now is not the VM now bound: it stays, the reply says so.
            assert reply["attached_matches"] is False
        finally:
            held.communicate(timeout=30)
        assert server.wait_log(r"control: vol0 bound to name vm7, uuid .* by pid=\d+ uid=0")
        assert fake_qemu.run(sock, name="vm8", vm_uuid=VM8)["attached"] is False
        assert fake_qemu.run(sock, name="vm7", vm_uuid=VM7) == {"attached": True}
        # The options replace the whole binding.
        assert run_cli("bind-vm", "--control", control, "vol0", "--name", "vm8").returncode == 0
        header = volume_entry(server.control, "vol0")["header"]
        assert (header["vm_name"], header["vm_uuid"], header["vm_cgroup"]) == ("vm8", "", "")
        assert fake_qemu.run(sock, name="vm8") == {"attached": True}
        # Usage errors never reach the daemon.
        for bad in ([], ["--clear", "--name", "x"], ["--uuid", "00000000-0000-0000-0000-000000000000"],
                    ["--cgroup", "a/b"]):
            refused = run_cli("bind-vm", "--control", control, "vol0", *bad)
            assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
        assert run_cli("bind-vm", "--control", control, "vol0", "--clear").returncode == 0
        assert fake_qemu.run(sock) == {"attached": True}
        assert run_cli("bind-vm", "--control", control, "vol0", "--name", "vm7").returncode == 0
    # Durable in the header (version 3), and shown by inspect.
    assert read_header(path).vm_name == "vm7"
    shown = run_cli("inspect", str(path), "--json")
    assert json.loads(shown.stdout)["vm_name"] == "vm7"


@pytest.mark.timeout(60)
def test_create_binds_offline_and_inspect_shows_it(tmp_path: Path) -> None:
    path = tmp_path / "vol9.img"
    scope = "machine-qemu\\x2d*\\x2dvm7.scope"
    done = run_cli("create", str(path), "--size", "4M", "--ring-size", "1M", "--vm-name", "vm7",
                   "--vm-uuid", str(VM7), "--vm-cgroup", scope)
    assert done.returncode == 0, done.stderr
    header = read_header(path)
    assert (header.vm_name, header.vm_uuid, header.vm_cgroup) == ("vm7", VM7, scope)
    shown = run_cli("inspect", str(path))
    fields = (line.partition(" ") for line in shown.stdout.splitlines())
    lines = {key: value.strip() for key, _, value in fields}
    assert (lines["vm_name"], lines["vm_uuid"], lines["vm_cgroup"]) == ("vm7", str(VM7), scope)
    bad = run_cli("create", str(tmp_path / "x.img"), "--size", "4M", "--vm-name", "n" * 65)
    assert bad.returncode == 2 and "at most 64 fit" in bad.stderr


@pytest.mark.timeout(120)
def test_a_daemon_that_cannot_see_the_peers_pid_refuses_it_when_bound(tmp_path: Path) -> None:
    """The daemon in a pid namespace of its own (as in a container): the frontend's pid is
    0 to it (SO_PEERCRED, SO_PEERPIDFD's fdinfo), so its identity cannot be read. A bound
    volume refuses it; an unbound one serves it as before, with no identity in status."""
    bound, free = tmp_path / "bound.img", tmp_path / "free.img"
    create_volume(bound, CreateOptions(size=4 << 20, ring_size=1 << 20, vm_name="vm7"))
    create_volume(free, CreateOptions(size=4 << 20, ring_size=1 << 20))
    sockets, control, log_path = tmp_path / "sockets", tmp_path / "control.sock", tmp_path / "log"
    sockets.mkdir()
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-m",
             "vhost_pv.cli", "serve", "--socket-dir", str(sockets), "--control", str(control),
             str(bound), str(free)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: control.exists() and (sockets / "free.sock").exists(), what="daemon start",
                   log=log_path.read_text)
        wait_until(lambda: _answers(control), what="control socket", log=log_path.read_text)
        outcome = fake_qemu.run(sockets / "bound.sock", name="vm7")
        assert outcome["attached"] is False, outcome
        text = log_path.read_text()
        assert ("bound: refused frontend pid=0 uid=0 gid=0: not the VM the volume is bound to (name vm7): "
                "the connecting process is in another pid namespace") in text, text
        held = fake_qemu.start(sockets / "free.sock", name="vm7", hold=True)
        try:
            assert fake_qemu.result(held) == {"attached": True}
            connection = volume_entry(control, "free")["connection"]
            assert connection["pid"] == 0 and connection["identity"] is None
        finally:
            held.communicate(timeout=30)
    finally:
        # unshare blocks SIGTERM while it waits: stop the daemon (its child) itself.
        # Should that fail, killing unshare kills the daemon too (--kill-child).
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        try:
            code = daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            raise
    assert code == 0, log_path.read_text()


def _answers(control: Path) -> bool:
    try:
        client.status(control)
    except OSError:
        return False
    return True
