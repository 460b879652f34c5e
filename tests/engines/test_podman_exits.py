"""What the end of an owner container was, told apart with real Podman (4.3, runc), exactly
as the README's table has it: `podman stop -t 1` is a stop (the volume stays attached, an
info alert says so), `podman rm -f` a deletion, `kill -9` of the init from the host and a
main process exiting non-zero by itself are crashes. Each sequence runs with the engine alone
and again with --proc-events, where the kernel reports the init's exit before the engine
says anything (and before Podman's `remove`): the engine's verdict must win.

On this Podman all four end in `died` with exit code 137 (or 3) and, for the stop, usually
no `stop` event: the daemon has to ask the engine (see guard/verdicts.py).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon_status import header, wait_until
from support.podman import Podman, PodmanService

from vhost_pv.control import client
from vhost_pv.volume.volume import CreateOptions, create_volume
from vhost_pv_tools.serverproc import ServerProcess

MiB = 1 << 20
WAIT_FOR_GO = "until [ -e /trigger/go ]; do sleep 0.1; done; exit 3"


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    engine = Podman(tmp_path_factory.mktemp("podman"))
    engine.import_busybox()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def service(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanService]:
    # One `podman system service` for the module: the containers are per test.
    with podman.service(tmp_path_factory.mktemp("svc") / "podman.sock") as running:
        yield running


def stop(podman: Podman, name: str, pid: int) -> None:
    # The container's sh (pid 1 of its namespace) ignores SIGTERM: Podman sends SIGKILL
    # after the 1 s timeout, so it dies of SIGKILL (137), exactly like `kill -9`.
    podman("stop", "-t", "1", name)


def remove(podman: Podman, name: str, pid: int) -> None:
    podman("rm", "-f", name)  # the container's --stop-timeout is 0: SIGKILL at once


def kill_init(podman: Podman, name: str, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)  # from the host, behind the engine's back


def exit_by_itself(podman: Podman, name: str, pid: int) -> None:
    (podman.base / f"trigger-{name}" / "go").touch()


# sequence -> (what it does, the flip's reason or None for no flip, the classification)
SEQUENCES: dict[str, tuple[Callable[[Podman, str, int], None], str | None, str]] = {
    "podman-stop": (stop, None, "stopped by the engine"),
    "podman-rm-f": (remove, "container-deleted", "deleted"),
    "kill-9-init": (kill_init, "container-crashed", "crashed (exit 137, killed by SIGKILL)"),
    "exit-3": (exit_by_itself, "container-crashed", "crashed (exit 3)"),
}


def alerts_of(server: ServerProcess, kind: str, volume: str) -> list[dict[str, Any]]:
    return [a for a in client.alerts(server.control) if a["kind"] == kind and a["volume"] == volume]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proc_events", [False, True], ids=["engine", "engine+proc-events"])
@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_the_owners_end_is_classified_as_the_table_says(
    podman: Podman, service: PodmanService, tmp_path: Path, sequence: str, proc_events: bool
) -> None:
    act, reason, classification = SEQUENCES[sequence]
    name = f"{sequence}-{'proc' if proc_events else 'engine'}"
    trigger = podman.base / f"trigger-{name}"
    trigger.mkdir()
    script = WAIT_FOR_GO if sequence == "exit-3" else "sleep 1000"
    container = podman.run(name, script, trigger=trigger)
    pid = int(podman.inspect(name)["State"]["Pid"])
    path = tmp_path / "vol.img"
    create_volume(path, CreateOptions(size=4 * MiB, ring_size=MiB, owner=name))
    args = ["--engine", service.url] + (["--proc-events"] if proc_events else [])
    try:
        with ServerProcess([path], tmp_path / "d", extra_args=args) as server:
            def bound() -> bool:
                h = header(server.control, "vol")
                return bool(h["owner"] == container and h["owner_pid"] == pid)

            wait_until(bound, 20, "the owner resolved, with its init pid", log=server.log)
            act(podman, name, pid)
            if reason is None:
                wait_until(lambda: bool(alerts_of(server, "owner-stopped", "vol")), 20,
                           "the stop recognised", log=server.log)
                (alert,) = alerts_of(server, "owner-stopped", "vol")
                # Seen as the state "stopping", or as a `stop` event when Podman's stop won its race.
                assert alert["details"]["classification"].startswith("stopped by the engine")
                assert alert["details"]["container"] == container
                assert alert["severity"] == "info"
                podman.wait_exited(name)
                assert not header(server.control, "vol")["dangling"]
                assert alerts_of(server, "owner-gone", "vol") == []
                # The binding no longer names the dead init pid.
                wait_until(lambda: header(server.control, "vol")["owner_pid"] == 0, 10,
                           "the binding refreshed", log=server.log)
            else:
                wait_until(lambda: bool(header(server.control, "vol")["dangling"]), 20,
                           "the flip", log=server.log)
                h = header(server.control, "vol")
                # The engine's verdict, also when the kernel told of the exit first.
                assert (h["reason"], h["dangling_source"]) == (reason, "engine")
                (alert,) = alerts_of(server, "owner-gone", "vol")
                assert alert["details"]["classification"] == classification
                assert alert["details"]["container"] == container
                assert classification in alert["message"]
                assert alerts_of(server, "owner-stopped", "vol") == []
            status = client.status(server.control)["watchers"]
            if proc_events:
                assert status["proc_events"]["owner_exits_seen"] == 1
                # The kernel's exit was heard first, and waited for the engine's verdict.
                log = server.log()
                assert f"the owner of vol (pid {pid})" in log and "asking the engine what it was" in log
                assert f"engine: owner {container[:12]}'s exit" in log and "judged by the engine" in log
            if sequence == "podman-stop":
                assert status["engine"]["stop_polls"] > 0
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
