"""Restarts the guest does not notice: the daemon restarted under fio --verify in a guest,
its listening sockets kept across each restart (vhost_pv/handover.py), QEMU reconnecting
(reconnect=1, whole seconds in QEMU 7.2) to a listener that accepts at once.

Ways to restart, in the order they run in one guest (the listeners pass from one manager to
the next, so every restart is of the same sockets):
- `manual`: the daemon started by hand with NOTIFY_SOCKET/FDSTORE pointing at this process
  (a manager as systemd is one: it keeps the fd store), kill -9, a new `vhost-pv serve`
  started by hand with the stored listeners as LISTEN_FDS;
- `handover`: kill -9 again, and `vhost-pv supervise -- serve` started with the listeners
  (the supervisor's store is seeded with them): the passage to the supervised ways, shown
  apart from the headline (the supervisor and its first daemon both start cold);
- `upgrade`: SIGUSR2 to the supervisor (its warm standby of the installed code takes over
  once the old daemon has stopped);
- `kill`: kill -9 of the supervisor's child (the warm standby takes over).

The pause is measured twice: from the host (the kill or signal until the new daemon has
taken a request of the guest's) and in the guest (a busybox loop reading a sector with
O_DIRECT and printing every gap of 0.5 s or more between two reads, from /proc/uptime).
Nothing may be lost: fio verifies everything it wrote.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.guest import GuestImage, GuestProcess, VhostUserBlkDisk, start_guest
from vhost_pv_tools.serverproc import SupervisedServer

RECONNECT_S = 1
WAYS = ("manual", "handover", "upgrade", "kill")
COUNTED = ("manual", "upgrade", "kill")
"""The restarts the headline figures are over. `handover` is this drill's passage from a
daemon run by hand to `supervise` (two cold interpreter starts in a row), shown apart."""
PAUSE_REPORT_CS = 50
"""The guest's probe reports gaps between two of its reads from this many centiseconds on."""

# fio: random 4k I/O at depth 32 with verify as it goes, for as long as the host restarts
# the daemon; beside it a probe that reads one sector in a loop and reports the gaps.
JOB = """
probe() {{
  read up rest < /proc/uptime; prev=${{up%.*}}${{up#*.}}
  while [ ! -e /tmp/stop ]; do
    dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || echo PROBE-ERROR
    read up rest < /proc/uptime; now=${{up%.*}}${{up#*.}}
    [ $((now - prev)) -ge {report} ] && echo "PAUSE $((now - prev)) AT $now"
    prev=$now
  done
}}
probe &
read up rest < /proc/uptime; echo "FIO-START AT ${{up%.*}}${{up#*.}}"
fio --name=restart --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \\
    --rw=randrw --rwmixread=30 --bs=4k --size=100% --time_based --runtime={runtime} \\
    --verify=crc32c --verify_backlog=512 --verify_fatal=1 \\
    --output-format=json --output=/tmp/fio.json || true
touch /tmp/stop; wait
echo "=== BEGIN fio ==="
cat /tmp/fio.json
echo "=== END fio ==="
"""


class _FdStoreManager:
    """This process as a service manager for a daemon started by hand: the NOTIFY_SOCKET
    listener that keeps what the daemon puts in the fd store (FDSTORE=1), by name."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.store: dict[str, int] = {}

    def collect(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4),
                                                          socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTOREREMOVE") == "1" and name in self.store:
                os.close(self.store.pop(name))
            for fd in fds:
                if fields.get("FDSTORE") == "1" and name not in self.store:
                    self.store[name] = fd
                else:
                    os.close(fd)  # the same listener again (adopted): kept once

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()
        self.sock.close()


def start_with_fds(command: Sequence[str], fds: Sequence[int], names: Sequence[str], log_path: Path,
                   env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `command` as systemd starts a service with passed fds: dup'd to 3, 4, ...,
    LISTEN_FDS/LISTEN_FDNAMES, and LISTEN_PID its own pid (a shell exports its pid, then
    execs, keeping it)."""
    fds = list(fds)

    def arrange() -> None:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds) + max(fds, default=0)) for fd in fds]
        for index, fd in enumerate(high):
            os.dup2(fd, 3 + index)

    full_env = dict(env if env is not None else os.environ, LISTEN_FDS=str(len(fds)),
                    LISTEN_FDNAMES=":".join(names))
    with open(log_path, "ab") as log:
        return subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *command], env=full_env,
                                preexec_fn=arrange, close_fds=False, stdout=log, stderr=subprocess.STDOUT)


