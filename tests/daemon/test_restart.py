"""Restarts frontends do not notice: under `vhost-pv supervise` the listening sockets outlive
the daemon (the supervisor's fd store, passed back with LISTEN_FDS), so a frontend connecting
while no daemon runs is queued in the backlog instead of refused, and the next daemon serves
it; the socket files are the same files throughout."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from support.attach import Guest, pattern, run_cli
from support.daemon_status import wait_until
from support.frontend import VhostUserFrontend, read_request

from vhost_pv.control import client
from vhost_pv.handover import fd_name
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import SupervisedServer

MiB = 1 << 20


def _volume(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB))
    return path


def _inode(path: Path) -> int:
    return path.lstat().st_ino


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


@pytest.mark.timeout(120)
def test_kill_9_under_supervise_listeners_accept_in_the_gap(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol0.img")
    meta = tmp_path / "run" / "meta.sock"
    # No standby: the next daemon starts cold, so there is a gap of a good part of a second.
    server = SupervisedServer([volume], tmp_path / "run", standby=False,
                              extra_args=["--meta-socket", str(meta)]).start()
    try:
        sock_path = server.socket_for(volume)
        inodes = (_inode(sock_path), _inode(server.control), _inode(meta))
        guest = Guest(sock_path)
        guest.round_trip(8, pattern(4096, 3))
        up = server.log().count("control socket at")
        old = server.kill_child()
        wait_until(lambda: _gone(old), 10, "the killed daemon gone", server.log)
        # No daemon now (the next one takes a good part of a second to start): the listeners
        # are the supervisor's, so these connects succeed at once rather than ECONNREFUSED.
        began = time.monotonic()
        frontend = VhostUserFrontend(sock_path, timeout=30)  # raises ConnectionRefusedError if refused
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(server.control))
        connected = time.monotonic() - began
        assert server.log().count("control socket at") == up, \
            "the next daemon was up already: the connects did not test the gap"
        guest.close()
        # The connection queued in the gap is the next daemon's: it answers it.
        try:
            assert frontend.get_features() != 0
        finally:
            frontend.close()
        server.wait_new_child(old)
        again = Guest(sock_path)
        try:
            read = again.frontend.submit(0, again.ring, read_request(again.memory, 8, 4096))
            assert read.data() == pattern(4096, 3)  # the volume, served again with its data
        finally:
            again.close()
        assert (_inode(sock_path), _inode(server.control), _inode(meta)) == inodes  # the same files
        log = server.log()
        for path in (sock_path, server.control, meta):
            assert f"{path}: adopted the passed listener" in log, log
        assert connected < 0.5, connected
        assert client.status(server.control)["volumes"][0]["name"] == "vol0"
    finally:
        code = server.stop()
    assert code == 0, server.log()
    # The supervisor's own stop: nobody serves the sockets any more, so their files go.
    assert not sock_path.exists() and not server.control.exists() and not meta.exists(), server.log()
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.timeout(120)
def test_frontend_queued_during_kill_9_is_served_by_the_next_daemon(tmp_path: Path) -> None:
    """A frontend that connects in the gap and negotiates at once (as QEMU does) gets its
    answers from the next daemon, without a reconnect."""
    volume = _volume(tmp_path / "vol0.img")
    with SupervisedServer([volume], tmp_path / "run", standby=False) as server:
        old = server.kill_child()
        wait_until(lambda: _gone(old), 10, "the killed daemon gone", server.log)
        began = time.monotonic()
        guest = Guest(server.socket_for(volume), timeout=30)  # connect + negotiate + queue 0
        try:
            guest.round_trip(0, pattern(8192, 9))
        finally:
            guest.close()
        served_after = time.monotonic() - began
        assert server.wait_new_child(old) != old
        assert served_after < 15, served_after


@pytest.mark.timeout(120)
def test_sigusr2_restarts_gracefully_and_keeps_the_sockets(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol0.img")
    with SupervisedServer([volume], tmp_path / "run") as server:
        sock_path = server.socket_for(volume)
        inodes = (_inode(sock_path), _inode(server.control))
        guest = Guest(sock_path)
        guest.round_trip(16, pattern(4096, 5))
        old = server.graceful_restart()
        # The attached frontend's connection is ended by the stopping daemon (QEMU reconnects);
        # it is not refused anything: the listener stays.
        assert guest.frontend.wait_closed(timeout=20)
        guest.close()
        new = server.wait_new_child(old)
        line = server.wait_log(rf"graceful restart: child pid {old} stopped in [0-9.]+ s \(exit 0\)")
        stop_s = float(re.search(r"stopped in ([0-9.]+) s", line).group(1))  # type: ignore[union-attr]
        assert stop_s < 1.5, line  # typically 0.02-0.05 s: the daemon exits without teardown
        again = Guest(sock_path)
        try:
            read = again.frontend.submit(0, again.ring, read_request(again.memory, 16, 4096))
            assert read.data() == pattern(4096, 5)
        finally:
            again.close()
        assert (_inode(sock_path), _inode(server.control)) == inodes
        assert new != old and not _gone(server.pid)


@pytest.mark.timeout(120)
def test_supervisor_stores_fds_only_from_its_child(tmp_path: Path) -> None:
    """SO_PASSCRED: an fd sent to the notify socket by any process but the child is closed,
    never passed to the next daemon; a deleted volume's listener leaves the store
    (FDSTOREREMOVE); the next daemon gets the store as systemd passes it."""
    volume = _volume(tmp_path / "vol0.img")
    doomed = _volume(tmp_path / "vol1.img")
    with SupervisedServer([volume, doomed], tmp_path / "run") as server:
        child = server.child_pid()
        env = _environ(child)
        notify = env["NOTIFY_SOCKET"]
        assert (os.stat(notify).st_mode & 0o777) == 0o600
        assert (os.stat(os.path.dirname(notify)).st_mode & 0o777) == 0o700
        read_end, write_end = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                sender.sendmsg([b"FDSTORE=1\nFDNAME=intruder"],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, read_end.to_bytes(4, "little"))],
                               0, notify)
        finally:
            os.close(read_end)
            os.close(write_end)
        server.wait_log(rf"notification from pid {os.getpid()} ignored")
        client.persistent_disk_dangling(server.control, "vol1", reason="gone")
        client.delete(server.control, "vol1")
        server.wait_log(rf"fd store: {re.escape(fd_name(server.socket_for(doomed)))} removed")
        # The standby is started again with the store as it is now.
        wait_until(lambda: server.log().split(" removed")[-1].count("started with 2 passed fd(s)") > 0, 20,
                   "a standby with the store after the removal", server.log)
        os.kill(child, signal.SIGKILL)
        new = server.wait_new_child(child)
        passed = _environ(new)
        names = passed["LISTEN_FDNAMES"].split(":")
        assert passed["LISTEN_PID"] == str(new) and passed["LISTEN_FDS"] == "2"
        assert sorted(names) == sorted([fd_name(server.socket_for(volume)), fd_name(server.control)])
        assert "intruder" not in server.log().split("ignored")[-1]


@pytest.mark.timeout(120)
def test_warm_standby_takes_over_a_kill_9_in_milliseconds(tmp_path: Path) -> None:
    """The supervisor keeps the next daemon started and waiting: after kill -9 it serves
    (control socket answering as the new pid) without a cold start of the interpreter."""
    volume = _volume(tmp_path / "vol0.img")
    with SupervisedServer([volume], tmp_path / "run") as server:
        # A standby started before the first daemon stored its fds is replaced: wait for one
        # started with the listeners, and warm.
        wait_until(lambda: "ready to take over" in server.log().rsplit("started with 2 passed fd(s)", 1)[-1]
                   and "started with 2 passed fd(s)" in server.log(),
                   30, "a warm standby with the listeners", server.log)
        old = server.child_pid()
        began = time.monotonic()
        os.kill(old, signal.SIGKILL)
        new = server.wait_new_child(old)
        took = time.monotonic() - began
        # The daemon answering now is a standby that was waiting (not a cold start).
        assert f"standby pid {new} takes over" in server.log(), server.log()
        assert f"standby pid {new} ready to take over" in server.log(), server.log()
        guest = Guest(server.socket_for(volume))
        try:
            guest.round_trip(0, pattern(4096, 2))
        finally:
            guest.close()
        print(f"kill -9 to the standby answering: {took:.3f} s")
        assert took < 1.0, (took, server.log())


@pytest.mark.timeout(60)
def test_supervise_gives_up_on_a_usage_error_and_backs_off_a_crash_loop(tmp_path: Path) -> None:
    """A command line the daemon refuses is not restarted for ever (exit 2 at once); a daemon
    that keeps dying young is restarted with a growing delay, not in a tight loop."""
    result = run_cli("supervise", "--", "serve", "--no-such-option", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "usage error (2): not restarting" in result.stderr, result.stderr
    volume = _volume(tmp_path / "vol0.img")
    server = SupervisedServer([volume], tmp_path / "run", standby=False).start()
    try:
        volume.unlink()  # from now on every start fails: nothing to serve
        os.kill(server.child_pid(), signal.SIGKILL)
        wait_until(lambda: "restarting in 0.4 s" in server.log(), 30, "the back-off growing", server.log)
        assert server.log().count("restarting at once") <= 2, server.log()
    finally:
        code = server.stop()
    assert code == 0, server.log()


@pytest.mark.timeout(60)
def test_supervise_passes_sighup_on(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol0.img")
    with SupervisedServer([volume], tmp_path / "run") as server:
        child = server.child_pid()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_log(r"SIGHUP: nothing to reload")
        assert server.child_pid() == child  # reloaded, not restarted


@pytest.mark.timeout(60)
def test_supervise_watchdog_is_fed_by_the_daemon(tmp_path: Path) -> None:
    """--watchdog: the daemon gets WATCHDOG_USEC/WATCHDOG_PID as from systemd and pings from
    its event loop; READY and STATUS reach the supervisor; a fed watchdog restarts nothing."""
    volume = _volume(tmp_path / "vol0.img")
    server = SupervisedServer([volume], tmp_path / "run")
    server.extra_supervise_args = ["--watchdog", "1"]
    with server:
        child = server.child_pid()
        server.wait_log(rf"child pid {child} ready")
        server.wait_log(r"child status: 1 volume served")
        time.sleep(3)  # three intervals
        assert server.child_pid() == child
        assert "watchdog:" not in server.log(), server.log()
