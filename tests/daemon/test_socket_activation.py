"""`vhost-pv serve` under a service manager as systemd runs it: listening sockets passed
(socket activation / the fd store: dup'd to fds 3.., LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID
the daemon's own pid) are adopted, anything else passed is refused and never used; every
listener goes to the fd store (FDSTORE=1, FDNAME=) on a real NOTIFY_SOCKET listener, a
deleted volume's leaves it (FDSTOREREMOVE=1), and the stop leaves the kept socket files."""

from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.attach import Guest, pattern
from support.daemon_status import wait_until

from bench.restart import start_with_fds
from vhost_pv.control import client
from vhost_pv.handover import fd_name
from vhost_pv.volume.volume import CreateOptions, create_volume

MiB = 1 << 20


def _receive_all(listener: socket.socket) -> list[tuple[dict[str, str], list[int]]]:
    messages: list[tuple[dict[str, str], list[int]]] = []
    while True:
        try:
            data, ancillary, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(16 * 4), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return messages
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        messages.append((dict(line.split("=", 1) for line in data.decode().splitlines()), fds))


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    return sock


@pytest.mark.timeout(120)
def test_serve_adopts_passed_listeners_and_uses_the_fd_store(tmp_path: Path) -> None:
    volume = tmp_path / "vol0.img"
    create_volume(volume, CreateOptions(size=4 * MiB, ring_size=MiB))
    sockets = tmp_path / "s"
    sockets.mkdir()
    control = tmp_path / "control.sock"
    vol_sock = sockets / "vol0.sock"
    # As the manager holds them: the volume's listener under its store name, the control
    # socket under a socket unit's FileDescriptorName=, and two fds the daemon must refuse.
    passed_vol = _listener(vol_sock)
    passed_control = _listener(control)
    not_listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    not_listening.bind(str(tmp_path / "idle.sock"))
    pipe_read, pipe_write = os.pipe()
    fds = [passed_vol.fileno(), passed_control.fileno(), not_listening.fileno(), pipe_read]
    names = [fd_name(vol_sock), "control", "idle", "pipe"]
    notify = tmp_path / "notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(notify))
    inodes = (vol_sock.lstat().st_ino, control.lstat().st_ino)

    def arrange() -> None:  # in the child, as systemd does before exec
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way first
        for index, fd in enumerate(high):
            os.dup2(fd, 3 + index)

    env = dict(os.environ, NOTIFY_SOCKET=str(notify), FDSTORE="16", LISTEN_FDS=str(len(fds)),
               LISTEN_FDNAMES=":".join(names))
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        # The shell keeps its pid across exec: LISTEN_PID is the daemon's own pid.
        daemon = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m", "vhost_pv.cli", "serve",
             "--socket-dir", str(sockets), "--control", str(control), str(volume)],
            env=env, preexec_fn=arrange, close_fds=False, stdout=log, stderr=subprocess.STDOUT)
    try:
        read_log = log_path.read_text
        wait_until(lambda: "control socket at" in read_log(), 30, "the daemon up", read_log)
        # The control socket answers on the manager's listener: the daemon bound nothing new.
        status = client.status(control)
        assert status["pid"] == daemon.pid
        guest = Guest(vol_sock)
        try:
            guest.round_trip(0, pattern(4096, 1))
        finally:
            guest.close()
        assert (vol_sock.lstat().st_ino, control.lstat().st_ino) == inodes
        text = read_log()
        assert "refused a passed fd (name idle): not listening" in text, text
        assert "refused a passed fd (name pipe): not a socket" in text, text
        messages = _receive_all(manager)
        stored = {fields["FDNAME"]: got for fields, got in messages if fields.get("FDSTORE") == "1"}
        removed = [fields["FDNAME"] for fields, _ in messages if fields.get("FDSTOREREMOVE") == "1"]
        assert set(stored) == {fd_name(vol_sock), fd_name(control)}, messages
        # The very sockets the manager passed, not copies bound anew.
        for name, original in ((fd_name(vol_sock), passed_vol), (fd_name(control), passed_control)):
            assert len(stored[name]) == 1
            assert os.fstat(stored[name][0]).st_ino == os.fstat(original.fileno()).st_ino
        assert sorted(removed) == ["idle", "pipe"]  # refused fds leave the store
        for _, got in messages:
            for fd in got:
                os.close(fd)
        # Deleted for good: the volume's listener leaves the store.
        client.persistent_disk_dangling(control, "vol0", reason="gone")
        client.delete(control, "vol0")
        later: list[dict[str, str]] = []

        def removed_for_good() -> bool:
            later.extend(fields for fields, _ in _receive_all(manager))
            return {"FDSTOREREMOVE": "1", "FDNAME": fd_name(vol_sock)} in later

        wait_until(removed_for_good, 10, "FDSTOREREMOVE of the deleted volume", read_log)
        assert not vol_sock.exists()  # not served by anyone any more: its file goes too
        # A volume added at runtime joins the store; removed at runtime, it leaves it (its
        # file is kept on disk, only no longer served).
        vol1 = tmp_path / "vol1.img"
        create_volume(vol1, CreateOptions(size=4 * MiB, ring_size=MiB))
        vol1_sock = sockets / "vol1.sock"
        client.volume_add(control, vol1)

        def stored_vol1() -> bool:
            for fields, got in _receive_all(manager):
                later.append(fields)
                for fd in got:
                    os.close(fd)
            return {"FDSTORE": "1", "FDNAME": fd_name(vol1_sock)} in later

        wait_until(stored_vol1, 10, "FDSTORE of the added volume", read_log)
        client.volume_remove(control, "vol1")

        def vol1_removed() -> bool:
            later.extend(fields for fields, _ in _receive_all(manager))
            return {"FDSTOREREMOVE": "1", "FDNAME": fd_name(vol1_sock)} in later

        wait_until(vol1_removed, 10, "FDSTOREREMOVE of the removed volume", read_log)
        assert not vol1_sock.exists() and vol1.exists()
        daemon.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert daemon.wait(30) == 0, read_log()
        stop_s = time.monotonic() - began
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for sock in (passed_vol, passed_control, not_listening, manager):
            sock.close()
        os.close(pipe_read)
        os.close(pipe_write)
    # Kept in the manager's hands: the next daemon serves it, so its file stays.
    assert control.is_socket(), read_log()
    assert stop_s < 5, stop_s
    assert "Traceback" not in read_log()


