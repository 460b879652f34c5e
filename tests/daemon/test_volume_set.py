"""Settings of a served volume change live (`vhost-pv set`, the VOLUME_SET control command),
and offline on a file (`vhost-pv set-file`), against a real daemon:

- the read and ring-full policies reach the queue workers for the very next request (a
  frontend doing I/O on a dangling volume sees what it gets switch);
- a TTL change re-arms the guard's deadline (a limit already passed acts now, a shorter
  one in the future fires then even when no limit was running), the TTL action decides
  what happens at expiry;
- the next attach is checked against the new uids/gids; the attached frontend stays;
- the owner is set (resolved as `bind` does) and cleared, never on a dangling volume;
- bad requests are refused with EINVAL, whatever the client sends;
- `set-file` refuses a file a daemon serves, and what it wrote is served after a restart.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.attach import Guest, pattern, run_cli
from support.daemon_status import alert_kinds, header, volume_entry, wait_until
from support.frontend import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, read_request, write_request

from vhost_pv.control import client
from vhost_pv.control.wire import (
    CLEAR_OWNER,
    NO_SET_ID,
    SET_ALLOWED_UIDS,
    SET_IDS,
    SET_OWNER,
    SET_READ_POLICY,
    SET_TTL,
    Command,
    VolumeSetRequest,
)
from vhost_pv.volume.header import (
    SLOT_OFFSETS,
    SLOT_SIZE,
    ReadPolicy,
    RingFullPolicy,
    TtlAction,
    VolumeHeader,
)
from vhost_pv.volume.volume import CreateOptions, create_volume, inspect_header, read_header
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
NAME = "vol0"


def make_volume(tmp_path: Path, **options: Any) -> tuple[Path, VolumeHeader]:
    path = tmp_path / f"{NAME}.img"
    return path, create_volume(path, CreateOptions(size=8 * MiB, ring_size=MiB, **options))


class Attached(Guest):
    """A Guest whose requests reuse their guest memory (many large requests fit)."""

    def request(self, make: Any, *args: Any) -> tuple[int, bytes]:
        mark = self.memory.mark()
        try:
            done = self.frontend.submit(0, self.ring, make(self.memory, *args))
            return done.status, done.data() if done.status == VIRTIO_BLK_S_OK else b""
        finally:
            self.memory.rewind(mark)

    def read(self, sector: int, length: int) -> tuple[int, bytes]:
        return self.request(read_request, sector, length)

    def write_status(self, sector: int, data: bytes) -> int:
        return self.request(write_request, sector, data)[0]


@pytest.fixture
def attached(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    path, _ = make_volume(tmp_path, read_policy=ReadPolicy.DENY, ring_full_policy=RingFullPolicy.REJECT)
    with ServerProcess([path], tmp_path) as server:
        yield server, path


@pytest.mark.timeout(60)
def test_read_policy_change_reaches_the_next_read(attached: tuple[ServerProcess, Path]) -> None:
    server, path = attached
    data = pattern(64 << 10, 7)
    guest = Attached(server.socket_for(path))
    try:
        guest.round_trip(0, data)
        client.persistent_disk_dangling(server.control, NAME, reason="test")
        assert guest.read(0, len(data))[0] == VIRTIO_BLK_S_IOERR  # deny
        reply = client.volume_set(server.control, NAME, read_policy=ReadPolicy.ZEROS)
        assert reply["changed"] == {"read_policy": {"old": "deny", "new": "zeros"}}
        assert reply["frontend_attached"] is True
        # The very next request, on the same connection and queue: zeros, not an error.
        assert guest.read(0, len(data)) == (VIRTIO_BLK_S_OK, bytes(len(data)))
        client.volume_set(server.control, NAME, read_policy=ReadPolicy.ALLOW)
        assert guest.read(0, len(data)) == (VIRTIO_BLK_S_OK, data)
        client.volume_set(server.control, NAME, read_policy=ReadPolicy.DENY)
        assert guest.read(0, len(data))[0] == VIRTIO_BLK_S_IOERR
    finally:
        guest.close()
    # The guard saw each outcome in turn, and the header has the last policy.
    kinds = volume_entry(server.control, NAME)["guard"]["dangling_io_by_kind"]
    assert (kinds["read:read-denied"], kinds["read:read-zeros"], kinds["read:read-allowed"]) == (2, 1, 1)
    assert header(server.control, NAME)["read_policy"] == "deny"
    assert read_header(path).read_policy == ReadPolicy.DENY


@pytest.mark.timeout(60)
def test_ring_full_policy_change_reaches_the_next_write(attached: tuple[ServerProcess, Path]) -> None:
    server, path = attached
    chunk = 256 << 10
    guest = Attached(server.socket_for(path))
    try:
        client.persistent_disk_dangling(server.control, NAME, reason="test")
        statuses = [guest.write_status(i * chunk // 512, pattern(chunk, i)) for i in range(8)]
        # The 1 MiB ring takes a few 256 KiB records, then rejects (reject policy).
        assert VIRTIO_BLK_S_OK in statuses and statuses[-1] == VIRTIO_BLK_S_IOERR
        assert guest.write_status(0, pattern(chunk, 99)) == VIRTIO_BLK_S_IOERR
        dropped = volume_entry(server.control, NAME)["ring"]["dropped"]
        reply = client.volume_set(server.control, NAME, ring_full_policy=RingFullPolicy.OVERWRITE)
        assert reply["changed"] == {"ring_full_policy": {"old": "reject", "new": "overwrite"}}
        # The next write drops the oldest record instead of failing.
        assert guest.write_status(0, pattern(chunk, 100)) == VIRTIO_BLK_S_OK
        assert volume_entry(server.control, NAME)["ring"]["dropped"] > dropped
        client.volume_set(server.control, NAME, ring_full_policy=RingFullPolicy.REJECT)
        assert guest.write_status(0, pattern(chunk, 101)) == VIRTIO_BLK_S_IOERR
    finally:
        guest.close()


def _expired(server: ServerProcess) -> bool:
    return bool(volume_entry(server.control, NAME)["guard"]["ttl_expired"])


def _sealed(server: ServerProcess) -> bool:
    return bool(volume_entry(server.control, NAME)["guard"]["sealed"])


@pytest.mark.timeout(60)
def test_shorter_ttl_that_has_passed_fires_now(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path, ttl_seconds=3600, ttl_action=TtlAction.ALERT)
    with ServerProcess([path], tmp_path) as server:
        client.persistent_disk_dangling(server.control, NAME, reason="test")
        wait_until(lambda: _sealed(server))
        time.sleep(1.2)
        assert not _expired(server)
        reply = client.volume_set(server.control, NAME, ttl_seconds=1)
        assert reply["changed"] == {"ttl_seconds": {"old": 3600, "new": 1}}
        assert reply["ttl_deadline_ns"] <= time.time_ns()
        took = wait_until(lambda: "ttl-expired" in alert_kinds(server.control, NAME), timeout=5)
        assert took < 2
        assert _expired(server)
        server.wait_log(r"time limit now 1s, action alert: already passed")
        # The same limit given again (with another change) does not act a second time.
        client.volume_set(server.control, NAME, ttl_seconds=1, read_policy=ReadPolicy.ZEROS)
        time.sleep(0.5)
        assert alert_kinds(server.control, NAME).count("ttl-expired") == 1
        # Back to a long limit: re-armed, no longer expired.
        client.volume_set(server.control, NAME, ttl_seconds=3600)
        wait_until(lambda: not _expired(server), timeout=5)
        deadline = volume_entry(server.control, NAME)["guard"]["ttl_deadline_ns"]
        assert deadline > time.time_ns() + 3000 * 10**9
    assert path.exists() and read_header(path).ttl_seconds == 3600


@pytest.mark.timeout(60)
def test_ttl_set_while_dangling_without_one_fires_when_due(tmp_path: Path) -> None:
    """No limit running (the guard waits without a timeout): a limit set later wakes it,
    and it fires at its deadline, not before."""
    path, _ = make_volume(tmp_path)
    with ServerProcess([path], tmp_path) as server:
        flipped = client.persistent_disk_dangling(server.control, NAME, reason="test")
        wait_until(lambda: _sealed(server))
        due = flipped["dangling_since_ns"] + 3 * 10**9
        client.volume_set(server.control, NAME, ttl_seconds=3)
        assert volume_entry(server.control, NAME)["guard"]["ttl_deadline_ns"] in (None, due)
        wait_until(lambda: volume_entry(server.control, NAME)["guard"]["ttl_deadline_ns"] == due, timeout=5)
        wait_until(lambda: "ttl-expired" in alert_kinds(server.control, NAME), timeout=10)
        assert time.time_ns() >= due
        assert path.exists()


@pytest.mark.timeout(60)
def test_ttl_action_delete_to_alert_keeps_the_volume(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path, ttl_seconds=2, ttl_action=TtlAction.DELETE)
    with ServerProcess([path], tmp_path) as server:
        client.persistent_disk_dangling(server.control, NAME, reason="test")
        reply = client.volume_set(server.control, NAME, ttl_action=TtlAction.ALERT)
        assert reply["changed"] == {"ttl_action": {"old": "delete", "new": "alert"}}
        wait_until(lambda: "ttl-expired" in alert_kinds(server.control, NAME), timeout=10)
        time.sleep(0.5)
        assert "volume-deleted" not in alert_kinds(server.control, NAME)
        alert = [a for a in client.alerts(server.control) if a["kind"] == "ttl-expired"][-1]
        assert alert["details"]["action"] == "alert"
    assert path.exists() and read_header(path).dangling


@pytest.mark.timeout(60)
def test_ttl_action_alert_to_delete_after_expiry_deletes_now(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path, ttl_seconds=1, ttl_action=TtlAction.ALERT)
    with ServerProcess([path], tmp_path) as server:
        client.persistent_disk_dangling(server.control, NAME, reason="test")
        wait_until(lambda: "ttl-expired" in alert_kinds(server.control, NAME), timeout=10)
        assert path.exists()
        client.volume_set(server.control, NAME, ttl_action=TtlAction.DELETE)
        wait_until(lambda: not path.exists(), timeout=10)
        assert "volume-deleted" in alert_kinds(server.control, NAME)
        assert client.status(server.control)["volumes"] == []


def _refused(server: ServerProcess) -> int:
    return int(volume_entry(server.control, NAME)["refused_total"])


@pytest.mark.timeout(60)
def test_allowed_ids_are_checked_at_the_next_attach(attached: tuple[ServerProcess, Path]) -> None:
    server, path = attached
    me = os.getuid(), os.getgid()
    first = Attached(server.socket_for(path))
    try:
        reply = client.volume_set(server.control, NAME, allowed_uids=[4242], allowed_gids=[4243])
        assert reply["changed"]["allowed_uids"] == {"old": [me[0]], "new": [4242]}
        # The attached frontend is not kicked: it goes on doing I/O.
        first.round_trip(8, pattern(4096, 1))
    finally:
        first.close()
    wait_until(lambda: volume_entry(server.control, NAME)["connection"] is None)
    with pytest.raises((OSError, ConnectionError, EOFError, TimeoutError, RuntimeError)):
        Attached(server.socket_for(path), timeout=5).close()
    wait_until(lambda: _refused(server) == 1)
    server.wait_log(rf"refused frontend pid=\d+ uid={me[0]} gid={me[1]}: not allowed")
    # A gid is enough, as at create.
    client.volume_set(server.control, NAME, allowed_gids=[me[1]])
    again = Attached(server.socket_for(path))
    try:
        again.round_trip(16, pattern(4096, 2))
    finally:
        again.close()
    assert _refused(server) == 1
    assert read_header(path).allowed_uids == (4242,)
    assert read_header(path).allowed_gids == (me[1],)


@pytest.mark.timeout(60)
def test_owner_is_set_and_cleared_never_on_a_dangling_volume(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path, owner="ctr-0")
    with ServerProcess([path], tmp_path) as server:
        reply = client.volume_set(server.control, NAME, owner="ctr-1", owner_pid=os.getpid())
        assert reply["changed"]["owner"] == {"old": "ctr-0", "new": "ctr-1"}
        assert reply["changed"]["owner_pid"] == {"old": 0, "new": os.getpid()}
        # Without an engine the pid given is the owner's init, checked as `bind` does.
        with pytest.raises(client.ControlError) as info:
            client.volume_set(server.control, NAME, owner="ctr-2", owner_pid=4_000_000)
        assert info.value.status == -errno.ESRCH
        reply = client.volume_set(server.control, NAME, clear_owner=True)
        assert reply["settings"]["owner"] == "" and reply["settings"]["owner_pid"] == 0
        client.volume_set(server.control, NAME, owner="ctr-3")
        client.persistent_disk_dangling(server.control, NAME, reason="gone")
        for change in ({"owner": "ctr-4"}, {"clear_owner": True}):
            with pytest.raises(client.ControlError, match="reclaim") as info:
                client.volume_set(server.control, NAME, **change)
            assert info.value.status == -errno.EBUSY
        # The other settings still change while dangling.
        client.volume_set(server.control, NAME, read_policy=ReadPolicy.ZEROS)
    assert read_header(path).owner == "ctr-3"
    assert read_header(path).read_policy == ReadPolicy.ZEROS


def _raw_set(control: Path, **fields: Any) -> client.ControlError:
    request = {"volume": NAME, "mask": 0, "read_policy": 0, "ring_full_policy": 0, "ttl_action": 0,
               "ttl_seconds": 0, "allowed_uids": [NO_SET_ID] * SET_IDS, "allowed_gids": [NO_SET_ID] * SET_IDS,
               "owner": "", "owner_pid": 0, **fields}
    with pytest.raises(client.ControlError) as info:
        client.call(control, Command.VOLUME_SET, VolumeSetRequest.build(request))
    return info.value


@pytest.mark.timeout(60)
def test_bad_requests_are_refused(tmp_path: Path) -> None:
    path, before = make_volume(tmp_path)
    with ServerProcess([path], tmp_path) as server:
        for fields in (
            {"mask": 0},
            {"mask": 1 << 8},
            {"mask": SET_OWNER | CLEAR_OWNER, "owner": "x"},
            {"mask": SET_READ_POLICY, "read_policy": 3},
            {"mask": SET_TTL, "ttl_seconds": 1 << 63},
            {"mask": SET_ALLOWED_UIDS, "allowed_uids": [0, -5] + [NO_SET_ID] * 6},
            {"mask": SET_ALLOWED_UIDS, "allowed_uids": [0, NO_SET_ID, 7] + [NO_SET_ID] * 5},
        ):
            assert _raw_set(server.control, **fields).status == -errno.EINVAL, fields
        assert _raw_set(server.control, volume="nope", mask=SET_TTL).status == -errno.ENOENT
        # Fields outside the mask are ignored, whatever they hold.
        client.call(server.control, Command.VOLUME_SET, VolumeSetRequest.build({
            "volume": NAME, "mask": SET_TTL, "read_policy": 9, "ring_full_policy": 9, "ttl_action": 9,
            "ttl_seconds": 60, "allowed_uids": [-9] * 8, "allowed_gids": [-9] * 8, "owner": "?",
            "owner_pid": 1}))
        assert header(server.control, NAME)["ttl_seconds"] == 60
    after = read_header(path)
    assert (after.read_policy, after.allowed_uids, after.owner) == (
        before.read_policy, before.allowed_uids, before.owner)


def _lines(text: str) -> list[str]:
    """The output's lines with runs of spaces (the alignment) as one."""
    return [" ".join(line.split()) for line in text.splitlines()]