def _requests(control: Path) -> int:
    return int(client.status(control)["volumes"][0]["totals"].get("requests", 0))


def _wait(predicate: Callable[[], bool], what: str, timeout: float, guest: GuestProcess) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if predicate():
                return
        if guest.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"restart drill: {what}:\n{guest.console_so_far()[-3000:]}")
        time.sleep(0.01)


def restart_drill(workdir: Path, *, ways: Sequence[str] = WAYS, between_s: float = 3.0,
                  image: GuestImage | None = None, size_mib: int = 64) -> dict[str, Any]:
    """Restart the daemon each way in `ways` under one guest's fio --verify; per restart the
    host-side pause (s), then the guest's pauses, fio's errors, and the daemons' log."""
    volume = workdir / "restart.img"
    volume.unlink(missing_ok=True)
    create_volume(volume, CreateOptions(size=size_mib << 20))
    run = workdir / "run"
    runtime = int(len(ways) * (between_s + 6) + 15)
    server = SupervisedServer([volume], run)
    server.socket_dir.mkdir(parents=True, exist_ok=True)
    log_path = server.log_path
    manager = _FdStoreManager(Path(tempfile.mkdtemp(dir=workdir)))
    env = dict(os.environ, NOTIFY_SOCKET=str(manager.path), FDSTORE="16")
    serve = [sys.executable, "-m", "vhost_pv.cli", *server.serve_args()]
    by_hand = start_with_fds(serve, [], [], log_path, env)
    pauses: dict[str, float] = {}
    warmups: list[float] = []
    supervised = False
    try:
        deadline = time.monotonic() + 60
        while not server.control.is_socket() or not _answers(server.control):
            if by_hand.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"restart drill: the daemon did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        disk = VhostUserBlkDisk(server.socket_for(volume), reconnect=RECONNECT_S)
        with start_guest(JOB.format(runtime=runtime, report=PAUSE_REPORT_CS), disks=[disk],
                         image=image) as guest:
            _wait(lambda: "FIO-START" in guest.console_so_far(), "fio never started", 300, guest)
            for way in ways:
                _wait(lambda: _requests(server.control) > 1000, "no guest I/O", 120, guest)
                time.sleep(between_s)
                began_wall = time.time()
                if way in ("manual", "handover"):
                    assert not supervised, "manual and handover come before the supervised ways"
                    manager.collect()
                    began = time.monotonic()
                    by_hand.kill()
                    by_hand.wait()
                    names = list(manager.store)
                    fds = [manager.store[name] for name in names]
                    if way == "manual":
                        by_hand = start_with_fds(serve, fds, names, log_path, env)
                    else:
                        server.process = start_with_fds(server.command(), fds, names, log_path)
                        supervised = True
                elif way == "upgrade":
                    # The old daemon serves on while the new build's standby warms up; the
                    # guest's pause starts when the old one stops (a few ms before its exit).
                    old = server.graceful_restart()
                    signalled = time.monotonic()
                    _wait(functools.partial(_gone, old), "the old daemon did not stop", 60, guest)
                    began = time.monotonic()
                    warmups.append(began - signalled)
                else:
                    old = server.child_pid()
                    began = time.monotonic()
                    os.kill(old, signal.SIGKILL)
                # The control socket's listener is kept too: this waits in its backlog for the
                # new daemon; requests > 0 from a daemon started after `began` is the guest back.
                _wait(functools.partial(_fresh_requests, server.control, began_wall),
                      f"no I/O after {way}", 60, guest)
                pauses[way] = time.monotonic() - began
            result = guest.wait(runtime + 180)
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
            by_hand.wait()
        if supervised:
            server.stop()
        manager.close()
    volume.unlink(missing_ok=True)
    text = result.section("fio")
    if text is None:
        raise RuntimeError(f"restart drill: no fio result:\n{result.console[-3000:]}")
    job = json.loads(text[text.index("{"):])["jobs"][0]
    guest_pauses = [int(line.split()[1]) / 100 for line in result.console.splitlines()
                    if line.startswith("PAUSE ")]
    guest_times = [line for line in result.console.splitlines() if line.startswith(("PAUSE ", "FIO-START"))]
    return {
        "ways": list(ways),
        "pauses_s": pauses,
        "guest_pauses_s": guest_pauses,
        "upgrade_signal_to_stop_s": warmups,
        "fio_errors": int(job["error"]),
        "probe_errors": result.console.count("PROBE-ERROR"),
        "fio_clat_max_s": max(job[d]["clat_ns"]["max"] for d in ("read", "write")) / 1e9,
        "ios": int(job["read"]["total_ios"] + job["write"]["total_ios"]),
        "guest_timeline": guest_times,
        "console": result.console,
        "log": log_path.read_text(errors="replace"),
    }


