"""The daemon under a service manager: a real datagram listener as NOTIFY_SOCKET, WATCHDOG_USEC
set as systemd sets it. READY=1 once the control socket answers, STATUS as volumes attach and
flip, WATCHDOG=1 pings at the interval, RELOADING/READY around SIGHUP, STOPPING=1 on SIGTERM;
and a queue worker stuck on a stalled disk is reported while the pings go on (supervision.py)."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from support.attach import Guest, pattern
from support.daemon_status import wait_until
from support.frontend import write_request
from support.notify import NotifyListener
from support.stall import resumed, stallable_fs, waiting_on_fuse

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s (half of it, as sd_watchdog_enabled(3) says)


def _answers(control: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(control))
        except OSError:
            return False
    return True


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.timeout(60)
def test_notify_protocol(tmp_path: Path) -> None:
    volume = tmp_path / "vol0.img"
    create_volume(volume, CreateOptions(size=4 * MiB, ring_size=MiB))
    server = ServerProcess([volume], tmp_path / "run")
    answered_at_ready: list[bool] = []

    def on_message(fields: dict[str, str]) -> None:
        # Probed the moment READY arrives: the control socket must answer by then.
        if fields.get("READY") == "1" and not answered_at_ready:
            answered_at_ready.append(_answers(server.control))

    with NotifyListener(tmp_path / "notify.sock", on_message) as manager:
        server.env = manager.env(WATCHDOG_USEC)
        with server:
            manager.wait_for("READY", "1")
            assert answered_at_ready == [True]
            assert manager.statuses()[0] == "1 volume served, 0 attached, 0 dangling"

            # Pings at the interval: never further apart than WATCHDOG_USEC, the manager's limit.
            time.sleep(2.0)
            pings = [t for t, m in manager.with_key("WATCHDOG") if m["WATCHDOG"] == "1"]
            assert len(pings) >= 6, pings
            assert max(_gaps(pings)) < WATCHDOG_USEC / 1e6, _gaps(pings)

            # STATUS follows attaches and flips.
            guest = Guest(server.socket_for(volume))
            try:
                guest.round_trip(0, pattern(4096, 1))
                wait_until(lambda: "1 volume served, 1 attached, 0 dangling" in manager.statuses(), 5.0,
                           "STATUS with the frontend attached")
                client.persistent_disk_dangling(server.control, "vol0", reason="test")
                wait_until(lambda: "1 volume served, 1 attached, 1 dangling" in manager.statuses(), 5.0,
                           "STATUS with the volume dangling")
            finally:
                guest.close()
            wait_until(lambda: manager.statuses()[-1] == "1 volume served, 0 attached, 1 dangling", 5.0,
                       "STATUS after the frontend left")

            # SIGHUP: RELOADING=1, then READY=1 again.
            sent = time.monotonic()
            os.kill(server.pid, signal.SIGHUP)
            reloading = manager.wait_for("RELOADING", "1", since=sent)
            assert manager.wait_for("READY", "1", since=reloading) >= reloading
            assert int(manager.with_key("RELOADING", since=sent)[0][1]["MONOTONIC_USEC"]) > 0

            stop_sent = time.monotonic()
        # Leaving the block sent SIGTERM and waited for exit 0.
        stopping = manager.wait_for("STOPPING", "1", since=stop_sent, timeout=1.0)
        assert not manager.with_key("WATCHDOG", since=stopping), "pinged after STOPPING=1"


@pytest.mark.timeout(90)
def test_stalled_storage_is_reported_and_the_watchdog_goes_on(tmp_path: Path) -> None:
    """A worker stuck in the kernel on a stalled disk (its FUSE server stopped): after
    --worker-stuck-after the log names the volume and the queue, an alert and STATUS say so,
    and the pings go ON (a restart cannot unstick a disk and would interrupt every other
    volume); when the disk answers again the worker is reported moving."""
    (tmp_path / "fuse").mkdir()
    with stallable_fs(tmp_path / "fuse") as (mount, fuse_pid), \
            NotifyListener(tmp_path / "notify.sock") as manager:
        stalled = mount / "slow.img"
        create_volume(stalled, CreateOptions(size=4 * MiB, ring_size=MiB))
        server = ServerProcess([stalled], tmp_path / "run", env=manager.env(WATCHDOG_USEC),
                               extra_args=["--worker-stuck-after", "1"])
        with server, resumed(fuse_pid):
            manager.wait_for("READY", "1")
            guest = Guest(server.socket_for(stalled))
            try:
                guest.round_trip(0, pattern(4096, 1))
                os.kill(fuse_pid, signal.SIGSTOP)
                write_request(guest.memory, 8, pattern(65536, 2)).submit(guest.ring)
                guest.frontend.kick(0)
                wait_until(lambda: waiting_on_fuse(server.pid), 10.0,
                           "the worker waiting on the stopped FUSE server", server.log)
                line = server.wait_log(r"slow queue 0: worker waiting on the volume's storage for \d+s",
                                       timeout=10.0)
                assert "keeps serving the other volumes" in line
                checked_from = time.monotonic()
                time.sleep(1.5)
                assert len(manager.with_key("WATCHDOG", since=checked_from)) >= 3, "pings stopped"
                assert any("1 queue waiting on stalled storage" in s for s in manager.statuses())
                kinds = client.status(server.control)["alerts"]["by_kind"]
                assert kinds.get("storage-stalled") == 1, kinds
                os.kill(fuse_pid, signal.SIGCONT)
                server.wait_log(r"slow queue 0: worker moving again")
            finally:
                os.kill(fuse_pid, signal.SIGCONT)
                guest.close()