@pytest.mark.timeout(90)
def test_cli_set_and_set_file(tmp_path: Path) -> None:
    path, _ = make_volume(tmp_path)
    with ServerProcess([path], tmp_path) as server:
        control = str(server.control)
        done = run_cli("set", "--control", control, NAME, "--ttl", "1h", "--ttl-action", "delete",
                       "--read-policy", "zeros", "--ring-full-policy", "overwrite", "--uids", "0,107",
                       "--gids", "107", "--owner", "ctr-9")
        assert done.returncode == 0, done.stderr
        assert "time limit none → 1h00m" in _lines(done.stdout)
        assert "read policy deny → zeros" in _lines(done.stdout)
        assert "allowed uids 0 → 0,107" in _lines(done.stdout)
        # Who asked, and old → new, in the daemon's log.
        server.wait_log(r"control: settings of vol0 changed by pid=\d+ uid=0: ttl_seconds 0 → 3600; "
                        r"ttl_action 'alert' → 'delete'; read_policy 'deny' → 'zeros'")
        done = run_cli("set", "--control", control, NAME, "--ttl", "90m", "--no-owner", "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["changed"]["ttl_seconds"] == {"old": 3600, "new": 5400}
        assert result["changed"]["owner"] == {"old": "ctr-9", "new": ""}
        same = run_cli("set", "--control", control, NAME, "--ttl", "90m")
        assert same.returncode == 0 and "nothing changed" in same.stdout
        # A daemon holds the file: set-file refuses and says where to go.
        refused = run_cli("set-file", str(path), "--ttl", "5")
        assert refused.returncode == 1
        assert "already served by vhost-pv daemon pid" in refused.stderr and "vhost-pv set" in refused.stderr
        assert read_header(path).ttl_seconds == 5400
    done = run_cli("set-file", str(path), "--ttl", "2d", "--read-policy", "allow", "--owner", "ctr-offline",
                   "--uids", "")
    assert done.returncode == 0, done.stderr
    assert "time limit 1h30m → 2d00h" in _lines(done.stdout)
    assert "allowed uids 0,107 → none" in _lines(done.stdout)
    # What set-file wrote is what the next daemon serves.
    with ServerProcess([path], tmp_path / "again") as server:
        served = header(server.control, NAME)
        assert (served["ttl_seconds"], served["read_policy"], served["owner"], served["allowed_uids"]) == (
            2 * 86400, "allow", "ctr-offline", [])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [
    [],
    ["--ttl", "-1"],
    ["--ttl", "1y"],
    ["--ttl", str(1 << 63)],
    ["--uids", "1,2,3,4,5,6,7,8,9"],
    ["--gids", "-3"],
    ["--read-policy", "sometimes"],
    ["--owner", "a", "--no-owner"],
    ["--owner", "x" * 129],
])
def test_cli_validates_as_create_does(tmp_path: Path, argv: list[str]) -> None:
    path, before = make_volume(tmp_path)
    for command in (["set-file", str(path)], ["set", "--control", str(tmp_path / "no.sock"), NAME]):
        done = run_cli(*command, *argv)
        assert done.returncode == 2, (command, argv, done.stderr)
        assert done.stderr.startswith(("vhost-pv: ", "usage: ")), done.stderr
        assert "argument COMMAND: invalid choice" not in done.stderr  # the command exists
    assert read_header(path) == before


