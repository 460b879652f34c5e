"""A real QEMU guest runs fio with verify while the daemon is restarted four ways, its
listening sockets kept throughout (bench/restart.py): kill -9 and a new `vhost-pv serve`
started by hand with the stored listeners as LISTEN_FDS; kill -9 and `vhost-pv supervise`
started with them; SIGUSR2 to the supervisor (the upgrade); kill -9 of its child. fio ends
with no I/O error and no verify error, the guest's probe read never fails, and every
restarted daemon adopted the listeners (QEMU's reconnect met a listener, never a refusal)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.restart import COUNTED, RECONNECT_S, WAYS, restart_drill
from vhost_pv_tools.guest import GuestImage


@pytest.mark.timeout(900)
def test_restarts_under_fio_verify_keep_the_sockets(guest_image: GuestImage, tmp_path: Path) -> None:
    drill = restart_drill(tmp_path, image=guest_image, size_mib=32)
    console, log = drill["console"], drill["log"]
    assert drill["fio_errors"] == 0, console[-3000:]
    assert drill["probe_errors"] == 0, console[-3000:]
    assert set(drill["pauses_s"]) == set(WAYS)
    # Every daemon after the first adopted both listeners (volume and control).
    assert log.count("adopted the passed listener") == 2 * len(WAYS), log
    assert "graceful restart: child pid" in log and "killed by SIGKILL" in log, log
    assert "Traceback" not in log, log
    # Under supervise, the warm standby took over both times (no cold start).
    assert log.count("takes over") == 2, log
    # The guest waits about QEMU's reconnect interval (its first attempt finds a listener and a
    # daemon), not a refused attempt and another interval more; the passage to supervise
    # (two cold starts in a row) is allowed more.
    print("restart pauses (host, s):", drill["pauses_s"], "guest-side gaps (s):", drill["guest_pauses_s"])
    for way, pause in drill["pauses_s"].items():
        limit = RECONNECT_S + 1.5 if way in COUNTED else 2 * RECONNECT_S + 2.5
        assert pause < limit, (way, drill["pauses_s"])
