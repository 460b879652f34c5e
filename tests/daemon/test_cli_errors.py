"""Bad input at the CLI: one clear "vhost-pv: ..." line and a non-zero exit, never a traceback.

Every case runs `vhost-pv` as a subprocess the way an admin would. The cases that need a
daemon share one (module scope) and check afterwards that its log has no traceback or ERROR.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_pv import cli
from vhost_pv.control import client
from vhost_pv_tools.serverproc import ServerProcess

REPO = Path(__file__).resolve().parents[2]
_ENTRY = REPO / ".venv" / "bin" / "vhost-pv"
VHOST_PV = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-m", "vhost_pv.cli"]
LONG = "x" * 200
NON_UTF8 = b"bad\xffname"
ACCENTS = "\u00e9" * 40  # 40 characters, 80 bytes of UTF-8: fits the header in characters only


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.vol = root / "vol.img"
        self.bystander = root / "other.img"
        self.trunc = root / "trunc.img"
        self.junk = root / "junk.img"
        self.stale = root / "stale.sock"
        self.fifo = root / "fifo"
        self.server: ServerProcess | None = None

    @property
    def control(self) -> Path:
        assert self.server is not None
        return self.server.control

    def expand(self, arg: str | bytes) -> str | bytes:
        if isinstance(arg, bytes):
            return arg
        return arg.format(
            root=self.root, vol=self.vol, trunc=self.trunc, junk=self.junk, stale=self.stale, fifo=self.fifo,
            missing=self.root / "missing" / "x", control=self.control,
        )


def run(*args: str | bytes, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*VHOST_PV, *args], stdout=stdout, stderr=subprocess.PIPE, timeout=30, check=False)


# A daemon that started logs what it did (to stderr, as under systemd) before it gives up.
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def one_line(result: subprocess.CompletedProcess[bytes], *, daemon_log: bool = False) -> str:
    """The single "vhost-pv:" line a failing command must print, and nothing else on stderr
    (with daemon_log: besides the log lines of a daemon that had started)."""
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    if daemon_log:
        lines = [line for line in lines if not _LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("vhost-pv:") and lines[0][9:].strip(), stderr
    return lines[0]


def assert_daemon_log_clean(ws: Workspace) -> None:
    assert ws.server is not None
    text = ws.server.log()
    assert "Traceback" not in text and " ERROR " not in text, text


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    ws = Workspace(tmp_path_factory.mktemp("cli-errors"))
    for path in (ws.vol, ws.bystander):
        result = run("create", str(path), "--size", "4M", "--ring-size", "1M")
        assert result.returncode == 0, result.stderr
    with open(ws.vol, "rb") as f:
        ws.trunc.write_bytes(f.read(1 << 20))  # a valid header, but the data region is cut off
    ws.junk.write_bytes(os.urandom(8192))
    os.mkfifo(ws.fifo)  # opening it for reading would wait for a writer forever
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(ws.stale))  # a socket file nobody listens on: a daemon that died
    ws.server = ServerProcess([ws.vol, ws.bystander], ws.root / "daemon").start()
    try:
        yield ws
    finally:
        code = ws.server.stop()
        assert code == 0, ws.server.log()


FAILED = 1
USAGE = 2

# (id, argv, expected exit code); argv strings may name the workspace's files ({vol}, ...).
CASES: list[tuple[str, list[str | bytes], int]] = [
    ("create-missing-dir", ["create", "{missing}", "--size", "4M"], FAILED),
    ("create-1000T", ["create", "{root}/huge.img", "--size", "1000T"], FAILED),
    ("create-size-zero", ["create", "{root}/z.img", "--size", "0"], USAGE),
    ("create-size-unaligned", ["create", "{root}/z.img", "--size", "1000"], USAGE),
    ("create-size-absurd", ["create", "{root}/z.img", "--size", "99999999999999999999T"], USAGE),
    ("create-size-words", ["create", "{root}/z.img", "--size", "lots"], USAGE),
    ("create-ttl-negative", ["create", "{root}/z.img", "--size", "4M", "--ttl", "-5"], USAGE),
    ("create-ttl-huge", ["create", "{root}/z.img", "--size", "4M", "--ttl", str(1 << 64)], USAGE),
    ("create-owner-long", ["create", "{root}/z.img", "--size", "4M", "--owner", LONG], USAGE),
    ("create-owner-non-utf8", ["create", "{root}/z.img", "--size", "4M", "--owner", NON_UTF8], USAGE),
    ("create-too-many-uids", ["create", "{root}/z.img", "--size", "4M", "--allow-uids", "1,2,3,4,5,6,7,8,9"],
     USAGE),
    ("create-uid-huge", ["create", "{root}/z.img", "--size", "4M", "--allow-uids", "99999999999"], USAGE),
    ("create-ring-tiny", ["create", "{root}/z.img", "--size", "4M", "--ring-size", "1"], USAGE),
    ("create-into-directory", ["create", "{root}", "--size", "4M"], FAILED),
    ("inspect-directory", ["inspect", "{root}"], FAILED),
    ("inspect-dev-null", ["inspect", "/dev/null"], FAILED),
    ("inspect-junk", ["inspect", "{junk}"], FAILED),
    ("inspect-truncated", ["inspect", "{trunc}"], FAILED),
    ("inspect-missing", ["inspect", "{missing}"], FAILED),
    ("inspect-fifo", ["inspect", "{fifo}"], FAILED),
    ("ring-fifo", ["ring", "{fifo}"], FAILED),
    ("serve-truncated", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock", "{trunc}"],
     FAILED),
    ("serve-fifo", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock", "{fifo}"], FAILED),
    ("ring-directory", ["ring", "{root}"], FAILED),
    ("ring-dev-null", ["ring", "/dev/null"], FAILED),
    ("ring-junk", ["ring", "{junk}"], FAILED),
    ("ring-truncated", ["ring", "{trunc}"], FAILED),
    ("ring-dump-onto-file", ["ring", "{vol}", "--dump", "{junk}"], FAILED),
    ("verify-directory", ["verify", "{root}"], FAILED),
    ("verify-dev-null", ["verify", "/dev/null"], FAILED),
    ("verify-junk", ["verify", "{junk}"], FAILED),
    ("verify-truncated", ["verify", "{trunc}"], FAILED),
    ("verify-missing", ["verify", "{missing}"], FAILED),
    ("verify-fifo", ["verify", "{fifo}"], FAILED),
    ("status-no-socket", ["status", "--control", "{missing}"], FAILED),
    ("status-regular-file", ["status", "--control", "{junk}"], FAILED),
    ("status-directory", ["status", "--control", "{root}"], FAILED),
    ("status-daemon-gone", ["status", "--control", "{stale}"], FAILED),
    ("status-path-too-long", ["status", "--control", "/tmp/" + LONG], USAGE),
    ("alerts-daemon-gone", ["alerts", "--control", "{stale}"], FAILED),
    ("alerts-since-negative", ["alerts", "--control", "{control}", "--since", "-1"], USAGE),
    ("ioctl-reason-long", ["ioctl", "--control", "{control}", "Persistent_Disk_Dangling", "vol",
                           "--reason", LONG], USAGE),
    ("ioctl-reason-bytes", ["ioctl", "--control", "{control}", "Persistent_Disk_Dangling", "vol",
                            "--reason", ACCENTS], USAGE),
    ("ioctl-reason-non-utf8", ["ioctl", "--control", "{control}", "Persistent_Disk_Dangling", "vol",
                               "--reason", NON_UTF8], USAGE),
    ("ioctl-volume-long", ["ioctl", "--control", "{control}", "Persistent_Disk_Dangling", LONG], USAGE),
    ("ioctl-unknown-volume", ["ioctl", "--control", "{control}", "Persistent_Disk_Dangling", "nosuch"],
     FAILED),
    ("ioctl-daemon-gone", ["ioctl", "--control", "{stale}", "Persistent_Disk_Dangling", "vol"], FAILED),
    ("reclaim-unknown-volume", ["reclaim", "--control", "{control}", "nosuch", "--owner", "c"], FAILED),
    ("reclaim-owner-long", ["reclaim", "--control", "{control}", "vol", "--owner", LONG], USAGE),
    ("bind-pid-negative", ["bind", "--control", "{control}", "vol", "--container", "c", "--pid", "-1"],
     USAGE),
    ("bind-pid-huge", ["bind", "--control", "{control}", "vol", "--container", "c", "--pid", str(1 << 40)],
     USAGE),
    ("bind-pid-words", ["bind", "--control", "{control}", "vol", "--container", "c", "--pid", "one"], USAGE),
    ("bind-container-long", ["bind", "--control", "{control}", "vol", "--container", LONG], USAGE),
    ("bind-unknown-volume", ["bind", "--control", "{control}", "nosuch", "--container", "c"], FAILED),
    ("delete-unknown-volume", ["delete", "--control", "{control}", "nosuch"], FAILED),
    ("set-unknown-volume", ["set", "--control", "{control}", "nosuch", "--ttl", "1h"], FAILED),
    ("set-daemon-gone", ["set", "--control", "{stale}", "vol", "--ttl", "1h"], FAILED),
    ("set-served-file", ["set-file", "{vol}", "--ttl", "1h"], FAILED),
    ("set-file-missing", ["set-file", "{missing}", "--ttl", "1h"], FAILED),
    ("set-file-junk", ["set-file", "{junk}", "--ttl", "1h"], FAILED),
    ("set-file-fifo", ["set-file", "{fifo}", "--ttl", "1h"], FAILED),
    ("ring-ctl-unknown-volume", ["ring-ctl", "--control", "{control}", "list", "nosuch"], FAILED),
    ("meta-vm-long", ["meta", "get", "--control", "{control}", LONG, "instance/id"], USAGE),
    ("meta-key-long", ["meta", "get", "--control", "{control}", "vm0", "k" * 300], USAGE),
    ("meta-value-non-utf8", ["meta", "set", "--control", "{control}", "vm0", "attributes/a", NON_UTF8],
     USAGE),
    ("meta-unknown-vm", ["meta", "ls", "--control", "{control}", "nosuch"], FAILED),
    ("meta-set-no-value", ["meta", "set", "--control", "{control}", "vm0", "attributes/a"], USAGE),
    ("meta-relay-no-port", ["meta-relay", "localhost"], USAGE),
    ("meta-relay-port-range", ["meta-relay", "localhost:99999"], USAGE),
    ("loadgen-no-socket", ["loadgen", "--socket", "{missing}", "--runtime", "1"], FAILED),
    ("loadgen-not-a-socket", ["loadgen", "--socket", "{junk}", "--runtime", "1"], FAILED),
    ("loadgen-iodepth-zero", ["loadgen", "--socket", "{stale}", "--iodepth", "0"], USAGE),
    ("loadgen-runtime-negative", ["loadgen", "--socket", "{stale}", "--runtime", "-4"], USAGE),
    ("loadgen-runtime-nan", ["loadgen", "--socket", "{stale}", "--runtime", "nan"], USAGE),
    ("loadgen-rwmix", ["loadgen", "--socket", "{stale}", "--rw", "randrw", "--rwmixread", "101"], USAGE),
    ("loadgen-bs-zero", ["loadgen", "--socket", "{stale}", "--bs", "0"], USAGE),
    ("loadgen-queues-huge", ["loadgen", "--socket", "{stale}", "--queues", "1000"], USAGE),
    ("loadgen-seed-negative", ["loadgen", "--socket", "{stale}", "--seed", "-1"], USAGE),
    ("serve-missing-volume", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock", "{missing}"],
     FAILED),
    ("serve-junk-volume", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock", "{junk}"],
     FAILED),
    ("serve-queues-zero", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock", "--queues", "0",
                           "{vol}"], USAGE),
    ("serve-reconcile-nan", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock",
                             "--reconcile-interval", "nan", "{vol}"], USAGE),
    ("serve-meta-http-port", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock",
                              "--meta-http", "127.0.0.1:http", "{vol}"], USAGE),
    ("serve-control-dir-missing", ["serve", "--socket-dir", "{root}/s", "--control", "{missing}", "{vol}"],
     FAILED),
    ("serve-socket-dir-is-file", ["serve", "--socket-dir", "{junk}", "--control", "{root}/c.sock", "{vol}"],
     FAILED),
    ("serve-policy-missing", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock",
                              "--meta-socket", "{root}/m.sock", "--meta-policy", "{missing}", "{vol}"],
     FAILED),
    ("serve-policy-junk", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock",
                           "--meta-socket", "{root}/m.sock", "--meta-policy", "{junk}", "{vol}"], FAILED),
    ("serve-policy-alone", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock",
                            "--meta-policy", "{junk}", "{vol}"], USAGE),
    ("serve-webhook-not-a-url", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock",
                                 "--alert-webhook", "alertmanager:9093", "{vol}"], USAGE),
    ("demo-size-zero", ["demo", "--workdir", "{missing}", "--size", "0"], USAGE),
    ("serve-engine-scheme", ["serve", "--socket-dir", "{root}/s", "--control", "{root}/c.sock",
                             "--engine", "http://x", "{vol}"], USAGE),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("argv", "code"), [(argv, code) for _, argv, code in CASES],
                         ids=[name for name, _, _ in CASES])
def test_bad_input(ws: Workspace, argv: list[str | bytes], code: int) -> None:
    result = run(*(ws.expand(arg) for arg in argv))
    assert result.returncode == code, result.stderr
    stderr = result.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    if code == USAGE and stderr.startswith("usage:"):
        # argparse's own format: the usage, then one "vhost-pv CMD: error: ..." line.
        assert ": error: " in stderr.splitlines()[-1], stderr
    else:
        one_line(result, daemon_log=argv[0] == "serve")
    assert_daemon_log_clean(ws)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [
    ["inspect", "{vol}"],
    ["inspect", "--json", "{vol}"],
    ["ring", "{vol}"],
    ["ring", "--json", "{vol}"],
    ["verify", "{vol}"],
    ["status", "--control", "{control}"],
    ["status", "--json", "--control", "{control}"],
    ["ring-ctl", "--control", "{control}", "list", "vol"],
    ["meta", "ls", "--control", "{control}", "vm0"],
], ids=lambda argv: "-".join(a for a in argv if not a.startswith("{")))
def test_stdout_closed_early(ws: Workspace, argv: list[str]) -> None:
    """`vhost-pv ring VOL | head`: the reader went away; one line, no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes anything: its first write fails
    try:
        result = run(*(str(ws.expand(a)) for a in argv), stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 1, result.stderr
    assert "broken pipe" in one_line(result)
    assert_daemon_log_clean(ws)


def _wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_alerts_follow_interrupted_and_gone(ws: Workspace) -> None:
    """Ctrl-C ends `alerts --follow` with 130 and one line; the daemon logs one INFO line for
    the subscriber that left, not a traceback, also when the next alert is sent to it."""
    assert ws.server is not None
    follower = subprocess.Popen([*VHOST_PV, "alerts", "--follow", "--control", str(ws.control)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = ws.server
    _wait_for(lambda: f"alert subscriber pid={follower.pid} " in server.log(), "the subscriber")
    follower.send_signal(signal.SIGINT)
    _, stderr = follower.communicate(timeout=10)
    assert follower.returncode == 130, stderr
    assert stderr.decode().splitlines() == ["vhost-pv: interrupted"]
    # The next alert goes to the subscriber that left: the write is what used to fail.
    for extra in ([], ["--clear"]):
        result = run("ioctl", "--control", str(ws.control), "Persistent_Disk_Dangling", "other", *extra)
        assert result.returncode == 0, result.stderr
    _wait_for(lambda: f"alert subscriber pid={follower.pid} left" in server.log()
              or " ERROR " in server.log(), "the daemon to notice")
    assert_daemon_log_clean(ws)
    # There are alerts now: printing them into a closed pipe is one line too.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run("alerts", "--control", str(ws.control), stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 1 and "broken pipe" in one_line(result)


@pytest.mark.timeout(60)
def test_daemon_refuses_reason_beyond_header(ws: Workspace) -> None:
    """A client that skips the CLI's check: the daemon says why (EINVAL), the flip is not tried."""
    with pytest.raises(client.ControlError) as caught:
        client.persistent_disk_dangling(ws.control, "other", reason=ACCENTS)
    assert caught.value.status == -22
    assert "at most 64" in str(caught.value)
    assert client.status(ws.control)["volumes"][1]["header"]["state"] == "attached"
    assert_daemon_log_clean(ws)


@pytest.mark.timeout(30)
def test_permission_denied_is_one_line(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """EACCES on the control socket (tests run as root, which bypasses modes: simulated)."""

    def refuse(path: Path) -> dict[str, object]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(client, "status", refuse)
    assert cli.main(["status", "--control", str(ws.control)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"vhost-pv: {ws.control}: permission denied "
                                "(the control socket is for root and the daemon's uid)"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [
    ["status", "--control", "{sock}"],
    ["ioctl", "--control", "{sock}", "Persistent_Disk_Dangling", "vol"],
    ["alerts", "--follow", "--control", "{sock}"],
], ids=lambda argv: argv[0])
def test_ctrl_c_while_waiting_for_the_daemon(tmp_path: Path, argv: list[str]) -> None:
    """A daemon that takes the request and never answers; Ctrl-C: exit 130, one line."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(20)
        command = subprocess.Popen([*VHOST_PV, *(a.format(sock=path) for a in argv)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            conn, _ = listener.accept()  # it is connected: now it waits for the reply
            with conn:
                conn.settimeout(20)
                assert conn.recv(4096)  # ...after sending its request
                command.send_signal(signal.SIGINT)
                _, stderr = command.communicate(timeout=20)
        finally:
            if command.poll() is None:
                command.kill()
                command.wait()
    assert command.returncode == 130, stderr
    assert stderr.decode().splitlines() == ["vhost-pv: interrupted"]