# A process that changes a file's settings back and forth, as fast as it can, until killed.
_FLIPPER = """
import sys
from pathlib import Path
from vhost_pv.volume.header import ReadPolicy, TtlAction
from vhost_pv.volume.settings import SettingsChange, apply_offline, owner_change
path = Path(sys.argv[1])
changes = [
    SettingsChange(ttl_seconds=100, ttl_action=TtlAction.ALERT, read_policy=ReadPolicy.ZEROS,
                   allowed_uids=(1, 2), owner=owner_change("owner-a")),
    SettingsChange(ttl_seconds=200, ttl_action=TtlAction.DELETE, read_policy=ReadPolicy.ALLOW,
                   allowed_uids=(3,), owner=owner_change("owner-b")),
]
print("ready", flush=True)
i = 0
while True:
    apply_offline(path, changes[i % 2])
    i += 1
"""
SETTINGS_SEEN = {
    (100, TtlAction.ALERT, ReadPolicy.ZEROS, (1, 2), "owner-a"),
    (200, TtlAction.DELETE, ReadPolicy.ALLOW, (3,), "owner-b"),
}


def _copies_differ(fd: int) -> bool:
    first, second = (os.pread(fd, SLOT_SIZE, offset) for offset in SLOT_OFFSETS)
    return first != second


