"""The daemon's queue workers run under the seccomp filter; its event loop does not.

What the kernel says about each thread (/proc/PID/task/TID/status, "Seccomp: 2" = filter
mode) is checked against what status reports, with the default (kill), `--seccomp off` and
$VHOST_PV_SECCOMP=log. That the allow-list is complete is shown by the hostile-input tests
(tests/daemon/test_hostile_frontend.py, test_redteam.py, test_fuzz.py, ...), which all run
with the default: any system call missing from it would end their daemon.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.attach import Guest, pattern, run_cli
from support.daemon_status import volume_entry

from vhost_pv.cli import EXIT_USAGE
from vhost_pv.control import client
from vhost_pv.seccomp import ENV
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20


def _thread_modes(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (comm, seccomp mode) for every thread of the process."""
    modes = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # the thread ended while we looked
        mode = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Seccomp:"))
        modes[int(task.name)] = (comm, mode)
    return modes


@contextmanager
def _attached_daemon(tmp_path: Path, extra_args: list[str]) -> Iterator[tuple[ServerProcess, Guest]]:
    path = tmp_path / "vol0.img"
    create_volume(path, CreateOptions(size=8 * MiB, ring_size=1 * MiB))
    with ServerProcess([path], tmp_path / "d", queues=2, extra_args=extra_args) as server:
        guest = Guest(server.socket_for(path))
        try:
            guest.round_trip(8, pattern(4096, 3))   # the worker serves, under whatever filter
            yield server, guest
        finally:
            guest.close()


def test_queue_workers_are_filtered_and_the_event_loop_is_not(tmp_path: Path) -> None:
    with _attached_daemon(tmp_path, []) as (server, _guest):
        status = client.status(server.control)
        assert status["seccomp"] == "kill"
        queues = volume_entry(server.control, "vol0")["connection"]["queues"]
        # The Guest starts queue 0 only: its worker is filtered, queue 1 has none.
        assert [q["filtered"] for q in queues] == [True, False]
        modes = _thread_modes(server.pid)
        assert modes[server.pid][1] == 0, "the event loop's thread must stay unfiltered"
        # One worker thread in filter mode (2); io_uring's kernel workers it spawned inherit it.
        filtered = [comm for comm, mode in modes.values() if mode == 2 and not comm.startswith("iou-")]
        assert len(filtered) == 1, modes
        assert all(mode == 0 for comm, mode in modes.values() if mode != 2), modes
        server.wait_log("seccomp: data-path workers confined")
        text = run_cli("status", "--control", str(server.control))
        assert "data-path seccomp filter: kill" in text.stdout, text.stderr


@pytest.mark.parametrize(("extra_args", "env", "mode"), [
    (["--seccomp", "off"], None, "off"),
    ([], "log", "log"),
])
def test_the_mode_can_be_chosen_for_debugging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              extra_args: list[str], env: str | None, mode: str) -> None:
    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)   # inherited by the daemon
    with _attached_daemon(tmp_path, extra_args) as (server, _guest):
        assert client.status(server.control)["seccomp"] == mode
        queues = volume_entry(server.control, "vol0")["connection"]["queues"]
        modes = _thread_modes(server.pid)
        if mode == "off":
            assert not any(q["filtered"] for q in queues)
            assert all(m == 0 for _, m in modes.values()), modes
            server.wait_log("seccomp: off")
        else:
            assert queues[0]["filtered"]
            assert sum(1 for comm, m in modes.values() if m == 2 and not comm.startswith("iou-")) == 1
            server.wait_log("seccomp: log mode")


def test_a_bad_mode_in_the_environment_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "strict")
    result = run_cli("serve", "--socket-dir", str(tmp_path), "--control", str(tmp_path / "c.sock"),
                     str(tmp_path / "none.img"))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "VHOST_PV_SECCOMP='strict'" in result.stderr