def _gone(pid: int) -> bool:
    """Exited (and reaped by the supervisor, which does so at once)."""
    return not Path(f"/proc/{pid}").exists()


def _answers(control: Path) -> bool:
    try:
        client.status(control)
    except OSError:
        return False
    return True


def _fresh_requests(control: Path, began_wall: float) -> bool:
    """The daemon answering was started after `began_wall` and has taken a request."""
    status = client.status(control)
    return bool(status["started_at"] > began_wall
                and int(status["volumes"][0]["totals"].get("requests", 0)) > 0)


def restart_rows(workdir: Path, rounds: int = 2) -> dict[str, Any]:
    """The bench row: `rounds` drills; pause p50/max per way and over all, errors."""
    drills = [restart_drill(workdir) for _ in range(rounds)]
    pauses = [d["pauses_s"][way] for d in drills for way in COUNTED]
    by_way = {way: [d["pauses_s"][way] for d in drills] for way in WAYS}
    guest = [p for d in drills for p in d["guest_pauses_s"]]
    return {
        "restarts": len(pauses),
        "pause_p50_s": statistics.median(pauses),
        "pause_max_s": max(pauses),
        "by_way": {way: {"p50_s": statistics.median(v), "max_s": max(v)} for way, v in by_way.items()},
        "guest_pause_max_s": max(guest, default=0.0),
        "guest_pause_p50_s": statistics.median(guest) if guest else 0.0,
        "fio_errors": sum(d["fio_errors"] + d["probe_errors"] for d in drills),
        "fio_clat_max_s": max(d["fio_clat_max_s"] for d in drills),
        "ios": sum(d["ios"] for d in drills),
    }


def table_rows(rows: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(row, value, goal) lines."""
    goal = RECONNECT_S + 0.5
    lines = [
        (f"I/O pause across a restart, p50 / max over {rows['restarts']} restarts (s, host: kill or "
         "signal to the first request taken), sockets kept",
         f"{rows['pause_p50_s']:.2f} / {rows['pause_max_s']:.2f}",
         f"<= {goal:.1f} (QEMU reconnect={RECONNECT_S} s + 0.5)"),
    ]
    for way, figures in rows["by_way"].items():
        label = {"manual": "  kill -9, new serve started by hand with LISTEN_FDS (systemd's way)",
                 "handover": "  (not counted) kill -9, supervise started with LISTEN_FDS: two cold starts",
                 "upgrade": "  SIGUSR2 to supervise: graceful, new build (warm standby)",
                 "kill": "  kill -9 under supervise (warm standby)"}[way]
        lines.append((label, f"{figures['p50_s']:.2f} / {figures['max_s']:.2f}", ""))
    lines += [
        ("guest-side pause, p50 / max (s, gaps >= 0.5 s between two O_DIRECT reads)",
         f"{rows['guest_pause_p50_s']:.2f} / {rows['guest_pause_max_s']:.2f}", ""),
        ("worst guest completion latency (s, fio clat max)", f"{rows['fio_clat_max_s']:.2f}", ""),
        ("fio verify + probe I/O errors", str(rows["fio_errors"]), "0"),
        ("guest I/Os during the runs", f"{rows['ios']:,}", ""),
    ]
    return lines