def _settings_of(header: VolumeHeader) -> tuple[Any, ...]:
    return header.ttl_seconds, header.ttl_action, header.read_policy, header.allowed_uids, header.owner


@pytest.mark.timeout(120)
def test_set_file_killed_mid_update_leaves_old_or_new(tmp_path: Path) -> None:
    """kill -9 of a process updating a file's settings, caught between its two header
    copies (copies differ) and anywhere else: the file reads one complete set of settings,
    never a mix, and the next set-file and daemon take it as it is."""
    path, created = make_volume(tmp_path)
    initial = _settings_of(created)  # killed before its first update completed
    between = anywhere = 0
    for attempt in range(30):
        flipper = subprocess.Popen([sys.executable, "-c", _FLIPPER, str(path)], stdout=subprocess.PIPE)
        try:
            assert flipper.stdout is not None and flipper.stdout.readline() == b"ready\n"
            fd = os.open(path, os.O_RDONLY)
            try:
                if attempt % 2:  # anywhere: at some moment of its loop
                    time.sleep(0.005 * attempt)
                else:  # between the copies: stopped there, then killed
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        if _copies_differ(fd):
                            os.kill(flipper.pid, signal.SIGSTOP)
                            if _copies_differ(fd):
                                break
                            os.kill(flipper.pid, signal.SIGCONT)
                os.kill(flipper.pid, signal.SIGKILL)
                flipper.wait()
                differ = _copies_differ(fd)
            finally:
                os.close(fd)
        finally:
            flipper.kill()
            flipper.wait()
        resolution = inspect_header(path)
        if differ:
            between += 1
            # Both copies are whole records (a kill is not a torn write); they differ.
            assert all(problem == "" for problem in resolution.problems)
        else:
            anywhere += 1
        assert _settings_of(resolution.header) in {*SETTINGS_SEEN, initial}, resolution.header
        if between >= 3 and anywhere >= 3:
            break
    assert between >= 3, f"never killed between the header copies ({anywhere} kills elsewhere)"
    # The file is whole: the next offline change works, and a daemon serves what it reads.
    done = run_cli("set-file", str(path), "--ttl", "7")
    assert done.returncode == 0, done.stderr
    with ServerProcess([path], tmp_path / "after") as server:
        served = header(server.control, NAME)
        assert served["ttl_seconds"] == 7 and served["owner"] in ("owner-a", "owner-b")
