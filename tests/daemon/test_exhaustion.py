"""Resource exhaustion and stalled peers: the daemon (a subprocess) is run out of fds, flooded
and fed half messages; afterwards a frontend attaches and the control socket answers."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.attach import Guest, pattern
from support.daemon_status import volume_entry, wait_until

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


def _open_fds(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


def _lowest_free_fd(pid: int) -> int:
    """The fd number the daemon's next open/accept would get: with RLIMIT_NOFILE set to it,
    that call fails with EMFILE."""
    used = _open_fds(pid)
    fd = 0
    while fd in used:
        fd += 1
    return fd


@contextlib.contextmanager
def _fd_limit(pid: int, headroom: int) -> Iterator[int]:
    """The daemon's soft RLIMIT_NOFILE set `headroom` fds above its lowest free fd number
    (0: its next open or accept fails with EMFILE); yields the limit."""
    # The soft limit only: raising a hard limit back needs CAP_SYS_RESOURCE.
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = _lowest_free_fd(pid) + headroom
    try:
        # An fd the daemon closes meanwhile (the last status request's connection) opens a
        # hole below the limit: lower it again until the fd table is still.
        for _ in range(50):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, old[1]))
            time.sleep(0.05)
            lowest = _lowest_free_fd(pid) + headroom
            if lowest >= limit:
                break
            limit = lowest
        yield limit
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ServerProcess]:
    path = tmp_path / "vol.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB))
    args = ["--vm", "vm1", "--meta-http", "127.0.0.1:0", "--meta-socket", str(tmp_path / "meta.sock"),
            "--peer-timeout", "1"]
    with ServerProcess([path], tmp_path / "run", extra_args=args) as server:
        yield server
        assert server.process is not None and server.process.poll() is None
        assert "Traceback" not in server.log()


def _volume_socket(server: ServerProcess) -> Path:
    return server.socket_for(server.volumes[0])


def _http_port(server: ServerProcess) -> int:
    return int(client.status(server.control)["metadata"]["http"].rsplit(":", 1)[1])


def _unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def _tcp(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def _http_get(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/computeMetadata/v1/instance/",
                                     headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return str(reply.read().decode())


def _attach_and_write(server: ServerProcess, seed: int) -> None:
    guest = Guest(_volume_socket(server), timeout=10.0)
    try:
        guest.round_trip(8 * seed, pattern(4096, seed))
    finally:
        guest.close()
    wait_until(lambda: volume_entry(server.control, "vol")["connection"] is None, 5.0, "detached")


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """The daemon closed the connection (EOF or reset) within timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.timeout(60)
def test_accept_failures_are_survived(daemon: ServerProcess) -> None:
    server = daemon
    port = _http_port(server)
    meta_socket = Path(server.extra_args[server.extra_args.index("--meta-socket") + 1])
    waiting: list[socket.socket] = []
    with _fd_limit(server.pid, 0):
        try:
            # Each connection waits in its listener's backlog; every accept() fails (EMFILE).
            waiting += [_unix(_volume_socket(server)), _unix(server.control), _unix(meta_socket), _tcp(port)]
            for what in ("vol", "control socket", "metadata fs", "metadata http"):
                wait_until(lambda w=what: f"{w}: accept() failed" in server.log(), 10.0,  # type: ignore[misc]
                           f"{what}: accept failure logged", server.log)
            # Let the loops retry a few times (back-off up to 1 s) while fds stay short.
            time.sleep(1.5)
        finally:
            for sock in waiting:
                sock.close()
    # fds are free again: every listener accepts again.
    wait_until(lambda: volume_entry(server.control, "vol")["connection"] is None
               and volume_entry(server.control, "vol")["connections_total"] >= 1, 10.0,
               "the volume's pending connection accepted", server.log)
    _attach_and_write(server, 1)
    _http_get(port)  # the HTTP server answers again
    assert client.status(server.control)["pid"] == server.pid
    log = server.log()
    for what in ("vol", "control socket", "metadata fs", "metadata http"):
        # Rate-limited: one report per listener, however often it retried.
        assert log.count(f"{what}: accept() failed") == 1, log
        assert f"{what}: accepting again" in log, log


@pytest.mark.timeout(60)
def test_silent_and_half_message_frontends_lose_the_slot(daemon: ServerProcess) -> None:
    server = daemon
    silent = _unix(_volume_socket(server))
    try:
        wait_until(lambda: volume_entry(server.control, "vol")["connection"] is not None, 5.0, "attached")
        # It never sends a message: dropped after the first-message deadline (1 s here).
        assert _closed_by_peer(silent, 5.0)
        wait_until(lambda: volume_entry(server.control, "vol")["connection"] is None, 5.0,
                   "silent frontend dropped", server.log)
    finally:
        silent.close()
    assert "no message within 1 s of connecting" in server.log()
    half = _unix(_volume_socket(server))
    try:
        half.sendall(b"\x01\x00\x00\x00")  # 4 of the 12 header bytes, then nothing
        assert _closed_by_peer(half, 5.0)
    finally:
        half.close()
    wait_until(lambda: "a message header begun did not arrive within 1 s" in server.log(), 5.0,
               "half header dropped", server.log)
    # A real frontend attaches after the stalled ones.
    _attach_and_write(server, 2)


@pytest.mark.timeout(60)
def test_control_and_http_stalled_peers_are_closed(daemon: ServerProcess) -> None:
    server = daemon
    port = _http_port(server)
    peers = {
        "control idle": _unix(server.control),
        "control half header": _unix(server.control),
        "http idle": _tcp(port),
        "http slow headers": _tcp(port),
    }
    try:
        peers["control half header"].sendall(b"VPV")
        peers["http slow headers"].sendall(b"GET /computeMetadata/v1/ HTTP/1.1\r\nHost: x\r\n")
        for what, sock in peers.items():
            assert _closed_by_peer(sock, 5.0), f"{what}: still open"
    finally:
        for sock in peers.values():
            sock.close()
    assert client.status(server.control)["pid"] == server.pid
    _http_get(port)


@pytest.mark.timeout(60)
def test_idle_http_connections_do_not_starve_vhost_user(daemon: ServerProcess) -> None:
    server = daemon
    port = _http_port(server)
    flood: list[socket.socket] = []
    with _fd_limit(server.pid, 100) as limit:
        try:
            for _ in range(300):
                flood.append(_tcp(port))
            # Until the daemon has dealt with the flood: turned it away, or run out of fds.
            wait_until(lambda: "connection closed at accept" in server.log()
                       or len(_open_fds(server.pid)) >= limit - 1, 10.0, "flood handled", server.log)
            _attach_and_write(server, 3)
            assert client.status(server.control)["pid"] == server.pid
        finally:
            for sock in flood:
                sock.close()
