"""One daemon per volume, per socket and per control path; nothing stale after a crash or a
failed start; SIGHUP does not kill the daemon."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from support.attach import Guest, pattern, run_cli
from support.daemon_status import wait_until

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


def _volume(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB))
    return path


def _serve(socket_dir: Path, control: Path, *volumes: Path) -> list[str]:
    return ["serve", "--socket-dir", str(socket_dir), "--control", str(control), *map(str, volumes)]


def _assert_first_unaffected(server: ServerProcess, volume: Path) -> None:
    """The first daemon still answers, still has its sockets, and still takes a frontend."""
    assert server.process is not None and server.process.poll() is None
    assert server.control.is_socket() and server.socket_for(volume).is_socket()
    assert client.status(server.control)["pid"] == server.pid
    guest = Guest(server.socket_for(volume))
    try:
        guest.round_trip(0, pattern(4096, 7))
    finally:
        guest.close()


def _refused(result_stderr: str, pid: int) -> None:
    lines = [line for line in result_stderr.splitlines() if line.startswith("vhost-pv: ")]
    assert len(lines) == 1, result_stderr
    assert str(pid) in lines[0], result_stderr
    assert "Traceback" not in result_stderr


@pytest.mark.timeout(60)
def test_second_daemon_on_the_same_volume_is_refused(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol.img")
    with ServerProcess([volume], tmp_path / "one") as server:
        other = tmp_path / "two"
        other.mkdir()  # serve refuses a control socket in a directory that does not exist
        result = run_cli(*_serve(other / "s", other / "c.sock", volume))
        assert result.returncode != 0
        _refused(result.stderr, server.pid)
        assert "already served" in result.stderr
        assert not list((other / "s").glob("*.sock")) and not (other / "c.sock").exists()
        _assert_first_unaffected(server, volume)


@pytest.mark.timeout(60)
def test_second_daemon_on_the_same_control_socket_is_refused(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol.img")
    other_volume = _volume(tmp_path / "b" / "other.img")
    with ServerProcess([volume], tmp_path / "one") as server:
        result = run_cli(*_serve(tmp_path / "s2", server.control, other_volume))
        assert result.returncode != 0
        _refused(result.stderr, server.pid)
        assert str(server.control) in result.stderr
        # The second daemon's own volume socket was created before the control socket: gone.
        assert not (tmp_path / "s2" / "other.sock").exists()
        _assert_first_unaffected(server, volume)


@pytest.mark.timeout(60)
def test_second_daemon_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol.img")
    namesake = _volume(tmp_path / "elsewhere" / "vol.img")  # same name: same socket path
    with ServerProcess([volume], tmp_path / "one") as server:
        result = run_cli(*_serve(server.socket_dir, tmp_path / "c2.sock", namesake))
        assert result.returncode != 0
        _refused(result.stderr, server.pid)
        assert str(server.socket_for(volume)) in result.stderr
        _assert_first_unaffected(server, volume)


@pytest.mark.timeout(60)
def test_same_volume_twice_on_one_command_line_is_refused(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol.img")
    result = run_cli(*_serve(tmp_path / "s", tmp_path / "c.sock", volume, volume))
    assert result.returncode != 0
    assert "already served by this daemon" in result.stderr, result.stderr
    assert not list((tmp_path / "s").glob("*")) and not (tmp_path / "c.sock").exists()


@pytest.mark.timeout(60)
def test_restart_after_kill_9(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol.img")
    server = ServerProcess([volume], tmp_path / "run", extra_args=["--meta-socket",
                                                                   str(tmp_path / "run" / "meta.sock")])
    server.start()
    server.kill()  # SIGKILL: sockets and lock files stay behind
    assert server.socket_for(volume).exists() and server.control.exists()
    with server:
        _assert_first_unaffected(server, volume)
    # A clean stop leaves nothing behind.
    assert not list(server.socket_dir.iterdir())
    assert not server.control.exists() and not (tmp_path / "run" / "meta.sock").exists()


@pytest.mark.timeout(60)
def test_sighup_keeps_the_daemon_and_reloads_the_policy(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol.img")
    with ServerProcess([volume], tmp_path / "plain") as server:
        os.kill(server.pid, signal.SIGHUP)
        wait_until(lambda: "nothing to reload" in server.log(), 5.0, "SIGHUP logged", server.log)
        _assert_first_unaffected(server, volume)
    policy = tmp_path / "policy.toml"
    policy.write_text("")
    other = _volume(tmp_path / "b" / "other.img")
    meta = ["--vm", "vm1", "--meta-socket", str(tmp_path / "meta.sock"), "--meta-policy", str(policy)]
    with ServerProcess([other], tmp_path / "meta", extra_args=meta) as server:
        os.kill(server.pid, signal.SIGHUP)
        wait_until(lambda: "metadata policy reloaded" in server.log(), 5.0, "reload logged", server.log)
        policy.write_text("this is [[ not toml")
        os.kill(server.pid, signal.SIGHUP)
        wait_until(lambda: "cannot reload" in server.log(), 5.0, "bad policy logged", server.log)
        _assert_first_unaffected(server, other)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["volume-socket", "control"])
def test_failed_start_leaves_no_sockets(tmp_path: Path, where: str) -> None:
    first = _volume(tmp_path / "a.img")
    second = _volume(tmp_path / "b.img")
    sockets = tmp_path / "s"
    sockets.mkdir()
    control = tmp_path / "c.sock"
    if where == "volume-socket":
        (sockets / "b.sock").mkdir()  # not a socket: the second volume cannot bind
    else:
        control = tmp_path / "no-such-dir" / "c.sock"  # after both volume sockets exist
    result = run_cli(*_serve(sockets, control, first, second))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    left = sorted(p.name for p in sockets.iterdir())
    assert left == (["b.sock"] if where == "volume-socket" else []), left
    assert (sockets / "b.sock").is_dir() if where == "volume-socket" else True
    # And the volumes are free for the next daemon.
    with ServerProcess([first, second], tmp_path / "next") as server:
        _assert_first_unaffected(server, first)


@pytest.mark.timeout(60)
def test_stop_does_not_unlink_a_socket_it_does_not_own(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vol.img")
    server = ServerProcess([volume], tmp_path / "run").start()
    path = server.socket_for(volume)
    # Someone replaced the socket file (an admin's mistake, another tool): not ours to remove.
    path.unlink()
    path.write_text("not ours")
    assert server.stop() == 0
    assert path.read_text() == "not ours"
    assert not server.control.exists()
