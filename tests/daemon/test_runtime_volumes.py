"""Volumes added and removed while the daemon runs (`vhost-pv add` / `remove`), each with its
own options, never disturbing another volume's I/O; and `serve --state-dir`, which serves the
same set again after a restart (kill -9 included)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from support.attach import Guest, pattern, run_cli
from support.daemon_status import volume_entry, wait_until
from support.frontend import VIRTIO_BLK_S_OK, read_request, write_request

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume, read_header
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
SECTOR = 512


def _volume(path: Path, size: int = 4 * MiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    create_volume(path, CreateOptions(size=size, ring_size=MiB))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lock_is_free(path: Path) -> bool:
    """Nobody holds the volume's flock (what `serve` takes on every volume it serves)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _ctl(server: ServerProcess, *args: str) -> tuple[int, str, str]:
    command, rest = args[0], args[1:]
    done = run_cli(command, "--control", str(server.control), *rest)
    return done.returncode, done.stdout, done.stderr


def _add(server: ServerProcess, path: Path, *options: str) -> dict[str, object]:
    code, out, err = _ctl(server, "add", str(path), *options, "--json")
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


class Bystander(threading.Thread):
    """A frontend doing write+read round trips on another volume the whole time."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(daemon=True)
        self.guest = Guest(socket_path)
        self.done = threading.Event()
        self.ops = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self.guest.round_trip((self.ops % 64) * 8, pattern(4096, self.ops))
                self.ops += 1
        except BaseException as exc:
            self.error = exc

    def progressing(self) -> None:
        """It has done at least a few more round trips since now."""
        start = self.ops
        wait_until(lambda: self.ops >= start + 5 or self.error is not None, 10, "bystander I/O")
        assert self.error is None, self.error

    def finish(self) -> int:
        self.done.set()
        self.join(15)
        self.guest.close()
        assert self.error is None, self.error
        return self.ops


def _served_names(server: ServerProcess) -> list[str]:
    return [v["name"] for v in client.status(server.control)["volumes"]]


@pytest.mark.timeout(120)
def test_add_and_remove_while_another_volume_serves_io(tmp_path: Path) -> None:
    first = _volume(tmp_path / "vols" / "first.img")
    second = _volume(tmp_path / "vols" / "second.img")
    with ServerProcess([first], tmp_path / "d") as server:
        bystander = Bystander(server.socket_for(first))
        bystander.start()
        try:
            bystander.progressing()
            reply = _add(server, second, "--queues", "2", "--read-only")
            assert reply["volume"] == "second" and reply["socket"] == str(server.socket_for(second))
            assert reply["options"] == {"queues": 2, "read_only": True, "direct": False}
            bystander.progressing()
            # The added volume is served with its own options: 2 queues, read-only.
            entry = volume_entry(server.control, "second")
            assert entry["options"] == {"queues": 2, "read_only": True, "direct": False}
            assert entry["read_only"] is True
            assert volume_entry(server.control, "first")["options"] == {
                "queues": 1, "read_only": False, "direct": False}
            guest = Guest(server.socket_for(second))
            try:
                assert guest.frontend.get_queue_num() == 2
                assert guest.write(0, pattern(4096, 1)) != VIRTIO_BLK_S_OK  # read-only
                read = guest.frontend.submit(0, guest.ring, read_request(guest.memory, 0, 4096))
                assert read.status == VIRTIO_BLK_S_OK
            finally:
                guest.close()
            wait_until(lambda: volume_entry(server.control, "second")["connection"] is None, 10,
                       "the second frontend gone")
            code, _, err = _ctl(server, "remove", "second")
            assert code == 0, err
            bystander.progressing()
            assert _served_names(server) == ["first"]
            assert not server.socket_for(second).exists()
        finally:
            ops = bystander.finish()
        assert ops > 15
        totals = volume_entry(server.control, "first")["totals"]
        assert totals["io_errors"] == 0 and totals["bad_requests"] == 0


@pytest.mark.timeout(120)
def test_remove_is_refused_while_attached_and_force_ends_the_connection(tmp_path: Path) -> None:
    first = _volume(tmp_path / "vols" / "first.img")
    second = _volume(tmp_path / "vols" / "second.img")
    with ServerProcess([first, second], tmp_path / "d") as server:
        bystander = Bystander(server.socket_for(first))
        bystander.start()
        guest = Guest(server.socket_for(second))
        try:
            guest.round_trip(0, pattern(4096, 3))
            code, _, err = _ctl(server, "remove", "second")
            assert code == 1
            assert "frontend attached" in err and "--force" in err and "Device or resource busy" in err
            guest.round_trip(8, pattern(4096, 4))  # still served, the connection untouched

            # Writes keep coming on the second volume while it is removed with --force: every
            # write the frontend saw acknowledged is in the file afterwards.
            acknowledged: list[int] = []
            writer_done = threading.Event()

            def writer() -> None:
                sector = 16
                try:
                    while True:
                        request = write_request(guest.memory, sector, pattern(4096, sector))
                        request.submit(guest.ring)
                        guest.frontend.kick(0)
                        guest.frontend.wait_used(0, guest.ring, timeout=2)
                        if request.status == VIRTIO_BLK_S_OK:
                            acknowledged.append(sector)
                        sector += 8
                        if sector >= 4 * MiB // SECTOR:
                            sector = 16
                except (OSError, TimeoutError):
                    pass  # the connection ended under it: expected
                finally:
                    writer_done.set()

            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            wait_until(lambda: len(acknowledged) >= 20, 10, "writes on the second volume")
            code, out, err = _ctl(server, "remove", "second", "--force", "--json")
            assert code == 0, err
            assert json.loads(out)["disconnected_pid"] == os.getpid()
            assert guest.frontend.wait_closed(5), "the daemon did not close the connection"
            assert writer_done.wait(10)
            bystander.progressing()
            assert _served_names(server) == ["first"]
            assert not server.socket_for(second).exists()
            assert not Path(str(server.socket_for(second)) + ".lock").exists()
            assert _lock_is_free(second)
            assert "second: ending the connection of frontend" in server.log()
        finally:
            guest.close()
            bystander.finish()
        header = read_header(second)
        with open(second, "rb") as f:
            for sector in [0, 8, *acknowledged]:
                f.seek(header.data_offset + sector * SECTOR)
                expected = pattern(4096, 3 if sector == 0 else 4 if sector == 8 else sector)
                assert f.read(4096) == expected, f"acknowledged write at sector {sector} lost"
        # The first volume never saw a thing.
        totals = volume_entry(server.control, "first")["totals"]
        assert totals["io_errors"] == 0


@pytest.mark.timeout(120)
def test_removed_volume_is_intact_and_can_be_added_again(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vols" / "vol.img")
    with ServerProcess([], tmp_path / "d") as server:
        _add(server, volume)
        guest = Guest(server.socket_for(volume))
        try:
            guest.round_trip(64, pattern(8192, 9))
        finally:
            guest.close()
        wait_until(lambda: volume_entry(server.control, "vol")["connection"] is None, 10, "detach")
        header_before = read_header(volume)
        code, _, err = _ctl(server, "remove", "vol")
        assert code == 0, err
        assert _lock_is_free(volume)
        # The file is untouched by the remove: same bytes with the daemon gone from it.
        digest = _sha(volume)
        assert read_header(volume) == header_before
        assert "vol" not in _served_names(server)
        code, _, err = _ctl(server, "remove", "vol")
        assert code == 1 and "no volume named 'vol'" in err

        _add(server, volume, "--direct")
        assert volume_entry(server.control, "vol")["options"]["direct"] is True
        guest = Guest(server.socket_for(volume))
        try:
            read = guest.frontend.submit(0, guest.ring, read_request(guest.memory, 64, 8192))
            assert read.status == VIRTIO_BLK_S_OK and read.data() == pattern(8192, 9)
        finally:
            guest.close()
        code, _, err = _ctl(server, "remove", "vol")
        assert code == 0, err
        assert _sha(volume) == digest


@pytest.mark.timeout(120)
def test_add_refuses_bad_files_and_leaves_nothing(tmp_path: Path) -> None:
    served = _volume(tmp_path / "vols" / "vol.img")
    clash = _volume(tmp_path / "other" / "vol.img")  # same name, other file: same socket name
    corrupt = tmp_path / "vols" / "corrupt.img"
    corrupt.write_bytes(os.urandom(4 * MiB))
    truncated = _volume(tmp_path / "vols" / "short.img")
    os.truncate(truncated, 2 * MiB)
    link = tmp_path / "vols" / "alias.img"
    link.symlink_to(served)
    elsewhere = _volume(tmp_path / "vols" / "elsewhere.img")
    with ServerProcess([served], tmp_path / "d") as server, \
            ServerProcess([elsewhere], tmp_path / "e") as other_daemon:
        cases = [
            (tmp_path / "vols" / "missing.img", "No such file or directory"),
            (corrupt, "Invalid argument"),
            (truncated, "truncated"),
            (tmp_path / "vols", "not a volume"),
            (served, "already served here as vol"),
            (link, "already served here as vol"),
            (clash, "a volume named vol is already served"),
            (elsewhere, f"vhost-pv daemon pid {other_daemon.pid}"),
        ]
        for path, reason in cases:
            code, _, err = _ctl(server, "add", str(path))
            assert code == 1, path
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("vhost-pv: ") and reason in lines[0], err
        assert sorted(p.name for p in server.socket_dir.iterdir()) == ["vol.sock", "vol.sock.lock"]
        state = client.status(server.control)
        assert [v["name"] for v in state["volumes"]] == ["vol"] and state["failed"] == []
        for path in (corrupt, truncated, clash):
            assert _lock_is_free(path)
        # The refused adds did not disturb the served volume.
        guest = Guest(server.socket_for(served))
        try:
            guest.round_trip(0, pattern(4096, 5))
        finally:
            guest.close()
        code, _, err = _ctl(server, "add", str(served), "--queues", "99")
        assert code == 2 and "out of range 1..16" in err


@pytest.mark.timeout(120)
def test_state_dir_serves_the_same_set_after_kill_9(tmp_path: Path) -> None:
    one = _volume(tmp_path / "vols" / "one.img")
    two = _volume(tmp_path / "vols" / "two.img")
    state_dir = tmp_path / "state"
    args = ["--state-dir", str(state_dir)]
    server = ServerProcess([], tmp_path / "d", extra_args=args).start()
    try:
        assert _served_names(server) == []
        _add(server, one, "--queues", "2", "--direct")
        _add(server, two, "--read-only")
        guest = Guest(server.socket_for(one))
        try:
            guest.round_trip(0, pattern(4096, 11))
        finally:
            guest.close()
        saved = json.loads((state_dir / "served.json").read_text())
        assert saved["version"] == 1
        assert [v["path"] for v in saved["volumes"]] == [str(one), str(two)]
        assert sorted(p.name for p in state_dir.iterdir()) == ["served.json", "served.lock"]
        server.kill()
    finally:
        server.kill()

    # Restarted with nothing but the state directory: the same two, with their options.
    with ServerProcess([], tmp_path / "d", extra_args=args) as server:
        wait_until(lambda: server.socket_for(one).exists() and server.socket_for(two).exists(), 10,
                   "both sockets")
        volumes = {v["name"]: v for v in client.status(server.control)["volumes"]}
        assert volumes["one"]["options"] == {"queues": 2, "read_only": False, "direct": True}
        assert volumes["two"]["options"] == {"queues": 1, "read_only": True, "direct": False}
        guest = Guest(server.socket_for(one))
        try:
            read = guest.frontend.submit(0, guest.ring, read_request(guest.memory, 0, 4096))
            assert read.data() == pattern(4096, 11)
        finally:
            guest.close()
        code, out, _ = _ctl(server, "ls")
        assert code == 0
        lines = {line.split()[0]: line for line in out.splitlines()}
        assert "q2,direct" in lines["one"] and "q1,ro" in lines["two"]
        # Removing is remembered too.
        code, _, err = _ctl(server, "remove", "two")
        assert code == 0, err
        saved = json.loads((state_dir / "served.json").read_text())
        assert [v["path"] for v in saved["volumes"]] == [str(one)]
        assert not (state_dir / "served.json.tmp").exists()
    with ServerProcess([], tmp_path / "d", extra_args=args) as server:
        assert _served_names(server) == ["one"]


@pytest.mark.timeout(120)
def test_command_line_volumes_join_the_set_and_keep_remembered_options(tmp_path: Path) -> None:
    one = _volume(tmp_path / "vols" / "one.img")
    two = _volume(tmp_path / "vols" / "two.img")
    state_dir = tmp_path / "state"
    args = ["--state-dir", str(state_dir)]
    with ServerProcess([one], tmp_path / "d", extra_args=args) as server:
        code, _, err = _ctl(server, "remove", "one")
        assert code == 0, err
        _add(server, one, "--queues", "3")
    # `one` is on the command line again (with the daemon-wide 1 queue) and in the set with
    # 3: the remembered options win; `two` is new and joins the set.
    with ServerProcess([one, two], tmp_path / "d", extra_args=args) as server:
        assert volume_entry(server.control, "one")["options"]["queues"] == 3
        assert volume_entry(server.control, "two")["options"]["queues"] == 1
    with ServerProcess([], tmp_path / "d", extra_args=args) as server:
        assert sorted(_served_names(server)) == ["one", "two"]
        assert client.status(server.control)["served_set"]["file"] == str(state_dir / "served.json")
        code, out, _ = _ctl(server, "status")
        assert code == 0 and f"served set kept in {state_dir / 'served.json'}" in out


@pytest.mark.timeout(120)
def test_a_volume_of_the_set_that_cannot_be_opened_is_reported_kept_and_removable(tmp_path: Path) -> None:
    one = _volume(tmp_path / "vols" / "one.img")
    two = _volume(tmp_path / "vols" / "two.img")
    away = tmp_path / "away.img"
    state_dir = tmp_path / "state"
    args = ["--state-dir", str(state_dir)]
    with ServerProcess([one, two], tmp_path / "d", extra_args=[*args, "--direct"]):
        pass
    two.rename(away)  # the disk went away
    with ServerProcess([], tmp_path / "d", extra_args=args) as server:
        state = client.status(server.control)
        assert [v["name"] for v in state["volumes"]] == ["one"]
        assert state["failed"] == [{"path": str(two), "error": "No such file or directory",
                                    "options": {"queues": 1, "read_only": False, "direct": True}}]
        assert any(a["kind"] == "volume-failed" for a in client.alerts(server.control))
        code, out, _ = _ctl(server, "ls")
        assert code == 0
        assert any(line.split()[:2] == ["two", "failed"] and "q1,direct" in line for line in out.splitlines())
        saved = json.loads((state_dir / "served.json").read_text())
        assert [v["path"] for v in saved["volumes"]] == [str(one), str(two)]  # kept
        # The disk comes back: adding it serves it (with the options asked now).
        away.rename(two)
        _add(server, two, "--queues", "2")
        state = client.status(server.control)
        assert sorted(v["name"] for v in state["volumes"]) == ["one", "two"] and state["failed"] == []
        two.rename(away)
    with ServerProcess([], tmp_path / "d", extra_args=args) as server:
        assert [f["path"] for f in client.status(server.control)["failed"]] == [str(two)]
        code, out, err = _ctl(server, "remove", "two", "--json")
        assert code == 0, err
        assert json.loads(out)["was_failed"] is True
        assert client.status(server.control)["failed"] == []
        saved = json.loads((state_dir / "served.json").read_text())
        assert [v["path"] for v in saved["volumes"]] == [str(one)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", [b"", b"{\"version\": 1, \"volumes\": [{\"pa", b"\x00" * 64,
                                     b"{\"version\": 7, \"volumes\": []}",
                                     b"{\"version\": 1, \"volumes\": [{\"path\": \"rel.img\"}]}"])
def test_a_damaged_state_file_stops_the_start(tmp_path: Path, content: bytes) -> None:
    volume = _volume(tmp_path / "vols" / "vol.img")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "served.json").write_bytes(content)
    sockets = tmp_path / "s"
    result = run_cli("serve", "--socket-dir", str(sockets), "--control", str(tmp_path / "c.sock"),
                     "--state-dir", str(state_dir), str(volume))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("vhost-pv: ")]
    assert len(lines) == 1 and "served.json: not a usable served-volume state" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    # Nothing served, nothing left behind, the file as it was.
    assert not (tmp_path / "c.sock").exists() and not list(sockets.glob("*.sock*"))
    assert (state_dir / "served.json").read_bytes() == content
    assert _lock_is_free(volume)


@pytest.mark.timeout(60)
def test_serve_starts_empty_and_one_daemon_per_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with ServerProcess([], tmp_path / "a", extra_args=["--state-dir", str(state_dir)]) as server:
        assert client.status(server.control)["volumes"] == []
        other = tmp_path / "b"
        other.mkdir()
        result = run_cli("serve", "--socket-dir", str(other / "s"), "--control", str(other / "c.sock"),
                         "--state-dir", str(state_dir))
        assert result.returncode == 1
        assert f"state directory {state_dir} is in use by another vhost-pv daemon (pid {server.pid})" \
            in result.stderr
        assert not (other / "c.sock").exists()
    # Without a state directory an empty start is fine too; named volumes of which none can
    # be opened are a command-line mistake, refused as before.
    with ServerProcess([], tmp_path / "c") as server:
        assert client.status(server.control)["volumes"] == []
    missing = run_cli("serve", "--socket-dir", str(tmp_path / "d"), "--control", str(tmp_path / "d.sock"),
                      str(tmp_path / "missing.img"))
    assert missing.returncode == 1 and "no volume can be served" in missing.stderr
    # With one, the missing volume is listed and the daemon serves (the disk may come back).
    with ServerProcess([], tmp_path / "e", extra_args=[
            "--state-dir", str(tmp_path / "state2"), str(tmp_path / "missing.img")]) as server:
        assert [f["path"] for f in client.status(server.control)["failed"]] == [str(tmp_path / "missing.img")]


@pytest.mark.timeout(60)
def test_a_deleted_volume_leaves_the_set(tmp_path: Path) -> None:
    one = _volume(tmp_path / "vols" / "one.img")
    two = _volume(tmp_path / "vols" / "two.img")
    state_dir = tmp_path / "state"
    with ServerProcess([one, two], tmp_path / "d", extra_args=["--state-dir", str(state_dir)]) as server:
        code, _, err = _ctl(server, "delete", "two", "--force")
        assert code == 0, err
        assert not two.exists()
        saved = json.loads((state_dir / "served.json").read_text())
        assert [v["path"] for v in saved["volumes"]] == [str(one)]


@pytest.mark.timeout(60)
def test_a_command_line_alias_of_a_remembered_volume_is_the_same_volume(tmp_path: Path) -> None:
    volume = _volume(tmp_path / "vols" / "vol.img")
    alias = tmp_path / "by-id" / "vol.img"
    alias.parent.mkdir()
    alias.symlink_to(volume)
    args = ["--state-dir", str(tmp_path / "state")]
    with ServerProcess([], tmp_path / "d", extra_args=args) as server:
        _add(server, volume, "--queues", "2")
    # The same file through a symlink on the command line: served once, as remembered.
    with ServerProcess([alias], tmp_path / "d", extra_args=args) as server:
        (entry,) = client.status(server.control)["volumes"]
        assert entry["path"] == str(volume) and entry["options"]["queues"] == 2
    saved = json.loads((tmp_path / "state" / "served.json").read_text())
    assert [v["path"] for v in saved["volumes"]] == [str(volume)]


@pytest.mark.timeout(120)
def test_add_create_makes_the_volume_as_create_would_and_serves_it(tmp_path: Path) -> None:
    vols = tmp_path / "vols"
    vols.mkdir()
    state_dir = tmp_path / "state"
    with ServerProcess([], tmp_path / "d", extra_args=["--state-dir", str(state_dir)]) as server:
        reply = _add(server, vols / "new.img", "--create", "--size", "8M", "--ring-size", "2M",
                     "--owner", "web-1", "--read-policy", "zeros", "--ttl", "3600", "--ttl-action", "delete",
                     "--allow-uids", "0,1234", "--queues", "2")
        assert reply["created"] is True
        assert reply["options"] == {"queues": 2, "read_only": False, "direct": False}
        header = read_header(vols / "new.img")
        assert (header.capacity, header.ring_size, header.owner) == (8 * MiB, 2 * MiB, "web-1")
        assert header.read_policy.name == "ZEROS" and header.ttl_seconds == 3600
        assert header.ttl_action.name == "DELETE" and header.allowed_uids == (0, 1234)
        guest = Guest(server.socket_for(vols / "new.img"))
        try:
            guest.round_trip(0, pattern(4096, 21))
        finally:
            guest.close()
        # No uids named: the requester's, as `vhost-pv create` does.
        _add(server, vols / "mine.img", "--create", "--size", "4M", "--ring-size", "1M", "--read-only")
        mine = read_header(vols / "mine.img")
        assert mine.allowed_uids == (os.getuid(),) and mine.read_only
        assert volume_entry(server.control, "mine")["read_only"] is True
        saved = json.loads((state_dir / "served.json").read_text())
        assert [v["path"] for v in saved["volumes"]] == [str(vols / "new.img"), str(vols / "mine.img")]

        # Never over an existing file (served or not); the file is untouched.
        code, _, err = _ctl(server, "add", str(vols / "new.img"), "--create", "--size", "4M")
        assert code == 1 and "already served here as new" in err
        existing = _volume(vols / "existing.img")
        digest = _sha(existing)
        code, _, err = _ctl(server, "add", str(existing), "--create", "--size", "8M")
        assert code == 1 and "exists; refusing to overwrite" in err and "(File exists)" in err
        assert _sha(existing) == digest and _lock_is_free(existing)
        # Refused before creating anything: a name that is taken, a size create refuses.
        (tmp_path / "other").mkdir()
        code, _, err = _ctl(server, "add", str(tmp_path / "other" / "new.img"), "--create", "--size", "4M")
        assert code == 1 and "a volume named new is already served" in err
        assert not (tmp_path / "other" / "new.img").exists()
        code, _, err = _ctl(server, "add", str(vols / "odd.img"), "--create", "--size", "1000")
        assert code == 1 and "must be a positive multiple of 512" in err
        assert not (vols / "odd.img").exists()
        # Created, then its socket cannot be served: the file it created goes again.
        (server.socket_dir / "blocked.sock").write_text("not a socket")
        code, _, err = _ctl(server, "add", str(vols / "blocked.img"), "--create", "--size", "4M")
        assert code == 1 and "exists and is not a socket" in err
        assert not (vols / "blocked.img").exists() and _lock_is_free(vols / "new.img") is False
        assert sorted(_served_names(server)) == ["mine", "new"]
        # Options of a new volume without --create: a usage error, nothing sent.
        code, _, err = _ctl(server, "add", str(vols / "x.img"), "--size", "4M")
        assert code == 2 and "give --create too" in err
        code, _, err = _ctl(server, "add", str(vols / "x.img"), "--create")
        assert code == 2 and "needs --size" in err