@pytest.mark.timeout(60)
def test_a_passed_listener_whose_file_was_replaced_is_not_adopted(tmp_path: Path) -> None:
    """The file at the path is another socket (a daemon started by hand meanwhile, killed
    since, left its own): the kernel says the passed listener is bound to a different file,
    so it is dropped from the store and the daemon listens anew, reachable again."""
    volume = tmp_path / "vol0.img"
    create_volume(volume, CreateOptions(size=4 * MiB, ring_size=MiB))
    control = tmp_path / "control.sock"
    orphan = _listener(control)
    control.unlink()
    squatter = _listener(control)  # its file now; closed below as a killed daemon's would be
    squatter.close()
    notify = tmp_path / "notify"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(notify))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify), FDSTORE="16")
    log_path = tmp_path / "serve.log"
    serve = [sys.executable, "-m", "vhost_pv.cli", "serve", "--socket-dir", str(tmp_path / "s"),
             "--control", str(control), str(volume)]
    daemon = start_with_fds(serve, [orphan.fileno()], [fd_name(control)], log_path, env)
    try:
        wait_until(lambda: "control socket at" in log_path.read_text(), 30, "the daemon up",
                   log_path.read_text)
        assert client.status(control)["pid"] == daemon.pid  # through a listener bound anew
        assert "socket file is another socket's; listening anew" in log_path.read_text()
        messages = []
        for fields, fds in _receive_all(manager):
            messages.append(fields)
            for fd in fds:
                os.close(fd)
        assert {"FDSTOREREMOVE": "1", "FDNAME": fd_name(control)} in messages
        assert messages.index({"FDSTOREREMOVE": "1", "FDNAME": fd_name(control)}) < \
            messages.index({"FDSTORE": "1", "FDNAME": fd_name(control)})  # the new one stays stored
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        orphan.close()
        manager.close()
